"""The README's GPU table in one command, on a machine with an NVIDIA GPU.

    python examples/benchmark_gpu.py                        # every Keras backend whose CUDA build sees the GPU
    python examples/benchmark_gpu.py --backends jax torch   # or these; any other benchmark flag passes through

ConvNeXt-T, 224 px, batch 16 and 64, inference and training, float32 and mixed_bfloat16: timm eager and under
`torch.compile` (channels-last, `torch.autocast` on CUDA) against keras_convnext with XLA on JAX and
TensorFlow and eager on torch, on the same card (`keras-convnext benchmark --device gpu`: the device is
synchronised before each clock read; peak memory is each framework's GPU allocator's). Writes
docs/benchmark_gpu.json (with the card's name), docs/benchmark_gpu.png and prints the Markdown table.

Needs the CUDA builds of the backends to measure: `pip install "jax[cuda12]"`, `pip install
"tensorflow[and-cuda]"`, a CUDA build of torch (PyPI's Linux wheels are), and timm for the peers.
"""

import os
import subprocess
import sys

DEFAULTS = ["--variant", "tiny", "--image-size", "224", "--batch-size", "16", "64",
            "--mode", "inference", "training", "--precision", "float32", "mixed_bfloat16",
            "--steps", "30", "--warmup", "3", "--peers", "timm", "timm_compile",
            "--json", "docs/benchmark_gpu.json", "--plot", "docs/benchmark_gpu.png"]


def gpu_backends():
    """The Keras backends that compute on a GPU here, each asked in its own process."""
    found = []
    for backend in ("tensorflow", "jax", "torch"):
        code = f"from keras_convnext import hardware; print(hardware.device_of({backend!r}))"
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        try:
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  timeout=600)
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == ["gpu"]:
            found.append(backend)
    return found


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--backends" not in argv:
        backends = gpu_backends()
        if not backends:
            print("benchmark_gpu.py: no Keras backend computes on a GPU here. Install a CUDA build "
                  '(pip install "jax[cuda12]", "tensorflow[and-cuda]" or a CUDA torch) on a machine whose GPU '
                  "nvidia-smi lists, or name the backends with --backends.", file=sys.stderr)
            return 2
        argv = ["--backends", *backends, *argv]
    from keras_convnext.cli import main as cli

    # Flags given here come after the defaults, so they replace them.
    cli(["benchmark", "--device", "gpu", *DEFAULTS, *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
