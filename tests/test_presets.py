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


V2_SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


def test_registry_holds_every_public_checkpoint():
    names = set(presets_lib.PRESETS)
    assert len(names) == 33 + 26  # ConvNeXt, ConvNeXt V2
    for variant in ("tiny", "small", "base", "large"):
        assert {f"convnext_{variant}.fb_in1k", f"convnext_{variant}.fb_in22k",
                f"convnext_{variant}.fb_in22k_ft_in1k", f"convnext_{variant}.fb_in22k_ft_in1k_384"} <= names
    assert {"convnext_base.fb_in1k_384", "convnext_large.fb_in1k_384", "convnext_atto.d2_in1k",
            "convnext_femto.d1_in1k", "convnext_pico.d1_in1k", "convnext_nano.d1h_in1k",
            "convnext_xlarge.fb_in22k_ft_in1k_384", "convnext_tiny.in12k_ft_in1k"} <= names
    assert "convnext_tiny.fb_in1k_384" not in names and "convnext_xlarge.fb_in1k" not in names
    for name, file in OFFICIAL_FILES.items():
        assert presets_lib.PRESETS[name].url == "https://dl.fbaipublicfiles.com/convnext/" + file


def test_registry_holds_every_convnext_v2_tag():
    names = {n for n in presets_lib.PRESETS if n.startswith("convnextv2_")}
    want = {f"convnextv2_{v}.{tag}" for v in V2_SIZES for tag in ("fcmae", "fcmae_ft_in1k")}
    want |= {f"convnextv2_{v}.{tag}" for v in ("nano", "tiny", "base", "large")
             for tag in ("fcmae_ft_in22k_in1k", "fcmae_ft_in22k_in1k_384")}
    want |= {"convnextv2_huge.fcmae_ft_in22k_in1k_384", "convnextv2_huge.fcmae_ft_in22k_in1k_512"}
    assert names == want and len(want) == 26
    assert not [n for n in names if n.startswith("convnextv2_small.")]  # timm's small is untrained


V2_OFFICIAL_FILES = {  # (timm's default configs name these as the sources of its hub copies)
    "convnextv2_atto.fcmae": "pt_only/convnextv2_atto_1k_224_fcmae.pt",
    "convnextv2_huge.fcmae_ft_in1k": "im1k/convnextv2_huge_1k_224_ema.pt",
    "convnextv2_nano.fcmae_ft_in22k_in1k": "im22k/convnextv2_nano_22k_224_ema.pt",
    "convnextv2_large.fcmae_ft_in22k_in1k_384": "im22k/convnextv2_large_22k_384_ema.pt",
    "convnextv2_huge.fcmae_ft_in22k_in1k_512": "im22k/convnextv2_huge_22k_512_ema.pt",
}


def test_v2_presets_carry_their_sources_figures_and_licence():
    p = presets_lib.PRESETS
    for name, file in V2_OFFICIAL_FILES.items():
        assert p[name].source_url == "https://dl.fbaipublicfiles.com/convnext/convnextv2/" + file
        assert p[name].url == f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors"
    scores = {"atto": 76.7, "femto": 78.5, "pico": 80.3, "nano": 81.9, "tiny": 83.0, "base": 84.9, "large": 85.8,
              "huge": 86.3}
    for v, top1 in scores.items():
        assert p[f"convnextv2_{v}.fcmae_ft_in1k"].top1 == top1
        assert p[f"convnextv2_{v}.fcmae"].top1 is None and p[f"convnextv2_{v}.fcmae"].classes is None
    for v, (at224, at384) in {"nano": (82.1, 83.4), "tiny": (83.9, 85.1), "base": (86.8, 87.7),
                              "large": (87.3, 88.2)}.items():
        assert (p[f"convnextv2_{v}.fcmae_ft_in22k_in1k"].top1, p[f"convnextv2_{v}.fcmae_ft_in22k_in1k_384"].top1) == (
            at224, at384)
    assert p["convnextv2_huge.fcmae_ft_in22k_in1k_384"].top1 == 88.7
    huge = p["convnextv2_huge.fcmae_ft_in22k_in1k_512"]
    assert (huge.top1, huge.image_size, huge.crop_pct, huge.crop_mode) == (88.9, 512, 1.0, "squash")


def test_the_v2_licence_is_said_wherever_a_preset_is_shown():
    for preset in kc.list_presets():
        v2 = preset.variant.startswith("convnextv2_")
        assert (preset.license == "CC-BY-NC-4.0") == v2 and preset.non_commercial == v2
        assert preset.license in preset.description and ("non-commercial use only" in preset.description) == v2
        assert f"license='{preset.license}'" in repr(preset)
    rows = presets_lib.table().splitlines()
    assert rows[0].split(" | ")[5] == "licence"
    assert len(rows) == 2 + len(presets_lib.PRESETS)
    for row in rows[2:]:
        assert ("CC-BY-NC-4.0 (non-commercial)" in row) == row.startswith("| `convnextv2_")
    assert ("| `convnextv2_atto.fcmae` | convnextv2_atto | none (encoder) | 224 / 0.875 | n/a (encoder) | "
            "CC-BY-NC-4.0 (non-commercial) |") in rows[2 + list(presets_lib.PRESETS).index("convnextv2_atto.fcmae")]


@pytest.mark.parametrize("preset", kc.list_presets(), ids=lambda p: p.name)
def test_every_preset_is_complete(preset):
    variant = kc.VARIANTS[preset.variant]
    assert preset.name.startswith(f"{variant.timm_name}.")  # convnext_tiny., convnextv2_tiny.
    assert preset.version == variant.version
    assert preset.url.startswith("https://")
    assert preset.format in ("official", "timm", "keras_h5")
    encoder = preset.name.endswith(".fcmae")
    assert preset.classes == (None if encoder else 21841 if preset.name.endswith(".fb_in22k") else 1000)
    assert preset.image_size == (512 if "512" in preset.name else 384 if "384" in preset.name else 224)
    big = preset.image_size >= 384
    assert preset.crop_pct == (1.0 if big else preset.crop_pct) and 0.8 < preset.crop_pct <= 1
    assert preset.crop_mode == ("squash" if big else "center")
    assert preset.top1 is None or 75 < preset.top1 < 89
    assert (preset.top1 is None) == (encoder or preset.classes == 21841 or "in12k" in preset.name)
    assert preset.license and preset.interpolation == "bicubic"
    if variant.version == 2:
        assert preset.license == "CC-BY-NC-4.0" and preset.format == "timm"
        assert preset.source_url.startswith("https://dl.fbaipublicfiles.com/convnext/convnextv2/")
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
    assert set(presets_lib.IMAGENET_DEFAULT) == set(kc.VARIANTS) - {"convnextv2_small"}
    for variant, name in presets_lib.IMAGENET_DEFAULT.items():
        preset = presets_lib.PRESETS[name]
        assert preset.variant == variant and preset.classes == 1000 and preset.image_size == 224
        # the best 1000-class 224 px checkpoint of its variant
        rivals = [p.top1 for p in kc.list_presets(variant) if p.classes == 1000 and p.image_size == 224 and p.top1]
        assert preset.top1 == max(rivals, default=None)
    assert presets_lib.IMAGENET_DEFAULT["convnextv2_tiny"] == "convnextv2_tiny.fcmae_ft_in22k_in1k"
    assert presets_lib.IMAGENET_DEFAULT["convnextv2_huge"] == "convnextv2_huge.fcmae_ft_in1k"
    with pytest.raises(ValueError, match=r"ConvNeXt V2-Small has no published ImageNet weights.*"
                                         r"Received: weights='imagenet'"):
        kc.ConvNeXtV2Small(weights="imagenet")
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


def test_a_v2_preset_sets_its_input_size_and_takes_its_own_builder(monkeypatch):
    seen = {}
    monkeypatch.setattr(weights_lib, "load_weights", lambda model, weights, **kw: seen.update(kw, weights=weights))
    model = kc.ConvNeXtV2Nano(weights="convnextv2_nano.fcmae_ft_in22k_in1k_384")
    assert seen["preset"].name == "convnextv2_nano.fcmae_ft_in22k_in1k_384" and model.version == 2
    assert model.input_shape == (None, 384, 384, 3)
    kc.ConvNeXtV2Atto(weights="imagenet")
    assert seen["preset"].name == "convnextv2_atto.fcmae_ft_in1k"
    with pytest.raises(ValueError, match=r"holds ConvNeXt V2-Atto weights, not ConvNeXt-Atto: use ConvNeXtV2Atto"):
        kc.ConvNeXtAtto(weights="convnextv2_atto.fcmae")


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Valid presets: .*convnext_atto.d2_in1k.*Received: preset='nope'"):
        kc.get_preset("nope")
