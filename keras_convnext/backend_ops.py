"""The one place where ConvNeXt's maths is written differently per backend, for speed.

Each backend gets the fastest correct formulation of the 7x7 depthwise convolution and of the
pointwise (Dense) layers measured on CPU (README, Performance). tests/test_backend_ops.py proves
every path gives the same numbers.
"""

import functools
import math
import os

import keras

BACKEND = keras.backend.backend()

# XLA:CPU's default scheduler orders a program for concurrency and keeps more buffers alive at
# once: ConvNeXt-T's mixed-precision training step peaks 690 MB higher (3,210 vs 2,521 MB of RSS)
# at the same speed on a 2-core machine, its float32 gradient needs 2,104 vs 1,941 MB of XLA
# temporaries. JAX reads XLA_FLAGS when it first starts its CPU client (not at `import keras`),
# so importing keras_convnext asks for the memory-ordered schedule, unless the user chose one.
XLA_MEMORY_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def prefer_memory_optimized_xla_schedule(environ=os.environ, backend=BACKEND):
    """Adds XLA_MEMORY_SCHEDULE to XLA_FLAGS on JAX unless a CPU scheduler flag is set; True if added."""
    flags = environ.get("XLA_FLAGS", "")
    if backend != "jax" or "xla_cpu_enable_concurrency_optimized_scheduler" in flags or (
            "xla_cpu_scheduler_type" in flags):
        return False
    environ["XLA_FLAGS"] = f"{flags} {XLA_MEMORY_SCHEDULE}".strip()
    return True


prefer_memory_optimized_xla_schedule()


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


def _shifted_sum(x, kernel):
    """sum_ij shift(x, i, j) * kernel[i, j] over the zero-padded NHWC map (JAX arrays)."""
    import jax.numpy as jnp

    k = kernel.shape[0]
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = padded[:, :h, :w, :] * kernel[0, 0, :, 0]
    for i in range(k):
        for j in range(k):
            if i or j:
                out = out + padded[:, i:i + h, j:j + w, :] * kernel[i, j, :, 0]
    return out


@functools.cache  # built once, on first use (jax is imported only on the JAX backend)
def _make_shifted_jax():
    import jax
    import jax.numpy as jnp

    # Autodiff of the shifted sum materialises k*k full-size products for the kernel gradient
    # (5x timm's training memory); the hand-written gradient is a correlation with the flipped
    # kernel for the input, and a loop of k*k fused multiply-reductions for the kernel.
    # In mixed precision the sums run in float32 (XLA:CPU converts every bfloat16 multiply-add to
    # float32 and back: 45.7 -> 13.4 ms for the stage-0 map), while the map saved for the
    # gradient stays in its own (half) precision.
    @jax.custom_vjp
    def conv(x, kernel):
        return _shifted_sum(x.astype(kernel.dtype), kernel).astype(x.dtype)

    def forward(x, kernel):
        return conv(x, kernel), (x, kernel)

    def backward(saved, g):
        x, kernel = saved
        k = kernel.shape[0]
        h, w = x.shape[1], x.shape[2]
        x, g = x.astype(kernel.dtype), g.astype(kernel.dtype)
        dx = _shifted_sum(g, kernel[::-1, ::-1]).astype(saved[0].dtype)
        n, c = x.shape[0], x.shape[3]
        padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))

        def tap(t):  # one kernel tap's gradient: a fused multiply-reduce over the shifted map
            window = jax.lax.dynamic_slice(padded, (0, t // k, t % k, 0), (n, h, w, c))
            return jnp.sum(window * g, axis=(0, 1, 2))

        # A loop over taps: unrolled, XLA:CPU materialises all k*k products (0.9 GB per stage-0 block).
        dk = jax.lax.map(tap, jnp.arange(k * k)).reshape(k, k, c, 1)
        return dx, dk.astype(kernel.dtype)

    conv.defvjp(forward, backward)
    return conv


def depthwise_conv_same_shifted_jax(x, kernel, bias):
    import jax.numpy as jnp
    from keras import ops

    kernel, bias = ops.convert_to_tensor(kernel), ops.convert_to_tensor(bias)
    kernel = kernel.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32 sums, even for a bfloat16 map
    return _make_shifted_jax()(x, kernel) + bias.astype(x.dtype)


def depthwise_conv_same_keras(x, kernel, bias):
    from keras import ops

    y = ops.depthwise_conv(x, ops.cast(kernel, x.dtype), strides=1, padding="same", data_format="channels_last")
    return y + ops.cast(bias, x.dtype)


FORMULATIONS = {
    "torch": depthwise_conv_same_torch,
    "shifted": depthwise_conv_same_shifted,
    "shifted_jax": depthwise_conv_same_shifted_jax,
    "keras": depthwise_conv_same_keras,
}
# Formulations that take one backend's own tensors.
_ONLY_ON = {"torch": "torch", "shifted_jax": "jax"}


def formulations_for(backend=BACKEND):
    """The formulations that run on `backend`."""
    return [name for name in FORMULATIONS if _ONLY_ON.get(name, backend) == backend]


def depthwise_conv_same(x, kernel, bias, formulation=None):
    """7x7 (any odd k) depthwise convolution, stride 1, 'same' padding, NHWC, plus bias."""
    return FORMULATIONS[formulation or forms_here(x.dtype)["depthwise"]](x, kernel, bias)


# Pointwise layers: x @ kernel + bias, then GELU or nothing, over the last axis of an NHWC map.


def dense_keras(x, kernel, bias, gelu, training=None):
    from keras import ops

    y = ops.matmul(x, ops.cast(kernel, x.dtype)) + ops.cast(bias, x.dtype)
    return ops.gelu(y, approximate=False) if gelu else y


def _exact_gelu(y):
    # In float32 for a half-precision map, rounded once: in bfloat16 XLA:CPU rounds after each of
    # GELU's elementwise ops, and its gradient's fusion took 1.8x its float32 time (docs/performance.md).
    import jax
    import jax.numpy as jnp

    return jax.nn.gelu(y.astype(jnp.promote_types(y.dtype, jnp.float32)), approximate=False).astype(y.dtype)


@functools.cache
def _make_mixed_dense_jax():
    import jax
    import jax.numpy as jnp

    # x (bfloat16/float16) @ kernel + bias (float32 variables) with a float32 product: XLA:CPU
    # runs a bfloat16 GEMM with a float32 result on the CPU's matrix units (AMX here), 3-4x faster
    # than both its bfloat16-out GEMM and its float32 GEMM; the bias is added in float32 and the
    # result rounded once. Autodiff would transpose it into GEMMs of a float32 cotangent (the slow
    # float32 path, and a float32 copy of the map); the gradient here keeps the cotangent in
    # x's precision, so all three GEMMs of a step take the fast path, and the kernel's and the
    # bias's gradients are summed in float32.
    def matmul(a, b):
        return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @jax.custom_vjp
    def dense(x, kernel, bias):
        return (matmul(x, kernel.astype(x.dtype)) + bias).astype(x.dtype)

    def forward(x, kernel, bias):
        return dense(x, kernel, bias), (x, kernel)

    def backward(saved, g):
        x, kernel = saved
        g = g.astype(x.dtype)
        dx = matmul(g, kernel.astype(x.dtype).T).astype(x.dtype)
        flat_x, flat_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        dkernel = matmul(flat_x.T, flat_g).astype(kernel.dtype)
        dbias = flat_g.astype(jnp.float32).sum(0).astype(kernel.dtype)
        return dx, dkernel, dbias

    dense.defvjp(forward, backward)
    return dense


def dense_jax(x, kernel, bias, gelu, training=None):
    # Autodiff of the erf GELU keeps its input *and* erf's output, two 4C-wide maps per block;
    # rematerialised (jax.checkpoint) it keeps only its input and recomputes erf in the backward
    # pass: ConvNeXt-T's gradient at batch 16 needs 3.4 -> 2.4 GB of XLA temporaries.
    import jax
    import jax.numpy as jnp
    from keras import ops

    kernel, bias = ops.convert_to_tensor(kernel), ops.convert_to_tensor(bias)
    if x.dtype == jnp.float32:
        y = x @ kernel.astype(x.dtype) + bias.astype(x.dtype)
    else:  # mixed precision: a half-precision GEMM with a float32 product and bias
        y = _make_mixed_dense_jax()(x, kernel.astype(jnp.float32), bias.astype(jnp.float32))
    return jax.checkpoint(_exact_gelu)(y) if gelu else y


@functools.cache
def onednn_bf16():
    """Whether this CPU runs oneDNN's bfloat16 kernels (AVX-512 BW/VL/DQ, AVX-512 BF16 or AMX).

    On a CPU without them (AVX2 only: older AMD EPYC, Intel client parts) oneDNN has no bfloat16
    inner-product primitive at all ("could not create a primitive descriptor"), so bfloat16 maps take
    torch's own GEMM (addmm), which exists everywhere. Torch's own convolution and LayerNorm already
    ask the same question before they call oneDNN.
    """
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and torch.backends.mkldnn.is_available() and check())


def _eager_cpu_inference(x, *params):
    """Concrete CPU tensors none of which needs a gradient, outside torch.compile, torch.export and torch.jit.trace.

    Where the torch inference forms run: they have no autograd formula, and a trace (Keras's TorchScript ONNX
    route among them) would fix what they decide per call (oneDNN's primitive, the tile count) in its graph.
    """
    import torch

    return (x.device.type == "cpu"
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def _onednn_linear_ok(x, *params):
    import torch

    # oneDNN's linear (with or without a GELU post-op): eager inference only (Keras's predict runs under no_grad).
    return (_eager_cpu_inference(x, *params)
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and onednn_bf16()))
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def dense_torch(x, kernel, bias, gelu, training=None, onednn=True):
    # Keras's Dense is matmul, then a separate bias add, then GELU: three passes over a 4C-wide
    # map. For training, addmm folds the bias into the GEMM (by first copying it into every row of
    # the output). At inference oneDNN's linear (what torch.compile's CPU backend emits; torch eager
    # has no public call) adds the bias, and the GELU as a post-op, inside the GEMM: 2x faster on
    # the stage-0 pwconv1 (README, Performance).
    import torch
    import torch.nn.functional as F
    from keras import ops

    kernel, bias = ops.convert_to_tensor(kernel), ops.convert_to_tensor(bias)
    kernel, bias = kernel.to(x.dtype), bias.to(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    if onednn and _onednn_linear_ok(flat, kernel, bias):
        y = torch.ops.mkldnn._linear_pointwise(flat, kernel.t(), bias, "gelu" if gelu else "none", [], "none")
    else:
        y = torch.addmm(bias, flat, kernel)
        if gelu:
            y = F.gelu(y)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def dense_addmm_torch(x, kernel, bias, gelu, training=None):
    # addmm (+ GELU) at inference too: on an AVX2-only CPU oneDNN's float32 linear with its GELU
    # post-op made ConvNeXt-T's eager predict 1.4-1.8x slower than this (docs/dispatch.md).
    return dense_torch(x, kernel, bias, gelu, onednn=False)


def dense_scale_add_torch(x, kernel, bias, gamma, shortcut):
    """shortcut + (x @ kernel + bias) * gamma as one oneDNN GEMM at inference; None where it cannot run."""
    # A block's last three steps (pwconv2, layer scale, residual add) are three passes over the map
    # in eager PyTorch. The scale folds into the kernel and bias (C x 4C numbers, not the map) and
    # the add is the GEMM's binary post-op: the stage-0 tail 7.7 -> 3.3 ms in bfloat16 (README).
    import torch
    from keras import ops

    kernel, bias, gamma = (ops.convert_to_tensor(v) for v in (kernel, bias, gamma))
    flat = x.reshape(-1, x.shape[-1])
    if (shortcut.dtype != x.dtype or tuple(shortcut.shape) != (*x.shape[:-1], kernel.shape[-1])
            or not _onednn_linear_ok(flat, kernel, bias, gamma, shortcut) or not hasattr(torch.ops.mkldnn._linear_pointwise, "binary")):
        return None
    w, b = (kernel * gamma).to(x.dtype).t(), (bias * gamma).to(x.dtype)
    y = torch.ops.mkldnn._linear_pointwise.binary(flat, shortcut.reshape(flat.shape[0], -1), w, b, "add")
    return y.reshape(shortcut.shape)


# Rows of a block's map per tile in `block_mlp_torch`: a stage-0 tile's 4C-wide hidden map is 3 MB in
# float32 (2,048 x 384), a stage-3 one's 25 MB; 1,024 and 4,096 rows were within the run-to-run spread of
# 2,048 (docs/performance.md).
MLP_TILE_ROWS = 2048


def block_mlp_torch(x, kernel1, bias1, kernel2, bias2, gamma, shortcut, rows=None):
    """shortcut + (gelu(x @ kernel1 + bias1) @ kernel2 + bias2) * gamma in tiles of rows at inference; else None.

    In eager PyTorch a block's MLP makes its 4C-wide hidden map whole, twice (pwconv1's output and the
    GELU's), and the allocator hands a fresh one out on every block: at stage 0 and batch 16, 77 MB each,
    the largest allocations of a forward pass. Tiled, the hidden map exists for `rows` rows at a time and
    each tile's output is accumulated into its rows of the result (shortcut + scaled bias, then the GEMM
    with beta=1), so the process peaks lower and the GELU reads and writes memory that is already mapped.
    The same products as the plain path (the scale folded into pwconv2, as `dense_scaled`), summed in
    another order: float32 results agree to rounding. Eager inference only: concrete CPU tensors none of
    which needs a gradient, not inside torch.compile, torch.export or torch.jit.trace (whose graph would
    hold the traced batch's tile count). Taken for V1 blocks with a layer scale (`ConvNeXtBlock`): a V2
    block's GRN needs each sample's whole hidden map.
    """
    import torch
    import torch.nn.functional as F
    from keras import ops

    params = [ops.convert_to_tensor(v) for v in (kernel1, bias1, kernel2, bias2, gamma)]
    # float32 only (x, shortcut and so the variables): measured there; bfloat16 on an AVX2 CPU (no bfloat16
    # arithmetic) was not.
    if (x.dtype != torch.float32 or shortcut.dtype != x.dtype or any(p.dtype != x.dtype for p in params)
            or tuple(shortcut.shape) != (*x.shape[:-1], params[2].shape[-1])
            or not _eager_cpu_inference(x, shortcut, *params)):
        return None
    kernel1, bias1, kernel2, bias2, gamma = params
    kernel2, bias2 = kernel2 * gamma, bias2 * gamma
    rows = rows or MLP_TILE_ROWS
    flat = x.reshape(-1, x.shape[-1])
    residual = shortcut.reshape(flat.shape[0], -1)
    out = torch.empty_like(residual)
    for start in range(0, flat.shape[0], rows):
        hidden = F.gelu(torch.addmm(bias1, flat[start:start + rows], kernel1))
        tile = out[start:start + rows]
        torch.add(residual[start:start + rows], bias2, out=tile)
        tile.addmm_(hidden, kernel2)
    return out.reshape(shortcut.shape)


# A block's whole MLP in tiles: where the dispatched dense form has a tiled one. Only the AVX2 row's
# (`addmm_torch`), where it was measured; the oneDNN form elsewhere keeps its fused tail
# (`dense_scale_add_torch`) until the tiles are measured on an AVX-512 or AMX CPU. Under jit (JAX,
# tf.function) the compiler schedules the map's memory itself.
MLP_FORMULATIONS = {"addmm_torch": block_mlp_torch}


def block_mlp(x, kernel1, bias1, kernel2, bias2, gamma, shortcut):
    """shortcut + (gelu(x @ kernel1 + bias1) @ kernel2 + bias2) * gamma in one tiled op, or None: step by step."""
    tiled = MLP_FORMULATIONS.get(forms_here(x.dtype)["dense"])
    return tiled(x, kernel1, bias1, kernel2, bias2, gamma, shortcut) if tiled else None


def _after(x, *values):
    """`values` (variables or tensors) read, and cast under a mixed policy, only once `x` is computed.

    TensorFlow's executor runs an op as soon as its inputs are ready, and a variable's read, its cast to
    the compute dtype and a fold of the layer scale depend on the variable alone: in a `tf.function` every
    block's copies would be made at the start of the step and held until their block runs (the whole
    model's pwconv kernels at once). A control dependency on the layer's input makes one block's at a time
    (docs/performance.md has the effect on inference memory). Elsewhere (eager, JAX, torch) `values` as
    they are.
    """
    if BACKEND != "tensorflow":
        return values
    import tensorflow as tf

    if tf.executing_eagerly():
        return values
    with tf.control_dependencies([x]):  # the reads and casts are created here, so they carry the dependency
        return tuple(v if v is None else tf.identity(v) for v in values)


_SQRT_HALF, _INV_SQRT_2PI = 1.0 / math.sqrt(2.0), 1.0 / math.sqrt(2.0 * math.pi)


def _at_least_float32(dtype):
    """The dtype the XLA forms compute in: float32 for a half-precision map, the map's own otherwise (float64)."""
    import tensorflow as tf

    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


@functools.cache
def xla_gelu_tensorflow():
    """(gelu, gelu_times): the erf GELU of a map and `upstream * gelu'(h)`, each compiled by XLA into one pass
    over the map (in at least float32, rounded once for a half-precision map); None where this TensorFlow cannot.

    Keras's "auto" runs TensorFlow's CPU graph without XLA, op by op: the GELU is five ops and its derivative
    times the upstream gradient nine, each a pass over a 4C-wide map and, in bfloat16, each rounded. Used only
    in training (the layer's `training`; docs/performance.md has the effect): at inference, and so in every
    graph traced for export, TensorFlow's ops stay, and grappler fuses the GELU into the MatMul before it.
    Checked once, on a tiny map: a TensorFlow built without XLA's CPU JIT keeps the ops.
    """
    import tensorflow as tf

    def gelu(h):
        h32 = tf.cast(h, _at_least_float32(h.dtype))
        return tf.cast(h32 * (0.5 * (1.0 + tf.math.erf(h32 * _SQRT_HALF))), h.dtype)

    def gelu_times(upstream, h):
        h32 = tf.cast(h, _at_least_float32(h.dtype))
        slope = 0.5 * (1.0 + tf.math.erf(h32 * _SQRT_HALF)) + h32 * tf.exp(-0.5 * h32 * h32) * _INV_SQRT_2PI
        return tf.cast(tf.cast(upstream, h32.dtype) * slope, upstream.dtype)

    # reduce_retracing: one trace for every map shape when called eagerly (XLA compiles per shape anyway).
    compiled = tuple(tf.function(f, jit_compile=True, reduce_retracing=True) for f in (gelu, gelu_times))
    try:
        with tf.init_scope():  # eager, also when first asked inside a traced step
            probe = tf.constant([-1.0, 0.5])
            compiled[1](probe, compiled[0](probe)).numpy()
    except (tf.errors.OpError, NotImplementedError, ValueError):
        return None
    return compiled


def _gelu_slope_tensorflow(upstream, h, training):
    """upstream * GELU'(h): XLA's one pass in training where it compiles, else TensorFlow's ops (in h's dtype)."""
    import tensorflow as tf

    xla = xla_gelu_tensorflow() if training else None
    if xla:
        return xla[1](upstream, h)
    cdf = 0.5 * (1.0 + tf.math.erf(h * _SQRT_HALF))
    return upstream * (cdf + h * tf.exp(-0.5 * tf.square(h)) * _INV_SQRT_2PI)


def _gelu_forward_tensorflow(h, training):
    """The exact GELU of h: TensorFlow's op where grappler may fuse it into the MatMul before it (not
    `training`), XLA's one pass in training where it compiles."""
    import tensorflow as tf

    xla = xla_gelu_tensorflow() if training else None
    return xla[0](h) if xla else tf.nn.gelu(h, approximate=False)


def _gelu_tensorflow(y, training=None):
    import tensorflow as tf

    # tf.nn.gelu(approximate=False) is five ops whose gradients keep four 4C-wide maps; this
    # keeps only the input and recomputes Phi and phi in the backward pass. The forms (XLA's in
    # training) are chosen when the forward is traced, so a graph traced for inference, an export's,
    # holds no XLA function in its gradient either.
    @tf.custom_gradient
    def gelu(y):
        def grad(upstream):
            return _gelu_slope_tensorflow(upstream, y, training)

        return _gelu_forward_tensorflow(y, training), grad

    return gelu(y)


def _bias_add_tensorflow(y, bias):
    """tf.nn.bias_add of a 2-D map, with a bias gradient summed by reduce_sum for a bfloat16 map.

    TensorFlow's BiasAddGrad accumulates a bfloat16 gradient in bfloat16, so over many rows (ConvNeXt's stage 0
    has 50,176 at batch 16) its sums stall; reduce_sum's are off by its final rounding only (measured in
    docs/performance.md). The forward op is the same BiasAdd, which grappler still fuses into the MatMul before
    it and the GELU after.
    """
    import tensorflow as tf

    if y.dtype != tf.bfloat16:
        return tf.nn.bias_add(y, bias)

    @tf.custom_gradient
    def bias_add(y, bias):
        def grad(upstream):
            return upstream, tf.reduce_sum(upstream, axis=0)

        return tf.nn.bias_add(y, bias), grad

    return bias_add(y, bias)


def dense_tensorflow(x, kernel, bias, gelu, training=None):
    # Keras's Dense on a 4-D map is tensordot (reshape, MatMul, reshape), then AddV2 and GELU's
    # five ops: the reshape between MatMul and the add keeps grappler from fusing them. A 2-D
    # MatMul -> BiasAdd -> Gelu chain becomes one oneDNN _FusedMatMul (7x faster on the stage-0
    # pwconv1 in bfloat16, 3x in float32).
    import tensorflow as tf

    kernel, bias = (tf.cast(v, x.dtype) for v in _after(x, kernel, bias))
    shape = tf.shape(x)
    y = _bias_add_tensorflow(tf.matmul(tf.reshape(x, (-1, x.shape[-1])), kernel), bias)
    if gelu:
        y = _gelu_tensorflow(y, training)
    return tf.reshape(y, tf.concat([shape[:-1], [kernel.shape[-1]]], axis=0))


# Dense and LayerNorm forms are named after the backend they are written for, or "keras" (any
# backend); a backend's own form, where it has one, is its default.
# A second form of a backend's is named `<what>_<backend>`.
DENSE_FORMULATIONS = {"torch": dense_torch, "addmm_torch": dense_addmm_torch, "tensorflow": dense_tensorflow,
                      "jax": dense_jax, "keras": dense_keras}


def own_or_keras(formulations, backend=BACKEND):
    """The formulations of `formulations` that run on `backend`, its default first."""
    own = [name for name in formulations if name == backend]
    return own + [name for name in formulations if name.endswith(f"_{backend}")] + ["keras"]


def dense_formulations_for(backend=BACKEND):
    """The Dense formulations that run on `backend`."""
    return own_or_keras(DENSE_FORMULATIONS, backend)


def dense(x, kernel, bias, gelu=False, formulation=None, training=None):
    """x @ kernel + bias over the last axis, then exact (erf) GELU if `gelu`.

    `training` (the layer's) says whether a gradient is likely; only TensorFlow's form reads it, to choose how
    it computes the GELU (`xla_gelu_tensorflow`): the same maths either way, to the rounding of a half-precision
    map (XLA's rounds once, TensorFlow's ops after each op).
    """
    return DENSE_FORMULATIONS[formulation or forms_here(x.dtype)["dense"]](x, kernel, bias, gelu, training)


def _folds(dtype):
    """Whether the layer scale folds into pwconv2's kernel in this compute dtype: not in float16, where a
    kernel times ConvNeXt's initial scale of 1e-6 is below range."""
    return keras.backend.standardize_dtype(dtype) != "float16"


def _fold(kernel, bias, gamma, dtype):
    """pwconv2's kernel and bias with the layer scale folded in (products in float32, of the values as read:
    under a mixed policy Keras reads the variables already cast to the compute dtype), or unchanged plus the
    scale to multiply the output by: float16, where a kernel times ConvNeXt's initial 1e-6 is below range."""
    from keras import ops

    if gamma is None:
        return kernel, bias, None
    if not _folds(dtype):
        return kernel, bias, gamma
    gamma = ops.cast(gamma, "float32")
    return ops.cast(kernel, "float32") * gamma, ops.cast(bias, "float32") * gamma, None


def dense_scaled(x, kernel, bias, gamma):
    """(x @ kernel + bias) * gamma as x @ (kernel * gamma) + bias * gamma, or None: scale the output instead.

    The same product, but the per-channel scale multiplies C x 4C numbers instead of the N x H x W x C map:
    one pass over the map less forward and two less backward, and the map is not kept for gamma's gradient
    (the GEMM keeps its input anyway; docs/performance.md has the effect on a training step's memory). The
    CPU dense forms fold; Keras's own (accelerators: not measured there) and float16 do not (the product of a
    kernel and ConvNeXt's initial scale of 1e-6 is below float16's range).
    """
    form = forms_here(x.dtype)["dense"]
    if form == "keras" or not _folds(x.dtype):
        return None
    kernel, bias, _ = _fold(*_after(x, kernel, bias, gamma), x.dtype)
    return DENSE_FORMULATIONS[form](x, kernel, bias, False)  # the form casts the folded kernel to x's dtype


# A block's MLP with only pwconv1's output kept for the backward pass.


def mlp_jax(x, kernel1, bias1, kernel2, bias2, gamma, training=None, norm=None, conv=None):
    # Autodiff keeps GELU's output for pwconv2's kernel gradient beside GELU's input for its own: two
    # 4C-wide maps per block. Rematerialised together (jax.checkpoint), GELU and pwconv2 keep only their
    # input, and the backward pass recomputes the GELU from it, erf being recomputed there already
    # (`dense_jax`). With `norm`, LayerNorm and pwconv1 are rematerialised together likewise: pwconv1's
    # kernel gradient needs LayerNorm's output, which the backward pass recomputes from LayerNorm's input
    # (kept for LayerNorm's own gradient anyway), so one C-wide map per block less is kept. Only for a
    # half-precision map: in float32 the recomputation slowed a ConvNeXt-T step more than its memory was
    # worth (docs/performance.md), so None there (the block normalises, then calls again).
    import jax
    import jax.numpy as jnp
    from keras import ops

    if (norm is not None and x.dtype not in (jnp.bfloat16, jnp.float16)) or conv is not None:
        return None  # (the depthwise conv recomputed too saved XLA little memory: docs/performance.md)

    kernel2, bias2, scale = _fold(kernel2, bias2, gamma, x.dtype)
    kernel2, bias2 = ops.convert_to_tensor(kernel2), ops.convert_to_tensor(bias2)  # arrays, not Keras variables
    if norm is None:
        hidden = dense_jax(x, kernel1, bias1, False)
    else:
        ln_gamma, ln_beta, epsilon = norm

        def norm_dense(x, ln_gamma, ln_beta, kernel, bias):
            normed = layer_norm_keras(x, ln_gamma, ln_beta, epsilon).astype(x.dtype)
            return dense_jax(normed, kernel, bias, False)

        hidden = jax.checkpoint(norm_dense)(x, *(ops.convert_to_tensor(v) for v in (ln_gamma, ln_beta, kernel1,
                                                                                     bias1)))
    y = jax.checkpoint(lambda h, k, b: dense_jax(_exact_gelu(h), k, b, False))(hidden, kernel2, bias2)
    return y if scale is None else y * ops.cast(scale, y.dtype)


def _norm_dense_tensorflow(x, ln_gamma, ln_beta, epsilon, kernel, bias, conv=None):
    """LayerNorm(x) @ kernel + bias as a 2-D (rows, units) map, with one gradient that keeps x alone and
    recomputes LayerNorm's output from it after the upstream gradient arrives; with `conv`, the depthwise
    conv's (kernel, bias), x is first convolved (`depthwise_conv_same_keras`) and the convolution recomputed
    too, so the gradient keeps the block's input alone. In training, where XLA compiles
    (`mlp_tensorflow` checks); `kernel` and `bias` in x's dtype."""
    import tensorflow as tf

    xla = xla_layer_norm_tensorflow(epsilon)
    ln_gamma, ln_beta = (tf.cast(v, _at_least_float32(x.dtype)) for v in (ln_gamma, ln_beta))
    shape, channels = tf.shape(x), x.shape[-1]
    conv = () if conv is None else tuple(tf.cast(v, x.dtype) for v in conv)

    def convolved(x, conv):
        return depthwise_conv_same_keras(x, *conv) if conv else x

    @tf.custom_gradient
    def norm_dense(x, ln_gamma, ln_beta, kernel, bias, *conv):
        def grad(upstream):
            with tf.control_dependencies([upstream]):  # recomputed in the backward pass, not kept (mlp_tensorflow)
                late = tf.identity(x)
            d_normed = tf.reshape(tf.matmul(upstream, kernel, transpose_b=True), shape)
            h = convolved(late, conv)
            normed = tf.reshape(xla[0](h, ln_gamma, ln_beta), (-1, channels))
            d_kernel = tf.matmul(normed, upstream, transpose_a=True)
            d_h, d_gamma, d_beta = xla[1](h, ln_gamma, d_normed)
            grads = [d_h, d_gamma, d_beta, d_kernel, tf.reduce_sum(upstream, axis=0)]
            if conv:  # TensorFlow's own depthwise gradients, as its autodiff of the forward takes
                strides = [1, 1, 1, 1]
                grads[0] = tf.nn.depthwise_conv2d_backprop_input(shape, conv[0], d_h, strides, "SAME")
                grads += [tf.nn.depthwise_conv2d_backprop_filter(late, tf.shape(conv[0]), d_h, strides, "SAME"),
                          tf.reduce_sum(tf.reshape(d_h, (-1, channels)), axis=0)]
            return grads

        normed = tf.reshape(xla[0](convolved(x, conv), ln_gamma, ln_beta), (-1, channels))
        return tf.nn.bias_add(tf.matmul(normed, kernel), bias), grad

    return norm_dense(x, ln_gamma, ln_beta, kernel, bias, *conv)


def mlp_tensorflow(x, kernel1, bias1, kernel2, bias2, gamma, training=None, norm=None, conv=None):
    # The same for TensorFlow: tf.matmul's gradient keeps GELU's output for pwconv2's kernel gradient, beside
    # the GELU's input that `_gelu_tensorflow` keeps. Here GELU -> pwconv2 has one gradient that keeps the
    # input alone and recomputes the GELU and its slope from it (`xla_gelu_tensorflow` in training). The
    # forward ops are `dense_tensorflow`'s (2-D MatMul -> BiasAdd, the GELU, then MatMul -> BiasAdd; at
    # inference grappler fuses the first three), reshaped once. With `norm`, LayerNorm and pwconv1 too have one
    # gradient, which keeps LayerNorm's input alone (`_norm_dense_tensorflow`, only in training: None otherwise).
    import tensorflow as tf

    ln_gamma, ln_beta, epsilon = norm or (None, None, None)
    # The fused forms only in training, where XLA compiles, and with `conv` where the dispatched depthwise form
    # is Keras's (the one recomputed here); decided before any op: a traced graph would keep (and run) reads
    # and folds that nothing uses.
    fusable = norm is not None and training and xla_layer_norm_tensorflow(epsilon) and (
        conv is None or forms_here(x.dtype)["depthwise"] == "keras")
    if (norm is not None or conv is not None) and not fusable:
        return None
    conv_kernel, conv_bias = conv or (None, None)
    kernel1, bias1, kernel2, bias2, gamma, ln_gamma, ln_beta, conv_kernel, conv_bias = _after(
        x, kernel1, bias1, kernel2, bias2, gamma, ln_gamma, ln_beta, conv_kernel, conv_bias)
    kernel2, bias2, scale = _fold(kernel2, bias2, gamma, x.dtype)
    kernel1, bias1, kernel2, bias2 = (tf.cast(v, x.dtype) for v in (kernel1, bias1, kernel2, bias2))
    shape = tf.shape(x)
    if norm is None:
        hidden = _bias_add_tensorflow(tf.matmul(tf.reshape(x, (-1, x.shape[-1])), kernel1), bias1)
    else:
        hidden = _norm_dense_tensorflow(x, ln_gamma, ln_beta, epsilon, kernel1, bias1,
                                        None if conv is None else (conv_kernel, conv_bias))

    @tf.custom_gradient
    def gelu_dense(h, kernel, bias):
        def grad(upstream):
            # TensorFlow runs an op as soon as its inputs are ready: without this dependency on the
            # upstream gradient the recomputation, which reads h alone, runs during the forward pass and
            # its maps are kept until the backward pass (measured: no memory saved, docs/performance.md).
            with tf.control_dependencies([upstream]):
                late = tf.identity(h)
            d_kernel = tf.matmul(_gelu_forward_tensorflow(late, training), upstream, transpose_a=True)
            d_h = _gelu_slope_tensorflow(tf.matmul(upstream, kernel, transpose_b=True), late, training)
            return d_h, d_kernel, tf.reduce_sum(upstream, axis=0)

        return tf.nn.bias_add(tf.matmul(_gelu_forward_tensorflow(h, training), kernel), bias), grad

    y = tf.reshape(gelu_dense(hidden, kernel2, bias2), tf.concat([shape[:-1], [kernel2.shape[-1]]], axis=0))
    return y if scale is None else y * tf.cast(scale, y.dtype)


# Keyed by the dispatched dense form: a 4C-wide map less per block for the gradient (ConvNeXt-T float32
# training at batch 16: 320-480 MB off JAX's peak, 540-570 MB off TensorFlow's; docs/performance.md).
# Eager torch and Keras's own form (accelerators) run the MLP step by step.
MLP_REMAT_FORMULATIONS = {"jax": mlp_jax, "tensorflow": mlp_tensorflow}


def mlp(x, kernel1, bias1, kernel2, bias2, gamma=None, training=None, norm=None, conv=None):
    """(gelu(x @ kernel1 + bias1) @ kernel2 + bias2) * gamma, keeping only the hidden map for the gradient; or None.

    The same numbers as pwconv1 (with its GELU), pwconv2 and the layer scale step by step (the scale folded
    into pwconv2 as `dense_scaled`); None where the dispatched dense form has no such form. With `norm`, a
    LayerNorm's (gamma, beta, epsilon) over the last axis, `x` is first normalised (`layer_norm`'s maths), and
    the gradient keeps LayerNorm's input instead of its output as well: one C-wide map per block less. None
    where there is no such form (TensorFlow: outside training, or without XLA; JAX: a float32 or float64 map):
    normalise, then call it again.
    With `conv` as well, a depthwise conv's (kernel, bias), `x` is first convolved (`depthwise_conv_same`'s
    maths, 'same' padding) and the gradient keeps `x` alone (TensorFlow in training; None elsewhere).
    """
    form = MLP_REMAT_FORMULATIONS.get(forms_here(x.dtype)["dense"])
    return form(x, kernel1, bias1, kernel2, bias2, gamma, training, norm, conv) if form else None


# A block's tail fused: only where a backend has a fused form (eager PyTorch inference); under
# jit (JAX, tf.function) the compiler fuses the elementwise steps itself.
SCALE_ADD_FORMULATIONS = {"torch": dense_scale_add_torch}


def dense_scale_add(x, kernel, bias, gamma, shortcut):
    """shortcut + (x @ kernel + bias) * gamma in one fused op, or None: compute it step by step."""
    fused = SCALE_ADD_FORMULATIONS.get(forms_here(x.dtype)["dense"])
    return fused(x, kernel, bias, gamma, shortcut) if fused else None


# LayerNorm over the channels (last axis).


def layer_norm_keras(x, gamma, beta, epsilon, training=None):
    from keras import ops

    return ops.layer_normalization(x, gamma, beta, -1, epsilon)


def layer_norm_jax(x, gamma, beta, epsilon, training=None):
    # Rematerialised: the backward pass recomputes mean and variance from the saved input instead
    # of keeping the centred map and its products (2.4 -> 2.1 GB for ConvNeXt-T's gradient).
    import jax
    from keras import ops

    def norm(x, gamma, beta):
        return ops.layer_normalization(x, gamma, beta, -1, epsilon)

    return jax.checkpoint(norm)(x, ops.convert_to_tensor(gamma), ops.convert_to_tensor(beta))


def layer_norm_torch(x, gamma, beta, epsilon, training=None):
    # PyTorch's CPU layer norm takes a bfloat16 map with float32 gamma/beta and accumulates in
    # float32: Keras's cast of the whole map to float32 and back (two copies) is not needed.
    import torch.nn.functional as F
    from keras import ops

    gamma, beta = ops.convert_to_tensor(gamma), ops.convert_to_tensor(beta)
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, epsilon)


def xla_layer_norm_tensorflow(epsilon):
    """(forward, backward) of LayerNorm over the last axis, each one XLA-compiled function (statistics in at
    least float32; the backward recomputes them from the input); None where XLA cannot compile here.

    Keras's LayerNorm on TensorFlow's CPU graph is about ten ops forward and twenty backward, each a pass over
    the map, and under a mixed policy its gradient keeps a float32 copy of the bfloat16 input. Only in training
    (`layer_norm_tensorflow`): at inference and in exported graphs Keras's ops stay.
    """
    if xla_gelu_tensorflow() is None:  # the same probe: this TensorFlow's XLA CPU JIT
        return None
    return _compiled_layer_norm_tensorflow(float(epsilon))


@functools.cache
def _compiled_layer_norm_tensorflow(epsilon):
    import tensorflow as tf

    def normalised(x32):
        centred = x32 - tf.reduce_mean(x32, -1, keepdims=True)
        inv = tf.math.rsqrt(tf.reduce_mean(centred * centred, -1, keepdims=True) + epsilon)
        return centred * inv, inv

    def forward(x, gamma, beta):
        xhat, _ = normalised(tf.cast(x, gamma.dtype))
        return tf.cast(xhat * gamma + beta, x.dtype)

    def backward(x, gamma, upstream):
        xhat, inv = normalised(tf.cast(x, gamma.dtype))
        g = tf.cast(upstream, gamma.dtype)
        gy = g * gamma
        dx = inv * (gy - tf.reduce_mean(gy, -1, keepdims=True) - xhat * tf.reduce_mean(gy * xhat, -1, keepdims=True))
        rows = (-1, tf.shape(x)[-1])  # every axis but the channels', whatever the rank
        return (tf.cast(dx, x.dtype), tf.reduce_sum(tf.reshape(g * xhat, rows), 0),
                tf.reduce_sum(tf.reshape(g, rows), 0))

    return tuple(tf.function(f, jit_compile=True, reduce_retracing=True) for f in (forward, backward))


def layer_norm_tensorflow(x, gamma, beta, epsilon, training=None):
    # In training, forward and backward each one XLA-compiled pass (`xla_layer_norm_tensorflow`); otherwise,
    # and where XLA cannot compile, Keras's ops.
    xla = xla_layer_norm_tensorflow(epsilon) if training else None
    if xla is None:
        return layer_norm_keras(x, gamma, beta, epsilon)
    import tensorflow as tf

    # gamma and beta in the statistics' dtype (float32 for a half-precision map); their gradients flow back
    # through the casts to the variables' own dtype.
    gamma, beta = (tf.cast(v, _at_least_float32(x.dtype)) for v in _after(x, gamma, beta))

    @tf.custom_gradient
    def norm(x, gamma, beta):
        def grad(upstream):
            return xla[1](x, gamma, upstream)

        return xla[0](x, gamma, beta), grad

    return norm(x, gamma, beta)


LAYER_NORM_FORMULATIONS = {"torch": layer_norm_torch, "jax": layer_norm_jax, "tensorflow": layer_norm_tensorflow,
                           "keras": layer_norm_keras}


def layer_norm_formulations_for(backend=BACKEND):
    """The LayerNorm formulations that run on `backend`."""
    return own_or_keras(LAYER_NORM_FORMULATIONS, backend)


def layer_norm(x, gamma, beta, epsilon, formulation=None, training=None):
    """LayerNorm over the last axis, computed in at least float32, returned in x's dtype.

    `training` (the layer's): TensorFlow's form compiles itself with XLA then (`xla_layer_norm_tensorflow`),
    the same maths to a half-precision map's rounding.
    """
    name = formulation or forms_here(x.dtype)["layer_norm"]
    return LAYER_NORM_FORMULATIONS[name](x, gamma, beta, epsilon, training)


# ---- which form runs where ---------------------------------------------------------------------

ANY = "*"
# (backend, device, CPU ISA, compute dtype) -> the forms of the three ops; the first row that matches wins.
# The CPU forms were measured on CPUs (docs/dispatch.md has each row's measurement: CPU model, date,
# figures); on a GPU or TPU every op is Keras's own, which the accelerator's libraries (cuDNN, cuBLAS, XLA)
# fuse and tile themselves, until a measurement there says otherwise. A form that needs a kernel the
# hardware may lack checks for it where it runs (`onednn_bf16`) and takes the plain path there.
DISPATCH = (
    # backend       device ISA  dtype   depthwise      dense         layer_norm
    ("jax",         "cpu", ANY, ANY,    "shifted_jax", "jax",        "jax"),
    ("torch",       "cpu", "avx2", ANY, "torch",       "addmm_torch", "torch"),  # oneDNN's linear is slower there
    ("torch",       "cpu", ANY, ANY,    "torch",       "torch",      "torch"),
    ("tensorflow",  "cpu", ANY, ANY,    "keras",       "tensorflow", "tensorflow"),
    (ANY,           ANY,   ANY, ANY,    "keras",       "keras",      "keras"),
)


@functools.cache  # every layer call asks (a torch eager forward: four times a block); the answer is fixed
def forms_for(backend, device, isa, dtype):
    """{"depthwise", "dense", "layer_norm"}: the forms DISPATCH gives a (backend, device, ISA, dtype); read only."""
    for row in DISPATCH:
        if all(want in (ANY, have) for want, have in zip(row[:4], (backend, device, isa, dtype))):
            return dict(zip(("depthwise", "dense", "layer_norm"), row[4:]))
    raise ValueError(f"No form for backend={backend!r}, device={device!r}, isa={isa!r}, dtype={dtype!r}")


def forms_here(dtype):
    """The forms for this process's backend, device and CPU (`hardware.detect`, read once) and `dtype`."""
    from keras_convnext import hardware

    here = hardware.detect(BACKEND)
    return forms_for(BACKEND, here["device"], here["isa"], keras.backend.standardize_dtype(dtype))


# ---- training and export: what differs per backend outside the model's maths ------------------

def optimizer_views(variable, backend=BACKEND):
    """The objects an optimizer's `update_step` may receive for the Keras `variable`.

    Keras's TensorFlow optimizer hands `update_step` the tf.Variable inside (`variable.value`,
    for tf.distribute); JAX's and PyTorch's hand it the Keras variable itself.
    """
    return (variable, variable.value) if backend == "tensorflow" else (variable,)


def sync_device(values=None):
    """Waits until the work queued so far is done: GPU streams, and JAX's asynchronous dispatch."""
    if BACKEND == "jax":
        import jax

        # A step is one XLA executable: its outputs are ready when all of it is. (Keras hands callbacks host
        # copies of the logs, which already waited; this covers values still on the device.)
        jax.block_until_ready(values)
    elif BACKEND == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        import tensorflow as tf

        tf.test.experimental.sync_devices()


def peak_device_bytes():
    """The accelerator allocator's high-water mark in this process (weights, activations and workspace)."""
    if BACKEND == "torch":
        import torch

        return torch.cuda.max_memory_allocated()
    if BACKEND == "jax":
        import jax

        return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("GPU:0")["peak"]


def data_parallel_available(backend=BACKEND):
    """Whether `keras.distribution.DataParallel` trains on this backend (JAX's alone implements it)."""
    return backend == "jax"


if BACKEND == "torch":
    import torch

    class InferenceModule(torch.nn.Module):
        """A Keras model (a torch Module on this backend) called with training=False: what ONNX export traces."""

        def __init__(self, keras_model):
            super().__init__()
            self.keras_model = keras_model

        def forward(self, images):
            return self.keras_model(images, training=False)


def export_onnx(model, path, size):
    """Writes `model` (pixels (N, size, size, 3) -> probabilities) as ONNX with a dynamic batch; torch backend.

    The dynamo exporter keeps LayerNorm as one `LayerNormalization` op (opset 18).
    """
    if BACKEND != "torch":
        raise ValueError(f"ONNX export runs on the torch backend. Received: backend={BACKEND!r}")
    import numpy as np

    sample = torch.from_numpy(np.zeros((2, size, size, 3), "float32"))
    program = torch.onnx.export(
        InferenceModule(model), (sample,), input_names=["images"], output_names=["probabilities"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, opset_version=18, dynamo=True,
        verbose=False,
    )
    program.optimize()
    program.save(path)
