"""FCMAE pre-training (keras_convnext.fcmae): masks, the loss, the dense-vs-sparse equivalence, fit, reload, CLI."""

import os

import keras
import numpy as np
import pytest

from keras_convnext.fcmae import (FCMAE, RandomPatchMask, masked_count, patchify, reconstruction_loss,
                                  upsample_mask)
from keras_convnext.model import ConvNeXtV2

DEPTHS, DIMS = (1, 1, 1, 1), (8, 16, 24, 32)
SIZE = 64  # 2 x 2 patches of 32 px


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _fcmae(size=SIZE, seed=0, **kwargs):
    encoder = ConvNeXtV2(DEPTHS, DIMS, weights=None, include_top=False, input_shape=(size, size, 3))
    return FCMAE(encoder, decoder_dim=16, seed=seed, **kwargs)


def _images(n, size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3)).astype("float32")


# ---- masks ------------------------------------------------------------------------------------

def test_masks_hide_the_official_count_of_patches_per_image():
    # The official gen_random_mask keeps int(L * (1 - ratio)) patches: 49 at 0.6 -> 19 kept, 30 masked.
    for patches, ratio in ((49, 0.6), (4, 0.6), (9, 0.6), (49, 0.75), (196, 0.6)):
        assert masked_count(patches, ratio) == patches - int(patches * (1 - ratio))
    assert masked_count(49, 0.6) == 30
    for size, per_image in ((224, 30), (SIZE, 3)):
        mask = _np(RandomPatchMask(0.6, seed=1)(np.zeros((16, size, size, 3), "float32")))
        assert mask.shape == (16, size // 32, size // 32)
        assert set(np.unique(mask)) == {0.0, 1.0}
        assert (mask.sum(axis=(1, 2)) == per_image).all()
    assert len({m.tobytes() for m in mask}) > 1  # each image draws its own


def test_the_pixel_mask_is_constant_on_each_32px_patch():
    mask = _np(RandomPatchMask(0.6, seed=2)(np.zeros((4, 96, 128, 3), "float32")))  # 3 x 4 patches
    for factor in (32, 8, 4, 2, 1):  # the image, then the stage outputs (strides 4, 8, 16, 32)
        up = _np(upsample_mask(mask, factor))
        expected = np.stack([np.kron(m, np.ones((factor, factor))) for m in mask])[..., None]
        np.testing.assert_array_equal(up, expected)


def test_patchify_orders_pixels_as_the_official_code():
    images = _images(2, 96)
    # The official NCHW patchify: 'nchpwq->nhwpqc'; channels-last that is (n, h, p, w, q, c) -> (n, h, w, p, q, c).
    expected = images.reshape(2, 3, 32, 3, 32, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 3, 3, 32 * 32 * 3)
    np.testing.assert_array_equal(_np(patchify(images)), expected)


# ---- the loss ---------------------------------------------------------------------------------

def _numpy_loss(pred, target, mask):
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, ddof=1, keepdims=True)  # torch's var: unbiased
    target = (target - mean) / np.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def test_the_loss_is_the_masked_patches_normalised_pixel_error():
    model = _fcmae()
    out = {k: _np(v) for k, v in model(_images(3)).items()}
    pred, target, mask = out["pred"], out["target"], out["mask"]
    assert pred.shape == target.shape == (3, 2, 2, 32 * 32 * 3) and mask.shape == (3, 2, 2)
    loss = float(_np(model.compute_loss(y_pred=out)))
    np.testing.assert_allclose(loss, _numpy_loss(pred.astype("float64"), target.astype("float64"), mask), rtol=1e-5)
    n, i, j = map(int, np.argwhere(mask == 0)[0])  # a visible patch
    changed = pred.copy()
    changed[n, i, j] += 5.0
    assert float(_np(reconstruction_loss(changed, target, mask))) == pytest.approx(loss, rel=1e-6)
    n, i, j = map(int, np.argwhere(mask == 1)[0])  # a masked one counts
    changed = pred.copy()
    changed[n, i, j] += 5.0
    assert float(_np(reconstruction_loss(changed, target, mask))) > loss + 1.0


# ---- the dense masked encoder is the sparse one ----------------------------------------------

def _randomise(layers, seed=0):
    """Every variable random (zero-initialised GRN and biases would hide a leak into the statistics)."""
    rng = np.random.default_rng(seed)
    for layer in layers:
        for v in layer.weights:
            v.assign(rng.normal(0.0, 0.3 if len(v.shape) == 1 else 0.1, size=v.shape).astype("float32"))


def test_the_masked_encoder_computes_on_the_visible_patches_only():
    # The sparse encoder computes on the visible sites alone, an absent neighbour counting as nothing: for
    # a visible rectangle of patches that is the unmasked encoder run on the crop to that rectangle, whose
    # 'same' zero padding stands for the absent neighbours and whose GRN sums over the crop alone.
    model = _fcmae()
    _randomise(model.encoder.layers)
    images = _images(2, seed=3)
    mask = np.zeros((2, 2, 2), "float32")
    mask[0, :, 1] = 1  # image 0: the right column masked; visible: the 64 x 32 px left half
    mask[1, 1, :] = 1  # image 1: the lower row masked; visible: the top 32 x 64 px
    features = _np(model.encode(images, mask))  # (2, 2, 2, 32)
    preprocessing = model.encoder.get_layer("preprocessing")

    def unmasked(image):
        x = preprocessing(image[None])
        for stage in model.encoder.stages:
            x = stage(x)
        return _np(x)[0]

    np.testing.assert_allclose(features[0, :, :1], unmasked(images[0, :, :32]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(features[1, :1, :], unmasked(images[1, :32, :]), rtol=1e-4, atol=1e-4)
    assert (features[0, :, 1] == 0).all() and (features[1, 1] == 0).all()  # masked sites exactly zero
    # Masking only between stages (not inside the blocks) lets masked positions into GRN and the dwconv.
    x = preprocessing(images)
    keep = 1.0 - mask
    for stage, layer in enumerate(model.encoder.stages):
        x = keras.ops.multiply(layer(x), upsample_mask(keep, 8 // 2 ** stage))
    assert not np.allclose(_np(x)[0, :, :1], features[0, :, :1], rtol=1e-3, atol=1e-3)


# ---- fit --------------------------------------------------------------------------------------

def test_fit_without_labels_draws_fresh_masks_and_trains_every_variable():
    from keras_convnext.recipes import AdamWLayerDecay

    model = _fcmae()
    # Three steps at a learning rate of 0, then one real step (the fcmae recipe's AdamW, betas 0.9 / 0.95):
    # the first three losses, of the same weights on the same images, differ only by their masks.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.0, 1e-3])
    model.compile(optimizer=AdamWLayerDecay(schedule, weight_decay=0.05, beta_2=0.95))
    start = [_np(v) for v in model.trainable_variables]
    seed_state = _np(model.masking.seed_generator.state)
    history = model.fit(_images(8), batch_size=8, epochs=4, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert len({round(float(v), 7) for v in losses[:3]}) == 3, losses
    assert not np.array_equal(_np(model.masking.seed_generator.state), seed_state)
    paths = [v.path for v in model.trainable_variables]
    unchanged = [p for p, v, s in zip(paths, model.trainable_variables, start) if np.array_equal(_np(v), s)]
    assert unchanged == []
    assert any("mask_token" in p for p in paths) and any("decoder_0/grn" in p for p in paths)
    assert any("stages_0/downsample/conv" in p for p in paths)


# ---- saving and fine-tuning -------------------------------------------------------------------

def test_fcmae_round_trips_through_a_keras_file(tmp_path):
    model = _fcmae(mask_ratio=0.5, seed=4)
    config = model.get_config()
    assert {k: config[k] for k in ("mask_ratio", "decoder_dim", "decoder_depth", "norm_pix_loss", "seed")} == {
        "mask_ratio": 0.5, "decoder_dim": 16, "decoder_depth": 1, "norm_pix_loss": True, "seed": 4}
    path = str(tmp_path / "fcmae.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, FCMAE) and loaded.get_config() == config
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(_np(a), _np(b))


def test_the_encoder_reloads_for_fine_tuning(tmp_path):
    model = _fcmae()
    _randomise(model.encoder.layers, seed=5)
    path = str(tmp_path / "encoder.keras")
    model.encoder.save(path)
    want = {v.path: _np(v) for v in model.encoder.weights}
    backbone = ConvNeXtV2(DEPTHS, DIMS, weights=path, include_top=False)
    assert {v.path: _np(v) for v in backbone.weights}.keys() == want.keys()
    for v in backbone.weights:
        np.testing.assert_array_equal(_np(v), want[v.path])
    classifier = ConvNeXtV2(DEPTHS, DIMS, weights=path, classes=10, input_shape=(SIZE, SIZE, 3))
    for v in classifier.weights:
        if v.path in want:
            np.testing.assert_array_equal(_np(v), want[v.path])
    assert classifier.output_shape == (None, 10)


def test_fcmae_refuses_what_it_cannot_mask():
    from keras_convnext.model import ConvNeXt

    for encoder, fragment in ((ConvNeXt(DEPTHS, DIMS, weights=None, include_top=False), "version=1"),
                              (ConvNeXtV2(DEPTHS, DIMS, weights=None, classes=3), "include_top=True"),
                              (ConvNeXtV2(DEPTHS, DIMS, weights=None, include_top=False, pooling="avg"),
                               "pooling='avg'")):
        with pytest.raises(ValueError, match=rf"ConvNeXt V2 encoder without top or pooling.*{fragment}"):
            FCMAE(encoder)
    encoder = ConvNeXtV2(DEPTHS, DIMS, weights=None, include_top=False, input_shape=(48, 48, 3))
    with pytest.raises(ValueError, match=r"multiples of 32\. Received: images of shape \(None, 48, 48, None\)"):
        FCMAE(encoder)
    with pytest.raises(ValueError, match=r"`mask_ratio`"):
        RandomPatchMask(1.0)


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture
def unlabelled(tmp_path):
    """Eight 64 px PNGs: four in the folder itself, four in sub-folders whose names mean nothing."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(8):
        folder = root if i < 4 else root / f"part{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64 + 8 * i, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


def test_train_command_pretrains_on_unlabelled_images(unlabelled, tmp_path, capsys):
    from keras_convnext.cli import main

    out = tmp_path / "run"
    main(["train", unlabelled, "--out", str(out), "--recipe", "fcmae", "--variant", "convnextv2_atto",
          "--epochs", "1", "--batch-size", "4", "--image-size", "64", "--quiet"])
    printed = capsys.readouterr().out
    assert "FCMAE pre-training (fcmae), 1 epochs (8 images, batch 4, 64 px, 60% of patches masked)" in printed
    assert {"encoder.keras", "fcmae.keras", "history.csv", "curves.png"} <= set(os.listdir(out))
    assert not (out / "backup").exists() and not [n for n in os.listdir(out) if ".tmp" in n]
    encoder = keras.saving.load_model(str(out / "encoder.keras"))
    assert encoder.variant == "convnextv2_atto" and not encoder.include_top
    fcmae = keras.saving.load_model(str(out / "fcmae.keras"))
    for a, b in zip(encoder.weights, fcmae.encoder.weights):
        np.testing.assert_array_equal(_np(a), _np(b))
    rows = open(out / "history.csv").read().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "loss"] and len(rows) == 2 and np.isfinite(float(rows[1].split(",")[1]))
    assert open(out / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, fragment", [
    (["--variant", "atto"], "FCMAE pre-trains ConvNeXt V2 (GRN) networks: convnextv2_atto, "),
    (["--variant", "convnextv2_atto", "--val-split", "0.2"], "takes no validation data"),
    (["--variant", "convnextv2_atto", "--image-size", "48"], "multiple of 32. Received: image_size=48"),
])
def test_train_command_refuses_bad_pretraining_input_in_one_line(argv, fragment, unlabelled, tmp_path, capsys):
    from keras_convnext.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", unlabelled, "--out", str(tmp_path / "run"), "--recipe", "fcmae", "--epochs", "1", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
