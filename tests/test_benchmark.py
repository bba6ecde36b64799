"""The benchmark's machinery (not its timings: speed is never a pass/fail test here)."""

import json

import keras
import pytest

from keras_convnext import benchmark


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
    specs.append(benchmark.Spec("timm", "torch", variant="atto", image_size=32, batch_size=2, steps=1, warmup=1))
    return benchmark.run(specs, progress=False)


def test_each_measurement_runs_in_its_own_process_and_reports(tiny_results):
    for result in tiny_results:
        assert "error" not in result, result
        assert result["images_per_second"] == pytest.approx(2 / result["seconds"])
        assert result["peak_memory_mb"] > 1  # building and running a model costs memory above the imports


def test_table_ratios_and_plot(tiny_results, tmp_path):
    text = benchmark.table(tiny_results)
    rows = text.splitlines()
    assert rows[0].startswith("| variant | px | batch | mode | precision | implementation | img/s | vs timm")
    timm = tiny_results[2]["images_per_second"]
    ours = tiny_results[0]["images_per_second"]
    assert rows[2].startswith("| atto | 32 | 2 | inference | float32 | keras_convnext (")
    assert f"{ours / timm:.2f}x" in rows[2]
    assert "| timm | " in rows[4] and "| 1.00x |" in rows[4]
    assert rows[3].split("|")[8].strip() == "-"  # training has no timm row in this run: no ratio
    path = tmp_path / "bench.png"
    benchmark.plot(tiny_results, str(path))
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

    assert report["machine"] == hardware.describe() and report["machine"]["cpu"]
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


def test_batch_clock_times_only_the_batches_after_the_warmup():
    import time

    clock = benchmark._BatchClock(warmup=2)
    for batch in range(5):
        time.sleep(0.02 if batch < 2 else 0.0)
        clock.on_predict_batch_end(batch)
        if batch == 1:
            start = time.perf_counter()
    # Batches 2-4 took no sleep: the two warm-up sleeps (40 ms) are outside the timed span.
    assert clock.start <= start and clock.stop - clock.start < 0.02
    clock = benchmark._BatchClock(warmup=1)
    clock.on_train_batch_end(0)
    time.sleep(0.03)
    clock.on_train_batch_end(1)
    assert clock.stop - clock.start >= 0.03


def test_a_v2_plan_measures_timms_v2_and_no_keras_applications():
    specs = benchmark.plan(variant="convnextv2_tiny", backends=["jax"], modes=["inference"])
    assert [s.label for s in specs] == ["timm", "timm_compile", "keras_convnext (jax)"]
    assert {s.variant for s in specs} == {"convnextv2_tiny"}
    with pytest.raises(ValueError, match=r"Unknown variant.*Received: variant='convnextv3_tiny'"):
        benchmark.plan(variant="convnextv3_tiny")
