"""Export to TF Serving (SavedModel), ONNX and LiteRT, from a model of any backend.

SavedModel and LiteRT are written by the TensorFlow backend, ONNX by the torch backend
(`backend_ops.export_onnx`: its exporter keeps LayerNorm as one `LayerNormalization` op). A model
built on another backend is saved to a temporary `.keras` file and exported in a child process
running the right backend, so the user never switches backends by hand.

Every output is written aside (`files.atomic_path`) and renamed into place by the process that was
asked, only once the export is complete. A child writes only into the temporary output and work
folder its parent chose beside the output, both named for the parent's pid, and it dies with its
parent: killing an export at any point leaves the previous version untouched, and the next export
into the same folder removes what the killed one left.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

from keras_convnext import backend_ops, checks, files
from keras_convnext.variants import MIN_IMAGE_SIZE

FORMATS = ("saved_model", "onnx", "litert")
BACKEND_FOR = {"saved_model": "tensorflow", "litert": "tensorflow", "onnx": "torch"}
TOP_K = 5


def _check_arguments(format, version, image_size, crop_pct, overwrite):
    """Checked before any work: a bad value fails at once, not after a model is built and saved."""
    if format not in FORMATS:
        raise ValueError(f"Unknown export format; valid ones are {', '.join(FORMATS)}. Received: format={format!r}")
    checks.integer("version", version, minimum=1)
    if image_size is not None:
        checks.integer("image_size", image_size, minimum=MIN_IMAGE_SIZE)
    if crop_pct is not None:
        checks.number("crop_pct", crop_pct, 0.0, 1.0, low_open=True)
    checks.boolean("overwrite", overwrite)


def _check_free(target, overwrite):
    if os.path.lexists(target) and not overwrite:
        raise ValueError(f"The output exists; pass overwrite=True (--overwrite) to replace it. Received: path={target!r}")


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
        from keras_convnext import model as model_lib
        from keras_convnext.variants import VARIANTS

        preset = presets_lib.PRESETS[model]
        if preset.classes is None:
            raise ValueError(f"Preset {model!r} is an encoder without a classifier head (FCMAE pre-training): export "
                             "needs a classifier; fine-tune it first. Received: model=" + repr(model))
        builder = getattr(model_lib, VARIANTS[preset.variant].builder_name)
        return builder(weights=preset.name, classes=preset.classes), preset
    if not os.path.isfile(model):
        raise ValueError(f"No .keras file or preset of that name. Received: model={model!r}")
    import keras_convnext.backbone  # noqa: F401  (registers ConvNeXtModel and its layers with the .keras loader)
    from keras_convnext.checkpoints import CheckpointError
    from keras_convnext.weights import load_keras_model

    try:
        return load_keras_model(model), None  # the HDF5 inside checked first, as every checkpoint
    except CheckpointError as e:
        raise CheckpointError(f"Cannot read a Keras model from this file: {e} Received: model={model!r}") from e


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


def _write(model, out, format, size, crop_pct, scratch):
    """Writes the export at `out` (an empty folder for "saved_model", a file otherwise) in this process.

    `scratch` is a private work folder for intermediate files; its owner removes it.
    """
    if format == "saved_model":
        _archive(model, size, crop_pct, with_bytes=True).write_out(out, verbose=False)
    elif format == "onnx":
        backend_ops.export_onnx(model, out, size)
    else:
        _write_litert(model, out, size, scratch)


def _write_litert(model, path, size, scratch):
    import tensorflow as tf

    saved = os.path.join(scratch, "litert_saved_model")
    _archive(model, size, crop_pct=1.0, with_bytes=False).write_out(saved, verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
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
        version: the SavedModel version directory, a positive integer.
        image_size: input size (>= 32), for models built with a flexible input shape (default 224).
        crop_pct: crop fraction in (0, 1] of the bytes signature's eval transform (default: the
            preset's, else 0.875 below 384 px and 1.0 at 384 px and above).
        overwrite: replace an existing output.

    The output appears complete or not at all: an existing one is replaced only when the new one
    is finished. On SIGTERM/SIGINT while a child process exports, the child is killed and waited
    for, the temporary files are removed, and then the signal takes its usual course.
    """
    import keras

    _check_arguments(format, version, image_size, crop_pct, overwrite)
    path = os.fspath(path)
    target = os.path.join(path, str(version)) if format == "saved_model" else path
    _check_free(target, overwrite)
    model, preset = _load_model(model)
    _check_classifier(model)
    size = int(_resolve_size(model, image_size))
    if crop_pct is None:
        crop_pct = preset.crop_pct if preset else (1.0 if size >= 384 else 0.875)
    crop_pct = float(crop_pct)  # a NumPy scalar would not pass to the child as JSON
    backend = BACKEND_FOR[format]
    interrupted = None
    try:
        with files.atomic_path(target, directory=format == "saved_model") as out, _scratch(out) as scratch:
            if keras.backend.backend() == backend:
                _write(model, out, format, size, crop_pct, scratch)
            else:
                _write_in_child(model, out, format, size, crop_pct, scratch, backend)
            _check_free(target, overwrite)  # another export may have finished first
    except _Interrupted as e:
        interrupted = e
    if interrupted:  # the child is reaped and the temporary files are gone by now
        interrupted.resume()
    return target


def _scratch(out):
    """A work folder beside the output, named for this process so that `files.clean_leftovers` removes it
    if the process is killed."""
    return files.work_folder(os.path.dirname(out))


def _write_in_child(model, out, format, size, crop_pct, scratch, backend):
    """`_write` in a child process of `backend`, from the model saved in `scratch`."""
    saved = os.path.join(scratch, "model.keras")
    model.save(saved)
    args = {"model": saved, "out": out, "format": format, "size": size, "crop_pct": crop_pct, "scratch": scratch}
    log = os.path.join(scratch, "child.log")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    returncode = _run_child([sys.executable, "-c", _CHILD, str(os.getpid()), json.dumps(args)], env, log)
    if returncode != 0:
        with open(log, errors="replace") as f:
            tail = "\n".join(f.read().strip().splitlines()[-5:])
        if returncode < 0:
            tail = f"killed by {signal.Signals(-returncode).name}\n{tail}".strip()
        raise RuntimeError(f"Export to {format} in a {backend} process failed:\n{tail}")


# The child runs as `python -c`, not `-m keras_convnext.export`: `-m` imports the package (and Keras,
# seconds) before any line of ours, and the child must ask to die with its parent first.
_CHILD = """import os, sys
parent = int(sys.argv[1])
dies_with_parent = False
if sys.platform.startswith("linux"):
    import ctypes
    dies_with_parent = ctypes.CDLL(None, use_errno=True).prctl(1, 9) == 0  # PR_SET_PDEATHSIG, SIGKILL
if os.getppid() != parent:  # the parent died before prctl: no signal would come
    sys.exit("keras_convnext export: the parent process is gone")
from keras_convnext.export import _child
_child(parent, sys.argv[2], watch=not dies_with_parent)
"""


def _child(parent, args, watch):
    """The child's side: writes where the parent said, and nothing else (the parent renames)."""
    if watch:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="export-watchdog").start()
    args = json.loads(args)
    model, _ = _load_model(args["model"])
    _write(model, args["out"], args["format"], args["size"], args["crop_pct"], args["scratch"])


def _watch_parent(parent, every=0.5):
    """Where there is no PR_SET_PDEATHSIG: an orphan is re-parented, so a new parent pid means ours died."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


class _Interrupted(BaseException):
    """SIGTERM/SIGINT while a child exports: raised so that the cleanup runs; `resume` then re-delivers it."""

    def __init__(self, signum, frame):
        super().__init__(signum)
        self.signum, self.frame = signum, frame

    def resume(self):
        handler = signal.getsignal(self.signum)  # the caller's own, restored by now
        if callable(handler):
            handler(self.signum, self.frame)  # SIGINT's default raises KeyboardInterrupt
        else:
            os.kill(os.getpid(), self.signum)  # SIG_DFL: end as the signal would have
        raise RuntimeError(f"Export interrupted by {signal.Signals(self.signum).name}")


def _run_child(command, env, log):
    """Runs `command` to its end and returns its exit status; the child never outlives this call.

    On SIGTERM/SIGINT (main thread only) or any exception, the child is killed and waited for first.
    The handlers are set before the child starts: a signal while `Popen` runs is held until the child
    exists (raising inside `Popen` could leave a started child without its handle), then acted on.
    """
    state = {"armed": False, "pending": None}

    def on_signal(signum, frame):
        if state["armed"]:
            state["armed"] = False
            raise _Interrupted(signum, frame)
        state["pending"] = state["pending"] or (signum, frame)  # before the child started, or after it ended

    previous, child = {}, None
    stderr = open(log, "wb")
    try:
        _install(on_signal, previous)
        child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=stderr)
        state["armed"] = True
        if state["pending"]:  # came while the child started
            state["armed"], (signum, frame), state["pending"] = False, state["pending"], None
            raise _Interrupted(signum, frame)
        return child.wait()
    finally:
        try:
            state["armed"] = False  # from here a signal only waits for the cleanup below
        finally:
            if child is not None:
                if child.poll() is None:
                    child.kill()
                child.wait()
            stderr.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if state["pending"]:
                os.kill(os.getpid(), state["pending"][0])


def _install(handler, previous):
    """Sets `handler` for SIGTERM and SIGINT, recording the old ones in `previous`; only the main thread can,
    and a signal the caller ignores stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        old = signal.getsignal(signum)
        if old in (signal.SIG_IGN, None):  # None: set outside Python, cannot be restored
            continue
        previous[signum] = old  # first, so that a signal right after the next line finds it
        try:
            signal.signal(signum, handler)
        except ValueError:  # not the main interpreter
            del previous[signum]
            return
