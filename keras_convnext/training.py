"""Training under `model.fit`: a recipe, a data source and an output folder.

`train` is what `keras-convnext train` runs: it builds the pipelines and the model, compiles with
the recipe, fits with Keras's progress bar, resumes an interrupted run, and writes
`OUT/model.keras` (the evaluated weights: the EMA when the recipe keeps one), `OUT/history.csv`,
`OUT/curves.png` and `OUT/classes.json`.
"""

import csv
import json
import os
import shutil
import tempfile
import time

import keras

from keras_convnext import data as data_lib
from keras_convnext import recipes as recipes_lib
from keras_convnext.variants import VARIANTS, Variant

BACKUP_DIR = "backup"


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose backup survives a kill at any instant.

    Keras's writes the weights and then the epoch in place, so a kill in between leaves a
    half-written file or weights that do not match the epoch. Here each epoch's weights (with
    the optimizer state: moments, step, EMA) go to a new file, renamed into place when complete,
    and only then does the metadata, itself renamed into place, point at it.
    """

    def __init__(self, backup_dir):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=True)
        self.resumed_from = None

    def _load_model(self):
        if not os.path.exists(self._training_metadata_path):
            return
        with open(self._training_metadata_path) as f:
            meta = json.load(f)
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.backup_dir, meta["weights"]))
        self.model._initial_epoch = meta["epoch"]
        self.resumed_from = meta["epoch"]
        print(f"Resuming from {self.backup_dir}: {meta['epoch']} epoch(s) done.", flush=True)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{self._current_epoch}.weights.h5"
        tmp = os.path.join(self.backup_dir, f".partial-{os.getpid()}.weights.h5")
        self.model.save_weights(tmp, overwrite=True)
        os.replace(tmp, os.path.join(self.backup_dir, name))
        _write_atomic(self._training_metadata_path, json.dumps({"epoch": self._current_epoch, "weights": name}))
        for old in os.listdir(self.backup_dir):
            if old.startswith("epoch-") and old != name:
                os.remove(os.path.join(self.backup_dir, old))


class HistoryCSV(keras.callbacks.Callback):
    """The per-epoch logs as CSV, rewritten whole (and atomically) at every epoch's end.

    On a resumed run, rows of epochs that are being run again are dropped first, so the file
    always holds one row per completed epoch.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.rows = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.rows is None:
            self.rows = [r for r in read_history(self.path) if int(r["epoch"]) < epoch]

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with _atomic_file(self.path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)


def read_history(path):
    """The rows of a `history.csv` (an empty list when there is none)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _atomic_file:
    """Open a temporary file beside `path`; rename it onto `path` only when closed without error."""

    def __init__(self, path, mode="w"):
        self.path, self.mode = path, mode

    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=".partial-")
        self.file = os.fdopen(fd, self.mode, newline="" if "b" not in self.mode else None)
        return self.file

    def __exit__(self, kind, value, tb):
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)


def _write_atomic(path, text):
    with _atomic_file(path) as f:
        f.write(text)


def plot_curves(history_path, out_path):
    """Loss and accuracy per epoch (training and validation) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(history_path)
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if rows and key in rows[0]:
                ax.plot(epochs, [float(r[key]) for r in rows], marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_ylim(0, 1)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_path)), f".partial-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)


def save_model(model, path):
    """Saves `model` to `path` (.keras) without its optimizer, written aside and renamed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".partial-{os.getpid()}.keras")
    optimizer = model.optimizer
    try:
        # The deliverable is the evaluated network; the optimizer state lives in the backup.
        model.optimizer = None
        model.save(tmp)
    finally:
        model.optimizer = optimizer
    os.replace(tmp, path)


def _data_parallel(batch_size, distribute):
    """Sets `keras.distribution.DataParallel` over all devices on JAX when there are several."""
    if distribute is False or keras.backend.backend() != "jax":
        if distribute is True:
            raise ValueError(
                "Data parallel training needs the JAX backend (keras.distribution). "
                f"Received: distribute=True with backend {keras.backend.backend()!r}"
            )
        return 1
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return 1
    if batch_size % len(devices):
        raise ValueError(
            f"The batch is split over {len(devices)} devices and must be a multiple of that. "
            f"Received: batch_size={batch_size}"
        )
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return len(devices)


def _sources(data, val_dir, val_split, seed):
    """(train source, val source, class names, train size) from a folder or a TFDS name."""
    if val_dir is not None and val_split is not None:
        raise ValueError(f"Pass `val_dir` or `val_split`, not both. Received: val_dir={val_dir!r}, val_split={val_split}")
    if os.path.isdir(os.fspath(data)):
        paths, labels, classes = data_lib.image_folder(data)
        if val_dir is not None:
            val_paths, val_labels, val_classes = data_lib.image_folder(val_dir)
            if val_classes != classes:
                raise ValueError(
                    f"The validation folder's classes differ from the training folder's ({classes}). "
                    f"Received: val_dir={val_dir!r} with classes {val_classes}"
                )
            return (paths, labels), (val_paths, val_labels), classes, len(paths)
        (paths, labels), val = data_lib.split_files(paths, labels, val_split or 0.1, seed)
        return (paths, labels), val, classes, len(paths)
    if os.path.sep in os.fspath(data) or os.path.exists(os.fspath(data)):
        raise ValueError(f"`data` must be a folder of class folders or a TFDS name. Received: data={data!r}")
    if val_dir is not None:
        raise ValueError(f"`val_dir` goes with a data folder, not a TFDS name. Received: val_dir={val_dir!r}")
    train_split, val_split_name = data_lib.tfds_splits(data, val_split)
    train_ds, classes, size = data_lib.tfds_source(data, train_split)
    val_ds, _, _ = data_lib.tfds_source(data, val_split_name)
    return train_ds, val_ds, classes, size


def _weights_for(recipe, variant, preset):
    """What the model starts from: `preset` (a name or a file) or the recipe's default."""
    if preset is not None:
        return preset
    if recipe.weights in (None, "imagenet"):
        return recipe.weights
    name = f"convnext_{variant}.{recipe.weights}"
    from keras_convnext.presets import PRESETS

    if name not in PRESETS:
        raise ValueError(
            f"Recipe {recipe.name!r} starts from {recipe.weights} weights, which ConvNeXt-{variant} does not "
            f"have; pass a preset or a checkpoint file. Received: variant={variant!r}"
        )
    return name


def train(data, out, variant="atto", recipe="finetune", preset=None, image_size=None, epochs=None,
          batch_size=None, lr=None, val_dir=None, val_split=None, seed=0, verbose="auto",
          distribute="auto", callbacks=(), **recipe_overrides):
    """Trains a ConvNeXt with a recipe under `model.fit` and writes the results to `out`.

    Args:
        data: a folder with one sub-folder of images per class, or a TFDS dataset name.
        out: output folder (created); an interrupted run resumes from `out/backup`.
        variant: "atto" .. "xlarge", or a `Variant` (a shape of your own).
        recipe: a name from `recipes.list_recipes()` or a `Recipe`.
        preset: weights to start from (preset name, "imagenet" or a file); default: the recipe's.
        image_size, epochs, batch_size, lr: override the recipe (`lr` is the peak rate as used).
        val_dir: validation folder (same classes); or `val_split`, a held-out fraction of `data`
            (default 0.1; TFDS datasets use their validation or test split).
        distribute: "auto" (data parallel over all devices on JAX when there are several), or a bool.
        callbacks: extra Keras callbacks.
        **recipe_overrides: any other recipe field (`mixup=0.0`, `ema_momentum=None`, ...).

    Returns:
        A dict: accuracy and loss on the validation data with the saved weights, seconds,
        epochs run, resumed_from (epoch or None), the output paths and the class names.
    """
    if isinstance(variant, Variant):
        spec = variant
    elif variant in VARIANTS:
        spec = VARIANTS[variant]
    else:
        raise ValueError(
            f"Unknown variant. Valid values: {', '.join(VARIANTS)} or a `Variant`. Received: variant={variant!r}"
        )
    overrides = {k: v for k, v in dict(image_size=image_size, epochs=epochs, batch_size=batch_size).items()
                 if v is not None}
    recipe = recipes_lib.get_recipe(recipe, **overrides, **recipe_overrides)
    if lr is not None:
        if not lr > 0:
            raise ValueError(f"`lr` must be positive. Received: lr={lr}")
        recipe = recipes_lib.get_recipe(recipe, lr=lr, lr_batch_size=recipe.batch_size)
    if recipe.image_size < 32:
        raise ValueError(f"ConvNeXt needs images of at least 32 px. Received: image_size={recipe.image_size}")
    weights = _weights_for(recipe, spec.name, preset)

    keras.utils.set_random_seed(seed)
    train_source, val_source, classes, train_size = _sources(data, val_dir, val_split, seed)
    if train_size < recipe.batch_size:
        raise ValueError(
            f"The training set has {train_size} images, fewer than one batch. Received: batch_size={recipe.batch_size}"
        )
    os.makedirs(out, exist_ok=True)
    devices = _data_parallel(recipe.batch_size, distribute)
    train_ds = data_lib.train_dataset(train_source, recipe, len(classes), seed=seed)
    # Data parallel splits every batch over the devices: validation then runs on whole batches
    # (the remainder, fewer images than one batch, is left out).
    val_ds = data_lib.eval_dataset(val_source, len(classes), recipe.image_size, recipe.crop_pct,
                                   batch_size=recipe.batch_size, drop_remainder=devices > 1)
    steps = train_size // recipe.batch_size

    from keras_convnext.model import ConvNeXt

    model = ConvNeXt(spec.depths, spec.dims, weights=weights, input_shape=(recipe.image_size,) * 2 + (3,),
                     classes=len(classes), name=f"convnext_{spec.name}", **recipe.model_kwargs(spec))
    model.compile(**recipe.compile_kwargs(steps))

    history_path = os.path.join(out, "history.csv")
    backup = ResumableBackup(os.path.join(out, BACKUP_DIR))
    # Order matters: the CSV row of an epoch is written before its backup, so a resumed run
    # that repeats the epoch finds the row and replaces it.
    fit_callbacks = [*recipe.callbacks(), HistoryCSV(history_path), backup, *callbacks]
    start = time.perf_counter()
    model.fit(train_ds, epochs=recipe.epochs, validation_data=val_ds, callbacks=fit_callbacks, verbose=verbose)
    seconds = time.perf_counter() - start
    # fit ends with the optimizer's finalize step: with EMA, the model now holds the EMA weights.
    loss, accuracy = model.evaluate(val_ds, verbose=0)

    model_path = os.path.join(out, "model.keras")
    save_model(model, model_path)
    _write_atomic(os.path.join(out, "classes.json"), json.dumps(classes, indent=1))
    curves_path = os.path.join(out, "curves.png")
    plot_curves(history_path, curves_path)
    if os.path.isdir(backup.backup_dir):  # fit removes it on success; a stray one would resume a finished run
        shutil.rmtree(backup.backup_dir)
    return {
        "accuracy": float(accuracy), "loss": float(loss), "seconds": seconds, "epochs": recipe.epochs,
        "resumed_from": backup.resumed_from, "model": model_path, "history": history_path,
        "curves": curves_path, "classes": classes, "devices": devices, "recipe": recipe.name,
        "train_images": train_size, "batch_size": recipe.batch_size, "image_size": recipe.image_size,
    }
