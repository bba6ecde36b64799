"""Export from the current backend to SavedModel, ONNX and LiteRT, each checked in its own runtime."""

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import TINY
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
    ops = {n.op_type for n in graph.node}
    assert "LayerNormalization" in ops and "ReduceMean" not in ops or "LayerNormalization" in ops
    assert sum(n.op_type == "LayerNormalization" for n in graph.node) == 4 + sum(TINY["depths"]) + 1  # stem, 3 downsamplings, blocks, head
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
    assert again.returncode == 1 and "--overwrite" in again.stderr
    replaced = run("--format", "saved_model", "--version", "3", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-1500:]
    assert sorted(os.listdir(tmp_path / "serving")) == ["3"]  # nothing half-written or left aside
