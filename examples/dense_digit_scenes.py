"""Digit scenes: RetinaNet detection, DeepLabV3 and UperNet segmentation on a ConvNeXt-Atto, each from a
classification-pretrained backbone and from scratch, scored on held-out scenes. Prints the README's table.

    KERAS_BACKEND=jax python examples/dense_digit_scenes.py [--only retinanet] [--out runs/digit-scenes]

Each head has the budget the README's table was measured at: RetinaNet 1,536 training scenes for 4 epochs with
one 3x3 conv before each head's logits (the paper's four cost 3.4 s a step against 1.0 s on 2 CPU cores), the
segmenters 3,072 scenes for 3 epochs (a few hundred scenes are memorised, not learnt). `--epochs` and
`--train-scenes` override them for every head.

ImageNet weights cannot be downloaded here, so "pretrained" is the same route on the data at hand: an
Atto classifier trained on the digits the training scenes draw from (the "train" half of load_digits,
32 px), whose backbone `train_dense(weights=...)` loads exactly as it would load an ImageNet checkpoint.
The held-out scenes use the other half of the digits.
"""

import argparse
import json
import os
import time

import numpy as np


def pretrain_classifier(path, epochs, seed=0):
    """An Atto classifier on the train-half digits (bicubic 32 px, grey as RGB); returns its held-out accuracy
    on the other half and the seconds it took."""
    import keras
    from PIL import Image
    from sklearn.datasets import load_digits

    import keras_convnext as kc
    from keras_convnext import scenes

    digits = load_digits()
    small = (digits.images * (255.0 / 16.0)).round().astype("uint8")
    images = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC)) for im in small])
    images = np.repeat(images[..., None], 3, axis=-1)
    train, test = scenes.digit_split("train"), scenes.digit_split("test")
    keras.utils.set_random_seed(seed)
    model = kc.ConvNeXtAtto(weights=None, input_shape=(32, 32, 3), classes=10, drop_path_rate=0.05)
    model.compile(optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.05), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(images[train], digits.target[train], batch_size=32, epochs=epochs, verbose=2)
    seconds = time.perf_counter() - start
    accuracy = model.evaluate(images[test], digits.target[test], verbose=0)[1]
    model.save(path)
    return float(accuracy), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/digit-scenes")
    parser.add_argument("--epochs", type=int, help="epochs of each dense task (default: each head's own)")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--train-scenes", type=int, help="training scenes (default: each head's own)")
    parser.add_argument("--test-scenes", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="heads to run (retinanet deeplabv3 upernet)")
    args = parser.parse_args()

    import keras

    from keras_convnext.dense_train import train_dense

    os.makedirs(args.out, exist_ok=True)
    classifier = os.path.join(args.out, "classifier.keras")
    accuracy, seconds = pretrain_classifier(classifier, args.pretrain_epochs)
    print(f"pretrained classifier: held-out digit accuracy {accuracy:.4f} in {seconds:.0f} s")
    # Detection at 128 px (RetinaNet's P7 needs a multiple of 128), 1-5 digits of 16-48 px; segmentation at
    # 64 px, 1-3 digits of 16-32 px (the same scenes' statistics at a quarter of the pixels).
    # (task, head, px, training scenes, epochs, scene arguments)
    small = {"digit_size": (16, 32), "max_digits": 3}
    runs = [("detection", "retinanet", 128, 1536, 4, {}), ("segmentation", "deeplabv3", 64, 3072, 3, small),
            ("segmentation", "upernet", 64, 3072, 3, small)]
    rows = []
    for task, head, size, scenes_n, epochs, scene_args in runs:
        if args.only and head not in args.only:
            continue
        scenes_n, epochs = args.train_scenes or scenes_n, args.epochs or epochs
        for init, weights in (("pretrained", classifier), ("scratch", None)):
            result = train_dense("digit-scenes", os.path.join(args.out, f"{head}-{init}"), task, head=head,
                                 variant="atto", weights=weights, image_size=size, epochs=epochs,
                                 batch_size=16, lr=1e-3, num_scenes=(scenes_n, args.test_scenes),
                                 scene_args=scene_args, upernet_channels=(128, 64), pre_logits_num_conv_layers=1,
                                 verbose=2)
            score = result["map50"] if task == "detection" else result["miou"]
            print(json.dumps({k: v for k, v in result.items() if k not in ("model", "history")}))
            rows.append((head, init, size, scenes_n, epochs, score, result.get("map"), result["seconds"]))
    from keras_convnext import scenes

    masks = scenes.digit_scenes("test", args.test_scenes, image_size=64, digit_size=(16, 32),
                                max_digits=3)["segmentation_masks"]
    metric = keras.metrics.MeanIoU(num_classes=scenes.NUM_CLASSES)
    metric.update_state(masks.reshape(-1), np.zeros(masks.size, "int32"))
    print(f"\nall-background mIoU of the held-out segmentation scenes: {float(metric.result()):.3f}")
    print(f"\nbackend {keras.backend.backend()}, {args.test_scenes} held-out scenes, ConvNeXt-Atto\n")
    print("| task | init | px | scenes x epochs | held-out score | mAP@[.5:.95] | train s |")
    print("|---|---|---|---|---|---|---|")
    for head, init, size, scenes_n, epochs, score, coco, secs in rows:
        name = "mAP@0.5" if head == "retinanet" else "mIoU"
        print(f"| {head} | {init} | {size} | {scenes_n} x {epochs} | {name} {score:.3f} | "
              f"{'' if coco is None else f'{coco:.3f}'} | {secs:.0f} |")


if __name__ == "__main__":
    main()
