"""TensorFlow (CPU, graph mode as Keras runs it there) timings of ConvNeXt-T's depthwise 7x7 convolution in
mixed precision, in each form (docs/dispatch.md).

    python examples/ops_benchmark_tf.py

For each stage's map at batch 16 and 224 px, the forward convolution and forward + both gradients (map and
kernel), in a `tf.function` (no XLA: Keras's "auto" leaves XLA off on a CPU-only TensorFlow), median of 5
calls after 2, in ms:
- `bf16`: the bfloat16 map and kernel convolved by TensorFlow's kernel (what `keras.layers.DepthwiseConv2D`
  runs under `mixed_bfloat16`);
- `f32 upcast`: map and kernel cast to float32, convolved, the result cast back to bfloat16;
- `f32`: the float32 convolution alone (the float32 model's).
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SHAPES = [(16, 56, 56, 96), (16, 28, 28, 192), (16, 14, 14, 384), (16, 7, 7, 768)]


def median_ms(fn, *args, n=5):
    for _ in range(2):
        fn(*args)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        out = fn(*args)
        _ = [t.numpy() for t in tf.nest.flatten(out)]
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def conv(x, k):
    return tf.nn.depthwise_conv2d(x, k, strides=(1, 1, 1, 1), padding="SAME")


FORMS = {
    "bf16": conv,
    "f32 upcast": lambda x, k: tf.cast(conv(tf.cast(x, tf.float32), tf.cast(k, tf.float32)), tf.bfloat16),
}


def forward_backward(form):
    @tf.function
    def run(x, k, g):
        with tf.GradientTape() as tape:
            tape.watch([x, k])
            y = form(x, k)
        return tape.gradient(y, [x, k], output_gradients=g)

    return run


def main():
    rng = np.random.default_rng(0)
    print("tensorflow", tf.__version__, "| oneDNN:", os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"))
    forms = {**FORMS, "f32": conv}
    print(f"{'map (n, h, w, c)':<24}{'pass':<10}" + "".join(f"{name:>14}" for name in forms))
    for shape in SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        k = rng.standard_normal((7, 7, shape[-1], 1), dtype=np.float32)
        for label, wrap in (("fwd", tf.function), ("fwd+bwd", forward_backward)):
            cells = []
            for name, form in forms.items():
                dtype = tf.float32 if name == "f32" else tf.bfloat16
                args = [tf.constant(x, dtype), tf.constant(k, dtype)]
                if label == "fwd+bwd":
                    args.append(tf.constant(x, dtype))
                cells.append(median_ms(wrap(form), *args))
            print(f"{str(shape):<24}{label:<10}" + "".join(f"{c:>14.1f}" for c in cells))


if __name__ == "__main__":
    main()
