"""Checkpoint layouts -> official keys -> the flat per-module form: pure, table-driven, NumPy only.

Every ecosystem's layout is a table of renamings onto the official keys (facebookresearch/ConvNeXt's
`state_dict` names, CONVNEXT.md "Checkpoint key layouts"; ConvNeXt V2's add `stages.i.j.grn.gamma|beta`
in place of the layer scale `stages.i.j.gamma`); every official module is of one kind,
which says the rank of each of its parameters and how PyTorch's layout becomes Keras's. The result
is the flat form `{flat module name: {param: array}}` (`stages_2_5_pwconv1: {"weight", "bias"}`),
the form `names.variables_by_module` gives of a model, so assigning it (assign.py) is a lookup.

Nothing here imports Keras: converting a checkpoint needs neither a model nor a backend.
"""

import dataclasses
import re

import numpy as np

from keras_convnext import checkpoints
from keras_convnext.checkpoints import CheckpointError
from keras_convnext.names import keras_name


# --- source layouts -> official keys ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """A PyTorch-layout ConvNeXt state dict: how to recognise it and rename it to official keys.

    `marker` is searched in the keys (the first layout one key matches is the file's); the first of
    `prefixes` a key starts with is dropped first; the first rule whose pattern matches renames it.
    One layout serves both families: a V2 file is told by its GRN tensors (`architecture_of`).
    `pointwise_conv`: fc1/fc2 may be 1x1 convs, (out, in, 1, 1), the same matrix as a Linear's.
    """

    marker: str
    rules: tuple = ()
    prefixes: tuple = ()
    pointwise_conv: bool = False


LAYOUTS = {
    "official": Layout(r"^downsample_layers\."),
    "timm": Layout(r"^stem\.", (
        (r"^stem\.(\d)\.", r"downsample_layers.0.\1."),
        (r"^stages\.(\d)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.weight$", r"stages.\1.\2.grn.gamma"),  # V2: (C,)
        (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.bias$", r"stages.\1.\2.grn.beta"),
        (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"stages.\1.\2.pwconv\3."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2."),
        (r"^head\.norm\.", "norm."),
        (r"^head\.fc\.", "head."),
    ), pointwise_conv=True),  # timm builds atto..nano with conv_mlp=True
    "huggingface": Layout(r"embeddings\.patch_embeddings", (
        (r"^embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
        (r"^embeddings\.layernorm\.", "downsample_layers.0.1."),
        (r"^encoder\.stages\.(\d)\.downsampling_layer\.(\d)\.", r"downsample_layers.\1.\2."),
        (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layernorm\.", r"stages.\1.\2.norm."),
        (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.\2.gamma"),
        (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.grn\.weight$", r"stages.\1.\2.grn.gamma"),  # V2: (1, 1, 1, C)
        (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.grn\.bias$", r"stages.\1.\2.grn.beta"),
        (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.", r"stages.\1.\2."),
        (r"^layernorm\.", "norm."),
        (r"^classifier\.", "head."),
    ), prefixes=("convnextv2.", "convnext.")),  # ConvNextV2Model / ConvNextModel; a bare backbone has none
}


def detect_layout(state):
    """The name of the `LAYOUTS` entry a state dict's keys are in, or None."""
    for name, layout in LAYOUTS.items():
        if any(re.search(layout.marker, key) for key in state):
            return name
    return None


def rename_to_official(state, path):
    """A PyTorch-layout state dict -> (official keys -> arrays, layout, {official key: its source key}).

    The sources let later errors name the file's own keys. Two source keys that rename to one
    official key are refused, naming both.
    """
    name = detect_layout(state)
    if name is None:
        raise CheckpointError(
            f"{path}: not a ConvNeXt state dict (no stem or downsample_layers keys). "
            f"First keys: {list(state)[:5]}"
        )
    layout = LAYOUTS[name]
    renamed = checkpoints.OnceEach(path)
    for key, value in state.items():
        prefix = next((p for p in layout.prefixes if key.startswith(p)), "")
        new = key[len(prefix):]
        for pattern, replacement in layout.rules:
            new, n = re.subn(pattern, replacement, new)
            if n:
                break
        if layout.pointwise_conv and re.search(r"\.pwconv[12]\.weight$", new) and value.ndim == 4:
            if value.shape[2:] != (1, 1):
                raise CheckpointError(f"{path}: tensor {checkpoints.quote(key)} has shape {value.shape}; a timm "
                                      "pointwise conv is (out, in, 1, 1).")
            value = value[:, :, 0, 0]
        renamed.put(new, value, key)
    return renamed.values, name, renamed.sources


def to_official(state, path):
    """Any PyTorch-layout ConvNeXt state dict -> (official keys -> arrays, layout name)."""
    state, layout, _ = rename_to_official(state, path)
    return state, layout


# --- official keys -> the flat per-module form ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kind:
    """What an official module is: the rank of each parameter; PyTorch's weight -> Keras's (a transpose).

    `leading`: a parameter may also be stored with these leading axes of size 1 (the official and
    Hugging Face GRN's (1, 1, 1, C)), dropped on reading; any other shape is refused by name.
    """

    ranks: dict
    to_keras: tuple = None
    leading: tuple = ()


KINDS = {
    "conv": Kind({"weight": 4, "bias": 1}, (2, 3, 1, 0)),  # (O, I, kh, kw) -> (kh, kw, I, O)
    "dwconv": Kind({"weight": 4, "bias": 1}, (2, 3, 0, 1)),  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    "linear": Kind({"weight": 2, "bias": 1}, (1, 0)),  # (out, in) -> (in, out)
    "norm": Kind({"weight": 1, "bias": 1}),
    "scale": Kind({"gamma": 1}),  # the block's layer scale (V1)
    "grn": Kind({"gamma": 1, "beta": 1}, leading=(1, 1, 1)),  # V2's GRN: timm (C,), official and HF (1, 1, 1, C)
}

# Flat module name -> kind (the same in every layout: the stem is (conv, norm), later downsamplings (norm, conv)).
MODULES = (
    (r"downsample_layers_0_0|downsample_layers_[1-3]_1", "conv"),
    (r"stages_\d_\d+_dwconv", "dwconv"),
    (r"stages_\d_\d+_pwconv[12]|head", "linear"),
    (r"downsample_layers_0_1|downsample_layers_[1-3]_0|stages_\d_\d+_norm|norm", "norm"),
    (r"stages_\d_\d+_gamma", "scale"),
    (r"stages_\d_\d+_grn", "grn"),
)


def kind_of(name):
    """The `KINDS` entry of a flat module name, or None for a name outside the contract."""
    return next((KINDS[kind] for pattern, kind in MODULES if re.fullmatch(pattern, name)), None)


class Slots:
    """The flat form being filled: each slot by one source tensor, of the rank its module holds.

    The rank is checked before any transpose or index, so a crafted tensor is a named error, not an
    IndexError; a slot filled twice is refused, naming both source keys. `layers` is the result.
    """

    def __init__(self, path):
        self.path, self.layers, self.filled = path, {}, checkpoints.OnceEach(path)

    def put(self, name, param, source, value, transpose=None):
        kind = kind_of(name)
        rank = kind.ranks.get(param) if kind else None
        if rank is not None and kind.leading and value.ndim == rank + len(kind.leading) and (
                tuple(value.shape[:len(kind.leading)]) == kind.leading):
            value = value.reshape(value.shape[len(kind.leading):])  # (1, 1, 1, C) -> (C,): the same C numbers
        if rank is not None and value.ndim != rank:
            also = f" (or ({', '.join(map(str, kind.leading))}, C))" if kind.leading else ""
            raise CheckpointError(f"{self.path}: tensor {checkpoints.quote(source)} has shape {tuple(value.shape)}; "
                                  f"'{name}.{param}' holds a {rank}-D tensor{also}.")
        self.filled.put(f"{name}.{param}", None, source)
        self.layers.setdefault(name, {})[param] = value if transpose is None else value.transpose(transpose)


def official_to_flat(state, path, sources=None):
    """Official keys (PyTorch layouts: OIHW convs, (out, in) linears) -> {flat module: {param: array}}.

    `sources` maps an official key to the file's own key, for errors (default: the same key).
    """
    slots = Slots(path)
    for key, value in state.items():
        source = (sources or {}).get(key, key)
        module, _, param = key.rpartition(".")
        if param == "gamma" and re.fullmatch(r"stages\.\d\.\d+", module):
            slots.put(keras_name(key), "gamma", source, value)  # a block's layer scale: its own slot
            continue
        if param in ("gamma", "beta") and re.fullmatch(r"stages\.\d\.\d+\.grn", module):
            slots.put(keras_name(module), param, source, value)  # V2's GRN, official names
            continue
        if param not in ("weight", "bias") or not module:
            raise CheckpointError(f"{path}: unexpected tensor {checkpoints.quote(source)} {tuple(value.shape)} "
                                  "in the checkpoint.")
        name = keras_name(module)
        kind = kind_of(name)
        if kind is not None and param not in kind.ranks:  # a GRN's are gamma/beta (`stages.0.0.grn.weight`)
            raise CheckpointError(f"{path}: unexpected tensor {checkpoints.quote(source)} {tuple(value.shape)} "
                                  "in the checkpoint.")
        slots.put(name, param, source, value, kind.to_keras if kind and param == "weight" else None)
    return slots.layers


def torch_to_flat(state, path):
    """A PyTorch-layout state dict of any layout -> ({flat module: {param: array}}, layout name)."""
    official, layout, sources = rename_to_official(state, path)
    return official_to_flat(official, path, sources), layout


# keras.applications' layer names (its `.h5` files, already channels-last) -> official modules.
KERAS_APPS_RULES = (
    (r"_stem_conv$", "downsample_layers.0.0"),
    (r"_stem_layernorm$", "downsample_layers.0.1"),
    (r"_downsampling_layernorm_(\d)$", lambda m: f"downsample_layers.{int(m[1]) + 1}.0"),
    (r"_downsampling_conv_(\d)$", lambda m: f"downsample_layers.{int(m[1]) + 1}.1"),
    (r"_stage_(\d)_block_(\d+)_depthwise_conv$", r"stages.\1.\2.dwconv"),
    (r"_stage_(\d)_block_(\d+)_layernorm$", r"stages.\1.\2.norm"),
    (r"_stage_(\d)_block_(\d+)_pointwise_conv_(\d)$", r"stages.\1.\2.pwconv\3"),
    (r"_stage_(\d)_block_(\d+)_layer_scale$", r"stages.\1.\2.gamma"),
    (r"_head_layernorm$", "norm"),
    (r"_head_dense$", "head"),
)
KERAS_PARAMS = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
GROUPED_TO_DEPTHWISE = (0, 1, 3, 2)  # its depthwise conv is a grouped Conv2D: (7, 7, 1, C) -> (7, 7, C, 1)


def keras_apps_to_flat(tensors, path):
    """keras.applications `.h5` tensors ({"<model>/<layer>/<weight>": array}) -> {flat module: {param: array}}."""
    slots = Slots(path)
    for name, value in tensors.items():
        layer, _, param = name.rpartition("/")
        layer = layer.rpartition("/")[2]
        if layer.endswith("_prestem_normalization"):
            continue  # the ImageNet mean/variance: ConvNeXtPreprocessing holds them as constants
        for pattern, replacement in KERAS_APPS_RULES:
            match = re.search(pattern, layer)
            if match:
                module = match.expand(replacement) if isinstance(replacement, str) else replacement(match)
                break
        else:
            raise CheckpointError(f"{path}: unexpected tensor {checkpoints.quote(name)} {tuple(value.shape)} "
                                  "in the checkpoint.")
        if module.endswith(".gamma"):  # its layer scale's one variable, whatever Keras named it
            slots.put(keras_name(module), "gamma", name, value)
            continue
        transpose = GROUPED_TO_DEPTHWISE if module.endswith("dwconv") and param == "kernel" else None
        slots.put(keras_name(module), KERAS_PARAMS.get(param, param), name, value, transpose)
    return slots.layers


# --- what a converted checkpoint holds --------------------------------------------------------

class Architecture(tuple):
    """What a flat-form checkpoint holds: `(depths, dims, classes)`, which it unpacks as, and `.version`.

    `version` is 1 for ConvNeXt (layer scales, or none), 2 for ConvNeXt V2 (GRN tensors). A tuple of
    three, so code that unpacks `depths, dims, classes = architecture_of(layers)` reads V2 files too.
    """

    def __new__(cls, depths, dims, classes, version=1):
        self = super().__new__(cls, (depths, dims, classes))
        self.version = version
        return self

    def __getnewargs__(self):
        return (*self, self.version)

    depths = property(lambda self: self[0])
    dims = property(lambda self: self[1])
    classes = property(lambda self: self[2])

    @property
    def family(self):
        """"ConvNeXt" or "ConvNeXt V2", as messages name them."""
        return "ConvNeXt V2" if self.version == 2 else "ConvNeXt"

    def __repr__(self):
        return f"Architecture(depths={self[0]}, dims={self[1]}, classes={self[2]}, version={self.version})"


def version_of(layers, path=None):
    """2 if a flat-form checkpoint holds GRN tensors (ConvNeXt V2), else 1; one holding both GRN and layer
    scales is refused, naming one of each."""
    scale = next((n for n in layers if re.fullmatch(r"stages_\d_\d+_gamma", n)), None)
    grn = next((n for n in layers if re.fullmatch(r"stages_\d_\d+_grn", n)), None)
    if scale and grn:
        raise CheckpointError(
            f"{path or 'the checkpoint'}: holds both ConvNeXt layer scales ('{scale}.gamma') and ConvNeXt V2 GRN "
            f"tensors ('{grn}.gamma'): a checkpoint is of one family.")
    return 2 if grn else 1


def architecture_of(layers, path=None):
    """`Architecture` (depths, dims, classes or None; `.version`) of a flat-form checkpoint."""
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
    return Architecture(tuple(depths), tuple(dims), classes, version_of(layers, path))


def stem_channels(layers):
    """The input channels of a flat-form checkpoint's stem (3 for every published one)."""
    return layers["downsample_layers_0_0"]["weight"].shape[2]


def adapt_stem(kernel, channels):
    """A (kh, kw, I, C) stem kernel for `channels` input channels, by timm's rule (`adapt_input_conv`).

    One channel: the sum over the I inputs (a grey image gives the response of the same grey RGB
    image); N channels: the inputs repeated and cut to N, scaled by I / N so that the response
    keeps its size.
    """
    have = kernel.shape[2]
    if channels == have:
        return kernel
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeats = -(-channels // have)
    return np.concatenate([kernel] * repeats, axis=2)[:, :, :channels] * (have / channels)


def expected_shapes(depths, dims, classes, with_norm=False, channels=3, version=1):
    """{(flat module, param): shape} of every variable of a ConvNeXt (no top: `classes` None), Keras layouts.

    `version` 2: ConvNeXt V2, a GRN of 4 x dim channels in every block instead of the layer scale.
    """
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
            if version == 2:
                put(f"{prefix}_grn", gamma=(4 * dim,), beta=(4 * dim,))
            else:
                put(f"{prefix}_gamma", gamma=(dim,))
    if classes is not None or with_norm:
        put("norm", weight=(dims[3],), bias=(dims[3],))
    if classes is not None:
        put("head", weight=(dims[3], classes), bias=(classes,))
    return out


def check_complete(layers, path):
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
    arch = architecture_of(layers, path)
    depths, dims, classes = arch
    stem = layers.get("downsample_layers_0_0", {}).get("weight")
    # The input channels come from the file too: a missing or zero-channel stem is named below, against RGB's 3.
    channels = stem.shape[2] if stem is not None and stem.ndim == 4 and stem.shape[2] >= 1 else 3
    shapes = expected_shapes(depths, dims, classes, with_norm="norm" in layers, channels=channels,
                             version=arch.version)
    for (layer, param), shape in shapes.items():
        value = layers.get(layer, {}).get(param)
        if value is None:
            raise CheckpointError(f"{path}: missing tensor '{layer}.{param}' (shape {shape} in the {arch.family} of "
                                  f"depths {depths} and dims {dims} it holds).")
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{path}: tensor '{layer}.{param}' has shape {tuple(value.shape)}, the "
                                  f"{arch.family} of depths {depths} and dims {dims} it holds expects {shape}.")
