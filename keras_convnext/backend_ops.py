"""The one place where ConvNeXt's maths is written differently per backend, for speed.

Each backend gets the fastest correct formulation of the 7x7 depthwise convolution measured on
CPU (README, Performance). tests/test_backend_ops.py proves every path gives the same numbers.
"""

import keras

BACKEND = keras.backend.backend()


def depthwise_conv_same_torch(x, kernel, bias):
    # Keras's torch conv copies NHWC -> NCHW -> channels-last and pads by hand; a permuted view of
    # an NHWC tensor already *is* channels-last memory, which oneDNN convolves without any copy.
    import torch.nn.functional as F
    from keras import ops

    kernel, bias = ops.convert_to_tensor(kernel), ops.convert_to_tensor(bias)
    k = kernel.shape[0]
    w = kernel.permute(2, 3, 0, 1)  # (kh, kw, C, 1) -> (C, 1, kh, kw)
    y = F.conv2d(x.permute(0, 3, 1, 2), w.to(x.dtype), bias.to(x.dtype), padding=k // 2, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1)


def depthwise_conv_same_shifted(x, kernel, bias):
    # XLA:CPU lowers a grouped convolution to a slow generic loop; k*k shifted multiply-adds of
    # the padded map fuse into one vectorised loop nest instead (3.6x faster on JAX here).
    from keras import ops

    k = kernel.shape[0]
    h, w = ops.shape(x)[1], ops.shape(x)[2]
    pad = k // 2
    padded = ops.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = ops.cast(kernel, x.dtype)
    out = None
    for i in range(k):
        for j in range(k):
            term = padded[:, i:i + h, j:j + w, :] * kernel[i, j, :, 0]
            out = term if out is None else out + term
    return out + ops.cast(bias, x.dtype)


def depthwise_conv_same_keras(x, kernel, bias):
    from keras import ops

    y = ops.depthwise_conv(x, ops.cast(kernel, x.dtype), strides=1, padding="same")
    return y + ops.cast(bias, x.dtype)


FORMULATIONS = {
    "torch": depthwise_conv_same_torch,
    "shifted": depthwise_conv_same_shifted,
    "keras": depthwise_conv_same_keras,
}
# Fastest measured per backend (tensorflow's native depthwise kernel is the fast one there).
DEFAULT = {"torch": "torch", "jax": "shifted", "tensorflow": "keras"}


def formulations_for(backend=BACKEND):
    """The formulations that run on `backend` (the torch one needs torch tensors)."""
    return [name for name in FORMULATIONS if name != "torch" or backend == "torch"]


def depthwise_conv_same(x, kernel, bias, formulation=None):
    """7x7 (any odd k) depthwise convolution, stride 1, 'same' padding, NHWC, plus bias."""
    return FORMULATIONS[formulation or DEFAULT.get(BACKEND, "keras")](x, kernel, bias)
