"""Every depthwise-conv formulation gives the same numbers on the current backend."""

import collections
import functools
import itertools
import os

import keras
import numpy as np
import pytest
from scipy.signal import correlate
from scipy.special import erf

from keras_convnext import backend_ops, hardware
from keras_convnext.layers import DepthwiseConv, LayerNorm, PointwiseDense
from conftest import TINY, fake_hardware


def reference(x, kernel, bias):
    """Plain NumPy: per-channel cross-correlation with zero 'same' padding."""
    out = np.empty_like(x, dtype="float64")
    for n in range(x.shape[0]):
        for c in range(x.shape[-1]):
            out[n, :, :, c] = correlate(x[n, :, :, c], kernel[:, :, c, 0], mode="same")
    return out + bias


@pytest.mark.parametrize("formulation", backend_ops.formulations_for())
@pytest.mark.parametrize("k, shape", [(7, (2, 9, 13, 5)), (7, (1, 4, 4, 3)), (3, (2, 6, 5, 8))])
def test_every_formulation_matches_the_reference(formulation, k, shape):
    rng = np.random.default_rng(k)
    x = rng.standard_normal(shape).astype("float32")
    kernel = rng.standard_normal((k, k, shape[-1], 1)).astype("float32")
    bias = rng.standard_normal(shape[-1]).astype("float32")
    out = backend_ops.depthwise_conv_same(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(kernel),
                                          keras.ops.convert_to_tensor(bias), formulation=formulation)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), reference(x, kernel, bias), atol=1e-4)


def test_default_formulation_per_backend():
    for backend, depthwise in (("torch", "torch"), ("jax", "shifted_jax"), ("tensorflow", "keras")):
        for isa in hardware.ISAS:
            for dtype in ("float32", "bfloat16", "float16"):
                assert backend_ops.forms_for(backend, "cpu", isa, dtype)["depthwise"] == depthwise
    assert backend_ops.formulations_for("torch") == ["torch", "shifted", "keras"]
    assert backend_ops.formulations_for("jax") == ["shifted", "shifted_jax", "keras"]
    assert backend_ops.formulations_for("tensorflow") == ["shifted", "keras"]


def test_layer_has_depthwise_conv2d_variables_and_config():
    layer = DepthwiseConv(7, kernel_initializer="ones", name="dw")
    layer.build((None, 8, 8, 6))
    assert [v.path for v in layer.weights] == ["dw/kernel", "dw/bias"]
    assert tuple(layer.kernel.shape) == (7, 7, 6, 1)
    config = layer.get_config()
    assert config["kernel_size"] == 7
    assert DepthwiseConv.from_config(config).get_config() == config
    stock = keras.layers.DepthwiseConv2D(7, padding="same")
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 6)).astype("float32")
    stock.build(x.shape)
    stock.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(stock(x)), atol=1e-5)
    with pytest.raises(ValueError, match="Received: kernel_size=4"):
        DepthwiseConv(4)
    with pytest.raises(ValueError, match="`kernel_size` must be an integer. Received: kernel_size='7'"):
        DepthwiseConv("7")


def _gradients(formulation, x, kernel, bias, upstream, op=None):
    """d(sum(upstream * op(x))) / d(x, kernel, bias), on the current backend (op: the depthwise conv)."""
    op = op or backend_ops.depthwise_conv_same
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def loss(x, kernel, bias):
            return (op(x, kernel, bias, formulation) * upstream).sum()

        return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias)]
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.Variable(v) for v in (x, kernel, bias)]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(op(*tensors, formulation) * upstream)
        return [g.numpy() for g in tape.gradient(loss, tensors)]
    import torch

    tensors = [torch.tensor(v, requires_grad=True) for v in (x, kernel, bias)]
    (op(*tensors, formulation) * torch.tensor(upstream)).sum().backward()
    return [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize("formulation", backend_ops.formulations_for())
def test_every_formulation_has_the_same_gradients(formulation):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 11, 4)).astype("float32")
    kernel = rng.standard_normal((7, 7, 4, 1)).astype("float32")
    bias = rng.standard_normal(4).astype("float32")
    upstream = rng.standard_normal((2, 9, 11, 4)).astype("float32")
    _assert_same_gradients_as_keras(formulation, (x, kernel, bias), upstream, backend_ops.depthwise_conv_same,
                                    ("x", "kernel", "bias"), atol=1e-3)


def _mixed(op, **kwargs):
    """op under mixed precision: the map rounded to bfloat16 on the way in (the variables stay
    float32, as Keras passes them), the bfloat16 result cast back to float32."""
    def wrapped(x, kernel, bias, formulation):
        out = op(keras.ops.cast(x, "bfloat16"), kernel, bias, formulation=formulation, **kwargs)
        assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
        return keras.ops.cast(out, "float32")

    return wrapped


@pytest.mark.parametrize("formulation", backend_ops.formulations_for())
def test_every_formulation_in_mixed_precision_stays_within_bfloat16_rounding(formulation):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 9, 11, 4)).astype("float32")
    kernel = (rng.standard_normal((7, 7, 4, 1)) * 0.1).astype("float32")
    bias = rng.standard_normal(4).astype("float32")
    upstream = rng.standard_normal(x.shape).astype("float32")
    op = _mixed(backend_ops.depthwise_conv_same)
    out = keras.ops.convert_to_numpy(op(*(keras.ops.convert_to_tensor(v) for v in (x, kernel, bias)), formulation))
    # Outputs ~1: bfloat16 keeps 8 bits of mantissa (0.004 relative) in the inputs and result.
    np.testing.assert_allclose(out, reference(x, kernel, bias), atol=0.04, rtol=0.02)
    dx, dkernel, dbias = _gradients(formulation, x, kernel, bias, upstream, op)
    np.testing.assert_allclose(dx, reference(upstream, kernel[::-1, ::-1], np.zeros(4)), atol=0.04, rtol=0.02)
    # Sums of 198 terms: a formulation that accumulates in bfloat16 ("shifted") is off by ~2 ulps of ~10 (0.06).
    np.testing.assert_allclose(dbias, upstream.sum((0, 1, 2)), atol=0.15, rtol=0.02)
    # dkernel[i, j, c] = sum over the map of upstream times x shifted by (i - 3, j - 3).
    padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    expected = np.stack([np.stack([(padded[:, i:i + 9, j:j + 11] * upstream).sum((0, 1, 2)) for j in range(7)])
                         for i in range(7)])[..., None]
    # Sums of 198 products ~10; TensorFlow's own bfloat16 filter gradient ("keras") accumulates in bfloat16 on a CPU
    # without native bfloat16 (AVX2 AMD EPYC: 0.38 off at worst), hence 0.5, far below a misplaced tap's error (~10).
    np.testing.assert_allclose(dkernel, expected, atol=0.5, rtol=0.02)


def _assert_same_gradients_as_keras(formulation, inputs, upstream, op, names, atol=1e-4):
    expected = _gradients("keras", *inputs, upstream, op)
    got = _gradients(formulation, *inputs, upstream, op)
    for name, e, g in zip(names, expected, got):
        np.testing.assert_allclose(g, e, atol=atol, rtol=1e-4, err_msg=name)


def dense_reference(x, kernel, bias, gelu):
    y = x.astype("float64") @ kernel + bias
    return 0.5 * y * (1 + erf(y / np.sqrt(2))) if gelu else y


def _dense_inputs(seed=0, shape=(2, 5, 7, 6), units=24):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype("float32"),
            (rng.standard_normal((shape[-1], units)) * 0.5).astype("float32"),
            rng.standard_normal(units).astype("float32"))


def test_dense_formulations_per_backend():
    # The first is the backend's default.
    assert backend_ops.dense_formulations_for("torch") == ["torch", "addmm_torch", "keras"]
    assert backend_ops.dense_formulations_for("tensorflow") == ["tensorflow", "keras"]
    assert backend_ops.dense_formulations_for("jax") == ["jax", "keras"]
    assert backend_ops.layer_norm_formulations_for("torch") == ["torch", "keras"]
    assert backend_ops.layer_norm_formulations_for("tensorflow") == ["tensorflow", "keras"]
    assert backend_ops.layer_norm_formulations_for("jax") == ["jax", "keras"]


def test_the_backends_own_form_is_the_default(monkeypatch):
    fake_hardware(monkeypatch, "cpu", "avx512")  # an AVX2-only CPU takes torch's second form (the dispatch tests)
    backend = keras.backend.backend()
    expected = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}[backend]
    monkeypatch.setitem(backend_ops.DENSE_FORMULATIONS, expected, lambda *args: "dense default")
    x = keras.ops.ones((1, 2, 2, 3))
    assert backend_ops.dense(x, None, None) == "dense default"
    monkeypatch.setitem(backend_ops.LAYER_NORM_FORMULATIONS, backend, lambda *args: "norm default")
    assert backend_ops.layer_norm(x, None, None, 1e-6) == "norm default"


@pytest.mark.parametrize("formulation", backend_ops.dense_formulations_for())
@pytest.mark.parametrize("gelu", [True, False])
def test_every_dense_formulation_matches_the_reference(formulation, gelu):
    x, kernel, bias = _dense_inputs()
    expected = dense_reference(x, kernel, bias, gelu)

    def run():
        out = backend_ops.dense(*(keras.ops.convert_to_tensor(v) for v in (x, kernel, bias)), gelu=gelu,
                                formulation=formulation)
        assert tuple(out.shape) == (2, 5, 7, 24)
        return keras.ops.convert_to_numpy(out)

    np.testing.assert_allclose(run(), expected, atol=1e-4, rtol=1e-5)
    if keras.backend.backend() == "torch":
        import torch

        # Under no_grad (Keras's predict) the torch formulation takes oneDNN's linear (+GELU).
        with torch.no_grad():
            assert backend_ops._onednn_linear_ok(torch.zeros(2, 3), torch.zeros(3, 4)) == (
                torch.backends.mkldnn.is_available())
            np.testing.assert_allclose(run(), expected, atol=1e-4, rtol=1e-5)
        assert not backend_ops._onednn_linear_ok(torch.zeros(2, 3), torch.zeros(3, 4, requires_grad=True))


@pytest.mark.parametrize("formulation", backend_ops.dense_formulations_for())
def test_dense_formulation_in_bfloat16_stays_within_bfloat16_rounding(formulation):
    x, kernel, bias = _dense_inputs(1)
    expected = dense_reference(x, kernel, bias, True)
    cast = [keras.ops.cast(keras.ops.convert_to_tensor(v), "bfloat16") for v in (x, kernel, bias)]
    out = backend_ops.dense(*cast, gelu=True, formulation=formulation)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    out = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))
    # Inputs rounded to bfloat16 (8 bits of mantissa), the sum over 6 products, the output rounded.
    np.testing.assert_allclose(out, expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("formulation", backend_ops.dense_formulations_for())
@pytest.mark.parametrize("gelu, training", [(True, None), (True, True), (False, None)])
def test_every_dense_formulation_has_the_same_gradients(formulation, gelu, training):
    # `training`: TensorFlow's form computes the GELU in XLA's one pass then (xla_gelu_tensorflow), not the op.
    x, kernel, bias = _dense_inputs(2)
    upstream = np.random.default_rng(5).standard_normal((2, 5, 7, 24)).astype("float32")

    def op(x, kernel, bias, formulation):
        return backend_ops.dense(x, kernel, bias, gelu=gelu, formulation=formulation, training=training)

    _assert_same_gradients_as_keras(formulation, (x, kernel, bias), upstream, op, ("x", "kernel", "bias"))


@pytest.mark.parametrize("formulation", backend_ops.dense_formulations_for())
@pytest.mark.parametrize("gelu, training", [(True, None), (True, True), (False, None)])
def test_dense_in_mixed_precision_and_its_gradients_stay_within_bfloat16_rounding(formulation, gelu, training):
    # The JAX form has its own gradient in mixed precision (every GEMM bfloat16 in, float32 out).
    x, kernel, bias = _dense_inputs(4)
    upstream = np.random.default_rng(7).standard_normal((2, 5, 7, 24)).astype("float32")
    op = _mixed(backend_ops.dense, gelu=gelu, training=training)
    out = keras.ops.convert_to_numpy(op(*(keras.ops.convert_to_tensor(v) for v in (x, kernel, bias)), formulation))
    np.testing.assert_allclose(out, dense_reference(x, kernel, bias, gelu), atol=0.05, rtol=0.02)
    y = x.astype("float64") @ kernel + bias
    dy = upstream * ((0.5 * (1 + erf(y / np.sqrt(2))) + y * np.exp(-y * y / 2) / np.sqrt(2 * np.pi)) if gelu else 1)
    expected = (dy @ kernel.T, x.reshape(-1, 6).T @ dy.reshape(-1, 24), dy.sum((0, 1, 2)))
    got = _gradients(formulation, x, kernel, bias, upstream, op)
    for name, e, g in zip(("x", "kernel", "bias"), expected, got):
        assert g.dtype == np.float32, name
        np.testing.assert_allclose(g, e, atol=0.02 * np.abs(e).max(), rtol=0.03, err_msg=name)


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_dense_scale_add_fuses_only_where_it_can(dtype, atol, monkeypatch):
    x, kernel, bias = _dense_inputs(6, units=24)
    rng = np.random.default_rng(9)
    gamma, shortcut = rng.uniform(0.5, 1.5, 24).astype("float32"), rng.standard_normal((2, 5, 7, 24)).astype("float32")
    expected = shortcut + dense_reference(x, kernel, bias, False) * gamma
    tensors = [keras.ops.convert_to_tensor(v) for v in (x, kernel, bias, gamma, shortcut)]
    tensors[0], tensors[4] = keras.ops.cast(tensors[0], dtype), keras.ops.cast(tensors[4], dtype)
    if keras.backend.backend() != "torch":
        assert backend_ops.dense_scale_add(*tensors) is None  # the compiler fuses it there
        return
    import torch

    with torch.no_grad():
        fake_hardware(monkeypatch, "cpu", "avx2")
        assert backend_ops.dense_scale_add(*tensors) is None  # addmm there, and the block step by step
        fake_hardware(monkeypatch, "cpu", "avx512")
        out = backend_ops.dense_scale_add(*tensors)
        if dtype == "bfloat16" and not backend_ops.onednn_bf16():
            assert out is None  # no oneDNN bfloat16 kernel on this CPU (AVX2 only): the block runs step by step
            return
        assert out.dtype == tensors[0].dtype and tuple(out.shape) == (2, 5, 7, 24)
        np.testing.assert_allclose(out.float().numpy(), expected, atol=atol * np.abs(expected).max())
        # A shortcut of another dtype or shape: not fused.
        assert backend_ops.dense_scale_add(*tensors[:4], tensors[4][..., :12]) is None
    kernel_with_grad = torch.tensor(kernel, requires_grad=True)
    assert backend_ops.dense_scale_add(tensors[0], kernel_with_grad, *tensors[2:]) is None


def test_block_mlp_tiles_the_hidden_map_with_the_plain_numbers_only_where_it_can(monkeypatch):
    # 70 rows in tiles of 16: four whole tiles and a ragged last one.
    x, kernel1, bias1 = _dense_inputs(11, units=24)
    rng = np.random.default_rng(12)
    kernel2, bias2 = (rng.standard_normal((24, 6)) * 0.3).astype("float32"), rng.standard_normal(6).astype("float32")
    gamma, shortcut = rng.uniform(0.5, 1.5, 6).astype("float32"), rng.standard_normal((2, 5, 7, 6)).astype("float32")
    expected = shortcut + (dense_reference(x, kernel1, bias1, True) @ kernel2 + bias2) * gamma
    tensors = [keras.ops.convert_to_tensor(v) for v in (x, kernel1, bias1, kernel2, bias2, gamma, shortcut)]
    fake_hardware(monkeypatch, "cpu", "avx2")
    if keras.backend.backend() != "torch":
        assert backend_ops.block_mlp(*tensors) is None  # under jit the compiler schedules the map's memory
        return
    import torch

    monkeypatch.setattr(backend_ops, "MLP_TILE_ROWS", 16)
    with torch.no_grad():
        out = backend_ops.block_mlp(*tensors)
        assert out.dtype == tensors[0].dtype and tuple(out.shape) == (2, 5, 7, 6)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
        whole = backend_ops.block_mlp_torch(*tensors, rows=10**6)  # one tile: the same sums per row
        np.testing.assert_allclose(out.numpy(), whole.numpy(), atol=1e-6 * np.abs(expected).max())
        assert backend_ops.block_mlp(*tensors[:6], tensors[6][..., :3]) is None  # a shortcut of another shape
        assert backend_ops.block_mlp(*tensors[:6], keras.ops.cast(tensors[6], "float16")) is None  # or dtype
        half = [keras.ops.cast(tensors[0], "bfloat16"), *tensors[1:6], keras.ops.cast(tensors[6], "bfloat16")]
        assert backend_ops.block_mlp(*half) is None  # bfloat16: tiles not measured on a CPU without its arithmetic
        fake_hardware(monkeypatch, "cpu", "avx512")
        assert backend_ops.block_mlp(*tensors) is None  # oneDNN's form there: its fused tail, not tiles (dispatch)
    fake_hardware(monkeypatch, "cpu", "avx2")
    for i in range(len(tensors)):  # a gradient wanted for any operand: the plain path, which has one
        wanting = list(tensors)
        wanting[i] = tensors[i].detach().clone().requires_grad_(True)
        assert backend_ops.block_mlp(*wanting) is None, i
    # Traced (torch.jit.trace: Keras's TorchScript ONNX export), the tile count would be fixed in the graph.
    taken = []

    def traced(x):
        out = backend_ops.block_mlp(x, *tensors[1:])
        taken.append(out is not None)
        return tensors[6] if out is None else out

    with torch.no_grad():
        torch.jit.trace(traced, (tensors[0],), check_trace=False)  # (the check reruns it untraced)
    assert taken == [False]


def _gradients_of_all(op, inputs, upstream):
    """d(sum(upstream * op(*inputs))) / d(each input), float32 NumPy arrays, in the backend's own autodiff."""
    if keras.backend.backend() == "torch":
        import torch

        tensors = [torch.tensor(v, requires_grad=True) for v in inputs]
        (op(*tensors).float() * torch.as_tensor(upstream)).sum().backward()
        return [t.grad.float().numpy() for t in tensors]
    if keras.backend.backend() == "jax":
        import jax

        grads = jax.grad(lambda *a: (op(*a) * upstream).sum(), argnums=range(len(inputs)))(*inputs)
        return [np.asarray(g) for g in grads]
    import tensorflow as tf

    tensors = [tf.Variable(v) for v in inputs]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(op(*tensors) * upstream)
    return [g.numpy() for g in tape.gradient(loss, tensors)]


def _mlp_inputs(seed=13):
    x, kernel1, bias1 = _dense_inputs(seed, units=24)
    rng = np.random.default_rng(seed + 1)
    return (x, kernel1, bias1, (rng.standard_normal((24, 6)) * 0.3).astype("float32"),
            rng.standard_normal(6).astype("float32"), rng.uniform(0.5, 1.5, 6).astype("float32"))


def _mlp_reference(x, kernel1, bias1, kernel2, bias2, gamma, upstream):
    """The MLP's value and its gradients for (x, kernel1, bias1, kernel2, bias2, gamma), in float64."""
    h = x.astype("float64") @ kernel1 + bias1
    cdf, pdf = 0.5 * (1 + erf(h / np.sqrt(2))), np.exp(-h * h / 2) / np.sqrt(2 * np.pi)
    g = h * cdf
    y = g @ kernel2 + bias2
    dy = upstream * gamma
    dh = (dy @ kernel2.T) * (cdf + h * pdf)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    grads = (dh @ kernel1.T, flat(x).T @ flat(dh), dh.sum((0, 1, 2)), flat(g).T @ flat(dy), dy.sum((0, 1, 2)),
             (upstream * y).sum((0, 1, 2)))
    return y * gamma, grads


NAMES = ("x", "kernel1", "bias1", "kernel2", "bias2", "gamma")


@pytest.mark.parametrize("isa", ["avx2", "amx"])
def test_the_mlp_keeps_one_hidden_map_for_its_gradient_with_the_plain_numbers(isa, monkeypatch, capsys):
    # backend_ops.mlp: GELU and pwconv2 rematerialised together on JAX's and TensorFlow's CPU forms, on every CPU
    # kind; eager torch and accelerators run the block's MLP step by step (None).
    fake_hardware(monkeypatch, "cpu", isa)
    inputs = _mlp_inputs()
    upstream = np.random.default_rng(15).standard_normal((2, 5, 7, 6)).astype("float32")
    expected, expected_grads = _mlp_reference(*inputs, upstream)
    backend = keras.backend.backend()
    tensors = [keras.ops.convert_to_tensor(v) for v in inputs]
    if backend == "torch":
        assert backend_ops.mlp(*tensors) is None
        return
    out = backend_ops.mlp(*tensors)
    assert keras.backend.standardize_dtype(out.dtype) == "float32" and tuple(out.shape) == (2, 5, 7, 6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
    for name, e, g in zip(NAMES, expected_grads, _gradients_of_all(backend_ops.mlp, inputs, upstream)):
        np.testing.assert_allclose(g, e, atol=1e-5 * np.abs(e).max(), rtol=0, err_msg=name)
    # No layer scale (a V1 model built with layer_scale_init_value=0): pwconv2's output itself.
    no_scale = keras.ops.convert_to_numpy(backend_ops.mlp(*tensors[:5]))
    np.testing.assert_allclose(no_scale, expected / inputs[5], atol=1e-5 * np.abs(expected).max(), rtol=0)
    fake_hardware(monkeypatch, "gpu", "other")
    assert backend_ops.mlp(*tensors) is None  # Keras's own ops there
    fake_hardware(monkeypatch, "cpu", isa)
    if backend == "tensorflow":  # under tf.function too, where the gradient's graph is built with the step's
        tf_checks_of_the_mlp_in_a_graph(inputs, upstream, expected_grads)
        return
    # What the gradient keeps: of the 4C-wide maps, pwconv1's output alone.
    import jax

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(lambda *a: backend_ops.mlp(*a).sum(), *tensors)
    kept = capsys.readouterr().out.splitlines()
    maps = [line.split()[0] for line in kept if line.split()[0].count(",") == 3]  # 4-D residuals
    assert [m for m in maps if m.endswith(",24]")] == ["f32[2,5,7,24]"], kept


NORM_NAMES = ("x", "ln_gamma", "ln_beta") + NAMES[1:] + ("dw_kernel", "dw_bias")


def _norm_mlp_inputs(seed=21, conv=False):
    x, ln_gamma, ln_beta = _norm_inputs(seed, shape=(2, 5, 7, 6))
    rng = np.random.default_rng(seed + 2)
    depthwise = (rng.standard_normal((7, 7, 6, 1)).astype("float32") * 0.2, rng.standard_normal(6).astype("float32"))
    return (x, ln_gamma, ln_beta) + _mlp_inputs(seed)[1:] + (depthwise if conv else ())


def _norm_mlp(x, ln_gamma, ln_beta, *params, training=True, dtype="float32", conv=False):
    mlp_params, conv_params = (params[:-2], params[-2:]) if conv else (params, None)
    out = backend_ops.mlp(keras.ops.cast(x, dtype), *mlp_params, training=training, norm=(ln_gamma, ln_beta, 1e-6),
                          conv=conv_params)
    return out if out is None else keras.ops.cast(out, "float32")


def _step_by_step_norm_mlp(x, ln_gamma, ln_beta, *params, dtype="float32", conv=False):
    """(The depthwise conv,) LayerNorm, then the MLP, in Keras's own ops: the maths `mlp(..., norm=..., conv=...)`
    computes at once."""
    x = keras.ops.cast(x, dtype)
    if conv:
        x, params = backend_ops.depthwise_conv_same_keras(x, *params[-2:]), params[:-2]
    kernel1, bias1, kernel2, bias2, gamma = params
    normed = backend_ops.layer_norm_keras(x, ln_gamma, ln_beta, 1e-6)
    hidden = backend_ops.dense_keras(keras.ops.cast(normed, dtype), kernel1, bias1, True)
    return keras.ops.cast(backend_ops.dense_keras(hidden, kernel2, bias2, False), "float32") * gamma


@pytest.mark.parametrize("isa", ["avx2", "amx"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("conv", [False, True])
def test_the_normalised_mlp_keeps_layer_norms_input_alone_for_its_gradient_with_the_plain_numbers(
        isa, dtype, conv, monkeypatch, capsys):
    # backend_ops.mlp with `norm`: LayerNorm and pwconv1 under one gradient (JAX: one jax.checkpoint, for a
    # bfloat16 map only; TensorFlow in training: one tf.custom_gradient of XLA's LayerNorm), so LayerNorm's
    # output is recomputed, not kept; with `conv` too (TensorFlow only) the depthwise conv before it, so the
    # gradient keeps the block's input alone.
    fake_hardware(monkeypatch, "cpu", isa)
    inputs = _norm_mlp_inputs(conv=conv)
    upstream = np.random.default_rng(23).standard_normal((2, 5, 7, 6)).astype("float32")
    tensors = [keras.ops.convert_to_tensor(v) for v in inputs]
    backend = keras.backend.backend()
    fused, plain = (functools.partial(f, dtype=dtype, conv=conv) for f in (_norm_mlp, _step_by_step_norm_mlp))
    if backend == "torch" or (backend == "jax" and (dtype == "float32" or conv)):
        assert fused(*tensors) is None  # step by step (the block convolves, normalises, then calls its MLP)
        return
    tolerance = 1e-5 if dtype == "float32" else 0.03
    expected = keras.ops.convert_to_numpy(plain(*tensors))
    expected_grads = _gradients_of_all(plain, inputs, upstream)
    out = fused(*tensors)
    assert tuple(out.shape) == (2, 5, 7, 6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), expected, atol=tolerance * np.abs(expected).max(),
                               rtol=0)
    for name, e, g in zip(NORM_NAMES, expected_grads, _gradients_of_all(fused, inputs, upstream)):
        assert np.abs(e).max() > 0, name
        np.testing.assert_allclose(g, e, atol=tolerance * np.abs(e).max(), rtol=0, err_msg=name)
    fake_hardware(monkeypatch, "gpu", "other")
    assert fused(*tensors) is None  # Keras's own ops there
    fake_hardware(monkeypatch, "cpu", isa)
    if backend == "tensorflow":
        tf_checks_of_the_normalised_mlp_in_a_graph(fused, inputs, upstream, expected_grads, tolerance, conv,
                                                   monkeypatch)
        return
    # What the gradient keeps: of the C-wide maps, the input alone (LayerNorm's; pwconv1's is recomputed).
    import jax

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(lambda *a: fused(*a).sum(), *tensors)
    kept = capsys.readouterr().out.splitlines()
    maps = [line.split()[0] for line in kept if line.split()[0].count(",") == 3]  # 4-D residuals
    assert sorted(maps) == ["bf16[2,5,7,24]", "bf16[2,5,7,6]"], kept  # pwconv1's output, LayerNorm's input


def tf_checks_of_the_normalised_mlp_in_a_graph(fused, inputs, upstream, expected_grads, tolerance, conv,
                                               monkeypatch):
    """TensorFlow: in a tf.function, the training form's gradient with LayerNorm's output (and the depthwise
    conv's) recomputed once the upstream gradient is there; outside training, or without XLA, None (the block
    then runs the step before first)."""
    import tensorflow as tf

    variables = [tf.Variable(v) for v in inputs]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(fused(*variables) * upstream)
        return tape.gradient(loss, variables)

    for name, e, g in zip(NORM_NAMES, expected_grads, step()):
        np.testing.assert_allclose(g.numpy(), e, atol=tolerance * np.abs(e).max(), rtol=0, err_msg=name)
    ops = step.get_concrete_function().graph.get_operations()
    calls = [op for op in ops if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    # Forward: LayerNorm, GELU; backward: GELU and slope (mlp_tensorflow), LayerNorm recomputed and its backward.
    assert len(calls) == 6, [op.type for op in calls]
    # The backward's reads of the saved input (LayerNorm's two calls; with `conv`, the recomputed convolution
    # and its kernel gradient) read an Identity of it that waits on the upstream gradient (a control input):
    # TensorFlow would otherwise recompute in the forward pass and keep the map.
    convs = [op for op in ops if op.type == "DepthwiseConv2dNative"]
    readers = (convs[1:] + [op for op in ops if op.type == "DepthwiseConv2dNativeBackpropFilter"]) if conv \
        else calls[-2:]
    x = (convs[0] if conv else calls[0]).inputs[0].name
    late = [op for op in ops if any(t.op.type == "Identity" and t.op.control_inputs and t.op.inputs[0].name == x
                                    for t in op.inputs)]
    assert len(readers) == 2 and late == readers, ([op.name for op in readers], [op.name for op in late])
    assert fused(*variables, training=None) is None  # inference: TensorFlow's ops, fused by grappler
    monkeypatch.setattr(backend_ops, "xla_gelu_tensorflow", lambda: None)  # a TensorFlow without XLA's CPU JIT
    assert fused(*variables) is None


@pytest.mark.parametrize("op", ["dense", "dense_gelu", "mlp", "norm_mlp"])
def test_bias_gradients_of_a_bfloat16_map_are_summed_without_stalling(op):
    # A bias's gradient sums a bfloat16 map over every row (50,176 at ConvNeXt-T's stage 0, batch 16).
    # TensorFlow's BiasAddGrad accumulates it in bfloat16 and stalls: 42% off at 1,024 rows of values near 3,
    # 99% at 50,176. Every form's sums are within bfloat16's rounding of the exact sum of the upstream.
    rng = np.random.default_rng(29)
    rows, channels = 8192, 4
    x = (rng.standard_normal((1, rows, 1, channels)) * 0.1 + 5).astype("float32")  # dense_gelu: GELU's slope 1
    upstream = (rng.standard_normal((1, rows, 1, channels)) * 0.1 + 3).astype("float32")
    kernel, bias = np.eye(channels, dtype="float32"), np.zeros(channels, "float32")
    wide, narrow, wide_bias = np.tile(kernel, (1, 4)) * 0.25, np.tile(kernel, (4, 1)), np.zeros(4 * channels, "float32")
    half = lambda t: keras.ops.cast(t, "bfloat16")  # noqa: E731

    def forward(x, bias, *rest):
        if op in ("dense", "dense_gelu"):
            return backend_ops.dense(half(x), kernel, bias, gelu=op == "dense_gelu", training=True)
        if op == "mlp":
            out = backend_ops.mlp(half(x), wide, rest[0], narrow, bias, None, training=True)
        else:
            out = backend_ops.mlp(half(x), wide, rest[0], narrow, bias, None, training=True,
                                  norm=(np.ones(channels, "float32"), np.zeros(channels, "float32"), 1e-6))
        if out is None:  # eager torch: the block runs step by step, through `dense`
            out = backend_ops.dense(backend_ops.dense(half(x), wide, rest[0], gelu=True), narrow, bias)
        return out

    grads = _gradients_of_all(forward, (x, bias) + ((wide_bias,) if op in ("mlp", "norm_mlp") else ()), upstream)
    exact = keras.ops.convert_to_numpy(keras.ops.cast(half(upstream), "float32")).astype("float64").sum((0, 1, 2))
    np.testing.assert_allclose(grads[1], exact, rtol=0.01, err_msg="the output bias")
    assert np.abs(grads[0]).max() > 0
    if op in ("mlp", "norm_mlp"):  # pwconv1's bias: upstream through pwconv2 and GELU's slope, summed
        assert np.abs(grads[2]).min() > 0.25 * exact.max(), grads[2]


def tf_checks_of_the_mlp_in_a_graph(inputs, upstream, expected_grads):
    """TensorFlow: the gradient inside one tf.function, and its recomputation ordered after the upstream gradient,
    with the GELU in XLA's one pass and in TensorFlow's ops (no XLA), the forward for training and for inference."""
    import tensorflow as tf

    variables = [tf.Variable(v) for v in inputs]
    xla = backend_ops.xla_gelu_tensorflow()
    assert xla is not None  # this TensorFlow has XLA's CPU JIT (the pip wheels do)
    for compiles in (True, False):
        for training in (True, None):
            @tf.function
            def step():
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(backend_ops.mlp(*variables, training=training) * upstream)
                return tape.gradient(loss, variables)

            with pytest.MonkeyPatch.context() as patch:
                if not compiles:  # what a TensorFlow without XLA's CPU JIT runs
                    patch.setattr(backend_ops, "xla_gelu_tensorflow", lambda: None)
                for name, e, g in zip(NAMES, expected_grads, step()):
                    np.testing.assert_allclose(g.numpy(), e, atol=1e-5 * np.abs(e).max(), rtol=0,
                                               err_msg=f"{name} xla={compiles} training={training}")
                graph = step.get_concrete_function().graph
            ops = graph.get_operations()
            calls = [op for op in ops if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
            forward = [op for op in ops if op.type == "Erfc"]  # tf.nn.gelu's
            xla = compiles and training  # XLA's forms only in training: a graph traced for inference has none
            # The backward's GELU and slope (XLA's two calls, or the ops' Erf) read an Identity of h that has a
            # control input, the upstream gradient: TensorFlow would otherwise run them, and keep their maps,
            # during the forward pass.
            recomputed = calls[-2:] if xla else [op for op in ops if op.type == "Erf"]
            assert len(calls) == (3 if xla else 0), [op.type for op in calls]
            if xla:  # the forward's GELU too
                assert not forward
            else:  # one forward, one recomputed for pwconv2's kernel gradient
                assert sorted(_reads_a_late_identity(op) for op in forward) == [False, True]
            assert recomputed and all(_reads_a_late_identity(op) for op in recomputed), [
                (op.name, [t.op.type for t in op.inputs]) for op in recomputed]


def _reads_a_late_identity(op, depth=3):
    """Whether `op` reads, directly or up to `depth` - 1 ops up, the recomputation's Identity of h: an Identity of
    pwconv1's BiasAdd with a control input (not `_after`'s identities of the variables)."""
    def late(t):
        return t.op.type == "Identity" and t.op.control_inputs and t.op.inputs[0].op.type == "BiasAdd"

    return any(late(t) or (depth > 1 and _reads_a_late_identity(t.op, depth - 1)) for t in op.inputs)


@pytest.mark.parametrize("policy, path", [
    ("float32", "mlp"), ("mixed_bfloat16", "mlp"),  # a V1 block's MLP (backend_ops.mlp_tensorflow)
    ("float32", "dense"),  # V1 step by step: dense_tensorflow for pwconv1, dense_scaled for pwconv2
    ("mixed_bfloat16", "v2"),  # GRN between the pwconvs: dense_tensorflow for both
])
def test_a_traced_model_reads_each_pointwise_kernel_once_its_layer_input_is_there(policy, path, monkeypatch):
    # TensorFlow runs a variable's read, cast and layer-scale fold as soon as the variable is there: without
    # backend_ops._after every block's copies are made at the start of a tf.function and held (ConvNeXt-T:
    # the whole model's pwconv kernels, 50-100 MB of inference peak). Elsewhere _after changes nothing.
    import keras_convnext as kc

    fake_hardware(monkeypatch, "cpu", "avx512")
    a, b = keras.ops.ones((2,)), keras.ops.zeros((3,))
    if keras.backend.backend() != "tensorflow":
        assert backend_ops._after(a, a, b)[1] is b
        return
    import tensorflow as tf

    assert backend_ops._after(a, a, b)[1] is b  # eager: nothing to order
    keras.config.set_dtype_policy(policy)
    if path == "dense":
        monkeypatch.setattr(backend_ops, "MLP_REMAT_FORMULATIONS", {})
    model = kc.ConvNeXt(**TINY, input_shape=(32, 32, 3), weights=None, include_top=False,
                        **({"version": 2, "layer_scale_init_value": None} if path == "v2" else {}))
    kernels = {id(v.value.handle): v.path for v in model.variables
               if v.path.endswith(("pwconv1/kernel", "pwconv1/bias", "pwconv2/kernel", "pwconv2/bias"))
               or (v.path.endswith("/gamma") and v.path.split("/")[-2].startswith("block_"))}  # the layer scale
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((2, 32, 32, 3), "float32")).graph
    by_placeholder = {internal.op.name: kernels[id(external)] for external, internal in graph.captures
                      if id(external) in kernels}
    reads = [op for op in graph.get_operations() if op.type == "ReadVariableOp"
             and op.inputs[0].op.name in by_placeholder]
    assert len({by_placeholder[op.inputs[0].op.name] for op in reads}) == len(kernels), (len(reads), len(kernels))
    # Each read once: a form that gives up (the LayerNorm + MLP form outside training) must do so before reading
    # (a graph keeps, and runs, reads nothing uses).
    twice = [path for path, n in collections.Counter(by_placeholder[op.inputs[0].op.name] for op in reads).items()
             if n > 1]
    assert not twice, twice
    early = [by_placeholder[op.inputs[0].op.name] for op in reads if not op.control_inputs]
    assert not early, early


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_mlp_in_mixed_precision_stays_within_half_precision_rounding(dtype, monkeypatch):
    # The layer scale folds into pwconv2 in bfloat16 and multiplies the output in float16 (backend_ops._fold).
    fake_hardware(monkeypatch, "cpu", "avx2")
    inputs = _mlp_inputs(17)
    upstream = np.random.default_rng(18).standard_normal((2, 5, 7, 6)).astype("float32")
    expected, expected_grads = _mlp_reference(*inputs, upstream)

    def op(x, *variables):
        out = backend_ops.mlp(keras.ops.cast(x, dtype), *variables)
        assert keras.backend.standardize_dtype(out.dtype) == dtype
        return keras.ops.cast(out, "float32")

    if keras.backend.backend() == "torch":
        assert backend_ops.mlp(keras.ops.cast(inputs[0], dtype), *inputs[1:]) is None
        return
    out = keras.ops.convert_to_numpy(op(*(keras.ops.convert_to_tensor(v) for v in inputs)))
    np.testing.assert_allclose(out, expected, atol=0.03 * np.abs(expected).max(), rtol=0.03)
    for name, e, g in zip(NAMES, expected_grads, _gradients_of_all(op, inputs, upstream)):
        assert g.dtype == np.float32, name
        np.testing.assert_allclose(g, e, atol=0.03 * np.abs(e).max(), rtol=0.03, err_msg=name)
    # Where the scale goes: ConvNeXt's initial 1e-6 times a kernel would be subnormal in float16, so there it
    # multiplies the output; in bfloat16 (float32's range) it is folded into the kernel and bias.
    kernel, bias, gamma = inputs[3], inputs[4], np.full(6, 1e-6, "float32")
    folded_kernel, folded_bias, scale = backend_ops._fold(kernel, bias, gamma, dtype)
    if dtype == "float16":
        assert scale is gamma and folded_kernel is kernel and folded_bias is bias
    else:
        assert scale is None
        np.testing.assert_allclose(keras.ops.convert_to_numpy(folded_kernel), kernel * 1e-6, rtol=1e-6)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(folded_bias), bias * 1e-6, rtol=1e-6)


def test_pointwise_dense_is_dense_with_the_same_numbers_and_config():
    x, kernel, bias = _dense_inputs(3)
    for activation in ("gelu", None, "relu"):  # relu: not fused, Dense's own call
        layer = PointwiseDense(24, activation=activation, name="pw")
        stock = keras.layers.Dense(24, activation=activation)
        layer.build(x.shape)
        stock.build(x.shape)
        layer.set_weights([kernel, bias])
        stock.set_weights([kernel, bias])
        assert [v.path for v in layer.weights] == ["pw/kernel", "pw/bias"]
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(stock(x)),
                                   atol=1e-5, err_msg=str(activation))
        config = layer.get_config()
        assert PointwiseDense.from_config(config).get_config() == config
    # LoRA goes through Dense's call: the same output as a stock Dense with the same LoRA weights.
    layer, stock = PointwiseDense(24, activation="gelu"), keras.layers.Dense(24, activation="gelu")
    for dense in (layer, stock):
        dense.build(x.shape)
        dense.set_weights([kernel, bias])
        dense.enable_lora(2)
        dense.lora_kernel_a.assign(np.full((6, 2), 0.2, "float32"))
        dense.lora_kernel_b.assign(np.full((2, 24), 0.3, "float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(stock(x)), atol=1e-5)
    assert np.abs(keras.ops.convert_to_numpy(layer(x)) - dense_reference(x, kernel, bias, True)).max() > 0.01


def layer_norm_reference(x, gamma, beta, epsilon):
    x = x.astype("float64")
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta


def _norm_inputs(seed=0, shape=(2, 5, 7, 16)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype("float32") * 3 + 1, rng.standard_normal(shape[-1]).astype("float32"),
            rng.standard_normal(shape[-1]).astype("float32"))


@pytest.mark.parametrize("formulation", backend_ops.layer_norm_formulations_for())
@pytest.mark.parametrize("training", [None, True])  # TensorFlow's form: Keras's ops, or XLA's in training
def test_every_layer_norm_formulation_matches_the_reference(formulation, training):
    x, gamma, beta = _norm_inputs()
    out = backend_ops.layer_norm(*(keras.ops.convert_to_tensor(v) for v in (x, gamma, beta)), 1e-6, formulation,
                                 training=training)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), layer_norm_reference(x, gamma, beta, 1e-6),
                               atol=1e-5, rtol=1e-5)
    # A bfloat16 map with float32 gamma and beta (mixed precision): statistics in float32, the
    # result in bfloat16 within its rounding (8 bits of mantissa on values up to ~5).
    bf16 = keras.ops.cast(keras.ops.convert_to_tensor(x), "bfloat16")
    out = backend_ops.layer_norm(bf16, keras.ops.convert_to_tensor(gamma), keras.ops.convert_to_tensor(beta),
                                 1e-6, formulation, training=training)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    expected = layer_norm_reference(keras.ops.convert_to_numpy(keras.ops.cast(bf16, "float32")), gamma, beta, 1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")), expected, atol=0.04)


@pytest.mark.parametrize("formulation", backend_ops.layer_norm_formulations_for())
@pytest.mark.parametrize("training", [None, True])
def test_every_layer_norm_formulation_has_the_same_gradients(formulation, training):
    x, gamma, beta = _norm_inputs(1)
    upstream = np.random.default_rng(6).standard_normal(x.shape).astype("float32")

    def op(x, gamma, beta, formulation):
        return backend_ops.layer_norm(x, gamma, beta, 1e-6, formulation, training=training)

    _assert_same_gradients_as_keras(formulation, (x, gamma, beta), upstream, op, ("x", "gamma", "beta"))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's LayerNorm form")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensorflow_layer_norm_in_training_is_xla_with_the_plain_numbers_or_keras_without_xla(dtype, monkeypatch):
    # In training, forward and backward are XLA-compiled (statistics in float32, recomputed in the backward);
    # otherwise, and where XLA cannot compile, Keras's ops: the same values and gradients, inside a tf.function.
    import tensorflow as tf

    x, gamma, beta = _norm_inputs(3)
    upstream = np.random.default_rng(9).standard_normal(x.shape).astype("float32")
    xs = tf.cast(x, dtype)
    ref_x = tf.cast(xs, "float64").numpy()
    tolerance = 1e-5 if dtype == "float32" else 0.02
    # epsilon 1e-6 (ConvNeXt's) and 4, of the order of the inputs' variance (9): a form that drops it, or
    # compiles one epsilon for another, fails the second
    for compiles, training, epsilon in itertools.product((True, False), (True, None), (1e-6, 4.0)):
        expected = layer_norm_reference(ref_x, gamma, beta, epsilon)
        mean = ref_x.mean(-1, keepdims=True)
        inv = 1 / np.sqrt(((ref_x - mean) ** 2).mean(-1, keepdims=True) + epsilon)
        xhat, gy = (ref_x - mean) * inv, upstream * gamma
        expected_grads = (inv * (gy - gy.mean(-1, keepdims=True) - xhat * (gy * xhat).mean(-1, keepdims=True)),
                          (upstream * xhat).sum((0, 1, 2)), upstream.sum((0, 1, 2)))
        variables = [tf.Variable(xs), tf.Variable(gamma), tf.Variable(beta)]

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                out = backend_ops.layer_norm(*variables, epsilon, "tensorflow", training=training)
                loss = tf.reduce_sum(tf.cast(out, tf.float32) * upstream)
            return out, tape.gradient(loss, variables)

        with pytest.MonkeyPatch.context() as patch:
            if not compiles:  # what a TensorFlow without XLA's CPU JIT runs: the probe says None
                patch.setattr(backend_ops, "xla_gelu_tensorflow", lambda: None)
            out, grads = step()
            graph = step.get_concrete_function().graph
        where = f"xla={compiles} training={training} epsilon={epsilon}"
        assert out.dtype == dtype, where
        np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected,
                                   atol=tolerance * 4 * np.abs(expected).max(), rtol=0, err_msg=where)
        for name, e, g in zip(("x", "gamma", "beta"), expected_grads, grads):
            np.testing.assert_allclose(tf.cast(g, tf.float32).numpy(), e, atol=tolerance * 4 * np.abs(e).max(),
                                       rtol=0, err_msg=f"{name} {where}")
        calls = [op for op in graph.get_operations() if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
        assert len(calls) == (2 if compiles and training else 0), where  # forward and backward, compiled


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's LayerNorm form")
def test_tensorflow_layer_norm_in_training_takes_maps_of_any_shape_and_rank():
    # The compiled functions are traced with reduce_retracing, so after a few shapes TensorFlow traces them for
    # an unknown shape, even an unknown rank: the gradient's sums must not need the rank (a bfloat16 ConvNeXt-T
    # step failed on that once).
    import tensorflow as tf

    rng = np.random.default_rng(10)
    for shape in [(5, 8), (2, 5, 8), (2, 3, 5, 8), (4, 3, 3, 8), (1, 2, 2, 2, 8), (3, 8), (2, 7, 8)]:
        x = tf.constant(rng.standard_normal(shape).astype("float32"))
        gamma, beta = tf.Variable(rng.standard_normal(8).astype("float32")), tf.Variable(np.zeros(8, "float32"))
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = backend_ops.layer_norm(x, gamma, beta, 1e-6, "tensorflow", training=True)
            loss = tf.reduce_sum(out * out)
        dx, dgamma = tape.gradient(loss, [x, gamma])
        with tf.GradientTape() as tape:
            tape.watch(x)
            plain = backend_ops.layer_norm(x, gamma, beta, 1e-6, "keras")
            loss = tf.reduce_sum(plain * plain)
        plain_dx, plain_dgamma = tape.gradient(loss, [x, gamma])
        for got, want in ((out, plain), (dx, plain_dx), (dgamma, plain_dgamma)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-4, err_msg=str(shape))


def test_layer_norm_is_layer_normalization_with_the_same_numbers_and_config():
    x, gamma, beta = _norm_inputs(2)
    for kwargs in ({}, {"axis": (2, 3)}, {"center": False}):  # the last two: the parent's own call
        layer = LayerNorm(epsilon=1e-6, name="ln", **kwargs)
        stock = keras.layers.LayerNormalization(epsilon=1e-6, **kwargs)
        layer.build(x.shape)
        stock.build(x.shape)
        weights = [np.broadcast_to(w, v.shape) for w, v in zip((gamma, beta), stock.weights)]
        layer.set_weights(weights)
        stock.set_weights(weights)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(stock(x)),
                                   atol=1e-5, err_msg=str(kwargs))
        config = layer.get_config()
        assert LayerNorm.from_config(config).get_config() == config
    assert isinstance(layer, keras.layers.LayerNormalization)


def test_jax_gets_the_memory_ordered_xla_schedule_unless_the_user_chose_one():
    add = backend_ops.prefer_memory_optimized_xla_schedule
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert add(environ, "jax")
    assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_enable_concurrency_optimized_scheduler=false"
    assert not add(environ, "jax")  # once only
    environ = {}
    assert add(environ, "jax") and environ["XLA_FLAGS"] == backend_ops.XLA_MEMORY_SCHEDULE
    for chosen in ("--xla_cpu_enable_concurrency_optimized_scheduler=true",
                   "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"):
        environ = {"XLA_FLAGS": chosen}
        assert not add(environ, "jax") and environ == {"XLA_FLAGS": chosen}
    for backend in ("tensorflow", "torch"):
        environ = {}
        assert not add(environ, backend) and environ == {}
    if keras.backend.backend() == "jax":  # this process: set at import, before JAX started its CPU client
        import os

        assert "xla_cpu_enable_concurrency_optimized_scheduler" in os.environ["XLA_FLAGS"]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bfloat16_inference_runs_with_and_without_native_bfloat16(native_bf16, monkeypatch):
    # On an AVX2-only CPU oneDNN has no bfloat16 inner product: the torch forms must take addmm there,
    # chosen by what the CPU has (onednn_bf16), and give the same numbers as the float32 model.
    from conftest import TINY

    import keras_convnext as kc

    if keras.backend.backend() == "torch":
        if native_bf16 and not backend_ops.onednn_bf16():
            pytest.skip("this CPU has no oneDNN bfloat16 kernels")
        monkeypatch.setattr(backend_ops, "onednn_bf16", lambda: native_bf16)
        import torch

        with torch.no_grad():
            bf16 = torch.zeros(2, 3, dtype=torch.bfloat16)
            assert backend_ops._onednn_linear_ok(bf16, bf16.new_zeros(3, 4)) == native_bf16
            assert backend_ops._onednn_linear_ok(torch.zeros(2, 3), torch.zeros(3, 4)) == (
                torch.backends.mkldnn.is_available())
    x = np.random.default_rng(3).integers(0, 256, (2, 40, 40, 3)).astype("uint8")
    reference = kc.ConvNeXt(**TINY, weights=None, include_top=False, pooling="avg", input_shape=(40, 40, 3))
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = kc.ConvNeXt(**TINY, weights=None, include_top=False, pooling="avg", input_shape=(40, 40, 3))
    model.set_weights(reference.get_weights())
    out = model.predict(x, verbose=0)
    expected = reference.predict(x, verbose=0)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, atol=0.05 * np.abs(expected).max(), rtol=0)


def test_bfloat16_inference_on_a_cpu_limited_to_avx2():
    # oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA) is the AMD EPYC / AVX2-only case for real: its bfloat16
    # inner product does not exist there, and predict under mixed_bfloat16 must still run.
    if keras.backend.backend() == "tensorflow":
        # TensorFlow decides by the CPU's own flags (cpuid), not by oneDNN's cap: capped, it asks oneDNN for
        # kernels that a real AVX2 CPU would never be asked for (there TF keeps bfloat16 in Eigen).
        pytest.skip("ONEDNN_MAX_CPU_ISA makes a CPU TensorFlow cannot see; TF checks cpuid itself")
    import subprocess
    import sys

    script = (
        "import numpy as np, keras, keras_convnext as kc\n"
        "from keras_convnext import backend_ops\n"
        "keras.config.set_dtype_policy('mixed_bfloat16')\n"
        "m = kc.ConvNeXt((1, 1, 2, 1), (8, 16, 24, 32), weights=None, input_shape=(32, 32, 3), classes=5)\n"
        "out = m.predict(np.zeros((2, 32, 32, 3), 'uint8'), verbose=0)\n"
        "print('native', backend_ops.onednn_bf16() if keras.backend.backend() == 'torch' else None,"
        " 'ok', bool(np.isfinite(out).all()), out.shape)\n"
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    native = "False" if keras.backend.backend() == "torch" else "None"
    assert f"native {native} ok True (2, 5)" in done.stdout


# ---- dispatch: which form runs on which device and CPU ------------------------------------------

CPU_FORMS = {"jax": ("shifted_jax", "jax", "jax"), "torch": ("torch", "torch", "torch"),
             "tensorflow": ("keras", "tensorflow", "tensorflow")}


def cpu_forms(backend, isa):
    # On an AVX2-only CPU torch's Dense takes addmm at inference too (docs/dispatch.md).
    return ("torch", "addmm_torch", "torch") if (backend, isa) == ("torch", "avx2") else CPU_FORMS[backend]


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_dispatch_table_gives_cpu_forms_on_cpus_and_keras_ops_on_accelerators(backend):
    names = ("depthwise", "dense", "layer_norm")
    for isa in hardware.ISAS:
        for dtype in ("float32", "bfloat16", "float16"):
            assert backend_ops.forms_for(backend, "cpu", isa, dtype) == dict(zip(names, cpu_forms(backend, isa)))
            for device in ("gpu", "tpu"):
                assert backend_ops.forms_for(backend, device, isa, dtype) == dict.fromkeys(names, "keras")
    # every form the table names exists and runs on its backend
    for row in backend_ops.DISPATCH:
        if row[0] in (backend, backend_ops.ANY):
            assert row[4] in backend_ops.formulations_for(backend)
            assert row[5] in backend_ops.dense_formulations_for(backend)
            assert row[6] in backend_ops.layer_norm_formulations_for(backend)


@pytest.mark.parametrize("device, isa", [("gpu", "other"), ("tpu", "other"), ("cpu", "amx"), ("cpu", "avx2")])
def test_the_ops_follow_the_detected_device(device, isa, monkeypatch):
    fake_hardware(monkeypatch, device, isa)
    calls = []
    for table in (backend_ops.FORMULATIONS, backend_ops.DENSE_FORMULATIONS, backend_ops.LAYER_NORM_FORMULATIONS):
        for name, fn in list(table.items()):
            monkeypatch.setitem(table, name, lambda *args, _n=name, _fn=fn: calls.append(_n) or _fn(*args))
    x = keras.ops.ones((1, 4, 4, 3))
    backend_ops.depthwise_conv_same(x, keras.ops.ones((7, 7, 3, 1)), keras.ops.zeros((3,)))
    backend_ops.dense(x, keras.ops.ones((3, 2)), keras.ops.zeros((2,)), gelu=True)
    backend_ops.layer_norm(x, keras.ops.ones((3,)), keras.ops.zeros((3,)), 1e-6)
    expected = ["keras"] * 3 if device != "cpu" else list(cpu_forms(keras.backend.backend(), isa))
    assert calls == expected


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: {flags}

processor\t: 1
model name\t: second CPU, not read
flags\t\t: avx512f
"""
SAPPHIRE_RAPIDS = ("fpu sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_fp16 amx_bf16 "
                   "amx_tile amx_int8")
ZEN4 = "fpu sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16"
SKYLAKE_X = "fpu sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl"
ZEN2 = "fpu sse2 avx fma avx2 f16c"


@pytest.mark.parametrize("model, flags, isa", [
    ("Intel(R) Xeon(R) Platinum 8480+", SAPPHIRE_RAPIDS, "amx"), ("AMD EPYC 9654", ZEN4, "avx512_bf16"),
    ("Intel(R) Xeon(R) Gold 6148", SKYLAKE_X, "avx512"), ("AMD EPYC", ZEN2, "avx2"), ("old", "fpu sse2 avx", "other"),
    ("AVX-512F alone", "avx2 fma avx512f", "avx2"),
])
def test_isa_is_read_from_the_cpus_flags(model, flags, isa, tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(vendor="x", model=model, flags=flags))
    got_model, got_flags = hardware.cpu_flags(str(path))
    assert got_model == model and got_flags == set(flags.split())
    assert hardware.isa_of(got_flags) == isa


def test_cpuinfo_that_is_missing_odd_or_huge_is_read_safely(tmp_path):
    assert hardware.cpu_flags(str(tmp_path / "missing"))[1] == set()
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n")
    assert hardware.cpu_flags(str(tmp_path / "arm"))[1] == {"fp", "asimd", "sve"}
    assert hardware.isa_of({"fp", "asimd", "sve"}) == "other"
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00 junk: \x80\n\x81flags: avx512f\nflags : avx2 fma\n")
    assert hardware.isa_of(hardware.cpu_flags(str(tmp_path / "binary"))[1]) == "avx2"
    with open(tmp_path / "huge", "w") as f:  # flags only past the read limit: not read, nothing held
        f.write("x" * (hardware._CPUINFO_LIMIT + 10) + "\nflags : avx2 fma\n")
    assert hardware.cpu_flags(str(tmp_path / "huge"))[1] == set()


def test_this_machine_is_detected_once():
    here = hardware.detect(keras.backend.backend())
    assert here["device"] == hardware.device_of(keras.backend.backend()) and here["device"] in hardware.DEVICES
    assert here["isa"] in hardware.ISAS and here is hardware.detect(keras.backend.backend())
    facts = hardware.describe()
    assert facts["isa"] == here["isa"] and set(facts["isa_flags"]) <= set(hardware.cpu_flags()[1])
    assert facts["cores"] == os.cpu_count()


def test_jax_gelu_rounds_a_half_precision_map_once_in_value_and_gradient():
    # The JAX dense form's GELU runs in float32 for a bfloat16 map and rounds its value and its
    # gradient once each (backend_ops._exact_gelu), whichever backend this process runs.
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    y = np.random.default_rng(11).standard_normal(4096).astype("float32") * 3
    y16 = jnp.asarray(y, jnp.bfloat16)
    wide = y16.astype(jnp.float32)
    expected = np.asarray(jax.nn.gelu(wide, approximate=False).astype(jnp.bfloat16).astype(jnp.float32))
    got = jax.jit(backend_ops._exact_gelu)(y16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), expected)
    slope = jax.grad(lambda v: jax.nn.gelu(v, approximate=False).sum())(wide)
    got_slope = jax.grad(lambda v: jax.checkpoint(backend_ops._exact_gelu)(v).astype(jnp.float32).sum())(y16)
    assert got_slope.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got_slope.astype(jnp.float32)),
                                  np.asarray(slope.astype(jnp.bfloat16).astype(jnp.float32)))
    # The float32 form is unchanged: no cast.
    np.testing.assert_array_equal(np.asarray(backend_ops._exact_gelu(wide)), np.asarray(jax.nn.gelu(wide, approximate=False)))
