"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022) as one Keras 3 model class.

`ConvNeXtModel` is a functional `keras.Model` whose config is its constructor arguments (depths,
dims, include_top, ...), as keras-hub's backbones: `get_config`/`from_config`, `.keras` files and
`clone_model` rebuild it from them. The builders (`ConvNeXt`, `ConvNeXtTiny`, ...) are the public
face: they check their arguments, resolve the weights and load them. Variable names follow the
official checkpoint keys (names.py).
"""

import os

import keras

from keras_convnext import checks, names
from keras_convnext import presets as presets_lib
from keras_convnext.layers import ConvNeXtPreprocessing, ConvNeXtStage, HostConstant, kernel_init, layer_norm
from keras_convnext.variants import MIN_IMAGE_SIZE, VARIANTS

POOLINGS = (None, "avg", "max")
PYRAMID_LEVELS = ("P2", "P3", "P4", "P5")  # strides 4, 8, 16, 32, keras-hub's convention
MIN_SIZE = MIN_IMAGE_SIZE
# keras.applications.convnext's own message, then how to switch in code.
CHANNELS_FIRST = (
    "ConvNeXt does not support the `channels_first` image data format. Switch to `channels_last` by editing "
    "your local config file at ~/.keras/keras.json (or call keras.config.set_image_data_format('channels_last'))."
)


def drop_path_rates(depths, drop_path_rate):
    """Each block's stochastic depth, stage by stage: linear over all blocks, rate * k / (n - 1)."""
    total, rates, k = sum(depths), [], 0
    for depth in depths:
        rates.append([drop_path_rate * (k + j) / max(total - 1, 1) for j in range(depth)])
        k += depth
    return rates


def channel_stats(values, channels):
    """An RGB mean or std for `channels` input channels: as it is for 3, their average for 1, cycled for more.

    The same rule as the stem's adaptation (weights.adapt_stem): one grey channel is the RGB average,
    N channels repeat R, G, B.
    """
    values = [float(v) for v in values]
    if channels == len(values):
        return values
    if channels == 1:
        return [sum(values) / len(values)]
    return [values[c % len(values)] for c in range(channels)]


@keras.saving.register_keras_serializable(package="keras_convnext")
class ConvNeXtModel(keras.Model):
    """A ConvNeXt of any depths and widths, rebuilt from its constructor arguments.

    The graph: `images` -> `preprocessing` (optional) -> `stages_0`..`stages_3` (ConvNeXtStage:
    the stem or downsampling, then the blocks) -> `avg_pool`/`max_pool` -> `norm` -> `head` ->
    `predictions`. Arguments as `ConvNeXt` (without `weights`), plus `mean`/`std` of the
    preprocessing (the weights' statistics; ImageNet's by default) and `input_tensor`, a
    `keras.Input` to start from. Build it through the builders, which also load weights.
    """

    def __init__(self, depths, dims, include_top=True, include_preprocessing=True, input_shape=None, pooling=None,
                 classes=1000, classifier_activation="softmax", drop_path_rate=0.0, layer_scale_init_value=1e-6,
                 head_init_scale=1.0, mean=None, std=None, input_tensor=None, name=None, **kwargs):
        if keras.config.image_data_format() == "channels_first":
            raise ValueError(f"{CHANNELS_FIRST} Received: image_data_format='channels_first'")
        shape = _check_args(depths, dims, include_top, include_preprocessing, input_tensor, input_shape, pooling,
                            classes, classifier_activation, name, drop_path_rate, layer_scale_init_value,
                            head_init_scale)
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        if shape is None:
            shape = (224, 224, 3) if include_top else (None, None, 3)
        variant = variant_of(depths, dims)
        inputs = input_tensor if input_tensor is not None else keras.Input(shape=shape, name="images")
        x = inputs
        if include_preprocessing:
            x = ConvNeXtPreprocessing(channel_stats(presets_lib.IMAGENET_MEAN if mean is None else mean, shape[-1]),
                                      channel_stats(presets_lib.IMAGENET_STD if std is None else std, shape[-1]),
                                      name="preprocessing")(x)
        for stage, (dim, rates) in enumerate(zip(dims, drop_path_rates(depths, drop_path_rate))):
            x = ConvNeXtStage(dim, rates, layer_scale_init_value, stem=stage == 0,
                              name=names.STAGE.format(stage))(x)
        if include_top or pooling is not None:
            pool = keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
            x = pool(name=f"{pooling or 'avg'}_pool")(x)
            # pool -> norm -> head, as the official weights expect; the pooled features leave in float32.
            x = layer_norm("norm", dtype="float32")(x)
        if include_top:
            x = keras.layers.Dense(classes, kernel_initializer=kernel_init(head_init_scale),
                                   bias_initializer=HostConstant(0.0), name="head")(x)
            # A float32 activation: mixed-precision models still return float32 probabilities.
            x = keras.layers.Activation(classifier_activation, dtype="float32", name="predictions")(x)
        super().__init__(inputs, x, name=name or (f"convnext_{variant}" if variant else "convnext"), **kwargs)
        self.depths, self.dims = depths, dims
        self.include_top, self.include_preprocessing, self.pooling = include_top, include_preprocessing, pooling
        self.image_shape = tuple(shape)
        self.classes, self.classifier_activation = classes, classifier_activation
        self.drop_path_rate, self.layer_scale_init_value = drop_path_rate, layer_scale_init_value
        self.head_init_scale = head_init_scale
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(v) for v in std]

    @property
    def variant(self):
        """The named variant of these depths and dims ("tiny", ...), or None for a custom one."""
        return variant_of(self.depths, self.dims)

    @property
    def stages(self):
        """The four ConvNeXtStage layers."""
        return [self.get_layer(names.STAGE.format(stage)) for stage in range(4)]

    def get_config(self):
        activation = self.classifier_activation
        if callable(activation):
            activation = keras.activations.serialize(activation)
        return {
            "name": self.name, "trainable": self.trainable, "depths": list(self.depths), "dims": list(self.dims),
            "include_top": self.include_top, "include_preprocessing": self.include_preprocessing,
            "input_shape": list(self.image_shape), "pooling": self.pooling, "classes": self.classes,
            "classifier_activation": activation, "drop_path_rate": self.drop_path_rate,
            "layer_scale_init_value": self.layer_scale_init_value, "head_init_scale": self.head_init_scale,
            "mean": self.mean, "std": self.std,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("classifier_activation"), dict):
            config["classifier_activation"] = keras.activations.deserialize(config["classifier_activation"])
        config["input_shape"] = tuple(config["input_shape"])
        return cls(**config)

    def _check_image_arrays(self, x):
        """A too-small array batch is refused before Keras's loop starts (on JAX, an error inside the
        traced predict leaves the model's variables purged, so a later good call fails too)."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 4:
            return
        if any(s is not None and s < MIN_SIZE for s in tuple(shape)[1:3]):
            raise ValueError(
                f"ConvNeXt needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (four downsamplings to 1x1). "
                f"Received: x with shape={tuple(shape)}"
            )

    def predict(self, x, *args, **kwargs):
        self._check_image_arrays(x)
        return super().predict(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self._check_image_arrays(x)
        return super().evaluate(x, *args, **kwargs)

    def fit(self, x=None, *args, **kwargs):
        self._check_image_arrays(x)
        return super().fit(x, *args, **kwargs)


def _check_args(depths, dims, include_top, include_preprocessing, input_tensor, input_shape, pooling, classes,
                classifier_activation, name, drop_path_rate, layer_scale_init_value, head_init_scale):
    """Every argument checked before any work; returns the resolved input shape (None: the default)."""
    if not isinstance(depths, (list, tuple)) or not isinstance(dims, (list, tuple)) or len(depths) != 4 or (
            len(dims) != 4):
        raise ValueError(
            "ConvNeXt has four stages: `depths` and `dims` need four entries each. "
            f"Received: depths={depths!r}, dims={dims!r}"
        )
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        checks.integer(f"depths[{i}]", depth, minimum=1)
        checks.integer(f"dims[{i}]", dim, minimum=1)
    checks.boolean("include_top", include_top)
    checks.boolean("include_preprocessing", include_preprocessing)
    checks.choice("pooling", pooling, POOLINGS)
    if include_top:
        checks.integer("classes", classes, minimum=1)
    if classifier_activation is not None and not isinstance(classifier_activation, str) and (
            not callable(classifier_activation)):
        raise ValueError(
            "`classifier_activation` must be None, an activation name or a callable. "
            f"Received: classifier_activation={classifier_activation!r}"
        )
    checks.optional_str("name", name)
    checks.number("drop_path_rate", drop_path_rate, 0.0, 1.0, high_open=True)
    if layer_scale_init_value is not None:
        checks.number("layer_scale_init_value", layer_scale_init_value, 0.0)
    checks.number("head_init_scale", head_init_scale, 0.0, low_open=True)
    if input_tensor is not None:
        if not keras.backend.is_keras_tensor(input_tensor):
            raise ValueError(
                "`input_tensor` must be a Keras tensor (`keras.Input(...)` or a layer's output on one); to run the "
                f"model on data, call it. Received: input_tensor={type(input_tensor).__name__}"
            )
        shape = tuple(input_tensor.shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise ValueError(f"`input_shape` {tuple(input_shape)} differs from `input_tensor`'s shape {shape}. "
                             f"Received: input_shape={input_shape!r}")
    elif input_shape is not None:
        if not isinstance(input_shape, (list, tuple)):
            raise ValueError(f"`input_shape` must be (height, width, channels). Received: input_shape={input_shape!r}")
        shape = tuple(input_shape)
    else:
        shape = None
    if shape is not None:
        if len(shape) != 3:
            raise ValueError(f"`input_shape` must be (height, width, channels). Received: input_shape={shape}")
        if any(s is not None and (isinstance(s, bool) or not isinstance(s, int)) for s in shape):
            raise ValueError(f"`input_shape` must hold integers or None. Received: input_shape={shape}")
        if shape[-1] is None or shape[-1] < 1:
            raise ValueError(f"`input_shape` needs a known, positive channel count, last. Received: input_shape={shape}")
        if any(s is not None and s < MIN_SIZE for s in shape[:2]):
            raise ValueError(
                f"ConvNeXt needs inputs of at least {MIN_SIZE}x{MIN_SIZE} pixels. Received: input_shape={shape}"
            )
    return shape


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
        return presets_lib.PRESETS[presets_lib.IMAGENET_DEFAULT[variant]]
    if weights in presets_lib.PRESETS:
        preset = presets_lib.PRESETS[weights]
        if variant is not None and preset.variant != variant:
            raise ValueError(
                f"Preset {weights!r} holds ConvNeXt-{preset.variant.capitalize()} weights, "
                f"not {variant.capitalize()}: use ConvNeXt{preset.variant.capitalize()}. "
                f"Received: weights={weights!r}"
            )
        return preset
    if os.path.isdir(weights):
        raise ValueError(f"`weights` is a folder, not a checkpoint file. Received: weights={weights!r}")
    if os.path.isfile(weights):
        return None
    valid = ", ".join(["None", "'imagenet'", *sorted(presets_lib.PRESETS), "or a file path"])
    raise ValueError(f"Unknown `weights`. Valid values: {valid}. Received: weights={weights!r}")


def variant_of(depths, dims):
    """The name of the variant with these depths and dims, or None."""
    for variant in VARIANTS.values():
        if tuple(depths) == variant.depths and tuple(dims) == variant.dims:
            return variant.name
    return None


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
):
    """Builds a ConvNeXt of any depths and widths as a functional `keras.Model`.

    Args:
        depths: blocks per stage, four integers (ConvNeXt-T: `(3, 3, 9, 3)`).
        dims: channels per stage, four integers (ConvNeXt-T: `(96, 192, 384, 768)`).
        include_top: end in the classifier (pool -> LayerNorm -> Dense -> activation).
        include_preprocessing: take raw pixels in [0, 255] and normalise them inside the model
            with the weights' mean and std. With False, feed `preprocess_input(x)`.
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

    Returns:
        A `keras.Model`.
    """
    if keras.config.image_data_format() == "channels_first":
        raise ValueError(f"{CHANNELS_FIRST} Received: image_data_format='channels_first'")
    shape = _check_args(depths, dims, include_top, include_preprocessing, input_tensor, input_shape, pooling, classes,
                        classifier_activation, name, drop_path_rate, layer_scale_init_value, head_init_scale)
    _check_weights(weights)
    preset = _resolve_preset(weights, variant_of(depths, dims))
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
        input_tensor=input_tensor if starts_here else None, name=name,
    )
    if weights is not None:
        from keras_convnext import weights as weights_lib  # deferred: pulls in the converters

        weights_lib.load_weights(model, weights, preset=preset, head_init_scale=head_init_scale)
    if input_tensor is not None and not starts_here:
        # As keras.applications: the model starts at the tensor's source inputs, with the layers before it.
        return keras.Model(sources, model(input_tensor), name=model.name)
    return model


def _builder(variant_name):
    variant = VARIANTS[variant_name]

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

    builder.__name__ = f"ConvNeXt{variant_name.capitalize()}"
    builder.__qualname__ = builder.__name__
    builder.__doc__ = (
        f"ConvNeXt-{variant_name.capitalize()}: depths {variant.depths}, dims {variant.dims}, "
        f"{variant.params:,} parameters with the 1000-class head, {variant.gmacs} GMACs at 224 px.\n\n"
        f"Arguments as `ConvNeXt`; `drop_path_rate` defaults to the variant's recipe value "
        f"({variant.drop_path_rate}).\n"
    )
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
ConvNeXtXLarge.__name__ = ConvNeXtXLarge.__qualname__ = "ConvNeXtXLarge"


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
