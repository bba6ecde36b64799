"""Input pipelines for training: image folders or TFDS, the recipe's augmentation, in tf.data.

tf.data feeds every backend; the augmentations are Keras 3's own preprocessing layers
(`RandAugment`, `RandomColorJitter`, `RandomErasing`, `MixUp`, `CutMix`), which run inside
tf.data whatever the backend. Images stay raw [0, 255] pixels: the model normalises them.
Image files are decoded by `preprocessing.decode_image_bytes`, the decoder `predict` uses, so
training sees the pixels prediction will; `check_images` reads each one before training starts.
"""

import concurrent.futures
import math
import os
import warnings

import keras
import numpy as np

from keras_convnext.preprocessing import (
    ELONGATED,
    MAX_ASPECT_RATIO,
    ImageReadError,
    decode_image_bytes,
    max_image_pixels,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
CACHE_MAX_FILES = 10_000  # small sets keep their encoded bytes in memory after the first epoch
PROGRESS_MIN_FILES = 1000  # checking more images than this shows a progress bar
NAMED_MAX = 3  # unreadable files named in an error; the rest are counted


def image_folder(directory):
    """Lists a folder with one sub-folder of images per class (`image_dataset_from_directory`'s layout).

    Keras's own loader resizes every image on load (the random-resized crop needs the full image)
    and skips empty class folders silently; this one says what is wrong.

    Returns:
        (paths, labels, class_names): class indices follow the sorted folder names.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"`data` must be a folder of class folders or a TFDS name. Received: data={directory!r}")
    try:
        entries = sorted(os.listdir(directory))
    except OSError as e:
        raise ValueError(f"Cannot read the data folder ({e}). Received: data={directory!r}") from e
    class_names = [e for e in entries if os.path.isdir(os.path.join(directory, e))]
    if not class_names:
        raise ValueError(
            "The data folder holds no class folders: put each class's images in a sub-folder named "
            f"after the class (data/cat/1.jpg, data/dog/2.jpg). Received: data={directory!r}"
        )
    if len(class_names) < 2:
        raise ValueError(
            f"A classifier needs at least two class folders; found only {class_names[0]!r}. "
            f"Received: data={directory!r}"
        )
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(directory, name)
        try:
            files = sorted(
                f for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
            )
        except OSError as e:
            raise ValueError(f"Cannot read class folder {name!r} ({e}). Received: data={directory!r}") from e
        if not files:
            raise ValueError(
                f"Class folder {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)}). "
                f"Received: data={directory!r}"
            )
        paths += [os.path.join(folder, f) for f in files]
        labels += [label] * len(files)
    return paths, labels, class_names


def image_files(directory):
    """Every image file under a folder, at any depth, sorted: FCMAE's unlabelled data (folder names are ignored).

    A flat folder of images and a folder of class folders both work; an empty one says so.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"`data` must be a folder of images (at any depth). Received: data={directory!r}")
    paths = []
    for root, folders, names in os.walk(directory, onerror=_raise):
        folders.sort()
        paths += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, n))]
    if not paths:
        raise ValueError(f"The data folder holds no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth. "
                         f"Received: data={directory!r}")
    return paths


def _raise(error):
    raise ValueError(f"Cannot read the data folder ({error}). Received: data={error.filename!r}") from error


def check_images(paths, labels, class_names, skip_bad_images=False, verbose=1, data=None):
    """Decodes every image once (threads), so that an unreadable file stops nothing mid-epoch.

    Raises a ValueError naming the unreadable files (the first few, and a count) unless
    `skip_bad_images`, which drops them with a warning naming them instead. Shows a
    `keras.utils.Progbar` (`verbose` 1 or 2) for more than `PROGRESS_MIN_FILES` files.

    Returns:
        (paths, labels, skipped): the readable files, and [(path, reason)] of those dropped.
    """
    paths, labels = list(paths), list(labels)
    progress = None
    if verbose and len(paths) > PROGRESS_MIN_FILES:
        print(f"Reading {len(paths)} images once, to find any that cannot be read", flush=True)
        progress = keras.utils.Progbar(len(paths), verbose=verbose, unit_name="image")
    reasons = []
    # PIL decodes outside the GIL: threads decode in parallel.
    with concurrent.futures.ThreadPoolExecutor() as pool:
        for i, reason in enumerate(pool.map(_unreadable, paths), 1):
            reasons.append(reason)
            if progress is not None and (i % 64 == 0 or i == len(paths)):
                progress.update(i)
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if not bad:
        return paths, labels, []
    if not skip_bad_images:
        raise ValueError(
            f"{len(bad)} of {len(paths)} images cannot be read: {_name_files(bad, NAMED_MAX)}. Remove them, or "
            f"pass skip_bad_images=True (--skip-bad-images) to train without them. Received: data={data!r}"
        )
    warnings.warn(f"Skipping {len(bad)} of {len(paths)} images, which cannot be read: {_name_files(bad, 20)}.",
                  stacklevel=2)
    keep = [i for i, r in enumerate(reasons) if r is None]
    paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    for label, name in enumerate(class_names):
        if label not in labels:
            raise ValueError(f"Class folder {name!r} has no readable images. Received: data={data!r}")
    return paths, labels, bad


def _unreadable(path):
    """Why `path` cannot be decoded, or None when it can.

    An image more elongated than the evaluation transform takes counts too: in a validation set (or a
    folder split into one) it would stop training at the first evaluation.
    """
    try:
        decode_image_bytes(path, max_aspect_ratio=MAX_ASPECT_RATIO)
    except ImageReadError as e:
        return e.reason
    except ValueError as e:  # too elongated: the message up to its "Received:" is the reason
        return str(e).split(". Received:")[0]
    return None


def _name_files(bad, limit):
    named = ", ".join(f"{p!r} ({r})" for p, r in bad[:limit])
    return named + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def split_files(paths, labels, fraction, seed=0):
    """Stratified split: `fraction` of each class goes to validation (at least one image)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`val_split` must be in (0, 1). Received: val_split={fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, val = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = max(1, int(round(fraction * len(idx))))
        if n_val >= len(idx):
            raise ValueError(
                f"Class {int(label)} has {len(idx)} image(s): too few to hold some out for validation. "
                f"Received: val_split={fraction}"
            )
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    pick = lambda idx: ([paths[i] for i in sorted(idx)], [int(labels[i]) for i in sorted(idx)])  # noqa: E731
    return pick(train), pick(val)


def tfds_source(name, split, data_dir=None):
    """A TFDS image-classification split as (dataset of (image, label), class names, size)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
        raise ValueError(f"`data` is neither a folder nor a TFDS dataset ({e}). Received: data={name!r}") from e
    info = builder.info
    if "image" not in info.features or "label" not in info.features:
        raise ValueError(
            f"TFDS dataset {name!r} is not image classification (features {list(info.features)}). "
            f"Received: data={name!r}"
        )
    ds = tfds.load(name, split=split, as_supervised=True, data_dir=data_dir, shuffle_files=True)
    size = int(ds.cardinality().numpy())
    return ds, list(info.features["label"].names), size


def tfds_splits(name, val_split=None):
    """(train split, validation split) names for a TFDS dataset: its own validation/test split,
    or the last `val_split` of train."""
    import tensorflow_datasets as tfds

    splits = tfds.builder(name).info.splits
    if val_split:
        keep = 100 - int(round(100 * val_split))
        return f"train[:{keep}%]", f"train[{keep}%:]"
    for candidate in ("validation", "test"):
        if candidate in splits:
            return "train", candidate
    return "train[:90%]", "train[90%:]"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_image(data, max_pixels=None):
    """Encoded bytes -> uint8 (H, W, 3), as TensorFlow graph ops: the SavedModel bytes signature's decoder.

    Pure graph ops, so that it serialises; training and `predict` decode with PIL
    (`preprocessing.decode_image_bytes`), and this gives exactly the same pixels on what it takes:
      * PNG, 1 to 16 bits: gray, gray + alpha, RGB, RGBA, palette (with or without transparency),
        an animated PNG's default image; 16-bit levels keep their top 8 bits (v >> 8);
      * JPEG, RGB and grayscale (the accurate integer IDCT, as PIL); CMYK JPEG is taken, but TF
        rounds its CMYK -> RGB down where PIL rounds to nearest: within one level;
      * GIF, the first frame, transparent pixels as their palette colour (PIL's convert);
      * BMP, uncompressed 8-bit palette, 24- and 32-bit.
    Anything else (TIFF, WebP, 1- and 4-bit or RLE BMP) fails with an InvalidArgumentError, as
    does a header declaring more pixels than `max_pixels` (default: `max_image_pixels()` when
    traced), before any pixel is decoded.
    """
    import tensorflow as tf

    limit = max_image_pixels() if max_pixels is None else max_pixels
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 0, 64), tf.uint8), tf.int64)
    head = tf.pad(head, [[0, 64 - tf.size(head)]])  # short (damaged) data reads as zeros

    def le(offset, size):  # little-endian unsigned integer in the header
        return sum(head[offset + i] * 256 ** i for i in range(size))

    def be(offset, size):
        return sum(head[offset + i] * 256 ** (size - 1 - i) for i in range(size))

    def bounded(pixels, decode):
        if limit is None:
            return decode

        def checked():
            check = tf.debugging.assert_less_equal(
                pixels, tf.constant(limit, tf.int64),
                message=f"The image declares more than {limit} pixels (a decompression bomb?); not decoded")
            with tf.control_dependencies([check]):
                return tf.identity(decode())
        return checked

    def png():
        # dtype=uint16 decodes 16-bit PNGs at full depth (8-bit ones come scaled by 257): >> 8 is PIL's 8 bits.
        image = tf.io.decode_png(data, channels=3, dtype=tf.uint16)
        return tf.cast(tf.bitwise.right_shift(image, 8), tf.uint8)

    def jpeg():
        return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

    def gif():
        return tf.io.decode_image(_gif_without_transparency(data), channels=3, expand_animations=False)

    def bmp():
        return _decode_bmp(data, le)

    def unknown():
        check = tf.debugging.Assert(False, ["Not a JPEG, PNG, GIF or BMP image: the bytes signature decodes "
                                            "only these (TIFF, WebP and others go through predict)"])
        with tf.control_dependencies([check]):
            return tf.zeros([0, 0, 3], tf.uint8)

    def jpeg_pixels():
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    is_jpeg = tf.io.is_jpeg(data)
    image = tf.case([
        (is_jpeg, bounded(tf.cond(is_jpeg, jpeg_pixels, lambda: tf.constant(0, tf.int64)), jpeg)),
        (tf.equal(tf.strings.substr(data, 0, 8), _PNG_SIGNATURE), bounded(be(16, 4) * be(20, 4), png)),
        (tf.equal(tf.strings.substr(data, 0, 3), b"GIF"), bounded(le(6, 2) * le(8, 2), gif)),
        # BMP heights are signed (negative: rows stored top-down).
        (tf.equal(tf.strings.substr(data, 0, 2), b"BM"),
         bounded(le(18, 4) * tf.abs(le(22, 4) - tf.where(le(22, 4) >= 2 ** 31, 2 ** 32, 0)), bmp)),
    ], default=unknown, exclusive=False)
    image.set_shape([None, None, 3])
    return image


def _gif_without_transparency(data):
    """GIF bytes with the first frame's transparency flag cleared.

    TensorFlow paints a first frame's transparent pixels black; PIL's convert("RGB") shows their
    palette colour. The flag sits in the Graphic Control Extension before the first image, found
    by walking the blocks that follow the header and global palette.
    """
    import tensorflow as tf

    b = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    n = tf.size(b)

    def at(i):
        return tf.where(i < n, tf.gather(b, tf.clip_by_value(i, 0, n - 1)), 0)

    packed = at(10)
    start = 13 + tf.where(packed >= 128, 3 * tf.bitwise.left_shift(2, packed % 8), 0)  # after the global palette

    def extension(pos, flag):
        flag = tf.where(tf.equal(at(pos + 1), 0xF9), pos + 3, flag)  # 0x21 0xF9 size <packed>: bit 0 is the flag
        # Over the data sub-blocks, <size> <bytes>, to the 0 that ends them.
        (end,) = tf.while_loop(lambda p: (p < n) & tf.not_equal(at(p), 0), lambda p: (p + at(p) + 1,), (pos + 2,))
        return end + 1, flag

    _, flag = tf.while_loop(lambda pos, flag: (pos < n) & tf.equal(at(pos), 0x21), extension,
                            [start, tf.constant(-1)])

    def cleared():
        byte = tf.gather(tf.constant([bytes([i]) for i in range(256)]), tf.bitwise.bitwise_and(at(flag), 0xFE))
        return tf.strings.join([tf.strings.substr(data, 0, flag), byte, tf.strings.substr(data, flag + 1, -1)])

    return tf.cond(flag >= 0, cleared, lambda: data)


def _decode_bmp(data, le):
    """Uncompressed BMP -> RGB; 8-bit ones through their palette (TensorFlow returns the indices)."""
    import tensorflow as tf

    # BI_RGB, or BI_BITFIELDS (32-bit BMPs in the usual BGRA layout); TensorFlow cannot undo RLE.
    compression = le(30, 4)
    check = tf.debugging.Assert(tf.equal(compression, 0) | tf.equal(compression, 3),
                                ["A compressed (RLE) BMP: the bytes signature decodes uncompressed ones"])
    with tf.control_dependencies([check]):
        image = tf.io.decode_bmp(data, channels=0)  # (H, W, 1 | 3 | 4)

    def paletted():
        # The palette follows the 14-byte file header and the DIB header: BGRX entries.
        count = tf.where((le(46, 4) > 0) & (le(46, 4) <= 256), le(46, 4), 256)
        entries = tf.io.decode_raw(tf.strings.substr(data, 14 + le(14, 4), 4 * count), tf.uint8)
        entries = tf.reshape(tf.pad(entries, [[0, 1024 - tf.size(entries)]]), [256, 4])
        return tf.gather(tf.reverse(entries[:, :3], axis=[1]), tf.cast(image[..., 0], tf.int32))

    return tf.cond(tf.equal(le(28, 2), 8), paletted, lambda: image[..., :3])


def _decode_file(data, path, max_aspect_ratio=None):
    """`decode_image_bytes` inside tf.data, errors naming `path`."""
    import tensorflow as tf

    def decode(data, path):
        path = path.decode("utf-8", "replace")
        return decode_image_bytes(data, path=path, max_aspect_ratio=max_aspect_ratio)

    image = tf.numpy_function(decode, [data, path], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [None, None, 3])


def _rgb(image):
    import tensorflow as tf

    if image.shape[-1] == 1:  # grayscale TFDS sets (MNIST) -> RGB
        image = tf.image.grayscale_to_rgb(image)
    return tf.cast(image, tf.uint8)


def _elements(source, shuffle, seed, max_aspect_ratio=None):
    """source -> dataset of (uint8 (H, W, 3) image, int label), shuffled per epoch when asked.

    Files beyond `max_aspect_ratio` are refused from their header, naming the file.
    """
    import tensorflow as tf

    if isinstance(source, tf.data.Dataset):
        ds = source
        if shuffle:
            ds = ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
        return ds.map(lambda image, label: (_rgb(image), tf.cast(label, tf.int32)),
                      num_parallel_calls=tf.data.AUTOTUNE)
    paths, labels = source
    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, "int32")))
    ds = ds.map(lambda p, y: (tf.io.read_file(p), p, y), num_parallel_calls=tf.data.AUTOTUNE)
    if len(paths) <= CACHE_MAX_FILES:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return ds.map(lambda data, p, y: (_decode_file(data, p, max_aspect_ratio), y),
                  num_parallel_calls=tf.data.AUTOTUNE)


def random_resized_crop(image, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic"):
    """Inception-style crop: a random box of `scale` of the area and `ratio` aspect, resized to size.

    Keras 3 has no random-resized-crop layer; TensorFlow's box sampler does the sampling (whole
    image when no box fits in 10 tries), then one resize, clipped to [0, 255]. Any shape is taken:
    the resize's memory stays within size x the crop's shorter side.
    """
    import tensorflow as tf

    begin, box, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.cast(tf.slice(image, begin, box), tf.float32)

    def resize(x):
        return tf.image.resize(x, (size, size), method=interpolation, antialias=True)

    def resize_transposed():  # (H, W, 3) -> (W, H, 3), resized, and back
        return tf.transpose(resize(tf.transpose(crop, [1, 0, 2])), [1, 0, 2])

    # TF resamples the rows first, into a (size, crop width) intermediate: a wide crop (a whole
    # 1 x 80 M strip when no box fits: 215 GB) goes through transposed, into (size, crop height).
    crop = tf.cond(box[1] > box[0], resize_transposed, lambda: resize(crop))
    return tf.clip_by_value(crop, 0.0, 255.0)


def resize_crop(image, image_size, crop_pct=0.875, squash=False):
    """The evaluation transform on a decoded image, as graph ops (`preprocessing.eval_transform`).

    Resizes the shorter side to floor(size / crop_pct) with antialiased bicubic (PIL's filter),
    rounding to 8-bit levels after each pass as PIL does, and centre-crops; returns float32.
    Refuses, as `eval_transform` does and before any resampling, an image whose longer side is
    more than `MAX_ASPECT_RATIO` times its shorter one: an InvalidArgumentError saying so (in the
    bytes signature, an error for that request).
    """
    import tensorflow as tf

    scale = math.floor(image_size / crop_pct)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    fits = (short >= 1) & (tf.cast(long, tf.int64) <= MAX_ASPECT_RATIO * tf.cast(short, tf.int64))
    check = tf.debugging.Assert(fits, [tf.strings.format(ELONGATED, (w, h, MAX_ASPECT_RATIO))])
    with tf.control_dependencies([check]):
        image = tf.identity(image)
    if squash:
        new_h = new_w = tf.constant(scale)
    else:
        new_long = tf.cast(tf.math.floor(scale * tf.cast(long, tf.float64) / tf.cast(short, tf.float64)), tf.int32)
        new_h = tf.where(w <= h, new_long, scale)
        new_w = tf.where(w <= h, scale, new_long)
    # PIL resamples 8-bit images in two passes, horizontal then vertical, rounding to 8 bits after each.
    resized = tf.cast(image, tf.float32)
    resized = tf.image.resize(resized, tf.stack([h, new_w]), method="bicubic", antialias=True)
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    resized = tf.image.resize(resized, tf.stack([new_h, new_w]), method="bicubic", antialias=True)
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    # Python's round() (half to even) as in the eager transform; tf.round rounds half to even too.
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
    return tf.ensure_shape(resized[top:top + image_size, left:left + image_size, :], [image_size, image_size, 3])


def _rescale(values, source, target):
    """Values in the `source` range -> the same positions in the `target` range (linear)."""
    scale = (target[1] - target[0]) / (source[1] - source[0])
    return values * scale + (target[0] - source[0] * scale)


@keras.saving.register_keras_serializable(package="keras_convnext")
class PerImageEqualization(keras.layers.Equalization):
    """Histogram equalization with one histogram per image and channel, by PIL's rule.

    Written here because Keras's `Equalization` pools each channel's histogram over the whole
    batch (PIL's `ImageOps.equalize`, which timm's RandAugment applies, is per image), and on
    the JAX backend it builds the histogram as a 256-step Python loop even inside tf.data:
    36 s of graph tracing per pipeline and a slower iterator every epoch. Here the histograms
    are one segment sum over (image, channel, level) ids, which every backend runs as-is.
    """

    def transform_images(self, images, transformation=None, training=True):
        if not training:
            return images
        b = self.backend
        x = b.cast(images, "float32")
        scaled = tuple(self.value_range) != (0, 255)
        if scaled:
            x = _rescale(x, self.value_range, (0, 255))
        shape = b.core.shape(x)
        n, h, w, c = shape[0], shape[1], shape[2], shape[3]
        rows = n * c
        levels = b.numpy.clip(b.cast(x, "int32"), 0, 255)
        levels = b.numpy.reshape(b.numpy.transpose(levels, (0, 3, 1, 2)), (rows, h * w))
        ids = b.numpy.reshape(levels + b.numpy.expand_dims(b.numpy.arange(rows, dtype="int32") * 256, 1), (-1,))
        hist = b.math.segment_sum(b.numpy.ones_like(ids), ids, num_segments=rows * 256)
        hist = b.numpy.reshape(hist, (rows, 256))
        # PIL: step = (pixels - count of the highest occupied level) // 255; no step, no change;
        # else lut[i] = (step // 2 + pixels below level i) // step.
        occupied = b.cast(hist > 0, "int32")
        top = 255 - b.numpy.argmax(b.numpy.flip(occupied, axis=1), axis=1)
        top_count = b.numpy.squeeze(b.numpy.take_along_axis(hist, b.numpy.expand_dims(top, 1), axis=1), 1)
        step = (b.numpy.sum(hist, axis=1) - top_count) // 255
        below = b.numpy.cumsum(hist, axis=1) - hist
        safe = b.numpy.expand_dims(b.numpy.maximum(step, 1), 1)
        lut = b.numpy.minimum((b.numpy.expand_dims(step // 2, 1) + below) // safe, 255)
        identity = b.numpy.expand_dims(b.numpy.arange(256, dtype=lut.dtype), 0)
        lut = b.numpy.where(b.numpy.expand_dims(step, 1) > 0, lut, identity)
        out = b.numpy.take_along_axis(lut, levels, axis=1)
        out = b.numpy.transpose(b.numpy.reshape(out, (n, c, h, w)), (0, 2, 3, 1))
        out = b.cast(out, "float32")
        if scaled:
            out = _rescale(out, (0, 255), self.value_range)
        return b.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_convnext")
class PerImageRandAugment(keras.layers.RandAugment):
    """RandAugment (Keras's, per image) with its operations at timm's strengths for `magnitude` of 10.

    Keras scales every operation by one `factor` (0.9 would rotate by up to 324 degrees); timm's
    m9 rotates by up to 27 degrees, shears 0.27, translates 45% of the side. The geometric and
    brightness operations are rebuilt at those strengths; the others keep Keras's factor
    semantics at 0.9 * m / 10. Keras draws each strength uniformly up to the magnitude, which
    plays the part of timm's magnitude noise (mstd). Equalization is `PerImageEqualization`.

    Keras computes every operation on the whole batch and keeps the chosen ones, drawing one
    choice per call: a batch would share its operations. Drawing the choice per image costs
    nothing more and restores the paper's per-image policy. (Running each operation only on
    the images that chose it measured 3.5x slower in tf.data: the gathers and conditionals
    cost more than the small images.)

    Args:
        magnitude: timm's magnitude, 0 to 10 (9 in the paper's rand-m9-mstd0.5).
        num_ops: operations applied to each image, one after the other.
        seed: seeds every random draw.
    """

    def __init__(self, magnitude=9, num_ops=2, seed=None, **kwargs):
        m = magnitude / 10.0
        super().__init__(value_range=(0, 255), num_ops=num_ops, factor=min(0.9 * m, 1.0),
                         interpolation="bilinear", seed=seed, **kwargs)
        self.magnitude = magnitude
        grey = dict(fill_mode="constant", fill_value=128.0, seed=seed)
        self.random_rotation = keras.layers.RandomRotation(30.0 * m / 360.0, **grey)
        self.random_shear = keras.layers.RandomShear(x_factor=0.3 * m, y_factor=0.3 * m, **grey)
        self.random_translation = keras.layers.RandomTranslation(0.45 * m, 0.45 * m, **grey)
        self.random_brightness = keras.layers.RandomBrightness(0.45 * m, value_range=(0, 255), seed=seed)
        self.equalization = PerImageEqualization(value_range=(0, 255))
        # The per-image choices need draws of their own, seeded and valid inside tf.data on any
        # backend: RandomBrightness on black 1x1 images in [0, 1] returns one uniform [0, 1) per image.
        self.chooser = keras.layers.RandomBrightness((0.0, 1.0), value_range=(0.0, 1.0),
                                                     seed=None if seed is None else seed + 1)

    def get_random_transformation(self, data, training=True, seed=None):
        transformation = super().get_random_transformation(data, training, seed)
        images = data["images"] if isinstance(data, dict) else data
        if transformation is None or len(images.shape) != 4:
            return transformation
        b = self.backend
        batch = b.shape(images)[0]
        count = len(transformation["transforms"])  # the operations, in the order transform_images takes them
        uniform = self.chooser(b.numpy.zeros((self.num_ops * batch, 1, 1, 1)), training=True)
        chosen = b.numpy.minimum(b.cast(b.numpy.floor(uniform * count), "int32"), count - 1)
        transformation["layer_idxes"] = b.numpy.reshape(chosen, (self.num_ops, batch))
        return transformation

    def transform_images(self, images, transformation, training=True):
        if not training or len(images.shape) != 4:
            return super().transform_images(images, transformation, training)
        images = self.backend.cast(images, self.compute_dtype)
        for i in range(self.num_ops):
            chosen = transformation["layer_idxes"][i][:, None, None, None]
            for idx, (key, value) in enumerate(transformation["transforms"].items()):
                out = getattr(self, key).transform_images(images, value)
                images = self.backend.numpy.where(chosen == idx, out, images)
        return self.backend.cast(images, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        for fixed in ("value_range", "factor", "interpolation"):  # set from the magnitude
            config.pop(fixed, None)
        return {**config, "magnitude": self.magnitude}


def rand_augment(magnitude=9, num_ops=2, seed=None):
    """`PerImageRandAugment`: RandAugment per image, at timm's strengths for `magnitude` of 10."""
    return PerImageRandAugment(magnitude, num_ops=num_ops, seed=seed)


def train_dataset(source, recipe, num_classes, image_size=None, batch_size=None, seed=0,
                  drop_remainder=True):
    """The recipe's training pipeline: batches of (float32 [0, 255] images, one-hot labels).

    Per image: random-resized crop (bicubic), horizontal flip, RandAugment (or colour jitter when
    RandAugment is off), Random Erasing (batched, each image with its own draws); per batch:
    Mixup or CutMix, switching at random.

    Args:
        source: (paths, labels) from `image_folder`, or a tf.data dataset of (image, label).
    """
    import tensorflow as tf

    size = image_size or recipe.image_size
    batch_size = batch_size or recipe.batch_size
    augment = rand_augment(recipe.rand_augment[0], seed=seed) if recipe.rand_augment else None
    jitter = None
    if augment is None and recipe.color_jitter:
        cj = recipe.color_jitter
        # Keras's brightness is additive (a fraction of 255): half of timm's multiplicative factor.
        jitter = keras.layers.RandomColorJitter(
            value_range=(0, 255), brightness_factor=cj / 2, contrast_factor=cj,
            saturation_factor=(0.5 - cj / 2, 0.5 + cj / 2), seed=seed)
    erase = None
    if recipe.random_erasing:
        # A fixed probability: a single float would draw it uniformly below the value.
        erase = keras.layers.RandomErasing(factor=(recipe.random_erasing, recipe.random_erasing),
                                           scale=(0.02, 1 / 3), value_range=(0, 255), seed=seed)

    def per_image(image, label):
        image = random_resized_crop(image, size, recipe.scale, recipe.ratio, recipe.interpolation)
        return tf.ensure_shape(image, [size, size, 3]), tf.one_hot(label, num_classes)

    # Per batch, each image drawing its own parameters: the same ops per image cost ~20x more in
    # tf.data (small images are dominated by per-op overhead).
    def per_batch(images, labels):
        if recipe.hflip:
            flip = tf.random.uniform(tf.shape(images)[:1]) < recipe.hflip
            images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
        for layer in (augment, jitter, erase):
            if layer is not None:
                images = tf.cast(layer(images), tf.float32)
        return tf.clip_by_value(images, 0.0, 255.0), labels

    ds = _elements(source, shuffle=True, seed=seed)
    ds = ds.map(per_image, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(per_batch, num_parallel_calls=tf.data.AUTOTUNE)
    mix = batch_mixer(recipe, seed=seed)
    if mix is not None:
        def mixed(images, labels):
            images, labels = mix(images, labels)
            return tf.clip_by_value(images, 0.0, 255.0), labels  # a blend of two 255s can round to 255.00002

        ds = ds.map(mixed, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def pretrain_dataset(paths, recipe, image_size=None, batch_size=None, seed=0, drop_remainder=True):
    """FCMAE's pipeline: batches of float32 [0, 255] images, no labels (the recipe's crop and flip).

    `train_dataset` with the labels dropped: the official pre-training augments with a random-resized
    crop (scale (0.2, 1.0), bicubic) and a horizontal flip only, which the `fcmae` recipe sets.
    """
    ds = train_dataset((list(paths), [0] * len(paths)), recipe, 1, image_size=image_size, batch_size=batch_size,
                       seed=seed, drop_remainder=drop_remainder)
    return ds.map(lambda images, labels: images)


def batch_mixer(recipe, seed=None):
    """(images, one-hot labels) -> the same, mixed by Mixup or CutMix; None when both are off."""
    import tensorflow as tf

    mixup = keras.layers.MixUp(alpha=recipe.mixup, seed=seed) if recipe.mixup else None
    # Keras's CutMix draws its Beta parameter up to `factor` (at most 1): timm's alpha 1.0 -> 1.0.
    cutmix = keras.layers.CutMix(factor=min(recipe.cutmix, 1.0), seed=seed) if recipe.cutmix else None
    if mixup is None and cutmix is None:
        return None

    def apply(layer, images, labels):
        out = layer({"images": images, "labels": labels})
        return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)

    def mix(images, labels):
        if mixup is None:
            return apply(cutmix, images, labels)
        if cutmix is None:
            return apply(mixup, images, labels)
        use_cutmix = tf.random.uniform([]) < recipe.mixup_switch_prob
        return tf.cond(use_cutmix, lambda: apply(cutmix, images, labels), lambda: apply(mixup, images, labels))

    return mix


def eval_dataset(source, num_classes, image_size=224, crop_pct=0.875, batch_size=32, drop_remainder=False):
    """The evaluation pipeline: the eval transform, batches of (float32 images, one-hot labels).

    An image beyond `MAX_ASPECT_RATIO` stops it with an error, naming the file for file sources.
    """
    import tensorflow as tf

    squash = crop_pct >= 1.0 and image_size >= 384

    def per_image(image, label):
        return resize_crop(image, image_size, crop_pct, squash), tf.one_hot(label, num_classes)

    ds = _elements(source, shuffle=False, seed=None, max_aspect_ratio=MAX_ASPECT_RATIO)
    ds = ds.map(per_image, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
