"""The ConvNeXt variants: one table, the single source of depths and widths.

Parameter counts (1000-class head) and GMACs at 224 px are those of the paper
and timm; the tests check every count exactly.
"""

import dataclasses

MIN_IMAGE_SIZE = 32  # the four downsamplings (4, 2, 2, 2) take 32 px to a 1x1 map


@dataclasses.dataclass(frozen=True)
class Variant:
    """A ConvNeXt shape. `train` also takes one of your own, e.g. `Variant("mini", (1, 1, 3, 1), (32, 64, 128, 256))`."""

    name: str
    depths: tuple
    dims: tuple
    # Stochastic depth of the variant's ImageNet-1k recipe (paper, Table 9 /
    # official README); the timm small variants were trained without it.
    drop_path_rate: float = 0.0
    params: int = None
    gmacs: float = None
    # 1: ConvNeXt (layer scale); 2: ConvNeXt V2 (Woo et al. 2023: GRN in every block, no layer scale).
    version: int = 1

    @property
    def size(self):
        """The size name without the family: "tiny" for both "tiny" and "convnextv2_tiny"."""
        return self.name.removeprefix(V2_PREFIX)

    @property
    def builder_name(self):
        """The name of the variant's builder: "ConvNeXtTiny", "ConvNeXtXLarge", "ConvNeXtV2Tiny"."""
        size = "XLarge" if self.size == "xlarge" else self.size.capitalize()
        return f"ConvNeXt{'V2' if self.version == 2 else ''}{size}"

    @property
    def title(self):
        """The variant as the papers write it: "ConvNeXt-T"-style full names, "ConvNeXt-Tiny", "ConvNeXt V2-Tiny"."""
        size = "XLarge" if self.size == "xlarge" else self.size.capitalize()
        return f"ConvNeXt{' V2' if self.version == 2 else ''}-{size}"

    @property
    def timm_name(self):
        """timm's model name: "convnext_tiny", "convnextv2_tiny"."""
        return self.name if self.version == 2 else f"convnext_{self.name}"


V2_PREFIX = "convnextv2_"  # V2 variants are named as timm names them; V1 ones by their size alone


VARIANTS = {
    v.name: v
    for v in [
        Variant("atto", (2, 2, 6, 2), (40, 80, 160, 320), 0.0, 3_695_520, 0.55),
        Variant("femto", (2, 2, 6, 2), (48, 96, 192, 384), 0.0, 5_217_784, 0.79),
        Variant("pico", (2, 2, 6, 2), (64, 128, 256, 512), 0.0, 9_045_672, 1.37),
        Variant("nano", (2, 2, 8, 2), (80, 160, 320, 640), 0.0, 15_593_560, 2.46),
        Variant("tiny", (3, 3, 9, 3), (96, 192, 384, 768), 0.1, 28_589_128, 4.47),
        Variant("small", (3, 3, 27, 3), (96, 192, 384, 768), 0.4, 50_223_688, 8.71),
        Variant("base", (3, 3, 27, 3), (128, 256, 512, 1024), 0.5, 88_591_464, 15.38),
        Variant("large", (3, 3, 27, 3), (192, 384, 768, 1536), 0.5, 197_767_336, 34.40),
        # No 1k-from-scratch recipe exists for XLarge; 0.2 is its 22k pre-training value.
        Variant("xlarge", (3, 3, 27, 3), (256, 512, 1024, 2048), 0.2, 350_196_968, 60.98),
        # ConvNeXt V2: the same shapes (plus Huge), GRN instead of layer scale. Stochastic depth of the
        # official fine-tuning recipes (ConvNeXt-V2 TRAINING.md: atto 0.1, tiny 0.2, base 0.1); the
        # sizes it does not list take their nearest listed neighbour's. Small exists in timm only, untrained.
        # GMACs at 224 px: timm's figures.
        Variant("convnextv2_atto", (2, 2, 6, 2), (40, 80, 160, 320), 0.1, 3_708_400, 0.55, version=2),
        Variant("convnextv2_femto", (2, 2, 6, 2), (48, 96, 192, 384), 0.1, 5_233_240, 0.78, version=2),
        Variant("convnextv2_pico", (2, 2, 6, 2), (64, 128, 256, 512), 0.1, 9_066_280, 1.37, version=2),
        Variant("convnextv2_nano", (2, 2, 8, 2), (80, 160, 320, 640), 0.1, 15_623_800, 2.46, version=2),
        Variant("convnextv2_tiny", (3, 3, 9, 3), (96, 192, 384, 768), 0.2, 28_635_496, 4.47, version=2),
        Variant("convnextv2_small", (3, 3, 27, 3), (96, 192, 384, 768), 0.2, 50_318_440, 8.71, version=2),
        Variant("convnextv2_base", (3, 3, 27, 3), (128, 256, 512, 1024), 0.1, 88_717_800, 15.38, version=2),
        Variant("convnextv2_large", (3, 3, 27, 3), (192, 384, 768, 1536), 0.1, 197_956_840, 34.40, version=2),
        Variant("convnextv2_huge", (3, 3, 27, 3), (352, 704, 1408, 2816), 0.1, 660_289_640, 115.0, version=2),
    ]
}
