"""The preset registry: every public ConvNeXt checkpoint, with the facts that travel with it.

Names follow timm's tags (`convnext_tiny.fb_in22k_ft_in1k`, `convnextv2_tiny.fcmae_ft_in1k`). Each
entry carries its source, its integrity check, its licence and the preprocessing its numbers were
measured with, so no call site re-types a mean, a crop fraction or a resolution. Facts from
../shared/WEIGHTS.md and ../shared/CONVNEXT.md ("ConvNeXt V2"); the V2 URLs and eval settings are
timm's `convnextv2_*` default configs. ConvNeXt V2's weights are licensed CC-BY-NC 4.0
(non-commercial use only), which every place that shows a preset says.
"""

import dataclasses

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FB_URL = "https://dl.fbaipublicfiles.com/convnext/"
FB_V2_URL = "https://dl.fbaipublicfiles.com/convnext/convnextv2/"  # facebookresearch/ConvNeXt-V2's releases
TIMM_RELEASE_URL = (
    "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
)
KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/convnext/"
HF_URL = "https://huggingface.co/timm/{tag}/resolve/main/model.safetensors"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    variant: str
    url: str
    format: str  # "official", "timm" or "keras_h5"
    classes: int | None  # None: an encoder, no head (ConvNeXt V2's `.fcmae`)
    image_size: int
    crop_pct: float
    top1: float | None
    license: str
    sha256: str | None = None  # full hash, where the host publishes one
    sha256_prefix: str | None = None  # timm release files carry the hash's first 8 hex digits
    notop_url: str | None = None
    notop_sha256: str | None = None
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    # The original release `url` was converted from (timm's hub copies of the ConvNeXt V2 files), for reference.
    source_url: str | None = None

    @property
    def version(self):
        """1 for ConvNeXt weights, 2 for ConvNeXt V2 weights."""
        return 2 if self.variant.startswith("convnextv2_") else 1

    @property
    def non_commercial(self):
        return self.license.startswith("CC-BY-NC")

    @property
    def description(self):
        """One line for listings: what the preset is, its figures and its licence."""
        top1 = f"top-1 {self.top1}" if self.top1 is not None else "no top-1" if self.classes is None else (
            "top-1 not stated")
        classes = "an encoder (no head)" if self.classes is None else f"{self.classes} classes"
        licence = f"licence {self.license}" + (" (non-commercial use only)" if self.non_commercial else "")
        return (f"{self.name}: {classes}, {self.image_size} px / crop {self.crop_pct}, {top1}, {licence}")

    @property
    def crop_mode(self):
        # Official eval: resize the short side and centre-crop below 384; squash at >= 384.
        return "squash" if self.crop_pct >= 1.0 and self.image_size >= 384 else "center"

    @property
    def dataset(self):
        return "imagenet-22k" if self.classes == 21841 else "imagenet-1k"


V2_LICENSE = "CC-BY-NC-4.0"


def _official():
    """The facebookresearch files: (tag, file pattern, size, crop, classes, top-1 per variant)."""
    table = [
        ("fb_in1k", "{v}_1k_224_ema.pth", 224, 0.875, 1000,
         {"tiny": 82.1, "small": 83.1, "base": 83.8, "large": 84.3}),
        ("fb_in1k_384", "{v}_1k_384.pth", 384, 1.0, 1000, {"base": 85.1, "large": 85.5}),
        ("fb_in22k", "{v}_22k_224.pth", 224, 0.875, 21841,
         {"tiny": None, "small": None, "base": None, "large": None, "xlarge": None}),
        ("fb_in22k_ft_in1k", "{v}_22k_1k_224{ema}.pth", 224, 0.875, 1000,
         {"tiny": 82.9, "small": 84.6, "base": 85.8, "large": 86.6, "xlarge": 87.0}),
        ("fb_in22k_ft_in1k_384", "{v}_22k_1k_384{ema}.pth", 384, 1.0, 1000,
         {"tiny": 84.1, "small": 85.8, "base": 86.8, "large": 87.5, "xlarge": 87.8}),
    ]
    for tag, pattern, size, crop, classes, scores in table:
        for variant, top1 in scores.items():
            # Only the xlarge fine-tuned files are published as their EMA weights.
            ema = "_ema" if variant == "xlarge" else ""
            file = pattern.format(v=f"convnext_{variant}", ema=ema)
            yield Preset(f"convnext_{variant}.{tag}", variant, FB_URL + file, "official",
                         classes, size, crop, top1, "MIT")


def _timm():
    table = [
        ("atto", "d2_in1k", "convnext_atto_d2-01bb0f51.pth", 0.875, 75.67),
        ("femto", "d1_in1k", "convnext_femto_d1-d71d5b4c.pth", 0.875, 77.50),
        ("pico", "d1_in1k", "convnext_pico_d1-10ad7f0d.pth", 0.875, 79.52),
        ("nano", "d1h_in1k", "convnext_nano_d1h-7eb4bdea.pth", 0.95, 80.76),
    ]
    for variant, tag, file, crop, top1 in table:
        prefix = file.rsplit("-", 1)[1].split(".")[0]
        yield Preset(f"convnext_{variant}.{tag}", variant, TIMM_RELEASE_URL + file, "timm",
                     1000, 224, crop, top1, "Apache-2.0", sha256_prefix=prefix)
    for variant in ("nano", "tiny", "small"):
        name = f"convnext_{variant}.in12k_ft_in1k"
        yield Preset(name, variant, HF_URL.format(tag=name), "timm", 1000, 224, 0.95, None,
                     "Apache-2.0")


def _keras():
    table = [
        ("tiny", "keras_in1k", 81.31,
         "8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff",
         "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
        ("small", "keras_in1k", 82.39,
         "ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c",
         "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab"),
        ("base", "keras_in22k_ft_in1k", 85.36,
         "52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6",
         "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45"),
        ("large", "keras_in22k_ft_in1k", 86.36,
         "070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6",
         "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd"),
        ("xlarge", "keras_in22k_ft_in1k", 86.73,
         "c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee",
         "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05"),
    ]
    for variant, tag, top1, sha, notop_sha in table:
        base = f"{KERAS_URL}convnext_{variant}"
        yield Preset(f"convnext_{variant}.{tag}", variant, base + ".h5", "keras_h5", 1000, 224,
                     0.875, top1, "MIT (ported from the official weights)", sha256=sha,
                     notop_url=base + "_notop.h5", notop_sha256=notop_sha)


def _v2():
    """ConvNeXt V2 (facebookresearch/ConvNeXt-V2), from timm's Hugging Face copies (safetensors, timm keys).

    (tag, official file, size, crop, top-1 per size); timm converted each from the official file.
    The `.fcmae` encoders hold no head (and no top-1): fine-tune them (`include_top=True` starts a fresh
    norm and head). Top-1: CONVNEXT.md ("ConvNeXt V2"). No hash is published for these files.
    """
    table = [
        ("fcmae", "pt_only/{v}_1k_224_fcmae.pt", 224, 0.875, None,
         dict.fromkeys(("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"))),
        ("fcmae_ft_in1k", "im1k/{v}_1k_224_ema.pt", 224, 0.875, 1000,
         {"atto": 76.7, "femto": 78.5, "pico": 80.3, "nano": 81.9, "tiny": 83.0, "base": 84.9, "large": 85.8,
          "huge": 86.3}),
        ("fcmae_ft_in22k_in1k", "im22k/{v}_22k_224_ema.pt", 224, 0.875, 1000,
         {"nano": 82.1, "tiny": 83.9, "base": 86.8, "large": 87.3}),
        ("fcmae_ft_in22k_in1k_384", "im22k/{v}_22k_384_ema.pt", 384, 1.0, 1000,
         {"nano": 83.4, "tiny": 85.1, "base": 87.7, "large": 88.2, "huge": 88.7}),
        ("fcmae_ft_in22k_in1k_512", "im22k/{v}_22k_512_ema.pt", 512, 1.0, 1000, {"huge": 88.9}),
    ]
    for tag, pattern, size, crop, classes, scores in table:
        for size_name, top1 in scores.items():
            variant = f"convnextv2_{size_name}"
            name = f"{variant}.{tag}"
            yield Preset(name, variant, HF_URL.format(tag=name), "timm", classes, size, crop, top1, V2_LICENSE,
                         source_url=FB_V2_URL + pattern.format(v=variant))


PRESETS = {p.name: p for p in (*_official(), *_timm(), *_keras(), *_v2())}

# weights="imagenet": the best 1000-class 224 px checkpoint of each variant.
IMAGENET_DEFAULT = {
    "atto": "convnext_atto.d2_in1k",
    "femto": "convnext_femto.d1_in1k",
    "pico": "convnext_pico.d1_in1k",
    "nano": "convnext_nano.d1h_in1k",
    **{v: f"convnext_{v}.fb_in22k_ft_in1k" for v in ("tiny", "small", "base", "large", "xlarge")},
    # ConvNeXt V2 (CC-BY-NC 4.0): 22k fine-tuned where a 224 px one exists, else 1k; Small has none.
    **{f"convnextv2_{v}": f"convnextv2_{v}.fcmae_ft_in1k" for v in ("atto", "femto", "pico", "huge")},
    **{f"convnextv2_{v}": f"convnextv2_{v}.fcmae_ft_in22k_in1k" for v in ("nano", "tiny", "base", "large")},
}


def list_presets(variant=None):
    """Returns the registry as a list of `Preset`s, optionally for one variant ("tiny", "convnextv2_tiny").

    Each carries its `license`; the ConvNeXt V2 ones are CC-BY-NC 4.0 (non-commercial use only):
    `preset.description` says so in one line.
    """
    presets = list(PRESETS.values())
    if variant is not None:
        presets = [p for p in presets if p.variant == variant]
    return presets


def _source(preset):
    if preset.version == 2:
        return "facebookresearch (ConvNeXt-V2), via timm"
    return {"official": "facebookresearch", "timm": "timm", "keras_h5": "keras.applications"}[preset.format]


def _integrity(preset):
    if preset.sha256:
        return "sha256"
    return f"sha256 prefix {preset.sha256_prefix}" if preset.sha256_prefix else "none published"


def table(presets=None):
    """The registry as the Markdown table the README shows (preset, variant, classes, size / crop, top-1,
    licence, source, integrity), one row per preset."""
    rows = ["| preset | variant | classes | size / crop | top-1 (reported) | licence | source | integrity |",
            "|---|---|---|---|---|---|---|---|"]
    for p in PRESETS.values() if presets is None else presets:
        classes = "none (encoder)" if p.classes is None else str(p.classes)
        top1 = (str(p.top1) if p.top1 is not None else "n/a (encoder)" if p.classes is None
                else "n/a (22k head)" if p.classes == 21841 else "not stated")
        licence = f"{p.license} (non-commercial)" if p.non_commercial else p.license
        rows.append(f"| `{p.name}` | {p.variant} | {classes} | {p.image_size} / {p.crop_pct} | {top1} | {licence} | "
                    f"{_source(p)} | {_integrity(p)} |")
    return "\n".join(rows)


def get_preset(name):
    if name not in PRESETS:
        raise ValueError(
            f"Unknown preset. Valid presets: {', '.join(sorted(PRESETS))}. Received: preset={name!r}"
        )
    return PRESETS[name]
