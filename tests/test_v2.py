"""ConvNeXt V2: the variant table, the V2 block and its Global Response Normalization.

The shared harness runs on the V2 family in test_model.py (FAMILIES); weights and FCMAE have their
own files.
"""

import keras
import numpy as np
import pytest
from conftest import TINY
from test_model import backend_gradients, tiny_v2_family

import keras_convnext as kc
from keras_convnext.layers import GlobalResponseNorm

BUILDERS = {
    "atto": kc.ConvNeXtV2Atto, "femto": kc.ConvNeXtV2Femto, "pico": kc.ConvNeXtV2Pico, "nano": kc.ConvNeXtV2Nano,
    "tiny": kc.ConvNeXtV2Tiny, "small": kc.ConvNeXtV2Small, "base": kc.ConvNeXtV2Base, "large": kc.ConvNeXtV2Large,
    "huge": kc.ConvNeXtV2Huge,
}
# timm 1.0.31's counts with the 1000-class head (issue 15, CONVNEXT.md).
EXPECTED_PARAMS = {
    "atto": 3_708_400, "femto": 5_233_240, "pico": 9_066_280, "nano": 15_623_800, "tiny": 28_635_496,
    "small": 50_318_440, "base": 88_717_800, "large": 197_956_840, "huge": 660_289_640,
}


@pytest.mark.parametrize("size", list(EXPECTED_PARAMS))
def test_parameter_count_of_every_v2_variant(size):
    model = BUILDERS[size](weights=None)
    assert model.count_params() == EXPECTED_PARAMS[size]
    assert model.name == f"convnextv2_{size}" and model.variant == f"convnextv2_{size}" and model.version == 2
    assert BUILDERS[size].__name__ == f"ConvNeXtV2{size.capitalize()}"
    assert kc.VARIANTS[f"convnextv2_{size}"].params == EXPECTED_PARAMS[size]


def test_huge_has_the_papers_shape():
    variant = kc.VARIANTS["convnextv2_huge"]
    assert (variant.depths, variant.dims) == ((3, 3, 27, 3), (352, 704, 1408, 2816))
    assert variant.title == "ConvNeXt V2-Huge" and variant.timm_name == "convnextv2_huge"


def test_v2_block_has_grn_after_the_gelu_and_no_layer_scale():
    model = kc.ConvNeXtV2Atto(weights=None)
    block = model.get_layer("stages_2").blocks[5]
    assert block.gamma is None and block.grn
    assert isinstance(block.grn_layer, GlobalResponseNorm)
    assert block.grn_layer.gamma.path == "stages_2/block_5/grn/gamma" and block.grn_layer.gamma.shape == (640,)
    assert block.grn_layer.beta.path == "stages_2/block_5/grn/beta"
    assert not any(v.path.endswith("block_5/gamma") for v in model.weights)
    # zero-initialised, as the official code: a fresh GRN is the identity
    assert not np.any(keras.ops.convert_to_numpy(block.grn_layer.gamma))
    assert not np.any(keras.ops.convert_to_numpy(block.grn_layer.beta))
    from keras_convnext import names

    keys = {v.path: names.official_key(v.path) for v in model.weights}
    assert keys["stages_2/block_5/grn/gamma"] == "stages.2.5.grn.gamma"
    assert keys["stages_2/block_5/grn/beta"] == "stages.2.5.grn.beta"
    assert None not in keys.values() and all(names.keras_path(k) == p for p, k in keys.items())


def test_v1_and_v2_of_the_same_shape_are_different_variants():
    v1, v2 = kc.ConvNeXtAtto(weights=None), kc.ConvNeXtV2Atto(weights=None)
    assert (v1.variant, v2.variant) == ("atto", "convnextv2_atto")
    assert v1.get_config()["version"] == 1 and v2.get_config()["version"] == 2


def grn_reference(x, gamma, beta, eps=1e-6):
    """The official GRN, channels last, in float64 NumPy."""
    x = x.astype(np.float64)
    gx = np.sqrt((x ** 2).sum(axis=(1, 2), keepdims=True))
    nx = gx / (gx.mean(axis=-1, keepdims=True) + eps)
    return gamma * (x * nx) + beta + x


def grn_with(gamma, beta, dtype="float32"):
    layer = GlobalResponseNorm(dtype=dtype)
    layer.build((None, 5, 6, gamma.size))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return layer


def test_grn_matches_the_official_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 6, 12)).astype("float32")
    gamma, beta = rng.standard_normal(12).astype("float32"), rng.standard_normal(12).astype("float32")
    out = keras.ops.convert_to_numpy(grn_with(gamma, beta)(x))
    np.testing.assert_allclose(out, grn_reference(x, gamma, beta), atol=1e-5, rtol=1e-5)


def test_grn_gradient_matches_finite_differences():
    # d(sum(w * GRN(x))) / d(x, gamma, beta) in the backend's own autodiff, against central differences
    # of the float64 reference.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 3, 4)).astype("float32")
    gamma, beta = rng.standard_normal(4).astype("float32"), rng.standard_normal(4).astype("float32")
    w = rng.standard_normal(x.shape[1:])  # broadcast over the batch
    inputs = keras.Input((3, 3, 4))
    layer = grn_with(gamma, beta)
    scaled = keras.layers.Lambda(lambda t: t * keras.ops.convert_to_tensor(w, "float32"))(layer(inputs))
    model = keras.Model(inputs, scaled)
    grads = backend_gradients(model, x)
    by_path = dict(zip([v.path.rsplit("/", 1)[-1] for v in model.trainable_variables], grads))

    def objective(x_, g_, b_):
        return float((w * grn_reference(x_, g_, b_)).sum())

    def numeric(arg, index):
        args = [x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64)]
        out = np.zeros_like(args[arg])
        for i in np.ndindex(out.shape):
            hi = [a.copy() for a in args]
            lo = [a.copy() for a in args]
            hi[arg][i] += 1e-5
            lo[arg][i] -= 1e-5
            out[i] = (objective(*hi) - objective(*lo)) / 2e-5
        return out

    np.testing.assert_allclose(by_path["gamma"], numeric(1, None), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(by_path["beta"], numeric(2, None), rtol=1e-3, atol=1e-3)
    # and the input's gradient, through a model whose input is a variable-free chain
    x_grad = input_gradient(model, x)
    np.testing.assert_allclose(x_grad, numeric(0, None), rtol=1e-3, atol=1e-3)


def input_gradient(model, x):
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        t = torch.tensor(x, requires_grad=True)
        model(t).sum().backward()
        return t.grad.numpy()
    if backend == "tensorflow":
        import tensorflow as tf

        t = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            out = tf.reduce_sum(model(t))
        return tape.gradient(out, t).numpy()
    import jax

    return np.asarray(jax.grad(lambda t: model(t).sum())(x))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_grn_statistics_do_not_overflow_in_half_precision(policy):
    # Activations near 300 over a 6x6 map: their squares (9e4 each, 3e6 summed) overflow float16's 65504.
    rng = np.random.default_rng(2)
    x = (300.0 + 50.0 * rng.standard_normal((2, 6, 6, 8))).astype("float32")
    gamma, beta = rng.uniform(0.5, 1.0, 8).astype("float32"), rng.standard_normal(8).astype("float32")
    half = policy.split("_")[1]
    out = keras.ops.convert_to_numpy(grn_with(gamma, beta, dtype=policy)(keras.ops.cast(x, half)))
    assert keras.backend.standardize_dtype(out.dtype) == half
    out = out.astype("float32")
    assert np.isfinite(out).all()
    ref = grn_reference(x.astype(half).astype("float32"), gamma, beta)
    np.testing.assert_allclose(out, ref, rtol=0.02, atol=0.02 * np.abs(ref).max())
    # the naive form, statistics in the compute dtype, is what this guards against
    naive = keras.ops.sum(keras.ops.square(keras.ops.cast(x, half)), axis=(1, 2))
    if half == "float16":
        assert not np.isfinite(keras.ops.convert_to_numpy(naive).astype("float32")).all()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_v2_model_runs_in_half_precision_on_large_activations(policy):
    reference = tiny_v2_family(include_top=True, classes=5, input_shape=(64, 64, 3))
    for stage in reference.stages:  # pwconv1 kernels x500: GRN sees activations in the tens to hundreds
        for block in stage.blocks:
            block.pwconv1.kernel.assign(keras.ops.convert_to_numpy(block.pwconv1.kernel) * 500.0)
    x = np.random.default_rng(3).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    stage, block = reference.stages[0], reference.stages[0].blocks[0]
    h = block.pwconv1(block.norm(block.dwconv(stage.downsample(reference.get_layer("preprocessing")(x)))))
    squares = keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.square(h), axis=(1, 2)))
    assert squares.max() > 65504  # the first GRN's sums of squares are beyond float16's range
    try:
        keras.config.set_dtype_policy(policy)
        mixed = tiny_v2_family(include_top=True, classes=5, input_shape=(64, 64, 3))
    finally:
        keras.config.set_dtype_policy("float32")
    mixed.set_weights(reference.get_weights())
    out = mixed.predict(x, verbose=0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference.predict(x, verbose=0), atol=0.1)


def test_grn_jit_compiles_in_fit_and_predict():
    # The layer alone under jit_compile=True (XLA on TensorFlow and JAX, torch.compile on PyTorch, which
    # takes minutes on a whole model: the whole V2 model runs under jit in the harness's fit on JAX/TF).
    rng = np.random.default_rng(4)
    inputs = keras.Input((6, 6, 8))
    x = grn_with(rng.uniform(0.5, 1.0, 8).astype("float32"), rng.standard_normal(8).astype("float32"))(inputs)
    x = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, x)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    images = rng.standard_normal((4, 6, 6, 8)).astype("float32")
    np.testing.assert_allclose(model.predict(images, verbose=0), keras.ops.convert_to_numpy(model(images)), atol=1e-5)
    before = keras.ops.convert_to_numpy(model.layers[1].gamma).copy()
    history = model.fit(images, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(keras.ops.convert_to_numpy(model.layers[1].gamma), before)


def test_grn_refuses_a_map_of_another_rank():
    with pytest.raises(ValueError, match=r"GlobalResponseNorm takes \(N, H, W, C\).*Received: input_shape=\(None, 8\)"):
        GlobalResponseNorm().build((None, 8))


def test_grn_config_round_trip():
    layer = GlobalResponseNorm(epsilon=1e-5, name="g")
    assert GlobalResponseNorm.from_config(layer.get_config()).epsilon == 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"layer_scale_init_value": 1e-6, "version": 2}, r"V2 has no layer scale.*Received: layer_scale_init_value=1e-06"),
    ({"version": 3}, r"`version` must be 1 \(ConvNeXt\) or 2 \(ConvNeXt V2\)\. Received: version=3"),
    ({"version": True}, r"Received: version=True"),
    ({"version": 2.0, "layer_scale_init_value": None}, r"Received: version=2.0"),
])
def test_version_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kc.ConvNeXtModel(TINY["depths"], TINY["dims"], **kwargs)


def test_v2_builders_take_no_layer_scale_and_refuse_unpublished_imagenet_weights():
    with pytest.raises(TypeError, match="layer_scale_init_value"):
        kc.ConvNeXtV2Atto(weights=None, layer_scale_init_value=1e-6)
    with pytest.raises(ValueError, match=r"ConvNeXt V2-Small has no published ImageNet weights.*weights='imagenet'"):
        kc.ConvNeXtV2Small()


def test_v2_drop_path_defaults_follow_the_official_fine_tuning_recipes():
    assert kc.VARIANTS["convnextv2_atto"].drop_path_rate == 0.1
    assert kc.VARIANTS["convnextv2_tiny"].drop_path_rate == 0.2
    assert kc.VARIANTS["convnextv2_base"].drop_path_rate == 0.1
    model = kc.ConvNeXtV2Atto(weights=None, include_top=False)
    assert model.stages[3].blocks[-1].drop_path.rate == pytest.approx(0.1)


def test_feature_pyramid_of_a_v2_model():
    model = tiny_v2_family(include_top=False, input_shape=(64, 64, 3))
    pyramid = kc.feature_pyramid(model)
    out = pyramid(np.zeros((1, 64, 64, 3), "float32"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "P2": (1, 16, 16, 8), "P3": (1, 8, 8, 16), "P4": (1, 4, 4, 24), "P5": (1, 2, 2, 32)}


def test_predict_takes_a_v2_checkpoint(tmp_path):
    # A V2 file is read as V2 (its GRN tensors), not built as V1 and refused.
    torch = pytest.importorskip("torch")
    from peers import timm_model
    from PIL import Image

    from keras_convnext.predict import predict_files as predict

    torch.save(timm_model("convnextv2_atto", num_classes=1000).state_dict(), tmp_path / "v2.pth")
    image = np.random.default_rng(5).integers(0, 256, (64, 64, 3)).astype("uint8")
    Image.fromarray(image).save(tmp_path / "x.png")
    result = predict([str(tmp_path / "x.png")], weights=str(tmp_path / "v2.pth"), top=2)
    model = kc.ConvNeXtV2Atto(weights=str(tmp_path / "v2.pth"))
    probs = model.predict(kc.load_image(str(tmp_path / "x.png"))[None], verbose=0)[0]
    assert [p["probability"] for p in result[0]["predictions"]] == pytest.approx(np.sort(probs)[::-1][:2], abs=1e-5)


def test_export_refuses_an_encoder_preset_before_any_download(tmp_path):
    with pytest.raises(ValueError, match=r"encoder without a classifier head.*Received: model='convnextv2_atto.fcmae'"):
        kc.export("convnextv2_atto.fcmae", str(tmp_path / "m.onnx"), format="onnx")
