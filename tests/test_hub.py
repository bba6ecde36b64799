"""keras_convnext.hub: ConvNeXt as a keras-hub FeaturePyramidBackbone, ImageClassifier and presets, and
keras-hub's dense tasks (DeepLabV3, RetinaNet) trained one step on it. Tiny models (conftest.TINY)."""

import importlib.util
import inspect
import os
import sys

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras_convnext as kc  # noqa: E402
from keras_convnext import cli, hub  # noqa: E402

from conftest import TINY  # noqa: E402

STRIDES = {"P2": 4, "P3": 8, "P4": 16, "P5": 32}


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def call(model, x):
    """A direct (eager) call: no per-model compilation, which dominates predict's time on tiny models."""
    return keras.tree.map_structure(numpy, model(keras.ops.convert_to_tensor(x)))


def classify(task, x):
    """A keras-hub task's predict without its compilation: its preprocessor, then the model, eagerly."""
    return call(task, numpy(task.preprocessor(keras.ops.convert_to_tensor(x))))


def pixels(n=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, size, size, 3)).astype("float32")


def perturb(model, seed=0):
    """Every variable moved off its initial value, so that a copy or a round trip that loses one shows."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(numpy(v) + rng.normal(0.0, 0.05, v.shape).astype("float32"))
    return model


def convnext(version=1, classes=5, size=32, **kwargs):
    build = kc.ConvNeXtV2 if version == 2 else kc.ConvNeXt
    return perturb(build(**TINY, weights=None, input_shape=(size, size, 3), classes=classes,
                         classifier_activation=None, **kwargs))


def pyramid_model(backbone):
    # dict(): Keras's attribute tracking makes `pyramid_outputs` a TrackedDict (as on keras-hub's own backbones),
    # which JAX's jitted predict cannot return.
    return keras.Model(backbone.inputs, dict(backbone.pyramid_outputs))


# --- the backbone -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [1, 2])
def test_pyramid_levels_strides_and_channels(version):
    backbone = hub.ConvNeXtBackbone(**TINY, version=version)
    assert isinstance(backbone, keras_hub.models.FeaturePyramidBackbone)
    assert list(backbone.pyramid_outputs) == ["P2", "P3", "P4", "P5"]
    x = pixels(size=64)
    out = call(pyramid_model(backbone), x)
    for (level, stride), dim in zip(STRIDES.items(), TINY["dims"]):
        assert out[level].shape == (2, 64 // stride, 64 // stride, dim), level
    # The model's output is the last stage's map before its pyramid norm (what the classifier pools).
    last = call(backbone, x)
    assert last.shape == (2, 2, 2, TINY["dims"][-1])
    mean, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
    np.testing.assert_allclose(out["P5"], (last - mean) / np.sqrt(var + 1e-6), atol=1e-4)
    # The pyramid's norms are the model's own variables (saved and trained with it), off the output's path.
    paths = {v.path for v in backbone.weights}
    assert {f"norm{i}/{p}" for i in range(4) for p in ("gamma", "beta")} <= paths
    assert backbone.get_layer("stages_0").grn == (version == 2)


def test_backbone_holds_the_source_models_stage_weights_and_gives_its_stage_outputs_bit_exact():
    model = convnext(include_preprocessing=False)
    backbone = hub.ConvNeXtBackbone.from_convnext(model)
    source = hub._official_variables(model)
    copied = hub._official_variables(backbone)
    stage_keys = [k for k in copied if not k.startswith("norm")]
    assert stage_keys and set(stage_keys) == {k for k in source if k.split(".")[0] not in ("norm", "head")}
    for key in stage_keys:
        np.testing.assert_array_equal(numpy(copied[key]), numpy(source[key]), err_msg=key)
    x = kc.normalize_pixels(pixels())
    theirs = call(kc.feature_pyramid(model, norm=False), x)
    ours = call(keras.Model(backbone.inputs, [stage.output for stage in backbone.stages]), x)
    for level, got in zip(STRIDES, ours):
        np.testing.assert_array_equal(got, theirs[level], err_msg=level)


def test_pyramid_norms_start_at_identity_from_a_classification_model():
    backbone = hub.ConvNeXtBackbone.from_convnext(convnext())
    # A classifier has no norm0..3: they start at gamma 1, beta 0, as the official dense backbones' do.
    for norm, dim in zip(backbone.pyramid_norms, TINY["dims"]):
        np.testing.assert_array_equal(numpy(norm.gamma), np.ones(dim, "float32"))
        np.testing.assert_array_equal(numpy(norm.beta), np.zeros(dim, "float32"))


def test_config_is_exactly_the_constructor_arguments_and_round_trips():
    for version in (1, 2):
        backbone = hub.ConvNeXtBackbone(**TINY, version=version, drop_path_rate=0.1, image_shape=(64, 64, 3),
                                        norm_epsilon=1e-5)
        config = backbone.get_config()
        params = set(inspect.signature(hub.ConvNeXtBackbone).parameters) - {"kwargs"}
        assert set(config) == params | {"name", "trainable"}
        assert config["layer_scale_init_value"] == (None if version == 2 else 1e-6)  # "auto", resolved
        clone = hub.ConvNeXtBackbone.from_config(config)
        assert clone.get_config() == config
        assert clone.count_params() == backbone.count_params()
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(backbone))
        assert type(restored) is hub.ConvNeXtBackbone and restored.get_config() == config
    classifier = hub.ConvNeXtImageClassifier(hub.ConvNeXtBackbone(**TINY), num_classes=3, norm_epsilon=1e-12)
    config = classifier.get_config()
    assert config["norm_epsilon"] == 1e-12 and config["num_classes"] == 3
    clone = hub.ConvNeXtImageClassifier.from_config(config)
    assert clone.get_config()["norm_epsilon"] == 1e-12 and clone.count_params() == classifier.count_params()


# --- the classifier -----------------------------------------------------------------------------

@pytest.mark.parametrize("version", [1, 2])
def test_classifier_gives_the_keras_convnext_models_logits(version):
    model = convnext(version)
    classifier = hub.ConvNeXtImageClassifier.from_convnext(model)
    assert isinstance(classifier, keras_hub.models.ImageClassifier)
    assert isinstance(classifier.preprocessor, hub.ConvNeXtImageClassifierPreprocessor)
    x = pixels()
    ours = numpy(model.predict(x, verbose=0))
    # Raw [0, 255] pixels: the preprocessor's ImageConverter does what the model's preprocessing layer does.
    np.testing.assert_allclose(classifier.predict(x, verbose=0), ours, rtol=1e-5, atol=1e-5)
    # And without the preprocessor, on the normalised pixels.
    classifier.preprocessor = None
    np.testing.assert_allclose(classifier.predict(kc.normalize_pixels(x), verbose=0), ours, rtol=1e-5, atol=1e-5)


def test_image_converter_carries_a_presets_statistics():
    preset = kc.get_preset("convnext_tiny.fb_in22k_ft_in1k")
    converter = hub.ConvNeXtImageConverter.for_preset(preset.name)
    assert converter.image_size == (224, 224) and converter.interpolation == preset.interpolation
    np.testing.assert_allclose(converter.scale, [1 / (255 * s) for s in preset.std])
    np.testing.assert_allclose(converter.offset, [-m / s for m, s in zip(preset.mean, preset.std)])
    x = pixels(size=224)
    np.testing.assert_allclose(numpy(converter(x)), kc.normalize_pixels(x), rtol=1e-5, atol=1e-5)


# --- presets ------------------------------------------------------------------------------------

def test_backbone_preset_round_trip_is_bit_exact(tmp_path):
    backbone = perturb(hub.ConvNeXtBackbone(**TINY))  # norm0..3 too: they must travel
    backbone.save_to_preset(str(tmp_path))
    assert {"config.json", "model.weights.h5", "metadata.json"} <= set(os.listdir(tmp_path))
    loaded = keras_hub.models.Backbone.from_preset(str(tmp_path))
    assert type(loaded) is hub.ConvNeXtBackbone and loaded.get_config() == backbone.get_config()
    x = pixels(size=64)
    want, got = call(pyramid_model(backbone), x), call(pyramid_model(loaded), x)
    for level in STRIDES:
        np.testing.assert_array_equal(got[level], want[level], err_msg=level)
    np.testing.assert_array_equal(call(loaded, x), call(backbone, x))


def test_classifier_preset_round_trip_is_bit_exact(tmp_path):
    classifier = hub.ConvNeXtImageClassifier.from_convnext(convnext(version=2))
    classifier.save_to_preset(str(tmp_path))
    x = pixels()
    want = classify(classifier, x)
    task = keras_hub.models.ImageClassifier.from_preset(str(tmp_path))
    assert type(task) is hub.ConvNeXtImageClassifier and type(task.preprocessor.image_converter) is (
        hub.ConvNeXtImageConverter)
    assert task.preprocessor.image_converter.get_config() == classifier.preprocessor.image_converter.get_config()
    np.testing.assert_array_equal(classify(task, x), want)
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path))
    x = kc.normalize_pixels(x)
    np.testing.assert_array_equal(call(backbone, x), call(classifier.backbone, x))


# --- keras-hub's dense tasks --------------------------------------------------------------------

def _sgd_step(task, x, y, **compile_kwargs):
    """One fit step with plain SGD; returns the loss and {path: moved} of the ConvNeXt backbone's variables."""
    backbone_vars = list(task.backbone.image_encoder.weights)
    before = [numpy(v).copy() for v in backbone_vars]
    task.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), **compile_kwargs)
    history = task.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    loss = history.history["loss"][-1]
    moved = {v.path: not np.array_equal(numpy(v), b) for v, b in zip(backbone_vars, before)}
    return loss, moved


# Keras warns of the variables without a gradient: the norms of the levels a task does not read, asserted below.
@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_deeplab_v3_segmenter_trains_one_step_on_convnext():
    # Perturbed: at their initial 1e-6 layer scales the blocks' norm gammas (1.0) get updates below float32's step.
    encoder = perturb(hub.ConvNeXtBackbone(**TINY))
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder, spatial_pyramid_pooling_key="P5", low_level_feature_key="P2", upsampling_size=8,
        dilation_rates=[6, 12, 18])
    segmenter = keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=3)
    x = kc.normalize_pixels(pixels(size=64))
    y = np.random.default_rng(1).integers(0, 3, size=(2, 64, 64, 1))
    assert call(segmenter, x).shape == (2, 64, 64, 3)
    loss, moved = _sgd_step(segmenter, x, y, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert np.isfinite(loss)
    # Every backbone variable gets a gradient but the norms of the levels DeepLabV3 does not read (P3, P4), and
    # P2's norm beta: a per-channel constant, which the low-level projection's BatchNorm (training) subtracts.
    unused = {f"norm{i}/{p}" for i in (1, 2) for p in ("gamma", "beta")}
    assert unused <= {p for p, m in moved.items() if not m} <= unused | {"norm0/beta"}
    assert len(moved) == len(encoder.weights) == len(encoder.trainable_weights)


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_retinanet_detector_trains_one_step_on_convnext():
    encoder = perturb(hub.ConvNeXtBackbone(**TINY, image_shape=(128, 128, 3)))
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=7, use_p5=False,
                                                  image_shape=(128, 128, 3))
    # One conv before each head's logits (four by default): the same wiring, a quarter of the compiling.
    detector = keras_hub.models.RetinaNetObjectDetector(backbone=backbone, num_classes=3, bounding_box_format="yxyx",
                                                        pre_logits_num_conv_layers=1)
    x = kc.normalize_pixels(pixels(size=128))
    y = {"boxes": np.array([[[10, 10, 60, 70], [40, 50, 120, 110]], [[0, 0, 64, 64], [64, 64, 128, 128]]],
                           "float32"),
         "labels": np.array([[0, 2], [1, 1]], "int32")}
    loss, moved = _sgd_step(detector, x, y)
    assert np.isfinite(loss)
    # RetinaNet reads P3..P5: the stem's level norm (P2) alone gets no gradient.
    assert {p for p, m in moved.items() if not m} == {"norm0/gamma", "norm0/beta"}


# --- the command line ---------------------------------------------------------------------------

def test_convert_command_writes_a_keras_hub_preset(tmp_path, capsys):
    model = convnext(classes=4, size=224)  # a converted checkpoint with a head is a 224 px model
    src = str(tmp_path / "tiny.keras")
    model.save(src)
    dst = str(tmp_path / "hub_preset")
    cli.main(["convert", src, dst, "--format", "keras_hub"])
    assert "wrote" in capsys.readouterr().out
    assert {"config.json", "model.weights.h5", "task.json", "task.weights.h5", "preprocessor.json",
            "image_converter.json", "metadata.json"} <= set(os.listdir(dst))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".partial-")]  # written aside and renamed
    classifier = keras_hub.models.ImageClassifier.from_preset(dst)
    assert classifier.preprocessor.image_converter.image_size == (224, 224)
    x = pixels(size=224)
    np.testing.assert_allclose(classify(classifier, x), call(model, x), rtol=1e-5, atol=1e-5)
    backbone = keras_hub.models.Backbone.from_preset(dst)
    assert type(backbone) is hub.ConvNeXtBackbone and backbone.get_config()["dims"] == list(TINY["dims"])

    # An existing folder is kept without --overwrite (exit 2, one line), replaced with it.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", src, dst, "--format", "keras_hub"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    cli.main(["convert", src, dst, "--format", "keras_hub", "--overwrite"])
    capsys.readouterr()


def test_an_encoder_checkpoint_becomes_a_backbone_preset(tmp_path):
    encoder = perturb(kc.ConvNeXtV2(**TINY, weights=None, include_top=False, include_preprocessing=False))
    src = str(tmp_path / "encoder.keras")
    encoder.save(src)
    dst = hub.save_preset(src, str(tmp_path / "hub_preset"))
    assert "task.json" not in os.listdir(dst) and "preprocessor.json" in os.listdir(dst)
    backbone = keras_hub.models.Backbone.from_preset(dst)
    assert type(backbone) is hub.ConvNeXtBackbone and backbone.version == 2
    x = kc.normalize_pixels(pixels())
    np.testing.assert_allclose(call(backbone, x), call(encoder, x), rtol=1e-6, atol=1e-6)
    preprocessor = keras_hub.models.ImageClassifierPreprocessor.from_preset(dst)
    assert type(preprocessor) is hub.ConvNeXtImageClassifierPreprocessor


@pytest.mark.parametrize("argv, message", [
    (["missing.pth"], "No checkpoint file or preset"),
    (["__tiny__", "--variant", "tiny"], "not ConvNeXt-Tiny"),
])
def test_convert_command_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message):
    if argv[0] == "__tiny__":
        argv = [str(tmp_path / "tiny.keras"), *argv[1:]]
        convnext().save(argv[0])
    else:
        argv = [str(tmp_path / argv[0]), *argv[1:]]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", argv[0], str(tmp_path / "out"), "--format", "keras_hub", *argv[1:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(tmp_path / "out")


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(depths=(1, 1, 1), dims=(8, 16, 24)), "four stages"),
    (dict(**TINY, version=2, layer_scale_init_value=1e-6), "no layer scale"),
    (dict(**TINY, version=3), "`version` must be 1"),
    (dict(**TINY, image_shape=(16, 16, 3)), "at least 32x32"),
    (dict(**TINY, image_shape=224), "`image_shape` must be"),
    (dict(**TINY, layer_scale_init_value="big"), "'auto'"),
    (dict(**TINY, norm_epsilon=0.0), "norm_epsilon"),
])
def test_backbone_argument_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match="Received") as info:
        hub.ConvNeXtBackbone(**kwargs)
    assert message in str(info.value)


def test_copying_from_a_wrong_model_fails_by_name():
    with pytest.raises(ValueError, match="keras_convnext model"):
        hub.ConvNeXtBackbone.from_convnext(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    notop = kc.ConvNeXt(**TINY, weights=None, include_top=False)
    with pytest.raises(ValueError, match="no top"):
        hub.ConvNeXtImageClassifier.from_convnext(notop)
    with pytest.raises(ValueError, match="pooling"):
        hub.ConvNeXtImageClassifier(hub.ConvNeXtBackbone(**TINY), num_classes=2, pooling="sum")
    with pytest.raises(ValueError, match="No checkpoint file or preset"):
        hub.ConvNeXtBackbone.from_weights("no_such_file.pth")


def test_missing_keras_hub_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # `import keras_hub` now raises ImportError
    spec = importlib.util.spec_from_file_location("_hub_without_keras_hub", hub.__file__)
    with pytest.raises(ImportError, match=r"pip install 'keras-convnext\[hub\]'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("version", [1, 2])
def test_backbone_in_kerass_patterns_clone_nesting_freezing_mixed_precision(version):
    backbone = perturb(hub.ConvNeXtBackbone(**TINY, version=version))
    x = pixels(n=4, size=64)
    want, weights = call(pyramid_model(backbone), x), backbone.get_weights()
    # clone_model: the same graph with fresh variables (as a plain Functional, as Keras clones any subclassed
    # functional model, keras-hub's own backbones too); with the weights copied, the same output
    # of the graph to the backbone's output (P5's stage map), so without the pyramid norms, which are not on it
    clone = keras.models.clone_model(backbone)
    on_path = [(v, w) for v, w in zip(backbone.weights, backbone.get_weights())
               if v.path.split("/")[0] not in ("norm0", "norm1", "norm2", "norm3")]
    assert [v.shape for v in clone.weights] == [v.shape for v, _ in on_path]
    clone.set_weights([w for _, w in on_path])
    np.testing.assert_allclose(call(clone, x), call(backbone, x), atol=1e-6)
    # nested on a new symbolic input with a head on P5, stage 0 frozen: one SGD step moves exactly the trainable
    # variables on P5's path (norm0..norm2 feed only P2..P4: no gradient, as in any FPN-less use)
    inputs = keras.Input((64, 64, 3))
    p5 = pyramid_model(backbone)(inputs)["P5"]
    np.testing.assert_allclose(call(keras.Model(inputs, p5), x), want["P5"], atol=1e-6)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(p5)))
    backbone.get_layer("stages_0").trainable = False
    before = {v.path: numpy(v).copy() for v in model.weights}
    trainable = {v.path for v in model.trainable_variables}
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, np.array([0, 1, 2, 1]), batch_size=4, epochs=1, verbose=0, shuffle=False)
    for v in model.weights:
        moved = not np.array_equal(numpy(v), before[v.path])
        expected = v.path in trainable and v.path.split("/")[0] not in ("norm0", "norm1", "norm2")
        assert moved == expected, f"{v.path} {'moved' if moved else 'did not move'}"
    # under mixed_bfloat16: half-precision maths, float32-close pyramid
    try:
        keras.config.set_dtype_policy("mixed_bfloat16")
        mixed = hub.ConvNeXtBackbone(**TINY, version=version)
    finally:
        keras.config.set_dtype_policy("float32")
    mixed.set_weights(weights)  # as before the step
    got = call(pyramid_model(mixed), x)
    for level in STRIDES:
        scale = np.abs(want[level]).max()
        np.testing.assert_allclose(np.asarray(got[level], "float32"), want[level], atol=0.05 * scale, err_msg=level)
