"""The custom layers of ConvNeXt. Everything else is a stock Keras layer."""

import keras
from keras import ops

# backend_ops first: on JAX it sets XLA's CPU schedule before JAX starts.
from keras_convnext import backend_ops, checks
from keras_convnext.variants import MIN_IMAGE_SIZE

PACKAGE = "keras_convnext"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtPreprocessing(keras.layers.Layer):
    """Maps raw pixels in [0, 255] to the normalised input the weights expect.

    `x / 255`, then `(x - mean) / std` per channel, folded into one
    multiply-add. Accepts any float or integer input dtype.

    Args:
        mean: per-channel mean of [0, 1] pixels (one float per input channel).
        std: per-channel standard deviation of [0, 1] pixels (one float per input channel).
    """

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if not mean or len(mean) != len(std):
            raise ValueError(
                "`mean` and `std` need one value per input channel, as many of each. "
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

    def _fusable(self, inputs):
        """This class's own call on `inputs` in the compute dtype: what a block's fused form
        (`backend_ops.mlp` with `conv`) computes in its place."""
        return (type(self).call is DepthwiseConv.call
                and keras.backend.standardize_dtype(inputs.dtype) == self.compute_dtype)

    def call(self, inputs):
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

    def _fusable(self):
        """Plain, and this class's own call: a subclass with a call of its own (the block's fused forms would
        skip it) runs as itself."""
        return self._plain() and type(self).call is PointwiseDense.call

    def call(self, inputs, training=None):
        gelu = self.activation is keras.activations.gelu
        if not self._plain() or not (gelu or self.activation is keras.activations.linear):
            return super().call(inputs, training=training)
        return backend_ops.dense(inputs, self.kernel, self.bias, gelu=gelu, training=training)

    def _fusable_linear(self, inputs):
        """`_fusable`, no activation, and `inputs` in the compute dtype: what the scaled forms assume."""
        return (self._fusable() and self.activation is keras.activations.linear
                and keras.backend.standardize_dtype(inputs.dtype) == self.compute_dtype)

    def scaled(self, inputs, gamma):
        """`self(inputs) * gamma` with the per-channel scale folded into the kernel and bias, or None where
        the layer is not plain or the backend's form does not fold (`backend_ops.dense_scaled`)."""
        if not self._fusable_linear(inputs):
            return None
        return backend_ops.dense_scaled(inputs, self.kernel, self.bias, gamma)

    def scale_add(self, inputs, gamma, shortcut):
        """`shortcut + self(inputs) * gamma` as one fused op, or None where the backend has none.

        `ConvNeXtBlock` uses it for its pwconv2 -> layer scale -> residual add at inference; the
        backend form runs only on concrete tensors none of which needs a gradient.
        """
        if not self._fusable_linear(inputs):
            return None
        return backend_ops.dense_scale_add(inputs, self.kernel, self.bias, gamma, shortcut)


def _own_pointwise(layer):
    """A block's pwconv that is PointwiseDense with its own call (`PointwiseDense._fusable`): the block's fused
    forms compute that maths, so a layer put in its place, or a subclass with a call of its own, runs as itself."""
    return isinstance(layer, PointwiseDense) and layer._fusable()


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNorm(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the channels, in each backend's fastest form.

    The same variables, config and numbers; with the default last axis, centring and scaling,
    the call goes through `backend_ops.layer_norm` (rematerialised under JAX's autodiff, mixed
    bfloat16/float32 in one PyTorch kernel, XLA-compiled in TensorFlow training). Any other
    configuration is the parent's own call.
    """

    def _over_channels(self, inputs):
        """The default last axis, centring and scaling: what `backend_ops.layer_norm` computes."""
        return self.axis in (-1, [-1], len(inputs.shape) - 1, [len(inputs.shape) - 1]) and (
            self.center and self.scale) and not self.rms_scaling

    def _fusable(self, inputs):
        """`_over_channels`, this class's own call and `inputs` in the compute dtype: what a block's fused
        LayerNorm -> MLP form (`backend_ops.mlp` with `norm`) computes in its place."""
        return (self._over_channels(inputs) and type(self).call is LayerNorm.call
                and keras.backend.standardize_dtype(inputs.dtype) == self.compute_dtype)

    def call(self, inputs, training=None):
        if not self._over_channels(inputs):
            return super().call(inputs)
        out = backend_ops.layer_norm(inputs, self.gamma, self.beta, self.epsilon, training=training)
        return keras.ops.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GlobalResponseNorm(keras.layers.Layer):
    """ConvNeXt V2's Global Response Normalization over channels-last maps (N, H, W, C).

    As the official code (ConvNeXt-V2 `models/utils.py` GRN): `Gx = ||x||_2` over H and W per
    sample and channel, `Nx = Gx / (mean_c(Gx) + epsilon)`, `y = gamma * (x * Nx) + beta + x`, with
    `gamma` and `beta` of shape (C,) zero-initialised (the layer starts as the identity). The
    statistics are computed in float32 whatever the compute dtype (the squares of float16
    activations overflow above 256); the output, `x * (1 + gamma * Nx) + beta`, is one
    multiply-add in the compute dtype. Keras ops only: the same graph jit-compiles on every backend.

    Args:
        epsilon: added to the channel mean of `Gx` (1e-6 as the official code).
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = checks.number("epsilon", epsilon, 0.0)

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(f"GlobalResponseNorm takes (N, H, W, C) maps with known C. Received: input_shape={input_shape}")
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer=HostConstant(0.0))
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer=HostConstant(0.0))

    def call(self, inputs):
        x32 = ops.cast(inputs, "float32")
        gx = ops.sqrt(ops.sum(ops.square(x32), axis=(1, 2), keepdims=True))  # (N, 1, 1, C)
        nx = gx / (ops.mean(gx, axis=-1, keepdims=True) + self.epsilon)
        scale = 1.0 + ops.cast(self.gamma, "float32") * nx
        return inputs * ops.cast(scale, inputs.dtype) + ops.cast(self.beta, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


# --- the ConvNeXt building blocks -------------------------------------------------------------

LN_EPS = 1e-6  # every ConvNeXt LayerNorm, stem to head


def kernel_init(scale=1.0):
    # Official init: truncated normal, std 0.02, for every conv and linear kernel (drawn on the host:
    # Keras's backend draw leaves ~200 MB of freed working memory in the process, HostTruncatedNormal).
    return HostTruncatedNormal(stddev=0.02 * scale)


def layer_norm(name, epsilon=LN_EPS, **kwargs):
    """ConvNeXt's LayerNorm (eps 1e-6, gamma 1, beta 0, filled on the host) in each backend's fastest form."""
    return LayerNorm(epsilon=epsilon, name=name, gamma_initializer=HostConstant(1.0),
                     beta_initializer=HostConstant(0.0), **kwargs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtBlock(keras.layers.Layer):
    """One ConvNeXt block: dwconv 7x7 -> LayerNorm -> Dense 4C -> GELU -> Dense C -> scale -> drop path, + x.

    With `grn=True`, ConvNeXt V2's block: a GlobalResponseNorm (`grn`) after the GELU, and no layer
    scale (`layer_scale_init_value` must then be None or 0).

    A layer, as the official code's `Block`: its intermediates live only during its `call`. Its
    sublayers and variable are named as the official keys (`dwconv`, `norm`, `pwconv1`, `pwconv2`,
    `gamma`; `names.py`). At inference on PyTorch, with concrete tensors none of which needs a
    gradient, the MLP and the tail run in tiles of rows on an AVX2-only CPU in float32 (`backend_ops.block_mlp`: the
    4C-wide hidden map never whole) and the last three steps as one oneDNN GEMM on other CPUs
    (`PointwiseDense.scale_add`). On JAX's and TensorFlow's CPU forms, GELU and pwconv2 are
    rematerialised together (`backend_ops.mlp`), so the gradient keeps one 4C-wide map per block, and so are
    LayerNorm and pwconv1 (JAX in half precision; TensorFlow in training where XLA compiles, with the depthwise
    conv too), so it keeps LayerNorm's (or the block's) input and not their outputs.
    Otherwise the layer scale is folded into pwconv2's kernel and bias on a CPU (`PointwiseDense.scaled`),
    and the residual added: the same numbers. These fused forms compute PointwiseDense's own maths, so they
    run only where pwconv1 and pwconv2 are PointwiseDense, the norm LayerNorm and the dwconv DepthwiseConv,
    with their own call and the block's compute dtype: a subclass with a call of its own, or another layer,
    put in their place runs as itself, step by step.

    Args:
        dim: channels in and out.
        drop_path_rate: stochastic depth of the block's residual branch, in [0, 1).
        layer_scale_init_value: initial value of the layer scale `gamma` (0 or None: no layer scale).
        grn: ConvNeXt V2's Global Response Normalization after the GELU.
    """

    def __init__(self, dim, drop_path_rate=0.0, layer_scale_init_value=1e-6, grn=False, **kwargs):
        super().__init__(**kwargs)
        self.dim = checks.integer("dim", dim, minimum=1)
        self.drop_path_rate = checks.number("drop_path_rate", drop_path_rate, 0.0, 1.0, high_open=True)
        if layer_scale_init_value is not None:
            checks.number("layer_scale_init_value", layer_scale_init_value, 0.0)
        self.grn = checks.boolean("grn", grn)
        if self.grn and layer_scale_init_value:
            raise ValueError("ConvNeXt V2's block (grn=True) has no layer scale: pass layer_scale_init_value=None. "
                             f"Received: layer_scale_init_value={layer_scale_init_value!r}")
        self.layer_scale_init_value = layer_scale_init_value
        policy = {"dtype": self.dtype_policy}
        # A real depthwise op (not a grouped Conv2D), in each backend's fastest form (backend_ops).
        self.dwconv = DepthwiseConv(7, kernel_initializer=kernel_init(), name="dwconv", **policy)
        self.norm = layer_norm("norm", **policy)
        # Pointwise convs as Dense on (N, H, W, C): the same maths as 1x1 convs, as in the paper's code;
        # "gelu" is Keras's exact (erf) GELU, as the paper uses.
        self.pwconv1 = PointwiseDense(4 * self.dim, activation="gelu", kernel_initializer=kernel_init(),
                                      bias_initializer=HostConstant(0.0), name="pwconv1", **policy)
        self.grn_layer = GlobalResponseNorm(name="grn", **policy) if self.grn else None
        self.pwconv2 = PointwiseDense(self.dim, kernel_initializer=kernel_init(), bias_initializer=HostConstant(0.0),
                                      name="pwconv2", **policy)
        self.drop_path = (StochasticDepth(self.drop_path_rate, name="drop_path", **policy)
                          if self.drop_path_rate > 0 else None)

    def build(self, input_shape):
        if input_shape[-1] != self.dim:
            raise ValueError(f"ConvNeXtBlock({self.dim}) takes {self.dim} channels. Received: input_shape={input_shape}")
        self.dwconv.build(input_shape)
        self.norm.build(input_shape)
        self.pwconv1.build(input_shape)
        if self.grn_layer is not None:
            self.grn_layer.build(tuple(input_shape[:-1]) + (4 * self.dim,))
        self.pwconv2.build(tuple(input_shape[:-1]) + (4 * self.dim,))
        # Stochastic depth runs only in training, so a model traced at inference never calls it: unbuilt, it
        # makes Keras's JAX predict and evaluate call the whole model eagerly on the first batch before
        # compiling (an XLA program per op; the cost is measured in docs/performance.md).
        if self.drop_path is not None:
            self.drop_path.build(input_shape)
        self.gamma = None
        if self.layer_scale_init_value:
            self.gamma = self.add_weight(name="gamma", shape=(self.dim,),
                                         initializer=HostConstant(self.layer_scale_init_value))

    def call(self, inputs, training=None, keep=None):
        """The block; `keep`, an optional (N, H, W, 1) 0/1 map, runs it as a sparse (masked) block.

        With `keep` (FCMAE pre-training, fcmae.py) the block computes what the official sparse block
        (MinkowskiEngine) computes on the kept ("active") positions, and zeros elsewhere. `inputs` must
        already be zero where `keep` is 0: the 7x7 dwconv then sums active neighbours only, as the sparse
        convolution does. LayerNorm and pwconv1 work per position, but their biases make masked positions
        nonzero; those values must not reach GRN's L2 statistics (the sparse GRN sums over active sites
        only) nor, through the residual, the next block's dwconv. So `x` is zeroed before the GRN and the
        block's output is zeroed at the end.
        """
        if (keep is None and self._plain_mlp(inputs) and isinstance(self.dwconv, DepthwiseConv)
                and self.dwconv._fusable(inputs) and self._own_norm(inputs)):
            # The whole branch with a gradient that keeps the block's input alone (TensorFlow in training).
            y = self._fused_mlp(inputs, training, norm=True, conv=(self.dwconv.kernel, self.dwconv.bias))
            if y is not None:
                return self._residual(inputs, y, training)
        x = self.dwconv(inputs)
        if keep is None and self._plain_mlp(x) and self._own_norm(x):
            # LayerNorm, MLP and layer scale with a gradient that keeps LayerNorm's input, not its output.
            y = self._fused_mlp(x, training, norm=True)
            if y is not None:
                return self._residual(inputs, y, training)
        x = self.norm(x)
        plain = keep is None and self._plain_mlp(x)
        # The fused inference forms: a layer scale, and no path to drop (a frozen block in training still drops it).
        fusable = self.gamma is not None and not (training and self.drop_path is not None)
        if plain and fusable:
            tiled = backend_ops.block_mlp(x, self.pwconv1.kernel, self.pwconv1.bias, self.pwconv2.kernel,
                                          self.pwconv2.bias, self.gamma, inputs)
            if tiled is not None:
                return tiled
        if plain:
            y = self._fused_mlp(x, training)
            if y is not None:
                return self._residual(inputs, y, training)
        x = self.pwconv1(x)
        if keep is not None:
            keep = ops.cast(keep, x.dtype)
            if self.grn_layer is not None:
                x = self.grn_layer(x * keep)
            x = self._pwconv2_scaled(x)
            if self.drop_path is not None:
                x = self.drop_path(x, training=training)
            return (inputs + x) * keep
        if self.grn_layer is not None:
            x = self.grn_layer(x)
        if fusable:  # (with no gradient needed anywhere in the block)
            fused = self.pwconv2.scale_add(x, self.gamma, inputs) if _own_pointwise(self.pwconv2) else None
            if fused is not None:
                return fused
        return self._residual(inputs, self._pwconv2_scaled(x), training)

    def _own_norm(self, x):
        """The norm is LayerNorm with its own call, over the channels of `x`, in `x`'s dtype."""
        return isinstance(self.norm, LayerNorm) and self.norm._fusable(x)

    def _fused_mlp(self, x, training, norm=False, conv=None):
        """`backend_ops.mlp` of this block's pwconvs and layer scale, with its LayerNorm first if `norm` (and
        `conv`, its depthwise conv's variables), or None."""
        return backend_ops.mlp(x, self.pwconv1.kernel, self.pwconv1.bias, self.pwconv2.kernel, self.pwconv2.bias,
                               self.gamma, training=training, conv=conv,
                               norm=(self.norm.gamma, self.norm.beta, self.norm.epsilon) if norm else None)

    def _residual(self, inputs, branch, training):
        """inputs + the residual branch, after stochastic depth."""
        if self.drop_path is not None:
            branch = self.drop_path(branch, training=training)
        return inputs + branch

    def _plain_mlp(self, x):
        """pwconv1 with its GELU, then pwconv2, both plain Dense maths in PointwiseDense's own call
        (`PointwiseDense._fusable`: a layer put in their place, or a subclass with a call of its own, runs as
        itself), no GRN between."""
        return (_own_pointwise(self.pwconv1) and _own_pointwise(self.pwconv2) and self.grn_layer is None
                and self.pwconv1.activation is keras.activations.gelu
                and self.pwconv2.activation is keras.activations.linear
                and keras.backend.standardize_dtype(x.dtype) == self.compute_dtype)

    def _pwconv2_scaled(self, x):
        """pwconv2, then the layer scale: folded into pwconv2's kernel where it can be (`PointwiseDense.scaled`)."""
        if self.gamma is None:
            return self.pwconv2(x)
        scaled = self.pwconv2.scaled(x, self.gamma) if _own_pointwise(self.pwconv2) else None
        return scaled if scaled is not None else self.pwconv2(x) * ops.cast(self.gamma, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"dim": self.dim, "drop_path_rate": self.drop_path_rate,
                       "layer_scale_init_value": self.layer_scale_init_value, "grn": self.grn})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtDownsample(keras.layers.Layer):
    """The stem (`stem=True`: 4x4 stride-4 conv, then LayerNorm) or a downsampling (LayerNorm, then 2x2 stride-2 conv).

    Sublayers `conv` and `norm`; the official keys are `downsample_layers.<stage>.<0|1>` (names.py).

    Args:
        dim: output channels.
        stem: the stem (the first stage's) or a later stage's downsampling.
    """

    def __init__(self, dim, stem=False, **kwargs):
        super().__init__(**kwargs)
        self.dim = checks.integer("dim", dim, minimum=1)
        self.stem = checks.boolean("stem", stem)
        policy = {"dtype": self.dtype_policy}
        conv = PatchifyStem if self.stem else keras.layers.Conv2D
        size = 4 if self.stem else 2
        self.conv = conv(self.dim, size, strides=size, kernel_initializer=kernel_init(),
                         bias_initializer=HostConstant(0.0), name="conv", **policy)
        self.norm = layer_norm("norm", **policy)

    def build(self, input_shape):
        if self.stem:
            self.conv.build(input_shape)
            self.norm.build(self.conv.compute_output_shape(input_shape))
        else:
            self.norm.build(input_shape)
            self.conv.build(input_shape)

    def call(self, inputs):
        return self.norm(self.conv(inputs)) if self.stem else self.conv(self.norm(inputs))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"dim": self.dim, "stem": self.stem})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtStage(keras.layers.Layer):
    """One stage: its downsampling (the stem for stage 0), then `len(drop_path_rates)` blocks.

    A layer, so that the functional model holds one map per stage, not one per step (eager
    inference memory); `downsample` and `blocks[j]` (named `block_<j>`) are its sublayers.

    Args:
        dim: the stage's channels.
        drop_path_rates: each block's stochastic depth (their number is the stage's depth).
        layer_scale_init_value: the blocks' initial layer scale.
        stem: the first stage (its downsampling is the 4x4 stem).
        grn: ConvNeXt V2's blocks (GlobalResponseNorm, no layer scale).
    """

    def __init__(self, dim, drop_path_rates, layer_scale_init_value=1e-6, stem=False, grn=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(drop_path_rates, (list, tuple)) or not drop_path_rates:
            raise ValueError(f"`drop_path_rates` needs one rate per block. Received: drop_path_rates={drop_path_rates!r}")
        self.dim = checks.integer("dim", dim, minimum=1)
        self.drop_path_rates = [float(rate) for rate in drop_path_rates]
        self.layer_scale_init_value = layer_scale_init_value
        self.stem = checks.boolean("stem", stem)
        self.grn = checks.boolean("grn", grn)
        policy = {"dtype": self.dtype_policy}
        self.downsample = ConvNeXtDownsample(self.dim, stem=self.stem, name="downsample", **policy)
        self.blocks = [ConvNeXtBlock(self.dim, rate, layer_scale_init_value, grn=self.grn, name=f"block_{j}", **policy)
                       for j, rate in enumerate(self.drop_path_rates)]

    @property
    def depth(self):
        return len(self.blocks)

    def build(self, input_shape):
        self.downsample.build(input_shape)
        shape = self.downsample.compute_output_shape(input_shape)
        for block in self.blocks:
            block.build(shape)

    def call(self, inputs, training=None, keep=None):
        """The stage; `keep`, an optional (N, H, W, 1) 0/1 map at the stage's output resolution, masks it.

        With `keep` the downsampling runs densely and its output is zeroed where `keep` is 0, then every
        block runs masked (`ConvNeXtBlock.call`). This equals the official sparse encoder when `keep` is
        constant on the windows the downsampling reads (FCMAE's 32 px patches: the stem's 4x4 windows
        and every 2x2 window lie inside one patch), so that each output is computed from active inputs
        only, or is masked itself.
        """
        x = self.downsample(inputs)
        if keep is not None:
            x = x * ops.cast(keep, x.dtype)
        for block in self.blocks:
            x = block(x, training=training) if keep is None else block(x, training=training, keep=keep)
        return x

    def compute_output_shape(self, input_shape):
        return self.downsample.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"dim": self.dim, "drop_path_rates": self.drop_path_rates,
                       "layer_scale_init_value": self.layer_scale_init_value, "stem": self.stem,
                       "grn": self.grn})
        return config
