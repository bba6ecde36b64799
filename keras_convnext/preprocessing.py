"""Input side: pixel normalisation, timm's evaluation transform, and ImageNet class names."""

import functools
import math
import os

import numpy as np

from keras_convnext import presets as presets_lib

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")


def preprocess_input(x, mean=presets_lib.IMAGENET_MEAN, std=presets_lib.IMAGENET_STD):
    """Normalises raw [0, 255] pixels for a model built with `include_preprocessing=False`.

    Returns `(x / 255 - mean) / std` per channel (channels last): a float32 NumPy array for
    NumPy or list input, a backend tensor for a tensor.
    """
    if isinstance(x, (np.ndarray, list, tuple)):
        x = np.asarray(x, dtype="float32")
        return (x / 255.0 - np.asarray(mean, "float32")) / np.asarray(std, "float32")
    from keras import ops

    x = ops.cast(x, "float32")
    return (x / 255.0 - ops.convert_to_tensor(mean, "float32")) / ops.convert_to_tensor(std, "float32")


def eval_transform(image, image_size=None, crop_pct=None, interpolation=None, crop_mode=None,
                   preset=None):
    """timm's evaluation transform on one image; returns a uint8 (size, size, 3) array.

    "center" mode resizes the shorter side to floor(size / crop_pct) and centre-crops `size`;
    "squash" resizes straight to size x size (the official eval at >= 384 px). Constants come from
    `preset` (a name or `Preset`) unless given; the default is the 224 px ImageNet recipe.

    Args:
        image: a PIL image, a file path, or an (H, W, 3) uint8 array.
    """
    from PIL import Image

    if isinstance(preset, str):
        preset = presets_lib.get_preset(preset)
    image_size = image_size or (preset.image_size if preset else 224)
    crop_pct = crop_pct or (preset.crop_pct if preset else 0.875)
    interpolation = interpolation or (preset.interpolation if preset else "bicubic")
    crop_mode = crop_mode or (preset.crop_mode if preset else "center")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"`interpolation` must be one of {_INTERPOLATIONS}. Received: interpolation={interpolation!r}"
        )
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"`crop_mode` must be 'center' or 'squash'. Received: crop_mode={crop_mode!r}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"`crop_pct` must be in (0, 1]. Received: crop_pct={crop_pct}")

    image = _to_pil(image)
    resample = getattr(Image.Resampling, interpolation.upper())
    scale_size = math.floor(image_size / crop_pct)
    if crop_mode == "squash":
        image = image.resize((scale_size, scale_size), resample)
    else:
        # Shorter side to scale_size, the longer one in proportion (torchvision's Resize(int)).
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(scale_size * long / short)
        size = (scale_size, new_long) if w <= h else (new_long, scale_size)
        image = image.resize(size, resample)
    w, h = image.size
    top = int(round((h - image_size) / 2.0))
    left = int(round((w - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype="uint8")


def load_image(path, image_size=None, crop_pct=None, interpolation=None, crop_mode=None, preset=None):
    """Reads an image file and applies `eval_transform`; returns uint8 (size, size, 3)."""
    if not os.path.isfile(path):
        raise ValueError(f"No image file at this path. Received: path={path!r}")
    return eval_transform(path, image_size, crop_pct, interpolation, crop_mode, preset)


def _to_pil(image):
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"Cannot read an image from this file ({e}). Received: path={os.fspath(image)!r}") from e
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            "`image` must be a PIL image, a file path or an (H, W, 3) uint8 array. "
            f"Received: image with shape={array.shape}, dtype={array.dtype}"
        )
    return Image.fromarray(array)


@functools.cache
def imagenet_classes():
    """The 1000 ImageNet-1k classes in model output order, as (wordnet_id, name) pairs."""
    path = os.path.join(os.path.dirname(__file__), "data", "imagenet_classes.txt")
    with open(path, encoding="utf-8") as f:
        return tuple(tuple(line.rstrip("\n").split("\t")) for line in f)


def decode_predictions(preds, top=5):
    """Turns (N, 1000) ImageNet scores into the `top` best (wordnet_id, name, score) per sample.

    As `keras.applications.imagenet_utils.decode_predictions`, with the class names shipped
    in the package instead of downloaded.
    """
    preds = np.asarray(preds)
    classes = imagenet_classes()
    if preds.ndim != 2 or preds.shape[1] != len(classes):
        raise ValueError(
            f"`decode_predictions` expects a batch of {len(classes)} ImageNet scores, shape "
            f"(samples, {len(classes)}). Received: preds with shape={preds.shape}"
        )
    if not 1 <= top <= len(classes):
        raise ValueError(f"`top` must be in [1, {len(classes)}]. Received: top={top}")
    results = []
    for row in preds:
        best = np.argsort(-row, kind="stable")[:top]
        results.append([(*classes[i], float(row[i])) for i in best])
    return results
