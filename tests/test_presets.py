import re

import pytest

import keras_convnext as kc
from keras_convnext import presets as presets_lib
from keras_convnext import weights as weights_lib

OFFICIAL_FILES = {
    "convnext_tiny.fb_in1k": "convnext_tiny_1k_224_ema.pth",
    "convnext_large.fb_in1k_384": "convnext_large_1k_384.pth",
    "convnext_xlarge.fb_in22k": "convnext_xlarge_22k_224.pth",
    "convnext_small.fb_in22k_ft_in1k": "convnext_small_22k_1k_224.pth",
    "convnext_xlarge.fb_in22k_ft_in1k": "convnext_xlarge_22k_1k_224_ema.pth",
    "convnext_xlarge.fb_in22k_ft_in1k_384": "convnext_xlarge_22k_1k_384_ema.pth",
}


def test_registry_holds_every_public_checkpoint():
    names = set(presets_lib.PRESETS)
    assert len(names) == 33
    for variant in ("tiny", "small", "base", "large"):
        assert {f"convnext_{variant}.fb_in1k", f"convnext_{variant}.fb_in22k",
                f"convnext_{variant}.fb_in22k_ft_in1k", f"convnext_{variant}.fb_in22k_ft_in1k_384"} <= names
    assert {"convnext_base.fb_in1k_384", "convnext_large.fb_in1k_384", "convnext_atto.d2_in1k",
            "convnext_femto.d1_in1k", "convnext_pico.d1_in1k", "convnext_nano.d1h_in1k",
            "convnext_xlarge.fb_in22k_ft_in1k_384", "convnext_tiny.in12k_ft_in1k"} <= names
    assert "convnext_tiny.fb_in1k_384" not in names and "convnext_xlarge.fb_in1k" not in names
    for name, file in OFFICIAL_FILES.items():
        assert presets_lib.PRESETS[name].url == "https://dl.fbaipublicfiles.com/convnext/" + file


@pytest.mark.parametrize("preset", kc.list_presets(), ids=lambda p: p.name)
def test_every_preset_is_complete(preset):
    assert preset.variant in kc.VARIANTS and preset.name.startswith(f"convnext_{preset.variant}.")
    assert preset.url.startswith("https://")
    assert preset.format in ("official", "timm", "keras_h5")
    assert preset.classes == (21841 if preset.name.endswith(".fb_in22k") else 1000)
    assert preset.image_size == (384 if "384" in preset.name else 224)
    assert preset.crop_pct == (1.0 if preset.image_size == 384 else preset.crop_pct) and 0.8 < preset.crop_pct <= 1
    assert preset.crop_mode == ("squash" if preset.image_size == 384 else "center")
    assert preset.top1 is None or 75 < preset.top1 < 88
    assert preset.license and preset.interpolation == "bicubic"
    if preset.sha256:
        assert re.fullmatch(r"[0-9a-f]{64}", preset.sha256)
    if preset.format == "timm" and "releases" in preset.url:
        assert re.fullmatch(r"[0-9a-f]{8}", preset.sha256_prefix) and preset.sha256_prefix in preset.url


def test_reported_scores():
    p = presets_lib.PRESETS
    assert p["convnext_tiny.fb_in1k"].top1 == 82.1
    assert p["convnext_xlarge.fb_in22k_ft_in1k_384"].top1 == 87.8
    assert p["convnext_nano.d1h_in1k"].crop_pct == 0.95 and p["convnext_nano.d1h_in1k"].top1 == 80.76
    assert p["convnext_tiny.keras_in1k"].sha256.startswith("8ae6e78c")


def test_imagenet_default_per_variant():
    for variant, name in presets_lib.IMAGENET_DEFAULT.items():
        preset = presets_lib.PRESETS[name]
        assert preset.variant == variant and preset.classes == 1000 and preset.image_size == 224
    assert presets_lib.IMAGENET_DEFAULT["tiny"] == "convnext_tiny.fb_in22k_ft_in1k"
    assert presets_lib.IMAGENET_DEFAULT["atto"] == "convnext_atto.d2_in1k"
    assert [p.name for p in kc.list_presets("atto")] == ["convnext_atto.d2_in1k"]


def test_preset_sets_input_size_and_preprocessing(monkeypatch):
    seen = {}
    monkeypatch.setattr(weights_lib, "load_weights", lambda model, weights, **kw: seen.update(kw, weights=weights))
    model = kc.ConvNeXtTiny(weights="convnext_tiny.fb_in22k_ft_in1k_384")
    assert model.input_shape == (None, 384, 384, 3)
    assert seen["preset"].name == "convnext_tiny.fb_in22k_ft_in1k_384"
    layer = model.get_layer("preprocessing")
    assert layer.mean == list(presets_lib.IMAGENET_MEAN) and layer.std == list(presets_lib.IMAGENET_STD)
    assert kc.ConvNeXtTiny(weights="imagenet", include_top=False).input_shape == (None, None, None, 3)
    assert seen["preset"].name == "convnext_tiny.fb_in22k_ft_in1k"


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Valid presets: .*convnext_atto.d2_in1k.*Received: preset='nope'"):
        kc.get_preset("nope")
