import os
import re

import keras
import numpy as np
import pytest
from conftest import TINY, fake_hardware

import harness

import keras_convnext as kc
from keras_convnext.layers import HostConstant, HostTruncatedNormal, StochasticDepth

BUILDERS = {
    "atto": kc.ConvNeXtAtto, "femto": kc.ConvNeXtFemto, "pico": kc.ConvNeXtPico,
    "nano": kc.ConvNeXtNano, "tiny": kc.ConvNeXtTiny, "small": kc.ConvNeXtSmall,
    "base": kc.ConvNeXtBase, "large": kc.ConvNeXtLarge, "xlarge": kc.ConvNeXtXLarge,
}
EXPECTED_PARAMS = {
    "atto": 3_695_520, "femto": 5_217_784, "pico": 9_045_672, "nano": 15_593_560,
    "tiny": 28_589_128, "small": 50_223_688, "base": 88_591_464, "large": 197_767_336,
    "xlarge": 350_196_968,
}


def tiny(**kwargs):
    kwargs = {"weights": None, "input_shape": (32, 32, 3), "classes": 7, **kwargs}
    return kc.ConvNeXt(TINY["depths"], TINY["dims"], **kwargs)


@pytest.mark.parametrize("variant", list(EXPECTED_PARAMS))
def test_parameter_count_of_every_variant(variant):
    model = BUILDERS[variant](weights=None)
    assert model.count_params() == EXPECTED_PARAMS[variant]
    assert model.name == f"convnext_{variant}"
    assert BUILDERS[variant].__name__ == f"ConvNeXt{variant.capitalize() if variant != 'xlarge' else 'XLarge'}"


def test_blocks_use_a_real_depthwise_conv_and_official_names():
    model = kc.ConvNeXtAtto(weights=None)
    assert [l.name for l in model.layers] == ["images", "preprocessing", "stages_0", "stages_1", "stages_2", "stages_3",
                                              "avg_pool", "norm", "head", "predictions"]
    stage = model.get_layer("stages_2")
    assert isinstance(stage, kc.ConvNeXtStage) and stage.depth == 6 and not stage.downsample.stem
    block = stage.blocks[5]
    assert isinstance(block, kc.ConvNeXtBlock) and block.name == "block_5"
    assert isinstance(block.dwconv, kc.layers.DepthwiseConv) and block.dwconv.kernel_size == 7
    assert block.dwconv.kernel.shape == (7, 7, 160, 1)
    assert block.pwconv1.kernel.shape == (160, 640) and block.pwconv1.activation.__name__ == "gelu"
    assert block.gamma.shape == (160,) and block.gamma.path == "stages_2/block_5/gamma"
    assert model.get_layer("stages_0").downsample.stem and model.get_layer("stages_0").downsample.conv.strides == (4, 4)


def test_every_variable_maps_to_an_official_key_and_back():
    from keras_convnext import names

    model = kc.ConvNeXtAtto(weights=None)
    keys = {v.path: names.official_key(v.path) for v in model.weights + kc.feature_pyramid(model).weights}
    assert None not in keys.values() and len(set(keys.values())) == len(keys)
    assert all(names.keras_path(key) == path for path, key in keys.items())
    assert keys["stages_2/block_5/pwconv1/kernel"] == "stages.2.5.pwconv1.weight"
    assert keys["stages_0/downsample/conv/kernel"] == "downsample_layers.0.0.weight"  # the stem: conv, then norm
    assert keys["stages_0/downsample/norm/beta"] == "downsample_layers.0.1.bias"
    assert keys["stages_1/downsample/norm/gamma"] == "downsample_layers.1.0.weight"  # later: norm, then conv
    assert keys["stages_3/downsample/conv/bias"] == "downsample_layers.3.1.bias"
    assert keys["stages_1/block_0/gamma"] == "stages.1.0.gamma"
    assert keys["norm/gamma"] == "norm.weight" and keys["head/kernel"] == "head.weight"
    assert keys["norm2/beta"] == "norm2.bias"
    # A nesting model's prefix is not part of the contract; foreign names are outside it.
    assert names.official_key("outer/stages_0/block_1/norm/beta") == "stages.0.1.norm.bias"
    assert names.official_key("stages_0/block_1/pwconv1/gamma") is None
    assert names.official_key("dense/kernel") is None and names.keras_path("stages.0.0.head.weight") is None


@pytest.mark.parametrize(
    "include_top, pooling, shape",
    [(True, None, (2, 7)), (True, "avg", (2, 7)), (True, "max", (2, 7)),
     (False, None, (2, 1, 1, 32)), (False, "avg", (2, 32)), (False, "max", (2, 32))],
)
def test_output_shapes(include_top, pooling, shape, images):
    model = tiny(include_top=include_top, pooling=pooling)
    assert tuple(model(images).shape) == shape


def test_flexible_input_size():
    model = tiny(include_top=False, input_shape=(None, None, 3))
    out = model(np.zeros((1, 96, 64, 3), "float32"))
    assert tuple(out.shape) == (1, 3, 2, 32)


def test_pooling_none_returns_the_raw_stage4_map(images):
    model = tiny(include_top=False)
    assert model.layers[-1].name == "stages_3"
    assert not any(isinstance(l, keras.layers.LayerNormalization) and l.name == "norm" for l in model.layers)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pooled_features_are_what_the_classifier_sees(pooling, images):
    top = tiny(pooling=pooling)
    features = tiny(include_top=False, pooling=pooling)
    for layer in features.layers:
        layer.set_weights(top.get_layer(layer.name).get_weights())
    seen = keras.Model(top.input, top.get_layer("norm").output)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(features(images)),
                               keras.ops.convert_to_numpy(seen(images)), atol=1e-6)
    assert top.get_layer(f"{pooling}_pool") is not None


def test_classifier_activation(images):
    probs = keras.ops.convert_to_numpy(tiny()(images))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    logits = keras.ops.convert_to_numpy(tiny(classifier_activation=None)(images))
    assert logits.min() < 0 or logits.max() > 1 or not np.allclose(logits.sum(-1), 1.0)


def test_head_init_scale_scales_the_head():
    a = tiny(head_init_scale=1.0).get_layer("head").kernel
    b = tiny(head_init_scale=0.001).get_layer("head").kernel
    ratio = float(np.std(keras.ops.convert_to_numpy(b)) / np.std(keras.ops.convert_to_numpy(a)))
    assert 0.0005 < ratio < 0.002


def test_layer_scale_init_value():
    model = tiny(layer_scale_init_value=0.5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("stages_1").blocks[0].gamma), 0.5)
    without = tiny(layer_scale_init_value=None)
    assert without.get_layer("stages_1").blocks[0].gamma is None
    assert not any(v.path.endswith("/gamma") and "block_" in v.path and "norm" not in v.path for v in without.weights)


def test_integer_and_float_pixels_give_the_same_output(images):
    model = tiny()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)),
                               keras.ops.convert_to_numpy(model(images.astype("float32"))), atol=1e-6)
    np.testing.assert_allclose(model.predict(images, verbose=0),
                               keras.ops.convert_to_numpy(model(images.astype("float32"))), atol=1e-5)


def test_preprocessing_layer_matches_normalize_pixels(images):
    with_layer = tiny()
    without = tiny(include_preprocessing=False)
    without.set_weights(with_layer.get_weights())  # the preprocessing layer holds no variables
    a = keras.ops.convert_to_numpy(with_layer(images))
    b = keras.ops.convert_to_numpy(without(kc.normalize_pixels(images)))
    np.testing.assert_allclose(a, b, atol=1e-6)
    layer = with_layer.get_layer("preprocessing")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(images)), kc.normalize_pixels(images), atol=1e-5)
    tensor_version = keras.ops.convert_to_numpy(kc.normalize_pixels(keras.ops.convert_to_tensor(images)))
    np.testing.assert_allclose(tensor_version, kc.normalize_pixels(images), atol=1e-5)
    # (255 / 255 - 0.485) / 0.229 for red, channel by channel.
    np.testing.assert_allclose(kc.normalize_pixels(np.full((1, 1, 3), 255)),
                               [[[(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]]], rtol=1e-6)


# --- feature pyramid ---------------------------------------------------------------------------

@pytest.mark.parametrize("include_top", [True, False])
def test_feature_pyramid_shapes_and_keys(include_top):
    model = tiny(include_top=include_top, input_shape=(64, 64, 3))
    pyramid = kc.feature_pyramid(model)
    out = pyramid(np.zeros((2, 64, 64, 3), "float32"))
    assert sorted(out) == ["P2", "P3", "P4", "P5"]
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "P2": (2, 16, 16, 8), "P3": (2, 8, 8, 16), "P4": (2, 4, 4, 24), "P5": (2, 2, 2, 32)}
    assert [pyramid.get_layer(f"norm{i}").epsilon for i in range(4)] == [1e-6] * 4


def test_feature_pyramid_norm_false_is_the_raw_stage_outputs(images):
    model = tiny(include_top=False)
    raw = kc.feature_pyramid(model, norm=False)(images)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(raw["P5"]),
                               keras.ops.convert_to_numpy(model(images)), atol=1e-6)
    normed = kc.feature_pyramid(model)(images)["P5"]
    x = keras.ops.convert_to_numpy(raw["P5"])
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(normed), ref, atol=1e-4)


def test_feature_pyramid_refuses_a_foreign_model():
    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3)], name="foreign")
    with pytest.raises(ValueError, match=r"keras_convnext.*Received: model='foreign'"):
        kc.feature_pyramid(other)


# --- stochastic depth --------------------------------------------------------------------------

def test_drop_path_rates_follow_the_linear_rule():
    model = kc.ConvNeXtTiny(weights=None, include_top=False)  # default drop_path_rate 0.1, 18 blocks
    rates = {f"{stage.name}_{j}": block.drop_path.rate for stage in model.stages
             for j, block in enumerate(stage.blocks) if block.drop_path is not None}
    assert len(rates) == 17  # block 0 has rate 0: no layer
    assert rates["stages_3_2"] == pytest.approx(0.1)
    assert rates["stages_0_1"] == pytest.approx(0.1 * 1 / 17)
    assert rates["stages_2_0"] == pytest.approx(0.1 * 6 / 17)
    small = kc.ConvNeXtSmall(weights=None, include_top=False)
    assert small.get_layer("stages_3").blocks[2].drop_path.rate == pytest.approx(0.4)


def test_stochastic_depth_is_per_sample_and_off_at_inference():
    layer = StochasticDepth(0.5, seed=3)
    x = np.ones((64, 4, 4, 8), "float32")
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # one draw per sample
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    second = keras.ops.convert_to_numpy(layer(x, training=True))
    assert not np.array_equal(out, second)  # the generator advances


def test_stochastic_depth_changes_training_outputs_not_inference(images):
    model = tiny(drop_path_rate=0.5, layer_scale_init_value=1.0)
    plain = tiny(drop_path_rate=0.0, layer_scale_init_value=1.0)
    for layer in plain.layers:
        layer.set_weights(model.get_layer(layer.name).get_weights())
    x = np.repeat(images, 8, axis=0)
    infer = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(infer, keras.ops.convert_to_numpy(plain(x, training=False)), atol=1e-6)
    np.testing.assert_allclose(infer, keras.ops.convert_to_numpy(model(x, training=False)), atol=0)
    train = keras.ops.convert_to_numpy(model(x, training=True))
    assert np.abs(train - infer).max() > 1e-3


def test_stochastic_depth_trains_under_jit_compiled_fit(images):
    model = tiny(drop_path_rate=0.5, layer_scale_init_value=1.0, classes=3)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile="auto")
    layer = model.get_layer("stages_3").blocks[0].drop_path
    before = keras.ops.convert_to_numpy(layer.seed_generator.state).copy()
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype("uint8")
    y = np.arange(16) % 3
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = keras.ops.convert_to_numpy(layer.seed_generator.state)
    assert not np.array_equal(before, after)  # a fresh mask each step
    assert np.isfinite(history.history["loss"]).all()


# --- serialization -----------------------------------------------------------------------------

def test_keras_round_trip_is_bit_exact_without_custom_objects(tmp_path, images):
    model = tiny(drop_path_rate=0.3, layer_scale_init_value=0.1)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(images)),
                                  keras.ops.convert_to_numpy(model(images)))
    assert [l.name for l in loaded.layers] == [l.name for l in model.layers]
    assert isinstance(loaded.get_layer("stages_3").blocks[0].drop_path, StochasticDepth)
    assert loaded.get_config() == model.get_config() and loaded.get_config()["drop_path_rate"] == 0.3


@pytest.mark.parametrize("layer, config", [
    (kc.ConvNeXtPreprocessing([0.5, 0.4, 0.3], [0.2, 0.2, 0.1]), {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.1]}),
    (kc.ConvNeXtBlock(16, 0.1, 0.25), {"dim": 16, "drop_path_rate": 0.1, "layer_scale_init_value": 0.25,
                                              "grn": False}),
    (kc.ConvNeXtDownsample(16, stem=True), {"dim": 16, "stem": True}),
    (kc.ConvNeXtStage(16, [0.0, 0.1], 0.5), {"dim": 16, "drop_path_rates": [0.0, 0.1], "layer_scale_init_value": 0.5,
                                             "stem": False, "grn": False}),
    (kc.ConvNeXtStage(16, [0.0], None, grn=True), {"dim": 16, "drop_path_rates": [0.0], "layer_scale_init_value": None,
                                                  "stem": False, "grn": True}),
    (StochasticDepth(0.2, seed=7), {"rate": 0.2, "seed": 7}),
])
def test_get_config_returns_the_constructor_arguments(layer, config):
    got = layer.get_config()
    base = keras.layers.Layer().get_config()
    assert {k: v for k, v in got.items() if k not in base} == config
    clone = type(layer).from_config(got)
    assert clone.get_config() == got


# --- mixed precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_runs_with_float32_output_close_to_float32(policy, images):
    reference = tiny(classifier_activation=None)
    keras.config.set_dtype_policy(policy)
    mixed = tiny(classifier_activation=None)
    mixed.set_weights(reference.get_weights())
    assert mixed.get_layer("stages_1").blocks[0].pwconv1.compute_dtype == policy.split("_")[1]
    out = mixed(images)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    pooled = kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, include_top=False, pooling="avg")(images)
    assert keras.backend.standardize_dtype(pooled.dtype) == "float32"
    ref = keras.ops.convert_to_numpy(reference(images))
    tol = 0.05 if policy == "mixed_bfloat16" else 0.01
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), ref, atol=tol * np.abs(ref).max())


def test_layernorm_statistics_stay_float32_under_float16():
    keras.config.set_dtype_policy("mixed_float16")
    model = tiny(include_top=False)
    norm = model.get_layer("stages_1").blocks[0].norm
    # Values near 300: their squares overflow float16 (max 65504) if the variance is taken in it.
    x = (300.0 + 200.0 * np.random.default_rng(0).standard_normal((2, 4, 4, 16))).astype("float16")
    out = keras.ops.convert_to_numpy(norm(x)).astype("float32")
    xf = x.astype("float32")
    ref = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-6)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=0.02)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"pooling": "min"}, r"`pooling`.*Received: pooling='min'"),
    ({"pooling": "mean", "include_top": False}, r"`pooling`.*Received: pooling='mean'"),
    ({"input_shape": (16, 64, 3)}, r"at least 32x32.*Received: input_shape=\(16, 64, 3\)"),
    ({"input_shape": (64, 64, 0)}, r"positive channel count.*Received: input_shape=\(64, 64, 0\)"),
    ({"input_shape": (64, 64, None)}, r"positive channel count.*Received: input_shape=\(64, 64, None\)"),
    ({"input_shape": (64, 64)}, r"Received: input_shape=\(64, 64\)"),
    ({"classes": 0}, r"`classes`.*Received: classes=0"),
    ({"weights": "imagenet21k"}, r"Unknown `weights`.*convnext_atto.d2_in1k.*Received: weights='imagenet21k'"),
    ({"drop_path_rate": 1.0}, r"Received: drop_path_rate=1.0"),
    ({"drop_path_rate": float("nan")}, r"finite number.*Received: drop_path_rate=nan"),
    ({"drop_path_rate": "0.1"}, r"finite number.*Received: drop_path_rate='0.1'"),
    ({"classes": True}, r"`classes` must be an integer.*Received: classes=True"),
    ({"classes": 10.0}, r"`classes` must be an integer.*Received: classes=10.0"),
    ({"layer_scale_init_value": -1e-6}, r"`layer_scale_init_value` must be in \[0.0, inf\).*=-1e-06"),
    ({"layer_scale_init_value": float("nan")}, r"finite number.*Received: layer_scale_init_value=nan"),
    ({"head_init_scale": 0.0}, r"`head_init_scale` must be in \(0.0, inf\).*Received: head_init_scale=0.0"),
    ({"head_init_scale": float("inf")}, r"finite number.*Received: head_init_scale=inf"),
    ({"include_top": "yes"}, r"`include_top` must be True or False.*Received: include_top='yes'"),
    ({"include_preprocessing": 1}, r"True or False.*Received: include_preprocessing=1"),
    ({"input_shape": (32.5, 32, 3)}, r"integers or None.*Received: input_shape=\(32.5, 32, 3\)"),
    ({"input_shape": 224}, r"Received: input_shape=224"),
    ({"name": 3}, r"`name` must be a string.*Received: name=3"),
    ({"classifier_activation": 3}, r"Received: classifier_activation=3"),
    ({"weights": 3}, r"`weights` must be.*Received: weights=3"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kc.ConvNeXtAtto(**{"weights": None, **kwargs})


def test_generic_builder_checks_its_numbers_too(tmp_path):
    with pytest.raises(ValueError, match=r"finite number.*Received: drop_path_rate=None"):
        kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, drop_path_rate=None)
    with pytest.raises(ValueError, match=r"`depths\[2\]` must be an integer.*Received: depths\[2\]=True"):
        kc.ConvNeXt((1, 1, True, 1), TINY["dims"], weights=None)
    with pytest.raises(ValueError, match=r"`dims\[0\]` must be at least 1.*Received: dims\[0\]=0"):
        kc.ConvNeXt(TINY["depths"], (0, 16, 24, 32), weights=None)
    with pytest.raises(ValueError, match=r"a folder, not a checkpoint file.*Received: weights="):
        kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=str(tmp_path))
    with pytest.raises(ValueError, match=r"Unknown `weights`.*Received: weights="):
        kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=str(tmp_path / "missing.pth"))


def test_flexible_model_refuses_too_small_images_and_stays_usable():
    model = kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, include_top=False, pooling="avg")
    good = np.zeros((1, 40, 40, 3), "uint8")
    expected = model.predict(good, verbose=0)
    with pytest.raises(ValueError, match=r"at least 32x32.*Received: x with shape=\(1, 16, 40, 3\)"):
        model.predict(np.zeros((1, 16, 40, 3), "uint8"), verbose=0)
    with pytest.raises(ValueError, match=r"at least 32x32.*Received: images of shape \(1, 40, 16, 3\)"):
        model(np.zeros((1, 40, 16, 3), "uint8"))
    # The refused call changed nothing (on JAX a failure inside predict's trace would purge the variables).
    np.testing.assert_array_equal(model.predict(good, verbose=0), expected)


def test_input_tensor_is_checked_too():
    with pytest.raises(ValueError, match=r"at least 32x32.*Received: input_shape=\(8, 8, 3\)"):
        kc.ConvNeXtAtto(weights=None, input_tensor=keras.Input((8, 8, 3)))
    model = kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, input_tensor=keras.Input((48, 48, 3)))
    assert model.input_shape == (None, 48, 48, 3)


@pytest.mark.parametrize("depths, dims, shown", [
    ((1, 1, 1), (8, 8, 8, 8), r"\(1, 1, 1\), dims=\(8, 8, 8, 8\)"),
    ((1, 1, 1, 1, 1), (8, 8, 8, 8, 8), r"\(1, 1, 1, 1, 1\)"),
    ((1, 1, 1, 1), (8, 8, 8), r"dims=\(8, 8, 8\)"),
])
def test_depths_and_dims_of_wrong_length(depths, dims, shown):
    with pytest.raises(ValueError, match=r"four stages.*Received: depths=.*" + shown):
        kc.ConvNeXt(depths, dims, weights=None)


def test_imagenet_weights_need_a_named_variant():
    with pytest.raises(ValueError, match=r"named variants.*Received: weights='imagenet'"):
        kc.ConvNeXt(TINY["depths"], TINY["dims"])


def test_arguments_are_checked_before_any_download(monkeypatch):
    from keras_convnext import weights as weights_lib

    def no_network(*args, **kwargs):
        raise AssertionError("a file was fetched before the arguments were checked")

    monkeypatch.setattr(weights_lib, "fetch_preset", no_network)
    monkeypatch.setattr(weights_lib, "download", no_network)
    with pytest.raises(ValueError, match="Received: pooling='sum'"):
        kc.ConvNeXtTiny(pooling="sum")
    with pytest.raises(ValueError, match="Received: classes=-3"):
        kc.ConvNeXtTiny(classes=-3)
    with pytest.raises(ValueError, match=r"ConvNeXt-Small weights.*Received: weights='convnext_small.fb_in1k'"):
        kc.ConvNeXtTiny(weights="convnext_small.fb_in1k")


def test_host_truncated_normal_draws_kerass_truncated_normal():
    init = HostTruncatedNormal(mean=0.5, stddev=0.02, seed=7)
    values = keras.ops.convert_to_numpy(init((300, 400)))
    assert values.shape == (300, 400) and values.dtype == np.float32
    assert np.abs(values - 0.5).max() < 0.04  # cut at two standard deviations
    # A normal cut at +-2 sigma keeps a standard deviation of 0.8796 sigma; Keras's own draw agrees.
    stock = keras.ops.convert_to_numpy(keras.initializers.TruncatedNormal(mean=0.5, stddev=0.02, seed=7)((300, 400)))
    for drawn in (values, stock):
        assert abs(drawn.mean() - 0.5) < 2e-4
        assert abs(drawn.std() / 0.02 - 0.8796) < 0.01
    # An integer seed gives the same values at every call and after a config round trip.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(init((300, 400))), values)
    again = HostTruncatedNormal.from_config(init.get_config())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again((300, 400))), values)
    assert keras.backend.standardize_dtype(init((3, 4), dtype="bfloat16").dtype) == "bfloat16"
    # Unseeded: reproducible under keras.utils.set_random_seed, different between instances.
    draws = []
    for _ in range(2):
        keras.utils.set_random_seed(11)
        draws.append([keras.ops.convert_to_numpy(HostTruncatedNormal()((64,))) for _ in range(2)])
    np.testing.assert_array_equal(draws[0][0], draws[1][0])
    assert not np.array_equal(draws[0][0], draws[0][1])
    # A SeedGenerator seed draws with Keras, within the same bounds.
    generated = keras.ops.convert_to_numpy(HostTruncatedNormal(stddev=0.1, seed=keras.random.SeedGenerator(3))((500,)))
    assert generated.shape == (500,) and np.abs(generated).max() < 0.2


def test_host_constant_fills_like_kerass_constant():
    for value in (0.0, 1.0, 1e-6):
        filled = keras.ops.convert_to_numpy(HostConstant(value)((3, 5)))
        np.testing.assert_array_equal(filled, keras.ops.convert_to_numpy(keras.initializers.Constant(value)((3, 5))))
        assert filled.dtype == np.float32
    again = HostConstant.from_config(HostConstant(0.25).get_config())
    assert keras.backend.standardize_dtype(again((2,), dtype="bfloat16").dtype) == "bfloat16"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again((2,))), [0.25, 0.25])


def test_model_starts_from_the_official_init():
    model = kc.ConvNeXt(**TINY, weights=None, layer_scale_init_value=1e-6)
    kernel = keras.ops.convert_to_numpy(model.get_layer("stages_3").blocks[0].pwconv1.kernel)
    assert np.abs(kernel).max() < 0.04 and abs(kernel.std() / 0.02 - 0.8796) < 0.05
    checked = 0
    for weight in model.weights:
        value = keras.ops.convert_to_numpy(weight)
        if weight.name in ("bias", "beta"):
            assert not value.any(), weight.path
        elif weight.path.endswith("norm/gamma"):
            assert (value == 1).all(), weight.path
        elif re.fullmatch(r"stages_\d/block_\d/gamma", weight.path):
            np.testing.assert_allclose(value, 1e-6, err_msg=weight.path)
        else:
            continue
        checked += 1
    # 5 blocks x (3 biases, gamma and beta, scale), 4 x (conv bias, LN) in stem/downsampling, head norm + bias
    assert checked == 6 * 5 + 3 * 4 + 3


def scaled_layer_scales(model, seed=4):
    """Layer scales of order 1: a tail that matters (the init value 1e-6 would hide a wrong one)."""
    rng = np.random.default_rng(seed)
    for stage in model.stages:
        for block in stage.blocks:
            block.gamma.assign(rng.uniform(0.5, 1.5, block.gamma.shape))


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_block_tails_fused_at_inference_give_the_same_numbers(policy, isa, monkeypatch):
    # Eager PyTorch inference computes a block's MLP (pwconv1 -> GELU -> pwconv2 -> layer scale -> add) in
    # tiles of rows on an AVX2-only CPU (backend_ops.block_mlp), and pwconv2 -> layer scale -> add as one
    # oneDNN op elsewhere (backend_ops.dense_scale_add), as the dispatch table says; every other backend and
    # every gradient-taking call runs the steps one by one.
    from keras_convnext import backend_ops

    fake_hardware(monkeypatch, "cpu", isa)
    monkeypatch.setattr(backend_ops, "MLP_TILE_ROWS", 64)  # several tiles and a ragged last one per map

    keras.config.set_dtype_policy(policy)
    model = tiny(drop_path_rate=0.3, include_top=False, pooling="avg", input_shape=(40, 40, 3))
    scaled_layer_scales(model)
    rng = np.random.default_rng(8)
    for block in (b for stage in model.stages for b in stage.blocks):  # biases that matter (they start at 0)
        block.pwconv2.bias.assign(rng.normal(0, 0.5, block.pwconv2.bias.shape))
    calls = {"block_mlp": [], "dense_scale_add": []}
    for name in calls:
        original = getattr(backend_ops, name)

        def counted(*args, _original=original, _name=name):
            out = _original(*args)
            calls[_name].append(out is not None)
            return out

        monkeypatch.setattr(backend_ops, name, counted)
    x = rng.integers(0, 256, (3, 40, 40, 3)).astype("uint8")
    fused = model.predict(x, verbose=0)
    fused_calls = {name: list(c) for name, c in calls.items()}
    for c in calls.values():
        c.clear()
    plain = keras.ops.convert_to_numpy(model(x))  # eager, autograd on (PyTorch): step by step
    tolerance = 1e-5 if policy == "float32" else 0.05
    np.testing.assert_allclose(fused, plain, atol=tolerance * np.abs(plain).max(), rtol=0)
    blocks = sum(TINY["depths"])
    if keras.backend.backend() == "torch":
        if isa == "avx2":  # tiles in float32; bfloat16 step by step (addmm: no oneDNN there)
            tiles = policy == "float32"
            assert fused_calls == {"block_mlp": [tiles] * blocks, "dense_scale_add": [] if tiles else [False] * blocks}
        else:  # bfloat16 takes oneDNN only where the CPU has its bfloat16 kernels (backend_ops.onednn_bf16).
            fuses = policy == "float32" or backend_ops.onednn_bf16()
            assert fused_calls == {"block_mlp": [False] * blocks, "dense_scale_add": [fuses] * blocks}
        # The variables need gradients: neither fused op has one.
        assert calls == {"block_mlp": [False] * blocks, "dense_scale_add": [False] * blocks}
    else:
        assert not any(fused_calls["block_mlp"] + fused_calls["dense_scale_add"] + calls["block_mlp"]
                       + calls["dense_scale_add"])  # no fused form there (under jit, as many calls as traces)


def test_fused_tails_give_every_layer_scale_its_gradient():
    # The pattern that once lost a gradient on PyTorch: everything frozen but the layer scales.
    model = tiny()
    scaled_layer_scales(model)
    harness.freezing_patterns()[1][1](model)
    trainable = model.trainable_variables
    assert len(trainable) == sum(TINY["depths"]) and all(v.path.endswith("/gamma") for v in trainable)
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    grads = backend_gradients(model, x)
    assert all(np.abs(g).sum() > 0 for g in grads), [v.path for v, g in zip(trainable, grads) if not np.abs(g).sum()]


@pytest.mark.parametrize("policy, device, folds", [
    ("float32", "cpu", True), ("mixed_bfloat16", "cpu", True),
    ("mixed_float16", "cpu", False),  # a kernel times the initial 1e-6 scale is below float16's range
    ("float32", "gpu", False),  # Keras's own ops on an accelerator: not measured there
])
def test_the_layer_scale_folds_into_pwconv2_with_the_same_values_and_gradients(policy, device, folds, monkeypatch):
    from keras_convnext import backend_ops
    from keras_convnext.layers import PointwiseDense

    fake_hardware(monkeypatch, device, "avx512")
    keras.config.set_dtype_policy(policy)
    model = tiny(classifier_activation=None)  # logits: (softmax outputs sum to 1, normalised features to 0)
    scaled_layer_scales(model)
    rng = np.random.default_rng(6)
    for block in (b for stage in model.stages for b in stage.blocks):  # biases that matter (they start at 0)
        block.pwconv2.bias.assign(rng.normal(0, 0.5, block.pwconv2.bias.shape))
    calls = []
    original, original_fold = backend_ops.dense_scaled, backend_ops._fold

    def counted(*args):
        out = original(*args)
        calls.append(out is not None)
        return out

    def counted_fold(kernel, bias, gamma, dtype):  # the JAX/TF block MLP (backend_ops.mlp) folds the scale itself
        out = original_fold(kernel, bias, gamma, dtype)
        calls.append(out[2] is None)
        return out

    monkeypatch.setattr(backend_ops, "dense_scaled", counted)
    monkeypatch.setattr(backend_ops, "_fold", counted_fold)
    x = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    out, grads = keras.ops.convert_to_numpy(model(x)), backend_gradients(model, x)
    assert calls and all(c == folds for c in calls), calls  # every block, eager and under autodiff
    monkeypatch.setattr(PointwiseDense, "scaled", lambda self, inputs, gamma: None)  # scale the map instead
    monkeypatch.setattr(backend_ops, "mlp", lambda *args, **kwargs: None)  # and run the block MLP step by step
    plain_out, plain_grads = keras.ops.convert_to_numpy(model(x)), backend_gradients(model, x)
    tolerance = 1e-5 if policy == "float32" else 0.05
    np.testing.assert_allclose(out, plain_out, atol=tolerance * np.abs(plain_out).max(), rtol=0)
    for v, g, plain in zip(model.trainable_variables, grads, plain_grads):
        assert np.abs(g).max() > 0, v.path
        np.testing.assert_allclose(g, plain, atol=tolerance * np.abs(plain).max(), rtol=0, err_msg=v.path)


@pytest.mark.parametrize("which, kind", [("pwconv1", "subclass"), ("pwconv2", "subclass"), ("pwconv2", "dense"),
                                         ("norm", "subclass"), ("norm", "stock"), ("dwconv", "subclass")])
def test_a_block_runs_a_replaced_pointwise_layer_as_itself(which, kind, monkeypatch):
    # The block's fused forms (backend_ops.mlp, with LayerNorm or without, torch's tiles on an AVX2 CPU, the layer
    # scale folded into pwconv2, the fused tail) compute PointwiseDense's and LayerNorm's own maths: a subclass
    # with a call of its own, or a stock Keras layer, put in a block must run as itself.
    from keras_convnext import backend_ops
    from keras_convnext.layers import DepthwiseConv, LayerNorm, PointwiseDense

    class Doubled(PointwiseDense):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    class DoubledNorm(LayerNorm):
        def call(self, inputs, training=None):
            return super().call(inputs, training=training) * 2.0

    class DoubledConv(DepthwiseConv):  # (scaled per channel: the LayerNorm after it would undo a doubling)
        def call(self, inputs):
            out = super().call(inputs)
            return out * keras.ops.cast(keras.ops.linspace(0.5, 2.0, out.shape[-1]), out.dtype)

    fake_hardware(monkeypatch, "cpu", "avx2")  # the row with the most fused forms on every backend
    x = np.random.default_rng(9).standard_normal((2, 8, 8, 16)).astype("float32")
    stock = kc.ConvNeXtBlock(16, 0.0, 0.5)
    plain_out = keras.ops.convert_to_numpy(stock(x, training=False))
    block = kc.ConvNeXtBlock(16, 0.0, 0.5)
    old = getattr(block, which)
    if which == "dwconv":
        layer = DoubledConv
        setattr(block, which, layer(7, name=old.name))  # before the build
    elif which == "norm":
        layer = DoubledNorm if kind == "subclass" else keras.layers.LayerNormalization
        setattr(block, which, layer(epsilon=old.epsilon, name=old.name))
    else:
        layer = Doubled if kind == "subclass" else keras.layers.Dense
        setattr(block, which, layer(old.units, activation=old.activation, name=old.name))
    block.build(x.shape)
    for name in ("dwconv", "norm", "pwconv1", "pwconv2"):
        getattr(block, name).set_weights(getattr(stock, name).get_weights())
    block.gamma.assign(stock.gamma)
    assert type(getattr(block, which)) is layer
    fused = []
    for name in ("mlp", "block_mlp"):
        original = getattr(backend_ops, name)

        def counted(*a, _f=original, _n=name, **k):
            out = _f(*a, **k)
            replaced = {"norm": "norm", "dwconv": "conv"}.get(which)  # a replaced norm or conv: only what
            if out is not None and (replaced is None or k.get(replaced) is not None):  # follows it may fuse
                fused.append(_n)
            return out

        monkeypatch.setattr(backend_ops, name, counted)
    hidden = block.pwconv1(block.norm(block.dwconv(x)))
    expected = x + keras.ops.convert_to_numpy(block.pwconv2(hidden) * block.gamma)
    for training in (False, True):
        out = keras.ops.convert_to_numpy(block(x, training=training))
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert not fused, fused
    if kind == "subclass":  # the doubling (or scaling) shows in the output
        assert np.abs(out - plain_out).max() > 0.2 * np.abs(plain_out - x).max()
    else:  # a stock Dense's or LayerNormalization's own maths are the same
        np.testing.assert_allclose(out, plain_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["dwconv", "norm"])
def test_a_block_runs_a_sublayer_with_another_dtype_policy_step_by_step(which, monkeypatch):
    # The fused forms compute in the block's dtype: a float32 dwconv or norm in a mixed_bfloat16 block runs as
    # itself, and the block's output stays in the block's compute dtype (pwconv1 casts the float32 map back).
    fake_hardware(monkeypatch, "cpu", "avx512")
    x = np.random.default_rng(11).standard_normal((2, 8, 8, 16)).astype("float32")
    block = kc.ConvNeXtBlock(16, 0.0, 0.5, dtype="mixed_bfloat16")
    setattr(block, which, kc.layers.DepthwiseConv(7, name="dwconv", dtype="float32") if which == "dwconv"
            else kc.layers.LayerNorm(epsilon=1e-6, name="norm", dtype="float32"))
    block.build(x.shape)
    assert getattr(block, which).compute_dtype == "float32"
    h = block.norm(block.dwconv(keras.ops.cast(x, "bfloat16")))
    expected = x + keras.ops.convert_to_numpy(keras.ops.cast(block.pwconv2(block.pwconv1(h)) * block.gamma,
                                                              "float32"))
    for training in (False, True):
        out = block(x, training=training)
        assert keras.backend.standardize_dtype(out.dtype) == "bfloat16", training
        np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")), expected,
                                   atol=0.05 * np.abs(expected).max(), rtol=0)


def backend_gradients(model, x):
    """d(sum of outputs) / d(trainable variables), in each backend's own autodiff."""
    backend = keras.backend.backend()
    variables = model.trainable_variables
    if backend == "torch":
        import torch

        out = model(torch.as_tensor(x)).sum()
        grads = torch.autograd.grad(out, [v.value for v in variables], allow_unused=True)
        return [np.zeros(v.shape) if g is None else g.detach().cpu().numpy() for v, g in zip(variables, grads)]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            out = tf.reduce_sum(model(x))
        return [g.numpy() for g in tape.gradient(out, variables)]
    import jax

    trainable = [v.value for v in variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def loss(trainable):
        out, _ = model.stateless_call(trainable, frozen, x)
        return out.sum()

    return [np.asarray(g) for g in jax.grad(loss)(trainable)]


def test_feature_pyramid_of_a_fused_model_is_exact(images):
    model = tiny(include_top=False, input_shape=(64, 64, 3))
    scaled_layer_scales(model)
    pyramid = kc.feature_pyramid(model, norm=False)
    x = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    fused = pyramid.predict(x, verbose=0)
    plain = {k: keras.ops.convert_to_numpy(v) for k, v in pyramid(x).items()}
    np.testing.assert_allclose(fused["P5"], keras.ops.convert_to_numpy(model(x)), atol=1e-5)
    for key in fused:
        np.testing.assert_allclose(fused[key], plain[key], atol=1e-5, err_msg=key)


# --- the shared harness: every way Keras composes, freezes and saves a model -----------------------

def tiny_family(**kwargs):
    """The ConvNeXt V1 family at the harness's size: TINY depths and dims, layer scales of order 1."""
    kwargs = {"weights": None, "layer_scale_init_value": 0.5, **kwargs}
    return kc.ConvNeXt(TINY["depths"], TINY["dims"], **kwargs)


def tiny_v2_family(**kwargs):
    """The ConvNeXt V2 family at the harness's size, its GRN parameters of order 1 (zero ones make GRN the identity)."""
    model = kc.ConvNeXtV2(TINY["depths"], TINY["dims"], **{"weights": None, **kwargs})
    rng = np.random.default_rng(0)
    for variable in model.weights:
        if "/grn/" in variable.path:
            variable.assign(rng.uniform(0.3, 1.0, variable.shape).astype("float32"))
    return model


FAMILIES = {"convnext_v1": (tiny_family, TINY["dims"][-1]), "convnext_v2": (tiny_v2_family, TINY["dims"][-1])}


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_shapes(family):
    build, features = FAMILIES[family]
    harness.check_shapes(build, features)


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_every_layer_is_built(family):
    harness.check_every_layer_is_built(FAMILIES[family][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_variable_input_size_and_channels(family):
    build, _ = FAMILIES[family]
    harness.check_variable_input_size(build)
    harness.check_input_channels(build)


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_composition_sequential_time_distributed(family):
    harness.check_composition(FAMILIES[family][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_clone_model_and_summary(family):
    harness.check_clone_model(FAMILIES[family][0])
    harness.check_summary(FAMILIES[family][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_keras_round_trip(family, tmp_path):
    harness.check_keras_round_trip(FAMILIES[family][0], tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_fast_forms_match_the_plain_keras_ops(family):
    harness.check_fast_forms_match_plain_forms(FAMILIES[family][0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_harness_fast_forms_train_like_the_plain_keras_ops_in_mixed_precision(family, policy):
    harness.check_fast_forms_train_like_plain_forms(FAMILIES[family][0], policy)


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_mixed_precision(family):
    harness.check_mixed_precision(FAMILIES[family][0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", [name for name, _ in harness.freezing_patterns()])
def test_harness_gradients_under_partial_freezing(family, pattern):
    freeze = dict(harness.freezing_patterns())[pattern]
    harness.check_training_step_under_freezing(FAMILIES[family][0], freeze, pattern)


# --- keras.applications' contract: data format, input_tensor, channels ------------------------------

def test_channels_first_is_refused_up_front_with_kerass_message():
    before = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        with pytest.raises(ValueError, match=r"^ConvNeXt does not support the `channels_first` image data format\. "
                                             r"Switch to `channels_last`.*Received: image_data_format='channels_first'"):
            kc.ConvNeXtAtto(weights="imagenet")  # refused before any download
        with pytest.raises(ValueError, match="channels_first"):
            kc.ConvNeXtModel(TINY["depths"], TINY["dims"])
    finally:
        keras.config.set_image_data_format(before)


def test_input_tensor_an_input_is_the_models_own_input():
    inputs = keras.Input((32, 32, 3), name="pixels")
    model = tiny(input_tensor=inputs)
    assert model.inputs[0] is inputs and isinstance(model, kc.ConvNeXtModel)


def test_input_tensor_from_a_layer_starts_the_model_at_its_source_inputs():
    # As keras.applications: the layers before the tensor are part of the model.
    source = keras.Input((32, 32, 3))
    halved = keras.layers.Rescaling(0.5, name="halve")(source)
    model = tiny(input_tensor=halved, include_top=False, pooling="avg")
    assert model.inputs[0] is source and "halve" in [layer.name for layer in model.layers]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    inner = model.get_layer(model.name)
    np.testing.assert_allclose(model.predict(x, verbose=0), inner.predict(x * 0.5, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match=r"`input_tensor` must be a Keras tensor.*Received: input_tensor=ndarray"):
        tiny(input_tensor=x)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_any_channel_count_with_random_weights(channels):
    # keras.applications' test_application_notop_variable_input_channels, and a top.
    model = tiny(input_shape=(None, None, channels), include_top=False)
    assert tuple(model.output.shape) == (None, None, None, TINY["dims"][-1])
    assert model.get_layer("stages_0").downsample.conv.kernel.shape == (4, 4, channels, TINY["dims"][0])
    assert len(model.get_layer("preprocessing").mean) == channels
    out = tiny(input_shape=(32, 32, channels), classes=3).predict(
        np.random.default_rng(0).uniform(0, 255, (2, 32, 32, channels)), verbose=0)
    assert out.shape == (2, 3) and np.allclose(out.sum(-1), 1, atol=1e-5)


def test_channel_statistics_follow_the_stem_rule():
    from keras_convnext.model import channel_stats

    assert channel_stats([0.1, 0.2, 0.6], 3) == [0.1, 0.2, 0.6]
    assert channel_stats([0.1, 0.2, 0.6], 1) == pytest.approx([0.3])
    assert channel_stats([0.1, 0.2, 0.6], 5) == [0.1, 0.2, 0.6, 0.1, 0.2]


def test_config_is_the_constructor_arguments():
    model = tiny(drop_path_rate=0.2, pooling="max", include_top=False, input_shape=(None, None, 2), name="mine")
    config = model.get_config()
    assert config == {
        "name": "mine", "trainable": True, "depths": list(TINY["depths"]), "dims": list(TINY["dims"]),
        "include_top": False, "include_preprocessing": True, "input_shape": [None, None, 2], "pooling": "max",
        "classes": 7, "classifier_activation": "softmax", "drop_path_rate": 0.2, "layer_scale_init_value": 1e-6,
        "head_init_scale": 1.0, "mean": None, "std": None, "norm_epsilon": 1e-6, "version": 1,
    }
    again = kc.ConvNeXtModel.from_config(config)
    assert again.get_config() == config and again.count_params() == model.count_params()
