"""Throughput and peak memory of keras_convnext side by side with its peers, in one run.

Every measurement runs in a fresh process (own backend, clean memory high-water mark):
keras_convnext and keras.applications on each requested Keras backend, timm eager and timm under
`torch.compile`. Ratios are to timm eager in the same mode and precision, measured in the same run.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import keras

from keras_convnext.variants import VARIANTS

KERAS_IMPLS = ("keras_convnext", "keras_applications")
TIMM_IMPLS = ("timm", "timm_compile")
BACKENDS = ("tensorflow", "jax", "torch")
PRECISIONS = ("float32", "mixed_bfloat16")
MODES = ("inference", "training")


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
    """Records the end of the last warm-up batch and of the last batch of a predict/fit call."""

    def __init__(self, warmup):
        super().__init__()
        self.warmup, self.start, self.stop = warmup, None, None

    def _tick(self, batch):
        if batch == self.warmup - 1:
            self.start = time.perf_counter()
        self.stop = time.perf_counter()

    def on_predict_batch_end(self, batch, logs=None):
        self._tick(batch)

    def on_train_batch_end(self, batch, logs=None):
        self._tick(batch)


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
    clock = _BatchClock(spec.warmup)
    if spec.mode == "inference":
        model.predict(x, batch_size=n, verbose=0, callbacks=[clock])
    else:
        model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=n, epochs=1, verbose=0, callbacks=[clock])
    return clock.stop - clock.start


def _time_timm(spec):
    import contextlib

    import timm
    import torch

    model = timm.create_model(VARIANTS[spec.variant].timm_name, pretrained=False)
    model.train(spec.mode == "training")
    if spec.impl == "timm_compile":
        model = torch.compile(model)
    n = spec.batch_size
    x = torch.randint(0, 256, (n, 3, spec.image_size, spec.image_size)).float()
    y = torch.randint(0, 1000, (n,))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if spec.precision == "mixed_bfloat16"
                else contextlib.nullcontext())
    if spec.mode == "inference":
        def step():
            with torch.inference_mode(), autocast:
                model(x)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            with autocast:
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(spec.warmup):
        step()
    start = time.perf_counter()
    for _ in range(spec.steps):
        step()
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
    baseline = _rss_bytes()
    seconds = (_time_timm if spec.impl in TIMM_IMPLS else _time_keras)(spec)
    images = spec.batch_size * spec.steps
    return {**dataclasses.asdict(spec), "label": spec.label, "seconds": seconds,
            "images_per_second": images / seconds,
            "peak_memory_mb": (_peak_bytes() - baseline) / 2**20}


def measure(spec, timeout=1800):
    """Runs `spec` in a fresh process with its backend; returns the result or an error dict."""
    env = dict(os.environ, KERAS_BACKEND=spec.backend, TF_CPP_MIN_LOG_LEVEL="3")
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


def plan(variant="tiny", image_size=224, batch_size=16, precisions=("float32",), modes=MODES,
         backends=None, peers=True, steps=6, warmup=2):
    """The list of `Spec`s one benchmark run measures."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant. Valid values: {', '.join(VARIANTS)}. Received: variant={variant!r}")
    backends = backends or [keras.backend.backend()]
    if warmup < 1 or steps < 1:
        raise ValueError("A benchmark needs at least one warm-up batch (compilation) and one timed batch. "
                         f"Received: steps={steps}, warmup={warmup}")
    for name, values, valid in (("backends", backends, BACKENDS), ("precisions", precisions, PRECISIONS),
                                ("modes", modes, MODES)):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"Unknown {name}: valid ones are {', '.join(valid)}. Received: {name}={list(values)}")
    specs = []
    common = dict(variant=variant, image_size=image_size, batch_size=batch_size, steps=steps, warmup=warmup)
    for mode in modes:
        for precision in precisions:
            impls = [("timm", "torch"), ("timm_compile", "torch")] if peers else []
            for backend in backends:
                impls.append(("keras_convnext", backend))
                if peers and VARIANTS[variant].version == 1:  # keras.applications has no ConvNeXt V2
                    impls.append(("keras_applications", backend))
            specs += [Spec(impl, backend, mode=mode, precision=precision, **common) for impl, backend in impls]
    return specs


def run(specs, progress=True):
    """Measures every spec in its own process, with a progress bar; returns the results."""
    bar = keras.utils.Progbar(len(specs), unit_name="run") if progress else None
    results = []
    for i, spec in enumerate(specs):
        results.append(measure(spec))
        if bar:
            bar.update(i + 1)
    return results


def table(results):
    """A Markdown table: img/s, ratio to timm eager (same mode and precision), peak memory and its ratio."""
    refs = {(r["mode"], r["precision"]): r for r in results if r["impl"] == "timm" and "error" not in r}
    lines = ["| mode | precision | implementation | img/s | vs timm | peak MB | memory vs timm |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['precision']} | {r['label']} | failed: {r['error']} | | | |")
            continue
        ref = refs.get((r["mode"], r["precision"]))
        ratio = f"{r['images_per_second'] / ref['images_per_second']:.2f}x" if ref else "-"
        mem = f"{r['peak_memory_mb'] / ref['peak_memory_mb']:.2f}x" if ref and ref["peak_memory_mb"] > 0 else "-"
        lines.append(f"| {r['mode']} | {r['precision']} | {r['label']} | {r['images_per_second']:.1f} | "
                     f"{ratio} | {r['peak_memory_mb']:.0f} | {mem} |")
    return "\n".join(lines)


def plot(results, path):
    """A bar chart of img/s per implementation, one panel per mode and precision; written aside, renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["mode"], r["precision"]) for r in results})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (mode, precision) in zip(axes[0], groups):
        rows = [r for r in results if (r["mode"], r["precision"]) == (mode, precision) and "error" not in r]
        labels = [r["label"].replace(" (", "\n(") for r in rows]
        colors = ["tab:blue" if r["impl"] == "keras_convnext" else "tab:gray" for r in rows]
        ax.bar(range(len(rows)), [r["images_per_second"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("images / s")
        r0 = rows[0] if rows else {}
        ax.set_title(f"ConvNeXt-{r0.get('variant', '')} {mode}, {precision}, batch {r0.get('batch_size', '')}")
    fig.tight_layout()
    from keras_convnext.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(_worker(Spec(**json.loads(sys.argv[1])))))
