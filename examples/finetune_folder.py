"""Fine-tune a pretrained ConvNeXt on a folder of your own images.

    photos/
      cat/  1.jpg 2.jpg ...
      dog/  1.jpg ...

    python examples/finetune_folder.py photos --variant tiny --epochs 10 --out runs/pets

The `finetune` recipe: ImageNet weights (or `--weights FILE`), a fresh head scaled by 0.001,
AdamW with layer-wise learning-rate decay 0.8, one warm-up epoch then cosine, random-resized
crops, flips and colour jitter, label smoothing; 10% of each class held out for validation.
The same as `keras-convnext train photos --recipe finetune --variant tiny --out runs/pets`.
"""

import argparse

from keras_convnext.training import train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder with one sub-folder per class")
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--weights", default="imagenet", help="preset name or checkpoint file")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default="runs/finetune")
    args = parser.parse_args(argv)

    result = train(args.data, args.out, variant=args.variant, recipe="finetune", preset=args.weights,
                   epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size, val_split=0.1)
    print(f"held-out accuracy {result['accuracy']:.4f}; model in {result['model']}")
    return result


if __name__ == "__main__":
    main()
