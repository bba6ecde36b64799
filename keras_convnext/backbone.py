"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022) and ConvNeXt V2 (Woo et al., CVPR 2023) as one
Keras 3 model class.

`ConvNeXtModel` is a functional `keras.Model` whose config is its constructor arguments (depths,
dims, include_top, ...), as keras-hub's backbones: `get_config`/`from_config`, `.keras` files and
`clone_model` rebuild it from them. It knows nothing of weights files: the builders (model.py)
check their arguments, resolve the weights and load them (weights.py). Variable names follow the
official checkpoint keys (names.py).
"""

import keras

from keras_convnext import checks, names
from keras_convnext import presets as presets_lib
from keras_convnext.layers import LN_EPS, ConvNeXtPreprocessing, ConvNeXtStage, HostConstant, kernel_init, layer_norm
from keras_convnext.variants import MIN_IMAGE_SIZE, VARIANTS

POOLINGS = (None, "avg", "max")
VERSIONS = (1, 2)  # ConvNeXt (Liu et al. 2022), ConvNeXt V2 (Woo et al. 2023)
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

    The same rule as the stem's adaptation (remap.adapt_stem): one grey channel is the RGB average,
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
    preprocessing (the weights' statistics; ImageNet's by default), `norm_epsilon` of the head's
    LayerNorm (1e-6; Hugging Face checkpoints use their config's), `input_tensor`, a `keras.Input`
    to start from, and `version`: 1 for ConvNeXt, 2 for ConvNeXt V2 (GRN in every block, no layer
    scale: `layer_scale_init_value=None`). Build it through the builders, which also load weights.
    """

    def __init__(self, depths, dims, include_top=True, include_preprocessing=True, input_shape=None, pooling=None,
                 classes=1000, classifier_activation="softmax", drop_path_rate=0.0, layer_scale_init_value=1e-6,
                 head_init_scale=1.0, mean=None, std=None, norm_epsilon=LN_EPS, input_tensor=None, name=None,
                 version=1, **kwargs):
        if keras.config.image_data_format() == "channels_first":
            raise ValueError(f"{CHANNELS_FIRST} Received: image_data_format='channels_first'")
        shape = check_args(depths, dims, include_top, include_preprocessing, input_tensor, input_shape, pooling,
                            classes, classifier_activation, name, drop_path_rate, layer_scale_init_value,
                            head_init_scale, version)
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        if shape is None:
            shape = (224, 224, 3) if include_top else (None, None, 3)
        variant = variant_of(depths, dims, version)
        inputs = input_tensor if input_tensor is not None else keras.Input(shape=shape, name="images")
        x = inputs
        if include_preprocessing:
            x = ConvNeXtPreprocessing(channel_stats(presets_lib.IMAGENET_MEAN if mean is None else mean, shape[-1]),
                                      channel_stats(presets_lib.IMAGENET_STD if std is None else std, shape[-1]),
                                      name="preprocessing")(x)
        for stage, (dim, rates) in enumerate(zip(dims, drop_path_rates(depths, drop_path_rate))):
            x = ConvNeXtStage(dim, rates, layer_scale_init_value, stem=stage == 0, grn=version == 2,
                              name=names.STAGE.format(stage))(x)
        if include_top or pooling is not None:
            pool = keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
            x = pool(name=f"{pooling or 'avg'}_pool")(x)
            # pool -> norm -> head, as the official weights expect; the pooled features leave in float32.
            x = layer_norm("norm", epsilon=checks.number("norm_epsilon", norm_epsilon, 0.0, low_open=True),
                           dtype="float32")(x)
        if include_top:
            x = keras.layers.Dense(classes, kernel_initializer=kernel_init(head_init_scale),
                                   bias_initializer=HostConstant(0.0), name="head")(x)
            # A float32 activation: mixed-precision models still return float32 probabilities.
            x = keras.layers.Activation(classifier_activation, dtype="float32", name="predictions")(x)
        default_name = VARIANTS[variant].timm_name if variant else ("convnextv2" if version == 2 else "convnext")
        super().__init__(inputs, x, name=name or default_name, **kwargs)
        self.version = version
        self.depths, self.dims = depths, dims
        self.include_top, self.include_preprocessing, self.pooling = include_top, include_preprocessing, pooling
        self.image_shape = tuple(shape)
        self.classes, self.classifier_activation = classes, classifier_activation
        self.drop_path_rate, self.layer_scale_init_value = drop_path_rate, layer_scale_init_value
        self.head_init_scale, self.norm_epsilon = head_init_scale, float(norm_epsilon)
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(v) for v in std]

    def call(self, inputs, training=None, mask=None):
        """The model's layers run as the chain they are, each output let go once the next layer has it.

        The same layers in the graph's own order (images -> preprocessing -> stages -> pool -> norm ->
        head -> predictions), so the same numbers and gradients. Keras's functional executor keeps
        every layer's output until the forward ends: in eager execution (PyTorch's predict, a direct
        call) that holds the float batch, its preprocessed copy and every stage's map at once
        (ConvNeXt-T, batch 16, float32: ~45 MB more at the peak). Symbolic calls (composing the model
        into another) take Keras's graph as before (compute_output_spec).
        """
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            inputs = inputs[0]
        elif isinstance(inputs, dict) and len(inputs) == 1:
            inputs = next(iter(inputs.values()))
        if not keras.ops.is_tensor(inputs) and not hasattr(inputs, "__array__"):
            return super().call(inputs, training=training, mask=mask)
        x = keras.ops.convert_to_tensor(inputs, dtype=self.inputs[0].dtype)  # as Keras's Functional does
        for layer in self.layers[1:]:  # (layers[0] is the InputLayer)
            x = layer(x, training=training)
        return x

    @property
    def variant(self):
        """The named variant of these depths, dims and version ("tiny", "convnextv2_tiny", ...), or None."""
        return variant_of(self.depths, self.dims, self.version)

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
            "mean": self.mean, "std": self.std, "norm_epsilon": self.norm_epsilon, "version": self.version,
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


def check_args(depths, dims, include_top, include_preprocessing, input_tensor, input_shape, pooling, classes,
                classifier_activation, name, drop_path_rate, layer_scale_init_value, head_init_scale, version=1):
    """Every argument checked before any work; returns the resolved input shape (None: the default)."""
    if not isinstance(version, int) or isinstance(version, bool) or version not in VERSIONS:
        raise ValueError(f"`version` must be 1 (ConvNeXt) or 2 (ConvNeXt V2). Received: version={version!r}")
    if version == 2 and layer_scale_init_value:
        raise ValueError("ConvNeXt V2 has no layer scale (GRN replaces it): pass layer_scale_init_value=None. "
                         f"Received: layer_scale_init_value={layer_scale_init_value!r}")
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


def variant_of(depths, dims, version=1):
    """The name of the variant with these depths, dims and version, or None."""
    for variant in VARIANTS.values():
        if tuple(depths) == variant.depths and tuple(dims) == variant.dims and variant.version == version:
            return variant.name
    return None
