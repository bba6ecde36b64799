"""ConvNeXt and ConvNeXt V2 as keras-hub models: a `FeaturePyramidBackbone`, an `ImageClassifier` and its
preprocessing, for keras-hub's dense tasks (DeepLabV3, RetinaNet) and presets.

Built from this package's own layers (`ConvNeXtStage`, `layer_norm`) under this package's layer names
(names.py), so every checkpoint the package reads fills them: `ConvNeXtBackbone.from_convnext(model)` copies a
keras_convnext model's weights, `from_weights(preset or file)` reads any supported checkpoint. keras-hub's
convention: a backbone takes already-converted pixels, the `ImageConverter` does `x * scale + offset`
(scale = 1 / (255 std), offset = -mean / std, the preset's statistics). Needs the `hub` extra.
"""

import os

try:
    import keras_hub
except ImportError as e:  # the extra is optional: say how to get it
    raise ImportError("keras_convnext.hub needs keras-hub: pip install 'keras-convnext[hub]'") from e

import keras
import numpy as np

from keras_convnext import checks, names
from keras_convnext import presets as presets_lib
from keras_convnext.backbone import CHANNELS_FIRST, channel_stats, check_args, drop_path_rates
from keras_convnext.layers import LN_EPS, ConvNeXtStage, HostConstant, kernel_init, layer_norm
from keras_convnext.model import PYRAMID_LEVELS
from keras_convnext.variants import VARIANTS

PACKAGE = "keras_convnext"
_AUTO = "auto"


def _official_variables(model):
    """{official key: variable} of a model's contract variables (names.py), whatever model wraps them."""
    out = {}
    for variable in model.weights:
        key = names.official_key(variable.path)
        if key is not None:
            if key in out:
                raise ValueError(f"{model.name!r} holds two variables for {key!r}. Received: model={model.name!r}")
            out[key] = variable
    return out


def _copy(source, target, keys, optional=()):
    """Assigns `target`'s contract variables `keys` from `source`'s, strictly: every one found, every shape equal.

    Keys starting with an `optional` prefix that `source` lacks are left as they are (e.g. the pyramid's norms,
    which classification checkpoints do not have: they start at identity, as in the official dense backbones).
    """
    src = _official_variables(source)
    pairs = []
    for key in keys:
        variable = target[key]
        if key not in src:
            if key.startswith(optional):
                continue
            raise ValueError(f"{source.name!r} has no variable for {key!r} ({variable.path}): is it a keras_convnext "
                             f"model of the same depths and dims? Received: model={source.name!r}")
        if tuple(src[key].shape) != tuple(variable.shape):
            raise ValueError(f"{key!r}: {source.name!r} holds shape {tuple(src[key].shape)}, the keras-hub model "
                             f"expects {tuple(variable.shape)}. Received: model={source.name!r}")
        pairs.append((variable, src[key]))
    for variable, value in pairs:
        # Through a host copy: on JAX two variables sharing one buffer lose it when a jitted step donates it.
        variable.assign(np.asarray(keras.ops.convert_to_numpy(value), dtype=variable.dtype))


def _check_convnext(model):
    if not isinstance(model, keras.Model) or not all(hasattr(model, a) for a in ("depths", "dims", "version")):
        raise ValueError("Expected a keras_convnext model (ConvNeXtModel: any builder, `keras.saving.load_model`). "
                         f"Received: model={type(model).__name__}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtBackbone(keras_hub.models.FeaturePyramidBackbone):
    """ConvNeXt (V1 or V2) as a keras-hub feature pyramid backbone.

    The graph: `images` (converted pixels) -> `stages_0`..`stages_3` (ConvNeXtStage); the output is the last
    stage's map (N, H/32, W/32, dims[3]), what the classifier pools, as ResNetBackbone's. `pyramid_outputs`
    is `{"P2": .., "P5": ..}`, strides 4..32, each stage's map through its own LayerNorm (`norm0`..`norm3`),
    as the official detection and segmentation backbones have them (starting at identity). Those norms lie
    off the output's path: the model holds them as `pyramid_norms`, so they are saved and trained with it.

    Args:
        depths: blocks per stage, four integers.
        dims: channels per stage, four integers.
        version: 1 (ConvNeXt) or 2 (ConvNeXt V2: GRN in every block, no layer scale).
        drop_path_rate: stochastic depth of the last block, earlier blocks linearly less.
        layer_scale_init_value: initial layer scale; "auto": 1e-6 for version 1, None for version 2.
        image_shape: (height, width, channels), at least 32 px where known.
        norm_epsilon: epsilon of the pyramid's LayerNorms (1e-6, as the official dense backbones).
        dtype: the dtype policy of the layers' computations and weights.

    Example:
    ```python
    backbone = ConvNeXtBackbone.from_weights("convnext_tiny.fb_in22k_ft_in1k")
    encoder = keras_hub.models.DeepLabV3Backbone(image_encoder=backbone, spatial_pyramid_pooling_key="P5",
                                                  low_level_feature_key="P2", upsampling_size=8,
                                                  dilation_rates=[6, 12, 18])
    ```
    """

    def __init__(self, depths, dims, version=1, drop_path_rate=0.0, layer_scale_init_value=_AUTO,
                 image_shape=(None, None, 3), norm_epsilon=LN_EPS, dtype=None, **kwargs):
        if keras.config.image_data_format() == "channels_first":
            raise ValueError(f"{CHANNELS_FIRST} Received: image_data_format='channels_first'")
        if isinstance(layer_scale_init_value, str):
            if layer_scale_init_value != _AUTO:
                raise ValueError("`layer_scale_init_value` must be a number, None or 'auto'. "
                                 f"Received: layer_scale_init_value={layer_scale_init_value!r}")
            layer_scale_init_value = None if version == 2 else 1e-6
        if not isinstance(image_shape, (list, tuple)):
            raise ValueError(f"`image_shape` must be (height, width, channels). Received: image_shape={image_shape!r}")
        # The package's own argument checks (stages, rates, shapes), with no top and no preprocessing.
        shape = check_args(depths, dims, False, False, None, tuple(image_shape), None, 1, None, None, drop_path_rate,
                           layer_scale_init_value, 1.0, version)
        norm_epsilon = checks.number("norm_epsilon", norm_epsilon, 0.0, low_open=True)
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)

        # === Layers ===
        stages = [ConvNeXtStage(dim, rates, layer_scale_init_value, stem=i == 0, grn=version == 2,
                                name=names.STAGE.format(i), dtype=dtype)
                  for i, (dim, rates) in enumerate(zip(dims, drop_path_rates(depths, drop_path_rate)))]
        pyramid_norms = [layer_norm(names.PYRAMID_NORM.format(i), epsilon=norm_epsilon, dtype=dtype)
                         for i in range(4)]

        # === Functional model ===
        image_input = keras.Input(shape=shape, name="images")
        x, pyramid = image_input, {}
        for level, stage, norm in zip(PYRAMID_LEVELS, stages, pyramid_norms):
            x = stage(x)  # (N, H / 2^level, W / 2^level, dim)
            pyramid[level] = norm(x)
        kwargs.setdefault("name", "convnextv2_backbone" if version == 2 else "convnext_backbone")
        super().__init__(inputs=image_input, outputs=x, dtype=dtype, **kwargs)

        # === Config ===
        self.depths, self.dims, self.version = list(depths), list(dims), version
        self.drop_path_rate = float(drop_path_rate)
        self.layer_scale_init_value = layer_scale_init_value
        self.image_shape = tuple(shape)
        self.norm_epsilon = float(norm_epsilon)
        self.pyramid_norms = pyramid_norms  # off the output's path: tracked here, so saved and trained
        self.pyramid_outputs = pyramid

    def get_config(self):
        config = super().get_config()
        config.update({
            "depths": list(self.depths), "dims": list(self.dims), "version": self.version,
            "drop_path_rate": self.drop_path_rate, "layer_scale_init_value": self.layer_scale_init_value,
            "image_shape": list(self.image_shape), "norm_epsilon": self.norm_epsilon,
        })
        return config

    @property
    def stages(self):
        """The four ConvNeXtStage layers."""
        return [self.get_layer(names.STAGE.format(i)) for i in range(4)]

    @classmethod
    def from_variant(cls, variant, **kwargs):
        """A randomly initialised backbone of a named variant ("tiny", "convnextv2_tiny", ...)."""
        if variant not in VARIANTS:
            raise ValueError(f"Unknown variant. Valid values: {', '.join(VARIANTS)}. Received: variant={variant!r}")
        v = VARIANTS[variant]
        return cls(v.depths, v.dims, version=v.version, **kwargs)

    @classmethod
    def from_convnext(cls, model, image_shape=None, **kwargs):
        """A backbone with the stage weights of a keras_convnext model, copied by their official keys.

        `model`: a ConvNeXtModel (any builder, `keras.saving.load_model`), whose pyramid norms then start at
        identity (a classifier has none), or another ConvNeXtBackbone, whose pyramid norms come too.
        `image_shape` defaults to (None, None, the model's input channels).
        """
        _check_convnext(model)
        channels = model.input.shape[-1] if not isinstance(model.input, dict) else 3
        backbone = cls(model.depths, model.dims, version=model.version,
                       layer_scale_init_value=model.layer_scale_init_value,
                       image_shape=image_shape or (None, None, channels), **kwargs)
        target = _official_variables(backbone)
        _copy(model, target, list(target), optional=tuple(f"norm{i}." for i in range(4)))
        return backbone

    @classmethod
    def from_weights(cls, weights, **kwargs):
        """A backbone from a preset name (`keras_convnext.list_presets()`) or a checkpoint file of any supported
        format (the architecture is read from it)."""
        return cls.from_convnext(load_convnext(weights), **kwargs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtImageConverter(keras_hub.layers.ImageConverter):
    """keras-hub's ImageConverter for ConvNeXt: resize, then `x * scale + offset` with the weights' statistics.

    `for_preset(name)` carries a preset's size, interpolation, mean and std (`scale = 1 / (255 std)`,
    `offset = -mean / std`, per channel). Note: keras-hub resizes (with `crop_to_aspect_ratio`, a centre crop
    to the aspect ratio) to the size; it has no crop fraction, unlike the official evaluation transform
    (`keras_convnext.eval_transform`: resize to size / crop_pct, then a centre crop).
    """

    backbone_cls = ConvNeXtBackbone

    @classmethod
    def for_stats(cls, mean=presets_lib.IMAGENET_MEAN, std=presets_lib.IMAGENET_STD, image_size=None, channels=3,
                  **kwargs):
        """A converter taking [0, 255] pixels to `(x / 255 - mean) / std` (`channel_stats` for other channel counts)."""
        mean, std = channel_stats(mean, channels), channel_stats(std, channels)
        if min(std) <= 0:
            raise ValueError(f"`std` must be positive. Received: std={std}")
        scale = [1.0 / (255.0 * s) for s in std]
        offset = [-m / s for m, s in zip(mean, std)]
        if image_size is not None and not isinstance(image_size, (list, tuple)):
            image_size = (int(image_size), int(image_size))
        return cls(image_size=image_size, scale=scale, offset=offset, **kwargs)

    @classmethod
    def for_preset(cls, name, **kwargs):
        """The converter of a keras_convnext preset: its size, interpolation, mean and std."""
        preset = presets_lib.get_preset(name)
        kwargs.setdefault("interpolation", preset.interpolation)
        return cls.for_stats(preset.mean, preset.std, image_size=preset.image_size, **kwargs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtImageClassifierPreprocessor(keras_hub.models.ImageClassifierPreprocessor):
    """keras-hub's image classification preprocessing with a `ConvNeXtImageConverter`."""

    backbone_cls = ConvNeXtBackbone
    image_converter_cls = ConvNeXtImageConverter


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtImageClassifier(keras_hub.models.ImageClassifier):
    """ConvNeXt classification: backbone -> pool -> LayerNorm -> dropout -> Dense.

    pool -> norm -> head, as the official weights expect (keras-hub's ImageClassifier has no norm, so this
    builds its own graph, as keras-hub's SwinTransformerImageClassifier does). The norm and the head are named
    `norm` and `head`, the official keys, so `from_convnext(model)` copies a keras_convnext classifier whole.

    Args:
        backbone: a `ConvNeXtBackbone`.
        num_classes: classes of the head.
        preprocessor: None or a `ConvNeXtImageClassifierPreprocessor`.
        pooling: "avg" or "max".
        activation: the head's activation (None: logits).
        dropout: dropout before the head.
        norm_epsilon: epsilon of the head's LayerNorm (1e-6; Hugging Face checkpoints carry their own).
        head_dtype: dtype policy of the head (default: the backbone's); the norm computes in float32.
    """

    backbone_cls = ConvNeXtBackbone
    preprocessor_cls = ConvNeXtImageClassifierPreprocessor

    def __init__(self, backbone, num_classes, preprocessor=None, pooling="avg", activation=None, dropout=0.0,
                 norm_epsilon=LN_EPS, head_dtype=None, **kwargs):
        checks.choice("pooling", pooling, ("avg", "max"))
        checks.integer("num_classes", num_classes, minimum=1)
        norm_epsilon = checks.number("norm_epsilon", norm_epsilon, 0.0, low_open=True)
        head_dtype = head_dtype or backbone.dtype_policy

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        pool = keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
        self.pooler = pool(dtype=head_dtype, name="pooler")
        # The pooled features normalised in float32, as keras_convnext's ConvNeXtModel does.
        self.norm = layer_norm("norm", epsilon=norm_epsilon, dtype="float32")
        self.output_dropout = keras.layers.Dropout(dropout, dtype=head_dtype, name="output_dropout")
        self.output_dense = keras.layers.Dense(num_classes, activation=activation, kernel_initializer=kernel_init(),
                                               bias_initializer=HostConstant(0.0), dtype=head_dtype, name="head")

        # === Functional model ===
        inputs = self.backbone.input
        x = self.backbone(inputs)
        x = self.norm(self.pooler(x))
        outputs = self.output_dense(self.output_dropout(x))
        keras_hub.models.Task.__init__(self, inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes, self.activation, self.pooling = num_classes, activation, pooling
        self.dropout, self.norm_epsilon = dropout, float(norm_epsilon)

    def get_config(self):
        config = super().get_config()  # ImageClassifier's: backbone, preprocessor, name, classes, pooling, ...
        config.update({"norm_epsilon": self.norm_epsilon})
        return config

    @classmethod
    def from_convnext(cls, model, preprocessor="auto", **kwargs):
        """The classifier of a keras_convnext model with its top: the same weights, the same logits.

        `preprocessor="auto"`: a `ConvNeXtImageClassifierPreprocessor` with the model's statistics (and its
        input size where fixed); None for none. The model's own activation is not copied: keras-hub's
        classifiers return logits unless `activation` is given.
        """
        _check_convnext(model)
        if not model.include_top:
            raise ValueError("The model has no top (include_top=False): use ConvNeXtBackbone.from_convnext. "
                             f"Received: model={model.name!r}")
        backbone = ConvNeXtBackbone.from_convnext(model)
        if preprocessor == "auto":
            preprocessor = preprocessor_of(model)
        classifier = cls(backbone, model.classes, preprocessor=preprocessor, pooling=model.pooling or "avg",
                         norm_epsilon=model.norm_epsilon, **kwargs)
        target = {k: v for k, v in _official_variables(classifier).items() if k.split(".")[0] in ("norm", "head")}
        _copy(model, target, list(target))
        return classifier

    @classmethod
    def from_weights(cls, weights, **kwargs):
        """The classifier of a preset name or a checkpoint file with a head."""
        return cls.from_convnext(load_convnext(weights), **kwargs)


def preprocessor_of(model):
    """The `ConvNeXtImageClassifierPreprocessor` of a keras_convnext model: its mean, std and (fixed) size."""
    _check_convnext(model)
    height, width, channels = model.image_shape
    size = (height, width) if height and width else None
    converter = ConvNeXtImageConverter.for_stats(model.mean or presets_lib.IMAGENET_MEAN,
                                                 model.std or presets_lib.IMAGENET_STD, image_size=size,
                                                 channels=channels, interpolation="bicubic")
    return ConvNeXtImageClassifierPreprocessor(image_converter=converter)


def load_convnext(weights, variant=None):
    """A keras_convnext model from a preset name or a checkpoint file of any supported format.

    A preset is the package's converted `.keras` (`fetch_preset`: downloaded and converted once); a file is
    converted with `keras_convnext.convert` (the architecture read from it, every tensor checked), in a
    private temporary folder beside nothing the user owns.
    """
    import tempfile

    from keras_convnext import weights as weights_lib

    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"`weights` must be a preset name or a checkpoint file path. Received: weights={weights!r}")
    weights = os.fspath(weights)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"Unknown variant. Valid values: {', '.join(VARIANTS)}. Received: variant={variant!r}")
    if weights in presets_lib.PRESETS:
        preset = presets_lib.PRESETS[weights]
        if variant is not None and preset.variant != variant:
            raise ValueError(f"Preset {weights!r} holds {VARIANTS[preset.variant].title} weights, not "
                             f"{VARIANTS[variant].title}. Received: variant={variant!r}")
        return weights_lib.load_keras_model(weights_lib.fetch_preset(preset))
    if not os.path.isfile(weights):
        raise ValueError(f"No checkpoint file or preset of that name. Received: weights={weights!r}")
    with tempfile.TemporaryDirectory(prefix="keras_convnext-hub-") as folder:
        path = weights_lib.convert(weights, os.path.join(folder, "model.keras"), variant=variant)
        return weights_lib.load_keras_model(path)


def save_preset(weights, preset_dir, variant=None, overwrite=False):
    """Writes a keras-hub preset folder from a preset name or a checkpoint file: `keras-convnext convert
    SRC DIR --format keras_hub`.

    A checkpoint with a head gives the whole `ConvNeXtImageClassifier` (task.json, its weights, the backbone,
    the preprocessor with the weights' statistics), so both `keras_hub.models.Backbone.from_preset(DIR)` and
    `keras_hub.models.ImageClassifier.from_preset(DIR)` load it; an encoder (no head) gives the backbone and
    the preprocessor. Written aside and renamed (files.atomic_path): a reader sees the old folder or the new.
    """
    from keras_convnext import files

    preset_dir = os.fspath(preset_dir)
    checks.boolean("overwrite", overwrite)
    if os.path.exists(preset_dir) and not overwrite:
        raise ValueError("The output exists; pass overwrite=True (--overwrite) to replace it. "
                         f"Received: dst={preset_dir!r}")
    if os.path.exists(preset_dir) and not os.path.isdir(preset_dir):
        raise ValueError(f"The output of a keras-hub preset is a folder; this is a file. Received: dst={preset_dir!r}")
    model = load_convnext(weights, variant=variant)
    if isinstance(weights, str) and weights in presets_lib.PRESETS:
        preset = presets_lib.PRESETS[weights]
        converter = ConvNeXtImageConverter.for_preset(preset.name)
        preprocessor = ConvNeXtImageClassifierPreprocessor(image_converter=converter)
    else:
        preprocessor = preprocessor_of(model)
    if model.include_top:
        task = ConvNeXtImageClassifier.from_convnext(model, preprocessor=preprocessor)
    else:
        task = None
        backbone = ConvNeXtBackbone.from_convnext(model)
    with files.atomic_path(preset_dir, directory=True) as tmp:
        if task is not None:
            task.save_to_preset(tmp)
        else:
            backbone.save_to_preset(tmp)
            preprocessor.save_to_preset(tmp)
    return preset_dir
