"""The public builders: `ConvNeXt(depths, dims, weights=...)`, `ConvNeXtAtto` .. `ConvNeXtXLarge`, `ConvNeXtV2` and
`ConvNeXtV2Atto` .. `ConvNeXtV2Huge`, `feature_pyramid`.

keras.applications' argument set and contract: every argument checked before any file is fetched,
the weights resolved (a preset, "imagenet" or a file) and loaded into a `ConvNeXtModel` (backbone.py).
"""

import os

import keras

from keras_convnext import checks, names
from keras_convnext import presets as presets_lib
from keras_convnext import weights as weights_lib
from keras_convnext.backbone import (CHANNELS_FIRST, MIN_SIZE, POOLINGS, ConvNeXtModel,  # noqa: F401
                                     channel_stats, check_args, drop_path_rates, variant_of)
from keras_convnext.layers import layer_norm
from keras_convnext.variants import VARIANTS

PYRAMID_LEVELS = ("P2", "P3", "P4", "P5")  # strides 4, 8, 16, 32, keras-hub's convention


def _check_weights(weights):
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            "`weights` must be None, 'imagenet', a preset name or a file path. "
            f"Received: weights={weights!r}"
        )


def _resolve_preset(weights, variant):
    """`weights` -> the registry entry it names (None for no weights or a file path)."""
    if weights is None:
        return None
    weights = os.fspath(weights)
    if weights == "imagenet":
        if variant is None:
            raise ValueError(
                "weights='imagenet' needs one of the named variants' depths and dims; pass "
                "weights=None or a file path for a custom ConvNeXt. Received: weights='imagenet'"
            )
        if variant not in presets_lib.IMAGENET_DEFAULT:
            raise ValueError(f"{VARIANTS[variant].title} has no published ImageNet weights: pass weights=None (random "
                             "initialisation) or a file path. Received: weights='imagenet'")
        return presets_lib.PRESETS[presets_lib.IMAGENET_DEFAULT[variant]]
    if weights in presets_lib.PRESETS:
        preset = presets_lib.PRESETS[weights]
        if variant is not None and preset.variant != variant:
            held = VARIANTS[preset.variant]
            raise ValueError(
                f"Preset {weights!r} holds {held.title} weights, not {VARIANTS[variant].title}: use "
                f"{held.builder_name}. Received: weights={weights!r}"
            )
        return preset
    if os.path.isdir(weights):
        raise ValueError(f"`weights` is a folder, not a checkpoint file. Received: weights={weights!r}")
    if os.path.isfile(weights):
        return None
    valid = ", ".join(["None", "'imagenet'", *sorted(presets_lib.PRESETS), "or a file path"])
    raise ValueError(f"Unknown `weights`. Valid values: {valid}. Received: weights={weights!r}")


def ConvNeXt(
    depths,
    dims,
    include_top=True,
    include_preprocessing=True,
    weights="imagenet",
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name=None,
    drop_path_rate=0.0,
    layer_scale_init_value=1e-6,
    head_init_scale=1.0,
    version=1,
):
    """Builds a ConvNeXt of any depths and widths as a functional `keras.Model`.

    Args:
        depths: blocks per stage, four integers (ConvNeXt-T: `(3, 3, 9, 3)`).
        dims: channels per stage, four integers (ConvNeXt-T: `(96, 192, 384, 768)`).
        include_top: end in the classifier (pool -> LayerNorm -> Dense -> activation).
        include_preprocessing: take raw pixels in [0, 255] and normalise them inside the model
            with the weights' mean and std. With False, feed `normalize_pixels(x)`.
        weights: None (random init), "imagenet" (the variant's best 1000-class checkpoint), a preset
            name from `list_presets()`, or a path to a checkpoint file.
        input_tensor: optional Keras tensor to use as the model's input.
        input_shape: (height, width, 3), at least 32x32; height and width may be None. Defaults to
            the weights' resolution with the top, (None, None, 3) without.
        pooling: without the top, None returns the last stage's (N, H/32, W/32, C) map as it is;
            "avg" or "max" pools it and applies the head's LayerNorm (the classifier's features).
        classes: number of classes of the top.
        classifier_activation: activation of the top ("softmax", None for logits, ...).
        name: model name; defaults to "convnext" or "convnext_<variant>".
        drop_path_rate: stochastic depth of the last block; earlier blocks rise linearly from 0.
        layer_scale_init_value: initial layer scale (0 or None: no layer scale).
        head_init_scale: multiplies the initial head kernel (0.001 for fine-tuning, as in the paper).
        version: 1 (ConvNeXt) or 2 (ConvNeXt V2; `ConvNeXtV2` builds it with no layer scale).

    Returns:
        A `keras.Model`.
    """
    if keras.config.image_data_format() == "channels_first":
        raise ValueError(f"{CHANNELS_FIRST} Received: image_data_format='channels_first'")
    shape = check_args(depths, dims, include_top, include_preprocessing, input_tensor, input_shape, pooling, classes,
                        classifier_activation, name, drop_path_rate, layer_scale_init_value, head_init_scale,
                        version)
    _check_weights(weights)
    preset = _resolve_preset(weights, variant_of(depths, dims, version))
    if shape is None:
        size = preset.image_size if preset else 224
        shape = (size, size, 3) if include_top else (None, None, 3)
    sources = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else None
    starts_here = sources is not None and len(sources) == 1 and sources[0] is input_tensor
    model = ConvNeXtModel(
        depths, dims, include_top=include_top, include_preprocessing=include_preprocessing, input_shape=shape,
        pooling=pooling, classes=classes, classifier_activation=classifier_activation, drop_path_rate=drop_path_rate,
        layer_scale_init_value=layer_scale_init_value, head_init_scale=head_init_scale,
        mean=preset.mean if preset else None, std=preset.std if preset else None,
        input_tensor=input_tensor if starts_here else None, name=name, version=version,
    )
    if weights is not None:
        weights_lib.load_weights(model, weights, preset=preset, head_init_scale=head_init_scale)
    if input_tensor is not None and not starts_here:
        # As keras.applications: the model starts at the tensor's source inputs, with the layers before it.
        return keras.Model(sources, model(input_tensor), name=model.name)
    return model


def ConvNeXtV2(
    depths,
    dims,
    include_top=True,
    include_preprocessing=True,
    weights="imagenet",
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name=None,
    drop_path_rate=0.0,
    head_init_scale=1.0,
):
    """Builds a ConvNeXt V2 (Woo et al., CVPR 2023) of any depths and widths as a functional `keras.Model`.

    ConvNeXt's arguments less the layer scale, which V2 drops: every block has a Global Response
    Normalization (`GlobalResponseNorm`) after its GELU instead. `weights` takes the V2 presets
    (`list_presets()`: their weights are licensed CC-BY-NC 4.0, non-commercial use only) and V2
    checkpoint files of the official, timm and Hugging Face layouts.
    """
    return ConvNeXt(depths, dims, include_top=include_top, include_preprocessing=include_preprocessing,
                    weights=weights, input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
                    classes=classes, classifier_activation=classifier_activation, name=name,
                    drop_path_rate=drop_path_rate, layer_scale_init_value=None, head_init_scale=head_init_scale,
                    version=2)


def _builder(variant_name):
    variant = VARIANTS[variant_name]
    docs = (
        f"{variant.title}: depths {variant.depths}, dims {variant.dims}, "
        f"{variant.params:,} parameters with the 1000-class head, {variant.gmacs} GMACs at 224 px.\n\n"
        f"Arguments as `{'ConvNeXtV2' if variant.version == 2 else 'ConvNeXt'}`; `drop_path_rate` defaults to the "
        f"variant's recipe value ({variant.drop_path_rate}).\n"
    )

    if variant.version == 2:
        def builder(include_top=True, include_preprocessing=True, weights="imagenet", input_tensor=None,
                    input_shape=None, pooling=None, classes=1000, classifier_activation="softmax",
                    name=None, drop_path_rate=None, head_init_scale=1.0):
            return ConvNeXtV2(
                variant.depths, variant.dims, include_top=include_top,
                include_preprocessing=include_preprocessing, weights=weights,
                input_tensor=input_tensor, input_shape=input_shape, pooling=pooling, classes=classes,
                classifier_activation=classifier_activation, name=name,
                drop_path_rate=variant.drop_path_rate if drop_path_rate is None else drop_path_rate,
                head_init_scale=head_init_scale,
            )
        docs += "The V2 presets' weights are licensed CC-BY-NC 4.0 (non-commercial use only).\n"
    else:
        def builder(include_top=True, include_preprocessing=True, weights="imagenet", input_tensor=None,
                    input_shape=None, pooling=None, classes=1000, classifier_activation="softmax",
                    name=None, drop_path_rate=None, layer_scale_init_value=1e-6, head_init_scale=1.0):
            return ConvNeXt(
                variant.depths, variant.dims, include_top=include_top,
                include_preprocessing=include_preprocessing, weights=weights,
                input_tensor=input_tensor, input_shape=input_shape, pooling=pooling, classes=classes,
                classifier_activation=classifier_activation, name=name,
                drop_path_rate=variant.drop_path_rate if drop_path_rate is None else drop_path_rate,
                layer_scale_init_value=layer_scale_init_value, head_init_scale=head_init_scale,
            )

    builder.__name__ = variant.builder_name
    builder.__qualname__ = builder.__name__
    builder.__doc__ = docs
    return builder


ConvNeXtAtto = _builder("atto")
ConvNeXtFemto = _builder("femto")
ConvNeXtPico = _builder("pico")
ConvNeXtNano = _builder("nano")
ConvNeXtTiny = _builder("tiny")
ConvNeXtSmall = _builder("small")
ConvNeXtBase = _builder("base")
ConvNeXtLarge = _builder("large")
ConvNeXtXLarge = _builder("xlarge")
ConvNeXtV2Atto = _builder("convnextv2_atto")
ConvNeXtV2Femto = _builder("convnextv2_femto")
ConvNeXtV2Pico = _builder("convnextv2_pico")
ConvNeXtV2Nano = _builder("convnextv2_nano")
ConvNeXtV2Tiny = _builder("convnextv2_tiny")
ConvNeXtV2Small = _builder("convnextv2_small")
ConvNeXtV2Base = _builder("convnextv2_base")
ConvNeXtV2Large = _builder("convnextv2_large")
ConvNeXtV2Huge = _builder("convnextv2_huge")


def _stage_outputs(model):
    """The four ConvNeXtStage layers of a model built here (or of the ConvNeXt inside a wrapping model)."""
    try:
        return [model.get_layer(names.STAGE.format(stage)) for stage in range(4)]
    except ValueError:
        raise ValueError(
            "`feature_pyramid` needs a model built by keras_convnext (layers 'stages_0'..'stages_3'). "
            f"Received: model={model.name!r}"
        ) from None


def feature_pyramid(model, norm=True):
    """The four stage outputs of a ConvNeXt as a dict model, for detection and segmentation.

    Args:
        model: a model from any builder here, with or without its top.
        norm: pass each level through its own LayerNorm (`norm0`..`norm3`), as the official
            detection and segmentation backbones do. These start at identity (gamma 1, beta 0).

    Returns:
        A `keras.Model` sharing `model`'s layers, whose output is a dict `{"P2", "P3", "P4", "P5"}`
        of maps with strides 4, 8, 16 and 32.
    """
    checks.boolean("norm", norm)
    outputs = {}
    for stage, layer in enumerate(_stage_outputs(model)):
        x = layer.output
        if norm:
            x = layer_norm(names.PYRAMID_NORM.format(stage), dtype=layer.dtype_policy)(x)
        outputs[PYRAMID_LEVELS[stage]] = x
    return keras.Model(model.input, outputs, name=f"{model.name}_pyramid")
