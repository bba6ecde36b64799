"""FCMAE pre-training on unlabelled digits, then fine-tuning, against the same fine-tuning from scratch.

scikit-learn's 1,797 handwritten digits (8x8 grey), upscaled to 64 px RGB: 2 x 2 patches of 32 px, of
which the official count masks 3 (4 - int(4 * 0.4)). A fixed stratified split (demo.digits_dataset):
1,437 training images, 360 held out. ConvNeXt V2-Atto is pre-trained by FCMAE on the training images
WITHOUT their labels (`FCMAE.fit(images)`), then fine-tuned on the labelled training split with the
V2-Atto fine-tuning recipe (`fcmae_ft_atto`: layer decay 0.9 per block, weight decay 0.3, drop path
0.1, smoothing 0.2, EMA) scaled to this run; the baseline is the same fine-tuning from a random init.
No augmentation on either side (NumPy arrays straight into `fit`). Prints both held-out accuracies
and the wall times.

    KERAS_BACKEND=torch python examples/fcmae_digits.py [--pretrain-epochs 12] [--finetune-epochs 6]
"""

import argparse
import os
import tempfile
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pretrain-lr", type=float, default=1.5e-3, help="peak learning rate as used")
    parser.add_argument("--finetune-lr", type=float, default=2e-3, help="peak learning rate as used")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras

    from keras_convnext import ConvNeXtV2Atto, get_recipe
    from keras_convnext.demo import digits_dataset
    from keras_convnext.fcmae import FCMAE

    (x_train, y_train), (x_test, y_test) = digits_dataset(image_size=args.image_size, seed=args.seed)
    x_train, x_test = x_train.astype("float32"), x_test.astype("float32")
    steps = len(x_train) // args.batch_size
    shape = (args.image_size, args.image_size, 3)

    # 1. FCMAE pre-training on the training images alone (the labels are not used).
    keras.utils.set_random_seed(args.seed)
    pre = get_recipe("fcmae", epochs=args.pretrain_epochs, batch_size=args.batch_size, lr=args.pretrain_lr,
                     lr_batch_size=args.batch_size)
    encoder = ConvNeXtV2Atto(weights=None, include_top=False, input_shape=shape, drop_path_rate=0.0)
    fcmae = FCMAE(encoder, mask_ratio=pre.mask_ratio, seed=args.seed)
    fcmae.compile(optimizer=pre.optimizer(steps))
    start = time.perf_counter()
    history = fcmae.fit(x_train[: steps * args.batch_size], batch_size=args.batch_size, epochs=pre.epochs,
                        verbose=2)
    pretrain_seconds = time.perf_counter() - start
    losses = history.history["loss"]
    encoder_path = os.path.join(tempfile.mkdtemp(prefix="fcmae-digits-"), "encoder.keras")
    encoder.save(encoder_path)

    # 2. The same fine-tuning twice: from the FCMAE encoder, and from a random initialisation.
    ft = get_recipe("fcmae_ft_atto", epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.finetune_lr,
                    lr_batch_size=args.batch_size, warmup_epochs=1)
    labels_train = keras.utils.to_categorical(y_train, 10)
    results = {}
    for start_from in ("fcmae", "scratch"):
        keras.utils.set_random_seed(args.seed)
        # The encoder file as `keras-convnext train --recipe fcmae` writes it: its stages load, the final norm
        # and the head start fresh (head init 0.001, as the official fine-tuning).
        model = ConvNeXtV2Atto(weights=encoder_path if start_from == "fcmae" else None, classes=10,
                               input_shape=shape, **ft.model_kwargs("convnextv2_atto"))
        model.compile(**ft.compile_kwargs(steps))
        start = time.perf_counter()
        model.fit(x_train, labels_train, batch_size=args.batch_size, epochs=ft.epochs, verbose=2)
        seconds = time.perf_counter() - start
        # fit ends with the EMA weights in the model (the recipe evaluates the EMA).
        predictions = model.predict(x_test, batch_size=256, verbose=0).argmax(-1)
        results[start_from] = (float((predictions == y_test).mean()), seconds)

    print(f"\nConvNeXt V2-Atto on scikit-learn digits, {args.image_size} px, backend {keras.backend.backend()}, "
          f"{len(x_train)} train / {len(x_test)} held out")
    print(f"FCMAE pre-training: {pre.epochs} epochs without labels, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"{pretrain_seconds:.0f} s (encoder: {encoder_path})")
    for start_from, label in (("fcmae", "fine-tuned from FCMAE"), ("scratch", "same recipe from scratch")):
        accuracy, seconds = results[start_from]
        print(f"{label:<26} {ft.epochs} epochs: held-out accuracy {accuracy:.4f}, {seconds:.0f} s")
    return {"pretrain_seconds": pretrain_seconds, "losses": losses, **results}


if __name__ == "__main__":
    main()
