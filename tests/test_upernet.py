"""keras_convnext.upernet: UperNet (PPM + FPN decode head, auxiliary FCN head on P4) as a keras-hub
ImageSegmenter on a tiny ConvNeXtBackbone; its loss by hand, its gradients, saving, errors, and a short fit on
digit scenes."""

import inspect

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras_convnext as kc  # noqa: E402
from keras_convnext import hub, scenes  # noqa: E402
from keras_convnext.upernet import AdaptiveAveragePool, ResizeLike, UperNetImageSegmenter  # noqa: E402

from conftest import TINY  # noqa: E402

SIZE = 64
HEAD = dict(channels=16, aux_channels=8)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def perturb(model, seed=0):
    """Every variable moved off its initial value (fresh 1e-6 layer scales hide the blocks' gradients)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(numpy(v) + rng.normal(0.0, 0.05, v.shape).astype("float32"))
    return model


def segmenter(num_classes=scenes.NUM_CLASSES, **kwargs):
    backbone = hub.ConvNeXtBackbone(**TINY, image_shape=(SIZE, SIZE, 3))
    return UperNetImageSegmenter(backbone, num_classes, **{**HEAD, **kwargs})


def pixels(n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype("float32")


def masks(n=2, seed=1):
    return np.random.default_rng(seed).integers(0, scenes.NUM_CLASSES, size=(n, SIZE, SIZE)).astype("int32")


def cross_entropy(logits, labels):
    """Mean sparse categorical cross-entropy over every pixel, in float64 NumPy."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, labels[..., None], -1).mean())


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_outputs_are_the_main_logits_at_the_input_size_and_training_adds_the_auxiliary_ones():
    model = segmenter()
    assert isinstance(model, keras_hub.models.ImageSegmenter)
    assert len(model.outputs) == 1 and tuple(model.output.shape) == (None, SIZE, SIZE, scenes.NUM_CLASSES)
    x = keras.ops.convert_to_tensor(pixels())
    assert tuple(model(x).shape) == (2, SIZE, SIZE, scenes.NUM_CLASSES)
    logits, aux = model(x, training=True)
    assert tuple(logits.shape) == tuple(aux.shape) == (2, SIZE, SIZE, scenes.NUM_CLASSES)
    assert model.predict(pixels(), verbose=0).shape == (2, SIZE, SIZE, scenes.NUM_CLASSES)
    # The decode head's widths: PPM branches and FPN at `channels`, the auxiliary conv at `aux_channels`.
    assert model.get_layer("psp_6_conv").filters == model.get_layer("fpn_bottleneck_conv").filters == 16
    assert model.training_network.get_layer("aux_0_conv").filters == 8
    # The auxiliary head's variables are the task's (saved, trained), though off its inference graph.
    aux_paths = {v.path for v in model.training_network.get_layer("aux_0_conv").weights}
    assert aux_paths <= {v.path for v in model.trainable_weights}


# With weight 0 the auxiliary head gets no gradient, and Keras says so: the point of that half of the test.
@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_training_loss_is_main_plus_weighted_auxiliary_cross_entropy_and_evaluation_is_main_only():
    # No dropout: the training forward is then a function of the batch (BatchNorm uses the batch's statistics).
    model = perturb(segmenter(dropout=0.0))
    plain = UperNetImageSegmenter.from_config({**model.get_config(), "auxiliary_loss_weight": 0.0})
    plain.set_weights(model.get_weights())
    x, y = pixels(), masks()
    logits, aux = (numpy(t) for t in model(keras.ops.convert_to_tensor(x), training=True))
    main_ce, aux_ce = cross_entropy(logits, y), cross_entropy(aux, y)
    assert abs(aux_ce - main_ce) > 1e-3  # the two heads differ, so the weights below show

    losses = {}
    for weight, task in ((0.4, model), (0.0, plain)):
        # Learning rate 0: the step's loss is the loss at these weights, and they stay the same.
        task.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=sparse_ce(), metrics=[])
        train = task.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False).history["loss"][-1]
        np.testing.assert_allclose(train, main_ce + weight * aux_ce, rtol=1e-5, atol=1e-5)
        # Evaluation: the inference forward (BatchNorm's moving statistics, as the step left them), main only.
        eval_ce = cross_entropy(numpy(task(keras.ops.convert_to_tensor(x))), y)
        evaluation = task.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
        np.testing.assert_allclose(evaluation["loss"], eval_ce, rtol=1e-5, atol=1e-5)
        losses[weight] = train
    assert losses[0.4] - losses[0.0] > 0.1
    assert model.predict(x, verbose=0).shape == (2, SIZE, SIZE, scenes.NUM_CLASSES)  # no auxiliary output


def test_one_sgd_step_moves_every_trainable_variable():
    model = perturb(segmenter())
    before = {v.path: numpy(v).copy() for v in model.trainable_weights}
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss=sparse_ce(), metrics=[])
    model.fit(pixels(), masks(), batch_size=2, epochs=1, verbose=0, shuffle=False)
    still = {v.path for v in model.trainable_weights if np.array_equal(numpy(v), before[v.path])}
    # P2's and P3's pyramid-norm betas add a per-channel constant that the laterals' 1x1 conv + BatchNorm
    # (training) subtract again: their true gradient is 0 (float rounding may move them). P4's and P5's reach
    # 3x3 convs (auxiliary head, PPM bottleneck) whose zero padding breaks the constant, so they move.
    assert still <= {"norm0/beta", "norm1/beta"}, still
    assert len(before) == len(model.trainable_weights) > 100


@pytest.mark.parametrize("size", [2, 7, 13])
def test_adaptive_pool_matches_pytorchs_bins(size):
    x = np.random.default_rng(size).normal(size=(2, size, size + 3, 5)).astype("float32")
    for bins in (1, 2, 3, 6):
        want = np.empty((2, bins, bins, 5), np.float64)
        edges = lambda n: [(i * n // bins, -(-(i + 1) * n // bins)) for i in range(bins)]  # noqa: E731
        for i, (h0, h1) in enumerate(edges(size)):
            for j, (w0, w1) in enumerate(edges(size + 3)):
                want[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
        got = numpy(AdaptiveAveragePool(bins)(keras.ops.convert_to_tensor(x)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"bins={bins}")


@pytest.mark.parametrize("source, target", [(2, 5), (5, 10), (4, 16), (3, 7)])
def test_resize_matrices_match_bilinear_resize(source, target):
    # The weight matrices serve TensorFlow graphs of unknown size; elsewhere ops.image.resize does the work.
    layer = ResizeLike()
    x = keras.ops.convert_to_tensor(np.random.default_rng(source).normal(size=(2, source, source + 1, 3)), "float32")
    want = numpy(layer(x, keras.ops.zeros((2, target, target + 2, 1))))
    rows = keras.ops.einsum("ih,nhwc->niwc", layer._matrix(source, target), x)
    got = numpy(keras.ops.einsum("jw,niwc->nijc", layer._matrix(source + 1, target + 2), rows))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_input_sizes_not_multiples_of_32_predict_and_train():
    model = UperNetImageSegmenter(hub.ConvNeXtBackbone(**TINY), 3, channels=8, aux_channels=8)
    model.compile(optimizer="sgd", loss=sparse_ce(), metrics=[])
    x = np.random.default_rng(0).normal(size=(2, 80, 80, 3)).astype("float32")  # P5 2x2, P4 5x5: FPN sizes differ
    assert model.predict(x, verbose=0).shape == (2, 80, 80, 3)
    assert np.isfinite(model.fit(x, np.zeros((2, 80, 80), "int32"), verbose=0).history["loss"][-1])


def test_keras_file_round_trip_gives_bit_exact_predictions(tmp_path):
    model = perturb(segmenter(seed=3))
    path = str(tmp_path / "upernet.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is UperNetImageSegmenter and loaded.get_config() == model.get_config()
    x = keras.ops.convert_to_tensor(pixels())
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(model(x)))
    # The auxiliary head travels too.
    np.testing.assert_array_equal(numpy(loaded(x, training=True)[1]), numpy(model(x, training=True)[1]))


def test_config_is_exactly_the_constructor_arguments_and_round_trips():
    model = segmenter(num_classes=5, auxiliary_loss_weight=0.25, dropout=0.2, pool_scales=(1, 3), seed=7)
    config = model.get_config()
    params = set(inspect.signature(UperNetImageSegmenter).parameters) - {"kwargs"}
    assert set(config) == params | {"name"}
    assert {k: config[k] for k in ("num_classes", "auxiliary_loss_weight", "channels", "aux_channels", "dropout",
                                   "pool_scales", "seed")} == dict(
        num_classes=5, auxiliary_loss_weight=0.25, channels=16, aux_channels=8, dropout=0.2, pool_scales=[1, 3],
        seed=7)
    clone = UperNetImageSegmenter.from_config(dict(config))  # a copy: Task.from_config replaces its backbone
    assert clone.get_config() == config and clone.count_params() == model.count_params()
    assert [layer.name for layer in clone.training_network.layers] == [
        layer.name for layer in model.training_network.layers]


@pytest.mark.parametrize("kwargs, received", [
    (dict(num_classes=0), "num_classes=0"),
    (dict(num_classes=2.0), "num_classes=2.0"),
    (dict(auxiliary_loss_weight=-0.4), "auxiliary_loss_weight=-0.4"),
    (dict(channels=0), "channels=0"),
    (dict(aux_channels=True), "aux_channels=True"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(pool_scales=()), "pool_scales=()"),
    (dict(pool_scales=(1, 2, 2)), "pool_scales=(1, 2, 2)"),
    (dict(pool_scales=(0, 1)), "pool_scales=(0, 1)"),
    (dict(seed=-1), "seed=-1"),
    (dict(backbone="convnext"), "backbone=str"),
])
def test_argument_errors_are_one_line_ending_with_the_received_value(kwargs, received):
    args = dict(backbone=hub.ConvNeXtBackbone(**TINY), num_classes=3, **HEAD)
    with pytest.raises(ValueError) as info:
        UperNetImageSegmenter(**{**args, **kwargs})
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.endswith(f"Received: {received}"), message


def test_a_backbone_without_the_four_levels_is_refused():
    backbone = keras_hub.models.Backbone(inputs=(i := keras.Input((SIZE, SIZE, 3))), outputs=keras.layers.Conv2D(
        4, 3)(i))
    with pytest.raises(ValueError, match="P2..P5. Received: backbone=Backbone$"):
        UperNetImageSegmenter(backbone, 3)


def _mean_iou(labels, predictions):
    metric = keras.metrics.MeanIoU(num_classes=scenes.NUM_CLASSES)
    metric.update_state(labels.reshape(-1), predictions.reshape(-1))
    return float(metric.result())


def test_a_short_fit_on_digit_scenes_beats_the_all_background_baseline():
    # A fit check, not a generalisation one: 32 scenes learnt (the tiny backbone, from scratch, at this budget,
    # stays near the baseline on held-out "test" scenes, which is printed alongside).
    scene_args = dict(image_size=SIZE, digit_size=(20, 32), max_digits=3)
    train = scenes.digit_scenes("train", 32, **scene_args)
    test = scenes.digit_scenes("test", 32, **scene_args)
    prepare = lambda s: kc.normalize_pixels(s["images"].astype("float32"))  # noqa: E731
    model = segmenter(channels=32, aux_channels=16, seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.05), loss=sparse_ce(),
                  metrics=[])
    x, y = prepare(train), train["segmentation_masks"]
    model.fit(x, y, batch_size=8, epochs=30, verbose=0, shuffle=True)
    baseline = _mean_iou(y, np.zeros_like(y))
    miou = _mean_iou(y, numpy(model.predict(x, batch_size=32, verbose=0)).argmax(-1))
    held_out = _mean_iou(test["segmentation_masks"], numpy(model.predict(prepare(test), verbose=0)).argmax(-1))
    held_out_baseline = _mean_iou(test["segmentation_masks"], np.zeros_like(test["segmentation_masks"]))
    print(f"digit scenes mIoU: {miou:.3f} on the 32 training scenes (all-background {baseline:.3f}); "
          f"held out {held_out:.3f} (all-background {held_out_baseline:.3f})")
    assert miou > 3 * baseline and miou > baseline + 0.2, (miou, baseline)
