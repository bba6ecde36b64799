"""FCMAE: ConvNeXt V2's fully convolutional masked autoencoder (Woo et al., CVPR 2023), under plain `model.fit`.

    encoder = ConvNeXtV2Atto(weights=None, include_top=False, input_shape=(224, 224, 3))
    model = FCMAE(encoder)
    model.compile(optimizer=recipe.optimizer(steps_per_epoch))
    model.fit(images)  # no labels: the loss is the masked patches' reconstruction error
    encoder.save("encoder.keras")  # ConvNeXtV2Atto(weights="encoder.keras", classes=10) fine-tunes it

As the official `models/fcmae.py`: 32 px patches, 60% of them masked per image; the encoder sees the
masked image; the decoder is a 1x1 projection to 512 channels, a mask token at the masked positions,
one V2 block and a 1x1 conv predicting each patch's 32 * 32 * 3 pixels; the loss is the mean squared
error against per-patch normalised pixels, over the masked patches only.

The official encoder is sparse (MinkowskiEngine): it computes on the visible positions only. Here it
is the dense encoder's own layers with the mask re-applied (`ConvNeXtStage.call(keep=...)`), which
gives the same numbers:
  * the stem runs on the full image and is masked after: its 4x4 stride-4 windows lie inside one
    32 px patch, so a visible position's stem output reads visible pixels only;
  * every later downsampling (LayerNorm, 2x2 stride-2 conv) reads a 2x2 window that lies inside one
    patch, so it is all visible or all masked; its output is masked again (the LayerNorm's beta and
    the conv's bias make masked positions nonzero);
  * inside a block the dwconv sees zeros at masked positions (the sparse conv sums active neighbours
    only); LayerNorm and pwconv1 act per position but their biases make masked positions nonzero,
    which would leak into GRN's L2 statistics (the sparse GRN sums over active sites only) and, through
    the residual, into the next block's dwconv: the block zeros them before the GRN and at its output.
One difference is deliberate: the official MinkowskiGRN takes its statistics over the active sites of
the whole batch (ConvNeXt-V2 issue #86), the dense GRN (and the official JAX masked model in
TRAINING.md) per image. Here it is per image, as the fine-tuned network computes it: the same as the
official code on a one-image batch.
"""

import keras
from keras import ops

from keras_convnext import checks
from keras_convnext.layers import PACKAGE, ConvNeXtBlock, HostConstant, PointwiseDense, kernel_init

PATCH_SIZE = 32  # the encoder's total stride: one stage-3 position per patch
MASK_RATIO = 0.6
DECODER_DIM = 512
DECODER_DEPTH = 1


def masked_count(patches, mask_ratio):
    """How many of `patches` are masked per image: `patches - int(patches * (1 - mask_ratio))`, as the
    official `gen_random_mask` keeps `int(L * (1 - mask_ratio))` (49 patches at 0.6: 30 masked)."""
    return patches - int(patches * (1 - mask_ratio))


@keras.saving.register_keras_serializable(package=PACKAGE)
class RandomPatchMask(keras.layers.Layer):
    """(N, H, W, C) images -> (N, H / patch, W / patch) float 0/1 masks (1: masked), random per image.

    Exactly `masked_count(patches, mask_ratio)` patches of each image are masked, uniformly at random
    (the rank of a uniform draw per patch, as the official argsort of noise). The layer owns its
    `SeedGenerator`: fresh masks at every step of a jit-compiled `fit`, on every backend.

    Args:
        mask_ratio: fraction of the patches masked, in (0, 1).
        patch_size: side of a square patch, in pixels.
        seed: optional integer seed of the layer's generator.
    """

    def __init__(self, mask_ratio=MASK_RATIO, patch_size=PATCH_SIZE, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.mask_ratio = checks.number("mask_ratio", mask_ratio, 0.0, 1.0, low_open=True, high_open=True)
        self.patch_size = checks.integer("patch_size", patch_size, minimum=1)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def grid(self, shape):
        """(rows, columns) of patches of images of `shape` (N, H, W, C), whose H and W must be known."""
        height, width = shape[1], shape[2]
        if height is None or width is None or height % self.patch_size or width % self.patch_size:
            raise ValueError(f"FCMAE needs images of known height and width, multiples of {self.patch_size}. "
                             f"Received: images of shape {tuple(shape)}")
        return height // self.patch_size, width // self.patch_size

    def call(self, images):
        rows, cols = self.grid(images.shape)
        batch = ops.shape(images)[0]
        noise = keras.random.uniform((batch, rows * cols), seed=self.seed_generator, dtype="float32")
        ranks = ops.argsort(ops.argsort(noise, axis=-1), axis=-1)  # each patch's rank in its image's draw
        keep = rows * cols - masked_count(rows * cols, self.mask_ratio)
        mask = ops.cast(ops.greater_equal(ranks, keep), "float32")
        return ops.reshape(mask, (batch, rows, cols))

    def compute_output_spec(self, images):
        rows, cols = self.grid(images.shape)
        return keras.KerasTensor((images.shape[0], rows, cols), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({"mask_ratio": self.mask_ratio, "patch_size": self.patch_size, "seed": self.seed})
        return config


def upsample_mask(mask, factor):
    """(N, h, w) patch masks -> (N, h * factor, w * factor, 1): each patch's value over its positions."""
    if factor > 1:
        mask = ops.repeat(ops.repeat(mask, factor, axis=1), factor, axis=2)
    return mask[..., None]


def patchify(images, patch_size=PATCH_SIZE):
    """(N, H, W, C) -> (N, H / p, W / p, p * p * C), each patch's pixels in (row, column, channel) order,
    the official `patchify`'s order (its pred conv's output channels follow it)."""
    _, height, width, channels = images.shape
    p = patch_size
    x = ops.reshape(images, (-1, height // p, p, width // p, p, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # (N, h, w, p, p, C)
    return ops.reshape(x, (-1, height // p, width // p, p * p * channels))


def normalized_patches(patches, epsilon=1e-6):
    """norm_pix_loss's target: each patch minus its mean, over (epsilon + its variance) ** 0.5.

    The variance is PyTorch's `var` default, unbiased (divides by n - 1), as in the official loss.
    """
    n = patches.shape[-1]
    mean = ops.mean(patches, axis=-1, keepdims=True)
    var = ops.sum(ops.square(patches - mean), axis=-1, keepdims=True) / (n - 1)
    return (patches - mean) / ops.sqrt(var + epsilon)


def reconstruction_loss(pred, target, mask, norm_pix_loss=True):
    """Mean over the masked patches of each patch's mean squared error; float32.

    Args:
        pred, target: (N, h, w, p * p * C) predicted and true patches (target: raw patchified pixels).
        mask: (N, h, w), 1 at the masked patches.
    """
    pred, target, mask = (ops.cast(t, "float32") for t in (pred, target, mask))
    if norm_pix_loss:
        target = normalized_patches(target)
    per_patch = ops.mean(ops.square(pred - target), axis=-1)  # (N, h, w)
    return ops.sum(per_patch * mask) / ops.sum(mask)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FCMAE(keras.Model):
    """ConvNeXt V2's masked autoencoder around a V2 encoder; `fit(images)` pre-trains it, no labels needed.

    Calling it on raw [0, 255] images returns a dict: `pred` (N, h, w, p * p * 3), the predicted patches;
    `mask` (N, h, w), 1 at the masked patches; `target` (N, h, w, p * p * 3), the patches of the
    encoder's normalised input (the official targets are the normalised images). `compute_loss` (what
    `fit` and `evaluate` call) is `reconstruction_loss` of those. The encoder is a headless `ConvNeXtModel`
    (`include_top=False, pooling=None`, version 2) whose own layers and variables are trained: save it
    (`model.encoder.save(...)`) to fine-tune it with a builder's `weights=`.

    Args:
        encoder: a ConvNeXt V2 `ConvNeXtModel` without top or pooling; its input shape's height and
            width (when known) must be multiples of 32.
        mask_ratio: fraction of the patches masked per image (0.6).
        decoder_dim: channels of the decoder (512).
        decoder_depth: V2 blocks in the decoder (1).
        norm_pix_loss: targets normalised per patch (on in the official pre-training).
        seed: optional integer seed of the masks.
    """

    def __init__(self, encoder, mask_ratio=MASK_RATIO, decoder_dim=DECODER_DIM, decoder_depth=DECODER_DEPTH,
                 norm_pix_loss=True, seed=None, name="fcmae", **kwargs):
        from keras_convnext.backbone import ConvNeXtModel

        if isinstance(encoder, dict):  # from a config
            encoder = keras.saving.deserialize_keras_object(encoder)
        if not isinstance(encoder, ConvNeXtModel) or encoder.version != 2 or encoder.include_top or (
                encoder.pooling is not None):
            raise ValueError(
                "FCMAE needs a ConvNeXt V2 encoder without top or pooling, e.g. "
                "ConvNeXtV2Atto(weights=None, include_top=False). Received: encoder="
                + (f"{type(encoder).__name__}(version={encoder.version}, include_top={encoder.include_top}, "
                   f"pooling={encoder.pooling!r})" if isinstance(encoder, ConvNeXtModel) else repr(encoder)))
        super().__init__(name=name, **kwargs)
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.decoder_dim = checks.integer("decoder_dim", decoder_dim, minimum=1)
        self.decoder_depth = checks.integer("decoder_depth", decoder_depth, minimum=0)
        self.norm_pix_loss = checks.boolean("norm_pix_loss", norm_pix_loss)
        self.seed = seed
        self.masking = RandomPatchMask(mask_ratio, PATCH_SIZE, seed=seed, name="masking")
        size = encoder.image_shape[:2]
        if any(s is not None for s in size):
            self.masking.grid((None, *size, None))  # a known input size that is no multiple of 32 fails now
        channels = encoder.image_shape[-1]
        self.proj = PointwiseDense(self.decoder_dim, kernel_initializer=kernel_init(),
                                   bias_initializer=HostConstant(0.0), name="proj")
        self.decoder = [ConvNeXtBlock(self.decoder_dim, layer_scale_init_value=None, grn=True, name=f"decoder_{i}")
                        for i in range(self.decoder_depth)]
        self.pred = PointwiseDense(PATCH_SIZE * PATCH_SIZE * channels, kernel_initializer=kernel_init(),
                                   bias_initializer=HostConstant(0.0), name="pred")
        # Built here, from the channel counts alone: the model needs no sample call before fit or loading.
        self.proj.build((None, None, None, encoder.dims[-1]))
        for block in self.decoder:
            block.build((None, None, None, self.decoder_dim))
        self.pred.build((None, None, None, self.decoder_dim))
        # Normal, std 0.02, as the official init (its `_init_weights` draws the mask token last).
        self.mask_token = self.add_weight(name="mask_token", shape=(self.decoder_dim,),
                                          initializer=keras.initializers.RandomNormal(stddev=0.02, seed=seed))
        self.built = True

    def _encoder_layers(self):
        preprocessing = [layer for layer in self.encoder.layers if layer.name == "preprocessing"]
        return (preprocessing[0] if preprocessing else None), self.encoder.stages

    def encode(self, images, mask, training=None):
        """The masked encoder: (N, H, W, 3) raw images and (N, h, w) patch masks -> (N, h, w, C) features.

        Masked positions come out exactly zero; visible ones as the official sparse encoder computes
        them (module docstring).
        """
        preprocessing, stages = self._encoder_layers()
        x = ops.convert_to_tensor(images, dtype=self.encoder.inputs[0].dtype)
        if preprocessing is not None:
            x = preprocessing(x)
        return self._encode(x, mask, stages, training)

    def _encode(self, x, mask, stages, training):
        keep = 1.0 - ops.cast(mask, "float32")
        for stage, stage_layer in enumerate(stages):
            # Stage outputs have strides 4, 8, 16, 32: a patch spans 8, 4, 2, 1 positions.
            x = stage_layer(x, training=training, keep=upsample_mask(keep, PATCH_SIZE // 4 // 2 ** stage))
        return x

    def decode(self, features, mask, training=None):
        """(N, h, w, C) features and (N, h, w) masks -> (N, h, w, p * p * 3) predicted patches."""
        x = self.proj(features)
        m = ops.cast(mask, x.dtype)[..., None]
        x = x * (1.0 - m) + ops.cast(self.mask_token, x.dtype) * m
        for block in self.decoder:
            x = block(x, training=training)
        return self.pred(x)

    def call(self, images, training=None):
        preprocessing, stages = self._encoder_layers()
        x = ops.convert_to_tensor(images, dtype=self.encoder.inputs[0].dtype)
        if preprocessing is not None:
            x = preprocessing(x)
        mask = self.masking(x)
        pred = self.decode(self._encode(x, mask, stages, training), mask, training=training)
        return {"pred": pred, "mask": mask, "target": patchify(x, PATCH_SIZE)}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The reconstruction loss of `y_pred` (this model's output on `x`); labels and sample weights unused."""
        if y_pred is None:
            y_pred = self(x, training=training)
        loss = reconstruction_loss(y_pred["pred"], y_pred["target"], y_pred["mask"], self.norm_pix_loss)
        for extra in self.losses:  # regularisers, should a layer add any
            loss = loss + ops.cast(extra, "float32")
        return loss

    def get_config(self):
        return {"encoder": keras.saving.serialize_keras_object(self.encoder), "mask_ratio": self.mask_ratio,
                "decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
                "norm_pix_loss": self.norm_pix_loss, "seed": self.seed, "name": self.name,
                "trainable": self.trainable}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)
