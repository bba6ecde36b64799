"""The custom layers of ConvNeXt. Everything else is a stock Keras layer."""

import keras
from keras import ops

from keras_convnext import checks
from keras_convnext.variants import MIN_IMAGE_SIZE

PACKAGE = "keras_convnext"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtPreprocessing(keras.layers.Layer):
    """Maps raw pixels in [0, 255] to the normalised input the weights expect.

    `x / 255`, then `(x - mean) / std` per channel, folded into one
    multiply-add. Accepts any float or integer input dtype.

    Args:
        mean: per-channel mean of [0, 1] pixels (3 floats).
        std: per-channel standard deviation of [0, 1] pixels (3 floats).
    """

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(
                "`mean` and `std` need one value per RGB channel. "
                f"Received: mean={mean}, std={std}"
            )
        if min(std) <= 0:
            raise ValueError(f"`std` must be positive. Received: std={std}")
        self.mean = mean
        self.std = std
        self._scale = [1.0 / (255.0 * s) for s in std]
        self._offset = [-m / s for m, s in zip(mean, std)]

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        scale = ops.convert_to_tensor(self._scale, dtype=self.compute_dtype)
        offset = ops.convert_to_tensor(self._offset, dtype=self.compute_dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mean": self.mean, "std": self.std})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class HostTruncatedNormal(keras.initializers.TruncatedNormal):
    """`keras.initializers.TruncatedNormal` drawn with NumPy on the host.

    The same distribution (normal, redrawn outside two standard deviations) and seeding (an
    integer seed gives the same values at every call; `keras.utils.set_random_seed` makes
    unseeded ones reproducible). Keras draws it on the backend: a 4x oversized normal per kernel
    on PyTorch, one compiled program per kernel shape on JAX, whose freed working memory stays
    in the process (ConvNeXt-T: 341 -> 127 MB of RSS after building on PyTorch, 409 -> 212 MB on
    JAX). A `keras.random.SeedGenerator` seed draws with Keras as before.
    """

    def __call__(self, shape, dtype=None):
        import numpy as np

        if not isinstance(self.seed, int):
            return super().__call__(shape, dtype=dtype)
        rng = np.random.default_rng(self.seed)
        values = rng.standard_normal(shape, dtype=np.float32)
        outside = np.abs(values) >= 2.0
        while outside.any():  # redraw the ~4.6% outside (-2, 2) until none is left
            values[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32)
            outside = np.abs(values) >= 2.0
        values = values * np.float32(self.stddev) + np.float32(self.mean)
        return ops.convert_to_tensor(values, dtype=dtype or keras.config.floatx())


@keras.saving.register_keras_serializable(package=PACKAGE)
class HostConstant(keras.initializers.Constant):
    """`keras.initializers.Constant` filled with NumPy on the host.

    On JAX, Keras's fill compiles one small program per distinct shape, and every compiled program
    stays in the process: ConvNeXt-T's biases, LayerNorm and layer-scale vectors cost 50 MB of
    RSS that way (212 -> 162 MB after building).
    """

    def __call__(self, shape, dtype=None):
        import numpy as np

        values = np.full(shape, self.value, dtype=np.float32)
        return ops.convert_to_tensor(values, dtype=dtype or keras.config.floatx())


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerScale(keras.layers.Layer):
    """Multiplies the channels by a learned vector `gamma` (CaiT's layer scale).

    Args:
        init_value: initial value of every entry of `gamma` (1e-6 in ConvNeXt).
    """

    def __init__(self, init_value=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=HostConstant(self.init_value),
        )

    def call(self, inputs):
        return inputs * ops.cast(self.gamma, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"init_value": self.init_value})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class StochasticDepth(keras.layers.Layer):
    """Drops the whole residual branch of a sample with probability `rate`.

    Per sample, as in the paper (Huang et al. 2016): kept samples are scaled by
    `1 / (1 - rate)` so that the expectation is unchanged; identity at
    inference. The layer owns its `SeedGenerator`, so it draws fresh masks at
    every step under a jit-compiled `fit` on every backend.

    Args:
        rate: drop probability in [0, 1).
        seed: optional integer seed of the layer's generator.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        rate = float(rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`rate` must be in [0, 1). Received: rate={rate}")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        # One draw per sample, broadcast over H, W and C.
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        # The draw stays float32: keep + noise rounded in bfloat16 would bias the mask.
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype="float32")
        mask = ops.floor(keep + noise) / keep
        return inputs * ops.cast(mask, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchifyStem(keras.layers.Conv2D):
    """ConvNeXt's stem, a `Conv2D` (4x4, stride 4), that says what is wrong with a too-small image.

    A model built with a flexible input (None, None, 3) fed a 16 px image would otherwise fail three
    downsamplings later, in a strided conv, with "the convolution operation resulted in an empty
    output". The four downsamplings take MIN_SIZE px to one pixel.
    """

    MIN_SIZE = MIN_IMAGE_SIZE

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]  # static or concrete sizes; None while unknown
        if any(s is not None and s < self.MIN_SIZE for s in (height, width)):
            raise ValueError(
                f"ConvNeXt needs images of at least {self.MIN_SIZE}x{self.MIN_SIZE} pixels (four downsamplings "
                f"to 1x1). Received: images of shape {tuple(inputs.shape)}"
            )
        return super().call(inputs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class DepthwiseConv(keras.layers.Layer):
    """A k x k depthwise convolution, stride 1, 'same' padding, channels last, with bias.

    The same variables as `keras.layers.DepthwiseConv2D` (kernel (k, k, C, 1), bias (C,)), computed
    with the fastest formulation for the current backend (`backend_ops`).

    Args:
        kernel_size: odd integer (7 in ConvNeXt).
        kernel_initializer: initializer of the kernel.
    """

    def __init__(self, kernel_size=7, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if checks.integer("kernel_size", kernel_size, minimum=1) % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd. Received: kernel_size={kernel_size}")
        self.kernel_size = int(kernel_size)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(name="kernel", shape=(self.kernel_size, self.kernel_size, channels, 1),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer=HostConstant(0.0))

    def call(self, inputs):
        from keras_convnext import backend_ops

        return backend_ops.depthwise_conv_same(inputs, self.kernel, self.bias)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"kernel_size": self.kernel_size,
                       "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PointwiseDense(keras.layers.Dense):
    """`keras.layers.Dense` on channels-last maps, computed in each backend's fastest form.

    The same variables, config and numbers as `Dense`; with a bias and no or a GELU activation
    (ConvNeXt's pwconv1, pwconv2) the call goes through `backend_ops.dense`, which fuses the bias
    and GELU into the matrix product where the backend can. Anything else (LoRA, quantization,
    another activation) is Dense's own call.
    """

    def _plain(self):
        """Bias, no LoRA, no quantization: the kernel and bias are all there is to it."""
        return self.bias is not None and not self.lora_enabled and self.quantization_mode is None

    def call(self, inputs, training=None):
        from keras_convnext import backend_ops

        gelu = self.activation is keras.activations.gelu
        if not self._plain() or not (gelu or self.activation is keras.activations.linear):
            return super().call(inputs, training=training)
        return backend_ops.dense(inputs, self.kernel, self.bias, gelu=gelu)

    def scale_add(self, inputs, gamma, shortcut):
        """`shortcut + self(inputs) * gamma` as one fused op, or None where the backend has none.

        ConvNeXtModel's forward uses it for a block's pwconv2 -> LayerScale -> Add at inference.
        """
        from keras_convnext import backend_ops

        if (not self._plain() or self.activation is not keras.activations.linear
                or keras.backend.standardize_dtype(inputs.dtype) != self.compute_dtype):
            return None
        return backend_ops.dense_scale_add(inputs, self.kernel, self.bias, gamma, shortcut)


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNorm(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the channels, in each backend's fastest form.

    The same variables, config and numbers; with the default last axis, centring and scaling,
    the call goes through `backend_ops.layer_norm` (rematerialised under JAX's autodiff, mixed
    bfloat16/float32 in one PyTorch kernel). Any other configuration is the parent's own call.
    """

    def call(self, inputs):
        from keras_convnext import backend_ops

        if self.axis not in (-1, [-1], len(inputs.shape) - 1, [len(inputs.shape) - 1]) or not (
                self.center and self.scale) or self.rms_scaling:
            return super().call(inputs)
        out = backend_ops.layer_norm(inputs, self.gamma, self.beta, self.epsilon)
        return keras.ops.cast(out, self.compute_dtype)
