"""Numerical parity of the Keras model against an independent NumPy ConvNeXt."""

import keras
import numpy as np
from conftest import TINY
from scipy.special import erf

import keras_convnext as kc
from keras_convnext import names


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


def official_weights(model):
    """{official key: float64 array in the Keras layout} of a model's variables (names.py's contract)."""
    out = {}
    for variable in model.weights:
        key = names.official_key(variable.path)
        assert key is not None, variable.path  # every variable of a ConvNeXt is in the contract
        out[key] = np.asarray(keras.ops.convert_to_numpy(variable), "float64")
    return out


def reference_forward(model, x, mean, std):
    w = official_weights(model)

    def params(module, *names_):
        return [w[f"{module}.{name}"] for name in names_ or ("weight", "bias")]

    x = (x.astype("float64") / 255 - np.array(mean)) / np.array(std)
    x = patch_conv(x, *params("downsample_layers.0.0"), 4)
    x = layer_norm(x, *params("downsample_layers.0.1"))
    for s, depth in enumerate(TINY["depths"]):
        if s:
            x = layer_norm(x, *params(f"downsample_layers.{s}.0"))
            x = patch_conv(x, *params(f"downsample_layers.{s}.1"), 2)
        for b in range(depth):
            p = f"stages.{s}.{b}"
            y = depthwise7(x, *params(f"{p}.dwconv"))
            y = layer_norm(y, *params(f"{p}.norm"))
            fc1, fc1_bias = params(f"{p}.pwconv1")
            fc2, fc2_bias = params(f"{p}.pwconv2")
            y = gelu(y @ fc1 + fc1_bias) @ fc2 + fc2_bias
            x = x + y * w[f"{p}.gamma"]
    x = layer_norm(x.mean((1, 2)), *params("norm"))
    head, head_bias = params("head")
    return x @ head + head_bias


def test_whole_model_matches_numpy_reference():
    model = kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, input_shape=(64, 64, 3),
                        classes=5, classifier_activation=None, layer_scale_init_value=1.0,
                        drop_path_rate=0.3)
    rng = np.random.default_rng(0)
    # Non-trivial norms, biases and scales (a LayerNorm's gamma and a block's layer scale around 1), so that
    # every parameter matters.
    for variable in model.weights:
        variable.assign(rng.normal(1.0 if variable.name == "gamma" else 0.0, 0.3, variable.shape).astype("float32"))
    assert len(official_weights(model)) == len(model.weights) == 65
    x = rng.integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    ours = keras.ops.convert_to_numpy(model(x))
    ref = reference_forward(model, x, kc.presets.IMAGENET_MEAN, kc.presets.IMAGENET_STD)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
