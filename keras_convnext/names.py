"""The layer-name contract, both ways: official checkpoint keys <-> Keras variable paths.

A model built here has one layer per stage and a few head layers; every variable path maps to one
official key (facebookresearch/ConvNeXt's `state_dict` names):

    stages_<i>/downsample/conv/kernel     <->  downsample_layers.<i>.<0 if i == 0 else 1>.weight
    stages_<i>/downsample/norm/gamma      <->  downsample_layers.<i>.<1 if i == 0 else 0>.weight
    stages_<i>/block_<j>/<sub>/kernel     <->  stages.<i>.<j>.<sub>.weight    (sub: dwconv, pwconv1, pwconv2)
    stages_<i>/block_<j>/norm/gamma       <->  stages.<i>.<j>.norm.weight
    stages_<i>/block_<j>/gamma            <->  stages.<i>.<j>.gamma         (V1's layer scale)
    stages_<i>/block_<j>/grn/gamma|beta   <->  stages.<i>.<j>.grn.gamma|beta  (V2's GRN, official V2 names)
    norm/gamma, head/kernel, norm<k>/...  <->  norm.weight, head.weight, norm<k>.weight (the pyramid's norms)

with `bias`/`beta` <-> `bias` throughout. Converters rename every other ecosystem's layout to the
official keys first (remap.py), so this is the only place that knows the Keras side.
"""

import re

STAGE = "stages_{}"  # a stage layer's name
BLOCK = "block_{}"  # a block's name inside its stage
PYRAMID_NORM = "norm{}"  # feature_pyramid's per-level LayerNorm

# A LayerNorm's variables are gamma/beta, a conv's or a dense's kernel/bias: PyTorch calls both weight/bias.
_TO_TORCH = {"kernel": "weight", "gamma": "weight", "bias": "bias", "beta": "bias"}
_NORMS = re.compile(r"norm\d?")

_PATH = re.compile(
    r"(?:^|/)(?:stages_(?P<stage>\d)/(?:downsample/(?P<down>conv|norm)|block_(?P<block>\d+)"
    r"(?:/(?P<sub>dwconv|norm|pwconv1|pwconv2|grn))?)|(?P<top>norm\d?|head))/(?P<var>kernel|bias|gamma|beta)$"
)
_KEY = re.compile(
    r"(?:downsample_layers\.(?P<dstage>\d)\.(?P<dindex>[01])|stages\.(?P<stage>\d)\.(?P<block>\d+)"
    r"(?:\.(?P<sub>dwconv|norm|pwconv1|pwconv2|grn))?|(?P<top>norm\d?|head))\.(?P<param>weight|bias|gamma|beta)"
)


def _downsample_index(stage, part):
    """The official index of a downsampling's conv or norm: the stem is (conv, norm), later ones (norm, conv)."""
    return (part == "norm") == (stage == 0)


def official_key(path):
    """A Keras variable path -> its official key, or None for a variable outside the contract.

    The path may carry a nesting model's prefix (`outer/stages_0/...`): only its ConvNeXt tail counts.
    """
    m = _PATH.search(path)
    if m is None:
        return None
    var = m["var"]
    if m["top"]:
        layer_is_norm = bool(_NORMS.fullmatch(m["top"]))
        if var not in (("gamma", "beta") if layer_is_norm else ("kernel", "bias")):
            return None
        return f"{m['top']}.{_TO_TORCH[var]}"
    stage = int(m["stage"])
    if m["down"]:
        if var not in (("gamma", "beta") if m["down"] == "norm" else ("kernel", "bias")):
            return None
        return f"downsample_layers.{stage}.{int(_downsample_index(stage, m['down']))}.{_TO_TORCH[var]}"
    prefix = f"stages.{stage}.{int(m['block'])}"
    if m["sub"] is None:
        return f"{prefix}.gamma" if var == "gamma" else None
    if m["sub"] == "grn":
        return f"{prefix}.grn.{var}" if var in ("gamma", "beta") else None
    if var not in (("gamma", "beta") if m["sub"] == "norm" else ("kernel", "bias")):
        return None
    return f"{prefix}.{m['sub']}.{_TO_TORCH[var]}"


def keras_path(key):
    """An official key -> the Keras variable path it fills (the inverse of `official_key`), or None."""
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    param = m["param"]
    if m["sub"] == "grn":
        grn = f"{STAGE.format(int(m['stage']))}/{BLOCK.format(int(m['block']))}/grn"
        return f"{grn}/{param}" if param in ("gamma", "beta") else None
    if param == "beta":
        return None
    if m["top"]:
        if param == "gamma":
            return None
        norm = bool(_NORMS.fullmatch(m["top"]))
        return f"{m['top']}/{_from_torch(param, norm)}"
    if m["dstage"] is not None:
        if param == "gamma":
            return None
        stage = int(m["dstage"])
        part = "norm" if _downsample_index(stage, "norm") == bool(int(m["dindex"])) else "conv"
        return f"{STAGE.format(stage)}/downsample/{part}/{_from_torch(param, part == 'norm')}"
    prefix = f"{STAGE.format(int(m['stage']))}/{BLOCK.format(int(m['block']))}"
    if m["sub"] is None:
        return f"{prefix}/gamma" if param == "gamma" else None
    if param == "gamma":
        return None
    return f"{prefix}/{m['sub']}/{_from_torch(param, m['sub'] == 'norm')}"


def _from_torch(param, norm):
    if param == "weight":
        return "gamma" if norm else "kernel"
    return "beta" if norm else "bias"


def keras_name(key):
    """An official key's module -> the flat name converters file it under (`stages.2.5.pwconv1` -> `stages_2_5_pwconv1`)."""
    return key.replace(".", "_")


def variables_by_module(model):
    """{flat module name: {PyTorch param name: variable}} of every contract variable of `model`.

    The flat name is `keras_name` of the official module key (`stages_2_5_pwconv1`, `downsample_layers_0_0`,
    `stages_2_5_gamma` for a layer scale, `stages_2_5_grn` with params gamma/beta for a GRN, `norm`, `head`);
    variables outside the contract are left out.
    """
    out = {}
    for variable in model.weights:
        key = official_key(variable.path)
        if key is None:
            continue
        module, _, param = key.rpartition(".")
        if param == "gamma" and not module.endswith(".grn"):  # a layer scale: its own one-variable module
            module, param = key, "gamma"
        out.setdefault(keras_name(module), {})[param] = variable
    return out


def stage_and_block(key):
    """(stage, block) of an official key inside a stage's blocks, (stage, None) of a downsampling, else None."""
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    if m["dstage"] is not None:
        return int(m["dstage"]), None
    if m["stage"] is not None:
        return int(m["stage"]), int(m["block"])
    return None
