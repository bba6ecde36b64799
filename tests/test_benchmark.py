"""The benchmark's machinery (not its timings: speed is never a pass/fail test here)."""

import dataclasses
import json

import keras
import pytest

from keras_convnext import benchmark
from conftest import ONCE_BACKEND, once


def test_plan_covers_every_peer_and_backend():
    specs = benchmark.plan(backends=["jax", "torch"], modes=["inference"], precisions=["float32", "mixed_bfloat16"])
    labels = [(s.precision, s.label) for s in specs]
    assert labels[:6] == [("float32", "timm"), ("float32", "timm_compile"),
                          ("float32", "keras_convnext (jax)"), ("float32", "keras_applications (jax)"),
                          ("float32", "keras_convnext (torch)"), ("float32", "keras_applications (torch)")]
    assert len(specs) == 12
    assert [s.label for s in benchmark.plan(peers=False)] == [f"keras_convnext ({keras.backend.backend()})"] * 2
    with pytest.raises(ValueError, match=r"Unknown backends.*Received: backends=\['mxnet'\]"):
        benchmark.plan(backends=["mxnet"])
    with pytest.raises(ValueError, match=r"Unknown precisions.*Received: precisions=\['float16'\]"):
        benchmark.plan(precisions=["float16"])
    assert {s.precision for s in benchmark.plan(precisions=["mixed_float16"])} == {"mixed_float16"}


def test_a_scaling_plan_measures_every_variant_size_and_batch():
    specs = benchmark.plan(variant=["atto", "tiny"], image_size=[32, 64], batch_size=[1, 4], modes=["inference"],
                           backends=["jax"], peers=False)
    assert [(s.variant, s.image_size, s.batch_size) for s in specs] == [
        (v, size, n) for v in ("atto", "tiny") for size in (32, 64) for n in (1, 4)]
    assert benchmark.SCALING == (("tiny", "base"), (224, 384), (1, 16, 64))
    for kwargs, message in [(dict(image_size=[224, 200]), r"`image_size` must be a positive multiple of 32. "
                                                          r"Received: image_size=200"),
                            (dict(batch_size=[16, 0]), r"`batch_size` must be a positive integer. Received: batch_size=0"),
                            (dict(batch_size=[]), r"`batch_size` needs at least one value. Received: batch_size=\[\]"),
                            (dict(variant=["tiny", "huge2"]), r"Unknown variant.*Received: variant='huge2'")]:
        with pytest.raises(ValueError, match=message):
            benchmark.plan(**kwargs)


@pytest.fixture(scope="module")
def tiny_results():
    specs = [benchmark.Spec("keras_convnext", keras.backend.backend(), variant="atto", image_size=32,
                            batch_size=2, mode=mode, steps=1, warmup=1) for mode in ("inference", "training")]
    # timm's child is the same process whatever this one's backend: measured in the torch run only (as `once`).
    if keras.backend.backend() == ONCE_BACKEND:
        specs.append(benchmark.Spec("timm", "torch", variant="atto", image_size=32, batch_size=2, steps=1, warmup=1))
    return benchmark.run(specs, progress=False)


def test_each_measurement_runs_in_its_own_process_and_reports(tiny_results):
    for result in tiny_results:
        assert "error" not in result, result
        assert result["images_per_second"] == pytest.approx(2 / result["seconds"])
        assert result["peak_memory_mb"] > 1  # building and running a model costs memory above the imports


def test_table_ratios_and_plot(tiny_results, tmp_path):
    results = list(tiny_results)
    if len(results) == 2:  # no timm child in this backend's run: a timm row at 3x our speed stands in
        results.append(dict(results[0], impl="timm", backend="torch", label="timm",
                            images_per_second=3 * results[0]["images_per_second"]))
    text = benchmark.table(results)
    rows = text.splitlines()
    assert rows[0].startswith("| variant | px | batch | mode | precision | implementation | img/s | vs timm")
    timm = results[2]["images_per_second"]
    ours = results[0]["images_per_second"]
    assert rows[2].startswith("| atto | 32 | 2 | inference | float32 | keras_convnext (")
    assert f"{ours / timm:.2f}x" in rows[2]
    assert "| timm | " in rows[4] and "| 1.00x |" in rows[4]
    assert rows[3].split("|")[8].strip() == "-"  # training has no timm row in this run: no ratio
    path = tmp_path / "bench.png"
    benchmark.plot(results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_scaling_plot_draws_a_line_per_implementation(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows = [dict(impl=impl, backend="jax", label=impl, variant="tiny", image_size=224, batch_size=n,
                 mode="inference", precision="float32", images_per_second=float(n) * (2 if impl == "timm" else 1),
                 peak_memory_mb=100.0 + n) for impl in ("timm", "keras_convnext") for n in (1, 16, 64)]
    drawn = []
    real = plt.Axes.plot
    monkeypatch.setattr(plt.Axes, "plot", lambda ax, *a, **k: drawn.append((a, k)) or real(ax, *a, **k))
    path = tmp_path / "scaling.png"
    benchmark.plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # two panels (img/s, peak MB) x two implementations, each over the three batch sizes
    assert len(drawn) == 4 and all(list(a[0]) == [1, 16, 64] for a, _ in drawn)
    assert [list(a[1]) for a, k in drawn if k["label"] == "timm"] == [[2.0, 32.0, 128.0], [101.0, 116.0, 164.0]]


def test_failed_measurement_is_reported_not_raised():
    result = benchmark.measure(benchmark.Spec("keras_convnext", keras.backend.backend(), variant="nonexistent",
                                              image_size=32, batch_size=1, steps=1, warmup=1))
    assert "error" in result and "nonexistent" in result["error"]
    assert "failed: " in benchmark.table([result])


def test_cli_writes_json(tmp_path):
    from keras_convnext.cli import main

    out = tmp_path / "r.json"
    main(["benchmark", "--variant", "atto", "--image-size", "32", "--batch-size", "2", "--steps", "1",
          "--warmup", "1", "--mode", "inference", "--no-peers", "--json", str(out)])
    report = json.loads(out.read_text())
    from keras_convnext import hardware

    # the machine's facts, and the allocator tunables every measured process started with (tests/test_hugepages.py)
    machine = dict(report["machine"])
    assert isinstance(machine.pop("glibc_tunables"), str)
    assert machine == hardware.describe() and machine["cpu"]
    assert report["command"].startswith("keras-convnext ")
    data = report["results"]
    assert len(data) == 1 and data[0]["impl"] == "keras_convnext" and data[0]["mode"] == "inference"
    assert (data[0]["variant"], data[0]["image_size"], data[0]["batch_size"]) == ("atto", 32, 2)
    assert data[0]["images_per_second"] == pytest.approx(2 / data[0]["seconds"])


def test_plan_needs_a_warmup_and_a_timed_batch():
    with pytest.raises(ValueError, match=r"at least one warm-up batch.*Received: steps=3, warmup=0"):
        benchmark.plan(warmup=0, steps=3)
    with pytest.raises(ValueError, match=r"Received: steps=0, warmup=1"):
        benchmark.plan(warmup=1, steps=0)


def test_batch_clock_times_only_the_batches_after_the_warmup(monkeypatch):
    import time

    synced = []
    from keras_convnext import backend_ops

    monkeypatch.setattr(backend_ops, "sync_device", synced.append)
    clock = benchmark._BatchClock(warmup=2, total=5)
    for batch in range(5):
        time.sleep(0.02 if batch < 2 else 0.0)
        clock.on_predict_batch_end(batch, {"outputs": batch})
        if batch == 1:
            start = time.perf_counter()
    # Batches 2-4 took no sleep: the two warm-up sleeps (40 ms) are outside the timed span.
    assert clock.start <= start and clock.stop - clock.start < 0.02
    # The device is waited for at the end of the warm-up and of the last batch, and nowhere else.
    assert synced == [{"outputs": 1}, {"outputs": 4}]
    clock = benchmark._BatchClock(warmup=1, total=2)
    clock.on_train_batch_end(0)
    time.sleep(0.03)
    clock.on_train_batch_end(1)
    assert clock.stop - clock.start >= 0.03


def test_device_sync_uses_the_backends_own_primitive(monkeypatch):
    calls = []
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        monkeypatch.setattr(jax, "block_until_ready", lambda x: calls.append(x) or x)
    elif backend == "torch":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("cuda"))
    else:
        import tensorflow as tf

        monkeypatch.setattr(tf.test.experimental, "sync_devices", lambda: calls.append("devices"))
    x = keras.ops.matmul(keras.ops.ones((64, 64)), keras.ops.ones((64, 64)))
    from keras_convnext import backend_ops

    backend_ops.sync_device({"outputs": x})
    assert calls == [{"outputs": x}] if backend == "jax" else calls == [{"torch": "cuda"}.get(backend, "devices")]


def test_peers_are_chosen_by_name():
    specs = benchmark.plan(backends=["jax", "torch"], modes=["inference"], peers=["timm"])
    assert [s.label for s in specs] == ["timm", "keras_convnext (jax)", "keras_convnext (torch)"]
    specs = benchmark.plan(backends=["jax"], modes=["inference"], peers=["keras_applications", "timm_compile"])
    assert [s.label for s in specs] == ["timm_compile", "keras_convnext (jax)", "keras_applications (jax)"]
    assert [s.label for s in benchmark.plan(backends=["jax"], modes=["inference"], peers=True)] == [
        "timm", "timm_compile", "keras_convnext (jax)", "keras_applications (jax)"]
    assert [s.label for s in benchmark.plan(backends=["jax"], modes=["inference"], peers="timm")] == [
        "timm", "keras_convnext (jax)"]
    with pytest.raises(ValueError, match=r"Unknown peers: valid ones are timm, timm_compile, keras_applications. "
                                         r"Received: peers=\['tim'\]"):
        benchmark.plan(peers=["tim"])


@pytest.mark.parametrize("args, message", [
    (["--peers", "tim"], "keras-convnext benchmark: error: Unknown peers: valid ones are timm, timm_compile, "
                         "keras_applications. Received: peers=['tim']"),
    (["--device", "tpu"], "keras-convnext benchmark: error: Unknown device: valid ones are cpu, gpu. "
                          "Received: device='tpu'"),
])
def test_cli_refuses_unknown_peers_and_devices_before_any_work(args, message, capsys):
    from keras_convnext.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "--mode", "inference", *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == message


def test_cli_peers_and_no_peers_exclude_each_other(capsys):
    from keras_convnext.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "--peers", "timm", "--no-peers"])
    assert exit_.value.code == 2
    assert "argument --no-peers: not allowed with argument --peers" in capsys.readouterr().err


def test_a_gpu_plan_and_its_one_line_error_where_there_is_no_gpu():
    specs = benchmark.plan(backends=["jax"], modes=["inference"], peers=["timm"], device="gpu")
    assert {s.device for s in specs} == {"gpu"}
    assert {s.device for s in benchmark.plan(backends=["jax"])} == {"cpu"}
    with pytest.raises(ValueError, match=r"Unknown device: valid ones are cpu, gpu. Received: device='tpu'"):
        benchmark.plan(device="tpu")
    from keras_convnext import hardware

    backend = keras.backend.backend()
    if hardware.device_of(backend) == "gpu":
        pytest.skip("this machine has a GPU: the error is for machines without one")
    result = benchmark.measure(benchmark.Spec("keras_convnext", backend, variant="atto", image_size=32,
                                              batch_size=1, steps=1, warmup=1, device="gpu"))
    assert result["error"] == (f"RuntimeError: keras_convnext ({backend}) was asked to run on the gpu but {backend} "
                               f"computes on the cpu here ({benchmark.GPU_INSTALL[backend]}). Received: device='gpu'")


def test_a_gpu_table_shows_the_gpu_allocators_peak():
    rows = [dict(impl=impl, backend="torch", label=impl, variant="tiny", image_size=224, batch_size=16,
                 mode="inference", precision="float32", device="gpu", images_per_second=ips,
                 peak_memory_mb=900.0, peak_device_mb=mb) for impl, ips, mb in (("timm", 1000.0, 400.0),
                                                                                  ("timm_compile", 1500.0, 300.0))]
    text = benchmark.table(rows).splitlines()
    assert "| peak GPU MB | GPU memory vs timm |" in text[0]
    assert text[3].endswith("| 1500.0 | 1.50x | 300 | 0.75x |")
    machine = benchmark.report(rows)["machine"]
    assert machine["gpu"] and "cpu" in machine  # the card's name (nvidia-smi), or "unknown" without one
    assert "gpu" not in benchmark.report([dict(rows[0], device="cpu")])["machine"]


def test_a_v2_plan_measures_timms_v2_and_no_keras_applications():
    specs = benchmark.plan(variant="convnextv2_tiny", backends=["jax"], modes=["inference"])
    assert [s.label for s in specs] == ["timm", "timm_compile", "keras_convnext (jax)"]
    assert {s.variant for s in specs} == {"convnextv2_tiny"}
    with pytest.raises(ValueError, match=r"Unknown variant.*Received: variant='convnextv3_tiny'"):
        benchmark.plan(variant="convnextv3_tiny")


@once  # the probes choose their own backends whatever this process runs
@pytest.mark.parametrize("stop", ["timeout", "interrupt"])
def test_a_backend_probe_is_killed_and_reaped_when_its_time_is_up_or_the_caller_is_stopped(monkeypatch, stop):
    import signal
    import subprocess

    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

        def communicate(self, *args, timeout=None, **kwargs):
            if stop == "interrupt" and timeout is not None:
                raise KeyboardInterrupt  # Ctrl-C while the first probe is awaited
            return super().communicate(*args, timeout=timeout, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Recorded)  # the module benchmark calls
    if stop == "timeout":
        assert benchmark.gpu_backends(timeout=0.01) == {b: "timed out" for b in benchmark.BACKENDS}
    else:
        with pytest.raises(KeyboardInterrupt):
            benchmark.gpu_backends()
    # Every probe was still importing its framework: each was killed and waited for, none left running.
    assert len(started) == len(benchmark.BACKENDS)
    assert [p.returncode for p in started] == [-signal.SIGKILL] * len(started)


@once  # the script's children choose their own backends whatever this process runs
def test_the_gpu_script_on_a_machine_without_a_gpu(tmp_path):
    import os
    import subprocess
    import sys

    found = benchmark.gpu_backends()
    if "gpu" in found.values():
        pytest.skip(f"a backend computes on a GPU here: {found}")
    assert set(found) == set(benchmark.BACKENDS) and found["torch"] == "cpu"
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "benchmark_gpu.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith("benchmark_gpu.py: no Keras backend computes on a GPU here;")
    seen = ", ".join(f"{b}={device}" for b, device in found.items())
    assert done.stderr.strip().endswith(f"Received: {seen}") and len(done.stderr.strip().splitlines()) == 1
    # Named backends run the whole benchmark: every row reports that it has no GPU, and the JSON says so.
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, script, "--backends", "torch", "--variant", "atto", "--image-size", "32",
                           "--batch-size", "1", "--mode", "inference", "--precision", "float32", "--steps", "1",
                           "--warmup", "1", "--peers", "timm", "--json", str(out), "--plot", str(tmp_path / "g.png")],
                          capture_output=True, text=True, timeout=600)
    # Every row failed: the table and JSON are still written, and the command says so and exits 1.
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("keras-convnext benchmark: every measurement failed; ")
    report = json.loads(out.read_text())
    assert isinstance(report["machine"]["gpu"], str) and report["machine"]["gpu"]  # "unknown" without nvidia-smi
    assert [r["label"] for r in report["results"]] == ["timm", "keras_convnext (torch)"]
    assert all("was asked to run on the gpu but torch computes on the cpu here" in r["error"]
               for r in report["results"])
    assert "failed: RuntimeError" in done.stdout


@once  # the measurements are faked: nothing here depends on the backend
def test_a_run_stopped_part_way_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    from keras_convnext.cli import main

    calls = []

    def fake_measure(spec):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) during the third row
        calls.append(spec)
        return {**dataclasses.asdict(spec), "label": spec.label, "images_per_second": 1.0 + len(calls),
                "seconds": 1.0, "peak_memory_mb": 10.0}

    monkeypatch.setattr(benchmark, "measure", fake_measure)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as stop:
        main(["benchmark", "--variant", "atto", "--image-size", "32", "--batch-size", "1", "2", "3", "--steps", "1",
              "--warmup", "1", "--mode", "inference", "--no-peers", "--json", str(out)])
    assert stop.value.code == 130  # the CLI's exit status for an interrupt
    report = json.loads(out.read_text())
    assert (report["planned"], report["complete"]) == (3, False)
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # nothing half-written beside it


@once
def test_a_finished_run_says_it_is_complete(tmp_path, monkeypatch):
    from keras_convnext.cli import main

    monkeypatch.setattr(benchmark, "measure", lambda spec: {**dataclasses.asdict(spec), "label": spec.label,
                                                            "images_per_second": 2.0, "seconds": 1.0,
                                                            "peak_memory_mb": 10.0})
    reads = []
    real_facts = benchmark.machine_facts
    monkeypatch.setattr(benchmark, "machine_facts", lambda gpu=False: reads.append(gpu) or real_facts(gpu))
    out = tmp_path / "r.json"
    main(["benchmark", "--variant", "atto", "--image-size", "32", "--batch-size", "1", "2", "--steps", "1",
          "--warmup", "1", "--mode", "inference", "--no-peers", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["planned"], report["complete"], len(report["results"])) == (2, True, 2)
    assert reads == [False] and report["machine"]["cpu"]  # the machine is read once, not after every row
