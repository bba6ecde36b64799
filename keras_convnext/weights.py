"""Weights: layout conversion, strict assignment, download and the converted-preset cache.

Every source layout (official, timm, Hugging Face, keras.applications) is first renamed to the
official keys, then mapped mechanically onto Keras layer names (`model.keras_name`). Assignment
is strict: every source tensor consumed, every model variable assigned, shapes checked by name.
"""

import os
import re
import warnings

import numpy as np

from keras_convnext import checkpoints
from keras_convnext import download as download_lib
from keras_convnext import files
from keras_convnext.checkpoints import CheckpointError
# Fetching and caching files is keras_convnext.download's job; its names stay importable here.
from keras_convnext.download import DownloadError, cache_dir, download, preset_cache_path  # noqa: F401
from keras_convnext.model import keras_name
from keras_convnext.variants import VARIANTS


# --- source layouts -> official keys ----------------------------------------------------------

_TIMM_RULES = [
    (r"^stem\.(\d)\.", r"downsample_layers.0.\1."),
    (r"^stages\.(\d)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"stages.\1.\2.pwconv\3."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]
_HF_RULES = [
    (r"^embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
    (r"^embeddings\.layernorm\.", "downsample_layers.0.1."),
    (r"^encoder\.stages\.(\d)\.downsampling_layer\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layernorm\.", r"stages.\1.\2.norm."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.\2.gamma"),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.", r"stages.\1.\2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def _rename(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            new, n = re.subn(pattern, replacement, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def detect_layout(state):
    keys = list(state)
    if any(k.startswith("downsample_layers.") for k in keys):
        return "official"
    if any(k.startswith("stem.") for k in keys):
        return "timm"
    if any("embeddings.patch_embeddings" in k for k in keys):
        return "huggingface"
    return None


def to_official(state, path):
    """Any PyTorch-layout ConvNeXt state dict -> official keys (timm, Hugging Face or official)."""
    layout = detect_layout(state)
    if layout == "timm":
        state = _rename(state, _TIMM_RULES)
        # timm's small variants store fc1/fc2 as 1x1 convs, (out, in, 1, 1): the same matrix.
        state = {k: v[:, :, 0, 0] if "pwconv" in k and v.ndim == 4 else v for k, v in state.items()}
    elif layout == "huggingface":
        state = {k[len("convnext."):] if k.startswith("convnext.") else k: v for k, v in state.items()}
        state = _rename(state, _HF_RULES)
    elif layout is None:
        raise CheckpointError(
            f"{path}: not a ConvNeXt state dict (no stem or downsample_layers keys). "
            f"First keys: {list(state)[:5]}"
        )
    return state, layout


def official_to_keras(state, path):
    """Official keys (PyTorch layouts: OIHW convs, (out, in) linears) -> {layer: [arrays]}."""
    layers = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if param == "gamma" and re.fullmatch(r"stages\.\d\.\d+", module):
            layers.setdefault(keras_name(key), {})["gamma"] = value
            continue
        if param not in ("weight", "bias") or not module:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} {tuple(value.shape)} in the checkpoint.")
        if param == "weight":
            if value.ndim == 4 and module.endswith("dwconv"):
                value = value.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
            elif value.ndim == 4:
                value = value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
            elif value.ndim == 2:
                value = value.T  # (out, in) -> (in, out)
        layers.setdefault(keras_name(module), {})[param] = value
    return layers


_KERAS_APPS_RULES = [
    (r"_stem_conv$", "downsample_layers.0.0"),
    (r"_stem_layernorm$", "downsample_layers.0.1"),
    (r"_downsampling_layernorm_(\d)$", lambda m: f"downsample_layers.{int(m[1]) + 1}.0"),
    (r"_downsampling_conv_(\d)$", lambda m: f"downsample_layers.{int(m[1]) + 1}.1"),
    (r"_stage_(\d)_block_(\d+)_depthwise_conv$", r"stages.\1.\2.dwconv"),
    (r"_stage_(\d)_block_(\d+)_layernorm$", r"stages.\1.\2.norm"),
    (r"_stage_(\d)_block_(\d+)_pointwise_conv_(\d)$", r"stages.\1.\2.pwconv\3"),
    (r"_stage_(\d)_block_(\d+)_layer_scale$", r"stages.\1.\2"),
    (r"_head_layernorm$", "norm"),
    (r"_head_dense$", "head"),
]
_KERAS_PARAMS = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def keras_apps_to_keras(tensors, path):
    """keras.applications `.h5` tensors (already channels-last) -> {layer: {param: array}}."""
    layers = {}
    for name, value in tensors.items():
        layer, _, param = name.rpartition("/")
        layer = layer.rpartition("/")[2]
        if layer.endswith("_prestem_normalization"):
            continue  # the ImageNet mean/variance: our ConvNeXtPreprocessing holds them as constants
        for pattern, replacement in _KERAS_APPS_RULES:
            match = re.search(pattern, layer)
            if match:
                module = match.expand(replacement) if isinstance(replacement, str) else replacement(match)
                break
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} {tuple(value.shape)} in the checkpoint.")
        if module.endswith("dwconv") and param == "kernel":
            value = value.transpose(0, 1, 3, 2)  # grouped Conv2D (7, 7, 1, C) -> depthwise (7, 7, C, 1)
        if re.fullmatch(r"stages\.\d\.\d+", module):
            module, param = f"{module}.gamma", "gamma"
        else:
            param = _KERAS_PARAMS.get(param, param)
        layers.setdefault(keras_name(module), {})[param] = value
    return layers


# Each Keras layer type's variables, in `layer.weights` order, by their PyTorch parameter names
# (subclasses, e.g. PointwiseDense and LayerNorm, have their parent's).
_PARAM_ORDER = {
    "Conv2D": ("weight", "bias"), "DepthwiseConv": ("weight", "bias"), "Dense": ("weight", "bias"),
    "LayerNormalization": ("weight", "bias"), "LayerScale": ("gamma",),
}


def _param_order(layer):
    return next((_PARAM_ORDER[c.__name__] for c in type(layer).__mro__ if c.__name__ in _PARAM_ORDER), None)


def read_weights(path):
    """Reads any supported checkpoint file -> ({layer: {param: array}}, info dict).

    The layers are None for a Keras `.weights.h5`, which names variables by position and so
    loads only through `model.load_weights` into the architecture it came from.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "a folder, not a checkpoint file" if os.path.isdir(path) else "no such file"
        raise CheckpointError(f"{path}: {what}. Received: path={path!r}")
    fmt = checkpoints.sniff_format(path)
    info = {"format": fmt, "path": path}
    if fmt == "keras_weights_h5":
        return None, info
    if fmt == "keras":
        return _read_keras_file(path, info), info
    if fmt == "keras_h5_legacy":
        return keras_apps_to_keras(checkpoints.load_keras_h5_legacy(path), path), info
    raw = checkpoints.load_torch_zip(path) if fmt == "torch_zip" else checkpoints.load_safetensors(path)
    state, info["layout"] = to_official(checkpoints.state_dict_of(raw, path), path)
    if info["layout"] == "huggingface":
        # Transformers' final LayerNorm uses config.layer_norm_eps (1e-12 by default), not 1e-6.
        info["norm_epsilon"] = checkpoints.read_hf_config(path).get("layer_norm_eps", 1e-12)
    return official_to_keras(state, path), info


def architecture_of(layers):
    """(depths, dims, classes or None) of a converted checkpoint."""
    depths = [0, 0, 0, 0]
    for name in layers:
        m = re.fullmatch(r"stages_(\d)_(\d+)_dwconv", name)
        if m and int(m[1]) < 4:
            depths[int(m[1])] = max(depths[int(m[1])], int(m[2]) + 1)
    dims = []
    for stage in range(4):
        conv = layers.get(keras_name(f"downsample_layers.{stage}.{0 if stage == 0 else 1}"), {})
        dims.append(conv["weight"].shape[-1] if "weight" in conv else 0)
    head = layers.get("head", {})
    classes = head["weight"].shape[-1] if "weight" in head else None
    return tuple(depths), tuple(dims), classes


def _keras_state(model):
    """{layer: {param: variable}} of a model built here, by PyTorch parameter names."""
    out = {}
    for layer in model.layers:
        order = _param_order(layer)
        if order and layer.weights:
            out[layer.name] = dict(zip(order, layer.weights))
    return out


def assign(model, layers, source, head_init_scale=1.0):
    """Assigns converted tensors to `model`, strictly; returns a list of notes for the user."""
    target = _keras_state(model)
    notes = []
    # Without its top the model has no head (and, with pooling=None, no head norm) to fill.
    unused = {"head", "norm"} - set(target)
    depths, dims, classes = architecture_of(layers)
    model_head = target.get("head", {}).get("weight")
    if model_head is not None and classes is not None and model_head.shape[-1] != classes:
        unused.add("head")
        target.pop("head")
        notes.append(
            f"the checkpoint's head has {classes} classes and the model {model_head.shape[-1]}: "
            f"loaded the backbone and started a fresh head (head_init_scale={head_init_scale})"
        )
    want_depths = tuple(sum(1 for n in target if re.fullmatch(rf"stages_{s}_\d+_dwconv", n)) for s in range(4))
    want_dims = tuple(target[keras_name(f"downsample_layers.{s}.{0 if s == 0 else 1}")]["weight"].shape[-1]
                      for s in range(4))
    if (depths, dims) != (want_depths, want_dims):
        raise CheckpointError(
            f"{source}: the checkpoint holds a ConvNeXt with depths {depths} and dims {dims}, the "
            f"model has depths {want_depths} and dims {want_dims}: pick the matching variant "
            f"({_variant_name(depths, dims)})."
        )
    for name, params in layers.items():
        if name in unused:
            continue
        if name not in target:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} ({sorted(params)}) has no place in the model.")
        for param, value in params.items():
            if param not in target[name]:
                raise CheckpointError(f"{source}: unexpected tensor '{name}.{param}' has no place in the model.")
    assignments = []
    for name, variables in target.items():
        for param, variable in variables.items():
            value = layers.get(name, {}).get(param)
            if value is None:
                raise CheckpointError(f"{source}: missing tensor '{name}.{param}' (model shape {tuple(variable.shape)}).")
            if tuple(value.shape) != tuple(variable.shape):
                raise CheckpointError(
                    f"{source}: tensor '{name}.{param}' has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(variable.shape)}."
                )
            assignments.append((variable, value))
    for variable, value in assignments:
        variable.assign(np.asarray(value, dtype=variable.dtype))
    return notes


def _variant_name(depths, dims):
    for v in VARIANTS.values():
        if (v.depths, v.dims) == (tuple(depths), tuple(dims)):
            return f"ConvNeXt{v.name.capitalize() if v.name != 'xlarge' else 'XLarge'}"
    return "ConvNeXt(depths, dims) with these values"


def _read_keras_file(path, info):
    """{layer: {param: array}} of a `.keras` model built here; notes its head-norm epsilon."""
    import keras

    source_model = keras.saving.load_model(path, compile=False)
    layers = {}
    for name, variables in _keras_state(source_model).items():
        layers[name] = {param: np.asarray(v) for param, v in variables.items()}
    if "norm" in layers:
        info["norm_epsilon"] = source_model.get_layer("norm").epsilon
    return layers


def load_weights(model, weights, preset=None, include_top=True, classes=1000, head_init_scale=1.0):
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
                f"{path}: this .weights.h5 does not fit the model ({e}). A .weights.h5 loads only "
                "into a model built with the same arguments; save a .keras file to load across "
                "configurations."
            ) from e
        return
    notes = assign(model, layers, path, head_init_scale)
    if "norm_epsilon" in info and "norm" in {layer.name for layer in model.layers}:
        model.get_layer("norm").epsilon = float(info["norm_epsilon"])
    for note in notes:
        warnings.warn(f"{os.path.basename(path)}: {note}.", stacklevel=3)


# --- the converted-preset cache ---------------------------------------------------------------

def fetch_preset(preset, progress=True, deadline=None, lock_timeout=None):
    """The preset's converted `.keras` file in the cache, downloading and converting it once.

    The cached file is returned only if it reads back (a zip holding `config.json` and
    `model.weights.h5`, every CRC right); one that does not is moved aside with a warning and
    made again. `deadline` and `lock_timeout` are `download.download`'s.
    """
    final = preset_cache_path(preset)
    if download_lib.checkpoint_problem(final, "keras") is None:
        return final
    way_out = (f"Download {preset.url} yourself and pass weights='/path/to/{os.path.basename(preset.url)}', "
               f"or convert it with keras_convnext.convert to {final}.")
    with download_lib.file_lock(final, f"preparing preset {preset.name}", lock_timeout, way_out):
        download_lib.clean(cache_dir())
        if os.path.exists(final):
            problem = download_lib.checkpoint_problem(final, "keras")
            if problem is None:
                return final  # made by another process while this one waited
            download_lib.move_aside(final, problem, f"the converted preset {preset.name} at")
        source = download_lib.download_preset(preset, progress, deadline, lock_timeout)
        convert(source, final, variant=preset.variant, preset=preset)
        os.remove(source)  # the converted file loads without torch; keep the cache small
    return final


def convert(src, dst, variant=None, preset=None, overwrite=False):
    """Converts a checkpoint (file or preset name) to a Keras `.keras` or `.weights.h5` file.

    The architecture is read from the checkpoint; the output is written aside and renamed.
    """
    from keras_convnext import model as model_lib
    from keras_convnext import presets as presets_lib

    dst = os.fspath(dst)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"Unknown variant. Valid values: {', '.join(VARIANTS)}. Received: variant={variant!r}")
    if not (dst.endswith(".keras") or dst.endswith(".weights.h5")):
        raise ValueError(f"The output must end in '.keras' or '.weights.h5'. Received: dst={dst!r}")
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"The output exists; pass overwrite=True (--overwrite) to replace it. Received: dst={dst!r}")
    if isinstance(src, str) and src in presets_lib.PRESETS:
        preset = presets_lib.PRESETS[src]
        src = fetch_preset(preset)
    elif not isinstance(src, (str, os.PathLike)) or not os.path.isfile(src):
        raise ValueError(f"No checkpoint file or preset of that name. Received: src={src!r}")
    layers, info = read_weights(src)
    if layers is None:
        raise CheckpointError(
            f"{src}: a Keras .weights.h5 names its variables by position, not by layer, so it cannot "
            "be converted on its own: load it into the model it was saved from instead."
        )
    depths, dims, classes = architecture_of(layers)
    if variant is not None and (VARIANTS[variant].depths, VARIANTS[variant].dims) != (depths, dims):
        raise CheckpointError(
            f"{src}: the checkpoint holds depths {depths} and dims {dims}, not ConvNeXt-{variant}."
        )
    kwargs = {}
    if preset is not None:
        kwargs["input_shape"] = (preset.image_size, preset.image_size, 3)
    model = model_lib.ConvNeXt(depths, dims, weights=None, include_top=classes is not None,
                               classes=classes or 1000, drop_path_rate=0.0, **kwargs)
    assign(model, layers, src)
    if "norm_epsilon" in info and classes is not None:
        model.get_layer("norm").epsilon = float(info["norm_epsilon"])
    with files.atomic_path(dst) as tmp:
        if dst.endswith(".keras"):
            model.save(tmp)
        else:
            model.save_weights(tmp, overwrite=True)
    return dst
