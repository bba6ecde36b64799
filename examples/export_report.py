"""Export a ConvNeXt from each backend to every format, and measure parity and export time.

    python examples/export_report.py [--variant tiny] [--image-size 224] [--backends tensorflow jax torch]

Each backend runs in its own process: it builds the variant (random weights, layer scale 1, the head
scaled to logits of standard deviation 3, so that the probabilities depend on the pixels), exports
SavedModel, ONNX and LiteRT with `keras_convnext.export`, runs each file in its own runtime
(TensorFlow, onnxruntime, the LiteRT interpreter) and compares the probabilities with the Keras
model's. Prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Format -> the name of its output in the work folder.
FORMATS = {"saved_model": "serving", "onnx": "model.onnx", "litert": "model.tflite"}


def _measure(variant, image_size, out):
    try:  # torchvision must load before TensorFlow (TF 2.21, torchvision 0.29)
        import torchvision  # noqa: F401
    except ImportError:
        pass
    import keras
    import numpy as np

    import keras_convnext as kc

    spec = kc.VARIANTS[variant]
    keras.utils.set_random_seed(0)
    model = kc.ConvNeXt(spec.depths, spec.dims, weights=None, input_shape=(image_size, image_size, 3),
                        layer_scale_init_value=1.0)
    pixels = np.random.default_rng(1).integers(0, 256, (2, image_size, image_size, 3)).astype("float32")
    # A random head gives near-uniform probabilities, which any export matches: scale it so the
    # logits spread with a standard deviation of 3 (what a trained ConvNeXt's look like).
    logits = np.log(keras.ops.convert_to_numpy(model.predict(pixels, verbose=0)))
    head = model.get_layer("head")
    head.kernel.assign(head.kernel * (3.0 / logits.std(axis=1).mean()))
    expected = keras.ops.convert_to_numpy(model.predict(pixels, verbose=0))
    rows = []
    for fmt, name in FORMATS.items():
        start = time.perf_counter()
        path = kc.export(model, os.path.join(out, name), format=fmt)
        seconds = time.perf_counter() - start
        got = _run(fmt, path, pixels)
        rows.append({"format": fmt, "seconds": seconds, "max_abs_diff": float(np.abs(got - expected).max()),
                     "max_probability": float(expected.max())})
    return {"backend": keras.backend.backend(), "rows": rows}


def _run(fmt, path, pixels):
    import numpy as np

    if fmt == "onnx":
        import onnxruntime

        return onnxruntime.InferenceSession(path).run(["probabilities"], {"images": pixels})[0]
    import tensorflow as tf

    if fmt == "saved_model":
        return tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(pixels))["probabilities"].numpy()
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner("serving_default")
    return np.concatenate([runner(images=pixels[i:i + 1])["probabilities"] for i in range(len(pixels))])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_measure(args.variant, args.image_size, args.worker)))
        return None
    results = []
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as out:
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            done = subprocess.run([sys.executable, __file__, "--variant", args.variant, "--image-size",
                                   str(args.image_size), "--worker", out], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{backend}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"ConvNeXt-{args.variant.capitalize()}, {args.image_size} px, 2 images\n")
    print("| source backend | format | export time | max abs diff of probabilities (max probability) |")
    print("|---|---|---|---|")
    for result in results:
        for row in result["rows"]:
            print(f"| {result['backend']} | {row['format']} | {row['seconds']:.1f} s | "
                  f"{row['max_abs_diff']:.2e} ({row['max_probability']:.3f}) |")
    return results


if __name__ == "__main__":
    main()
