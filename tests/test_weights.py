"""Checkpoint loading: parity against every peer format, and every way a file can be wrong."""

import dataclasses
import hashlib
import importlib
import json
import os
import pickle
import re
import warnings
import zipfile

import keras
import numpy as np
import pytest
from peers import (TINY_DEPTHS, TINY_DIMS, hf_model, hf_v2_model, keras_apps_tiny, timm_features, timm_model,
                   timm_to_official, torch_logits)

import keras_convnext as kc
from keras_convnext import checkpoints, names, remap
from keras_convnext import download as download_lib
from keras_convnext import presets as presets_lib
from keras_convnext import weights as weights_lib
from keras_convnext.checkpoints import CheckpointError

torch = pytest.importorskip("torch")
TOL = 1e-4


def logits(model, images):
    return keras.ops.convert_to_numpy(model.predict(images, verbose=0))


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3)).astype("uint8")


@pytest.fixture(scope="module")
def atto(tmp_path_factory):
    """A random timm convnext_atto (1x1-conv MLP) saved as .pth and as .safetensors."""
    from safetensors.torch import save_file

    peer = timm_model("convnext_atto", num_classes=10)
    folder = tmp_path_factory.mktemp("atto")
    torch.save(peer.state_dict(), folder / "atto.pth")
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(folder / "atto.safetensors"))
    torch.save({"model": timm_to_official(peer.state_dict())}, folder / "official.pth")
    return peer, folder


@pytest.mark.parametrize("file", ["atto.pth", "atto.safetensors", "official.pth"])
def test_atto_parity(atto, file, pixels):
    peer, folder = atto
    model = kc.ConvNeXtAtto(weights=str(folder / file), classes=10, input_shape=(64, 64, 3),
                            classifier_activation=None)
    diff = np.abs(logits(model, pixels) - torch_logits(peer, pixels)).max()
    assert diff <= TOL, diff


def test_tiny_parity_timm_and_official(tmp_path, pixels):
    peer = timm_model("convnext_tiny", num_classes=1000)
    torch.save(peer.state_dict(), tmp_path / "tiny.pth")
    torch.save({"model": timm_to_official(peer.state_dict())}, tmp_path / "official_tiny.pth")
    expected = torch_logits(peer, pixels)
    for name in ("tiny.pth", "official_tiny.pth"):
        model = kc.ConvNeXtTiny(weights=str(tmp_path / name), input_shape=(64, 64, 3), classifier_activation=None)
        diff = np.abs(logits(model, pixels) - expected).max()
        assert diff <= TOL, (name, diff)


@pytest.mark.parametrize("saver", ["save_pretrained", "pytorch_model.bin"])
def test_hugging_face_parity(tmp_path, saver, pixels):
    peer = hf_model(num_labels=10)
    if saver == "save_pretrained":
        peer.save_pretrained(tmp_path)  # model.safetensors + config.json (layer_norm_eps 1e-12)
        path = tmp_path / "model.safetensors"
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(peer.state_dict(), path)
    model = kc.ConvNeXt(TINY_DEPTHS, TINY_DIMS, weights=str(path), classes=10, input_shape=(64, 64, 3),
                        classifier_activation=None)
    assert model.get_layer("norm").epsilon == 1e-12
    diff = np.abs(logits(model, pixels) - torch_logits(peer, pixels)).max()
    assert diff <= TOL, diff


def test_a_converted_hugging_face_checkpoint_keeps_its_norm_epsilon(tmp_path):
    peer = hf_model(num_labels=10)
    peer.save_pretrained(tmp_path)
    path = kc.convert(str(tmp_path / "model.safetensors"), str(tmp_path / "hf.keras"))
    assert weights_lib.load_keras_model(path).get_layer("norm").epsilon == 1e-12


def test_hugging_face_backbone_without_prefix_loads_without_top(tmp_path, pixels):
    peer = hf_model(num_labels=10)
    backbone = {k[len("convnext."):]: v for k, v in peer.state_dict().items() if k.startswith("convnext.")}
    torch.save(backbone, tmp_path / "backbone.bin")
    model = kc.ConvNeXt(TINY_DEPTHS, TINY_DIMS, weights=str(tmp_path / "backbone.bin"), include_top=False,
                        pooling="avg", input_shape=(64, 64, 3))
    with torch.no_grad():
        x = (pixels / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        expected = peer.convnext(torch.from_numpy(x.transpose(0, 3, 1, 2).astype("float32"))).pooler_output
    np.testing.assert_allclose(logits(model, pixels), expected.numpy(), atol=TOL)


def test_keras_applications_h5_parity(tmp_path, pixels):
    path = str(tmp_path / "convnext_tiny.h5")
    peer = keras_apps_tiny(path)
    model = kc.ConvNeXtTiny(weights=path, input_shape=(64, 64, 3), classifier_activation=None)
    diff = np.abs(logits(model, pixels) - logits(peer, pixels)).max()
    assert diff <= TOL, diff


def test_our_keras_and_weights_files_round_trip(atto, tmp_path, pixels):
    peer, folder = atto
    reference = kc.ConvNeXtAtto(weights=str(folder / "atto.pth"), classes=10, input_shape=(64, 64, 3))
    expected = logits(reference, pixels)
    keras_path = kc.convert(str(folder / "atto.pth"), str(tmp_path / "atto.keras"))
    from_keras = kc.ConvNeXtAtto(weights=keras_path, classes=10, input_shape=(64, 64, 3))
    np.testing.assert_array_equal(logits(from_keras, pixels), expected)
    reference.save_weights(str(tmp_path / "atto.weights.h5"))
    from_h5 = kc.ConvNeXtAtto(weights=str(tmp_path / "atto.weights.h5"), classes=10, input_shape=(64, 64, 3))
    np.testing.assert_array_equal(logits(from_h5, pixels), expected)
    with pytest.raises(CheckpointError, match=r"atto.weights.h5: this .weights.h5 does not fit the model"):
        kc.ConvNeXtAtto(weights=str(tmp_path / "atto.weights.h5"), classes=5)


def test_other_class_count_keeps_the_backbone_and_starts_a_fresh_head(atto, pixels):
    _, folder = atto
    full = kc.ConvNeXtAtto(weights=str(folder / "atto.pth"), classes=10, include_top=False, pooling="avg",
                           input_shape=(64, 64, 3))
    with pytest.warns(UserWarning, match=r"head has 10 classes and the model 3.*fresh head"):
        model = kc.ConvNeXtAtto(weights=str(folder / "atto.pth"), classes=3, head_init_scale=0.001,
                                input_shape=(64, 64, 3))
    backbone = keras.Model(model.input, model.get_layer("norm").output)
    # (1e-5: `full` computes each block's tail in one op on PyTorch, `backbone` step by step.)
    np.testing.assert_allclose(logits(backbone, pixels), logits(full, pixels), atol=1e-5)
    head = keras.ops.convert_to_numpy(model.get_layer("head").kernel)
    assert head.shape == (320, 3) and np.abs(head).max() < 0.001  # fresh, scaled by head_init_scale
    notop = kc.ConvNeXtAtto(weights=str(folder / "atto.pth"), include_top=False, input_shape=(64, 64, 3))
    assert notop.layers[-1].name == "stages_3"


def test_convert_reads_the_architecture_and_refuses_to_overwrite(atto, tmp_path):
    _, folder = atto
    dst = tmp_path / "out.weights.h5"
    kc.convert(str(folder / "official.pth"), str(dst))
    assert dst.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]
    with pytest.raises(ValueError, match=r"overwrite.*Received: dst="):
        kc.convert(str(folder / "official.pth"), str(dst))
    with pytest.raises(ValueError, match=r"must end in '.keras' or '.weights.h5'. Received: dst="):
        kc.convert(str(folder / "official.pth"), str(tmp_path / "out.h5"))
    with pytest.raises(CheckpointError, match=r"depths \(2, 2, 6, 2\).*not ConvNeXt-Tiny \(variant 'tiny'\)"):
        kc.convert(str(folder / "official.pth"), str(tmp_path / "x.keras"), variant="tiny")


# --- files that are wrong ----------------------------------------------------------------------

def test_corrupt_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match=r"broken.pth: not a checkpoint format"):
        kc.ConvNeXtAtto(weights=str(bad))
    truncated = tmp_path / "truncated.pth"
    good = tmp_path / "good.pth"
    torch.save({"a": torch.zeros(3)}, good)
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"truncated.pth"):
        kc.ConvNeXtAtto(weights=str(truncated))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"stem.0.weight": _RunsCode(str(marker))}))
    with pytest.raises(CheckpointError, match=r"evil.pth: refusing to load '\w+\.system'.*without running code"):
        kc.ConvNeXtAtto(weights=str(path))
    assert not marker.exists()


def test_checkpoint_of_another_variant(atto):
    _, folder = atto
    with pytest.raises(CheckpointError, match=r"atto.pth: the checkpoint holds a ConvNeXt with depths \(2, 2, 6, 2\) "
                                              r"and dims \(40, 80, 160, 320\).*ConvNeXtAtto"):
        kc.ConvNeXtFemto(weights=str(folder / "atto.pth"), classes=10)


def test_missing_and_extra_keys(atto, tmp_path):
    peer, _ = atto
    state = peer.state_dict()
    missing = {k: v for k, v in state.items() if k != "stages.2.blocks.3.mlp.fc1.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.pth: missing tensor 'stages_2_3_pwconv1.bias'"):
        kc.ConvNeXtAtto(weights=str(tmp_path / "missing.pth"), classes=10)
    extra = dict(state, **{"stages.1.blocks.0.extra.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra.pth: unexpected tensor 'stages_1_0_extra'"):
        kc.ConvNeXtAtto(weights=str(tmp_path / "extra.pth"), classes=10)
    wrong = dict(state, **{"stages.0.blocks.1.norm.weight": torch.zeros(41)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"wrong.pth: tensor 'stages_0_1_norm.weight' has shape \(41,\), "
                                              r"the ConvNeXt of depths \(2, 2, 6, 2\) and dims \(40, 80, 160, 320\) "
                                              r"it holds expects \(40,\)"):
        kc.ConvNeXtAtto(weights=str(tmp_path / "wrong.pth"), classes=10)


def test_bfloat16_and_half_checkpoints_read_without_torch_loader(atto, tmp_path, pixels):
    peer, _ = atto
    torch.save({k: v.to(torch.bfloat16) for k, v in peer.state_dict().items()}, tmp_path / "bf16.pth")
    model = kc.ConvNeXtAtto(weights=str(tmp_path / "bf16.pth"), classes=10, input_shape=(64, 64, 3))
    expected = peer.state_dict()["stem.0.weight"].to(torch.bfloat16).float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("stages_0").downsample.conv.kernel),
                                  expected)


NO_TORCH_LOAD = r"""
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, NoTorch())
from keras_convnext.weights import read_weights
layers, info = read_weights(sys.argv[1])
print(info["format"], info["layout"], len(layers), "torch" in sys.modules)
"""


def test_pth_files_read_without_torch(atto):
    import subprocess
    import sys

    _, folder = atto
    done = subprocess.run([sys.executable, "-c", NO_TORCH_LOAD, str(folder / "atto.pth")], capture_output=True,
                          text=True, env=dict(os.environ, KERAS_BACKEND="jax"))
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.split() == ["torch_zip", "timm", "70", "False"]


LOAD_ALONE = r"""
import sys
from keras_convnext.weights import load_keras_model, read_weights
model = load_keras_model(sys.argv[1])
print(type(model).__name__, len(read_weights(sys.argv[1])[0]))
"""


def test_a_keras_file_loads_through_weights_alone(tmp_path):
    # Keras finds ConvNeXtModel only in its registry: the loader fills it, whatever the process imported before.
    import subprocess
    import sys

    from conftest import TINY

    kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, classes=5).save(tmp_path / "tiny.keras")
    done = subprocess.run([sys.executable, "-c", LOAD_ALONE, str(tmp_path / "tiny.keras")], capture_output=True,
                          text=True, env=dict(os.environ, KERAS_BACKEND="jax"))
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.split() == ["ConvNeXtModel", "35"]


# --- review findings: each of these got through (or crashed) before its fix ---------------------


def test_two_wrapped_keys_for_one_tensor_are_refused_by_name():
    # (Each converter's own collisions: tests/test_remap.py.)
    state = {"module.head.weight": np.ones((2, 4), "f4"), "head.weight": np.ones((2, 4), "f4")}
    with pytest.raises(CheckpointError, match=r"^x.pth: tensors 'module.head.weight' and 'head.weight' both become "
                                              r"'head.weight'"):
        checkpoints.state_dict_of(state, "x.pth")


def test_a_duplicated_tensor_in_a_file_is_refused(atto, tmp_path):
    peer, _ = atto
    state = dict(peer.state_dict(), **{"stages.0.0.dwconv.weight": torch.zeros(40, 1, 7, 7)})
    torch.save(state, tmp_path / "twice.pth")
    with pytest.raises(CheckpointError, match=r"twice.pth: tensors 'stages.0.blocks.0.conv_dw.weight' and "
                                              r"'stages.0.0.dwconv.weight' both become 'stages.0.0.dwconv.weight'"):
        kc.ConvNeXtAtto(weights=str(tmp_path / "twice.pth"), classes=10)


@pytest.mark.parametrize("key, shape, message", [
    ("downsample_layers.0.0.weight", (), r"tensor 'downsample_layers.0.0.weight' has shape \(\); "
                                         r"'downsample_layers_0_0.weight' holds a 4-D tensor"),
    ("head.weight", (), r"tensor 'head.weight' has shape \(\); 'head.weight' holds a 2-D tensor"),
    ("stages.0.0.gamma", (2, 2), r"tensor 'stages.0.0.gamma' has shape \(2, 2\); "
                                 r"'stages_0_0_gamma.gamma' holds a 1-D tensor"),
    ("stages.0.0.pwconv1.weight", (8, 4, 0, 0), r"tensor 'stages.0.0.pwconv1.weight' has shape \(8, 4, 0, 0\); "
                                                r"'stages_0_0_pwconv1.weight' holds a 2-D tensor"),
])
def test_a_tensor_of_the_wrong_rank_is_refused_by_name(tmp_path, key, shape, message):
    state = {"downsample_layers.0.0.weight": torch.ones(8, 3, 4, 4), key: torch.ones(shape)}
    torch.save(state, tmp_path / "rank.pth")
    with pytest.raises(CheckpointError, match=rf"rank.pth: {message}"):
        layers, _ = weights_lib.read_weights(tmp_path / "rank.pth")
        weights_lib.architecture_of(layers)


def hostile_keras(tmp_path, config=None, link=False):
    """A tiny .keras file, with its config.json replaced or an external link added to its weights."""
    import h5py

    good = tmp_path / "good.keras"
    if not good.exists():
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")]).save(good)
        with zipfile.ZipFile(good) as z, open(tmp_path / "good.weights.h5", "wb") as f:
            f.write(z.read("model.weights.h5"))
        with h5py.File(tmp_path / "secret.h5", "w") as f:
            f["data"] = np.frombuffer(b"SECRET-PASSWORD!", "f4")
    weights_h5 = tmp_path / "good.weights.h5"
    if link:
        weights_h5 = tmp_path / "linked.weights.h5"
        weights_h5.write_bytes((tmp_path / "good.weights.h5").read_bytes())
        with h5py.File(weights_h5, "a") as f:
            f["leak"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/data")
    path = tmp_path / ("linked.keras" if link else "config.keras")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as z:
        for info in src.infolist():
            if info.filename == "config.json" and config is not None:
                z.writestr(info, config)
            elif info.filename == "model.weights.h5":
                z.write(weights_h5, "model.weights.h5")
            else:
                z.writestr(info, src.read(info))
    return path


@pytest.mark.parametrize("config", ['{"class_name": 5}', "[]", '{"module": "os", "class_name": "system"}', "{"])
def test_a_keras_file_that_keras_cannot_load_is_a_checkpoint_error(tmp_path, config):
    path = hostile_keras(tmp_path, config=config)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot read the Keras model \(\w+"):
        weights_lib.read_weights(path)
    with pytest.raises(CheckpointError, match=r"cannot read the Keras model"):
        weights_lib.load_keras_model(path)


def test_export_reads_a_keras_file_through_the_same_checks(tmp_path):
    export = importlib.import_module("keras_convnext.export")  # `keras_convnext.export` is also a function

    path = hostile_keras(tmp_path, link=True)
    for load in (weights_lib.load_keras_model, lambda p: export._load_model(p)[0]):
        with pytest.raises(CheckpointError, match=r"linked.keras \(model.weights.h5\): '/leak' is a ExternalLink") as e:
            load(path)
        assert "SECRET" not in str(e.value)
    with pytest.raises(ValueError, match=r"Received: model="):
        export._load_model(path)
    assert isinstance(export._load_model(tmp_path / "good.keras")[0], keras.Model)
    (tmp_path / "w.h5").write_bytes((tmp_path / "good.weights.h5").read_bytes())
    with pytest.raises(CheckpointError, match=r"w.h5: a keras_weights_h5 file, not a .keras model"):
        weights_lib.load_keras_model(tmp_path / "w.h5")


def official_state(depths, dims, classes=None, dwconv_only=()):
    """A complete official-layout state dict of zeros-and-ones, as NumPy arrays (no file)."""
    state = {"downsample_layers.0.0.weight": np.ones((dims[0], 3, 4, 4), "f4"),
             "downsample_layers.0.0.bias": np.ones(dims[0], "f4")}
    state.update({f"downsample_layers.0.1.{p}": np.ones(dims[0], "f4") for p in ("weight", "bias")})
    for s, (depth, dim) in enumerate(zip(depths, dims)):
        if s:
            state.update({f"downsample_layers.{s}.0.{p}": np.ones(dims[s - 1], "f4") for p in ("weight", "bias")})
            state[f"downsample_layers.{s}.1.weight"] = np.ones((dim, dims[s - 1], 2, 2), "f4")
            state[f"downsample_layers.{s}.1.bias"] = np.ones(dim, "f4")
        for b in range(depth):
            k = f"stages.{s}.{b}"
            state.update({f"{k}.dwconv.weight": np.ones((dim, 1, 7, 7), "f4"), f"{k}.dwconv.bias": np.ones(dim, "f4")})
            if (s, b) in dwconv_only:
                continue
            state.update({f"{k}.norm.weight": np.ones(dim, "f4"), f"{k}.norm.bias": np.ones(dim, "f4"),
                          f"{k}.pwconv1.weight": np.ones((4 * dim, dim), "f4"),
                          f"{k}.pwconv1.bias": np.ones(4 * dim, "f4"),
                          f"{k}.pwconv2.weight": np.ones((dim, 4 * dim), "f4"), f"{k}.pwconv2.bias": np.ones(dim, "f4"),
                          f"{k}.gamma": np.ones(dim, "f4")})
    if classes:
        state.update({"norm.weight": np.ones(dims[3], "f4"), "norm.bias": np.ones(dims[3], "f4"),
                      "head.weight": np.ones((classes, dims[3]), "f4"), "head.bias": np.ones(classes, "f4")})
    return state


def save_safetensors(state, path):
    from safetensors.numpy import save_file

    save_file(state, str(path))
    return path


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("include_top, pooling", [(True, None), (False, "avg"), (False, None)])
def test_the_shapes_a_checkpoint_is_checked_against_are_the_models(include_top, pooling, version):
    build = kc.ConvNeXtV2 if version == 2 else kc.ConvNeXt
    model = build(TINY_DEPTHS, TINY_DIMS, weights=None, include_top=include_top, pooling=pooling, classes=7)
    built = {(layer, param): tuple(v.shape) for layer, vs in names.variables_by_module(model).items()
             for param, v in vs.items()}
    classes = 7 if include_top else None
    assert remap.expected_shapes(TINY_DEPTHS, TINY_DIMS, classes, with_norm=pooling == "avg", version=version) == built


def test_a_complete_checkpoint_of_numpy_arrays_reads(tmp_path):
    path = save_safetensors(official_state(TINY_DEPTHS, TINY_DIMS, classes=5), tmp_path / "ok.safetensors")
    layers, _ = weights_lib.read_weights(path)
    assert weights_lib.architecture_of(layers) == (TINY_DEPTHS, TINY_DIMS, 5)


@pytest.mark.parametrize("case, message", [
    # zero-size tensors: no data, any dims (a model of 10**6 channels from a file of a few kB)
    ("empty", r"tensor 'downsample_layers_0_0.weight' has shape \(4, 4, 0, 1000000\), the ConvNeXt of depths "
              r"\(1, 1, 2, 1\) and dims \(1000000, 16, 24, 32\) it holds expects \(4, 4, 3, 1000000\)"),
    ("far_block", r"missing tensor 'stages_2_2_dwconv.weight' \(stage 2 has block 99999\)"),
    ("dwconv_only", r"missing tensor 'stages_3_0_norm.weight' \(shape \(32,\) in the ConvNeXt of depths "
                    r"\(1, 1, 2, 1\)"),
])
def test_a_checkpoint_is_checked_whole_before_a_model_is_built_from_it(tmp_path, case, message):
    state = official_state(TINY_DEPTHS, TINY_DIMS, classes=5, dwconv_only=[(3, 0)] if case == "dwconv_only" else ())
    if case == "empty":
        state["downsample_layers.0.0.weight"] = np.ones((10**6, 0, 4, 4), "f4")
    if case == "far_block":
        state["stages.2.99999.dwconv.weight"] = np.ones((24, 1, 7, 7), "f4")
    path = save_safetensors(state, tmp_path / f"{case}.safetensors")
    for function in (weights_lib.read_weights, lambda p: kc.convert(p, tmp_path / "out.keras")):
        with pytest.raises(CheckpointError, match=rf"{case}.safetensors: {message}"):
            function(str(path))
    assert not (tmp_path / "out.keras").exists()


def test_a_keras_weights_file_with_nan_is_refused(tmp_path):
    # model.load_weights takes whatever numbers the file holds: the loader checks them, as for every format.
    import h5py

    from conftest import TINY

    model = kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=None, input_shape=(32, 32, 3), classes=5)
    model.save_weights(tmp_path / "good.weights.h5")
    with h5py.File(tmp_path / "good.weights.h5", "a") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim else None)
        data = f[names[0]][...]
        data.flat[0] = np.nan
        f[names[0]][...] = data
    with pytest.raises(kc.CheckpointError, match=r"good\.weights\.h5: .* holds NaN or infinite values"):
        kc.ConvNeXt(TINY["depths"], TINY["dims"], weights=str(tmp_path / "good.weights.h5"),
                    input_shape=(32, 32, 3), classes=5)


def test_a_pipe_or_a_device_is_not_read(tmp_path):
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    with pytest.raises(kc.CheckpointError, match=r"not a regular file \(a device or a pipe\)"):
        kc.weights.read_weights(str(fifo))
    with pytest.raises(kc.CheckpointError, match=r"not a regular file"):
        kc.weights.read_weights("/dev/zero")
    image = tmp_path / "image.png"
    os.mkfifo(image)
    with pytest.raises(ValueError, match=r"not a regular file.*Received: path="):
        kc.decode_image_bytes(str(image))  # would block on the pipe for ever


# --- a pretrained stem for other channel counts -----------------------------------------------

def _adapted(folder, channels, **kwargs):
    with pytest.warns(UserWarning, match=rf"atto.pth: adapted the checkpoint's 3-channel stem to the model's "
                                         rf"{channels} input channels \(timm's rule"):
        return kc.ConvNeXtAtto(weights=str(folder / "atto.pth"), classes=10, input_shape=(64, 64, channels),
                               include_preprocessing=False, classifier_activation=None, **kwargs)


@pytest.mark.parametrize("channels", [1, 4])
def test_a_pretrained_stem_is_adapted_as_timm_adapts_it(atto, channels):
    import timm
    from timm.models import adapt_input_conv

    peer, folder = atto
    model = _adapted(folder, channels)
    expected = adapt_input_conv(channels, peer.state_dict()["stem.0.weight"]).numpy().transpose(2, 3, 1, 0)
    kernel = keras.ops.convert_to_numpy(model.get_layer("stages_0").downsample.conv.kernel)
    assert kernel.shape == (4, 4, channels, 40)
    np.testing.assert_allclose(kernel, expected, rtol=1e-6, atol=1e-7)
    # timm's own N-channel model, pretrained from the same file, gives the same logits (its config told the
    # file's class count: timm drops a head of another count).
    theirs = timm.create_model("convnext_atto", pretrained=True, in_chans=channels, num_classes=10,
                               pretrained_cfg_overlay={"file": str(folder / "atto.pth"), "num_classes": 10}).eval()
    np.testing.assert_array_equal(theirs.head.fc.weight.detach().numpy(), peer.head.fc.weight.detach().numpy())
    x = np.random.default_rng(2).normal(size=(2, 64, 64, channels)).astype("float32")
    with torch.no_grad():
        expected_logits = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    diff = np.abs(logits(model, x) - expected_logits).max()
    assert diff <= TOL, diff


def test_a_grey_image_gives_the_rgb_models_logits_on_it_replicated(atto):
    # The sum rule: a 1-channel stem summed over R, G, B sees a grey image as the RGB model sees it in colour.
    # (On normalised inputs: with include_preprocessing=True each RGB channel has its own mean and std.)
    _, folder = atto
    grey_model = _adapted(folder, 1)
    rgb_model = kc.ConvNeXtAtto(weights=str(folder / "atto.pth"), classes=10, input_shape=(64, 64, 3),
                                include_preprocessing=False, classifier_activation=None)
    grey = np.random.default_rng(3).normal(size=(2, 64, 64, 1)).astype("float32")
    expected = logits(rgb_model, np.repeat(grey, 3, axis=-1))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(logits(grey_model, grey), expected, atol=TOL)


# --- the converted-preset cache ---------------------------------------------------------------

def _previous_structure_keras(path):
    """A .keras file as the model structure before the stage layers saved it: a ConvNeXtModel whose
    config is its functional graph (flat layers named `stages_0_0_pwconv1` and so on), not its arguments."""
    inputs = keras.Input((32, 32, 3), name="images")
    x = keras.layers.Conv2D(8, 4, strides=4, name="downsample_layers_0_0")(inputs)
    x = keras.layers.Dense(32, name="stages_0_0_pwconv1")(x)
    keras.Model(inputs, x).save(path)
    with zipfile.ZipFile(path) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    config = json.loads(members["config.json"])
    assert {"layers", "input_layers", "output_layers"} <= set(config["config"])
    config.update(module="keras_convnext.model", class_name="ConvNeXtModel",
                  registered_name="keras_convnext>ConvNeXtModel")
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_cached_preset_of_the_previous_model_structure_is_rebuilt(atto, tmp_path, monkeypatch, pixels):
    peer, folder = atto
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    data = (folder / "atto.pth").read_bytes()
    # The source is already in the downloads folder, verified by its hash: nothing is fetched.
    preset = dataclasses.replace(presets_lib.PRESETS["convnext_atto.d2_in1k"], classes=10,
                                 url="https://example.invalid/convnext_atto_old_cache.pth",
                                 sha256=hashlib.sha256(data).hexdigest(), sha256_prefix=None)
    monkeypatch.setitem(presets_lib.PRESETS, preset.name, preset)
    os.makedirs(download_lib.downloads_dir())
    with open(os.path.join(download_lib.downloads_dir(), "convnext_atto_old_cache.pth"), "wb") as f:
        f.write(data)
    final = download_lib.preset_cache_path(preset)
    _previous_structure_keras(final)
    # A complete .keras file, which this version's model no longer loads.
    assert download_lib.checkpoint_problem(final, "keras") is None
    with pytest.raises(CheckpointError, match=r"cannot read the Keras model"):
        weights_lib.read_weights(final)
    assert weights_lib.stale_cache_problem(final) == (
        "its config lacks ['depths', 'dims'], holds ['input_layers', 'layers', 'output_layers'], which the model "
        "does not take")

    def no_public_convert(*args, **kwargs):
        raise AssertionError("fetch_preset called the public convert")

    monkeypatch.setattr(weights_lib, "convert", no_public_convert)
    with pytest.warns(UserWarning, match=rf"the converted preset convnext_atto\.d2_in1k at {re.escape(final)} was "
                                         r"written by an earlier keras_convnext \(its config lacks \['depths', 'dims'\]"
                                         r".*\): removed it and converting the preset again"):
        model = kc.ConvNeXtAtto(weights=preset.name, classes=10, input_shape=(64, 64, 3), classifier_activation=None)
    diff = np.abs(logits(model, pixels) - torch_logits(peer, pixels)).max()
    assert diff <= TOL, diff
    assert weights_lib.stale_cache_problem(final) is None
    cache = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs
                   if not f.endswith(".lock"))
    assert cache == ["keras_convnext/convnext_atto.d2_in1k.keras"]  # the source removed, nothing kept aside
    # The rebuilt file is this version's: the next call takes it as it is, without a word.
    mtime = os.stat(final).st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert weights_lib.fetch_preset(preset, progress=False) == final
    assert os.stat(final).st_mtime_ns == mtime
    rebuilt = weights_lib.load_keras_model(final)
    assert rebuilt.input_shape == (None, 224, 224, 3) and rebuilt.mean == list(preset.mean)


@pytest.mark.parametrize("config, problem", [
    ('{"class_name": "Functional", "registered_name": "Functional", "config": {}}',
     "its config.json is not a keras_convnext ConvNeXtModel's (registered name 'Functional')"),
    ('{"registered_name": "keras_convnext>ConvNeXtModel", "config": {"depths": [1, 1, 1, 1], "dims": [8, 8, 8, 8], '
     '"trainable": true, "dtype": "float32", "stem_width": 3}}', "holds ['stem_width'], which the model does not take"),
    ('{"registered_name": "keras_convnext>ConvNeXtModel", "config": {"depths": [1, 1, 1, 1], "dims": [8, 8, 8, 8], '
     '"name": "x", "trainable": true, "include_top": false}}', None),
    ("[", "its config.json does not read"),
])
def test_the_cache_check_reads_the_config_alone(tmp_path, config, problem):
    path = hostile_keras(tmp_path, config=config)
    found = weights_lib.stale_cache_problem(path)
    assert found is None if problem is None else problem in found, found


def test_the_old_names_stay_importable_from_weights():
    from keras_convnext.weights import (  # noqa: F401
        CheckpointError, DownloadError, adapt_stem, architecture_of, assign, cache_dir, convert, detect_layout,
        download, fetch_preset, keras_apps_to_keras, load_keras_model, load_weights, official_to_keras,
        preset_cache_path, read_weights, stem_channels, to_official,
    )

    assert official_to_keras is remap.official_to_flat and keras_apps_to_keras is remap.keras_apps_to_flat
    assert DownloadError is kc.DownloadError and convert is kc.convert and fetch_preset is kc.fetch_preset


# --- ConvNeXt V2: timm, official and Hugging Face files, FCMAE encoders -----------------------

V2_ATTO = r"depths \(2, 2, 6, 2\) and dims \(40, 80, 160, 320\)"


@pytest.fixture(scope="module")
def atto_v2(tmp_path_factory):
    """A random timm convnextv2_atto (1x1-conv MLP, channels-first GRN; GRN weight and bias around 0.5) as .pth,
    .safetensors, an official-layout {"model": ...} .pt, and its encoder alone (no head, no final norm)."""
    from safetensors.torch import save_file

    peer = timm_model("convnextv2_atto", num_classes=10)
    state = peer.state_dict()
    assert min(float(v.abs().min()) for k, v in state.items() if ".grn." in k) > 0.1  # a GRN that acts
    folder = tmp_path_factory.mktemp("atto_v2")
    torch.save(state, folder / "atto.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "atto.safetensors"))
    official = timm_to_official(state)
    assert official["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160)
    torch.save({"model": official}, folder / "official.pt")
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("head.")},
              str(folder / "encoder.safetensors"))
    torch.save({"model": {k: v for k, v in official.items() if not k.startswith(("head.", "norm."))}},
               folder / "encoder.pt")
    return peer, folder


@pytest.mark.parametrize("file", ["atto.pth", "atto.safetensors", "official.pt"])
def test_v2_atto_parity(atto_v2, file, pixels):
    peer, folder = atto_v2
    model = kc.ConvNeXtV2Atto(weights=str(folder / file), classes=10, input_shape=(64, 64, 3),
                              classifier_activation=None)
    diff = np.abs(logits(model, pixels) - torch_logits(peer, pixels)).max()
    assert diff <= TOL, diff


def test_v2_tiny_parity_timm_and_official(tmp_path, pixels):
    peer = timm_model("convnextv2_tiny", num_classes=1000)  # Linear MLP, channels-last GRN
    torch.save(peer.state_dict(), tmp_path / "tiny.pth")
    torch.save({"model": timm_to_official(peer.state_dict())}, tmp_path / "official_tiny.pt")
    expected = torch_logits(peer, pixels)
    for name in ("tiny.pth", "official_tiny.pt"):
        model = kc.ConvNeXtV2Tiny(weights=str(tmp_path / name), input_shape=(64, 64, 3), classifier_activation=None)
        diff = np.abs(logits(model, pixels) - expected).max()
        assert diff <= TOL, (name, diff)


def test_v2_hugging_face_parity(tmp_path, pixels):
    peer = hf_v2_model(num_labels=10)
    peer.save_pretrained(tmp_path)  # model.safetensors (convnextv2.* keys, GRN (1, 1, 1, C)) + config.json
    model = kc.ConvNeXtV2(TINY_DEPTHS, TINY_DIMS, weights=str(tmp_path / "model.safetensors"), classes=10,
                          input_shape=(64, 64, 3), classifier_activation=None)
    assert model.get_layer("norm").epsilon == 1e-12
    diff = np.abs(logits(model, pixels) - torch_logits(peer, pixels)).max()
    assert diff <= TOL, diff


@pytest.mark.parametrize("file", ["encoder.safetensors", "encoder.pt"])
def test_an_fcmae_style_encoder_loads_without_top_and_fine_tunes_with_a_fresh_norm_and_head(atto_v2, file, pixels):
    peer, folder = atto_v2
    path = str(folder / file)
    layers, info = weights_lib.read_weights(path)
    assert weights_lib.architecture_of(layers) == ((2, 2, 6, 2), (40, 80, 160, 320), None)
    assert info["version"] == 2 and "norm" not in layers and "head" not in layers
    encoder = kc.ConvNeXtV2Atto(weights=path, include_top=False, pooling=None, input_shape=(64, 64, 3))
    expected = timm_features(peer, pixels)  # (2, 2, 2, 320): the last stage's map, before any norm
    diff = np.abs(logits(encoder, pixels) - expected).max()
    assert diff <= TOL * max(1.0, np.abs(expected).max()), diff  # (features of size ~50: relative)
    with pytest.warns(UserWarning, match=rf"{file}: the checkpoint holds no final norm or head \(an encoder, as "
                                         r"FCMAE's\): loaded the backbone and started a fresh final norm and head"):
        model = kc.ConvNeXtV2Atto(weights=path, classes=3, input_shape=(64, 64, 3))
    features = keras.Model(model.input, model.get_layer("stages_3").output)
    np.testing.assert_allclose(logits(features, pixels), logits(encoder, pixels), atol=1e-5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("norm").gamma), np.ones(320))


def test_a_converted_v2_checkpoint_is_a_v2_model(atto_v2, tmp_path, pixels):
    peer, folder = atto_v2
    path = kc.convert(str(folder / "official.pt"), str(tmp_path / "v2.keras"), variant="convnextv2_atto")
    model = weights_lib.load_keras_model(path)
    assert model.version == 2 and model.variant == "convnextv2_atto" and model.layer_scale_init_value is None
    model = kc.ConvNeXtV2Atto(weights=path, classes=10, input_shape=(64, 64, 3), classifier_activation=None)
    diff = np.abs(logits(model, pixels) - torch_logits(peer, pixels)).max()
    assert diff <= TOL, diff
    with pytest.raises(CheckpointError, match=rf"official.pt: the checkpoint holds a ConvNeXt V2 of {V2_ATTO}, not "
                                              r"ConvNeXt-Atto \(variant 'atto'\)"):
        kc.convert(str(folder / "official.pt"), str(tmp_path / "v1.keras"), variant="atto")


def test_a_checkpoint_of_the_other_family_is_one_line_naming_the_builder(atto, atto_v2):
    with pytest.raises(CheckpointError, match=r"^\S*atto.pth: the checkpoint holds ConvNeXt weights \(layer scales, no "
                                              r"GRN\), the model is a ConvNeXt V2: build it with ConvNeXtAtto.$"):
        kc.ConvNeXtV2Atto(weights=str(atto[1] / "atto.pth"), classes=10)
    with pytest.raises(CheckpointError, match=r"^\S*atto.safetensors: the checkpoint holds ConvNeXt V2 weights \(GRN "
                                              r"in every block\), the model is a ConvNeXt: build it with "
                                              r"ConvNeXtV2Atto.$"):
        kc.ConvNeXtAtto(weights=str(atto_v2[1] / "atto.safetensors"), classes=10)


@pytest.mark.parametrize("case, message", [
    ("missing_grn", rf"missing tensor 'stages_1_0_grn.beta' \(shape \(320,\) in the ConvNeXt V2 of {V2_ATTO} it "
                    r"holds\)."),
    ("grn_of_another_size", rf"tensor 'stages_2_3_grn.gamma' has shape \(641,\), the ConvNeXt V2 of {V2_ATTO} it "
                            r"holds expects \(640,\)."),
    ("grn_of_another_rank", r"tensor 'stages.0.blocks.1.mlp.grn.weight' has shape \(1, 160\); "
                            r"'stages_0_1_grn.gamma' holds a 1-D tensor \(or \(1, 1, 1, C\)\)."),
    ("extra", r"unexpected tensor 'stages.1.blocks.0.mlp.grn.scale' \(320,\) in the checkpoint."),
    ("layer_scale_too", r"holds both ConvNeXt layer scales \('stages_0_0_gamma.gamma'\) and ConvNeXt V2 GRN tensors "
                        r"\('stages_0_0_grn.gamma'\): a checkpoint is of one family."),
])
def test_v2_bookkeeping_names_the_tensor(atto_v2, tmp_path, case, message):
    state = dict(atto_v2[0].state_dict())
    if case == "missing_grn":
        del state["stages.1.blocks.0.mlp.grn.bias"]
    elif case == "grn_of_another_size":
        state["stages.2.blocks.3.mlp.grn.weight"] = torch.ones(641)
    elif case == "grn_of_another_rank":
        state["stages.0.blocks.1.mlp.grn.weight"] = torch.ones(1, 160)
    elif case == "extra":
        state["stages.1.blocks.0.mlp.grn.scale"] = torch.ones(320)
    else:
        state["stages.0.blocks.0.gamma"] = torch.ones(40)
    torch.save(state, tmp_path / f"{case}.pth")
    with pytest.raises(CheckpointError, match=rf"^\S*{case}.pth: {message}$"):
        kc.ConvNeXtV2Atto(weights=str(tmp_path / f"{case}.pth"), classes=10)
