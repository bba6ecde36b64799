import numpy as np
import pytest
from PIL import Image

import keras_convnext as kc


@pytest.fixture(scope="module")
def cat_path(tmp_path_factory):
    import skimage.data

    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    return str(path)


@pytest.mark.parametrize("size, crop_pct, mode", [(224, 0.875, "center"), (224, 0.95, "center"),
                                                  (384, 1.0, "squash"), (96, 0.9, "center")])
def test_eval_transform_matches_timm(cat_path, size, crop_pct, mode):
    torch = pytest.importorskip("torch")
    from timm.data import create_transform

    theirs = create_transform(size, crop_pct=crop_pct, interpolation="bicubic", crop_mode=mode,
                              mean=kc.presets.IMAGENET_MEAN, std=kc.presets.IMAGENET_STD)
    with Image.open(cat_path) as im:
        expected = theirs(im.convert("RGB")).permute(1, 2, 0).numpy()
    ours = kc.load_image(cat_path, image_size=size, crop_pct=crop_pct, crop_mode=mode)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    np.testing.assert_allclose(kc.preprocess_input(ours), expected, atol=1e-5)
    del torch


def test_eval_transform_takes_constants_from_the_preset(cat_path):
    squash = kc.load_image(cat_path, preset="convnext_tiny.fb_in22k_ft_in1k_384")
    assert squash.shape == (384, 384, 3)
    nano = kc.load_image(cat_path, preset="convnext_nano.d1h_in1k")
    explicit = kc.load_image(cat_path, image_size=224, crop_pct=0.95)
    np.testing.assert_array_equal(nano, explicit)
    array_input = kc.eval_transform(np.asarray(Image.open(cat_path).convert("RGB")), preset="convnext_nano.d1h_in1k")
    np.testing.assert_array_equal(array_input, nano)


def test_eval_transform_errors(tmp_path):
    with pytest.raises(ValueError, match=r"No image file.*Received: path="):
        kc.load_image(str(tmp_path / "missing.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Cannot read an image.*bad.jpg"):
        kc.load_image(str(bad))
    with pytest.raises(ValueError, match=r"Received: interpolation='cubic'"):
        kc.eval_transform(np.zeros((40, 40, 3), "uint8"), interpolation="cubic")
    with pytest.raises(ValueError, match=r"uint8 array.*shape=\(40, 40\)"):
        kc.eval_transform(np.zeros((40, 40), "uint8"))
    image = np.zeros((40, 40, 3), "uint8")
    # 0 is a value, not "the default": each is refused by name.
    for kwargs, message in [({"crop_pct": 0}, r"`crop_pct` must be in \(0.0, 1.0\]. Received: crop_pct=0"),
                            ({"crop_pct": float("nan")}, r"finite number. Received: crop_pct=nan"),
                            ({"crop_pct": 1.5}, r"Received: crop_pct=1.5"),
                            ({"image_size": 0}, r"`image_size` must be at least 1. Received: image_size=0"),
                            ({"image_size": True}, r"integer. Received: image_size=True"),
                            ({"crop_mode": "fill"}, r"Received: crop_mode='fill'"),
                            ({"preset": 3}, r"Received: preset=3")]:
        with pytest.raises(ValueError, match=message):
            kc.eval_transform(image, **kwargs)


def test_decode_predictions_uses_the_shipped_class_names():
    classes = kc.imagenet_classes()
    assert len(classes) == 1000
    assert classes[0] == ("n01440764", "tench") and classes[1] == ("n01443537", "goldfish")
    assert classes[281] == ("n02123045", "tabby")
    preds = np.full((2, 1000), 1e-4, "float32")
    preds[0, 281], preds[0, 1] = 0.9, 0.05
    preds[1, 0] = 0.7
    decoded = kc.decode_predictions(preds, top=2)
    assert decoded[0] == [("n02123045", "tabby", pytest.approx(0.9)), ("n01443537", "goldfish", pytest.approx(0.05))]
    assert decoded[1][0][:2] == ("n01440764", "tench")
    with pytest.raises(ValueError, match=r"Received: preds with shape=\(2, 10\)"):
        kc.decode_predictions(np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"Received: top=0"):
        kc.decode_predictions(preds, top=0)
    for top in (True, 2.5, 1001):
        with pytest.raises(ValueError, match=rf"`top` must be .*Received: top={top}"):
            kc.decode_predictions(preds, top=top)
