"""Between the flat per-module form (remap.py) and a model's variables, both ways, strictly.

`names.variables_by_module(model)` is the model's side of the contract, keyed like the flat form,
so assigning is a lookup: every checkpoint tensor has a place, every model variable gets a value,
every shape is checked by name before the first variable is written.
"""

import re

import numpy as np

from keras_convnext import remap
from keras_convnext.checkpoints import CheckpointError
from keras_convnext.names import keras_name, variables_by_module
from keras_convnext.variants import VARIANTS


def assign(model, layers, source, head_init_scale=1.0):
    """Assigns a flat-form checkpoint to `model`, strictly; returns a list of notes for the user.

    A head of another class count is left fresh (noted); so are the head and the final norm a
    checkpoint has none of (an encoder, as FCMAE's, fine-tuned as the official code does: pool ->
    fresh norm -> fresh head); a 3-channel stem is adapted to the model's input channels by timm's
    rule (`remap.adapt_stem`, noted). Anything else that does not fit is a CheckpointError naming
    `source` and the tensor; a checkpoint of the other family (ConvNeXt into ConvNeXt V2 or the
    reverse) is one line naming what the file holds and the builder to use.
    """
    target = variables_by_module(model)
    notes = []
    # Without its top the model has no head (and, with pooling=None, no head norm) to fill.
    unused = {"head", "norm"} - set(target)
    arch = remap.architecture_of(layers, source)
    depths, dims, classes = arch
    # The model's family from its variables: a GRN in its blocks is V2 (whatever wraps the ConvNeXt).
    version = 2 if any(re.fullmatch(r"stages_\d_\d+_grn", n) for n in target) else 1
    if version != arch.version:
        raise CheckpointError(
            f"{source}: the checkpoint holds {arch.family} weights ("
            f"{'GRN in every block' if arch.version == 2 else 'layer scales, no GRN'}), the model is a "
            f"{'ConvNeXt V2' if version == 2 else 'ConvNeXt'}: build it with "
            f"{_variant_name(depths, dims, arch.version)}."
        )
    # Whole modules the file has none of (an encoder's head, FCMAE's final norm) start fresh; a module
    # the file holds in part is still a missing tensor below.
    fresh = [name for name in ("norm", "head") if name in target and name not in layers]
    if fresh:
        for name in fresh:
            target.pop(name)
        what = " and ".join({"norm": "final norm", "head": f"head (head_init_scale={head_init_scale})"}[n]
                            for n in fresh)
        notes.append(f"the checkpoint holds no {' or '.join(n if n == 'head' else 'final norm' for n in fresh)} "
                     f"(an encoder, as FCMAE's): loaded the backbone and started a fresh {what}")
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
            f"({_variant_name(depths, dims, arch.version)})."
        )
    for name, params in layers.items():
        if name in unused:
            continue
        if name not in target:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} ({sorted(params)}) has no place in the model.")
        for param in params:
            if param not in target[name]:
                raise CheckpointError(f"{source}: unexpected tensor '{name}.{param}' has no place in the model.")
    stem = target["downsample_layers_0_0"]["weight"]
    have = remap.stem_channels(layers)
    if stem.shape[2] != have:
        notes.append(f"adapted the checkpoint's {have}-channel stem to the model's {stem.shape[2]} input channels "
                     f"(timm's rule: summed for 1, repeated and scaled by {have} / N for N)")
        kernel = remap.adapt_stem(np.asarray(layers["downsample_layers_0_0"]["weight"], "float32"), stem.shape[2])
        layers = {**layers, "downsample_layers_0_0": {**layers["downsample_layers_0_0"], "weight": kernel}}
    assignments = []
    for name, variables in target.items():
        for param, variable in variables.items():
            value = layers.get(name, {}).get(param)
            if value is None:
                raise CheckpointError(f"{source}: missing tensor '{name}.{param}' "
                                      f"(model shape {tuple(variable.shape)}).")
            if tuple(value.shape) != tuple(variable.shape):
                raise CheckpointError(
                    f"{source}: tensor '{name}.{param}' has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(variable.shape)}."
                )
            assignments.append((variable, value))
    for variable, value in assignments:
        variable.assign(np.asarray(value, dtype=variable.dtype))
    return notes


def read_model(model, source):
    """The flat form of a model's contract variables (the inverse of `assign`), each rank-checked by name."""
    slots = remap.Slots(source)
    for name, variables in variables_by_module(model).items():
        for param, variable in variables.items():
            slots.put(name, param, f"{name}.{param}", np.asarray(variable))
    return slots.layers


def _variant_name(depths, dims, version=1):
    """The builder of a checkpoint's shape and family, for messages."""
    for v in VARIANTS.values():
        if (v.depths, v.dims, v.version) == (tuple(depths), tuple(dims), version):
            return v.builder_name
    return f"{'ConvNeXtV2' if version == 2 else 'ConvNeXt'}(depths, dims) with these values"
