"""Train a ConvNeXt-Atto from scratch on scikit-learn's handwritten digits with the paper's recipe.

The ImageNet-1k recipe (AdamW, warm-up + cosine, RandAugment, Mixup/CutMix, Random Erasing, label
smoothing, EMA) scaled down to 30 epochs at batch 64 and 32 px; the digits are written as PNG class
folders first, so this is exactly what `keras-convnext train` does on your own folder.

    python examples/digits_from_scratch.py [--epochs 30] [--out runs/digits]
"""

import argparse
import tempfile

from keras_convnext.demo import write_digits_folders
from keras_convnext.training import train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="runs/digits")
    args = parser.parse_args(argv)

    train_dir, val_dir = write_digits_folders(tempfile.mkdtemp(prefix="digits-"), image_size=32)
    result = train(train_dir, args.out, variant="atto", recipe="in1k", epochs=args.epochs, batch_size=64,
                   image_size=32, val_dir=val_dir)
    print(f"held-out accuracy {result['accuracy']:.4f} after {result['epochs']} epochs "
          f"({result['seconds']:.0f} s); curves in {result['curves']}")
    return result


if __name__ == "__main__":
    main()
