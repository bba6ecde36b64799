"""One image decoder: every mode gives PIL's RGB pixels through predict's decoder, the eval
transform, the training pipeline and the SavedModel's TF graph decoder; decompression bombs and
damaged files are ValueErrors naming the file, and `check_images` finds them before training;
images too elongated for the eval transform are refused before its resize, in PIL and in TF."""

import functools
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import keras_convnext as kc
from keras_convnext import data
from keras_convnext.preprocessing import ImageReadError, decode_image_bytes
from conftest import once

S = 12  # square images: eval_transform at image_size=S, crop_pct=1.0 keeps every pixel


def _save(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width, height, bit_depth, color_type, raw):
    """A PNG written by hand (PIL writes no 16-bit RGB, nor a header it would refuse to decode)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _png16(levels, color_type):
    rows = levels.astype(">u2").reshape(levels.shape[0], -1)
    return _png(levels.shape[1], levels.shape[0], 16, color_type, b"".join(b"\0" + r.tobytes() for r in rows))


def _palette_image(rng, indices):
    image = Image.frombytes("P", indices.shape[::-1], indices.astype(np.uint8).tobytes())
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    image.putpalette(palette.tobytes())
    return image, palette


def _smooth(rng, channels=3):
    """A photograph-like image (JPEG's chroma subsampling and IDCT have something to do)."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((S, S), Image.Resampling.BICUBIC))


def _cases():
    """name -> (encoded bytes, the RGB pixels PIL's correct conversion gives, computed here)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    alpha = rng.integers(0, 256, (S, S), dtype=np.uint8)
    rep = lambda g: np.repeat(g[..., None], 3, axis=-1)  # noqa: E731
    cases = {}
    cases["rgb.png"] = _save(Image.fromarray(rgb), "PNG"), rgb
    cases["gray.png"] = _save(Image.fromarray(gray), "PNG"), rep(gray)
    bits = rng.integers(0, 2, (S, S), dtype=np.uint8) * 255
    cases["bilevel.png"] = _save(Image.fromarray(bits).convert("1"), "PNG"), rep(bits)
    levels = rng.integers(0, 65536, (S, S), dtype=np.uint16)
    cases["gray16.png"] = _save(Image.fromarray(levels), "PNG"), rep((levels >> 8).astype(np.uint8))
    cases["gray32.tif"] = (_save(Image.fromarray(levels.astype(np.int32)), "TIFF"),
                           rep((levels >> 8).astype(np.uint8)))
    indices = rng.integers(0, 16, (S, S))
    image, palette = _palette_image(rng, indices)
    cases["palette.png"] = _save(image, "PNG"), palette[indices]
    cases["palette_transparent.png"] = _save(image, "PNG", transparency=3), palette[indices]
    cases["palette_alpha.png"] = _save(image, "PNG", transparency=bytes(range(0, 256, 16))), palette[indices]
    cases["gray_alpha.png"] = _save(Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]), "PNG"), rep(gray)
    cases["rgba.png"] = _save(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), rgb
    rgb16 = rng.integers(0, 65536, (S, S, 4), dtype=np.uint16)
    cases["rgb16.png"] = _png16(rgb16[..., :3], 2), (rgb16[..., :3] >> 8).astype(np.uint8)
    cases["rgba16.png"] = _png16(rgb16, 6), (rgb16[..., :3] >> 8).astype(np.uint8)
    cases["gray_alpha16.png"] = _png16(rgb16[..., :2], 4), rep((rgb16[..., 0] >> 8).astype(np.uint8))
    cmyk = Image.frombytes("CMYK", (S, S), rng.integers(0, 256, (S, S, 4), dtype=np.uint8).tobytes())
    cases["cmyk.tif"] = _save(cmyk, "TIFF"), np.asarray(cmyk.convert("RGB"))  # PIL's CMYK -> RGB formula
    frames = [Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)) for _ in range(3)]
    cases["animated.png"] = _save(frames[0], "PNG", save_all=True, append_images=frames[1:]), np.asarray(frames[0])
    gif_frames = [_palette_image(rng, rng.integers(0, 8, (S, S)))[0] for _ in range(3)]
    for frame in gif_frames:
        frame.putpalette(palette.tobytes())
    first = palette[np.asarray(gif_frames[0])]
    cases["animated.gif"] = _save(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], loop=0), first
    cases["transparent.gif"] = _save(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:],
                                     transparency=3, loop=0, comment=b"a comment block"), first
    cases["rgb.bmp"] = _save(Image.fromarray(rgb), "BMP"), rgb
    cases["gray.bmp"] = _save(Image.fromarray(gray), "BMP"), rep(gray)
    cases["palette.bmp"] = _save(image, "BMP"), palette[indices]
    cases["rgba.bmp"] = _save(Image.fromarray(np.dstack([rgb, alpha])), "BMP"), rgb
    # JPEG's pixels are its decoder's: libjpeg's, through PIL (Image.open alone, no conversion).
    photo = _smooth(rng)
    for name, image in (("rgb.jpg", Image.fromarray(photo)), ("gray.jpg", Image.fromarray(photo[..., 1])),
                        ("rgb420.jpg", Image.fromarray(photo))):
        encoded = _save(image, "JPEG", quality=90, subsampling=2 if "420" in name else 0)
        decoded = np.asarray(Image.open(io.BytesIO(encoded)))
        cases[name] = encoded, decoded if decoded.ndim == 3 else rep(decoded)
    encoded = _save(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=90)
    cases["cmyk.jpg"] = encoded, np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    return cases


CASES = _cases()
TF_TAKES = [name for name in CASES if not name.endswith(".tif")]  # the bytes signature's formats


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    for name, (encoded, _) in CASES.items():
        (root / name).write_bytes(encoded)
    return root


def test_the_cases_are_what_they_say():
    modes = {name: Image.open(io.BytesIO(encoded)).mode for name, (encoded, _) in CASES.items()}
    assert modes["gray16.png"] == "I;16" and modes["gray32.tif"] == "I" and modes["cmyk.tif"] == "CMYK"
    assert modes["palette_alpha.png"] == "P" and modes["gray_alpha.png"] == "LA" and modes["gray.jpg"] == "L"
    assert Image.open(io.BytesIO(CASES["animated.gif"][0])).n_frames == 3
    assert Image.open(io.BytesIO(CASES["animated.png"][0])).n_frames == 3
    # What the decoder mends: PIL's own convert turns 16-bit gray white.
    assert np.asarray(Image.open(io.BytesIO(CASES["gray16.png"][0])).convert("RGB")).min() == 255


@pytest.mark.parametrize("name", list(CASES))
def test_pil_paths_give_pils_correct_rgb(name, image_files):
    encoded, expected = CASES[name]
    path = str(image_files / name)
    assert expected.shape == (S, S, 3) and expected.dtype == np.uint8
    np.testing.assert_array_equal(decode_image_bytes(path), expected)
    np.testing.assert_array_equal(decode_image_bytes(encoded), expected)
    np.testing.assert_array_equal(kc.load_image(path, image_size=S, crop_pct=1.0), expected)
    np.testing.assert_array_equal(kc.eval_transform(encoded, image_size=S, crop_pct=1.0), expected)
    with Image.open(path) as opened:  # a PIL image of that mode, as a caller may pass one
        np.testing.assert_array_equal(kc.eval_transform(opened, image_size=S, crop_pct=1.0), expected)


def test_sixteen_bit_gray_is_not_white(image_files):
    pixels = decode_image_bytes(str(image_files / "gray16.png"))
    assert pixels.min() < 16 and pixels.max() > 240 and len(np.unique(pixels)) > 100


@functools.cache
def _graph_decoder():
    """`data.decode_image` traced as the SavedModel traces it: a graph with no Python in it."""
    import tensorflow as tf

    fn = tf.function(data.decode_image).get_concrete_function(tf.TensorSpec([], tf.string))
    graph = fn.graph.as_graph_def()
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}, ops
    return fn


@pytest.mark.parametrize("name", TF_TAKES)
def test_tf_bytes_decoder_gives_the_same_pixels(name):
    import tensorflow as tf

    encoded, expected = CASES[name]
    for decoded in (data.decode_image(tf.constant(encoded)).numpy(), _graph_decoder()(tf.constant(encoded)).numpy()):
        assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
        if name == "cmyk.jpg":  # TF rounds its CMYK -> RGB down, PIL to nearest
            assert np.abs(decoded.astype(int) - expected).max() <= 1
        else:
            np.testing.assert_array_equal(decoded, expected)
    if name == "transparent.gif":  # what the GIF fix mends: TF alone paints transparent pixels black
        plain = tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
        transparent = np.asarray(Image.open(io.BytesIO(encoded))) == 3
        assert transparent.any() and (plain[transparent] == 0).all() and (expected[transparent] != 0).any()


def test_tf_bytes_decoder_refuses_what_it_does_not_take():
    import tensorflow as tf

    for encoded in (CASES["gray32.tif"][0], b"not an image at all"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="Not a JPEG, PNG, GIF or BMP"):
            data.decode_image(tf.constant(encoded))


def test_training_pipeline_decodes_with_the_same_decoder(image_files):
    names = list(CASES)
    paths = [str(image_files / n) for n in names]
    ds = data.eval_dataset((paths, list(range(len(paths)))), len(paths), image_size=S, crop_pct=1.0,
                           batch_size=len(paths))
    images, labels = next(iter(ds))
    for name, image, label in zip(names, images.numpy(), labels.numpy()):
        assert label.argmax() == names.index(name)
        np.testing.assert_array_equal(image, CASES[name][1].astype("float32"), err_msg=name)


# ---- decompression bombs -----------------------------------------------------------------------

def _declaring(fmt, width, height):
    """A small real file of `fmt` whose header declares width x height (nothing else changed)."""
    tiny = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    if fmt == "png":
        return _png(width, height, 1, 0, b"\0" * 64)  # 1-bit gray, a few zero rows
    encoded = bytearray(_save(tiny, fmt.upper()))
    if fmt == "jpeg":
        at = encoded.index(b"\xff\xc0") + 5
        encoded[at:at + 4] = struct.pack(">HH", height, width)
    elif fmt == "gif":
        encoded[6:10] = struct.pack("<HH", width, height)
    elif fmt == "bmp":
        encoded[18:26] = struct.pack("<ii", width, height)
    return bytes(encoded)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "bmp"])
def test_a_decompression_bomb_is_refused_from_its_header(fmt, tmp_path):
    import tensorflow as tf

    path = tmp_path / f"bomb.{fmt}"
    path.write_bytes(_declaring(fmt, 30000, 30000))
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    for call in (lambda: decode_image_bytes(str(path)), lambda: kc.load_image(str(path))):
        with pytest.raises(ValueError, match=r"900,000,000 pixels, more than the 89,478,485 allowed.*"
                                             r"decompression bomb.*Received: path='.*bomb\." + fmt):
            call()
    assert time.perf_counter() - start < 2
    with pytest.raises(tf.errors.InvalidArgumentError, match="declares more than 89478485 pixels"):
        data.decode_image(tf.constant(path.read_bytes()))


def test_pils_warning_range_is_refused_too_without_its_warning(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_declaring("png", 10000, 10000))  # 100 M: PIL only warns (its error is above 179 M)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"10000x10000 = 100,000,000 pixels.*Received: path='.*big\.png'"):
            decode_image_bytes(str(path))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_bound_is_pils_own_knob(monkeypatch):
    import tensorflow as tf

    encoded = CASES["rgb.png"][0]  # 144 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match=r"12x12 = 144 pixels, more than the 100 allowed"):
        decode_image_bytes(encoded, path="small.png")
    with pytest.raises(tf.errors.InvalidArgumentError, match="declares more than 100 pixels"):
        data.decode_image(tf.constant(encoded))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's "no bound"
    assert decode_image_bytes(encoded).shape == (S, S, 3)
    assert data.decode_image(tf.constant(encoded)).shape == (S, S, 3)


# ---- elongated images: refused before the eval transform's resize ------------------------------

def _black_png(width, height):
    """A real RGB PNG of black pixels, compressed as it is built (1 x 80 M: 320 MB raw, 0.3 MB of PNG)."""
    row = b"\0" * (1 + 3 * width)  # filter byte, then the pixels
    rows = max(1, (1 << 20) // len(row))
    z = zlib.compressobj()
    idat = b"".join(z.compress(row * min(rows, height - i)) for i in range(0, height, rows)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def elongated(tmp_path_factory):
    """{name: (path, width, height)}: under the pixel bound, each would take gigabytes to resize."""
    root = tmp_path_factory.mktemp("elongated")
    files = {"wide.png": (100_000, 10), "tall.png": (1, 80_000_000)}
    for name, (width, height) in files.items():
        (root / name).write_bytes(_black_png(width, height))
    return {name: (str(root / name), width, height) for name, (width, height) in files.items()}


def _elongated(width, height):
    return rf"The image is {width}x{height} pixels \(width x height\), more elongated than the 16:1 the evaluation"


def test_an_elongated_image_is_refused_from_its_header(elongated):
    start = time.perf_counter()
    for path, width, height in elongated.values():
        with open(path, "rb") as f:
            encoded = f.read()
        assert len(encoded) < 400_000
        for mode in ("center", "squash"):
            named = _elongated(width, height) + rf".*Received: path={re.escape(repr(path))}$"
            with pytest.raises(ValueError, match=named):
                kc.load_image(path, crop_mode=mode)
            with pytest.raises(ValueError, match=_elongated(width, height) + r".*Received: image bytes$"):
                kc.eval_transform(encoded, crop_mode=mode)
        with Image.open(path) as opened:  # lazily opened: refused before PIL decodes it
            with pytest.raises(ValueError, match=_elongated(width, height) + rf".*size=\({width}, {height}\)$"):
                kc.eval_transform(opened)
    assert time.perf_counter() - start < 2
    # The decoder itself takes them (training's random-resized crop does); the eval transform does not.
    assert decode_image_bytes(elongated["wide.png"][0]).shape == (10, 100_000, 3)
    with pytest.raises(ValueError, match=r"shape=\(10, 100000, 3\)$"):
        kc.eval_transform(np.zeros((10, 100_000, 3), np.uint8))


def test_pil_and_tf_draw_the_line_at_the_same_place():
    import tensorflow as tf

    for height, width in ((4, 64), (64, 4), (3, 48)):  # 16:1 exactly: taken
        image = np.zeros((height, width, 3), np.uint8)
        for crop_pct, mode in ((0.875, "center"), (1.0, "squash")):
            ours = kc.eval_transform(image, image_size=S, crop_pct=crop_pct, crop_mode=mode)
            graph = data.resize_crop(tf.constant(image), S, crop_pct, mode == "squash")
            assert ours.shape == graph.shape == (S, S, 3)
    for height, width in ((4, 65), (65, 4), (1, 17), (0, 5)):  # past 16:1 (or empty): refused by both
        image = np.zeros((height, width, 3), np.uint8)
        for squash in (False, True):
            with pytest.raises(ValueError, match=_elongated(width, height)):
                kc.eval_transform(image, image_size=S, crop_mode="squash" if squash else "center")
            with pytest.raises(tf.errors.InvalidArgumentError, match=_elongated(width, height)):
                data.resize_crop(tf.constant(image), S, 0.875, squash)


def test_the_tf_eval_transform_refuses_them_in_every_graph(elongated):
    import tensorflow as tf

    from keras_convnext.export import tf_eval_transform

    path, width, height = elongated["wide.png"]
    with open(path, "rb") as f:
        encoded = tf.constant(f.read())
    # The bytes signature: one request's error, in a traced graph.
    serving = tf.function(lambda d: tf_eval_transform(d, 224, 0.875))
    with pytest.raises(tf.errors.InvalidArgumentError, match=_elongated(width, height)):
        serving(encoded)
    # The evaluation pipeline: a file is named, a decoded dataset's image described.
    good = os.path.join(os.path.dirname(path), "good.png")
    with open(good, "wb") as f:
        f.write(CASES["rgb.png"][0])
    for name, (path, width, height) in elongated.items():
        ds = data.eval_dataset(([good, path], [0, 1]), 2, image_size=S, crop_pct=1.0, batch_size=2)
        with pytest.raises(tf.errors.OpError, match=_elongated(width, height) + rf".*Received: path='.*{name}'"):
            next(iter(ds))
    decoded = tf.data.Dataset.from_tensors((tf.zeros([10, 100_000, 3], tf.uint8), 0))
    with pytest.raises(tf.errors.InvalidArgumentError, match=_elongated(100_000, 10)):
        next(iter(data.eval_dataset(decoded, 2, image_size=S)))


def test_random_resized_crop_resizes_a_wide_crop_as_it_resizes_a_tall_one():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for shape in ((37, 90, 3), (90, 37, 3)):
        image = tf.constant(rng.integers(0, 256, shape, dtype=np.uint8))
        # Area 1.0 at a ratio the image does not have: no box fits, the whole image is resized.
        crop = data.random_resized_crop(image, S, scale=(1.0, 1.0), ratio=(5.0, 5.0)).numpy()
        whole = tf.image.resize(tf.cast(image, tf.float32), (S, S), method="bicubic", antialias=True)
        np.testing.assert_allclose(crop, tf.clip_by_value(whole, 0.0, 255.0).numpy(), atol=1e-3)


MEMORY_CHECK = r"""
import json, resource, sys, time
import tensorflow as tf
import keras_convnext as kc
from keras_convnext import data

normal, wide, tall = sys.argv[1:]
strips = [tf.zeros(shape, tf.uint8) for shape in ([1, 2_000_000, 3], [2_000_000, 1, 3])]  # 6 MB each
# The same calls on a normal image first: what they initialise once is not counted.
kc.load_image(normal)
next(iter(data.eval_dataset(([normal], [0]), 1)))
data.resize_crop(tf.zeros([30, 40, 3], tf.uint8), 224)
data.random_resized_crop(tf.zeros([30, 40, 3], tf.uint8), 224)
# A regression fails here (MemoryError, ResourceExhausted) rather than swapping the machine.
with open("/proc/self/status") as f:
    vm = int(next(line for line in f if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
refused = []
for path in (wide, tall):
    try:
        kc.load_image(path)
    except ValueError as e:
        refused.append(str(e))
    try:
        next(iter(data.eval_dataset(([path], [0]), 1)))
    except tf.errors.OpError as e:
        refused.append(e.message)
for strip in strips:  # a shorter side resized to 256 px would make 512 M pixels
    try:
        data.resize_crop(strip, 224)
    except tf.errors.InvalidArgumentError as e:
        refused.append(e.message)
# Training takes them: its crop is resized through a (224, shorter side) intermediate.
crops = [list(data.random_resized_crop(strip, 224).shape) for strip in strips]
print(json.dumps({"grown_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                  "seconds": time.perf_counter() - start, "refused": refused, "crops": crops}))
"""


@once  # the child runs TensorFlow whatever this process runs
def test_refusing_them_allocates_nothing_large(elongated, tmp_path):
    normal = tmp_path / "normal.png"
    normal.write_bytes(CASES["rgb.png"][0])
    done = subprocess.run([sys.executable, "-c", MEMORY_CHECK, str(normal), elongated["wide.png"][0],
                           elongated["tall.png"][0]], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shapes = [(100_000, 10), (100_000, 10), (1, 80_000_000), (1, 80_000_000), (2_000_000, 1), (1, 2_000_000)]
    assert len(result["refused"]) == len(shapes)
    for i, (message, (width, height)) in enumerate(zip(result["refused"], shapes)):
        assert re.search(_elongated(width, height), message), message
        assert i >= 4 or re.search(r"Received: path='.*(wide|tall)\.png'", message), message  # files are named
    assert result["crops"] == [[224, 224, 3], [224, 224, 3]]
    # Resizing the first took 2.6 GB (PIL) and 7.8 GB (TF), the others more than int32 counts: now, next to nothing.
    assert result["grown_mb"] < 150, result
    assert result["seconds"] < 20, result


# ---- damaged files -----------------------------------------------------------------------------

def _damaged():
    png, jpeg = CASES["rgb.png"][0], CASES["rgb.jpg"][0]
    crc = bytearray(png)
    crc[png.index(b"IDAT") + 10] ^= 0xFF
    return {"truncated.png": png[:len(png) // 2], "truncated.jpg": jpeg[:len(jpeg) // 2],
            "header_only.jpg": jpeg[:200], "not_an_image.jpg": b"not an image", "empty.png": b"",
            "bad_crc.png": bytes(crc)}


@pytest.mark.parametrize("name", list(_damaged()))
def test_a_damaged_file_is_a_value_error_naming_it(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(_damaged()[name])
    for call in (lambda: decode_image_bytes(str(path)), lambda: kc.load_image(str(path))):
        with pytest.raises(ValueError, match=rf"Cannot read an image from this file \(.+\)\. "
                                             rf"Received: path='{re.escape(str(path))}'$") as e:
            call()
        assert isinstance(e.value, ImageReadError) and e.value.path == str(path) and "\n" not in str(e.value)


def test_a_damaged_file_met_in_training_names_itself(tmp_path):
    # check_images finds it first; a file damaged after that check still names itself.
    import tensorflow as tf

    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    good.write_bytes(CASES["rgb.png"][0])
    bad.write_bytes(_damaged()["truncated.jpg"])
    ds = data.eval_dataset(([str(good), str(bad)], [0, 1]), 2, image_size=S, crop_pct=1.0, batch_size=2)
    with pytest.raises(tf.errors.OpError, match=r"Cannot read an image.*bad\.jpg"):
        next(iter(ds))


# ---- checking a folder before training ---------------------------------------------------------

@pytest.fixture
def folder_with_bad_files(tmp_path):
    damaged = list(_damaged().items())
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / c)
        for i in range(3):
            (tmp_path / c / f"{i}.png").write_bytes(CASES["rgb.png"][0])
    for name, encoded in damaged[:5]:
        (tmp_path / "dog" / f"x_{name}").write_bytes(encoded)
    return tmp_path


def test_check_images_names_the_unreadable_files(folder_with_bad_files):
    paths, labels, classes = data.image_folder(folder_with_bad_files)
    assert len(paths) == 11
    with pytest.raises(ValueError) as e:
        data.check_images(paths, labels, classes, data=str(folder_with_bad_files))
    message = str(e.value)
    assert message.startswith("5 of 11 images cannot be read: ") and "\n" not in message
    named = re.findall(r"'([^']+)' \(", message)
    assert [os.path.basename(p) for p in named] == ["x_empty.png", "x_header_only.jpg", "x_not_an_image.jpg"]
    assert "and 2 more. Remove them, or pass skip_bad_images=True (--skip-bad-images)" in message
    assert message.endswith(f"Received: data={str(folder_with_bad_files)!r}")


def test_check_images_skips_them_with_a_warning(folder_with_bad_files, monkeypatch, capsys):
    paths, labels, classes = data.image_folder(folder_with_bad_files)
    monkeypatch.setattr(data, "PROGRESS_MIN_FILES", 4)
    with pytest.warns(UserWarning, match=r"Skipping 5 of 11 images, which cannot be read: ") as caught:
        kept, kept_labels, skipped = data.check_images(paths, labels, classes, skip_bad_images=True, verbose=2)
    assert all(os.path.basename(p) in str(caught[0].message) for p, _ in skipped)
    assert len(kept) == 6 and kept_labels == [0, 0, 0, 1, 1, 1] and len(skipped) == 5
    assert all(os.path.basename(p).startswith("x_") for p, _ in skipped)
    assert "Reading 11 images once" in capsys.readouterr().out
    # A class left with no readable image is an error, even when skipping.
    only_bad = [p for p in paths if "x_" in p or "cat" in p]
    with pytest.raises(ValueError, match=r"Class folder 'dog' has no readable images"):
        with pytest.warns(UserWarning):
            data.check_images(only_bad, [labels[paths.index(p)] for p in only_bad], classes, skip_bad_images=True)
