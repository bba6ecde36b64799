"""The `keras-convnext` command line. Commands parse arguments and call the library.

The parser is built from keras-free modules only: `--help` and a bad argument answer before any
framework is imported (`_import_frameworks_quietly` runs once the arguments are good).
"""

import argparse
import json
import sys

from keras_convnext import hugepages
from keras_convnext.variants import VARIANTS

VARIANT_NAMES = tuple(VARIANTS)
# dense_train.HEADS' names (it imports nothing heavy either; tests/test_cli.py checks that they agree).
DENSE_TASKS = ("detection", "segmentation")
DENSE_HEADS = ("retinanet", "deeplabv3", "upernet")
# The names of recipes.RECIPES, which imports Keras (tests/test_cli.py checks that the two agree).
RECIPE_NAMES = ("in1k", "in22k", "in22k_ft_in1k", "ft_384", "finetune", "fcmae", "fcmae_ft_atto", "fcmae_ft_tiny",
                "fcmae_ft_base")


def _cmd_demo(args):
    from keras_convnext.demo import run_demo

    result = run_demo(epochs=args.epochs, batch_size=args.batch_size, verbose=2)
    print(
        f"ConvNeXt-Atto on scikit-learn digits ({result['train']} train / {result['test']} held out, "
        f"32x32, {args.epochs} epochs, backend {result['backend']}): held-out accuracy "
        f"{result['accuracy']:.4f} in {result['seconds']:.0f} s"
    )


def _cmd_predict(args):
    from keras_convnext.predict import predict_files

    results = predict_files(args.images, preset=args.preset, weights=args.weights, top=args.top)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for item in results:
        print(item["image"])
        for rank, p in enumerate(item["predictions"], 1):
            print(f"  {rank}. {p['name']:<30} {p['wordnet_id']}  {p['probability']:.4f}")


def _cmd_convert(args):
    if args.format == "keras_hub":
        try:
            from keras_convnext.hub import save_preset
        except ImportError as e:  # the optional extra: one line, as any other bad input
            raise ValueError(str(e)) from e

        path = save_preset(args.src, args.dst, variant=args.variant, overwrite=args.overwrite)
        print(f"wrote {path} (a keras-hub preset folder)")
        return
    from keras_convnext.weights import convert

    path = convert(args.src, args.dst, variant=args.variant, overwrite=args.overwrite)
    print(f"wrote {path}")


def _cmd_benchmark(args):
    from keras_convnext import benchmark

    backends = benchmark.BACKENDS if args.backends == ["all"] else args.backends
    if args.scaling:
        args.variant, args.image_size, args.batch_size = (list(v) for v in benchmark.SCALING)
    specs = benchmark.plan(variant=args.variant, image_size=args.image_size, batch_size=args.batch_size,
                           precisions=args.precision, modes=args.mode, backends=backends,
                           peers=[] if args.no_peers else (args.peers or True), steps=args.steps, warmup=args.warmup,
                           device=args.device)
    command = " ".join(["keras-convnext", *args.argv])

    # Read once, not after every row: a GPU's name asks nvidia-smi.
    machine = benchmark.machine_facts(gpu=args.device == "gpu") if args.json else None

    def save(done):  # after every row, written aside and renamed: a run stopped part-way keeps what it measured
        _write_json(args.json, benchmark.report(done, command, planned=len(specs), machine=machine))

    results = benchmark.run(specs, progress=True, on_result=save if args.json else None)
    print()
    print(benchmark.table(results))
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        benchmark.plot(results, args.plot)
        print(f"wrote {args.plot}")
    if all("error" in r for r in results):
        print(f"keras-convnext benchmark: every measurement failed; the first: {results[0]['error']}", file=sys.stderr)
        sys.exit(1)


def _parse_set(items):
    """--set key=value pairs -> dict, values read as Python literals where they are ones."""
    import ast

    overrides = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value. Received: --set {item}")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = None if value.lower() == "none" else value
    return overrides


def _recipe_overrides(items):
    """`--set` pairs, which set recipe fields only: train()'s own arguments have flags of their own."""
    import inspect

    from keras_convnext.training import train

    overrides = _parse_set(items)
    own = [p for p in inspect.signature(train).parameters if p != "recipe_overrides"]
    for key in overrides:
        if key in own:
            raise ValueError(f"--set takes recipe fields; {key!r} has its own flag (--{key.replace('_', '-')}). "
                             f"Received: --set {key}={overrides[key]!r}")
    return overrides


def _cmd_train_dense(args):
    if args.set or args.val_split is not None or args.recipe != "finetune" or args.skip_bad_images or args.restart:
        flag = ("--set" if args.set else "--val-split" if args.val_split is not None else
                "--recipe" if args.recipe != "finetune" else "--skip-bad-images" if args.skip_bad_images else
                "--restart")
        raise ValueError(f"{flag} is for classification; --task {args.task} takes --head, --variant, --preset, "
                         f"--image-size, --epochs, --batch-size, --lr, --val-dir, --seed. Received: {flag}")
    try:
        import keras_hub  # noqa: F401
    except ImportError as e:
        raise ValueError("--task detection|segmentation needs keras-hub: pip install 'keras-convnext[hub]'") from e
    from keras_convnext.dense_train import train_dense

    head_convs = {} if args.head_convs is None else {"pre_logits_num_conv_layers": args.head_convs}
    result = train_dense(args.data, args.out, args.task, head=args.head, variant=args.variant,
                         weights=args.preset, image_size=args.image_size or 128, epochs=args.epochs or 12,
                         batch_size=args.batch_size or 16, lr=1e-3 if args.lr is None else args.lr, seed=args.seed,
                         val_dir=args.val_dir, num_scenes=tuple(args.scenes), verbose=2 if args.quiet else "auto",
                         **head_convs)
    if args.json:
        print(json.dumps(result))
        return
    score = (f"held-out mAP@0.5 {result['map50']:.4f}, mAP@[.5:.95] {result['map']:.4f}" if args.task == "detection"
             else f"held-out mIoU {result['miou']:.4f}")
    print(f"{VARIANTS[args.variant].title} + {result['head']}, {result['epochs']} epochs on {result['data']}: "
          f"{score}, {result['seconds']:.0f} s")
    print(f"wrote {result['model']}, {result['history']}")


def _cmd_train(args):
    from keras_convnext.training import train

    if args.head_convs is not None and args.task != "detection":
        raise ValueError(f"--head-convs is for --task detection. Received: --head-convs {args.head_convs} "
                         f"with --task {args.task}")
    if args.task != "classification":
        return _cmd_train_dense(args)
    if args.head:
        raise ValueError(f"--head is for --task detection|segmentation. Received: --head {args.head}")

    overrides = _recipe_overrides(args.set)
    result = train(args.data, args.out, variant=args.variant, recipe=args.recipe, preset=args.preset,
                   image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   val_dir=args.val_dir, val_split=args.val_split, seed=args.seed,
                   verbose=2 if args.quiet else "auto", skip_bad_images=args.skip_bad_images,
                   restart=args.restart, **overrides)
    if args.json:
        print(json.dumps(result))
        return
    title = VARIANTS[args.variant].title
    if "encoder" in result:  # FCMAE pre-training: no labels, no accuracy
        print(f"{title}, FCMAE pre-training ({result['recipe']}), {result['epochs']} epochs ({result['train_images']} "
              f"images, batch {result['batch_size']}, {result['image_size']} px, {result['mask_ratio']:.0%} of "
              f"patches masked): loss {result['loss']:.4f}, {result['seconds']:.0f} s")
        print(f"wrote {result['encoder']} (the encoder, to fine-tune with --preset), {result['model']}, "
              f"{result['history']}, {result['curves']}")
        return
    print(
        f"{title}, recipe {result['recipe']}, {result['epochs']} epochs "
        f"({result['train_images']} images, batch {result['batch_size']}, {result['image_size']} px): "
        f"held-out accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}, {result['seconds']:.0f} s"
    )
    print(f"wrote {result['model']}, {result['history']}, {result['curves']}")


def _cmd_export(args):
    from keras_convnext.export import export

    path = export(args.model, args.out, format=args.format, version=args.version, image_size=args.image_size,
                  crop_pct=args.crop_pct, overwrite=args.overwrite)
    print(f"wrote {path}")


def _write_json(path, data):
    from keras_convnext.files import write_text

    write_text(path, json.dumps(data, indent=2))


def build_parser():
    parser = _Parser(
        prog="keras-convnext",
        description="ConvNeXt for Keras 3: predict, train, export, convert and benchmark.",
    )
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = lambda name, **kwargs: sub.add_parser(name, parents=[common], **kwargs)  # noqa: E731

    p = add("demo", help="train ConvNeXt-Atto on scikit-learn's digits, print held-out accuracy")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_cmd_demo)

    p = add("predict", help="classify image files with a pretrained ConvNeXt")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help="preset name (default: convnext_tiny.fb_in22k_ft_in1k)")
    source.add_argument("--weights", help="checkpoint file (any supported format)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_predict)

    p = add("convert", help="convert a checkpoint to a Keras .weights.h5 or .keras file, or a keras-hub preset")
    p.add_argument("src", metavar="SRC", help="checkpoint file or preset name")
    p.add_argument("dst", metavar="DST", help="output path ending in .weights.h5 or .keras; with --format "
                                              "keras_hub, the preset folder")
    p.add_argument("--format", choices=["keras", "keras_hub"], default="keras",
                   help="keras (default: .keras or .weights.h5 by DST's suffix) or keras_hub (a preset folder "
                        "for keras_hub's from_preset; needs the hub extra)")
    p.add_argument("--variant", choices=VARIANT_NAMES,
                   help="check that SRC holds this variant (its architecture is read from the file)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_convert)

    p = add("train", help="train or fine-tune with the paper's recipes under model.fit",
                       description="Train a ConvNeXt with a recipe. Writes OUT/model.keras (the evaluated "
                                   "weights: EMA when the recipe keeps one), OUT/history.csv, OUT/curves.png, "
                                   "OUT/classes.json; an interrupted run resumes from OUT/backup. --recipe fcmae "
                                   "pre-trains a ConvNeXt V2 on unlabelled images and writes OUT/encoder.keras "
                                   "(fine-tune it with --preset OUT/encoder.keras) and OUT/fcmae.keras.")
    p.add_argument("data", metavar="DATA_DIR", help="folder with one sub-folder of images per class, or a TFDS name; "
                                                    "for --task detection|segmentation, 'digit-scenes' too; "
                                                    "for --recipe fcmae, any folder of images (no labels)")
    p.add_argument("--variant", default="atto", choices=VARIANT_NAMES)
    p.add_argument("--task", default="classification", choices=("classification",) + DENSE_TASKS,
                   help="detection (keras-hub RetinaNet) or segmentation (keras-hub DeepLabV3, or UperNet) on "
                        "DATA: 'digit-scenes', a TFDS name (coco/2017, scene_parse150) or a folder in the layout "
                        "of docs/dense.md; writes OUT/task.keras, OUT/history.csv, OUT/result.json")
    p.add_argument("--head", choices=DENSE_HEADS, help="dense tasks: retinanet | deeplabv3 (default for "
                                                          "segmentation) | upernet")
    p.add_argument("--scenes", type=int, nargs=2, metavar=("TRAIN", "HELD_OUT"), default=(3072, 128),
                   help="digit-scenes: how many training and held-out scenes (default 3072 128: a few hundred "
                        "scenes are memorised, not learnt)")
    p.add_argument("--head-convs", type=int, default=None, metavar="N",
                   help="detection: RetinaNet's 3x3 convs before each head's logits (default 4, as the paper; on "
                        "a small CPU 1 trains 3x faster, docs/dense.md)")
    p.add_argument("--recipe", default="finetune", choices=RECIPE_NAMES)
    p.add_argument("--preset", help="weights to start from: preset name, 'imagenet' or a checkpoint file "
                                    "(default: the recipe's)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's, scaled to the batch)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-dir", help="validation folder with the same class folders")
    val.add_argument("--val-split", type=float, help="fraction of DATA_DIR held out (default 0.1)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set mixup=0.0 --set ema_momentum=None")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read, with a warning naming them (default: stop and name them)")
    p.add_argument("--restart", action="store_true",
                   help="start over: remove OUT/backup instead of resuming from it")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_train)

    p = add("export", help="export to a TF Serving SavedModel, ONNX or LiteRT, with the same numbers")
    p.add_argument("model", metavar="MODEL", help=".keras file or preset name")
    p.add_argument("out", metavar="OUT", help="SavedModel base directory, or the .onnx / .tflite file")
    p.add_argument("--format", required=True, choices=["saved_model", "onnx", "litert"])
    p.add_argument("--version", type=int, default=1, help="SavedModel version directory (default 1)")
    p.add_argument("--image-size", type=int, help="input size for models with a flexible input (default 224)")
    p.add_argument("--crop-pct", type=float, help="crop fraction of the bytes signature's eval transform")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = add("benchmark", help="throughput and peak memory, side by side with keras.applications and timm")
    p.add_argument("--variant", nargs="+", default=["tiny"], choices=sorted(VARIANT_NAMES),
                   help="one or several (several, or several sizes or batches: the scaling view)")
    p.add_argument("--image-size", nargs="+", type=int, default=[224])
    p.add_argument("--batch-size", nargs="+", type=int, default=[16])
    p.add_argument("--scaling", action="store_true",
                   help="the scaling view: tiny and base, 224 and 384 px, batch 1, 16 and 64")
    p.add_argument("--precision", nargs="+", default=["float32"],
                   help="float32, mixed_bfloat16 and/or mixed_float16")
    p.add_argument("--mode", nargs="+", default=["inference", "training"])
    p.add_argument("--backends", nargs="+", default=None,
                   help="tensorflow, jax, torch, or 'all' (default: the current backend)")
    p.add_argument("--device", default="cpu",
                   help="cpu, or gpu: every implementation on this machine's GPU (examples/benchmark_gpu.py)")
    p.add_argument("--steps", type=int, default=6, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (compilation)")
    peers = p.add_mutually_exclusive_group()
    peers.add_argument("--peers", nargs="+",
                       help="the peers to measure beside keras_convnext: timm, timm_compile and/or keras_applications "
                            "(default: all)")
    peers.add_argument("--no-peers", action="store_true", help="measure keras_convnext only")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    p.set_defaults(func=_cmd_benchmark)
    return parser


# What the library raises on bad input (CheckpointError is a ValueError, DownloadError an OSError):
# one line and exit status 2, as argparse does for a bad flag.
USER_ERRORS = (ValueError, OSError)


def one_line(error):
    """The message of `error` on one line (Keras wraps a layer's error in a few lines of context)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # Keras bolds the message with ANSI codes
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        lines = lines[1:2]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


# Commands whose work runs through tf.data, whatever the backend (`demo` fits NumPy arrays: no tf.data).
_NEEDS_TENSORFLOW = ("train",)


def _import_frameworks_quietly(command):
    """Loads keras_convnext (Keras, its backend; TensorFlow where the command needs it) with stderr set aside.

    TensorFlow's C++ start-up prints lines ("oneDNN custom operations are on", "Could not find cuda
    drivers") before its logging reads TF_CPP_MIN_LOG_LEVEL, so no setting hides them: they would
    come before every one-line error. Kept and shown if the import itself fails.
    """
    import importlib.util
    import os
    import tempfile

    import keras_convnext

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    tensorflow = (backend == "tensorflow" or command in _NEEDS_TENSORFLOW) and importlib.util.find_spec("tensorflow")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            keras_convnext._load()  # registers the layers before any `.keras` file is read
            if tensorflow:
                importlib.import_module("tensorflow")
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _Parser(argparse.ArgumentParser):
    """argparse's errors on one line, as every other error of the command line (usage: --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")


def console_main():
    """The `keras-convnext` command: a process of its own, so it first starts again with huge pages where the
    kernel leaves them to the program (`hugepages`); `main` itself never does, whoever calls it."""
    hugepages.restart_with_hugepages()
    main()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the benchmark records as its command
    try:
        _import_frameworks_quietly(args.command)
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"keras-convnext {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"keras-convnext {args.command}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # a failure inside a backend or a child process: not the user's input
        if args.debug:
            raise
        print(f"keras-convnext {args.command}: error: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    console_main()
