"""UperNet (Xiao et al., "Unified Perceptual Parsing", ECCV 2018) as a keras-hub `ImageSegmenter`: the head of
ConvNeXt's ADE20K results, on any keras-hub `FeaturePyramidBackbone` with levels P2..P5.

The layout and defaults are mmsegmentation's `UPerHead` + `FCNHead` config for ConvNeXt (the official
`semantic_segmentation/configs/convnext/upernet_convnext_*.py`): channels 512, pool scales (1, 2, 3, 6),
channel dropout 0.1, bilinear resizing with align_corners=False, and an auxiliary FCN head on P4 (256 channels,
one 3x3 conv) whose loss counts 0.4, in training only. Every conv is conv (no bias) -> BatchNorm -> ReLU, as
mmseg's `ConvModule` with a norm.

Sizes need not be static: adaptive pooling (`AdaptiveAveragePool`, PyTorch's bins) is built in keras.ops and every
resize reads its target size from a reference tensor at call time (`ResizeLike`), so the pyramid levels of an
input whose side is not a multiple of 32 line up as mmseg's `resize(..., size=lateral.shape[2:])` does.
"""

import keras

from keras_convnext import checks
from keras_convnext.hub import PACKAGE, keras_hub

LEVELS = ("P2", "P3", "P4", "P5")
AUX_LEVEL = "P4"  # mmseg's auxiliary FCNHead reads in_index=2, the stride-16 map
BN_EPS = 1e-5  # PyTorch's BatchNorm2d / SyncBN defaults: eps 1e-5, momentum 0.1 (Keras: 1 - 0.1)
BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResizeLike(keras.layers.Layer):
    """Bilinear resize of `x` (N, h, w, C) to the spatial size of `reference` (N, H, W, ...), half-pixel centres
    (PyTorch's align_corners=False). The size is read at call time, so unknown input sizes work."""

    def call(self, x, reference):
        size = keras.ops.shape(reference)[1:3]
        if all(isinstance(s, int) for s in size):  # always on JAX and torch; on TensorFlow where the graph knows it
            return keras.ops.image.resize(x, size, interpolation="bilinear", antialias=False)
        # A TensorFlow graph of unknown size: the same interpolation as two (target, source) weight matrices.
        shape = keras.ops.shape(x)
        y = keras.ops.einsum("ih,nhwc->niwc", self._matrix(shape[1], size[0]), x)
        return keras.ops.einsum("jw,niwc->nijc", self._matrix(shape[2], size[1]), y)

    def _matrix(self, source, target):
        """(target, source): row j blends the two source pixels around target pixel j's centre (clamped)."""
        ops, dtype = keras.ops, self.compute_dtype
        centres = (ops.cast(ops.arange(target), dtype) + 0.5) * (ops.cast(source, dtype) / ops.cast(target, dtype))
        centres = ops.maximum(centres - 0.5, 0.0)
        low = ops.floor(centres)
        frac = (centres - low)[:, None]
        low = ops.minimum(ops.cast(low, "int32"), source - 1)
        high = ops.minimum(low + 1, source - 1)
        columns = ops.arange(source)[None, :]
        return (ops.cast(columns == low[:, None], dtype) * (1.0 - frac)
                + ops.cast(columns == high[:, None], dtype) * frac)

    def compute_output_shape(self, x_shape, reference_shape):
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


@keras.saving.register_keras_serializable(package=PACKAGE)
class AdaptiveAveragePool(keras.layers.Layer):
    """PyTorch's AdaptiveAvgPool2d(bins), channels-last: bin i of a side of n spans [floor(i n / b),
    ceil((i + 1) n / b)). As two averaging matrices in keras.ops, so any size works on every backend, under jit,
    and with more bins than pixels (a 2x2 P5 into 6x6 bins, as PyTorch allows; Keras's TensorFlow
    AdaptiveAveragePooling2D refuses it)."""

    def __init__(self, bins, **kwargs):
        super().__init__(**kwargs)
        self.bins = checks.integer("bins", bins, minimum=1)

    def _matrix(self, size):
        ops, b = keras.ops, self.bins
        i = ops.arange(b)
        start, end = (i * size) // b, ((i + 1) * size + b - 1) // b
        h = ops.arange(size)
        inside = ops.logical_and(h[None, :] >= start[:, None], h[None, :] < end[:, None])  # (bins, size)
        return ops.cast(inside, self.compute_dtype) / ops.cast(end - start, self.compute_dtype)[:, None]

    def call(self, x):
        shape = keras.ops.shape(x)
        y = keras.ops.einsum("ih,nhwc->niwc", self._matrix(shape[1]), x)
        return keras.ops.einsum("jw,niwc->nijc", self._matrix(shape[2]), y)  # (N, bins, bins, C)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.bins, self.bins, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "bins": self.bins}


def _conv_bn_relu(x, filters, kernel_size, name, dtype):
    """mmseg's ConvModule: conv (no bias: the norm follows) -> BatchNorm -> ReLU, as `{name}_conv/_bn/_relu`."""
    x = keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=False, dtype=dtype,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, dtype=dtype, name=f"{name}_bn")(x)
    return keras.layers.ReLU(dtype=dtype, name=f"{name}_relu")(x)


def _classifier(x, num_classes, dropout, name, dtype, seed):
    """mmseg's `cls_seg`: channel dropout (Dropout2d) -> 1x1 conv with bias to the classes' logits."""
    x = keras.layers.SpatialDropout2D(dropout, seed=seed, dtype=dtype, name=f"{name}_dropout")(x)
    return keras.layers.Conv2D(num_classes, 1, dtype=dtype, name=f"{name}_classifier")(x)


def uper_head(pyramid, images, num_classes, channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1, dtype=None,
              seed=None):
    """UperNet's decode head on `pyramid` ({"P2".."P5"} symbolic maps): logits (N, H, W, classes) at `images`' size.

    PPM on P5 (adaptive average pool to each scale -> 1x1 ConvModule -> resize back -> concat with P5 -> 3x3
    bottleneck), then FPN (1x1 laterals on P2..P4, top-down resize-add, 3x3 fpn convs), every level resized to
    P2, concatenated, fused by a 3x3 ConvModule, classified, resized to the input (mmseg resizes the logits to
    the label size in its loss; here the model's output is already at the input's size).
    """
    p2, p3, p4, p5 = (pyramid[level] for level in LEVELS)
    # === PPM on the stride-32 map ===
    branches = [p5]
    for scale in pool_scales:
        y = AdaptiveAveragePool(scale, dtype=dtype, name=f"psp_{scale}_pool")(p5)
        y = _conv_bn_relu(y, channels, 1, f"psp_{scale}", dtype)
        branches.append(ResizeLike(dtype=dtype, name=f"psp_{scale}_resize")(y, p5))
    x = keras.layers.Concatenate(dtype=dtype, name="psp_concat")(branches)
    top = _conv_bn_relu(x, channels, 3, "psp_bottleneck", dtype)

    # === FPN: laterals, top-down resize-add, 3x3 convs ===
    laterals = [_conv_bn_relu(f, channels, 1, f"lateral_{i}", dtype) for i, f in enumerate((p2, p3, p4))] + [top]
    for i in range(len(laterals) - 1, 0, -1):  # P5 -> P4 -> P3 -> P2, each sum feeding the next
        up = ResizeLike(dtype=dtype, name=f"top_down_{i}_resize")(laterals[i], laterals[i - 1])
        laterals[i - 1] = keras.layers.Add(dtype=dtype, name=f"top_down_{i}_add")([laterals[i - 1], up])
    outs = [_conv_bn_relu(laterals[i], channels, 3, f"fpn_{i}", dtype) for i in range(3)] + [laterals[3]]
    outs = [outs[0]] + [ResizeLike(dtype=dtype, name=f"fpn_{i}_resize")(outs[i], outs[0]) for i in range(1, 4)]
    x = keras.layers.Concatenate(dtype=dtype, name="fpn_concat")(outs)  # (N, H/4, W/4, 4 * channels)
    x = _conv_bn_relu(x, channels, 3, "fpn_bottleneck", dtype)
    x = _classifier(x, num_classes, dropout, "decode", dtype, seed)
    return ResizeLike(dtype=dtype, name="decode_resize")(x, images)


def fcn_head(feature, images, num_classes, channels=256, dropout=0.1, dtype=None, seed=None):
    """mmseg's FCNHead with one conv (UperNet's auxiliary head): 3x3 ConvModule -> dropout -> 1x1 classes,
    resized to `images`' size."""
    x = _conv_bn_relu(feature, channels, 3, "aux_0", dtype)
    x = _classifier(x, num_classes, dropout, "aux", dtype, seed)
    return ResizeLike(dtype=dtype, name="aux_resize")(x, images)


def _check_pool_scales(pool_scales):
    if (not isinstance(pool_scales, (list, tuple)) or not pool_scales
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pool_scales)
            or len(set(pool_scales)) != len(pool_scales)):
        raise ValueError("`pool_scales` must be a non-empty sequence of distinct positive integers. "
                         f"{checks.received('pool_scales', pool_scales)}")
    return tuple(int(s) for s in pool_scales)


def _check_backbone(backbone):
    levels = getattr(backbone, "pyramid_outputs", None)
    if not isinstance(backbone, keras.Model) or not isinstance(levels, dict) or not set(LEVELS) <= set(levels):
        raise ValueError("`backbone` must be a keras-hub FeaturePyramidBackbone with pyramid_outputs P2..P5. "
                         f"Received: backbone={type(backbone).__name__}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class UperNetImageSegmenter(keras_hub.models.ImageSegmenter):
    """UperNet semantic segmentation on a feature pyramid backbone: logits (N, H, W, num_classes).

    The model's output (`predict`, `evaluate`, a plain call) is the decode head's logits alone. In training
    (`fit`, `call(..., training=True)`) the call returns `(logits, auxiliary_logits)`, the FCN head on P4, and
    `compute_loss` adds `auxiliary_loss_weight` times the compiled loss of the auxiliary logits to the main
    loss, as mmseg's `loss_decode + 0.4 * aux.loss_decode`; the metrics see the main logits only.

    Args:
        backbone: a keras-hub `FeaturePyramidBackbone` with `pyramid_outputs` P2..P5 (strides 4..32), e.g.
            `keras_convnext.hub.ConvNeXtBackbone`.
        num_classes: classes of the logits (with the background, if it is a class).
        preprocessor: None or a keras-hub `ImageSegmenterPreprocessor`.
        auxiliary_loss_weight: the auxiliary head's loss weight (0 trains it not at all).
        channels: channels of the decode head's convs (mmseg: 512).
        aux_channels: channels of the auxiliary head's conv (mmseg: 256).
        dropout: channel dropout before each classifier (mmseg's Dropout2d, 0.1).
        pool_scales: the PPM's bins per side on P5.
        seed: seed of the dropouts (None: drawn once from Keras's global seed).

    Example:
    ```python
    backbone = ConvNeXtBackbone.from_weights("convnext_tiny.fb_in22k_ft_in1k", image_shape=(512, 512, 3))
    segmenter = UperNetImageSegmenter(backbone, num_classes=150)
    segmenter.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    segmenter.fit(images, masks)  # masks (N, 512, 512) integer classes
    ```
    """

    def __init__(self, backbone, num_classes, preprocessor=None, auxiliary_loss_weight=0.4, channels=512,
                 aux_channels=256, dropout=0.1, pool_scales=(1, 2, 3, 6), seed=None, **kwargs):
        _check_backbone(backbone)
        num_classes = checks.integer("num_classes", num_classes, minimum=1)
        auxiliary_loss_weight = checks.number("auxiliary_loss_weight", auxiliary_loss_weight, 0.0)
        channels = checks.integer("channels", channels, minimum=1)
        aux_channels = checks.integer("aux_channels", aux_channels, minimum=1)
        dropout = checks.number("dropout", dropout, 0.0, 1.0, high_open=True)
        pool_scales = _check_pool_scales(pool_scales)
        if seed is not None:
            seed = checks.integer("seed", seed, minimum=0)
        dtype = backbone.dtype_policy
        # Each dropout owns a SeedGenerator (None: seeded from Python's global RNG once, at build).
        seeds = (None, None) if seed is None else (seed, seed + 1)

        # === Functional model ===
        inputs = backbone.input
        # dict(): keras tracks `pyramid_outputs` as a TrackedDict, which a functional model cannot output on JAX.
        encoder = keras.Model(backbone.inputs, dict(backbone.pyramid_outputs), name="pyramid")
        pyramid = encoder(inputs)
        logits = uper_head(pyramid, inputs, num_classes, channels, pool_scales, dropout, dtype, seeds[0])
        aux_logits = fcn_head(pyramid[AUX_LEVEL], inputs, num_classes, aux_channels, dropout, dtype, seeds[1])
        # The task's graph ends at the main logits (its outputs, summary, export, predict); the training network
        # shares every layer and adds the auxiliary head.
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.training_network = keras.Model(inputs, [logits, aux_logits], name="training_network")

        # === Config ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.num_classes, self.auxiliary_loss_weight = num_classes, auxiliary_loss_weight
        self.channels, self.aux_channels, self.dropout = channels, aux_channels, dropout
        self.pool_scales, self.seed = pool_scales, seed

    def call(self, inputs, training=None, mask=None):
        if training:
            return tuple(self.training_network(inputs, training=True))  # (logits, auxiliary_logits)
        return super().call(inputs, training=training, mask=mask)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not isinstance(y_pred, tuple):  # evaluation: the main logits alone
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        logits, aux_logits = y_pred
        loss = super().compute_loss(x, y, logits, sample_weight, training=training)  # + regularisation losses
        if self.auxiliary_loss_weight:
            loss = loss + self.auxiliary_loss_weight * self.auxiliary_loss(y, aux_logits, sample_weight)
        return loss

    def auxiliary_loss(self, y, aux_logits, sample_weight=None):
        """The compiled loss (a single loss: a name or a `keras.losses.Loss`) of the auxiliary logits."""
        loss = self.loss
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        if not callable(loss):
            raise ValueError("UperNetImageSegmenter's auxiliary head needs a single compiled loss (a name or a "
                             f"keras.losses.Loss). Received: loss={loss!r}")
        if isinstance(loss, keras.losses.Loss):
            return loss(y, aux_logits, sample_weight=sample_weight)
        return keras.ops.mean(loss(y, aux_logits))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, tuple):  # training: the metrics follow the main logits, as evaluation's
            y_pred = y_pred[0]
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_config(self):
        config = super().get_config()  # Task's: backbone, preprocessor, name
        config.update({
            "num_classes": self.num_classes, "auxiliary_loss_weight": self.auxiliary_loss_weight,
            "channels": self.channels, "aux_channels": self.aux_channels, "dropout": self.dropout,
            "pool_scales": list(self.pool_scales), "seed": self.seed,
        })
        return config
