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

    @property
    def builder_name(self):
        """The name of the variant's builder: "ConvNeXtTiny", "ConvNeXtXLarge"."""
        return "ConvNeXtXLarge" if self.name == "xlarge" else f"ConvNeXt{self.name.capitalize()}"


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
    ]
}
