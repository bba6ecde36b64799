"""Input side: keras.applications' `preprocess_input`, pixel normalisation, timm's evaluation transform,
and ImageNet class names."""

import functools
import io
import math
import os
import re
import threading
import warnings

import numpy as np

from keras_convnext import checks
from keras_convnext import presets as presets_lib

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")

# The evaluation transform resizes the shorter side to `scale` and the longer one in proportion: a
# 10 x 100,000 strip (3 kB of PNG) would become 256 x 2,560,000, 7.8 GB as TF's float32. Up to 16:1
# (panoramas included) the resized map is at most 16 x scale^2 pixels and a resampling pass at most
# scale x sqrt(16 x max_image_pixels()) (9.7 M at scale 256): less than the largest square image
# allowed takes to decode.
MAX_ASPECT_RATIO = 16
# One wording for `eval_transform` and its TF graph twin (`data.resize_crop`): tf.strings.format fills {} too.
ELONGATED = ("The image is {}x{} pixels (width x height), more elongated than the {}:1 the evaluation "
             "transform takes: it resizes the shorter side and the longer one in proportion")


DATA_FORMATS = (None, "channels_last", "channels_first")


def preprocess_input(x, data_format=None):
    """The identity, as `keras.applications.convnext.preprocess_input`: returns `x` unchanged.

    ConvNeXt models normalise inside (`include_preprocessing=True`, the default, as keras's
    ConvNeXt models do), so they take raw [0, 255] pixels. Kept so that code written for
    `keras.applications` runs as it is; a model built with `include_preprocessing=False` takes
    `normalize_pixels(x)` instead.

    Args:
        x: a floating or integer NumPy array, or a tensor.
        data_format: None, "channels_last" or "channels_first", checked as keras.applications
            checks it (None: `keras.config.image_data_format()`); either way `x` is returned as it is.
    """
    if data_format not in DATA_FORMATS:
        # keras.applications.imagenet_utils.preprocess_input's check and words.
        raise ValueError("Expected data_format to be one of `channels_first` or "
                         f"`channels_last`. Received: data_format={data_format}")
    return x


def normalize_pixels(x, mean=presets_lib.IMAGENET_MEAN, std=presets_lib.IMAGENET_STD):
    """Normalises raw [0, 255] pixels for a model built with `include_preprocessing=False`.

    Returns `(x / 255 - mean) / std` per channel (channels last): a float32 NumPy array for
    NumPy or list input, a backend tensor for a tensor. `ConvNeXtPreprocessing`, the layer of
    `include_preprocessing=True`, computes the same.
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
        image: a PIL image (any mode), a file path, encoded bytes, or an (H, W, 3) uint8 array.
            Files, bytes and PIL images go through `decode_image_bytes`'s conversion to RGB.

    Raises:
        ValueError: for an image whose longer side is more than `MAX_ASPECT_RATIO` (16) times its
            shorter one, in either mode, before any resampling (files and bytes from their header,
            before decoding): resizing it would take memory out of all proportion to its pixels.
            `data.resize_crop`, the TF graph twin, refuses the same images.
    """
    from PIL import Image

    if isinstance(preset, str):
        preset = presets_lib.get_preset(preset)
    elif preset is not None and not isinstance(preset, presets_lib.Preset):
        raise ValueError(f"`preset` must be a preset name or a `Preset`. Received: preset={preset!r}")
    # None means "the preset's, else the 224 px recipe's"; any other value is checked, 0 included.
    if image_size is None:
        image_size = preset.image_size if preset else 224
    if crop_pct is None:
        crop_pct = preset.crop_pct if preset else 0.875
    if interpolation is None:
        interpolation = preset.interpolation if preset else "bicubic"
    if crop_mode is None:
        crop_mode = preset.crop_mode if preset else "center"
    checks.integer("image_size", image_size, minimum=1)
    checks.number("crop_pct", crop_pct, 0.0, 1.0, low_open=True)
    checks.choice("interpolation", interpolation, _INTERPOLATIONS)
    checks.choice("crop_mode", crop_mode, ("center", "squash"))

    image = _to_pil(image, max_aspect_ratio=MAX_ASPECT_RATIO)
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
    """Reads an image file (`decode_image_bytes`) and applies `eval_transform`; returns uint8 (size, size, 3)."""
    if not os.path.isfile(path):
        raise ValueError(f"No image file at this path. Received: path={path!r}")
    return eval_transform(path, image_size, crop_pct, interpolation, crop_mode, preset)


def _to_pil(image, max_aspect_ratio=None):
    from PIL import Image

    if isinstance(image, Image.Image):
        if max_aspect_ratio is not None:  # before `_rgb_image` loads a lazily opened image
            check_aspect_ratio(*image.size, max_aspect_ratio, f"image with size={image.size}")
        return _rgb_image(image)
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return Image.fromarray(decode_image_bytes(image, max_aspect_ratio=max_aspect_ratio))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            "`image` must be a PIL image, a file path, encoded bytes or an (H, W, 3) uint8 array. "
            f"Received: image with shape={array.shape}, dtype={array.dtype}"
        )
    if max_aspect_ratio is not None:
        check_aspect_ratio(array.shape[1], array.shape[0], max_aspect_ratio, f"image with shape={array.shape}")
    return Image.fromarray(array)


def check_aspect_ratio(width, height, max_ratio, received):
    """Raises a ValueError (`ELONGATED`, ending "Received: " + `received`) for an empty image or one
    whose longer side is more than `max_ratio` times its shorter one: integers, as `data.resize_crop`."""
    if min(width, height) >= 1 and max(width, height) <= max_ratio * min(width, height):
        return
    raise ValueError(ELONGATED.format(width, height, max_ratio) + f". Received: {received}")


class ImageReadError(ValueError):
    """An image file or bytes that cannot be decoded; `path` names it, `reason` says why in a few words."""

    def __init__(self, path, reason):
        self.path, self.reason = path, reason
        if path is None:
            super().__init__(f"Cannot read an image from these bytes ({reason}). Received: image bytes")
        else:
            super().__init__(f"Cannot read an image from this file ({reason}). Received: path={path!r}")


def max_image_pixels():
    """The decompression-bomb bound: PIL's `Image.MAX_IMAGE_PIXELS` (89.5 M by default; None: no bound).

    Read at each call, so that raising PIL's own knob raises it here and in the TF decoder too.
    """
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


# PIL warns of a decompression bomb from inside `Image.open`; the check after it says the same
# with the file's name. Silencing that warning changes the process's warning filters, so one
# thread at a time (an open reads only the header: the lock is held for microseconds).
_OPEN_LOCK = threading.Lock()


def _open(source, path):
    """`Image.open` on a path or bytes, refusing more pixels than `max_image_pixels()` before decoding."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(source, (bytes, bytearray, memoryview)) and not os.path.isfile(source):
        # A FIFO or a device would block or never end: only regular files are read.
        raise ImageReadError(path, "not a regular file")
    limit = max_image_pixels()
    bomb = "a decompression bomb? PIL.Image.MAX_IMAGE_PIXELS sets the bound"
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
    except Image.DecompressionBombError as e:
        # PIL refuses twice its bound outright, before this check; only its message holds the size.
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageReadError(path, f"{pixels}, more than the {limit:,} allowed: {bomb}") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(path, "not an image format PIL knows, or a damaged header") from e
    except Exception as e:  # a damaged header surfaces as any of OSError, SyntaxError, struct.error, ...
        raise ImageReadError(path, checks.reason(e)) from e
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise ImageReadError(path, f"{width}x{height} = {width * height:,} pixels, more than the {limit:,} "
                                   f"allowed: {bomb}")
    return image


def open_image(path):
    """`PIL.Image.open` on a regular file, refusing more pixels than `max_image_pixels()` from the header
    (`ImageReadError`, naming the file); for the callers that need the image's own mode (class masks)."""
    return _open(os.fspath(path), os.fspath(path))


def _rgb_image(image):
    """A PIL image of any mode -> RGB: PIL's `convert("RGB")`, except for 16- and 32-bit grayscale.

    PIL clips I;16 and I to 255 (a 16-bit gray PNG turns white); here they keep their top 8 bits,
    v >> 8, which is what PIL itself does to a 16-bit RGB PNG (it opens as 8-bit RGB). Mode I
    holds 16-bit levels (PIL's mode for 16-bit gray in TIFF and older PNG readers).
    """
    from PIL import Image

    image.load()
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        levels = np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8
        return Image.fromarray(levels.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # The same palette colours; straight to RGB PIL warns about per-entry (bytes) transparency.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def decode_image_bytes(source, path=None, max_aspect_ratio=None):
    """Decodes an image file or its bytes to uint8 (H, W, 3) RGB: the one decoder of `load_image`,
    `eval_transform`, `predict` and the training pipeline.

    Any format PIL reads, every mode giving PIL's `convert("RGB")` pixels: grayscale replicated,
    palettes looked up, alpha and transparency dropped, CMYK converted, an animation's first
    frame. 16-bit images keep their top 8 bits (v >> 8), grayscale ones too (`_rgb_image`).
    EXIF orientation is not applied, as in timm and Keras. `data.decode_image` is the TF graph
    twin the SavedModel's bytes signature uses.

    Args:
        source: a file path, or the encoded bytes.
        path: the name errors give for bytes (default: `source` when it is a path).
        max_aspect_ratio: if given, refuse an image whose longer side is more than this many
            times its shorter one, from the header (`check_aspect_ratio`; `eval_transform` passes
            `MAX_ASPECT_RATIO`).

    Raises:
        ImageReadError (a ValueError) naming the file: damaged or truncated data, an unknown
        format, or more pixels than `max_image_pixels()` (read from the header, before decoding).
        ValueError naming the file: beyond `max_aspect_ratio`, also before decoding.
    """
    if not isinstance(source, (bytes, bytearray, memoryview)):
        source = os.fspath(source)
        path = source if path is None else path
    image = _open(source, path)
    with image:
        if max_aspect_ratio is not None:
            check_aspect_ratio(*image.size, max_aspect_ratio, "image bytes" if path is None else f"path={path!r}")
        try:
            return np.asarray(_rgb_image(image), dtype=np.uint8)
        except Exception as e:  # truncated or damaged pixel data
            raise ImageReadError(path, checks.reason(e)) from e


@functools.cache
def imagenet_classes():
    """The 1000 ImageNet-1k classes in model output order, as (wordnet_id, name) pairs.

    The names are keras.applications' (its `imagenet_class_index.json`): WordNet's first lemma,
    spaces written as underscores ("great_white_shark").
    """
    path = os.path.join(os.path.dirname(__file__), "data", "imagenet_classes.txt")
    with open(path, encoding="utf-8") as f:
        return tuple(tuple(line.rstrip("\n").split("\t")) for line in f)


def decode_predictions(preds, top=5):
    """Turns (N, 1000) ImageNet scores into the `top` best (wordnet_id, name, score) per sample.

    As `keras.applications.convnext.decode_predictions`, with keras's class names (`imagenet_classes`)
    shipped in the package instead of downloaded. `preds` is a NumPy array, a list or a tensor;
    scores come back as Python floats, best first (ties: the lower class index first).
    """
    if isinstance(preds, (np.ndarray, list, tuple)):
        preds = np.asarray(preds)
    else:
        from keras import ops

        preds = ops.convert_to_numpy(preds)
    classes = imagenet_classes()
    if preds.ndim != 2 or preds.shape[1] != len(classes):
        # keras.applications.imagenet_utils.decode_predictions's words.
        raise ValueError("`decode_predictions` expects a batch of predictions (i.e. a 2D array of shape "
                         f"(samples, {len(classes)})). Received array with shape: {preds.shape}")
    checks.integer("top", top, minimum=1, maximum=len(classes))
    results = []
    for row in preds:
        best = np.argsort(-row, kind="stable")[:top]
        results.append([(*classes[i], float(row[i])) for i in best])
    return results
