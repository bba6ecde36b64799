"""COCO detection and ADE20K segmentation pipelines: the per-example transforms against NumPy on
constructed examples, and the whole pipelines on `tfds.testing.mock_data` (tiny sizes)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_convnext import dense_data
from keras_convnext.dense_data import (
    IGNORE_INDEX,
    ade20k_segmentation,
    coco_detection,
    detection_transform,
    photometric_distortion,
    rescale_size,
    segmentation_eval_transform,
    segmentation_train_transform,
)

SEED = tf.constant([1, 2], tf.int64)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


# ---- detection, one example ----------------------------------------------------------------------

def test_detection_transform_resizes_flips_and_pads_a_known_case():
    image = _image(40, 80)
    boxes = np.array([[0.25, 0.1, 0.5, 0.3],  # normalised yxyx
                      [0.5, 0.5, 0.5, 0.9]], np.float32)  # no height: dropped
    labels = np.array([3, 4])
    plain, plain_targets = detection_transform(image, boxes, labels, SEED, image_size=32, max_boxes=3, flip_prob=0.0)
    flipped, targets = detection_transform(image, boxes, labels, SEED, image_size=32, max_boxes=3, flip_prob=1.0)
    assert plain.dtype == tf.float32 and tuple(plain.shape) == (32, 32, 3)
    # 40x80 fits 32x32 at 0.4: 16x32 of image, then 16 rows of zero padding.
    expected = tf.image.resize(image.astype(np.float32), (16, 32)).numpy()
    np.testing.assert_allclose(plain.numpy()[:16], expected, atol=1e-4)
    assert (plain.numpy()[16:] == 0).all() and (flipped.numpy()[16:] == 0).all()
    np.testing.assert_array_equal(flipped.numpy()[:16], plain.numpy()[:16, ::-1])
    # x: 0.1 * 32 = 3.2, 0.3 * 32 = 9.6; y: 0.25 * 16 = 4, 0.5 * 16 = 8; flipped x -> 32 - x.
    np.testing.assert_allclose(plain_targets["boxes"].numpy(), [[3.2, 4, 9.6, 8], [-1] * 4, [-1] * 4], rtol=1e-6)
    np.testing.assert_allclose(targets["boxes"].numpy(), [[22.4, 4, 28.8, 8], [-1] * 4, [-1] * 4], rtol=1e-6)
    np.testing.assert_array_equal(targets["labels"].numpy(), [3, -1, -1])
    assert targets["labels"].dtype == tf.int32 and targets["boxes"].dtype == tf.float32
    # The flipped box covers the flipped pixels: paint the box into the image and flip.
    painted = np.zeros((40, 80, 3), np.uint8)
    painted[10:20, 8:24] = 255  # rows 0.25..0.5 of 40, columns 0.1..0.3 of 80
    out, _ = detection_transform(painted, boxes[:1], labels[:1], SEED, image_size=32, flip_prob=1.0)
    ys, xs = np.nonzero(out.numpy()[..., 0] > 127)
    # The bright pixels' edges lie within a pixel of the box's (bilinear blurs the partly covered edge pixels).
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], targets["boxes"].numpy()[0], atol=0.61)


def test_detection_box_formats_and_truncation():
    image = _image(64, 32)
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 1.0], [0.1, 0.1, 0.2, 0.2]], np.float32)
    labels = np.array([0, 1, 2])
    # 64x32 fits 32x48 (H, W) at 0.5: 32x16.
    _, xyxy = detection_transform(image, boxes, labels, SEED, image_size=(32, 48), max_boxes=2, flip_prob=0.0)
    np.testing.assert_allclose(xyxy["boxes"].numpy(), [[0, 0, 8, 16], [4, 16, 16, 32]])
    np.testing.assert_array_equal(xyxy["labels"].numpy(), [0, 1])  # the third box is cut at max_boxes
    _, yxyx = detection_transform(image, boxes, labels, SEED, image_size=(32, 48), max_boxes=2, flip_prob=0.0,
                                  bounding_box_format="yxyx")
    np.testing.assert_allclose(yxyx["boxes"].numpy(), [[0, 0, 16, 8], [16, 4, 32, 16]])
    _, rel = detection_transform(image, boxes, labels, SEED, image_size=(32, 48), max_boxes=4, flip_prob=0.0,
                                 bounding_box_format="rel_xyxy")
    np.testing.assert_allclose(rel["boxes"].numpy()[:2], [[0, 0, 8 / 48, 16 / 32], [4 / 48, 16 / 32, 16 / 48, 1]],
                               rtol=1e-6)
    assert (rel["boxes"].numpy()[3] == -1).all() and rel["labels"].numpy()[3] == -1


# ---- segmentation, one example -------------------------------------------------------------------

def _labelled(h, w, seed=0):
    """An image whose red channel is its label map: any geometric slip between the two shows."""
    labels = np.random.default_rng(seed).integers(0, 150, (h, w)).astype(np.int32)
    image = np.stack([labels, np.tile(np.arange(w) * 5, (h, 1)), np.full((h, w), 7)], axis=-1).astype(np.uint8)
    return image, labels


# scale (24, 16) on a 16x24 image with ratio 1: an identity resize, so the result is known exactly.
IDENTITY = dict(scale=(24, 16), ratio_range=(1.0, 1.0), photometric=False)


def test_flip_moves_image_and_labels_together():
    image, labels = _labelled(16, 24)
    out, mask = segmentation_train_transform(image, labels, SEED, crop_size=(16, 24), flip_prob=1.0, **IDENTITY)
    np.testing.assert_array_equal(out.numpy(), image[:, ::-1].astype(np.float32))
    np.testing.assert_array_equal(mask.numpy(), labels[:, ::-1])
    assert out.dtype == tf.float32 and mask.dtype == tf.int32
    same, same_mask = segmentation_train_transform(image, labels[..., None], SEED, crop_size=(16, 24), flip_prob=0.0,
                                                   **IDENTITY)
    np.testing.assert_array_equal(same_mask.numpy(), labels)
    np.testing.assert_array_equal(same.numpy(), image.astype(np.float32))
    # A smaller crop: a window of the flipped pair, the same window in both.
    for seed in range(4):
        out, mask = segmentation_train_transform(image, labels, tf.constant([seed, 9]), crop_size=(8, 8), flip_prob=1.0,
                                                 **IDENTITY)
        np.testing.assert_array_equal(out.numpy()[..., 0], mask.numpy())
        flipped = labels[:, ::-1]
        windows = [(y, x) for y in range(9) for x in range(17)
                   if np.array_equal(flipped[y:y + 8, x:x + 8], mask.numpy())]
        assert windows
        y, x = windows[0]
        np.testing.assert_array_equal(out.numpy(), image[:, ::-1][y:y + 8, x:x + 8].astype(np.float32))


def test_crop_pads_a_small_image_with_zero_and_the_ignore_label():
    image, labels = _labelled(6, 8)
    out, mask = segmentation_train_transform(image, labels, SEED, crop_size=(10, 12), scale=(8, 6),
                                             ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    assert tuple(out.shape) == (10, 12, 3) and tuple(mask.shape) == (10, 12)
    np.testing.assert_array_equal(out.numpy()[:6, :8], image.astype(np.float32))
    np.testing.assert_array_equal(mask.numpy()[:6, :8], labels)
    assert (out.numpy()[6:] == 0).all() and (out.numpy()[:, 8:] == 0).all()
    assert (mask.numpy()[6:] == IGNORE_INDEX).all() and (mask.numpy()[:, 8:] == IGNORE_INDEX).all()


def test_random_resize_follows_mmcv_within_the_ratio_range():
    labels = np.ones((16, 16), np.int32)
    image = np.full((16, 16, 3), 100, np.uint8)
    sides = set()
    for seed in range(12):
        _, mask = segmentation_train_transform(image, labels, tf.constant([seed, 0]), crop_size=(40, 40),
                                               scale=(32, 16), ratio_range=(0.5, 2.0), flip_prob=0.0,
                                               photometric=False)
        valid = mask.numpy() != IGNORE_INDEX
        h, w = valid.any(axis=1).sum(), valid.any(axis=0).sum()
        # target floor((32, 16) * r); factor min(floor(32r) / 16, floor(16r) / 16): a square of floor(16r).
        assert h == w and 8 <= h <= 32 and valid.sum() == h * w
        sides.add(int(h))
    assert len(sides) >= 4  # the ratio is drawn per example


@pytest.mark.parametrize("size, scale, expected", [
    ((512, 683), (2048, 512), (512, 683)),
    ((300, 400), (2048, 512), (512, 683)),  # int(400 * 512 / 300 + 0.5) = 683
    ((100, 1000), (2048, 512), (205, 2048)),  # the long side caps it: 2048 / 1000
    ((1000, 100), (2048, 512), (2048, 205)),
    ((40, 20), (32, 16), (32, 16)),
])
def test_rescale_size_is_mmcvs(size, scale, expected):
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    assert (int(h * factor + 0.5), int(w * factor + 0.5)) == expected  # mmcv.rescale_size, by hand
    got = rescale_size(h, w, tf.constant(scale, tf.float32))
    assert (int(got[0]), int(got[1])) == expected


def test_eval_transform_keeps_the_ratio():
    image, labels = _labelled(24, 32)
    out, mask = segmentation_eval_transform(image, labels, scale=(64, 16))
    assert tuple(out.shape) == (16, 21, 3) and tuple(mask.shape) == (16, 21)
    assert set(np.unique(mask.numpy())) <= set(np.unique(labels))  # nearest: no invented classes


def test_photometric_distortion_is_seeded_and_stays_in_range():
    image = tf.constant(_image(8, 8).astype(np.float32))
    outs = [photometric_distortion(image, tf.constant([s, 1], tf.int64)).numpy() for s in range(8)]
    np.testing.assert_array_equal(outs[0], photometric_distortion(image, tf.constant([0, 1], tf.int64)).numpy())
    assert all(o.shape == (8, 8, 3) and o.min() >= 0 and o.max() <= 255 for o in outs)
    changed = [not np.allclose(o, image.numpy(), atol=1e-3) for o in outs]
    assert any(changed) and len({o.tobytes() for o in outs}) >= 6


# ---- whole pipelines on TFDS mock data -----------------------------------------------------------

COCO = [  # (image size, normalised yxyx boxes, labels, crowd)
    ((40, 80), [[0.25, 0.1, 0.5, 0.3], [0.0, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.9]], [3, 7, 1], [0, 1, 0]),
    ((64, 32), [[0.1 * i, 0.05 * i, 0.1 * i + 0.3, 0.05 * i + 0.5] for i in range(6)], [0, 1, 2, 3, 4, 5], [0] * 6),
    ((20, 20), np.zeros((0, 4)), [], []),
]


def _coco_as_dataset(self, split, **kwargs):
    def examples():
        for i, (size, boxes, labels, crowd) in enumerate(COCO):
            n = len(labels)
            yield {"image": _image(*size, seed=i), "image/filename": f"{i}.jpg", "image/id": i,
                   "objects": {"id": np.arange(n), "area": np.ones(n, np.int64),
                               "bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
                               "label": np.asarray(labels, np.int64),
                               "is_crowd": np.asarray(crowd, bool)}}

    return tf.data.Dataset.from_generator(examples, output_types=self.info.features.dtype,
                                          output_shapes=self.info.features.shape)


def _expected_coco_boxes(i, size, flip=False):
    """NumPy: the non-crowd, non-empty boxes of example i, in xyxy pixels of the `size` canvas."""
    (h, w), boxes, labels, crowd = COCO[i]
    scale = min(size / h, size / w)
    nh, nw = round(h * scale), round(w * scale)
    out = []
    for box, label, c in zip(np.asarray(boxes).reshape(-1, 4), labels, crowd):
        y0, x0, y1, x1 = box * [nh, nw, nh, nw]
        if flip:
            x0, x1 = nw - x1, nw - x0
        if not c and x1 > x0 and y1 > y0:
            out.append(([x0, y0, x1, y1], label))
    return out, (nh, nw)


def test_coco_evaluation_pipeline_on_mock_data():
    with tfds.testing.mock_data(as_dataset_fn=_coco_as_dataset):
        ds = coco_detection("validation", image_size=32, batch_size=2, max_boxes=4)
        batches = list(ds)
    assert [int(b[0].shape[0]) for b in batches] == [2, 1]  # evaluation keeps the last partial batch
    images = np.concatenate([b[0].numpy() for b in batches])
    boxes = np.concatenate([b[1]["boxes"].numpy() for b in batches])
    labels = np.concatenate([b[1]["labels"].numpy() for b in batches])
    assert images.dtype == np.float32 and images.shape == (3, 32, 32, 3)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4, 4) and labels.dtype == np.int32
    for i in range(3):
        expected, (nh, nw) = _expected_coco_boxes(i, 32)
        expected = expected[:4]  # max_boxes
        count = len(expected)
        np.testing.assert_allclose(boxes[i, :count], [b for b, _ in expected] or np.zeros((0, 4)), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(labels[i, :count], [lab for _, lab in expected])
        assert (boxes[i, count:] == -1).all() and (labels[i, count:] == -1).all()
        assert (images[i, nh:] == 0).all() and (images[i, :, nw:] == 0).all()  # padded below and right
        assert images[i, :nh, :nw].std() > 10  # the image itself
    assert [int((labels[i] >= 0).sum()) for i in range(3)] == [1, 4, 0]  # crowd, empty and surplus boxes gone


def test_coco_training_pipeline_flips_boxes_inside_the_canvas():
    with tfds.testing.mock_data(as_dataset_fn=_coco_as_dataset):
        first = list(coco_detection("train", image_size=32, batch_size=3, max_boxes=4, seed=5))
        again = list(coco_detection("train", image_size=32, batch_size=3, max_boxes=4, seed=5))
    assert len(first) == 1
    images, targets = first[0]
    np.testing.assert_array_equal(images.numpy(), again[0][0].numpy())  # one seed, one stream of draws
    np.testing.assert_array_equal(targets["boxes"].numpy(), again[0][1]["boxes"].numpy())
    boxes, labels = targets["boxes"].numpy(), targets["labels"].numpy()
    assert images.shape == (3, 32, 32, 3) and boxes.shape == (3, 4, 4)
    by_count = {int((labels[j] >= 0).sum()): j for j in range(3)}  # shuffled: find each example by its box count
    assert sorted(by_count) == [0, 1, 4]
    for i, count in ((0, 1), (1, 4), (2, 0)):
        j = by_count[count]
        valid = boxes[j, :count]
        assert (valid[:, 0] >= 0).all() and (valid[:, 2] <= 32).all() and (valid[:, 1] >= 0).all()
        assert (valid[:, 3] <= 32).all() and (valid[:, 2] > valid[:, 0]).all() and (valid[:, 3] > valid[:, 1]).all()
        options = [np.array([b for b, _ in _expected_coco_boxes(i, 32, flip)[0][:4]]).reshape(-1, 4)
                   for flip in (False, True)]
        assert any(np.allclose(valid, o, atol=1e-5) for o in options)  # flipped or not, with the image
        nh, nw = _expected_coco_boxes(i, 32)[1]
        plain = tf.image.resize(_image(*COCO[i][0], seed=i).astype(np.float32), (nh, nw)).numpy()
        crop = images.numpy()[j, :nh, :nw]
        flipped = np.allclose(valid, options[1], atol=1e-5) and not np.allclose(valid, options[0], atol=1e-5)
        if count and flipped:
            np.testing.assert_allclose(crop, plain[:, ::-1], atol=1e-3)
        elif count:
            np.testing.assert_allclose(crop, plain, atol=1e-3)


def test_coco_training_pipeline_with_a_sure_flip_matches_numpy():
    with tfds.testing.mock_data(as_dataset_fn=_coco_as_dataset):
        images, targets = next(iter(coco_detection("train", image_size=32, batch_size=3, max_boxes=4, flip_prob=1.0)))
    labels = targets["labels"].numpy()
    for j in range(3):
        count = int((labels[j] >= 0).sum())
        i = {1: 0, 4: 1, 0: 2}[count]
        expected, (nh, nw) = _expected_coco_boxes(i, 32, flip=True)
        expected_boxes = np.reshape([b for b, _ in expected[:4]], (-1, 4))
        np.testing.assert_allclose(targets["boxes"].numpy()[j, :count], expected_boxes, atol=1e-5)
        plain = tf.image.resize(_image(*COCO[i][0], seed=i).astype(np.float32), (nh, nw)).numpy()
        np.testing.assert_allclose(images.numpy()[j, :nh, :nw], plain[:, ::-1], atol=1e-3)
        assert (images.numpy()[j, nh:] == 0).all() and (images.numpy()[j, :, nw:] == 0).all()  # padding not flipped


ADE = [(24, 32), (40, 20), (12, 12)]


def _ade_as_dataset(self, split, **kwargs):
    def examples():
        for i, (h, w) in enumerate(ADE):
            annotation = np.random.default_rng(i).integers(0, 151, (h, w)).astype(np.uint8)
            annotation[0, 0] = 0  # "other": ignored after reduce_zero_label
            yield {"image": _image(h, w, seed=i), "annotation": np.repeat(annotation[..., None], 3, axis=-1)}

    return tf.data.Dataset.from_generator(examples, output_types=self.info.features.dtype,
                                          output_shapes=self.info.features.shape)


def test_ade20k_training_pipeline_on_mock_data():
    with tfds.testing.mock_data(as_dataset_fn=_ade_as_dataset):
        batches = list(ade20k_segmentation("train", crop_size=(16, 16), batch_size=2, scale=(32, 16), seed=3))
        again = list(ade20k_segmentation("train", crop_size=(16, 16), batch_size=2, scale=(32, 16), seed=3))
    assert len(batches) == 1  # training drops the partial batch
    images, labels = batches[0]
    assert images.dtype == tf.float32 and tuple(images.shape) == (2, 16, 16, 3)
    assert labels.dtype == tf.int32 and tuple(labels.shape) == (2, 16, 16)
    np.testing.assert_array_equal(images.numpy(), again[0][0].numpy())
    np.testing.assert_array_equal(labels.numpy(), again[0][1].numpy())
    values = set(np.unique(labels.numpy()))
    assert values <= set(range(150)) | {IGNORE_INDEX} and len(values) > 2
    assert 0 <= images.numpy().min() and images.numpy().max() <= 255


def test_ade20k_evaluation_pipeline_on_mock_data():
    with tfds.testing.mock_data(as_dataset_fn=_ade_as_dataset):
        batches = list(ade20k_segmentation("test", batch_size=2, scale=(32, 16)))
        raw = list(ade20k_segmentation("test", batch_size=1, scale=(32, 16), reduce_zero_label=False))
    # (24, 32) -> (16, 21) and (40, 20) -> (32, 16): padded together to (32, 21).
    images, labels = batches[0]
    assert tuple(images.shape) == (2, 32, 21, 3) and tuple(labels.shape) == (2, 32, 21)
    assert (images.numpy()[0, 16:] == 0).all() and (labels.numpy()[0, 16:] == IGNORE_INDEX).all()
    assert (labels.numpy()[1, :, 16:] == IGNORE_INDEX).all() and (images.numpy()[1, :, 16:] == 0).all()
    assert tuple(batches[1][0].shape) == (1, 16, 16, 3)  # (12, 12) -> short side 16
    # reduce_zero_label: TFDS's c -> c - 1 and 0 -> 255, on the same nearest-resized pixels.
    reduced, plain = batches[0][1].numpy()[0, :16], raw[0][1].numpy()[0]
    assert tuple(plain.shape) == (16, 21) and plain.max() <= 150
    np.testing.assert_array_equal(reduced, np.where(plain == 0, IGNORE_INDEX, plain - 1))


def test_ade20k_pipeline_on_random_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=2):  # TFDS's random examples, images and labels of unrelated sizes
        images, labels = next(iter(ade20k_segmentation("train", crop_size=8, batch_size=2, scale=(16, 8))))
    assert tuple(images.shape) == (2, 8, 8, 3) and tuple(labels.shape) == (2, 8, 8)


@pytest.mark.parametrize("call, message", [
    (lambda: coco_detection(image_size=0),
     r"`image_size` must be a positive integer or a pair of them\. Received: image_size=0"),
    (lambda: coco_detection(bounding_box_format="xywh"), r"Received: bounding_box_format='xywh'"),
    (lambda: coco_detection(max_boxes=0), r"`max_boxes` must be at least 1\. Received: max_boxes=0"),
    (lambda: coco_detection(flip_prob=1.5), r"`flip_prob` must be in \[0\.0, 1\.0\]\. Received: flip_prob=1\.5"),
    (lambda: coco_detection(training="yes"), r"`training` must be True or False\. Received: training='yes'"),
    (lambda: ade20k_segmentation(crop_size=(512,)), r"Received: crop_size=\(512,\)"),
    (lambda: ade20k_segmentation(ratio_range=(2.0, 0.5)), r"`ratio_range` must be \(low, high\) with 0 < low <= high\. "
                                                          r"Received: ratio_range=\(2\.0, 0\.5\)"),
    (lambda: ade20k_segmentation(batch_size=0), r"Received: batch_size=0"),
    (lambda: ade20k_segmentation(split=None), r"Received: split=None"),
    (lambda: segmentation_train_transform(np.zeros((4, 4, 3)), np.zeros((4, 4)), SEED, crop_size=(4, True)),
     r"Received: crop_size=\(4, True\)"),
], ids=["image_size", "box_format", "max_boxes", "flip_prob", "training", "crop_size", "ratio_range", "batch_size",
        "split", "crop_size_bool"])
def test_bad_arguments_name_the_value(call, message):
    """Each one a one-line ValueError naming the argument and quoting it, raised before any data is read."""
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_constants():
    assert (dense_data.ADE20K_CLASSES, dense_data.IGNORE_INDEX, dense_data.COCO_CLASSES) == (150, 255, 80)
