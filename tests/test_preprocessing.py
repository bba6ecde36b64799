import json

import keras
import numpy as np
import pytest
from PIL import Image

import keras_convnext as kc
from keras_convnext.preprocessing import normalize_pixels


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
    np.testing.assert_allclose(normalize_pixels(ours), expected, atol=1e-5)
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
    # keras.applications' spelling: WordNet's first lemma with its spaces as underscores.
    assert classes[2] == ("n01484850", "great_white_shark") and classes[386] == ("n02504458", "African_elephant")
    assert not [name for _, name in classes if " " in name]
    assert sum("_" in name for _, name in classes) == 414
    preds = np.full((2, 1000), 1e-4, "float32")
    preds[0, 281], preds[0, 1] = 0.9, 0.05
    preds[1, 0] = 0.7
    decoded = kc.decode_predictions(preds, top=2)
    assert decoded[0] == [("n02123045", "tabby", pytest.approx(0.9)), ("n01443537", "goldfish", pytest.approx(0.05))]
    assert decoded[1][0][:2] == ("n01440764", "tench")
    with pytest.raises(ValueError, match=r"Received array with shape: \(2, 10\)"):
        kc.decode_predictions(np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"Received: top=0"):
        kc.decode_predictions(preds, top=0)
    for top in (True, 2.5, 1001):
        with pytest.raises(ValueError, match=rf"`top` must be .*Received: top={top}"):
            kc.decode_predictions(preds, top=top)


# --- the keras.applications contract ----------------------------------------------------------

def _inputs():
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    return [x, x.astype("uint8"), keras.ops.convert_to_tensor(x)]


@pytest.mark.parametrize("data_format", [None, "channels_last", "channels_first"])
def test_preprocess_input_is_keras_applications(data_format):
    from keras.applications import convnext as keras_apps

    for x in _inputs():
        ours = kc.preprocess_input(x, data_format=data_format)
        theirs = keras_apps.preprocess_input(x, data_format=data_format)
        assert ours is x and theirs is x  # the identity: both models normalise inside
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))
    assert kc.preprocess_input(_inputs()[0]) is not None  # data_format is optional, as keras's


@pytest.mark.parametrize("data_format", ["NHWC", "channels-last", ""])
def test_preprocess_input_checks_data_format_as_keras(data_format):
    from keras.applications import imagenet_utils

    x = _inputs()[0]
    with pytest.raises(ValueError) as theirs:
        imagenet_utils.preprocess_input(x, data_format=data_format)  # keras's check of the argument
    with pytest.raises(ValueError) as ours:
        kc.preprocess_input(x, data_format=data_format)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).endswith(f"Received: data_format={data_format}")


def test_normalize_pixels_for_models_without_their_preprocessing():
    x = _inputs()[0]
    mean, std = np.array(kc.presets.IMAGENET_MEAN), np.array(kc.presets.IMAGENET_STD)
    expected = (x.astype("float64") / 255 - mean) / std
    ours = normalize_pixels(x)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    np.testing.assert_allclose(normalize_pixels(x.astype("uint8")), normalize_pixels(x.astype("uint8").tolist()))
    tensor = normalize_pixels(keras.ops.convert_to_tensor(x))
    assert keras.ops.is_tensor(tensor)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tensor), expected, atol=1e-5)
    np.testing.assert_allclose(normalize_pixels(np.full((1, 1, 3), 255)), ((1 - mean) / std)[None, None], atol=1e-6)
    np.testing.assert_allclose(normalize_pixels([[127.5, 0.0]], mean=(0.5, 0.0), std=(0.25, 2.0)), [[0.0, 0.0]])
    # The model's own preprocessing layer computes the same.
    layer = kc.ConvNeXtPreprocessing(list(mean), list(std))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-5)


@pytest.fixture
def keras_class_index(monkeypatch, tmp_path):
    """keras's own `decode_predictions`, reading our class index through its own file loader (no download).

    The loader is handed the hash keras pins for its `imagenet_class_index.json`: our index, written as
    that JSON, must pass keras's own check of it.
    """
    from keras.src.applications import imagenet_utils
    from keras.src.utils import file_utils

    path = tmp_path / "imagenet_class_index.json"
    path.write_text(json.dumps({str(i): [wnid, name] for i, (wnid, name) in enumerate(kc.imagenet_classes())}))
    asked = []

    def get_file(fname, origin=None, file_hash=None, **kwargs):
        asked.append(fname)
        assert fname == "imagenet_class_index.json" and file_hash
        assert file_utils.validate_file(str(path), file_hash), "our class index is not keras's file"
        return str(path)

    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", None)
    monkeypatch.setattr(imagenet_utils.file_utils, "get_file", get_file)
    return asked


def test_decode_predictions_is_keras_applications(keras_class_index):
    from keras.applications import convnext as keras_apps

    rng = np.random.default_rng(0)
    # Random scores without ties (keras breaks them in argsort's order).
    preds = np.stack([rng.permutation(1000) for _ in range(3)]).astype("float32") / 1000
    preds = preds * rng.uniform(0.5, 1.0, (3, 1))
    for top in (1, 5, 1000):
        ours, theirs = kc.decode_predictions(preds, top=top), keras_apps.decode_predictions(preds, top=top)
        assert len(ours) == 3 and len(ours[0]) == top
        assert ours == theirs
    assert keras_class_index == ["imagenet_class_index.json"]  # read once, through keras's loader
    tensor = keras.ops.convert_to_tensor(preds)
    assert kc.decode_predictions(tensor, top=3) == keras_apps.decode_predictions(tensor, top=3)
    assert kc.decode_predictions(preds.tolist(), top=2) == keras_apps.decode_predictions(preds, top=2)
    for bad in (np.zeros((2, 10)), np.zeros(1000), np.zeros((1, 1000, 1))):
        with pytest.raises(ValueError) as theirs:
            keras_apps.decode_predictions(bad)
        with pytest.raises(ValueError) as ours:
            kc.decode_predictions(bad)
        assert str(ours.value) == str(theirs.value)
