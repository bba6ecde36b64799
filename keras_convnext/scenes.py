"""Digit scenes: small detection and segmentation images built from real handwritten digits.

Each canvas holds 1 to 5 of scikit-learn's `load_digits` (1,797 8x8 scans, bundled with
scikit-learn: nothing to download), each upscaled bilinearly to its own size and painted in a
colour onto a smooth, coloured, noisy background. Every digit comes with its class, its tight box
and its pixels, so one scene serves a detector (keras-hub's padded `{"boxes", "labels"}`) and a
segmenter (a per-pixel class mask) alike.

* **Held out by construction.** A fixed permutation of `load_digits` splits it into two halves:
  "train" scenes draw only from the first, "test" scenes only from the second, so no scan a
  model trained on appears in the held-out scenes.
* **Reproducible per scene.** Scene `i` is drawn from its own generator, seeded by
  (`seed`, split, `i`): the first 10 of 100 scenes are the 10 scenes, and "train" and "test"
  layouts differ even under one seed.
* **No overlap.** Digits are placed on disjoint squares (a layout is redrawn when one does not
  fit), so every digit is wholly visible: its box is the tight box of its mask pixels, and every
  label in the boxes is a class in the mask. (Occlusion would let a digit vanish from the mask
  while its box stays.)
* **Ink defines the object.** A digit's pixels are those whose upscaled intensity exceeds
  `ink_threshold` times its brightest; the faint anti-aliased rim below that is painted but
  belongs to the background, as an annotator's outline would leave it.

Bilinear upscaling, not nearest: nearest turns each scan into 8x8 flat blocks whose edges (and so
every box edge) fall on multiples of size / 8; bilinear gives smooth strokes and boxes at any pixel.
"""

import functools

import numpy as np

from keras_convnext import checks

SPLITS = ("train", "test")
BOX_FORMATS = ("xyxy", "yxyx", "rel_xyxy", "rel_yxyx")
NUM_CLASSES = 11  # 0 is the background; digit d is class d + 1
DIGIT_SIDE = 8  # load_digits' scans are 8x8, intensities 0..16
SPLIT_SEED = 16  # the fixed permutation that halves load_digits into train and test scans
PLACE_TRIES = 100  # positions (each with a fresh size) tried for one digit before redrawing the layout
LAYOUT_TRIES = 50  # layouts tried before a scene is declared too crowded
PAD = -1  # keras-hub's padding for boxes and labels (RetinaNet's encoder skips label -1)


@functools.lru_cache(maxsize=None)
def _scans():
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    half = len(order) // 2
    return {"train": order[:half], "test": order[half:]}, digits.images / 16.0, digits.target.astype("int32")


def digit_split(split):
    """The `load_digits` indices a split's scenes draw from: disjoint halves of a fixed permutation."""
    checks.choice("split", split, SPLITS)
    return _scans()[0][split].copy()


def digit_scenes(split, num_scenes, seed=0, image_size=128, min_digits=1, max_digits=5, digit_size=(16, 48),
                 ink_threshold=0.5, bounding_box_format="xyxy"):
    """Draws `num_scenes` digit scenes of a split, the same ones for the same arguments.

    Args:
        split: "train" or "test": which half of `load_digits` the digits come from.
        num_scenes: how many scenes.
        seed: non-negative integer; scene `i` depends only on (`seed`, `split`, `i`) and the
            other arguments.
        image_size: the side of the square canvas, in pixels.
        min_digits, max_digits: each scene holds a uniform count of digits in this range.
        digit_size: (smallest, largest) side of an upscaled digit, in pixels, drawn uniformly.
        ink_threshold: a digit's pixels are those above this fraction of its brightest pixel.
        bounding_box_format: "xyxy" (pixels: left, top, right, bottom), "yxyx", or their
            "rel_" forms divided by the image side. Box edges are pixel edges: a digit whose
            pixels span columns 3..7 has left 3 and right 8.

    Returns:
        A dict in the layout Keras's preprocessing layers take:
          * "images": (N, S, S, 3) uint8;
          * "bounding_boxes": {"boxes": (N, max_digits, 4) float32, "labels": (N, max_digits)
            int32, the digit 0..9}, in placement order, padded with -1 as keras-hub's detectors
            expect;
          * "segmentation_masks": (N, S, S) int32, 0 background and digit d as d + 1
            (`NUM_CLASSES` classes);
          * "instance_masks": (N, S, S) int32, 0 background and box k's pixels as k + 1.
    """
    checks.choice("split", split, SPLITS)
    num_scenes = checks.integer("num_scenes", num_scenes, minimum=1)
    seed = checks.integer("seed", seed, minimum=0)
    size = checks.integer("image_size", image_size, minimum=DIGIT_SIDE)
    min_digits = checks.integer("min_digits", min_digits, minimum=1)
    max_digits = checks.integer("max_digits", max_digits, minimum=1)
    if min_digits > max_digits:
        raise ValueError(f"`min_digits` must be at most `max_digits` ({max_digits}). "
                         f"{checks.received('min_digits', min_digits)}")
    if (not isinstance(digit_size, (tuple, list)) or len(digit_size) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in digit_size)
            or not 4 <= digit_size[0] <= digit_size[1] <= size):
        raise ValueError(f"`digit_size` must be two integers (smallest, largest) with 4 <= smallest <= largest <= "
                         f"image_size ({size}). {checks.received('digit_size', digit_size)}")
    ink_threshold = checks.number("ink_threshold", ink_threshold, 0.0, 1.0, low_open=True, high_open=True)
    checks.choice("bounding_box_format", bounding_box_format, BOX_FORMATS)

    indices, scans, targets = _scans()
    pool = indices[split]
    images = np.empty((num_scenes, size, size, 3), np.uint8)
    boxes = np.full((num_scenes, max_digits, 4), PAD, np.float32)
    labels = np.full((num_scenes, max_digits), PAD, np.int32)
    masks = np.zeros((num_scenes, size, size), np.int32)
    instances = np.zeros((num_scenes, size, size), np.int32)
    for i in range(num_scenes):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        count = int(rng.integers(min_digits, max_digits + 1))
        squares = _layout(rng, count, size, digit_size)
        image = _background(rng, size)
        for k, (top, left, side) in enumerate(squares):
            index = pool[rng.integers(len(pool))]
            intensity = _upscale(scans[index], side)  # (side, side) in [0, 1]
            ink = intensity > ink_threshold * intensity.max()
            window = image[top:top + side, left:left + side]
            colour = _contrasting(rng, window.mean(axis=(0, 1)))
            alpha = intensity[..., None]
            image[top:top + side, left:left + side] = window * (1.0 - alpha) + colour * alpha
            masks[i, top:top + side, left:left + side][ink] = targets[index] + 1
            instances[i, top:top + side, left:left + side][ink] = k + 1
            rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
            boxes[i, k] = (left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1)
            labels[i, k] = targets[index]
        images[i] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return {
        "images": images,
        "bounding_boxes": {"boxes": _to_format(boxes, labels, bounding_box_format, size), "labels": labels},
        "segmentation_masks": masks,
        "instance_masks": instances,
    }


def digit_scenes_dataset(split, num_scenes, task="detection", batch_size=8, seed=0, shuffle=False, **scene_args):
    """`digit_scenes` as a batched tf.data dataset for keras-hub tasks (tf.data on every backend).

    Args:
        task: "detection" gives (float32 [0, 255] images, {"boxes", "labels"}), what keras-hub's
            `RetinaNetObjectDetector.fit` takes (pass it the same `bounding_box_format`);
            "segmentation" gives (images, (N, S, S) int32 class masks), for a sparse categorical
            loss over `NUM_CLASSES` logits.
        shuffle: reshuffle the scenes every epoch (seeded by `seed`).
        **scene_args: `digit_scenes`'s other arguments.
    """
    import tensorflow as tf

    checks.choice("task", task, ("detection", "segmentation"))
    batch_size = checks.integer("batch_size", batch_size, minimum=1)
    checks.boolean("shuffle", shuffle)
    scenes = digit_scenes(split, num_scenes, seed=seed, **scene_args)
    images = scenes["images"].astype(np.float32)
    targets = scenes["bounding_boxes"] if task == "detection" else scenes["segmentation_masks"]
    ds = tf.data.Dataset.from_tensor_slices((images, targets))
    if shuffle:
        ds = ds.shuffle(num_scenes, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _layout(rng, count, size, digit_size):
    """`count` disjoint squares (top, left, side); a digit that finds no room redraws the whole layout."""
    for _ in range(LAYOUT_TRIES):
        squares = []
        for _ in range(count):
            for _ in range(PLACE_TRIES):
                side = int(rng.integers(digit_size[0], digit_size[1] + 1))
                top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                if all(top + side <= t or t + s <= top or left + side <= l or l + s <= left for t, l, s in squares):
                    squares.append((top, left, side))
                    break
            else:
                break
        if len(squares) == count:
            return squares
    raise ValueError(f"Cannot place {count} disjoint digits of {digit_size[0]} px or more on a {size} px canvas: "
                     f"use a smaller `digit_size` or fewer digits. Received: digit_size={tuple(digit_size)!r}")


def _upscale(scan, side):
    """An 8x8 scan -> (side, side), bilinear with half-pixel centres (TF's and PIL's upsampling grid)."""
    weights = _bilinear_weights(DIGIT_SIDE, side)
    return np.clip(weights @ scan @ weights.T, 0.0, 1.0)


def _bilinear_weights(source, target):
    """(target, source) matrix: row j blends the two source pixels around target pixel j's centre."""
    centres = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0.0, source - 1.0)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, source - 1)
    frac = centres - low
    weights = np.zeros((target, source))
    np.add.at(weights, (np.arange(target), low), 1.0 - frac)
    np.add.at(weights, (np.arange(target), high), frac)
    return weights


def _background(rng, size):
    """Float (size, size, 3): two octaves of smooth coloured noise, a tilt, and fine grain."""
    image = np.zeros((size, size, 3))
    for cells, amplitude in ((3, 70.0), (9, 25.0)):
        grid = rng.uniform(-amplitude, amplitude, (cells, cells, 3))
        weights = _bilinear_weights(cells, size)
        image += np.stack([weights @ grid[..., c] @ weights.T for c in range(3)], axis=-1)
    ramp = np.linspace(-1.0, 1.0, size)
    tilt = rng.uniform(-30.0, 30.0, 2)
    image += (tilt[0] * ramp[:, None] + tilt[1] * ramp[None, :])[..., None]
    image += rng.uniform(70.0, 185.0, 3)  # the base colour
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(image, 0.0, 255.0)


def _contrasting(rng, background):
    """A random colour pushed away from the background's brightness, so that the digit stays readable."""
    colour = rng.uniform(0.0, 255.0, 3)
    if abs(_luma(colour) - _luma(background)) < 90.0:
        colour = colour * 0.25 if _luma(background) > 127.5 else 255.0 - (255.0 - colour) * 0.25
    return colour


def _luma(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _to_format(boxes, labels, bounding_box_format, size):
    """xyxy pixel boxes -> the requested format; the padding stays -1."""
    if bounding_box_format.endswith("yxyx"):
        boxes = boxes[..., [1, 0, 3, 2]]
    if bounding_box_format.startswith("rel_"):
        boxes = boxes / np.float32(size)
    return np.where((labels == PAD)[..., None], np.float32(PAD), boxes).astype(np.float32)
