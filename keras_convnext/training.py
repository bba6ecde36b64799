"""Training under `model.fit`: a recipe, a data source and an output folder.

`train` is what `keras-convnext train` runs: it builds the pipelines and the model, compiles with
the recipe, fits with Keras's progress bar, resumes an interrupted run, and writes
`OUT/model.keras` (the evaluated weights: the EMA when the recipe keeps one), `OUT/history.csv`,
`OUT/curves.png` and `OUT/classes.json`. With a self-supervised recipe (`fcmae`) it pre-trains an
FCMAE on the images alone (`pretrain`) and writes `OUT/encoder.keras`, the encoder to fine-tune, and
`OUT/fcmae.keras`, the whole autoencoder. Every file is written aside and renamed into place
(`files.atomic_path`).
"""

import csv
import dataclasses
import json
import os
import shutil
import time

import keras

from keras_convnext import backend_ops, checks, files
from keras_convnext import data as data_lib
from keras_convnext import recipes as recipes_lib
from keras_convnext.variants import MIN_IMAGE_SIZE, VARIANTS, Variant

BACKUP_DIR = "backup"
BACKUP_METADATA = "training_metadata.json"


class EpochBackup(keras.callbacks.Callback):
    """Saves each epoch's weights and optimizer state (moments, step, EMA) so that a killed run resumes.

    The weights go to a new file, written aside and renamed into place; only then does the
    metadata, itself renamed into place, point at it: a kill at any instant leaves the previous
    epoch's backup or this one, never half of one. The metadata records the run's configuration
    (`run_config`), which `read_backup` checks before `train` resumes; `train` removes the backup
    once its outputs are written.
    """

    def __init__(self, backup_dir, config):
        super().__init__()
        self.backup_dir, self.config = backup_dir, config

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        name = f"epoch-{done}.weights.h5"
        with files.atomic_path(os.path.join(self.backup_dir, name)) as tmp:
            self.model.save_weights(tmp)
        meta = {"epoch": done, "weights": name, "config": self.config}
        files.write_text(os.path.join(self.backup_dir, BACKUP_METADATA), json.dumps(meta, indent=1))
        for old in os.listdir(self.backup_dir):
            if old.startswith("epoch-") and old != name:
                os.remove(os.path.join(self.backup_dir, old))


def run_config(variant, classes, recipe, weights=None):
    """What a backup must share with the run that resumes it: the network, the classes, what it started
    from and every recipe field (a resume with other settings would silently train another run)."""
    fields = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("name", "description")}
    config = {"depths": list(variant.depths), "dims": list(variant.dims), "num_classes": len(classes),
              "classes": list(classes), "image_size": recipe.image_size, "recipe": recipe.name,
              "batch_size": recipe.batch_size, "weights": None if weights is None else os.fspath(weights),
              "recipe_fields": fields}
    return json.loads(json.dumps(config))  # as it reads back from the file (tuples become lists)


def read_backup(backup_dir, config):
    """The metadata of the backup in `backup_dir` (None when there is none), checked against `config`.

    Raises a ValueError naming both configurations when the backup is another run's, or saying
    why it cannot be read; both say how to start over.
    """
    meta_path = os.path.join(backup_dir, BACKUP_METADATA)
    if not os.path.exists(meta_path):
        return None  # the metadata is the commit point: without it, no epoch was backed up whole
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        epoch, weights, saved = meta["epoch"], meta["weights"], meta.get("config")
        checks.integer("epoch", epoch, minimum=1)
        if not isinstance(weights, str) or os.path.basename(weights) != weights:
            raise ValueError(f"weights={weights!r} is not a file name")
        from keras_convnext.checkpoints import check_hdf5

        check_hdf5(os.path.join(backup_dir, weights))  # truncated, or reaching other files: refused
    except Exception as e:  # a missing or truncated file, broken JSON, missing keys, wrong types
        raise _unreadable_backup(backup_dir, e) from e
    if saved != config:
        if not isinstance(saved, dict):
            differ = "no recorded configuration (an older version wrote it)"
        else:
            ours, theirs = _flat(config), _flat(saved)
            differ = "; ".join(f"{k}: backup {_short(theirs.get(k, '(none)'))}, this run {_short(ours.get(k, '(none)'))}"
                               for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
        raise ValueError(f"The backup in {backup_dir!r} is of another run ({differ}). {_start_over(backup_dir)}")
    return meta


def _flat(config):
    """{"image_size": 32, "recipe.mixup": 0.8, ...}: the nested recipe fields as top-level keys."""
    flat = {k: v for k, v in config.items() if k != "recipe_fields"}
    flat.update({f"recipe.{k}": v for k, v in (config.get("recipe_fields") or {}).items()})
    return flat


def _short(value):
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:5]))}, ... ({len(value)})]"
    return repr(value)


def _start_over(backup_dir):
    return f"Pass restart=True (--restart) to start over, or delete {backup_dir!r}. Received: backup={backup_dir!r}"


def _unreadable_backup(backup_dir, error):
    return ValueError(f"The backup of an interrupted run cannot be read ({checks.reason(error)}). "
                      f"{_start_over(backup_dir)}")


def _resume(model, backup_dir, meta, verbose):
    """Loads a checked backup into the compiled `model`; returns the epochs it had done."""
    # Loading the optimizer's state needs its variables: build them now, as fit would.
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(os.path.join(backup_dir, meta["weights"]))
    except Exception as e:  # a file HDF5 opens but Keras cannot load: other variables or shapes
        raise _unreadable_backup(backup_dir, e) from e
    if verbose:
        print(f"Resuming from {backup_dir}: {meta['epoch']} epoch(s) done.", flush=True)
    return meta["epoch"]


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
        with files.atomic_open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)


def read_history(path):
    """The rows of a `history.csv` (an empty list when there is none)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(history_path, out_path, metrics=("loss", "accuracy")):
    """Loss and accuracy (or `metrics`) per epoch, training and validation, as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(history_path)
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    axes = axes[0]
    for ax, metric in zip(axes, metrics):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if rows and key in rows[0]:
                ax.plot(epochs, [float(r[key]) for r in rows], marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, metric in zip(axes, metrics):
        if metric == "accuracy":
            ax.set_ylim(0, 1)
    fig.tight_layout()
    try:
        with files.atomic_path(out_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def save_model(model, path):
    """Saves `model` to `path` (.keras) without its optimizer, written aside and renamed."""
    optimizer = getattr(model, "optimizer", None)  # (a model never compiled has none)
    try:
        # The deliverable is the evaluated network; the optimizer state lives in the backup.
        model.optimizer = None
        with files.atomic_path(path) as tmp:
            model.save(tmp)
    finally:
        model.optimizer = optimizer


def _data_parallel(batch_size, distribute):
    """Sets `keras.distribution.DataParallel` over all devices on JAX when there are several."""
    if distribute is False or not backend_ops.data_parallel_available():
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


def _sources(data, val_dir, val_split):
    """(train source, val source, class names) from a folder or a TFDS name.

    Folder sources are listings, (paths, labels), not yet read (`_readable`); with no `val_dir`
    the validation source is None until `_readable` splits it off.
    """
    if val_dir is not None and val_split is not None:
        raise ValueError(f"Pass `val_dir` or `val_split`, not both. Received: val_dir={val_dir!r}, val_split={val_split}")
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError(f"`data` must be a folder of class folders or a TFDS name. Received: data={data!r}")
    if os.path.isdir(os.fspath(data)):
        paths, labels, classes = data_lib.image_folder(data)
        if val_dir is None:
            return (paths, labels), None, classes
        val_paths, val_labels, val_classes = data_lib.image_folder(val_dir)
        if val_classes != classes:
            raise ValueError(
                f"The validation folder's classes differ from the training folder's ({classes}). "
                f"Received: val_dir={val_dir!r} with classes {val_classes}"
            )
        return (paths, labels), (val_paths, val_labels), classes
    if os.path.sep in os.fspath(data) or os.path.exists(os.fspath(data)):
        raise ValueError(f"`data` must be a folder of class folders or a TFDS name. Received: data={data!r}")
    if val_dir is not None:
        raise ValueError(f"`val_dir` goes with a data folder, not a TFDS name. Received: val_dir={val_dir!r}")
    train_split, val_split_name = data_lib.tfds_splits(data, val_split)
    train_ds, classes, _ = data_lib.tfds_source(data, train_split)
    val_ds, _, _ = data_lib.tfds_source(data, val_split_name)
    return train_ds, val_ds, classes


def _readable(train_source, val_source, classes, data, val_dir, val_split, seed, skip_bad_images, verbose):
    """Folder sources with every image read once (`data.check_images`), split when no `val_dir`.

    Returns (train source, val source, train size, skipped [(path, reason)]).
    """
    if not isinstance(train_source, tuple):  # TFDS: decoded by TFDS itself
        return train_source, val_source, int(train_source.cardinality().numpy()), []
    paths, labels, skipped = data_lib.check_images(*train_source, classes, skip_bad_images, verbose, data=data)
    if val_source is not None:
        val_paths, val_labels, val_skipped = data_lib.check_images(*val_source, classes, skip_bad_images, verbose,
                                                                   data=val_dir)
        return (paths, labels), (val_paths, val_labels), len(paths), skipped + val_skipped
    (paths, labels), val = data_lib.split_files(paths, labels, val_split or 0.1, seed)
    return (paths, labels), val, len(paths), skipped


def _check_arguments(out, image_size, epochs, batch_size, lr, val_split, seed, verbose, distribute, callbacks,
                     restart, skip_bad_images):
    """train()'s own arguments, before any work (the recipe checks its fields itself)."""
    if not isinstance(out, (str, os.PathLike)):
        raise ValueError(f"`out` must be a folder path. {checks.received('out', out)}")
    for name, value, minimum in (("image_size", image_size, MIN_IMAGE_SIZE), ("epochs", epochs, 1),
                                 ("batch_size", batch_size, 1)):
        if value is not None:
            checks.integer(name, value, minimum=minimum)
    if lr is not None:
        checks.number("lr", lr, 0.0, low_open=True)
    if val_split is not None:
        checks.number("val_split", val_split, 0.0, 1.0, low_open=True, high_open=True)
    checks.integer("seed", seed, minimum=0, maximum=2**32 - 1)
    if verbose != "auto" and not (isinstance(verbose, int) and not isinstance(verbose, bool) and verbose in (0, 1, 2)):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2. {checks.received('verbose', verbose)}")
    if distribute != "auto" and not isinstance(distribute, bool):
        raise ValueError(f"`distribute` must be 'auto', True or False. {checks.received('distribute', distribute)}")
    if not isinstance(callbacks, (list, tuple)) or not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise ValueError(f"`callbacks` must be a list of Keras callbacks. {checks.received('callbacks', callbacks)}")
    checks.boolean("restart", restart)
    checks.boolean("skip_bad_images", skip_bad_images)


def _weights_for(recipe, variant, preset):
    """What the model starts from: `preset` (a name or a file) or the recipe's default."""
    if preset is not None:
        return preset
    if recipe.weights in (None, "imagenet"):
        return recipe.weights
    spec = VARIANTS.get(variant)
    name = f"{spec.timm_name if spec else f'convnext_{variant}'}.{recipe.weights}"
    from keras_convnext.presets import PRESETS

    if name not in PRESETS:
        raise ValueError(
            f"Recipe {recipe.name!r} starts from {recipe.weights} weights, which {spec.title if spec else variant} "
            f"does not have; pass a preset or a checkpoint file (`keras-convnext train --recipe fcmae` writes "
            f"an FCMAE encoder). Received: variant={variant!r}"
        )
    return name


def train(data, out, variant="atto", recipe="finetune", preset=None, image_size=None, epochs=None,
          batch_size=None, lr=None, val_dir=None, val_split=None, seed=0, verbose="auto",
          distribute="auto", callbacks=(), restart=False, skip_bad_images=False, **recipe_overrides):
    """Trains a ConvNeXt with a recipe under `model.fit` and writes the results to `out`.

    Args:
        data: a folder with one sub-folder of images per class, or a TFDS dataset name. Every
            image is read once before training (`data.check_images`): an unreadable one is an
            error naming it, unless `skip_bad_images`.
        out: output folder (created); an interrupted run resumes from `out/backup`, when that
            backup is of the same run (variant, classes, image size, recipe, batch size).
        variant: "atto" .. "xlarge", or a `Variant` (a shape of your own).
        recipe: a name from `recipes.list_recipes()` or a `Recipe`.
        preset: weights to start from (preset name, "imagenet" or a file); default: the recipe's.
        image_size, epochs, batch_size, lr: override the recipe (`lr` is the peak rate as used).
        val_dir: validation folder (same classes); or `val_split`, a held-out fraction of `data`
            (default 0.1; TFDS datasets use their validation or test split).
        distribute: "auto" (data parallel over all devices on JAX when there are several), or a bool.
        callbacks: extra Keras callbacks.
        restart: discard `out/backup` and start from epoch 0.
        skip_bad_images: train without the images that cannot be read (a warning names them).
        **recipe_overrides: any other recipe field (`mixup=0.0`, `ema_momentum=None`, ...).

    Returns:
        A dict: accuracy and loss on the validation data with the saved weights, seconds,
        epochs run, resumed_from (epoch or None), the output paths, the class names and the
        skipped images.
    """
    _check_arguments(out, image_size, epochs, batch_size, lr, val_split, seed, verbose, distribute, callbacks,
                     restart, skip_bad_images)
    if isinstance(variant, Variant):
        spec = variant
    elif isinstance(variant, str) and variant in VARIANTS:
        spec = VARIANTS[variant]
    else:
        raise ValueError(
            f"Unknown variant. Valid values: {', '.join(VARIANTS)} or a `Variant`. Received: variant={variant!r}"
        )
    overrides = {k: v for k, v in dict(image_size=image_size, epochs=epochs, batch_size=batch_size).items()
                 if v is not None}
    recipe = recipes_lib.get_recipe(recipe, **overrides, **recipe_overrides)
    if lr is not None:
        recipe = recipes_lib.get_recipe(recipe, lr=lr, lr_batch_size=recipe.batch_size)
    if recipe.self_supervised:
        if val_dir is not None or val_split is not None:
            raise ValueError(f"Recipe {recipe.name!r} pre-trains without labels, on every image: it takes no "
                             f"validation data. Received: val_dir={val_dir!r}, val_split={val_split!r}")
        return pretrain(data, out, spec, recipe, preset=preset, seed=seed, verbose=verbose, distribute=distribute,
                        callbacks=callbacks, restart=restart, skip_bad_images=skip_bad_images)
    weights = _weights_for(recipe, spec.name, preset)
    verbose_checks = 1 if verbose == "auto" else verbose

    keras.utils.set_random_seed(seed)
    train_source, val_source, classes = _sources(data, val_dir, val_split)
    # The backup is checked before the images are read: a stale one fails in seconds.
    backup_dir = os.path.join(out, BACKUP_DIR)
    if restart and os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    config = run_config(spec, classes, recipe, weights)
    meta = read_backup(backup_dir, config)
    train_source, val_source, train_size, skipped = _readable(
        train_source, val_source, classes, data, val_dir, val_split, seed, skip_bad_images, verbose_checks)
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
                     classes=len(classes), name=spec.timm_name, version=spec.version,
                     layer_scale_init_value=None if spec.version == 2 else 1e-6, **recipe.model_kwargs(spec))
    model.compile(**recipe.compile_kwargs(steps))
    resumed_from = _resume(model, backup_dir, meta, verbose_checks) if meta else None

    history_path = os.path.join(out, "history.csv")
    # Order matters: the CSV row of an epoch is written before its backup, so a resumed run
    # that repeats the epoch finds the row and replaces it.
    fit_callbacks = [*recipe.callbacks(), HistoryCSV(history_path), EpochBackup(backup_dir, config), *callbacks]
    start = time.perf_counter()
    model.fit(train_ds, epochs=recipe.epochs, initial_epoch=resumed_from or 0, validation_data=val_ds,
              callbacks=fit_callbacks, verbose=verbose)
    seconds = time.perf_counter() - start
    # fit ends with the optimizer's finalize step: with EMA, the model now holds the EMA weights.
    loss, accuracy = model.evaluate(val_ds, verbose=0)

    model_path = os.path.join(out, "model.keras")
    save_model(model, model_path)
    files.write_text(os.path.join(out, "classes.json"), json.dumps(classes, indent=1))
    curves_path = os.path.join(out, "curves.png")
    plot_curves(history_path, curves_path)
    # Only now that the outputs are in place: a kill before this resumes and rewrites them.
    if os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    return {
        "accuracy": float(accuracy), "loss": float(loss), "seconds": seconds, "epochs": recipe.epochs,
        "resumed_from": resumed_from, "model": model_path, "history": history_path,
        "curves": curves_path, "classes": classes, "devices": devices, "recipe": recipe.name,
        "train_images": train_size, "batch_size": recipe.batch_size, "image_size": recipe.image_size,
        "skipped_images": [path for path, _ in skipped],
    }


def pretrain(data, out, variant, recipe, preset=None, seed=0, verbose="auto", distribute="auto", callbacks=(),
             restart=False, skip_bad_images=False):
    """FCMAE pre-training of a ConvNeXt V2 on the images under `data` (no labels), under `model.fit`.

    What `train` runs for a self-supervised recipe (`fcmae`); `variant` is a V2 `Variant` and `recipe`
    a resolved `Recipe`. Every image at any depth of `data` is used (folder names are ignored). Writes
    `out/encoder.keras` (the encoder: a builder's `weights=` fine-tunes it), `out/fcmae.keras`,
    `out/history.csv` and `out/curves.png`; resumes from `out/backup` as `train` does.

    Returns:
        A dict: the last epoch's loss, seconds, epochs, resumed_from, the output paths, the number of
        images, the skipped images.
    """
    from keras_convnext.fcmae import PATCH_SIZE, FCMAE
    from keras_convnext.model import ConvNeXtV2

    if variant.version != 2:
        v2 = ", ".join(name for name, v in VARIANTS.items() if v.version == 2)
        raise ValueError(f"FCMAE pre-trains ConvNeXt V2 (GRN) networks: {v2} or a V2 `Variant`. "
                         f"Received: variant={variant.name!r}")
    if recipe.image_size % PATCH_SIZE:
        raise ValueError(f"FCMAE masks {PATCH_SIZE} px patches: the image size must be a multiple of {PATCH_SIZE}. "
                         f"Received: image_size={recipe.image_size}")
    verbose_checks = 1 if verbose == "auto" else verbose
    keras.utils.set_random_seed(seed)
    paths = data_lib.image_files(data)
    backup_dir = os.path.join(out, BACKUP_DIR)
    if restart and os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    config = run_config(variant, [], recipe, preset)
    meta = read_backup(backup_dir, config)
    paths, _, skipped = data_lib.check_images(paths, [0] * len(paths), [os.fspath(data)], skip_bad_images,
                                              verbose_checks, data=data)
    if len(paths) < recipe.batch_size:
        raise ValueError(f"The data folder has {len(paths)} images, fewer than one batch. "
                         f"Received: batch_size={recipe.batch_size}")
    os.makedirs(out, exist_ok=True)
    devices = _data_parallel(recipe.batch_size, distribute)
    train_ds = data_lib.pretrain_dataset(paths, recipe, seed=seed)
    steps = len(paths) // recipe.batch_size

    encoder = ConvNeXtV2(variant.depths, variant.dims, include_top=False, weights=preset,
                         input_shape=(recipe.image_size,) * 2 + (3,), drop_path_rate=recipe.drop_path_for(variant),
                         name=variant.timm_name)
    model = FCMAE(encoder, mask_ratio=recipe.mask_ratio, seed=seed)
    model.compile(optimizer=recipe.optimizer(steps))
    resumed_from = _resume(model, backup_dir, meta, verbose_checks) if meta else None

    history_path = os.path.join(out, "history.csv")
    fit_callbacks = [HistoryCSV(history_path), EpochBackup(backup_dir, config), *callbacks]
    start = time.perf_counter()
    model.fit(train_ds, epochs=recipe.epochs, initial_epoch=resumed_from or 0, callbacks=fit_callbacks,
              verbose=verbose)
    seconds = time.perf_counter() - start

    encoder_path, fcmae_path = os.path.join(out, "encoder.keras"), os.path.join(out, "fcmae.keras")
    save_model(encoder, encoder_path)
    save_model(model, fcmae_path)
    curves_path = os.path.join(out, "curves.png")
    plot_curves(history_path, curves_path, metrics=("loss",))
    rows = read_history(history_path)
    if os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    return {
        "loss": float(rows[-1]["loss"]) if rows else None, "seconds": seconds, "epochs": recipe.epochs,
        "resumed_from": resumed_from, "encoder": encoder_path, "model": fcmae_path, "history": history_path,
        "curves": curves_path, "devices": devices, "recipe": recipe.name, "train_images": len(paths),
        "batch_size": recipe.batch_size, "image_size": recipe.image_size, "mask_ratio": recipe.mask_ratio,
        "skipped_images": [path for path, _ in skipped],
    }
