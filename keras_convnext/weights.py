"""Weights: reading checkpoint files, loading them into a model, converting, and the preset cache.

The jobs live in modules that depend one way: `checkpoints` reads a file into NumPy, `remap`
renames each ecosystem's layout to the official keys and the flat per-module form (pure, no
Keras), `assign` puts that form into a model's variables (names.py), `download` fetches files.
This module composes them: `read_weights`, `load_weights`, `convert` and `fetch_preset`.
The converters' names stay importable from here.
"""

import inspect
import json
import os
import warnings
import zipfile

import numpy as np

from keras_convnext import checkpoints, checks
from keras_convnext import download as download_lib
from keras_convnext import files, remap
from keras_convnext.backbone import ConvNeXtModel
from keras_convnext.layers import LN_EPS
from keras_convnext.assign import assign, read_model  # noqa: F401  (importable from here, as before the split)
from keras_convnext.checkpoints import CheckpointError
# Fetching and caching files is keras_convnext.download's job; its names stay importable here.
from keras_convnext.download import DownloadError, cache_dir, download, preset_cache_path  # noqa: F401
from keras_convnext.remap import (  # noqa: F401  (likewise)
    adapt_stem,
    architecture_of,
    detect_layout,
    keras_apps_to_flat,
    official_to_flat,
    stem_channels,
    to_official,
)
from keras_convnext.variants import VARIANTS

# The names these converters had before they returned the flat per-module form under its own name.
official_to_keras = official_to_flat
keras_apps_to_keras = keras_apps_to_flat


# --- reading any checkpoint file --------------------------------------------------------------

def read_weights(path):
    """Reads any supported checkpoint file -> ({flat module: {param: array}}, info dict).

    The flat form (remap.py) holds every tensor of the ConvNeXt or ConvNeXt V2 it describes
    (`architecture_of`; `info["version"]` is 1 or 2), each of its shape, so a model built from it
    is no larger than the file.

    The layers are None for a Keras `.weights.h5`, which names variables by position and so
    loads only through `model.load_weights` into the architecture it came from.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = ("a folder, not a checkpoint file" if os.path.isdir(path) else
                "not a regular file (a device or a pipe)" if os.path.exists(path) else "no such file")
        raise CheckpointError(f"{path}: {what}. Received: path={path!r}")
    fmt = checkpoints.sniff_format(path)
    info = {"format": fmt, "path": path}
    if fmt == "keras_weights_h5":
        return None, info
    if fmt == "keras":
        layers = _read_keras_file(path, info)
    elif fmt == "keras_h5_legacy":
        layers = remap.keras_apps_to_flat(checkpoints.load_keras_h5_legacy(path), path)
    else:
        raw = checkpoints.load_torch_zip(path) if fmt == "torch_zip" else checkpoints.load_safetensors(path)
        layers, info["layout"] = remap.torch_to_flat(checkpoints.state_dict_of(raw, path), path)
        if info["layout"] == "huggingface":
            # Transformers' final LayerNorm uses config.layer_norm_eps (1e-12 by default), not 1e-6.
            info["norm_epsilon"] = checkpoints.read_hf_config(path).get("layer_norm_eps", 1e-12)
    remap.check_complete(layers, path)
    info["version"] = remap.version_of(layers, path)
    return layers, info


def load_keras_model(path):
    """A `.keras` file as a Keras model, read only after the checks every checkpoint gets.

    Keras opens the file itself, so `sniff_format` first walks the HDF5 inside (no external
    links or storage, no bombs); whatever Keras then raises (a bad config.json is a KeyError or
    a TypeError) is a CheckpointError naming the file.
    """
    import keras

    # (ConvNeXtModel and its layers are registered with Keras: this module imports backbone, which imports layers.)

    path = os.fspath(path)
    fmt = checkpoints.sniff_format(path)
    if fmt != "keras":
        raise CheckpointError(f"{path}: a {fmt} file, not a .keras model.")
    with checkpoints.reading(path, "Keras model"):
        return keras.saving.load_model(path, compile=False)


def _read_keras_file(path, info):
    """The flat form of a `.keras` model built here; notes its head-norm epsilon."""
    source_model = load_keras_model(path)
    layers = read_model(source_model, path)
    if "norm" in layers:
        info["norm_epsilon"] = source_model.get_layer("norm").epsilon
    return layers


def load_weights(model, weights, preset=None, head_init_scale=1.0):
    """Loads `weights` (a preset or a file path) into a freshly built `model`."""
    if preset is not None:
        path = fetch_preset(preset)
    else:
        path = os.fspath(weights)
    layers, info = read_weights(path)
    if info["format"] == "keras_weights_h5":
        # Keras's own weights file names variables by position: it fits only the same architecture.
        try:
            model.load_weights(path)
        except Exception as e:
            raise CheckpointError(
                f"{path}: this .weights.h5 does not fit the model ({checks.reason(e)}). A .weights.h5 loads only "
                "into a model built with the same arguments; save a .keras file to load across "
                "configurations."
            ) from e
        # Keras loads whatever numbers the file holds: a NaN or an infinity is refused here, as in every other format.
        for variable in model.weights:
            if not np.isfinite(np.asarray(variable, dtype="float32")).all():
                raise CheckpointError(f"{path}: {variable.path} holds NaN or infinite values after loading: the file "
                                      "is damaged or was saved from a diverged run.")
        return
    notes = assign(model, layers, path, head_init_scale)
    if "norm_epsilon" in info and "norm" in {layer.name for layer in model.layers}:
        model.get_layer("norm").epsilon = model.norm_epsilon = float(info["norm_epsilon"])  # kept in its config
    for note in notes:
        warnings.warn(f"{os.path.basename(path)}: {note}.", stacklevel=3)


# --- converting, and the converted-preset cache -----------------------------------------------

def convert(src, dst, variant=None, overwrite=False):
    """Converts a checkpoint (file or preset name) to a Keras `.keras` or `.weights.h5` file.

    The architecture is read from the checkpoint; the output is written aside and renamed. A
    preset name converts the preset's cached file (`fetch_preset`), so its input size and
    preprocessing statistics come with it.
    """
    from keras_convnext import presets as presets_lib

    dst = os.fspath(dst)
    checks.boolean("overwrite", overwrite)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"Unknown variant. Valid values: {', '.join(VARIANTS)}. Received: variant={variant!r}")
    if not (dst.endswith(".keras") or dst.endswith(".weights.h5")):
        raise ValueError(f"The output must end in '.keras' or '.weights.h5'. Received: dst={dst!r}")
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"The output exists; pass overwrite=True (--overwrite) to replace it. Received: dst={dst!r}")
    preset = None
    if isinstance(src, str) and src in presets_lib.PRESETS:
        preset = presets_lib.PRESETS[src]
        src = fetch_preset(preset)
    elif not isinstance(src, (str, os.PathLike)) or not os.path.isfile(src):
        raise ValueError(f"No checkpoint file or preset of that name. Received: src={src!r}")
    return _convert_file(src, dst, variant, preset)


def _convert_file(src, dst, variant=None, preset=None):
    """Reads checkpoint `src`, builds the ConvNeXt it holds (`preset`'s size and statistics), writes `dst`.

    The one conversion of `convert` and `fetch_preset`; `dst` is written aside and renamed.
    """
    layers, info = read_weights(src)
    if layers is None:
        raise CheckpointError(
            f"{src}: a Keras .weights.h5 names its variables by position, not by layer, so it cannot "
            "be converted on its own: load it into the model it was saved from instead."
        )
    arch = architecture_of(layers, src)
    depths, dims, classes = arch
    if variant is not None and (VARIANTS[variant].depths, VARIANTS[variant].dims, VARIANTS[variant].version) != (
            depths, dims, arch.version):
        raise CheckpointError(
            f"{src}: the checkpoint holds a {arch.family} of depths {depths} and dims {dims}, not "
            f"{VARIANTS[variant].title} (variant {variant!r})."
        )
    channels = stem_channels(layers)
    size = preset.image_size if preset is not None else (224 if classes is not None else None)
    model = ConvNeXtModel(
        depths, dims, include_top=classes is not None, classes=classes or 1000, input_shape=(size, size, channels),
        mean=preset.mean if preset is not None else None, std=preset.std if preset is not None else None,
        norm_epsilon=float(info.get("norm_epsilon", LN_EPS)), version=arch.version,
        layer_scale_init_value=None if arch.version == 2 else 1e-6,
    )
    assign(model, layers, src)
    with files.atomic_path(dst) as tmp:
        if dst.endswith(".keras"):
            model.save(tmp)
        else:
            model.save_weights(tmp, overwrite=True)
    return dst


def fetch_preset(preset, progress=True, deadline=None, lock_timeout=None):
    """The preset's converted `.keras` file in the cache, downloading and converting it once.

    The cached file is returned only if it reads back (a zip holding `config.json` and
    `model.weights.h5`, every CRC right); one that does not is moved aside with a warning and
    made again. One written by an earlier keras_convnext whose model this version no longer
    builds from its config (`stale_cache_problem`) is removed with a warning and made again.
    `deadline` and `lock_timeout` are `download.download`'s.
    """
    final = preset_cache_path(preset)
    if download_lib.checkpoint_problem(final, "keras") is None and stale_cache_problem(final) is None:
        return final
    way_out = (f"Download {preset.url} yourself and pass weights='/path/to/{os.path.basename(preset.url)}', "
               f"or convert it with keras_convnext.convert to {final}.")
    with download_lib.file_lock(final, f"preparing preset {preset.name}", lock_timeout, way_out):
        download_lib.clean(cache_dir())
        if os.path.exists(final):
            problem = download_lib.checkpoint_problem(final, "keras")
            stale = stale_cache_problem(final) if problem is None else None
            if problem is None and stale is None:
                return final  # made by another process while this one waited
            if stale is None:
                download_lib.move_aside(final, problem, f"the converted preset {preset.name} at")
            else:
                # Derived data, not damage: nothing to keep aside.
                os.remove(final)
                warnings.warn(f"the converted preset {preset.name} at {final} was written by an earlier "
                              f"keras_convnext ({stale}): removed it and converting the preset again.", stacklevel=2)
        source = download_lib.download_preset(preset, progress, deadline, lock_timeout)
        try:
            _convert_file(source, final, variant=preset.variant, preset=preset)
        except CheckpointError as e:
            if preset.sha256 or preset.sha256_prefix:
                raise  # the published file itself: fetching it again would bring the same bytes
            # Nothing published to check it by: a file that verified but does not convert is a bad download.
            aside = download_lib.move_aside(source)
            raise CheckpointError(f"{e} Moved the download aside to {aside}: the next call fetches it again.") from e
        os.remove(source)  # the converted file loads without torch; keep the cache small
    return final


_MAX_CONFIG_BYTES = 1 << 20  # a ConvNeXtModel's config.json is under 1 kB
# What keras.Model's constructor takes besides the model's own arguments.
_MODEL_KEYWORDS = ("name", "trainable", "dtype")


def stale_cache_problem(path):
    """Why a readable cached `.keras` is not a model this version rebuilds from its config (None if it is).

    A converted preset is a `ConvNeXtModel`, whose config is its constructor's arguments; a file
    from an earlier structure holds something else (before the stage layers: a saved graph, with
    no `depths`), which `load_model` no longer takes. Read from `config.json` alone, without
    building the model. `path` has passed `download.checkpoint_problem` (every zip member read
    through its CRC, no bomb).
    """
    try:
        with zipfile.ZipFile(path) as archive, archive.open("config.json") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
        config = json.loads(raw) if len(raw) <= _MAX_CONFIG_BYTES else None
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as e:
        return f"its config.json does not read: {checks.reason(e)}"
    registered = config.get("registered_name") if isinstance(config, dict) else None
    if registered != "keras_convnext>ConvNeXtModel" or not isinstance(config.get("config"), dict):
        return f"its config.json is not a keras_convnext ConvNeXtModel's (registered name {registered!r})"
    args = config["config"]
    params = inspect.signature(ConvNeXtModel).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    missing = sorted(n for n in named if params[n].default is inspect.Parameter.empty and n not in args)
    unknown = sorted(set(args) - named - set(_MODEL_KEYWORDS))
    if missing or unknown:
        return ", ".join(filter(None, [missing and f"its config lacks {missing}",
                                       unknown and f"holds {unknown}, which the model does not take"]))
    return None
