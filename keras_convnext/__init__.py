"""keras-convnext: ConvNeXt for Keras 3, on TensorFlow, JAX and PyTorch."""

from keras_convnext import backend_ops  # noqa: F401  (first: sets XLA's CPU schedule before JAX starts)
from keras_convnext.layers import ConvNeXtBlock, ConvNeXtDownsample, ConvNeXtPreprocessing, ConvNeXtStage, StochasticDepth
from keras_convnext.model import (
    ConvNeXt,
    ConvNeXtAtto,
    ConvNeXtBase,
    ConvNeXtFemto,
    ConvNeXtLarge,
    ConvNeXtModel,
    ConvNeXtNano,
    ConvNeXtPico,
    ConvNeXtSmall,
    ConvNeXtTiny,
    ConvNeXtXLarge,
    feature_pyramid,
)
from keras_convnext.preprocessing import (
    ImageReadError,
    decode_image_bytes,
    decode_predictions,
    eval_transform,
    imagenet_classes,
    load_image,
    preprocess_input,
)
from keras_convnext.presets import Preset, get_preset, list_presets
from keras_convnext.variants import VARIANTS, Variant

from keras_convnext.checkpoints import CheckpointError
from keras_convnext.weights import DownloadError, convert, fetch_preset
from keras_convnext.export import export
from keras_convnext.recipes import AdamWLayerDecay, Recipe, get_recipe, list_recipes

__version__ = "0.1.0"
