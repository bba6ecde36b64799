"""Weights: layout conversion, strict assignment, download and the converted-preset cache.

Every source layout (official, timm, Hugging Face, keras.applications) is first renamed to the
official keys, then mapped mechanically onto Keras layer names (`model.keras_name`). Assignment
is strict: every source tensor consumed, every model variable assigned, shapes checked by name.
"""

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings

import numpy as np

from keras_convnext import checkpoints
from keras_convnext.checkpoints import CheckpointError
from keras_convnext.model import keras_name
from keras_convnext.variants import VARIANTS


class DownloadError(OSError):
    """A checkpoint could not be fetched or did not verify."""


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


# --- download and cache ----------------------------------------------------------------------

def cache_dir():
    """`$KERAS_HOME/keras_convnext` (default `~/.keras/keras_convnext`), as Keras caches files."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "keras_convnext")


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive lock between processes (POSIX); elsewhere the atomic rename still protects."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, dest, sha256=None, sha256_prefix=None, progress=True):
    """Fetches `url` to `dest`: written aside, verified, then renamed; returns `dest`.

    Hand-written rather than `keras.utils.get_file`, which writes in place (a crash or a second
    process sees a partial file) and names neither the URL nor the way out in its errors.
    """
    import keras

    by_hand = (
        f"Download it yourself and pass weights='/path/to/{os.path.basename(dest)}', or place it "
        f"at {dest}."
    )
    with _file_lock(dest):
        if os.path.exists(dest):
            return dest  # only complete, verified files are ever renamed into place
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".download-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    response = urllib.request.urlopen(url, timeout=60)
                except urllib.error.HTTPError as e:
                    raise DownloadError(f"Fetching {url} failed: HTTP {e.code} {e.reason}. {by_hand}") from e
                except (urllib.error.URLError, OSError) as e:
                    reason = getattr(e, "reason", e)
                    raise DownloadError(f"Cannot reach {url} ({reason}). {by_hand}") from e
                with response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    bar = keras.utils.Progbar(total, unit_name="B") if progress else None
                    received = 0
                    try:
                        for chunk in iter(lambda: response.read(1 << 20), b""):
                            out.write(chunk)
                            received += len(chunk)
                            if bar:
                                bar.update(received)
                    except OSError as e:  # includes http.client.IncompleteRead
                        raise DownloadError(f"The download of {url} broke off after {received} bytes ({e}). {by_hand}") from e
            if total is not None and received != total:
                raise DownloadError(
                    f"The download of {url} is truncated: {received} of {total} bytes. {by_hand}"
                )
            if sha256 or sha256_prefix:
                digest = _sha256(tmp)
                expected = sha256 or sha256_prefix
                if not digest.startswith(expected):
                    raise DownloadError(
                        f"The file from {url} fails its sha256 check: expected {expected}"
                        f"{'...' if not sha256 else ''}, got {digest}. {by_hand}"
                    )
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return dest


def preset_cache_path(preset):
    return os.path.join(cache_dir(), f"{preset.name}.keras")


def fetch_preset(preset, progress=True):
    """The preset's converted `.keras` file in the cache, downloading and converting it once."""
    final = preset_cache_path(preset)
    if os.path.exists(final):
        return final
    with _file_lock(final):
        if os.path.exists(final):
            return final
        source = os.path.join(cache_dir(), "downloads", os.path.basename(preset.url.split("?")[0]))
        if preset.format == "timm" and preset.url.endswith("model.safetensors"):
            source = os.path.join(cache_dir(), "downloads", f"{preset.name}.safetensors")
        download(preset.url, source, preset.sha256, preset.sha256_prefix, progress)
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
    if not (dst.endswith(".keras") or dst.endswith(".weights.h5")):
        raise ValueError(f"The output must end in '.keras' or '.weights.h5'. Received: dst={dst!r}")
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"The output exists; pass overwrite=True (--overwrite) to replace it. Received: dst={dst!r}")
    if isinstance(src, str) and src in presets_lib.PRESETS:
        preset = presets_lib.PRESETS[src]
        src = fetch_preset(preset)
    elif not os.path.isfile(src):
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
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    suffix = ".keras" if dst.endswith(".keras") else ".weights.h5"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dst)), prefix=".convert-", suffix=suffix)
    os.close(fd)
    try:
        if suffix == ".keras":
            model.save(tmp)
        else:
            model.save_weights(tmp, overwrite=True)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst
