"""Digit scenes: boxes, masks and labels agree (against NumPy), counts, seeds, the held-out split,
the background, box formats, the tf.data wrapper and the argument errors."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from keras_convnext import scenes
from keras_convnext.scenes import digit_scenes, digit_scenes_dataset, digit_split


@pytest.fixture(scope="module")
def train_scenes():
    return digit_scenes("train", 40, seed=3)


def test_boxes_masks_and_labels_agree(train_scenes):
    s = train_scenes
    boxes, labels = s["bounding_boxes"]["boxes"], s["bounding_boxes"]["labels"]
    masks, instances = s["segmentation_masks"], s["instance_masks"]
    assert s["images"].shape == (40, 128, 128, 3) and s["images"].dtype == np.uint8
    assert boxes.shape == (40, 5, 4) and boxes.dtype == np.float32
    assert labels.shape == (40, 5) and labels.dtype == np.int32
    assert masks.shape == instances.shape == (40, 128, 128) and masks.dtype == instances.dtype == np.int32
    for i in range(40):
        count = int((labels[i] >= 0).sum())
        assert 1 <= count <= 5
        assert (labels[i, :count] >= 0).all() and (labels[i, :count] <= 9).all()
        assert (labels[i, count:] == -1).all() and (boxes[i, count:] == -1).all()  # keras-hub's padding
        assert set(np.unique(instances[i])) == set(range(count + 1))
        np.testing.assert_array_equal(masks[i] > 0, instances[i] > 0)
        for k in range(count):
            ys, xs = np.nonzero(instances[i] == k + 1)
            # xyxy pixel edges: the tight box of the digit's pixels, right and bottom one past the last pixel.
            np.testing.assert_array_equal(boxes[i, k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert (masks[i][ys, xs] == labels[i, k] + 1).all()
            x0, y0, x1, y1 = boxes[i, k].astype(int)
            inside = instances[i, y0:y1, x0:x1]
            assert set(np.unique(inside)) <= {0, k + 1}  # no other digit reaches into the box
        assert set(np.unique(masks[i])) - {0} == set(labels[i, :count] + 1)
        x0, y0, x1, y1 = boxes[i, :count].T
        for a in range(count):  # boxes are pairwise disjoint: digits never overlap
            for b in range(a + 1, count):
                assert x1[a] <= x0[b] or x1[b] <= x0[a] or y1[a] <= y0[b] or y1[b] <= y0[a]


def test_digit_counts_and_sizes(train_scenes):
    counts = (train_scenes["bounding_boxes"]["labels"] >= 0).sum(axis=1)
    assert set(counts) == {1, 2, 3, 4, 5}
    boxes = train_scenes["bounding_boxes"]["boxes"][train_scenes["bounding_boxes"]["labels"] >= 0]
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.max() <= 48 and sides.min() >= 4  # the ink's box lies within its 16..48 px square
    fixed = digit_scenes("test", 6, min_digits=3, max_digits=3, image_size=64, digit_size=(8, 16))
    assert ((fixed["bounding_boxes"]["labels"] >= 0).sum(axis=1) == 3).all()
    assert fixed["images"].shape == (6, 64, 64, 3) and fixed["bounding_boxes"]["boxes"].shape == (6, 3, 4)


def test_scenes_are_reproducible_per_scene(train_scenes):
    again = digit_scenes("train", 10, seed=3)
    for key in ("images", "segmentation_masks", "instance_masks"):
        np.testing.assert_array_equal(again[key], train_scenes[key][:10])  # scene i does not depend on the count
    np.testing.assert_array_equal(again["bounding_boxes"]["boxes"], train_scenes["bounding_boxes"]["boxes"][:10])
    other_seed = digit_scenes("train", 10, seed=4)
    held_out = digit_scenes("test", 10, seed=3)
    assert not np.array_equal(other_seed["images"], again["images"])
    assert not np.array_equal(held_out["images"], again["images"])
    np.testing.assert_array_equal(digit_scenes("test", 3)["images"], digit_scenes("test", 3, seed=0)["images"])


def test_train_and_test_scenes_draw_from_disjoint_halves():
    train, test = digit_split("train"), digit_split("test")
    assert len(train) == 898 and len(test) == 899
    assert not set(train) & set(test) and set(train) | set(test) == set(range(1797))
    # One digit at 8 px is upscaled by an identity: its ink pattern identifies the scan it came from.
    digits = load_digits()
    patterns = {}
    for index, scan in enumerate(digits.images / 16.0):
        ink = scan > 0.5 * scan.max()
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        key = (int(digits.target[index]), ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].tobytes(),
               rows[-1] - rows[0], cols[-1] - cols[0])
        patterns.setdefault(key, set()).add(index)
    for split, pool in (("train", set(train)), ("test", set(test))):
        s = digit_scenes(split, 30, seed=1, image_size=32, min_digits=1, max_digits=1, digit_size=(8, 8))
        for i in range(30):
            x0, y0, x1, y1 = s["bounding_boxes"]["boxes"][i, 0].astype(int)
            ink = s["instance_masks"][i, y0:y1, x0:x1] == 1
            key = (int(s["bounding_boxes"]["labels"][i, 0]), ink.tobytes(), y1 - y0 - 1, x1 - x0 - 1)
            assert patterns.get(key, set()) & pool, (split, i)  # the scan is in its own split's half


def test_background_is_smooth_texture_and_digits_contrast(train_scenes):
    images = train_scenes["images"].astype(np.float64)
    background = train_scenes["segmentation_masks"] == 0
    for i in range(len(images)):
        pixels = images[i][background[i]]  # (P, 3)
        assert pixels.std(axis=0).max() > 10.0  # not a flat colour
        # Smooth, not only grain: neighbouring pixels agree far better than random pairs do.
        grey = images[i].mean(axis=-1)
        shuffled = np.random.default_rng(i).permutation(grey.ravel())
        assert np.abs(np.diff(grey, axis=1)).mean() < 0.5 * np.abs(grey.ravel() - shuffled).mean()
        luma = images[i] @ [0.299, 0.587, 0.114]
        for k, (x0, y0, x1, y1) in enumerate(train_scenes["bounding_boxes"]["boxes"][i].astype(int)):
            if train_scenes["bounding_boxes"]["labels"][i, k] < 0:
                break
            window, ink = luma[y0:y1, x0:x1], train_scenes["instance_masks"][i, y0:y1, x0:x1] == k + 1
            assert abs(window[ink].mean() - window[~ink].mean()) > 25.0  # the digit stands out where it lies
    means = images.mean(axis=(1, 2))
    assert means.std(axis=0).min() > 5.0  # the colours vary between scenes


def test_box_formats():
    xyxy = digit_scenes("test", 4, image_size=64, digit_size=(8, 24))["bounding_boxes"]
    valid = xyxy["labels"] >= 0
    for fmt, expected in (("yxyx", xyxy["boxes"][..., [1, 0, 3, 2]]), ("rel_xyxy", xyxy["boxes"] / 64),
                          ("rel_yxyx", xyxy["boxes"][..., [1, 0, 3, 2]] / 64)):
        got = digit_scenes("test", 4, image_size=64, digit_size=(8, 24), bounding_box_format=fmt)["bounding_boxes"]
        np.testing.assert_array_equal(got["labels"], xyxy["labels"])
        np.testing.assert_allclose(got["boxes"][valid], expected[valid], rtol=1e-6)
        assert (got["boxes"][~valid] == -1).all()


def test_tf_data_wrapper_matches_the_arrays():
    scenes_ = digit_scenes("train", 5, seed=2, image_size=32, digit_size=(8, 12), max_digits=3)
    ds = digit_scenes_dataset("train", 5, task="detection", batch_size=4, seed=2, image_size=32, digit_size=(8, 12),
                              max_digits=3)
    images, targets = next(iter(ds))
    assert images.dtype.name == "float32" and tuple(images.shape) == (4, 32, 32, 3)
    np.testing.assert_array_equal(images.numpy(), scenes_["images"][:4].astype(np.float32))
    np.testing.assert_array_equal(targets["boxes"].numpy(), scenes_["bounding_boxes"]["boxes"][:4])
    np.testing.assert_array_equal(targets["labels"].numpy(), scenes_["bounding_boxes"]["labels"][:4])
    assert targets["labels"].dtype.name == "int32" and sum(int(b[0].shape[0]) for b in ds) == 5
    seg = digit_scenes_dataset("train", 5, task="segmentation", batch_size=5, seed=2, image_size=32,
                               digit_size=(8, 12), max_digits=3)
    _, masks = next(iter(seg))
    assert masks.dtype.name == "int32"
    np.testing.assert_array_equal(masks.numpy(), scenes_["segmentation_masks"])
    shuffled = digit_scenes_dataset("train", 5, task="segmentation", batch_size=5, seed=2, shuffle=True,
                                    image_size=32, digit_size=(8, 12), max_digits=3)
    _, masks = next(iter(shuffled))
    assert sorted(m.tobytes() for m in masks.numpy()) == sorted(m.tobytes() for m in scenes_["segmentation_masks"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="val"), r"`split` must be one of 'train', 'test'\. Received: split='val'"),
    (dict(num_scenes=0), r"`num_scenes` must be at least 1\. Received: num_scenes=0"),
    (dict(num_scenes=True), r"`num_scenes` must be an integer\. Received: num_scenes=True"),
    (dict(seed=-1), r"`seed` must be at least 0\. Received: seed=-1"),
    (dict(image_size=4), r"`image_size` must be at least 8\. Received: image_size=4"),
    (dict(min_digits=3, max_digits=2), r"`min_digits` must be at most `max_digits` \(2\)\. Received: min_digits=3"),
    (dict(digit_size=(16, 200)), r"`digit_size` must be two integers .*Received: digit_size=\(16, 200\)"),
    (dict(digit_size=16), r"Received: digit_size=16"),
    (dict(ink_threshold=1.0), r"`ink_threshold` must be in \(0\.0, 1\.0\)\. Received: ink_threshold=1\.0"),
    (dict(bounding_box_format="xywh"), r"`bounding_box_format` must be one of .*Received: bounding_box_format='xywh'"),
    (dict(image_size=32, max_digits=5, min_digits=5, digit_size=(30, 32)),
     r"Cannot place 5 disjoint digits of 30 px or more on a 32 px canvas.*Received: digit_size=\(30, 32\)"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    args = dict(split="train", num_scenes=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as error:
        digit_scenes(**args)
    assert "\n" not in str(error.value)


def test_bad_wrapper_arguments():
    with pytest.raises(ValueError, match=r"Received: task='boxes'"):
        digit_scenes_dataset("train", 2, task="boxes")
    with pytest.raises(ValueError, match=r"Received: batch_size=0"):
        digit_scenes_dataset("train", 2, batch_size=0)
    assert scenes.NUM_CLASSES == 11


def test_keras_hubs_retinanet_label_encoder_takes_the_boxes():
    """keras-hub's RetinaNet encodes the padded boxes as they are: -1 rows match no anchor."""
    import keras

    encoder_module = pytest.importorskip("keras_hub.src.models.retinanet.retinanet_label_encoder")
    from keras_hub.layers import AnchorGenerator

    s = digit_scenes("train", 2, seed=5)
    anchors = AnchorGenerator("xyxy", min_level=3, max_level=5, num_scales=3, aspect_ratios=[0.5, 1.0, 2.0],
                              anchor_size=4)
    encoder = encoder_module.RetinaNetLabelEncoder(anchor_generator=anchors, bounding_box_format="xyxy")
    targets, classes = encoder(images=s["images"].astype(np.float32), gt_boxes=s["bounding_boxes"]["boxes"],
                               gt_classes=s["bounding_boxes"]["labels"])
    classes = keras.ops.convert_to_numpy(classes)
    assert not np.isnan(keras.ops.convert_to_numpy(targets)).any()
    positives = 0
    for i in range(2):
        present = set(s["bounding_boxes"]["labels"][i][s["bounding_boxes"]["labels"][i] >= 0])
        matched = set(classes[i][classes[i] >= 0].astype(int))
        assert matched <= present  # -1 is background, -2 ignored; every positive is a real digit
        positives += len(matched)
    assert positives > 0
