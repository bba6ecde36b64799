"""The demo job: a ConvNeXt-Atto trained from scratch on scikit-learn's handwritten digits.

Real data shipped inside scikit-learn (1,797 8x8 images), upscaled to 32x32 RGB in [0, 255].
"""

import time

import numpy as np


def digits_dataset(image_size=32, test_fraction=0.2, seed=0):
    """Returns ((x_train, y_train), (x_test, y_test)): uint8 (N, size, size, 3) images, int labels.

    The split is stratified and fixed by `seed`; images are upscaled bicubically.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 grey levels -> 0..255, bicubic upscale, grey -> RGB.
    small = (digits.images * (255.0 / 16.0)).round().astype("uint8")
    big = np.stack([
        np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BICUBIC))
        for im in small
    ])
    images = np.repeat(big[..., None], 3, axis=-1)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return (x_train, y_train), (x_test, y_test)


def run_demo(epochs=15, batch_size=32, learning_rate=2e-3, seed=0, verbose=1):
    """Trains ConvNeXt-Atto on the digits and returns a dict with the held-out accuracy."""
    import keras

    from keras_convnext import ConvNeXtAtto

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = digits_dataset()
    model = ConvNeXtAtto(weights=None, input_shape=(32, 32, 3), classes=10, drop_path_rate=0.05)
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - steps // 10, alpha=1e-3, warmup_target=learning_rate, warmup_steps=steps // 10
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=verbose,
              validation_data=(x_test, y_test))
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return {"accuracy": float(accuracy), "seconds": seconds, "train": len(x_train),
            "test": len(x_test), "backend": keras.backend.backend()}


def write_digits_folders(root, image_size=32, test_fraction=0.2, seed=0):
    """Writes the digits as PNG files in class folders: `root/train/<0..9>/` and `root/val/<0..9>/`.

    The layout `keras-convnext train` and `image_dataset_from_directory` read. Returns (train, val) dirs.
    """
    import os

    from PIL import Image

    (x_train, y_train), (x_test, y_test) = digits_dataset(image_size, test_fraction, seed)
    dirs = []
    for split, images, labels in (("train", x_train, y_train), ("val", x_test, y_test)):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))
        dirs.append(os.path.join(root, split))
    return tuple(dirs)
