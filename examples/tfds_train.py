"""Train on a TensorFlow Datasets image-classification dataset, with Keras's own `fit`.

    python examples/tfds_train.py --dataset cifar10 --epochs 20

The lower-level API that `keras-convnext train` is built from: a recipe gives what `compile` and
`fit` need, the pipelines are tf.data (they feed any backend).
"""

import argparse

import keras

from keras_convnext import VARIANTS, ConvNeXt, data, get_recipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--variant", default="atto")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)

    recipe = get_recipe("in1k", epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                        warmup_epochs=max(1, args.epochs // 15))
    train_split, val_split = data.tfds_splits(args.dataset)
    train_source, classes, size = data.tfds_source(args.dataset, train_split)
    val_source, _, _ = data.tfds_source(args.dataset, val_split)
    train_ds = data.train_dataset(train_source, recipe, len(classes))
    val_ds = data.eval_dataset(val_source, len(classes), recipe.image_size, recipe.crop_pct, args.batch_size)

    variant = VARIANTS[args.variant]
    model = ConvNeXt(variant.depths, variant.dims, weights=None, input_shape=(args.image_size, args.image_size, 3),
                     classes=len(classes), **recipe.model_kwargs(variant))
    model.compile(**recipe.compile_kwargs(steps_per_epoch=size // args.batch_size))
    history = model.fit(train_ds, validation_data=val_ds, epochs=recipe.epochs, callbacks=recipe.callbacks())
    loss, accuracy = model.evaluate(val_ds, verbose=0)  # fit ended holding the EMA weights
    print(f"{args.dataset}: held-out accuracy {accuracy:.4f}")
    return history, accuracy


if __name__ == "__main__":
    main()
