"""JAX (XLA:CPU) timings of ConvNeXt-T's pointwise GEMMs in mixed precision, in each form (docs/dispatch.md).

    python examples/ops_benchmark_jax.py

For each of the four stages' pwconv1 at batch 16 and 224 px, the forward GEMM and the two GEMMs of its
gradient, jitted, median of 5 calls after 2, in ms:
- `bf16 -> f32`: bfloat16 operands with a float32 product (`preferred_element_type`), the mixed-precision form
  `backend_ops.dense_jax` uses;
- `bf16 -> bf16`: bfloat16 operands and product (what autodiff of a plain bfloat16 matmul runs);
- `f32 upcast`: both operands cast to float32, a float32 GEMM, the product cast back to bfloat16;
- `f32`: the float32 GEMM alone (the float32 model's).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [(50176, 96, 384), (12544, 192, 768), (3136, 384, 1536), (784, 768, 3072)]


def median_ms(fn, *args, n=5):
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def dot(a, b, out=None):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=out)


FORMS = {
    "bf16 -> f32": jax.jit(lambda a, b: dot(a, b, jnp.float32).astype(jnp.bfloat16)),
    "bf16 -> bf16": jax.jit(lambda a, b: dot(a, b)),
    "f32 upcast": jax.jit(lambda a, b: dot(a.astype(jnp.float32), b.astype(jnp.float32)).astype(jnp.bfloat16)),
}
F32 = jax.jit(lambda a, b: dot(a, b))


def main():
    rng = np.random.default_rng(0)
    print("jax", jax.__version__, "| device:", jax.devices()[0].device_kind)
    print(f"{'GEMM (m x k -> n)':<32}" + "".join(f"{name:>14}" for name in [*FORMS, "f32"]))
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        g = rng.standard_normal((m, n), dtype=np.float32)
        # forward x @ w, the input gradient g @ w.T, the kernel gradient x.T @ g
        for label, a, b in (("fwd", x, w), ("dx", g, w.T.copy()), ("dw", x.T.copy(), g)):
            a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
            cells = [median_ms(fn, a16, b16) for fn in FORMS.values()]
            cells.append(median_ms(F32, jnp.asarray(a), jnp.asarray(b)))
            name = f"{label} {a.shape[0]} x {a.shape[1]} -> {b.shape[1]}"
            print(f"{name:<32}" + "".join(f"{c:>14.1f}" for c in cells))


if __name__ == "__main__":
    main()
