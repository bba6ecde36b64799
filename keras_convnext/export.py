"""Export to TF Serving (SavedModel), ONNX and LiteRT, from a model of any backend.

SavedModel and LiteRT are written by the TensorFlow backend, ONNX by the torch backend (its
exporter keeps LayerNorm as one `LayerNormalization` op). A model built on another backend is saved
to a temporary `.keras` file and exported in a subprocess running the right backend, so the user
never switches backends by hand. Every output is written aside and renamed into place.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

FORMATS = ("saved_model", "onnx", "litert")
BACKEND_FOR = {"saved_model": "tensorflow", "litert": "tensorflow", "onnx": "torch"}
TOP_K = 5


def _check_format(format):
    if format not in FORMATS:
        raise ValueError(f"Unknown export format; valid ones are {', '.join(FORMATS)}. Received: format={format!r}")


def _check_classifier(model):
    """A model that takes (N, H, W, 3) pixels and returns (N, classes) softmax probabilities."""
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    inputs, outputs = model.inputs, model.outputs
    if (len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[-1] != 3
            or len(outputs[0].shape) != 2 or activation != "softmax"):
        raise ValueError(
            "Export needs an image classifier: one (batch, height, width, 3) pixel input and one "
            "(batch, classes) softmax output (include_top=True, classifier_activation='softmax'). "
            f"Received: model={model.name!r} with inputs {[tuple(i.shape) for i in inputs]}, outputs "
            f"{[tuple(o.shape) for o in outputs]}, last layer {last.name!r} (activation {activation})"
        )


def _resolve_size(model, image_size):
    height, width = model.inputs[0].shape[1:3]
    if height is not None and width is not None:
        if image_size is not None and (image_size, image_size) != (height, width):
            raise ValueError(
                f"The model takes {height}x{width} images; build it with input_shape=(size, size, 3) to "
                f"export another size. Received: image_size={image_size}"
            )
        if height != width:
            raise ValueError(f"Export needs square inputs. Received: input_shape={tuple(model.inputs[0].shape[1:])}")
        return height
    return image_size or 224


def _load_model(model):
    """A `keras.Model`, a `.keras` path or a preset name -> (model, preset or None)."""
    import keras

    from keras_convnext import presets as presets_lib

    if isinstance(model, keras.Model):
        return model, None
    model = os.fspath(model)
    if model in presets_lib.PRESETS:
        from keras_convnext.model import ConvNeXt
        from keras_convnext.variants import VARIANTS

        preset = presets_lib.PRESETS[model]
        v = VARIANTS[preset.variant]
        return ConvNeXt(v.depths, v.dims, weights=preset.name, classes=preset.classes), preset
    if not os.path.isfile(model):
        raise ValueError(f"No .keras file or preset of that name. Received: model={model!r}")
    try:
        return keras.saving.load_model(model, compile=False), None
    except Exception as e:
        raise ValueError(f"Cannot read a Keras model from this file ({type(e).__name__}: {e}). Received: model={model!r}") from e


def tf_eval_transform(data, image_size, crop_pct=0.875, squash=False):
    """The evaluation transform of `preprocessing.eval_transform`, as TensorFlow graph ops.

    Decodes JPEG/PNG bytes as PIL does, then `data.resize_crop`; returns float32.
    """
    from keras_convnext.data import decode_image, resize_crop

    image = decode_image(data)
    return resize_crop(image, image_size, crop_pct, squash)


def _archive(model, size, crop_pct, with_bytes):
    import keras
    import tensorflow as tf

    k = min(TOP_K, model.outputs[0].shape[-1])
    archive = keras.export.ExportArchive()
    archive.track(model)

    def classify(images):
        probabilities = model(images, training=False)
        top = tf.math.top_k(probabilities, k=k)
        return {"probabilities": probabilities, "top_k_indices": top.indices, "top_k_scores": top.values}

    archive.add_endpoint("serving_default", classify,
                         input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    if with_bytes:
        squash = size >= 384 and crop_pct >= 1.0

        def classify_bytes(images):
            pixels = tf.map_fn(lambda d: tf_eval_transform(d, size, crop_pct, squash), images,
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return classify(pixels)

        archive.add_endpoint("serving_bytes", classify_bytes,
                             input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    return archive


def _export_here(model, path, format, version, size, crop_pct, overwrite):
    """Exports in this process (the backend is the right one); returns the written path."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if format == "saved_model":
        target = os.path.join(path, str(version))
        os.makedirs(path, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=path, prefix=f".{version}.tmp-")
        try:
            _archive(model, size, crop_pct, with_bytes=True).write_out(tmp, verbose=False)
            _replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".export-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        if format == "onnx":
            _write_onnx(model, tmp, size)
        else:
            _write_litert(model, tmp, size)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _replace(new_dir, target):
    """Puts `new_dir` at `target`; an existing target is moved aside first, removed only after."""
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".old-")
        os.rename(target, os.path.join(old, "v"))
    os.rename(new_dir, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write_onnx(model, path, size):
    import numpy as np
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self, keras_model):
            super().__init__()
            self.keras_model = keras_model

        def forward(self, images):
            return self.keras_model(images, training=False)

    sample = torch.from_numpy(np.zeros((2, size, size, 3), "float32"))
    program = torch.onnx.export(
        Classifier(model), (sample,), input_names=["images"], output_names=["probabilities"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, opset_version=18, dynamo=True,
        verbose=False,
    )
    program.optimize()
    program.save(path)


def _write_litert(model, path, size):
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        _archive(model, size, crop_pct=1.0, with_bytes=False).write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        # Builtin ops only: a model that would need Flex (TF) ops fails here rather than on a phone.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = converter.convert()
    with open(path, "wb") as f:
        f.write(flatbuffer)


def export(model, path, format="saved_model", version=1, image_size=None, crop_pct=None, overwrite=False):
    """Exports a ConvNeXt classifier for serving; returns the path written.

    Args:
        model: a `keras.Model`, a `.keras` file or a preset name.
        path: for "saved_model", the TF Serving base directory (written to `path/<version>/`);
            otherwise the `.onnx` or `.tflite` file.
        format: "saved_model" (signatures `serving_default` on float32 pixels and `serving_bytes` on
            encoded JPEG/PNG), "onnx" or "litert".
        version: the SavedModel version directory.
        image_size: input size, for models built with a flexible input shape (default 224).
        crop_pct: crop fraction of the bytes signature's eval transform (default: the preset's, else
            0.875 below 384 px and 1.0 at 384 px and above).
        overwrite: replace an existing output.
    """
    import keras

    _check_format(format)
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"`version` must be a positive integer. Received: version={version!r}")
    path = os.fspath(path)
    target = os.path.join(path, str(version)) if format == "saved_model" else path
    if os.path.exists(target) and not overwrite:
        raise ValueError(f"The output exists; pass overwrite=True (--overwrite) to replace it. Received: path={target!r}")
    model, preset = _load_model(model)
    _check_classifier(model)
    size = _resolve_size(model, image_size)
    if crop_pct is None:
        crop_pct = preset.crop_pct if preset else (1.0 if size >= 384 else 0.875)
    backend = BACKEND_FOR[format]
    if keras.backend.backend() == backend:
        return _export_here(model, path, format, version, size, crop_pct, overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "model.keras")
        model.save(saved)
        args = {"model": saved, "path": path, "format": format, "version": version, "image_size": size,
                "crop_pct": crop_pct, "overwrite": overwrite}
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run([sys.executable, "-m", "keras_convnext.export", json.dumps(args)],
                              env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"Export to {format} in a {backend} process failed:\n{tail}")
    return target


def _worker(args):
    model, _ = _load_model(args.pop("model"))
    return export(model, **args)


if __name__ == "__main__":
    print(_worker(json.loads(sys.argv[1])))
