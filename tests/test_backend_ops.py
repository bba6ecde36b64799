"""Every depthwise-conv formulation gives the same numbers on the current backend."""

import keras
import numpy as np
import pytest
from scipy.signal import correlate

from keras_convnext import backend_ops
from keras_convnext.layers import DepthwiseConv


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
    assert backend_ops.DEFAULT == {"torch": "torch", "jax": "shifted_jax", "tensorflow": "keras"}
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


def _gradients(formulation, x, kernel, bias, upstream):
    """d(sum(upstream * conv(x))) / d(x, kernel, bias), on the current backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def loss(x, kernel, bias):
            return (backend_ops.depthwise_conv_same(x, kernel, bias, formulation) * upstream).sum()

        return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias)]
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.Variable(v) for v in (x, kernel, bias)]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(backend_ops.depthwise_conv_same(*tensors, formulation) * upstream)
        return [g.numpy() for g in tape.gradient(loss, tensors)]
    import torch

    tensors = [torch.tensor(v, requires_grad=True) for v in (x, kernel, bias)]
    (backend_ops.depthwise_conv_same(*tensors, formulation) * torch.tensor(upstream)).sum().backward()
    return [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize("formulation", backend_ops.formulations_for())
def test_every_formulation_has_the_same_gradients(formulation):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 11, 4)).astype("float32")
    kernel = rng.standard_normal((7, 7, 4, 1)).astype("float32")
    bias = rng.standard_normal(4).astype("float32")
    upstream = rng.standard_normal((2, 9, 11, 4)).astype("float32")
    expected = _gradients("keras", x, kernel, bias, upstream)
    got = _gradients(formulation, x, kernel, bias, upstream)
    for name, e, g in zip(("x", "kernel", "bias"), expected, got):
        np.testing.assert_allclose(g, e, atol=1e-3, rtol=1e-4, err_msg=name)
