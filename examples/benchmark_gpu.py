"""The README's GPU table in one command, on a machine with an NVIDIA GPU.

    python examples/benchmark_gpu.py                        # every Keras backend whose CUDA build sees the GPU
    python examples/benchmark_gpu.py --backends jax torch   # or these; any other benchmark flag passes through

ConvNeXt-T, 224 px, batch 16 and 64, inference and training, float32 and mixed_bfloat16, 30 timed steps after 3:
timm eager and under `torch.compile` (channels-last, `torch.autocast` on CUDA) against keras_convnext with XLA
on JAX and TensorFlow and eager on torch, on the same card (`keras-convnext benchmark --device gpu`: the device
is synchronised at each clock read; peak memory is each framework's GPU allocator's). Writes
docs/benchmark_gpu.json (with the card's name) and docs/benchmark_gpu.png, and prints the Markdown table.

Needs the CUDA builds of the backends to measure: `pip install "jax[cuda12]"`, `pip install
"tensorflow[and-cuda]"`, a CUDA build of torch (PyPI's Linux wheels are), and timm for the peers.
"""

import sys

DEFAULTS = ["--variant", "tiny", "--image-size", "224", "--batch-size", "16", "64",
            "--mode", "inference", "training", "--precision", "float32", "mixed_bfloat16",
            "--steps", "30", "--warmup", "3", "--peers", "timm", "timm_compile",
            "--json", "docs/benchmark_gpu.json", "--plot", "docs/benchmark_gpu.png"]


def main(argv=None):
    from keras_convnext import benchmark
    from keras_convnext.cli import main as cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--backends" not in argv:
        found = benchmark.gpu_backends()
        backends = [b for b, device in found.items() if device == "gpu"]
        if not backends:
            seen = ", ".join(f"{b}={device}" for b, device in found.items())
            print("benchmark_gpu.py: no Keras backend computes on a GPU here; install a CUDA build (pip install "
                  '"jax[cuda12]", "tensorflow[and-cuda]" or a CUDA torch) where nvidia-smi lists a GPU, or name '
                  f"the backends with --backends. Received: {seen}", file=sys.stderr)
            return 2
        argv = ["--backends", *backends, *argv]
    # Flags given here come after the defaults, so they replace them.
    cli(["benchmark", "--device", "gpu", *DEFAULTS, *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
