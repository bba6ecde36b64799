"""Input pipelines for training: image folders or TFDS, the recipe's augmentation, in tf.data.

tf.data feeds every backend; the augmentations are Keras 3's own preprocessing layers
(`RandAugment`, `RandomColorJitter`, `RandomErasing`, `MixUp`, `CutMix`), which run inside
tf.data whatever the backend. Images stay raw [0, 255] pixels: the model normalises them.
"""

import math
import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
CACHE_MAX_FILES = 10_000  # small sets keep their encoded bytes in memory after the first epoch


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


def decode_image(data):
    """JPEG/PNG/BMP/GIF bytes -> uint8 (H, W, 3), decoding JPEG as PIL does (the accurate IDCT)."""
    import tensorflow as tf

    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def _rgb(image):
    import tensorflow as tf

    if image.shape[-1] == 1:  # grayscale TFDS sets (MNIST) -> RGB
        image = tf.image.grayscale_to_rgb(image)
    return tf.cast(image, tf.uint8)


def _elements(source, shuffle, seed):
    """source -> dataset of (uint8 (H, W, 3) image, int label), shuffled per epoch when asked."""
    import tensorflow as tf

    if isinstance(source, tf.data.Dataset):
        ds = source
        if shuffle:
            ds = ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
        return ds.map(lambda image, label: (_rgb(image), tf.cast(label, tf.int32)),
                      num_parallel_calls=tf.data.AUTOTUNE)
    paths, labels = source
    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, "int32")))
    ds = ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=tf.data.AUTOTUNE)
    if len(paths) <= CACHE_MAX_FILES:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return ds.map(lambda data, y: (decode_image(data), y), num_parallel_calls=tf.data.AUTOTUNE)


def random_resized_crop(image, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic"):
    """Inception-style crop: a random box of `scale` of the area and `ratio` aspect, resized to size.

    Keras 3 has no random-resized-crop layer; TensorFlow's box sampler does the sampling (whole
    image when no box fits in 10 tries), then one resize, clipped to [0, 255].
    """
    import tensorflow as tf

    begin, box, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, box)
    crop = tf.image.resize(tf.cast(crop, tf.float32), (size, size), method=interpolation, antialias=True)
    return tf.clip_by_value(crop, 0.0, 255.0)


def resize_crop(image, image_size, crop_pct=0.875, squash=False):
    """The evaluation transform on a decoded image, as graph ops (`preprocessing.eval_transform`).

    Resizes the shorter side to floor(size / crop_pct) with antialiased bicubic (PIL's filter),
    rounding to 8-bit levels after each pass as PIL does, and centre-crops; returns float32.
    """
    import tensorflow as tf

    scale = math.floor(image_size / crop_pct)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    if squash:
        new_h = new_w = tf.constant(scale)
    else:
        short, long = tf.minimum(h, w), tf.maximum(h, w)
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


def _per_image_equalization():
    import keras

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
                x = self._scale_values(x, self.value_range, (0, 255))
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
                out = self._scale_values(out, (0, 255), self.value_range)
            return b.cast(out, self.compute_dtype)

    return PerImageEqualization


def _per_image_rand_augment():
    import keras

    class PerImageRandAugment(keras.layers.RandAugment):
        """Keras's `RandAugment`, choosing the operations per image rather than per batch.

        Keras computes every operation on the whole batch and keeps the chosen ones, drawing one
        choice per call: a batch would share its operations. Drawing the choice per image costs
        nothing more and restores the paper's per-image policy. (Running each operation only on
        the images that chose it measured 3.5x slower in tf.data: the gathers and conditionals
        cost more than the small images.)
        """

        def get_random_transformation(self, data, training=True, seed=None):
            transformation = super().get_random_transformation(data, training, seed)
            images = data["images"] if isinstance(data, dict) else data
            if transformation is None or len(images.shape) != 4:
                return transformation
            batch = self.backend.shape(images)[0]
            transformation["layer_idxes"] = self.backend.random.randint(
                (self.num_ops, batch), 0, len(self._AUGMENT_LAYERS),
                seed=self._get_seed_generator(self.backend._backend),
            )
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

    return PerImageRandAugment


def rand_augment(magnitude=9, num_ops=2, seed=None):
    """RandAugment (Keras's, per image) with its operations at timm's strengths for `magnitude` of 10.

    Keras scales every operation by one `factor` (0.9 would rotate by up to 324 degrees); timm's
    m9 rotates by up to 27 degrees, shears 0.27, translates 45% of the side. The geometric and
    brightness operations are rebuilt at those strengths; the others keep Keras's factor
    semantics at 0.9 * m / 10. Keras draws each strength uniformly up to the magnitude, which
    plays the part of timm's magnitude noise (mstd).
    """
    import keras

    m = magnitude / 10.0
    layer = _per_image_rand_augment()(value_range=(0, 255), num_ops=num_ops, factor=min(0.9 * m, 1.0),
                                      interpolation="bilinear", seed=seed)
    layer.random_rotation = keras.layers.RandomRotation(30.0 * m / 360.0, fill_mode="constant",
                                                        fill_value=128.0, seed=seed)
    layer.random_shear = keras.layers.RandomShear(x_factor=0.3 * m, y_factor=0.3 * m, fill_mode="constant",
                                                  fill_value=128.0, seed=seed)
    layer.random_translation = keras.layers.RandomTranslation(0.45 * m, 0.45 * m, fill_mode="constant",
                                                              fill_value=128.0, seed=seed)
    layer.random_brightness = keras.layers.RandomBrightness(0.45 * m, value_range=(0, 255), seed=seed)
    layer.equalization = _per_image_equalization()(value_range=(0, 255))
    return layer


def train_dataset(source, recipe, num_classes, image_size=None, batch_size=None, seed=0,
                  drop_remainder=True):
    """The recipe's training pipeline: batches of (float32 [0, 255] images, one-hot labels).

    Per image: random-resized crop (bicubic), horizontal flip, RandAugment (or colour jitter when
    RandAugment is off), Random Erasing (batched, each image with its own draws); per batch:
    Mixup or CutMix, switching at random.

    Args:
        source: (paths, labels) from `image_folder`, or a tf.data dataset of (image, label).
    """
    import keras
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


def batch_mixer(recipe, seed=None):
    """(images, one-hot labels) -> the same, mixed by Mixup or CutMix; None when both are off."""
    import keras
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
    """The evaluation pipeline: the eval transform, batches of (float32 images, one-hot labels)."""
    import tensorflow as tf

    squash = crop_pct >= 1.0 and image_size >= 384

    def per_image(image, label):
        return resize_crop(image, image_size, crop_pct, squash), tf.one_hot(label, num_classes)

    ds = _elements(source, shuffle=False, seed=None)
    ds = ds.map(per_image, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
