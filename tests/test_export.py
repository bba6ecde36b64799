"""Export from the current backend to SavedModel, ONNX and LiteRT, each checked in its own runtime."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import TINY, once
from PIL import Image

import keras_convnext as kc

SIZE = 64


def sensitive_model():
    """A tiny classifier whose probabilities move with the pixels (randomised, layer scale 1)."""
    model = kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, input_shape=(SIZE, SIZE, 3), classes=7,
                        layer_scale_init_value=1.0)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        layer.set_weights([rng.normal(1.0 if v.name == "gamma" else 0.0, 0.15, v.shape).astype("float32")
                           for v in layer.weights])
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    model = sensitive_model()
    import skimage.data

    cat = skimage.data.chelsea()
    Image.fromarray(cat).save(folder / "cat.png")
    Image.fromarray(cat).save(folder / "cat.jpg", quality=95)
    paths = {fmt: kc.export(model, str(folder / name), format=fmt)
             for fmt, name in (("saved_model", "serving"), ("onnx", "m.onnx"), ("litert", "m.tflite"))}
    pixels = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3)).astype("float32")
    return model, folder, paths, pixels


def probabilities(model, pixels):
    return keras.ops.convert_to_numpy(model.predict(pixels, verbose=0))


TF_ONLY_CHECK = r"""
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
pixels = np.load(sys.argv[2])
out = loaded.signatures["serving_default"](images=tf.constant(pixels))
images = tf.constant([open(p, "rb").read() for p in sys.argv[3:]])
out_bytes = loaded.signatures["serving_bytes"](images=images)
print(json.dumps({"modules": sorted(m for m in ("keras_convnext", "torch") if m in sys.modules),
                  "pixels": {k: v.numpy().tolist() for k, v in out.items()},
                  "bytes": {k: v.numpy().tolist() for k, v in out_bytes.items()}}))
"""


def test_saved_model_in_a_fresh_tensorflow_only_process(exported, tmp_path):
    model, folder, paths, pixels = exported
    assert paths["saved_model"] == str(folder / "serving" / "1")
    assert os.path.isfile(folder / "serving" / "1" / "saved_model.pb")
    # No XLA-compiled function in the file (TF Serving runs without XLA by default): TensorFlow's XLA forms run only
    # in training (backend_ops.xla_gelu_tensorflow), and an export, custom gradients included, is traced for inference.
    assert b"_XlaMustCompile" not in (folder / "serving" / "1" / "saved_model.pb").read_bytes()
    np.save(tmp_path / "pixels.npy", pixels)
    files = [str(folder / "cat.png"), str(folder / "cat.jpg")]
    done = subprocess.run([sys.executable, "-c", TF_ONLY_CHECK, paths["saved_model"], str(tmp_path / "pixels.npy"), *files],
                          capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow"))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    expected = probabilities(model, pixels)
    got = np.array(result["pixels"]["probabilities"])
    assert np.abs(got - expected).max() <= 1e-4
    order = np.argsort(-expected, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(result["pixels"]["top_k_indices"], order)
    np.testing.assert_allclose(result["pixels"]["top_k_scores"], np.take_along_axis(expected, order, 1), atol=1e-4)
    # Bytes: against the eval transform applied in Python to the same files.
    eager = np.stack([kc.load_image(f, image_size=SIZE, crop_pct=0.875) for f in files])
    expected_bytes = probabilities(model, eager)
    assert expected_bytes.std() > 0.01  # the model really depends on the pixels
    assert np.abs(np.array(result["bytes"]["probabilities"]) - expected_bytes).max() <= 1e-4


def test_in_graph_eval_transform_matches_the_python_one(exported):
    import tensorflow as tf

    from keras_convnext.export import tf_eval_transform

    _, folder, _, _ = exported
    for name in ("cat.png", "cat.jpg"):
        data = (folder / name).read_bytes()
        for size, crop, squash in ((64, 0.875, False), (224, 0.875, False), (384, 1.0, True)):
            graph = tf_eval_transform(tf.constant(data), size, crop, squash).numpy()
            eager = kc.load_image(str(folder / name), image_size=size, crop_pct=crop,
                                  crop_mode="squash" if squash else "center").astype("float32")
            diff = np.abs(graph - eager)
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, size, diff.max(), diff.mean())


def test_saved_model_signatures_as_tf_serving_reads_them(exported):
    _, _, paths, _ = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    done = subprocess.run([cli, "show", "--dir", paths["saved_model"], "--all"], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow"))
    assert done.returncode == 0, done.stderr[-1000:]
    text = done.stdout
    default = text[text.index("signature_def['serving_default']"):]
    default = default[: default.index("Method name")]
    assert "inputs['images'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 64, 64, 3)" in default
    for output, dtype in (("probabilities", "DT_FLOAT"), ("top_k_indices", "DT_INT32"), ("top_k_scores", "DT_FLOAT")):
        assert f"outputs['{output}'] tensor_info:\n        dtype: {dtype}\n        shape: (-1, " in default
    by_bytes = text[text.index("signature_def['serving_bytes']"):]
    assert "inputs['images'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in by_bytes


def test_onnx_in_onnxruntime(exported):
    import onnx
    import onnxruntime

    model, _, paths, pixels = exported
    graph = onnx.load(paths["onnx"]).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["probabilities"]
    count = lambda op: sum(n.op_type == op for n in graph.node)  # noqa: E731
    # Every LayerNorm is one op (stem, 3 downsamplings, blocks, head); the only mean is the global pool.
    assert count("LayerNormalization") == 4 + sum(TINY["depths"]) + 1
    assert count("ReduceMean") == 1
    session = onnxruntime.InferenceSession(paths["onnx"])
    out = session.run(["probabilities"], {"images": pixels})[0]
    assert np.abs(out - probabilities(model, pixels)).max() <= 1e-4


def test_litert_in_its_interpreter_without_flex_ops(exported):
    import tensorflow as tf

    model, _, paths, pixels = exported
    interpreter = tf.lite.Interpreter(model_path=paths["litert"])
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "DEPTHWISE_CONV_2D" in ops
    assert not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), ops
    runner = interpreter.get_signature_runner("serving_default")
    for i in range(len(pixels)):
        out = runner(images=pixels[i:i + 1])["probabilities"]
        assert np.abs(out - probabilities(model, pixels[i:i + 1])).max() <= 1e-4


def test_bad_input_gives_clear_errors(exported, tmp_path):
    model, folder, paths, _ = exported
    with pytest.raises(ValueError, match=r"Unknown export format.*Received: format='tflite'"):
        kc.export(model, str(tmp_path / "x"), format="tflite")
    with pytest.raises(ValueError, match=r"overwrite.*Received: path=.*serving/1"):
        kc.export(model, str(folder / "serving"), format="saved_model")
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"Cannot read a Keras model.*Received: model=.*broken.keras"):
        kc.export(str(bad), str(tmp_path / "o.onnx"), format="onnx")
    with pytest.raises(ValueError, match=r"No .keras file or preset.*Received: model='nowhere.keras'"):
        kc.export("nowhere.keras", str(tmp_path / "o.onnx"), format="onnx")
    features = kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, include_top=False, pooling="avg")
    with pytest.raises(ValueError, match=r"image classifier.*Received: model='convnext' with inputs"):
        kc.export(features, str(tmp_path / "o.onnx"), format="onnx")
    with pytest.raises(ValueError, match=r"takes 64x64 images.*Received: image_size=96"):
        kc.export(model, str(tmp_path / "o.onnx"), format="onnx", image_size=96)
    assert not (tmp_path / "o.onnx").exists()


@once  # --version, the refusal and --overwrite are Python around the writers; each backend's route is the fixture's
def test_cli_export_version_and_overwrite(exported, tmp_path):
    model, folder, _, pixels = exported
    model.save(str(tmp_path / "m.keras"))
    exe = os.path.join(os.path.dirname(sys.executable), "keras-convnext")
    run = lambda *a: subprocess.run([exe, "export", str(tmp_path / "m.keras"), str(tmp_path / "serving"), *a],
                                    capture_output=True, text=True)
    done = run("--format", "saved_model", "--version", "3")
    assert done.returncode == 0, done.stderr[-1500:]
    assert f"wrote {tmp_path / 'serving' / '3'}" in done.stdout
    again = run("--format", "saved_model", "--version", "3")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    replaced = run("--format", "saved_model", "--version", "3", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-1500:]
    assert sorted(os.listdir(tmp_path / "serving")) == ["3"]  # nothing half-written or left aside


def test_arguments_are_checked_before_any_work(tmp_path, capsys):
    from keras_convnext.cli import main

    (tmp_path / "serving" / "1").mkdir(parents=True)  # would fail later, as an existing output
    bad = [(dict(format="tflite"), "format='tflite'"),
           (dict(version=0), "version=0"), (dict(version=True), "version=True"), (dict(version=1.0), "version=1.0"),
           (dict(image_size=16), "image_size=16"), (dict(image_size=True), "image_size=True"),
           (dict(image_size=64.0), "image_size=64.0"), (dict(image_size="64"), "image_size='64'"),
           (dict(crop_pct=0), "crop_pct=0"), (dict(crop_pct=1.5), "crop_pct=1.5"), (dict(crop_pct=-0.5), "crop_pct=-0.5"),
           (dict(crop_pct=float("nan")), "crop_pct=nan"), (dict(crop_pct=True), "crop_pct=True"),
           (dict(crop_pct="0.9"), "crop_pct='0.9'"), (dict(overwrite="no"), "overwrite='no'")]
    for kwargs, received in bad:
        with pytest.raises(ValueError) as e:
            kc.export("nowhere.keras", str(tmp_path / "serving"), **kwargs)  # the model is never looked for
        message = str(e.value)
        assert message.endswith(f"Received: {received}") and "\n" not in message, (kwargs, message)
    with pytest.raises(SystemExit) as e:
        main(["export", "nowhere.keras", str(tmp_path / "serving"), "--format", "saved_model", "--crop-pct", "0"])
    assert e.value.code == 2
    assert "`crop_pct` must be in (0.0, 1.0]. Received: crop_pct=0.0" in capsys.readouterr().err
    assert os.listdir(tmp_path / "serving") == ["1"]


def test_a_failed_child_leaves_nothing_behind(tmp_path):
    # The child cannot rebuild a Lambda layer (safe_mode), so it fails after the parent saved the model.
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    format, out = ("onnx", tmp_path / "out" / "m.onnx") if keras.backend.backend() == "tensorflow" else (
        "saved_model", tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"Export to \w+ in a (torch|tensorflow) process failed:\n(.|\n)*Lambda"):
        kc.export(model, str(out), format=format)
    assert os.listdir(tmp_path / "out") == []


# A cross-backend export run in its own process, for a test to kill: the parent runs on JAX, so
# "saved_model" spawns a TensorFlow child.
EXPORT_TO_KILL = r"""
import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may start with SIGINT ignored
import keras_convnext as kc
tiny = json.loads(sys.argv[2])
model = kc.ConvNeXt(tiny["depths"], tiny["dims"], weights=None, input_shape=(32, 32, 3), classes=5)
kc.export(model, sys.argv[1], format="saved_model", overwrite=True)
"""


def start_export(out, log):
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-c", EXPORT_TO_KILL, str(out), json.dumps(TINY)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def processes_naming(text, but=()):
    """Live processes whose command line contains `text` (a zombie's reads empty)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read() and int(pid) not in but:
                    found.append(int(pid))
        except OSError:  # ended meanwhile
            pass
    return found


def wait_for_child(parent, out, log, timeout=180):
    """The pid of the export's child process, once it runs; the seconds it took to appear.

    Only a process that has exec'd the child's program counts: any process the parent forks (the imports
    run `uname -p`) names `out` too until its exec, and a signal sent then would land mid-import."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        children = [pid for pid in processes_naming(str(out), but=(parent.pid,)) if is_export_child(pid)]
        if children:
            return children[0], time.monotonic() - start
        assert parent.poll() is None, f"the export ended ({parent.returncode}) before its child ran: {log.read_text()[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no child process after {timeout} s")


def is_export_child(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"from keras_convnext.export import _child" in f.read()
    except OSError:
        return False


def wait_until_gone(out, timeout=15):
    deadline = time.monotonic() + timeout
    while processes_naming(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes_naming(str(out))


def old_version(out):
    """A stand-in for the live `OUT/1/` (the test is about it being left alone); returns its contents."""
    (out / "1" / "variables").mkdir(parents=True)
    (out / "1" / "saved_model.pb").write_bytes(b"the live version")
    (out / "1" / "variables" / "variables.index").write_bytes(b"its weights")
    return contents(out / "1")


def contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_killed_at_random_points_keeps_the_live_version_and_leaves_no_orphan(tmp_path):
    out = tmp_path / "killed-serving"
    before = old_version(out)
    rng = np.random.default_rng(7)
    appeared = None
    for attempt in range(3):
        log = tmp_path / f"export-{attempt}.log"
        parent = start_export(out, log)
        if appeared is None:  # first: while the child exports, at a random moment of its first seconds
            child, appeared = wait_for_child(parent, out, log)
            # The model travels through the output's folder, under a name the parent owns.
            assert list(out.glob(f".partial-{parent.pid}-work*/model.keras")), os.listdir(out)
            time.sleep(rng.uniform(0, 3))
            assert os.path.exists(f"/proc/{child}") and parent.poll() is None, "the child ended before the kill"
        else:  # then at random from the start: while the parent saves the model, spawns the child, or it runs
            time.sleep(rng.uniform(0.5 * appeared, appeared + 3))
            assert parent.poll() is None, f"the export ended before the kill: {log.read_text()[-2000:]}"
        parent.kill()
        parent.wait()
        assert wait_until_gone(out) == [], "an export process outlived its parent"
        assert contents(out / "1") == before
    assert any(name.startswith(".partial-") for name in os.listdir(out))  # the first kill left its files
    # The next export removes them, and replaces the live version with a complete one.
    kc.export(sensitive_model(), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["1"]
    assert os.path.isfile(out / "1" / "saved_model.pb") and contents(out / "1") != before
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out / "1").st_mode & 0o777 == 0o777 & ~umask


@once  # the export's child runs JAX whatever this process runs
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_export_kills_its_child_and_cleans_up(tmp_path, signum):
    out = tmp_path / f"signalled-serving-{signum}"
    before = old_version(out)
    log = tmp_path / "export.log"
    parent = start_export(out, log)
    child, _ = wait_for_child(parent, out, log)
    time.sleep(np.random.default_rng(signum).uniform(0, 2))
    parent.send_signal(signum)
    returncode = parent.wait(timeout=60)
    # The parent waited for its child: nothing is left to wait for, at once.
    assert processes_naming(str(out)) == []
    assert not os.path.exists(f"/proc/{child}")
    # Then it ended as it would have without the export (Python exits from a KeyboardInterrupt by SIGINT).
    assert returncode == -signum, log.read_text()[-3000:]
    assert (signum == signal.SIGINT) == ("KeyboardInterrupt" in log.read_text())
    assert sorted(os.listdir(out)) == ["1"]  # its temporary files were removed before
    assert contents(out / "1") == before


def test_a_signal_while_the_child_starts_is_held_until_it_exists_then_kills_it(tmp_path, monkeypatch):
    # The window the out-of-process tests cannot aim at: the signal lands inside Popen itself.
    import importlib

    export = importlib.import_module("keras_convnext.export")  # the module; the package's `export` is the function

    started, real_popen = [], subprocess.Popen

    def popen_signalled_midway(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once: by the export's handler, which must hold it
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    caller = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("the caller's handler ran during the export"))
    try:
        monkeypatch.setattr(export.subprocess, "Popen", popen_signalled_midway)
        with pytest.raises(export._Interrupted) as raised:
            export._run_child([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                              str(tmp_path / "child.log"))
        assert raised.value.signum == signal.SIGTERM
        assert started and started[0].returncode == -signal.SIGKILL  # killed and reaped, not left to sleep
    finally:
        restored = signal.signal(signal.SIGTERM, caller)
    assert restored is not None and restored.__name__ == "<lambda>"


# Each format's writer runs its own backend (TensorFlow for SavedModel and LiteRT, torch for ONNX) whatever
# this process runs, and V1's `exported` fixture takes every backend's route to them: V2's GRN is checked once.
@once
def test_a_v2_model_exports_to_every_format_with_parity(tmp_path):
    # GRN (a sum of squares over H, W, a channel mean) as plain ops in each format: no Flex op in LiteRT.
    import onnxruntime
    import tensorflow as tf

    model = kc.ConvNeXtV2(TINY["depths"], TINY["dims"], weights=None, input_shape=(SIZE, SIZE, 3), classes=7)
    rng = np.random.default_rng(2)
    for layer in model.layers:
        layer.set_weights([rng.normal(0.5 if "grn" in v.path else 0.0, 0.15, v.shape).astype("float32")
                           if not v.path.endswith("norm/gamma") else np.ones(v.shape, "float32")
                           for v in layer.weights])
    pixels = rng.integers(0, 256, (2, SIZE, SIZE, 3)).astype("float32")
    expected = probabilities(model, pixels)
    assert expected.std(axis=-1).min() > 1e-3  # the probabilities depend on the weights, GRN included
    paths = {fmt: kc.export(model, str(tmp_path / name), format=fmt)
             for fmt, name in (("saved_model", "serving"), ("onnx", "m.onnx"), ("litert", "m.tflite"))}
    served = tf.saved_model.load(paths["saved_model"]).signatures["serving_default"](images=tf.constant(pixels))
    assert np.abs(served["probabilities"].numpy() - expected).max() <= 1e-4
    out = onnxruntime.InferenceSession(paths["onnx"]).run(["probabilities"], {"images": pixels})[0]
    assert np.abs(out - expected).max() <= 1e-4
    interpreter = tf.lite.Interpreter(model_path=paths["litert"])
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), ops
    runner = interpreter.get_signature_runner("serving_default")
    for i in range(len(pixels)):
        assert np.abs(runner(images=pixels[i:i + 1])["probabilities"] - expected[i:i + 1]).max() <= 1e-4
