"""Numerical parity of the Keras model against an independent NumPy ConvNeXt."""

import keras
import numpy as np
from conftest import TINY
from scipy.special import erf

import keras_convnext as kc


def layer_norm(x, gamma, beta, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def patch_conv(x, kernel, bias, k):
    """Non-overlapping k x k conv, stride k: a reshape and a matmul."""
    n, h, w, c = x.shape
    patches = x.reshape(n, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(n, h // k, w // k, k * k * c) @ kernel.reshape(k * k * c, -1) + bias


def depthwise7(x, kernel, bias):
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    out = np.zeros_like(x)
    for i in range(7):
        for j in range(7):
            out += padded[:, i:i + h, j:j + w, :] * kernel[i, j, :, 0]
    return out + bias


def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def reference_forward(model, x, mean, std):
    w = {l.name: [np.asarray(keras.ops.convert_to_numpy(v), "float64") for v in l.weights] for l in model.layers}
    x = (x.astype("float64") / 255 - np.array(mean)) / np.array(std)
    x = patch_conv(x, *w["downsample_layers_0_0"], 4)
    x = layer_norm(x, *w["downsample_layers_0_1"])
    for s, depth in enumerate(TINY["depths"]):
        if s:
            x = layer_norm(x, *w[f"downsample_layers_{s}_0"])
            x = patch_conv(x, *w[f"downsample_layers_{s}_1"], 2)
        for b in range(depth):
            p = f"stages_{s}_{b}"
            y = depthwise7(x, *w[f"{p}_dwconv"])
            y = layer_norm(y, *w[f"{p}_norm"])
            y = gelu(y @ w[f"{p}_pwconv1"][0] + w[f"{p}_pwconv1"][1])
            y = y @ w[f"{p}_pwconv2"][0] + w[f"{p}_pwconv2"][1]
            x = x + y * w[f"{p}_gamma"][0]
    x = layer_norm(x.mean((1, 2)), *w["norm"])
    return x @ w["head"][0] + w["head"][1]


def test_whole_model_matches_numpy_reference():
    model = kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, input_shape=(64, 64, 3),
                        classes=5, classifier_activation=None, layer_scale_init_value=1.0,
                        drop_path_rate=0.3)
    rng = np.random.default_rng(0)
    # Non-trivial norms, biases and scales, so that every parameter matters.
    for layer in model.layers:
        layer.set_weights([rng.normal(1.0 if v.name in ("gamma",) else 0.0, 0.3, v.shape).astype("float32")
                           for v in layer.weights])
    x = rng.integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    ours = keras.ops.convert_to_numpy(model(x))
    ref = reference_forward(model, x, kc.presets.IMAGENET_MEAN, kc.presets.IMAGENET_STD)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
