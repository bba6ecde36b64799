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

    A head of another class count is left fresh (noted); a 3-channel stem is adapted to the
    model's input channels by timm's rule (`remap.adapt_stem`, noted). Anything else that does
    not fit is a CheckpointError naming `source` and the tensor.
    """
    target = variables_by_module(model)
    notes = []
    # Without its top the model has no head (and, with pooling=None, no head norm) to fill.
    unused = {"head", "norm"} - set(target)
    depths, dims, classes = remap.architecture_of(layers)
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


def _variant_name(depths, dims):
    for v in VARIANTS.values():
        if (v.depths, v.dims) == (tuple(depths), tuple(dims)):
            return v.builder_name
    return "ConvNeXt(depths, dims) with these values"
