"""Classifying image files with a pretrained ConvNeXt (the `predict` command's logic)."""

import os

import numpy as np

from keras_convnext import presets as presets_lib
from keras_convnext.preprocessing import decode_predictions, load_image

DEFAULT_PRESET = "convnext_tiny.fb_in22k_ft_in1k"


def predict_files(paths, preset=None, weights=None, top=5, batch_size=8):
    """Returns [{"image", "predictions": [{"wordnet_id", "name", "probability"}]}] per image.

    Images go through the preset's evaluation transform (size, crop_pct, bicubic). With a
    checkpoint file instead of a preset, the architecture is read from the file and the
    224 px ImageNet transform is used. Names are `decode_predictions`' (keras.applications'
    spelling, "great_white_shark"), so the output joins with keras's class index as it is.
    """
    from keras_convnext import checks
    from keras_convnext import model as model_lib
    from keras_convnext import weights as weights_lib

    # Everything the user gave is checked, and every image read, before a checkpoint is fetched or a model built.
    checks.integer("top", top, minimum=1, maximum=1000)
    checks.integer("batch_size", batch_size, minimum=1)
    if isinstance(paths, (str, bytes)) or not paths:
        raise ValueError(f"`paths` must be a non-empty list of image files. Received: paths={paths!r}")
    if weights is not None and preset is not None:
        raise ValueError(f"Pass `preset` or `weights`, not both. Received: preset={preset!r}, weights={weights!r}")
    if weights is None:
        preset_obj = presets_lib.get_preset(preset or DEFAULT_PRESET)
        if preset_obj.classes != 1000:
            raise ValueError(
                "`predict` names ImageNet-1k classes; this preset has "
                f"{preset_obj.classes}. Received: preset={preset!r}"
            )
        transform = {"preset": preset_obj}
    else:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise ValueError(f"No checkpoint file at this path. Received: weights={weights!r}")
        transform = {}
    images = np.stack([load_image(p, **transform) for p in paths])

    if weights is None:
        builder = getattr(model_lib, model_lib.VARIANTS[preset_obj.variant].builder_name)
        model = builder(weights=preset_obj.name)
    else:
        layers, info = weights_lib.read_weights(weights)
        if layers is None:
            raise ValueError(
                "`predict --weights` takes a checkpoint or a .keras file, not a bare .weights.h5 "
                f"(which holds no architecture). Received: weights={weights!r}"
            )
        architecture = weights_lib.architecture_of(layers)
        depths, dims, classes = architecture
        if classes != 1000:
            raise ValueError(
                "`predict` names ImageNet-1k classes; this checkpoint's head has "
                f"{classes} outputs. Received: weights={weights!r}"
            )
        channels = weights_lib.stem_channels(layers)
        if channels != 3:
            raise ValueError(
                f"`predict` classifies RGB images; this checkpoint's stem takes {channels} input channels. "
                f"Received: weights={weights!r}"
            )
        if architecture.version == 2:
            model = model_lib.ConvNeXtV2(depths, dims, weights=weights)
        else:
            model = model_lib.ConvNeXt(depths, dims, weights=weights)
    probs = model.predict(images, batch_size=batch_size, verbose=0)
    return [
        {"image": str(path),
         "predictions": [{"wordnet_id": w, "name": n, "probability": round(p, 6)} for w, n, p in decoded]}
        for path, decoded in zip(paths, decode_predictions(probs, top=top))
    ]
