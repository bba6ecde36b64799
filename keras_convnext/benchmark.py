"""Throughput and peak memory of keras_convnext side by side with its peers, in one run.

Every measurement runs in a fresh process (own backend, clean memory high-water mark):
keras_convnext and keras.applications on each requested Keras backend, timm eager and timm under
`torch.compile`. Ratios are to timm eager in the same mode and precision, measured in the same run.

`device="gpu"` measures on the machine's GPU instead: timm in channels-last memory (with `torch.autocast` on
CUDA for the mixed precisions), Keras on its backend's GPU with XLA (`jit_compile=True`) on JAX and TensorFlow
and eager on torch (Keras's own default there), float32 GEMMs in TF32 on every framework (JAX's and
TensorFlow's default; torch is asked for it), and peak memory read from each framework's GPU allocator.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import keras

from keras_convnext import hugepages
from keras_convnext.variants import VARIANTS

KERAS_IMPLS = ("keras_convnext", "keras_applications")
TIMM_IMPLS = ("timm", "timm_compile")
PEERS = ("timm", "timm_compile", "keras_applications")
BACKENDS = ("tensorflow", "jax", "torch")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
MODES = ("inference", "training")
DEVICES = ("cpu", "gpu")
# What a framework needs to compute on an NVIDIA GPU.
GPU_INSTALL = {"jax": 'pip install "jax[cuda12]"', "tensorflow": 'pip install "tensorflow[and-cuda]"',
               "torch": "a CUDA build of torch and a visible GPU"}
# The scaling view (`--scaling`): variants, image sizes and batch sizes, every combination.
SCALING = (("tiny", "base"), (224, 384), (1, 16, 64))


@dataclasses.dataclass
class Spec:
    impl: str
    backend: str  # the Keras backend, or "torch" for timm
    variant: str = "tiny"
    image_size: int = 224
    batch_size: int = 16
    precision: str = "float32"
    mode: str = "inference"
    steps: int = 6
    warmup: int = 2
    device: str = "cpu"

    @property
    def label(self):
        return self.impl if self.impl in TIMM_IMPLS else f"{self.impl} ({self.backend})"


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_bytes():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _BatchClock(keras.callbacks.Callback):
    """Records the end of the last warm-up batch and of the last batch of a predict/fit call.

    The device is synchronised at those two batches only, so the timed span holds exactly the work of the
    batches after the warm-up, wherever it runs. `async_safe`: Keras may run it off the training thread, as it
    runs batch-end work when a user's call has no callbacks (JAX, torch), so the clock adds no per-batch wait.
    """

    async_safe = True

    def __init__(self, warmup, total):
        super().__init__()
        self.warmup, self.total, self.start, self.stop = warmup, total, None, None

    def _tick(self, batch, logs):
        from keras_convnext import backend_ops

        if batch == self.warmup - 1:
            backend_ops.sync_device(logs)
            self.start = time.perf_counter()
        elif batch == self.total - 1:
            backend_ops.sync_device(logs)
            self.stop = time.perf_counter()

    def on_predict_batch_end(self, batch, logs=None):
        self._tick(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._tick(batch, logs)


def _check_device(spec):
    """A one-line error where the spec's device is not the one its framework computes on."""
    from keras_convnext import hardware

    backend = spec.backend  # "torch" for timm's rows
    found = hardware.device_of(backend)
    if found != spec.device:
        hint = GPU_INSTALL[backend] if spec.device == "gpu" else "unset KERAS_TORCH_DEVICE, or hide the accelerator"
        raise RuntimeError(f"{spec.label} was asked to run on the {spec.device} but {backend} computes on the "
                           f"{found} here ({hint}). Received: device={spec.device!r}")


def _time_keras(spec):
    import numpy as np

    if spec.precision != "float32":
        keras.config.set_dtype_policy(spec.precision)
    shape = (spec.image_size, spec.image_size, 3)
    if spec.impl == "keras_convnext":
        from keras_convnext import model as model_lib

        v = VARIANTS[spec.variant]
        model = getattr(model_lib, v.builder_name)(weights=None, input_shape=shape,
                                                   drop_path_rate=v.drop_path_rate if spec.mode == "training" else 0.0)
    else:
        name = VARIANTS[spec.variant].builder_name
        model = getattr(keras.applications, name)(weights=None, input_shape=shape)
    rng = np.random.default_rng(0)
    n = spec.batch_size
    total = spec.warmup + spec.steps
    # Pixels as a user's decoded images are, uint8 (both Keras models normalise inside): a float32
    # copy of every batch would add 4 bytes per pixel to the peak (67 MB here; timm's loop reuses
    # one float batch of 10 MB).
    x = rng.integers(0, 256, (n * total,) + shape, dtype=np.uint8)
    y = rng.integers(0, 1000, (n * total,))
    # One predict/fit call as a user makes it, timed from the end of the last warm-up batch to the
    # end of the last batch: steady-state throughput, as timm's loop is timed. (The call's set-up
    # and tear-down, e.g. the tf.data iterator, cost 0-2 s at random on TensorFlow here.)
    clock = _BatchClock(spec.warmup, total)
    # On a GPU: XLA on JAX and TensorFlow, eager torch (what Keras's jit_compile="auto" picks there).
    jit = {"jit_compile": keras.backend.backend() != "torch"} if spec.device == "gpu" else {}
    if spec.mode == "inference":
        if jit:
            model.compile(**jit)
        model.predict(x, batch_size=n, verbose=0, callbacks=[clock])
    else:
        model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="sparse_categorical_crossentropy", **jit)
        model.fit(x, y, batch_size=n, epochs=1, verbose=0, callbacks=[clock])
    return clock.stop - clock.start


def _time_timm(spec):
    import contextlib

    import timm
    import torch

    gpu = spec.device == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    model = timm.create_model(VARIANTS[spec.variant].timm_name, pretrained=False)
    model.train(spec.mode == "training")
    n = spec.batch_size
    x = torch.randint(0, 256, (n, 3, spec.image_size, spec.image_size)).float()
    y = torch.randint(0, 1000, (n,))
    if gpu:  # timm's own GPU benchmark settings: channels-last memory, inputs on the card
        model = model.to(device, memory_format=torch.channels_last)
        x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    if spec.impl == "timm_compile":
        model = torch.compile(model)
    half = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(spec.precision)
    autocast = torch.autocast(device.type, dtype=half) if half else contextlib.nullcontext()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if spec.mode == "inference":
        def step():
            with torch.inference_mode(), autocast:
                model(x)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()
        # float16 trains with loss scaling, as Keras's mixed_float16 does (its LossScaleOptimizer).
        scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "mixed_float16")

        def step():
            with autocast:
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    for _ in range(spec.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(spec.steps):
        step()
    sync()
    return time.perf_counter() - start


def _worker(spec):
    """Runs one measurement in this process; returns its result dict."""
    # Every implementation's code is imported before the baseline, as keras and its backend are: the
    # peak counts the model and its forward, not module imports (keras_convnext's load lazily).
    if spec.impl in TIMM_IMPLS:
        import timm  # noqa: F401
        import torch  # noqa: F401
    else:
        import keras_convnext.model  # noqa: F401
    _check_device(spec)
    if spec.device == "gpu" and spec.backend == "torch":  # timm's rows and Keras's torch backend
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    baseline = _rss_bytes()
    seconds = (_time_timm if spec.impl in TIMM_IMPLS else _time_keras)(spec)
    images = spec.batch_size * spec.steps
    result = {**dataclasses.asdict(spec), "label": spec.label, "seconds": seconds,
              "images_per_second": images / seconds, "peak_memory_mb": (_peak_bytes() - baseline) / 2**20}
    if spec.device == "gpu":  # timm's rows run with KERAS_BACKEND=torch: torch's allocator
        from keras_convnext import backend_ops

        result["peak_device_mb"] = backend_ops.peak_device_bytes() / 2**20
    return result


def measure(spec, timeout=1800):
    """Runs `spec` in a fresh process with its backend; returns the result or an error dict."""
    env = dict(os.environ, KERAS_BACKEND=spec.backend, TF_CPP_MIN_LOG_LEVEL="3")
    if spec.device == "gpu":  # each framework's allocator grows as needed, so its peak is what the run used
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_FORCE_GPU_ALLOW_GROWTH="true")
        # A caller's CPU-only settings would hide the GPU this run is for.
        for name, hiding in (("CUDA_VISIBLE_DEVICES", ""), ("JAX_PLATFORMS", "cpu")):
            if env.get(name) == hiding:
                del env[name]
    else:  # a CPU run on a machine with a GPU: every framework on the CPU, as timm is
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    env = hugepages.environ_with_hugepages(env)  # every implementation, timm too, with the allocator the CLI has
    cmd = [sys.executable, "-m", "keras_convnext.benchmark", json.dumps(dataclasses.asdict(spec))]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**dataclasses.asdict(spec), "label": spec.label, "error": f"timed out after {timeout} s"}
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**dataclasses.asdict(spec), "label": spec.label, "error": tail[:300]}
    return json.loads(lines[-1])


def _values(name, value):
    """`value` as a non-empty list (one value or several)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"`{name}` needs at least one value. Received: {name}={value!r}")
    return values


def plan(variant="tiny", image_size=224, batch_size=16, precisions=("float32",), modes=MODES,
         backends=None, peers=True, steps=6, warmup=2, device="cpu"):
    """The list of `Spec`s one benchmark run measures.

    `variant`, `image_size` and `batch_size` take one value or several: several give the scaling view, every
    combination measured (variant, then image size, then batch size, outermost first). `peers` is True (all of
    `PEERS`), False (keras_convnext alone), or one or several `PEERS` names. `device` is "cpu" or "gpu" (every
    implementation on the machine's GPU).
    """
    variants = _values("variant", variant)
    sizes, batches = _values("image_size", image_size), _values("batch_size", batch_size)
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"Unknown variant. Valid values: {', '.join(VARIANTS)}. Received: variant={v!r}")
    for name, values in (("image_size", sizes), ("batch_size", batches)):
        for n in values:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (name == "image_size" and n % 32):
                need = "a positive multiple of 32" if name == "image_size" else "a positive integer"
                raise ValueError(f"`{name}` must be {need}. Received: {name}={n!r}")
    backends = backends or [keras.backend.backend()]
    if warmup < 1 or steps < 1:
        raise ValueError("A benchmark needs at least one warm-up batch (compilation) and one timed batch. "
                         f"Received: steps={steps}, warmup={warmup}")
    for name, values, valid in (("backends", backends, BACKENDS), ("precisions", precisions, PRECISIONS),
                                ("modes", modes, MODES)):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"Unknown {name}: valid ones are {', '.join(valid)}. Received: {name}={list(values)}")
    if device not in DEVICES:
        raise ValueError(f"Unknown device: valid ones are {', '.join(DEVICES)}. Received: device={device!r}")
    if isinstance(peers, bool):
        peers = PEERS if peers else ()
    elif isinstance(peers, str):
        peers = [peers]
    bad = [p for p in peers if p not in PEERS] if isinstance(peers, (list, tuple)) else [peers]
    if bad:
        raise ValueError(f"Unknown peers: valid ones are {', '.join(PEERS)}. Received: peers={peers!r}")
    specs = []
    for v in variants:
        for size in sizes:
            for batch in batches:
                common = dict(variant=v, image_size=size, batch_size=batch, steps=steps, warmup=warmup,
                              device=device)
                for mode in modes:
                    for precision in precisions:
                        impls = [(p, "torch") for p in TIMM_IMPLS if p in peers]
                        for backend in backends:
                            impls.append(("keras_convnext", backend))
                            # keras.applications has no ConvNeXt V2.
                            if "keras_applications" in peers and VARIANTS[v].version == 1:
                                impls.append(("keras_applications", backend))
                        specs += [Spec(impl, backend, mode=mode, precision=precision, **common)
                                  for impl, backend in impls]
    return specs


def run(specs, progress=True, on_result=None):
    """Measures every spec in its own process, with a progress bar; returns the results.

    `on_result(results)` is called with the results so far after every measurement (the CLI writes its JSON
    there, so a run stopped part-way keeps every row it finished).
    """
    bar = keras.utils.Progbar(len(specs), unit_name="run") if progress else None
    results = []
    for i, spec in enumerate(specs):
        results.append(measure(spec))
        if on_result:
            on_result(list(results))
        if bar:
            bar.update(i + 1)
    return results


def _config(r):
    return (r["variant"], r["image_size"], r["batch_size"], r["mode"], r["precision"])


def table(results):
    """A Markdown table: img/s, ratio to timm eager (same variant, size, batch, mode and precision), peak memory."""
    refs = {_config(r): r for r in results if r["impl"] == "timm" and "error" not in r}
    # On a GPU the memory that matters is the card's: each framework's allocator peak.
    gpu = any(r.get("device") == "gpu" for r in results)
    key, peak = ("peak_device_mb", "peak GPU MB | GPU memory") if gpu else ("peak_memory_mb", "peak MB | memory")
    lines = [f"| variant | px | batch | mode | precision | implementation | img/s | vs timm | {peak} vs timm |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['variant']} | {r['image_size']} | {r['batch_size']} | {r['mode']} | {r['precision']} | {r['label']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | |")
            continue
        ref = refs.get(_config(r))
        ratio = f"{r['images_per_second'] / ref['images_per_second']:.2f}x" if ref else "-"
        mem = f"{r[key] / ref[key]:.2f}x" if ref and ref[key] > 0 else "-"
        lines.append(f"{head} {r['images_per_second']:.1f} | {ratio} | {r[key]:.0f} | {mem} |")
    return "\n".join(lines)


def report(results, command=None, planned=None, machine=None):
    """The JSON a run writes: the machine (CPU model, ISA class and flags, cores; the GPU's name for a GPU run),
    the command, the results and, given the number of `planned` measurements, whether all of them are in.
    `machine` is `machine_facts`' answer, when the caller has read it already (a run rewrites its report after
    every row)."""
    if machine is None:
        machine = machine_facts(gpu=any(r.get("device") == "gpu" for r in results))
    data = {"machine": machine, "command": command, "results": results}
    if planned is not None:
        data.update(planned=planned, complete=len(results) == planned)
    return data


def machine_facts(gpu=False):
    """The machine a run measures: `hardware.describe()`, the allocator tunables and, for a GPU run, the GPU's name."""
    from keras_convnext import hardware

    machine = hardware.describe()
    # What every measured process started with (`measure` adds the huge-page tunable where it helps).
    machine["glibc_tunables"] = hugepages.environ_with_hugepages(os.environ).get("GLIBC_TUNABLES", "")
    if gpu:
        machine["gpu"] = _gpu_name()
    return machine


def gpu_backends(timeout=600):
    """{backend: device} for every Keras backend, each asked in its own process: "missing" where it cannot
    load, "timed out" where it has not answered `timeout` seconds after the probes started.

    The three processes run side by side (each spends its time importing its framework, mostly on one core);
    none is left running when this returns or raises.
    """
    deadline = time.monotonic() + timeout
    probes, found = {}, {}
    try:
        for backend in BACKENDS:
            code = f"from keras_convnext import hardware; print(hardware.device_of({backend!r}))"
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            probes[backend] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.DEVNULL, text=True)
        for backend, probe in probes.items():
            try:
                out, _ = probe.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                found[backend] = "timed out"
                continue
            lines = out.strip().splitlines()
            found[backend] = lines[-1] if probe.returncode == 0 and lines else "missing"
    finally:
        for probe in probes.values():
            if probe.poll() is None:
                probe.kill()
            probe.communicate()  # reaped, its pipe closed
    return found


def _gpu_name():
    """The first NVIDIA GPU's name as nvidia-smi reports it (no framework is imported), or "unknown"."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    names = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return names[0].strip()[:200] if names else "unknown"


def plot(results, path):
    """A chart of the results; written aside, then renamed.

    One configuration (variant, size, batch): bars of img/s per implementation, a panel per mode and precision.
    Several (the scaling view): img/s (top) and peak MB (bottom) against the batch size, a line per
    implementation, a column per variant, image size, mode and precision.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    if len({(r["variant"], r["image_size"], r["batch_size"]) for r in ok}) > 1:
        fig = _scaling_figure(plt, ok)
    else:
        fig = _bar_figure(plt, ok)
    fig.tight_layout()
    from keras_convnext.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _bar_figure(plt, results):
    groups = sorted({(r["mode"], r["precision"]) for r in results})
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4.5), squeeze=False)
    for ax, (mode, precision) in zip(axes[0], groups):
        rows = [r for r in results if (r["mode"], r["precision"]) == (mode, precision)]
        labels = [r["label"].replace(" (", "\n(") for r in rows]
        colors = ["tab:blue" if r["impl"] == "keras_convnext" else "tab:gray" for r in rows]
        ax.bar(range(len(rows)), [r["images_per_second"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("images / s")
        r0 = rows[0]
        ax.set_title(f"ConvNeXt-{r0['variant']} {mode}, {precision}, batch {r0['batch_size']}")
    return fig


def _scaling_figure(plt, results):
    peak = "peak_device_mb" if any(r.get("device") == "gpu" for r in results) else "peak_memory_mb"
    columns = sorted({(r["variant"], r["image_size"], r["mode"], r["precision"]) for r in results})
    fig, axes = plt.subplots(2, len(columns), figsize=(4.2 * len(columns), 7), squeeze=False)
    for col, (variant, size, mode, precision) in enumerate(columns):
        rows = [r for r in results if (r["variant"], r["image_size"], r["mode"], r["precision"]) == (
            variant, size, mode, precision)]
        for label in dict.fromkeys(r["label"] for r in rows):
            line = sorted((r["batch_size"], r) for r in rows if r["label"] == label)
            style = "-" if line[0][1]["impl"] == "keras_convnext" else "--"
            for ax, key in zip(axes[:, col], ("images_per_second", peak)):
                ax.plot([b for b, _ in line], [r[key] for _, r in line], style, marker="o", label=label)
        for ax, name in zip(axes[:, col], ("images / s", "peak GPU MB" if peak == "peak_device_mb" else "peak MB")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(name)
        axes[0, col].set_title(f"{variant} {size} px\n{mode}, {precision}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    return fig


if __name__ == "__main__":
    print(json.dumps(_worker(Spec(**json.loads(sys.argv[1])))))
