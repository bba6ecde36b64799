"""Weights: layout conversion, strict assignment, download and the converted-preset cache.

Every source layout (official, timm, Hugging Face, keras.applications) is first renamed to the
official keys, then mapped mechanically onto the model's variables (names.py). Assignment
is strict: every source tensor consumed, every model variable assigned, shapes checked by name.
"""

import os
import re
import warnings

import numpy as np

from keras_convnext import checkpoints, checks
from keras_convnext import download as download_lib
from keras_convnext import files
from keras_convnext.checkpoints import CheckpointError
# Fetching and caching files is keras_convnext.download's job; its names stay importable here.
from keras_convnext.download import DownloadError, cache_dir, download, preset_cache_path  # noqa: F401
from keras_convnext.names import keras_name, variables_by_module
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

# Each layout's renaming to official keys: (rules, the first of which matching applies; a prefix dropped first).
_LAYOUT_RULES = {"official": ((), None), "timm": (_TIMM_RULES, None), "huggingface": (_HF_RULES, "convnext.")}


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
    """Any PyTorch-layout ConvNeXt state dict -> (official keys -> arrays, layout).

    Two source keys that rename to one official key are refused, naming both.
    """
    state, layout, _ = _to_official(state, path)
    return state, layout


def _to_official(state, path):
    """`to_official`, and {official key: the source key it came from} for errors naming the file's keys."""
    layout = detect_layout(state)
    if layout is None:
        raise CheckpointError(
            f"{path}: not a ConvNeXt state dict (no stem or downsample_layers keys). "
            f"First keys: {list(state)[:5]}"
        )
    rules, prefix = _LAYOUT_RULES[layout]
    renamed = checkpoints.OnceEach(path)
    for key, value in state.items():
        new = key[len(prefix):] if prefix and key.startswith(prefix) else key
        for pattern, replacement in rules:
            new, n = re.subn(pattern, replacement, new)
            if n:
                break
        if layout == "timm" and "pwconv" in new and value.ndim == 4:
            # timm's small variants store fc1/fc2 as 1x1 convs, (out, in, 1, 1): the same matrix.
            if value.shape[2:] != (1, 1):
                raise CheckpointError(f"{path}: tensor {checkpoints.quote(key)} has shape {value.shape}; a timm "
                                      "pointwise conv is (out, in, 1, 1).")
            value = value[:, :, 0, 0]
        renamed.put(new, value, key)
    return renamed.values, layout, renamed.sources


# The rank of each variable of each ConvNeXt layer, by Keras layer name (the same in every layout).
_RANKS = (
    (r"downsample_layers_0_0|downsample_layers_[1-3]_1|stages_\d_\d+_dwconv", {"weight": 4, "bias": 1}),
    (r"stages_\d_\d+_pwconv[12]|head", {"weight": 2, "bias": 1}),
    (r"downsample_layers_0_1|downsample_layers_[1-3]_0|stages_\d_\d+_norm|norm", {"weight": 1, "bias": 1}),
    (r"stages_\d_\d+_gamma", {"gamma": 1}),
)


class _Slots:
    """{layer: {param: array}} filled from a checkpoint: each slot by one source tensor, of the rank it holds.

    The rank is checked before any transpose or index, so a crafted tensor is a named error, not an
    IndexError; a slot filled twice is refused, naming both source keys.
    """

    def __init__(self, path):
        self.path, self.layers, self.filled = path, {}, checkpoints.OnceEach(path)

    def put(self, layer, param, source, value, layout=None):
        rank = next((ranks.get(param) for pattern, ranks in _RANKS if re.fullmatch(pattern, layer)), None)
        if rank is not None and value.ndim != rank:
            raise CheckpointError(f"{self.path}: tensor {checkpoints.quote(source)} has shape {tuple(value.shape)}; "
                                  f"'{layer}.{param}' holds a {rank}-D tensor.")
        self.filled.put(f"{layer}.{param}", None, source)
        self.layers.setdefault(layer, {})[param] = value if layout is None else layout(value)


def _dwconv_layout(value):
    return value.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)


def _conv_layout(value):
    return value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)


def _dense_layout(value):
    return value.T  # (out, in) -> (in, out)


def official_to_keras(state, path, sources=None):
    """Official keys (PyTorch layouts: OIHW convs, (out, in) linears) -> {layer: {param: array}}.

    `sources` maps an official key to the file's own key, for errors (default: the same key).
    """
    slots = _Slots(path)
    for key, value in state.items():
        source = (sources or {}).get(key, key)
        module, _, param = key.rpartition(".")
        if param == "gamma" and re.fullmatch(r"stages\.\d\.\d+", module):
            slots.put(keras_name(key), "gamma", source, value)
            continue
        if param not in ("weight", "bias") or not module:
            raise CheckpointError(f"{path}: unexpected tensor {checkpoints.quote(source)} {tuple(value.shape)} "
                                  "in the checkpoint.")
        layout = None
        if param == "weight" and value.ndim == 4:
            layout = _dwconv_layout if module.endswith("dwconv") else _conv_layout
        elif param == "weight" and value.ndim == 2:
            layout = _dense_layout
        slots.put(keras_name(module), param, source, value, layout)
    return slots.layers


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
    slots = _Slots(path)
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
            raise CheckpointError(f"{path}: unexpected tensor {checkpoints.quote(name)} {tuple(value.shape)} "
                                  "in the checkpoint.")
        layout = None
        if module.endswith("dwconv") and param == "kernel" and value.ndim == 4:
            layout = _grouped_to_depthwise
        if re.fullmatch(r"stages\.\d\.\d+", module):
            module, param = f"{module}.gamma", "gamma"
        else:
            param = _KERAS_PARAMS.get(param, param)
        slots.put(keras_name(module), param, name, value, layout)
    return slots.layers


def _grouped_to_depthwise(value):
    return value.transpose(0, 1, 3, 2)  # grouped Conv2D (7, 7, 1, C) -> depthwise (7, 7, C, 1)


def read_weights(path):
    """Reads any supported checkpoint file -> ({layer: {param: array}}, info dict).

    The layers hold every tensor of the ConvNeXt they describe (`architecture_of`), each of its
    shape, so a model built from them is no larger than the file.

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
        layers = keras_apps_to_keras(checkpoints.load_keras_h5_legacy(path), path)
    else:
        layers = _read_torch_file(path, fmt, info)
    _check_complete(layers, path)
    return layers, info


def _read_torch_file(path, fmt, info):
    """{layer: {param: array}} of a PyTorch-layout checkpoint (.pth, .bin, .safetensors)."""
    raw = checkpoints.load_torch_zip(path) if fmt == "torch_zip" else checkpoints.load_safetensors(path)
    state, info["layout"], sources = _to_official(checkpoints.state_dict_of(raw, path), path)
    if info["layout"] == "huggingface":
        # Transformers' final LayerNorm uses config.layer_norm_eps (1e-12 by default), not 1e-6.
        info["norm_epsilon"] = checkpoints.read_hf_config(path).get("layer_norm_eps", 1e-12)
    return official_to_keras(state, path, sources)


def _check_complete(layers, path):
    """Refuses a checkpoint that lacks a tensor of the ConvNeXt it describes, or holds one of another shape.

    Checked before any model is built from `architecture_of`: the architecture comes from the
    file, and a few zero-size tensors or one block index of 99999999 would otherwise ask for a
    model of any size.
    """
    for stage in range(4):
        blocks = {int(m[1]) for name in layers if (m := re.fullmatch(rf"stages_{stage}_(\d{{1,6}})_dwconv", name))}
        gap = min(set(range(len(blocks))) - blocks, default=None)
        if gap is not None:
            raise CheckpointError(f"{path}: missing tensor 'stages_{stage}_{gap}_dwconv.weight' (stage {stage} "
                                  f"has block {max(blocks)}).")
    depths, dims, classes = architecture_of(layers)
    stem = layers.get("downsample_layers_0_0", {}).get("weight")
    channels = stem.shape[2] if stem is not None else 3  # (a missing stem is named below)
    for (layer, param), shape in _shapes(depths, dims, classes, with_norm="norm" in layers, channels=channels).items():
        value = layers.get(layer, {}).get(param)
        if value is None:
            raise CheckpointError(f"{path}: missing tensor '{layer}.{param}' (shape {shape} in the ConvNeXt of "
                                  f"depths {depths} and dims {dims} it holds).")
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{path}: tensor '{layer}.{param}' has shape {tuple(value.shape)}, the ConvNeXt "
                                  f"of depths {depths} and dims {dims} it holds expects {shape}.")


def _shapes(depths, dims, classes, with_norm=False, channels=3):
    """{(layer, param): shape} of every variable of a ConvNeXt (no top: `classes` None), Keras layouts."""
    out = {}

    def put(layer, **shapes):
        out.update({(layer, param): shape for param, shape in shapes.items()})

    put("downsample_layers_0_0", weight=(4, 4, channels, dims[0]), bias=(dims[0],))  # the 4x4 stride-4 stem
    put("downsample_layers_0_1", weight=(dims[0],), bias=(dims[0],))
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        if stage:
            before = dims[stage - 1]
            put(f"downsample_layers_{stage}_0", weight=(before,), bias=(before,))
            put(f"downsample_layers_{stage}_1", weight=(2, 2, before, dim), bias=(dim,))
        for block in range(depth):
            prefix = f"stages_{stage}_{block}"
            put(f"{prefix}_dwconv", weight=(7, 7, dim, 1), bias=(dim,))
            put(f"{prefix}_norm", weight=(dim,), bias=(dim,))
            put(f"{prefix}_pwconv1", weight=(dim, 4 * dim), bias=(4 * dim,))
            put(f"{prefix}_pwconv2", weight=(4 * dim, dim), bias=(dim,))
            put(f"{prefix}_gamma", gamma=(dim,))
    if classes is not None or with_norm:
        put("norm", weight=(dims[3],), bias=(dims[3],))
    if classes is not None:
        put("head", weight=(dims[3], classes), bias=(classes,))
    return out


def architecture_of(layers):
    """(depths, dims, classes or None) of a converted checkpoint."""
    depths = [0, 0, 0, 0]
    for name in layers:
        m = re.fullmatch(r"stages_(\d)_(\d{1,6})_dwconv", name)
        if m and int(m[1]) < 4:
            depths[int(m[1])] = max(depths[int(m[1])], int(m[2]) + 1)
    dims = []
    for stage in range(4):
        conv = layers.get(keras_name(f"downsample_layers.{stage}.{0 if stage == 0 else 1}"), {})
        dims.append(conv["weight"].shape[-1] if "weight" in conv else 0)
    head = layers.get("head", {})
    classes = head["weight"].shape[-1] if "weight" in head else None
    return tuple(depths), tuple(dims), classes


def stem_channels(layers):
    """The input channels of a converted checkpoint's stem (3 for every published one)."""
    return layers["downsample_layers_0_0"]["weight"].shape[2]


def adapt_stem(kernel, channels):
    """A (kh, kw, 3, C) stem kernel for `channels` input channels, by timm's rule (`adapt_input_conv`).

    One channel: the sum over R, G, B (a grey image gives the response of the same grey RGB image);
    N channels: R, G, B repeated and cut to N, scaled by 3 / N so that the response keeps its size.
    """
    have = kernel.shape[2]
    if channels == have:
        return kernel
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeats = -(-channels // have)
    return np.concatenate([kernel] * repeats, axis=2)[:, :, :channels] * (have / channels)


def assign(model, layers, source, head_init_scale=1.0):
    """Assigns converted tensors to `model`, strictly; returns a list of notes for the user."""
    target = variables_by_module(model)
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
    stem = target["downsample_layers_0_0"]["weight"]
    have = stem_channels(layers)
    if stem.shape[2] != have:
        notes.append(f"adapted the checkpoint's {have}-channel stem to the model's {stem.shape[2]} input channels "
                     f"(timm's rule: summed for 1, repeated and scaled by {have} / N for N)")
        layers = {**layers, "downsample_layers_0_0": {**layers["downsample_layers_0_0"], "weight": adapt_stem(
            np.asarray(layers["downsample_layers_0_0"]["weight"], dtype="float32"), stem.shape[2])}}
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


def load_keras_model(path):
    """A `.keras` file as a Keras model, read only after the checks every checkpoint gets.

    Keras opens the file itself, so `sniff_format` first walks the HDF5 inside (no external
    links or storage, no bombs); whatever Keras then raises (a bad config.json is a KeyError or
    a TypeError) is a CheckpointError naming the file.
    """
    import keras

    path = os.fspath(path)
    fmt = checkpoints.sniff_format(path)
    if fmt != "keras":
        raise CheckpointError(f"{path}: a {fmt} file, not a .keras model.")
    with checkpoints.reading(path, "Keras model"):
        return keras.saving.load_model(path, compile=False)


def _read_keras_file(path, info):
    """{layer: {param: array}} of a `.keras` model built here; notes its head-norm epsilon."""
    source_model = load_keras_model(path)
    slots = _Slots(path)
    for name, variables in variables_by_module(source_model).items():
        for param, variable in variables.items():
            slots.put(name, param, f"{name}.{param}", np.asarray(variable))
    if "norm" in slots.layers:
        info["norm_epsilon"] = source_model.get_layer("norm").epsilon
    return slots.layers


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
        try:
            convert(source, final, variant=preset.variant, preset=preset)
        except CheckpointError as e:
            if preset.sha256 or preset.sha256_prefix:
                raise  # the published file itself: fetching it again would bring the same bytes
            # Nothing published to check it by: a file that verified but does not convert is a bad download.
            aside = download_lib.move_aside(source)
            raise CheckpointError(f"{e} Moved the download aside to {aside}: the next call fetches it again.") from e
        os.remove(source)  # the converted file loads without torch; keep the cache small
    return final


def convert(src, dst, variant=None, preset=None, overwrite=False):
    """Converts a checkpoint (file or preset name) to a Keras `.keras` or `.weights.h5` file.

    The architecture is read from the checkpoint; the output is written aside and renamed.
    """
    from keras_convnext import model as model_lib
    from keras_convnext import presets as presets_lib

    dst = os.fspath(dst)
    checks.boolean("overwrite", overwrite)
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
    if preset is not None or stem_channels(layers) != 3:
        size = preset.image_size if preset is not None else (224 if classes is not None else None)
        kwargs["input_shape"] = (size, size, stem_channels(layers))
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
