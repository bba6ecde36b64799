"""What this process runs on: the device Keras computes on and, on a CPU, its instruction set.

`backend_ops` picks each layer's form from these (its DISPATCH table), and the benchmark records them with
every figure. Both are read once per process: the CPU does not change, and the device Keras places tensors
on is fixed when the backend starts.
"""

import functools
import os
import platform

import keras

# The CPU kinds the forms are chosen by, fastest matrix units first. "amx": Intel AMX tiles (Sapphire Rapids
# and later); "avx512_bf16": AVX-512 with native bfloat16 dot products (Cooper Lake, Zen 4); "avx512": AVX-512
# without bfloat16; "avx2": AVX2 + FMA only (older AMD EPYC, Intel client parts); "other": anything else
# (ARM, or a CPU whose flags cannot be read).
ISAS = ("amx", "avx512_bf16", "avx512", "avx2", "other")
# The ones whose oneDNN/XLA/Eigen kernels compute bfloat16 natively; on the others bfloat16 is converted
# to float32 and back around every op.
NATIVE_BF16_ISAS = ("amx", "avx512_bf16")
DEVICES = ("cpu", "gpu", "tpu")
_CPUINFO_LIMIT = 4 * 2**20  # /proc/cpuinfo is ~1.5 KB per core; read no more than this


def cpu_flags(path="/proc/cpuinfo"):
    """(model name, set of ISA flags) of the first CPU listed in /proc/cpuinfo; ("", set()) where there is none."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(_CPUINFO_LIMIT)
    except OSError:
        return platform.processor(), set()
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:  # x86, ARM
            flags = set(value.split())
    return model or platform.processor(), flags or set()


def isa_of(flags):
    """The entry of ISAS that a set of /proc/cpuinfo flags names."""
    if {"amx_tile", "amx_bf16"} <= flags:
        return "amx"
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    if avx512 and "avx512_bf16" in flags:
        return "avx512_bf16"
    if avx512:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "other"


def device_of(backend):
    """The device kind ("cpu", "gpu" or "tpu") Keras's `backend` computes on in this process."""
    if backend == "jax":
        import jax

        kind = jax.default_backend()  # "cpu", "gpu" (CUDA or ROCm), "tpu"
        return {"cuda": "gpu", "rocm": "gpu"}.get(kind, kind if kind in DEVICES else "cpu")
    if backend == "torch":
        import torch

        # Keras's torch backend places tensors on KERAS_TORCH_DEVICE if set, else on CUDA when available.
        chosen = os.environ.get("KERAS_TORCH_DEVICE", "")
        if chosen:
            return "gpu" if chosen.startswith("cuda") else "cpu"
        return "gpu" if torch.cuda.is_available() else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("TPU"):
            return "tpu"
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    return "cpu"


@functools.cache
def detect(backend=None):
    """{"backend", "device", "isa", "cpu", "cores"}: read once per process and backend."""
    backend = backend or keras.backend.backend()
    model, flags = cpu_flags()
    return {"backend": backend, "device": device_of(backend), "isa": isa_of(flags), "cpu": model,
            "cores": os.cpu_count()}


def describe():
    """The machine facts the benchmark records with each run: CPU model, ISA class and flags, cores."""
    model, flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
    return {"cpu": model, "isa": isa_of(flags), "isa_flags": [f for f in wanted if f in flags],
            "cores": os.cpu_count(), "platform": platform.platform()}
