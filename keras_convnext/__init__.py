"""keras-convnext: ConvNeXt for Keras 3, on TensorFlow, JAX and PyTorch.

The package loads lazily (PEP 562): `import keras_convnext` imports no framework, so the command
line answers `--help` and a bad argument at once, and the first public name used loads Keras and
every module. Keras reads a `.keras` file's custom layers from a registry that only importing
their module fills (it imports no package outside its own family), so when Keras is already
imported, the package loads at once: `import keras; import keras_convnext; keras.saving.load_model(...)`
works as it always has. With Keras imported second, use a public name (`keras_convnext.ConvNeXtModel`)
before loading a file: it registers them.
"""

import importlib
import os
import sys
import types

__version__ = "0.1.0"

# Module -> its public names, in load order: backend_ops first, as it sets XLA's flags before
# JAX starts (README, Features).
_EXPORTS = {
    "keras_convnext.backend_ops": (),
    "keras_convnext.layers": ("ConvNeXtBlock", "ConvNeXtDownsample", "ConvNeXtPreprocessing", "ConvNeXtStage",
                              "GlobalResponseNorm", "StochasticDepth"),
    "keras_convnext.model": ("ConvNeXt", "ConvNeXtAtto", "ConvNeXtBase", "ConvNeXtFemto", "ConvNeXtLarge",
                             "ConvNeXtModel", "ConvNeXtNano", "ConvNeXtPico", "ConvNeXtSmall", "ConvNeXtTiny",
                             "ConvNeXtXLarge", "ConvNeXtV2", "ConvNeXtV2Atto", "ConvNeXtV2Base", "ConvNeXtV2Femto",
                             "ConvNeXtV2Huge", "ConvNeXtV2Large", "ConvNeXtV2Nano", "ConvNeXtV2Pico",
                             "ConvNeXtV2Small", "ConvNeXtV2Tiny", "feature_pyramid"),
    "keras_convnext.preprocessing": ("ImageReadError", "decode_image_bytes", "decode_predictions", "eval_transform",
                                     "imagenet_classes", "load_image", "normalize_pixels", "preprocess_input"),
    "keras_convnext.presets": ("Preset", "get_preset", "list_presets"),
    "keras_convnext.variants": ("VARIANTS", "Variant"),
    "keras_convnext.checkpoints": ("CheckpointError",),
    "keras_convnext.weights": ("DownloadError", "convert", "fetch_preset"),
    "keras_convnext.export": ("export",),
    "keras_convnext.recipes": ("AdamWLayerDecay", "Recipe", "get_recipe", "list_recipes"),
    "keras_convnext.fcmae": ("FCMAE", "RandomPatchMask", "masked_count", "patchify", "reconstruction_loss"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)

_loaded = False


def _open_triton_before_tensorflow():
    """Opens Triton's library before TensorFlow starts: in the other order the process segfaults.

    libtriton.so and libtensorflow_framework.so.2 both export LLVM's symbols, from two LLVM versions;
    libtriton.so opened after TensorFlow (by torch._dynamo, so by `import torchvision` or `import timm`)
    runs its static constructors against TensorFlow's LLVM objects (llvm::DebugCounter) and crashes.
    Opened first, it binds its own (tensorflow 2.21.0, torch 2.14.1 with triton 3.8.0). Only the
    library is opened, triton itself is not imported. Too late once TensorFlow is imported.
    """
    import importlib.util

    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return
    path = os.path.join(spec.submodule_search_locations[0], "_C", "libtriton.so")
    if os.path.isfile(path):
        import ctypes

        try:
            ctypes.CDLL(path)
        except OSError:
            pass  # a library that cannot be opened is reported by `import triton` itself, if anything imports it


def _load():
    """Imports every module (backend_ops first), which registers the layers Keras deserialises."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # a module that asks for a public name while this runs must not re-enter
    try:
        _open_triton_before_tensorflow()  # Keras may start TensorFlow, and tf.data does on every backend
        for module in _EXPORTS:
            importlib.import_module(module)
    except BaseException:
        _loaded = False
        raise


def __getattr__(name):
    if name not in _MODULE_OF:  # a submodule not imported yet: `from keras_convnext import x` then imports it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load()
    value = getattr(sys.modules[_MODULE_OF[name]], name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing a submodule binds it on its package: the submodule `export` would hide export().
        if name in _MODULE_OF and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if "keras" in sys.modules:
    _load()
