"""The paper's training recipes as data, and what `compile`/`fit` need to follow them.

    recipe = get_recipe("finetune", epochs=10)
    model = ConvNeXtTiny(classes=10, **recipe.model_kwargs("tiny"))
    model.compile(**recipe.compile_kwargs(model, steps_per_epoch=len(train_ds)))
    model.fit(train_ds, epochs=recipe.epochs, callbacks=recipe.callbacks())

Sources: the paper (Tables 5, 9, 10), the official repository's README commands and
`optim_factory.py` (layer-wise learning-rate decay), ../shared/CONVNEXT.md.
"""

import dataclasses
import math
import re

import keras
from keras import ops

from keras_convnext import backend_ops, checks, names
from keras_convnext.variants import MIN_IMAGE_SIZE, VARIANTS

# The official from-scratch run: 300 epochs of ceil(1,281,167 / 4096) = 313 steps. EMA 0.9999
# averages over ~1/(1 - 0.9999) = 10,000 steps, ~11% of it; shorter runs keep that fraction.
EMA_REFERENCE_STEPS = 300 * 313
NUM_LAYER_GROUPS = 12  # the official layer-decay grouping of a (3, 3, 27, 3) network
LAYER_DECAY_TYPES = ("group", "single")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training recipe. Every field can be overridden with `get_recipe(name, field=value)`."""

    name: str
    description: str
    epochs: int
    batch_size: int
    # Peak learning rate = lr * batch_size / lr_batch_size (the linear scaling rule).
    lr: float
    lr_batch_size: int
    warmup_epochs: float
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8
    layer_decay: float = None  # None: one learning rate for all layers
    # "group": the official 12 groups of three blocks (V1, V2 Base and larger); "single": one group per block
    # (ConvNeXt-V2's fine-tuning of Atto and Tiny; `optim_factory.get_num_layer_for_convnext_single`).
    layer_decay_type: str = "group"
    label_smoothing: float = 0.1
    drop_path_rate: object = None  # a float, a {variant: float} dict, or None (the variant's default)
    head_init_scale: float = 1.0
    ema_momentum: float = None  # None: no EMA
    ema_scale_to_run: bool = True  # shorter runs than the reference keep the EMA's horizon fraction
    weights: str = None  # what to start from: None (scratch), "imagenet", or a preset tag like "fb_in22k"
    image_size: int = 224
    crop_pct: float = 0.875  # evaluation: shorter side to size / crop_pct, centre crop
    # Augmentation (timm's names in comments).
    scale: tuple = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio
    hflip: float = 0.5
    rand_augment: tuple = (9, 0.5)  # (magnitude of 10, magnitude std): rand-m9-mstd0.5-inc1; None: off
    color_jitter: float = 0.4  # used only without RandAugment, as in timm
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mixup_switch_prob: float = 0.5  # per batch, CutMix instead of Mixup when both are on
    random_erasing: float = 0.25  # probability per image (reprob)
    interpolation: str = "bicubic"
    # FCMAE pre-training (no labels): the fraction of 32 px patches masked per image; None: a supervised recipe.
    mask_ratio: float = None

    @property
    def self_supervised(self):
        """Whether the recipe pre-trains an FCMAE on images without labels."""
        return self.mask_ratio is not None

    def __post_init__(self):
        # Every field checked where it is set (the recipe tables, get_recipe, `train --set`), before any work.
        for name in ("name", "description"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"`{name}` must be a string. {checks.received(name, getattr(self, name))}")
        for name in ("epochs", "batch_size", "lr_batch_size"):
            checks.integer(name, getattr(self, name), minimum=1)
        checks.integer("image_size", self.image_size, minimum=MIN_IMAGE_SIZE)
        checks.number("lr", self.lr, 0.0, low_open=True)
        for name in ("min_lr", "warmup_epochs", "weight_decay", "color_jitter", "mixup", "cutmix"):
            checks.number(name, getattr(self, name), 0.0)
        for name in ("beta_1", "beta_2", "label_smoothing"):
            checks.number(name, getattr(self, name), 0.0, 1.0, high_open=True)
        for name in ("hflip", "mixup_switch_prob", "random_erasing"):
            checks.number(name, getattr(self, name), 0.0, 1.0)
        checks.number("epsilon", self.epsilon, 0.0, low_open=True)
        checks.number("head_init_scale", self.head_init_scale, 0.0, low_open=True)
        checks.number("crop_pct", self.crop_pct, 0.0, 1.0, low_open=True)
        if self.layer_decay is not None:
            checks.number("layer_decay", self.layer_decay, 0.0, 1.0, low_open=True)
        if self.ema_momentum is not None:
            checks.number("ema_momentum", self.ema_momentum, 0.0, 1.0, high_open=True)
        checks.boolean("ema_scale_to_run", self.ema_scale_to_run)
        checks.optional_str("weights", self.weights)
        checks.choice("interpolation", self.interpolation, ("bicubic", "bilinear", "nearest"))
        checks.choice("layer_decay_type", self.layer_decay_type, LAYER_DECAY_TYPES)
        if self.mask_ratio is not None:
            checks.number("mask_ratio", self.mask_ratio, 0.0, 1.0, low_open=True, high_open=True)
        rates = self.drop_path_rate.values() if isinstance(self.drop_path_rate, dict) else [self.drop_path_rate]
        for rate in rates:
            if rate is not None:
                checks.number("drop_path_rate", rate, 0.0, 1.0, high_open=True)
        for name, low, high in (("scale", 0.0, 1.0), ("ratio", 0.0, None)):
            pair = getattr(self, name)
            bounds = f"0 < low <= high{f' <= {high}' if high else ''}"
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"`{name}` must be a (low, high) pair, {bounds}. {checks.received(name, pair)}")
            try:
                for value in pair:
                    checks.number(name, value, low, high, low_open=True)
            except ValueError:
                raise ValueError(f"`{name}` must be (low, high) with {bounds}. {checks.received(name, pair)}") from None
            if pair[0] > pair[1]:
                raise ValueError(f"`{name}` must be (low, high) with {bounds}. {checks.received(name, pair)}")
            object.__setattr__(self, name, tuple(float(v) for v in pair))
        if self.rand_augment is not None:
            pair = self.rand_augment
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"`rand_augment` must be None or (magnitude, magnitude_std). "
                                 f"{checks.received('rand_augment', pair)}")
            checks.number("rand_augment magnitude", pair[0], 0.0, 10.0)
            checks.number("rand_augment magnitude_std", pair[1], 0.0)
            object.__setattr__(self, "rand_augment", tuple(pair))

    def peak_lr(self, batch_size=None):
        return self.lr * (batch_size or self.batch_size) / self.lr_batch_size

    def drop_path_for(self, variant):
        """The recipe's stochastic depth for `variant` (a name from `VARIANTS` or a `Variant`)."""
        own = getattr(variant, "drop_path_rate", None)
        variant = getattr(variant, "name", variant)
        if isinstance(self.drop_path_rate, dict):
            if variant in self.drop_path_rate:
                return self.drop_path_rate[variant]
        elif self.drop_path_rate is not None:
            return float(self.drop_path_rate)
        if own is not None:
            return own
        return VARIANTS[variant].drop_path_rate if variant in VARIANTS else 0.0

    def model_kwargs(self, variant):
        """Builder arguments the recipe sets: stochastic depth and head initialisation."""
        return {"drop_path_rate": self.drop_path_for(variant), "head_init_scale": self.head_init_scale}

    def schedule(self, steps_per_epoch, batch_size=None):
        """Linear warm-up from 0 to the peak, then cosine to `min_lr`, per step."""
        total = max(1, int(self.epochs * steps_per_epoch))
        warmup = min(int(round(self.warmup_epochs * steps_per_epoch)), total - 1)
        peak = self.peak_lr(batch_size)
        alpha = min(self.min_lr / peak, 1.0)
        if warmup > 0:
            return keras.optimizers.schedules.CosineDecay(
                0.0, total - warmup, alpha=alpha, warmup_target=peak, warmup_steps=warmup
            )
        return keras.optimizers.schedules.CosineDecay(peak, total, alpha=alpha)

    def ema_momentum_for(self, total_steps):
        """The EMA momentum for a run of `total_steps` (None when the recipe has no EMA)."""
        if self.ema_momentum is None:
            return None
        if not self.ema_scale_to_run or total_steps >= EMA_REFERENCE_STEPS:
            return self.ema_momentum
        # Same horizon as a fraction of the run: 0.9999 over 93,900 steps ~ 0.986 over 690.
        return max(0.0, 1.0 - (1.0 - self.ema_momentum) * EMA_REFERENCE_STEPS / max(total_steps, 1))

    def optimizer(self, steps_per_epoch, batch_size=None):
        """AdamW with the schedule, layer decay, 1-D exclusions from weight decay and EMA."""
        ema = self.ema_momentum_for(self.epochs * steps_per_epoch)
        return AdamWLayerDecay(
            learning_rate=self.schedule(steps_per_epoch, batch_size),
            weight_decay=self.weight_decay, beta_1=self.beta_1, beta_2=self.beta_2,
            epsilon=self.epsilon, layer_decay=self.layer_decay, layer_decay_type=self.layer_decay_type,
            use_ema=ema is not None, ema_momentum=ema if ema is not None else 0.99,
        )

    def loss(self):
        # Labels are one-hot (mixed by Mixup/CutMix); smoothing of a mix is the mix of smoothings.
        return keras.losses.CategoricalCrossentropy(label_smoothing=self.label_smoothing)

    def compile_kwargs(self, steps_per_epoch, batch_size=None):
        """`model.compile(**recipe.compile_kwargs(steps_per_epoch))`."""
        return {
            "optimizer": self.optimizer(steps_per_epoch, batch_size),
            "loss": self.loss(),
            "metrics": [keras.metrics.CategoricalAccuracy(name="accuracy")],
        }

    def callbacks(self):
        """Validation on the EMA weights when the recipe keeps an EMA ("EMA evaluated")."""
        return [keras.callbacks.SwapEMAWeights()] if self.ema_momentum is not None else []


def _official_v2_finetune(**kw):
    # ConvNeXt-V2 TRAINING.md: batch 32 x 32 GPUs (1024), base lr per 256 images; main_finetune.py's
    # defaults: head init 0.001, min lr 1e-6, RandAugment m9, Random Erasing 0.25, EMA 0.9999 evaluated.
    return Recipe(**{"batch_size": 1024, "lr_batch_size": 256, "layer_decay": 0.9, "head_init_scale": 0.001,
                     "ema_momentum": 0.9999, "weights": "fcmae", **kw})


def _official_scratch(**kw):
    return Recipe(epochs=300, batch_size=4096, lr=4e-3, lr_batch_size=4096, warmup_epochs=20, **kw)


RECIPES = {
    r.name: r
    for r in [
        _official_scratch(
            name="in1k",
            description="ImageNet-1k from scratch: 300 epochs, AdamW 4e-3 @ 4096, 20 warm-up epochs, "
                        "RandAugment, Mixup/CutMix, Random Erasing, label smoothing, EMA 0.9999",
            ema_momentum=0.9999,
            drop_path_rate={"tiny": 0.1, "small": 0.4, "base": 0.5, "large": 0.5},
        ),
        Recipe(
            name="in22k",
            description="ImageNet-22k pre-training: 90 epochs, 5 warm-up, AdamW 4e-3 @ 4096, 21,841 classes",
            epochs=90, batch_size=4096, lr=4e-3, lr_batch_size=4096, warmup_epochs=5,
            # T and S are not in the official commands; 0.1 as for B and L.
            drop_path_rate={"tiny": 0.1, "small": 0.1, "base": 0.1, "large": 0.1, "xlarge": 0.2},
        ),
        Recipe(
            name="in22k_ft_in1k",
            description="22k -> 1k fine-tuning: 30 epochs, lr 5e-5 @ 512, layer decay 0.8, "
                        "head init 0.001, weight decay 1e-8, no Mixup/CutMix",
            epochs=30, batch_size=512, lr=5e-5, lr_batch_size=512, warmup_epochs=0,
            weight_decay=1e-8, layer_decay=0.8, head_init_scale=0.001, mixup=0.0, cutmix=0.0,
            # T and S are not in the official commands; scaled down from B's 0.2.
            drop_path_rate={"tiny": 0.1, "small": 0.2, "base": 0.2, "large": 0.3, "xlarge": 0.4},
            weights="fb_in22k",
        ),
        Recipe(
            name="ft_384",
            description="fine-tuning at 384 px: as in22k_ft_in1k with layer decay 0.7, no crop at eval",
            epochs=30, batch_size=512, lr=5e-5, lr_batch_size=512, warmup_epochs=0,
            weight_decay=1e-8, layer_decay=0.7, head_init_scale=0.001, mixup=0.0, cutmix=0.0,
            drop_path_rate={"tiny": 0.1, "small": 0.2, "base": 0.2, "large": 0.3, "xlarge": 0.4},
            weights="fb_in22k", image_size=384, crop_pct=1.0,
        ),
        Recipe(
            name="fcmae",
            description="FCMAE pre-training without labels (ConvNeXt V2): 1600 epochs, AdamW 1.5e-4 @ 256, "
                        "betas (0.9, 0.95), 40 warm-up epochs, 60% of 32 px patches masked, crop (0.2, 1) + flip",
            epochs=1600, batch_size=4096, lr=1.5e-4, lr_batch_size=256, warmup_epochs=40, min_lr=0.0,
            beta_2=0.95, mask_ratio=0.6, drop_path_rate=0.0, label_smoothing=0.0, scale=(0.2, 1.0),
            rand_augment=None, color_jitter=0.0, mixup=0.0, cutmix=0.0, random_erasing=0.0,
        ),
        _official_v2_finetune(
            name="fcmae_ft_atto",
            description="fine-tuning an FCMAE encoder, ConvNeXt V2-Atto's recipe (also Femto, Pico): 600 epochs, "
                        "lr 2e-4 @ 256, layer decay 0.9 per block, weight decay 0.3, no Mixup/CutMix, smoothing 0.2",
            epochs=600, lr=2e-4, warmup_epochs=0, layer_decay_type="single", weight_decay=0.3,
            drop_path_rate=0.1, mixup=0.0, cutmix=0.0, label_smoothing=0.2,
        ),
        _official_v2_finetune(
            name="fcmae_ft_tiny",
            description="fine-tuning an FCMAE encoder, ConvNeXt V2-Tiny's recipe (also Nano): 300 epochs, "
                        "lr 8e-4 @ 256, 40 warm-up, layer decay 0.9 per block, Mixup 0.8, CutMix 1.0",
            epochs=300, lr=8e-4, warmup_epochs=40, layer_decay_type="single", drop_path_rate=0.2,
        ),
        _official_v2_finetune(
            name="fcmae_ft_base",
            description="fine-tuning an FCMAE encoder, ConvNeXt V2-Base's recipe (also Large, Huge): 100 epochs, "
                        "lr 6.25e-4 @ 256, 20 warm-up, layer decay 0.6 over 12 groups, Mixup 0.8, CutMix 1.0",
            epochs=100, lr=6.25e-4, warmup_epochs=20, layer_decay=0.6, layer_decay_type="group",
            drop_path_rate=0.1,
        ),
        Recipe(
            name="finetune",
            description="transfer learning on your own data from the ImageNet weights: 10 epochs, "
                        "lr 1e-4 @ 32, 1 warm-up epoch, layer decay 0.8, light augmentation",
            epochs=10, batch_size=32, lr=1e-4, lr_batch_size=32, warmup_epochs=1,
            layer_decay=0.8, head_init_scale=0.001, drop_path_rate=0.1, weights="imagenet",
            rand_augment=None, color_jitter=0.4, mixup=0.0, cutmix=0.0, random_erasing=0.0,
        ),
    ]
}


def list_recipes():
    """The recipe names."""
    return sorted(RECIPES)


def get_recipe(name, **overrides):
    """The recipe `name`, with any field replaced: `get_recipe("in1k", epochs=30, batch_size=64)`.

    Changing `epochs` scales the warm-up with it unless `warmup_epochs` is given too; the peak
    learning rate follows the batch size by the linear rule (`Recipe.peak_lr`).
    """
    if isinstance(name, Recipe):
        recipe = name
    elif name in RECIPES:
        recipe = RECIPES[name]
    else:
        raise ValueError(f"Unknown recipe. Valid values: {', '.join(list_recipes())}. Received: recipe={name!r}")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"Unknown recipe field {unknown[0]!r}. Valid fields: {', '.join(sorted(fields))}. "
            f"Received: {unknown[0]}={overrides[unknown[0]]!r}"
        )
    if "epochs" in overrides:
        checks.integer("epochs", overrides["epochs"], minimum=1)  # before it scales the warm-up below
    if "epochs" in overrides and "warmup_epochs" not in overrides:
        # A shorter run keeps the warm-up's share of it: in1k's 20 of 300 epochs -> 2 of 30.
        overrides["warmup_epochs"] = recipe.warmup_epochs * overrides["epochs"] / recipe.epochs
    return dataclasses.replace(recipe, **overrides)


def layer_id_single(path, depths):
    """ConvNeXt-V2's "single" layer-decay id of a variable: 1 .. sum(depths), one per block; head sum(depths) + 1.

    Stage i's downsampling (the stem for i = 0) -> sum(depths[:i]) + 1; block j of stage i ->
    sum(depths[:i]) + j + 1 (its GRN included); anything else (head norm, head) -> sum(depths) + 1,
    as `optim_factory.get_num_layer_for_convnext_single`.
    """
    key = names.official_key(path)
    where = names.stage_and_block(key) if key else None
    if where is None:
        return sum(depths) + 1
    stage, block = where
    return sum(depths[:stage]) + (0 if block is None else block) + 1


def layer_group(path, num_groups=NUM_LAYER_GROUPS):
    """The official layer-decay group of a variable, by its path: 0 (stem) .. num_groups + 1 (head).

    Stem -> 0; stage 0 -> 1; stage 1 and its downsampling -> 2; stage 2's downsampling -> 3 and
    its blocks three to a group from 3; stage 3 and its downsampling -> num_groups; anything
    else (head norm, head, pyramid norms) -> num_groups + 1. The path is read through the
    layer-name contract (names.official_key).
    """
    key = names.official_key(path)
    where = names.stage_and_block(key) if key else None
    if where is None:
        return num_groups + 1
    stage, block = where
    if block is None:  # a downsampling (stage 0's is the stem)
        return {0: 0, 1: 2, 2: 3}.get(stage, num_groups)
    if stage < 2:
        return stage + 1
    if stage == 2:
        return min(3 + block // 3, num_groups - 1)
    return num_groups


def blocks_per_stage(paths):
    """The depths (blocks per stage) of the ConvNeXt whose variable paths these are (0 for a stage without any)."""
    depths = [0, 0, 0, 0]
    for path in paths:
        key = names.official_key(path)
        where = names.stage_and_block(key) if key else None
        if where is not None and where[1] is not None and where[0] < 4:
            depths[where[0]] = max(depths[where[0]], where[1] + 1)
    return depths


@keras.saving.register_keras_serializable(package="keras_convnext")
class AdamWLayerDecay(keras.optimizers.Adam):
    """AdamW with per-variable learning rates (layer-wise decay) and ConvNeXt's decay exclusions.

    Keras 3 optimizers take one learning rate for all variables, and Adam is invariant to gradient
    scaling, so layer decay has to scale the learning rate inside the update. A variable in group
    g (`layer_group`) learns at `lr * layer_decay ** (num_groups + 1 - g)`; the head at `lr`.
    Decoupled weight decay uses the same scaled rate, as PyTorch's per-group AdamW does. 1-D
    variables (biases, norms, layer scales) get no weight decay, as in the official recipe, nor
    do those passed to `exclude_from_weight_decay`.

    Written on Keras's public hooks only (`build`, `update_step`, `exclude_from_weight_decay`,
    `finalize_variable_values`, `get_config`): Keras's own weight-decay pass runs every variable at
    the global rate, so it is off (`weight_decay=None` to Adam) and `update_step` decays each
    variable at its own rate just before its Adam step, as AdamW would (`variable -= variable *
    weight_decay * lr`, the Adam step not reading the variable). The EMA is Keras's (`use_ema`).

    Args:
        weight_decay: the decoupled weight decay (`decoupled_weight_decay`), a float >= 0.
        layer_decay: decay per group (0.8 for 22k -> 1k fine-tuning); None or 1.0: off.
        num_groups: number of block groups (12 in the official code) of the "group" type.
        layer_decay_type: "group" (`layer_group`) or "single" (`layer_id_single`: one group per block,
            `sum(depths)` groups; the head learns at `lr`).
        depths: the network's blocks per stage, for "single"; None: counted from the variables at `build`.
        Other arguments as `keras.optimizers.Adam`.
    """

    def __init__(self, learning_rate=1e-3, weight_decay=0.05, layer_decay=None,
                 num_groups=NUM_LAYER_GROUPS, layer_decay_type="group", depths=None, **kwargs):
        checks.number("weight_decay", weight_decay, 0.0)
        if layer_decay is not None:
            checks.number("layer_decay", layer_decay, 0.0, 1.0, low_open=True)
        checks.choice("layer_decay_type", layer_decay_type, LAYER_DECAY_TYPES)
        if depths is not None:
            if not isinstance(depths, (list, tuple)) or len(depths) != 4:
                raise ValueError(f"`depths` must be four integers. Received: depths={depths!r}")
            depths = [checks.integer(f"depths[{i}]", d, minimum=1) for i, d in enumerate(depths)]
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        self.decoupled_weight_decay = float(weight_decay)
        self.layer_decay = layer_decay
        self.num_groups = checks.integer("num_groups", num_groups, minimum=1)
        self.layer_decay_type, self.depths = layer_decay_type, depths
        self.no_decay_ids, self.no_decay_names = set(), None
        self.variable_paths, self.lr_scales, self.decays, self.index_of = [], [], [], {}

    def lr_scale(self, variable):
        """The multiplier of the learning rate for `variable` (1.0 without layer decay)."""
        if not self.layer_decay or self.layer_decay == 1.0:
            return 1.0
        if self.layer_decay_type == "single":
            depths = self.depths or [1, 1, 1, 1]
            return float(self.layer_decay ** (sum(depths) + 1 - layer_id_single(variable.path, depths)))
        group = layer_group(variable.path, self.num_groups)
        return float(self.layer_decay ** (self.num_groups + 1 - group))

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Exclude variables (or those whose name matches one of `var_names`) from weight decay; before `build`."""
        if self.built:  # the exclusions are read once, by build (Keras's own check looks for `_built`)
            raise ValueError("`exclude_from_weight_decay()` must be called before the optimizer is built. "
                             f"Received: {len(var_list or ())} variables, var_names={var_names!r}, after build")
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        self.no_decay_ids = {id(v) for v in var_list or ()}
        self.no_decay_names = re.compile("|".join(var_names)) if var_names else None

    def uses_weight_decay(self, variable):
        """Whether `variable` is decayed: a weight decay is set, and it is neither 1-D nor excluded."""
        if not self.decoupled_weight_decay or len(variable.shape) <= 1 or id(variable) in self.no_decay_ids:
            return False
        return self.no_decay_names is None or self.no_decay_names.search(variable.name) is None

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        if self.layer_decay_type == "single" and self.depths is None:
            self.depths = blocks_per_stage(v.path for v in var_list)
        self.variable_paths = [v.path for v in var_list]
        self.lr_scales = [self.lr_scale(v) for v in var_list]
        self.decays = [self.uses_weight_decay(v) for v in var_list]
        # update_step receives a variable as the backend's optimizer passes it (backend_ops.optimizer_views).
        self.index_of = {id(view): i for i, v in enumerate(var_list) for view in backend_ops.optimizer_views(v)}

    def learning_rates(self):
        """{variable path: its current learning rate}, after `build` (what `fit` applies)."""
        lr = float(ops.convert_to_numpy(self.learning_rate))
        return {path: lr * s for path, s in zip(self.variable_paths, self.lr_scales)}

    def update_step(self, gradient, variable, learning_rate):
        i = self.index_of[id(variable)]
        learning_rate = ops.cast(learning_rate, variable.dtype)
        if self.lr_scales[i] != 1.0:
            learning_rate = ops.multiply(learning_rate, self.lr_scales[i])
        if self.decays[i]:
            # Decoupled, at the variable's own rate; AdamW decays first (Optimizer._apply_weight_decay).
            wd = ops.cast(self.decoupled_weight_decay, variable.dtype)
            self.assign_sub(variable, ops.multiply(variable, ops.multiply(wd, learning_rate)))
        super().update_step(gradient, variable, learning_rate)

    def finalize_variable_values(self, var_list):
        super().finalize_variable_values(var_list)  # with EMA: the model variables take the averages
        if self.use_ema:
            # Keras assigns the EMA's own arrays: on JAX the model and the EMA then share buffers and
            # the next `fit` fails ("Attempt to donate the same buffer twice"). A copy each, its own.
            for variable in var_list:
                variable.assign(ops.copy(variable))

    def get_config(self):
        config = super().get_config()
        config.update({"weight_decay": self.decoupled_weight_decay, "layer_decay": self.layer_decay,
                       "num_groups": self.num_groups, "layer_decay_type": self.layer_decay_type,
                       "depths": self.depths})
        return config


def warmup_cosine(step, peak, total, warmup, min_lr):
    """The schedule's value at `step`, in closed form (for checks and plots)."""
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup) / max(total - warmup, 1)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
