"""Input pipelines for dense tasks from TFDS: COCO detection and ADE20K (scene_parse150) segmentation.

Pure tf.data graph ops (no Python per element), so they feed every backend. Every random draw is
stateless, seeded per element from `tf.data.Dataset.random(seed)`: one seed gives one stream of
augmentations, and a fresh one each epoch. The per-element transforms are public, take that seed
as a tensor, and are what the tests call directly.

* **ADE20K**, as mmsegmentation's UperNet configs (`configs/_base_/datasets/ade20k.py`), which the
  ConvNeXt papers trained on: labels with `reduce_zero_label` (0 "other" -> 255, ignored; class c
  -> c - 1), a random resize of (2048, 512) by a ratio in [0.5, 2.0] keeping the aspect ratio, a
  512x512 random crop, a horizontal flip (p 0.5), mmseg's `PhotoMetricDistortion`, then a pad to the
  crop (image 0, label 255). mmseg's crop also retries up to 10 times until no class covers more
  than 75% of it (`cat_max_ratio`); that is left out here: a data-dependent retry loop per element
  buys little on ADE20K's cluttered scenes. Evaluation resizes to (2048, 512) keeping the ratio
  (short side 512 unless the long side would pass 2048) and resizes the labels with it (nearest):
  mmseg scores at the original size by resizing the logits back instead, which a batch cannot do.
* **COCO**, resize-and-pad as TF/keras-hub detection pipelines do: the image is scaled to fit
  `image_size` keeping its ratio, flipped horizontally (p 0.5, boxes with it), and padded with zeros
  at the bottom and right, so batches have one shape (mmdet's 1333x800 keep-ratio resize pads to a
  multiple of 32 per batch instead). Crowd boxes are dropped (mmdet ignores them) and so are boxes
  with no area; boxes come as keras-hub's detectors take them: {"boxes": (max_boxes, 4) float32,
  "labels": (max_boxes,) int32} padded with -1, in pixels of the padded image.

Images are float32 [0, 255] pixels, as everywhere in this project: the model normalises them.
"""

import math

from keras_convnext import checks

ADE20K_NAME = "scene_parse150"  # TFDS's ADE20K: splits "train" (20,210) and "test" (the 2,000 validation images)
ADE20K_CLASSES = 150
IGNORE_INDEX = 255  # mmseg's ignore label: "other" after reduce_zero_label, and the crop padding
COCO_NAME = "coco/2017"
COCO_CLASSES = 80
BOX_FORMATS = ("xyxy", "yxyx", "rel_xyxy", "rel_yxyx")
PAD = -1  # keras-hub's padding for boxes and labels

# mmseg's PhotoMetricDistortion defaults: each step on with probability 0.5.
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0 / 180.0  # OpenCV's 8-bit hue runs 0..180; TF's runs 0..1


# ---- COCO detection ------------------------------------------------------------------------------

def detection_transform(image, boxes, labels, seed, image_size=(640, 640), max_boxes=100, flip_prob=0.5,
                        bounding_box_format="xyxy"):
    """One detection example -> (float32 (H, W, 3) image, {"boxes": (max_boxes, 4), "labels": (max_boxes,)}).

    Args:
        image: (h, w, 3) uint8.
        boxes: (n, 4) float, TFDS's normalised (ymin, xmin, ymax, xmax).
        labels: (n,) integer classes.
        seed: (2,) integer tensor for the stateless flip draw.
        image_size: (H, W) of the padded output; the image is scaled by min(H / h, W / w).
        flip_prob: probability of the horizontal flip (1.0 always flips: what the tests use).
        bounding_box_format: the output boxes' format, in pixels of the padded image ("xyxy",
            "yxyx") or divided by its size ("rel_xyxy", "rel_yxyx").
    """
    import tensorflow as tf

    out_h, out_w = _pair("image_size", image_size)
    max_boxes = checks.integer("max_boxes", max_boxes, minimum=1)
    flip_prob = checks.number("flip_prob", flip_prob, 0.0, 1.0)
    checks.choice("bounding_box_format", bounding_box_format, BOX_FORMATS)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.minimum(out_h / h, out_w / w)
    new_h = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, out_h)
    new_w = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, out_w)
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]), method="bilinear")
    resized = tf.clip_by_value(resized, 0.0, 255.0)

    # Normalised yxyx -> pixel xyxy of the resized image (continuous coordinates: pixel i spans [i, i+1)).
    boxes = tf.clip_by_value(tf.cast(boxes, tf.float32), 0.0, 1.0)
    fh, fw = tf.cast(new_h, tf.float32), tf.cast(new_w, tf.float32)
    x0, y0, x1, y1 = boxes[:, 1] * fw, boxes[:, 0] * fh, boxes[:, 3] * fw, boxes[:, 2] * fh
    flip = tf.random.stateless_uniform([], seed) < flip_prob
    resized = tf.cond(flip, lambda: tf.reverse(resized, axis=[1]), lambda: resized)
    x0, x1 = tf.where(flip, fw - x1, x0), tf.where(flip, fw - x0, x1)

    keep = (x1 > x0) & (y1 > y0)  # a box with no area teaches nothing and breaks IoU matching
    xyxy = tf.boolean_mask(tf.stack([x0, y0, x1, y1], axis=-1), keep)[:max_boxes]
    labels = tf.boolean_mask(tf.cast(labels, tf.int32), keep)[:max_boxes]
    if bounding_box_format.endswith("yxyx"):
        xyxy = tf.gather(xyxy, [1, 0, 3, 2], axis=-1)
    if bounding_box_format.startswith("rel_"):
        xyxy = xyxy / tf.constant([out_w, out_h, out_w, out_h] if bounding_box_format == "rel_xyxy"
                                  else [out_h, out_w, out_h, out_w], tf.float32)
    count = tf.shape(labels)[0]
    padded_boxes = tf.pad(xyxy, [[0, max_boxes - count], [0, 0]], constant_values=PAD)
    padded_labels = tf.pad(labels, [[0, max_boxes - count]], constant_values=PAD)
    padded = tf.image.pad_to_bounding_box(resized, 0, 0, out_h, out_w)  # zeros below and to the right
    return (tf.ensure_shape(padded, [out_h, out_w, 3]),
            {"boxes": tf.ensure_shape(padded_boxes, [max_boxes, 4]),
             "labels": tf.ensure_shape(padded_labels, [max_boxes])})


def coco_detection(split="train", image_size=(640, 640), batch_size=8, training=None, max_boxes=100,
                   flip_prob=0.5, bounding_box_format="xyxy", seed=0, shuffle_buffer=1000, drop_crowd=True,
                   data_dir=None):
    """TFDS `coco/2017` as batches of (float32 (B, H, W, 3) images, {"boxes", "labels"}) for keras-hub.

    Args:
        split: a TFDS split ("train", "validation", "train[:1%]", ...).
        training: flip and shuffle (default: when `split` starts with "train"); evaluation neither
            flips nor shuffles and keeps the last partial batch.
        max_boxes: boxes kept per image (the first ones; 100 as in keras-hub's and Detectron2's COCO setups),
            the rest of the rows padded with -1.
        drop_crowd: leave out `is_crowd` boxes, as mmdet's training does.
        Others: as `detection_transform`.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    training = _training(split, training)
    _pair("image_size", image_size)
    batch_size = checks.integer("batch_size", batch_size, minimum=1)
    max_boxes = checks.integer("max_boxes", max_boxes, minimum=1)
    flip_prob = checks.number("flip_prob", flip_prob, 0.0, 1.0)
    checks.choice("bounding_box_format", bounding_box_format, BOX_FORMATS)
    seed = checks.integer("seed", seed, minimum=0)
    shuffle_buffer = checks.integer("shuffle_buffer", shuffle_buffer, minimum=1)
    checks.boolean("drop_crowd", drop_crowd)

    ds = tfds.load(COCO_NAME, split=split, data_dir=data_dir, shuffle_files=training,
                   read_config=tfds.ReadConfig(shuffle_seed=seed))

    def per_example(example, element_seed):
        objects = example["objects"]
        keep = tf.logical_not(objects["is_crowd"]) if drop_crowd else tf.ones_like(objects["label"], tf.bool)
        return detection_transform(example["image"], tf.boolean_mask(objects["bbox"], keep),
                                   tf.boolean_mask(objects["label"], keep), element_seed, image_size, max_boxes,
                                   flip_prob if training else 0.0, bounding_box_format)

    return _batched(ds, per_example, training, batch_size, seed, shuffle_buffer)


# ---- ADE20K segmentation -------------------------------------------------------------------------

def rescale_size(height, width, scale):
    """mmcv's keep-ratio rescale: the largest size within (long, short) = `scale`, rounded as mmcv does.

    Works on tensors: factor = min(max(scale) / long side, min(scale) / short side).
    """
    import tensorflow as tf

    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    long_edge, short_edge = tf.reduce_max(scale), tf.reduce_min(scale)
    factor = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
    # mmcv: int(size * factor + 0.5)
    return (tf.maximum(tf.cast(tf.floor(h * factor + 0.5), tf.int32), 1),
            tf.maximum(tf.cast(tf.floor(w * factor + 0.5), tf.int32), 1))


def segmentation_train_transform(image, mask, seed, crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0),
                                 flip_prob=0.5, photometric=True):
    """One training example -> (float32 (ch, cw, 3) image, int32 (ch, cw) labels), as mmseg's ADE20K pipeline.

    Random resize (bilinear image, nearest labels) of `scale` times a ratio drawn in `ratio_range`,
    keeping the aspect ratio (`rescale_size`); random crop of `crop_size` (height, width); flip;
    photometric distortion; pad to `crop_size` with image 0 and label `IGNORE_INDEX`.

    Args:
        image: (h, w, 3) uint8; mask: (h, w) or (h, w, 1) integer labels, already reduced.
        seed: (2,) integer tensor: every draw of this example derives from it.
        flip_prob: 1.0 always flips, 0.0 never (what the tests use).
    """
    import tensorflow as tf

    crop_h, crop_w = _pair("crop_size", crop_size)
    _pair("scale", scale)
    low, high = _range("ratio_range", ratio_range)
    flip_prob = checks.number("flip_prob", flip_prob, 0.0, 1.0)
    checks.boolean("photometric", photometric)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
    image, mask = tf.cast(image, tf.float32), _labels(mask)

    ratio = tf.random.stateless_uniform([], seeds[0], low, high)
    target = tf.floor(tf.constant(scale, tf.float32) * ratio)  # mmcv: int(scale * ratio)
    new_h, new_w = rescale_size(tf.shape(image)[0], tf.shape(image)[1], target)
    image, mask = _resize(image, mask, new_h, new_w)

    # mmseg's RandomCrop: offset uniform in [0, max(size - crop, 0)]; a side shorter than the crop stays whole.
    off_y = _randint(seeds[1], tf.maximum(new_h - crop_h, 0) + 1)
    off_x = _randint(seeds[2], tf.maximum(new_w - crop_w, 0) + 1)
    image = image[off_y:off_y + crop_h, off_x:off_x + crop_w]
    mask = mask[off_y:off_y + crop_h, off_x:off_x + crop_w]

    flip = tf.random.stateless_uniform([], seeds[3]) < flip_prob
    image, mask = tf.cond(flip, lambda: (tf.reverse(image, [1]), tf.reverse(mask, [1])), lambda: (image, mask))
    if photometric:
        image = photometric_distortion(image, seeds[4])
    return _pad(image, mask, crop_h, crop_w)


def segmentation_eval_transform(image, mask, scale=(2048, 512)):
    """One evaluation example: resized keeping its ratio within `scale` (labels nearest, to the same size)."""
    import tensorflow as tf

    _pair("scale", scale)
    image, mask = tf.cast(image, tf.float32), _labels(mask)
    new_h, new_w = rescale_size(tf.shape(image)[0], tf.shape(image)[1], tf.constant(scale, tf.float32))
    return _resize(image, mask, new_h, new_w)


def photometric_distortion(image, seed):
    """mmseg's PhotoMetricDistortion on float [0, 255] RGB: brightness, contrast (before or after, at
    random), saturation, hue, each with probability 0.5, clipped after each step.

    mmseg rounds to uint8 after each step; this stays in float (a difference below one level a step).
    """
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 10)
    coin = lambda i: tf.random.stateless_uniform([], s[i]) < 0.5  # noqa: E731
    uniform = lambda i, lo, hi: tf.random.stateless_uniform([], s[i], lo, hi)  # noqa: E731

    def contrast(x):
        return tf.where(coin(2), tf.clip_by_value(x * uniform(3, *CONTRAST_RANGE), 0.0, 255.0), x)

    image = tf.where(coin(0), tf.clip_by_value(image + uniform(1, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), 0.0, 255.0),
                     image)
    contrast_first = coin(4)
    image = tf.where(contrast_first, contrast(image), image)
    hsv = tf.image.rgb_to_hsv(image / 255.0)
    saturation = tf.where(coin(5), tf.clip_by_value(hsv[..., 1] * uniform(6, *SATURATION_RANGE), 0.0, 1.0),
                          hsv[..., 1])
    hue = tf.where(coin(7), tf.math.floormod(hsv[..., 0] + uniform(8, -HUE_DELTA, HUE_DELTA), 1.0), hsv[..., 0])
    image = tf.clip_by_value(tf.image.hsv_to_rgb(tf.stack([hue, saturation, hsv[..., 2]], axis=-1)) * 255.0,
                             0.0, 255.0)
    return tf.where(contrast_first, image, contrast(image))


def ade20k_segmentation(split="train", crop_size=(512, 512), batch_size=16, training=None, scale=(2048, 512),
                        ratio_range=(0.5, 2.0), flip_prob=0.5, photometric=True, reduce_zero_label=True, seed=0,
                        shuffle_buffer=1000, data_dir=None):
    """TFDS `scene_parse150` as batches of (float32 images, int32 (B, h, w) labels).

    Training batches are `crop_size`; evaluation batches (`segmentation_eval_transform`) are padded
    to the largest image of the batch (image 0, label `IGNORE_INDEX`): batch 1 pads nothing.
    Labels are 0..149 with `IGNORE_INDEX` for "other" and padding when `reduce_zero_label` (mmseg's
    setting: train with `SparseCategoricalCrossentropy(ignore_class=255)`), else TFDS's 0..150.

    Args:
        split: "train", "test" (TFDS's name for ADE20K's validation images), or a slice of them.
        training: the random augmentation and shuffling (default: when `split` starts with "train").
        Others: as `segmentation_train_transform`.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    training = _training(split, training)
    _pair("crop_size", crop_size)
    _pair("scale", scale)
    _range("ratio_range", ratio_range)
    checks.number("flip_prob", flip_prob, 0.0, 1.0)
    checks.boolean("photometric", photometric)
    checks.boolean("reduce_zero_label", reduce_zero_label)
    batch_size = checks.integer("batch_size", batch_size, minimum=1)
    seed = checks.integer("seed", seed, minimum=0)
    shuffle_buffer = checks.integer("shuffle_buffer", shuffle_buffer, minimum=1)

    ds = tfds.load(ADE20K_NAME, split=split, data_dir=data_dir, shuffle_files=training,
                   read_config=tfds.ReadConfig(shuffle_seed=seed))

    def labels_of(example):
        labels = tf.cast(example["annotation"][..., 0], tf.int32)  # TFDS decodes the label PNG as 3 equal channels
        return reduce_zero(labels) if reduce_zero_label else labels

    if training:
        def per_example(example, element_seed):
            return segmentation_train_transform(example["image"], labels_of(example), element_seed, crop_size, scale,
                                                ratio_range, flip_prob, photometric)

        return _batched(ds, per_example, True, batch_size, seed, shuffle_buffer)
    ds = ds.map(lambda example: segmentation_eval_transform(example["image"], labels_of(example), scale),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.padded_batch(batch_size, padding_values=(0.0, IGNORE_INDEX))
    return ds.prefetch(tf.data.AUTOTUNE)


def reduce_zero(labels):
    """mmseg's reduce_zero_label: 0 ("other") -> IGNORE_INDEX, class c -> c - 1."""
    import tensorflow as tf

    labels = tf.cast(labels, tf.int32)
    return tf.where(labels == 0, IGNORE_INDEX, labels - 1)


# ---- shared --------------------------------------------------------------------------------------

def _batched(ds, per_example, training, batch_size, seed, shuffle_buffer):
    """Shuffle (training), zip a per-element (2,) seed, map, batch (dropping the remainder when training)."""
    import tensorflow as tf

    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2, drop_remainder=True)
    ds = tf.data.Dataset.zip((ds, seeds)).map(per_example, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)


def _labels(mask):
    import tensorflow as tf

    mask = tf.cast(mask, tf.int32)
    return mask[..., 0] if mask.shape.rank == 3 else mask


def _resize(image, mask, height, width):
    """Bilinear image, nearest labels (an interpolated label is another class), to (height, width)."""
    import tensorflow as tf

    size = tf.stack([height, width])
    image = tf.clip_by_value(tf.image.resize(image, size, method="bilinear"), 0.0, 255.0)
    mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
    return image, mask


def _pad(image, mask, height, width):
    """Pads at the bottom and right to (height, width): image with 0, labels with IGNORE_INDEX."""
    import tensorflow as tf

    pad_h, pad_w = height - tf.shape(image)[0], width - tf.shape(image)[1]
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
    mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_INDEX)
    return tf.ensure_shape(image, [height, width, 3]), tf.ensure_shape(mask, [height, width])


def _randint(seed, maxval):
    """A stateless integer uniform in [0, maxval)."""
    import tensorflow as tf

    return tf.random.stateless_uniform([], seed, 0, maxval, dtype=tf.int32)


def _training(split, training):
    checks.optional_str("split", split)
    if split is None:
        raise ValueError("`split` must be a TFDS split name. Received: split=None")
    return split.startswith("train") if training is None else checks.boolean("training", training)


def _pair(name, value):
    """An int or an (a, b) pair of positive ints -> (a, b)."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)):
        raise ValueError(f"`{name}` must be a positive integer or a pair of them. {checks.received(name, value)}")
    return int(pair[0]), int(pair[1])


def _range(name, value):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
            or not 0 < value[0] <= value[1]):
        raise ValueError(f"`{name}` must be (low, high) with 0 < low <= high. {checks.received(name, value)}")
    return float(value[0]), float(value[1])
