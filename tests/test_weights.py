"""Checkpoint loading: parity against every peer format, and every way a file can be wrong."""

import os
import pickle
import zipfile

import keras
import numpy as np
import pytest
from peers import TINY_DEPTHS, TINY_DIMS, hf_model, keras_apps_tiny, timm_model, timm_to_official, torch_logits

import keras_convnext as kc
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
    assert notop.layers[-1].name == "stages_3_1_add"


def test_convert_reads_the_architecture_and_refuses_to_overwrite(atto, tmp_path):
    _, folder = atto
    dst = tmp_path / "out.weights.h5"
    kc.convert(str(folder / "official.pth"), str(dst))
    assert dst.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]
    with pytest.raises(ValueError, match=r"overwrite.*Received: dst="):
        kc.convert(str(folder / "official.pth"), str(dst))
    with pytest.raises(ValueError, match=r"must end in '.keras' or '.weights.h5'. Received: dst="):
        kc.convert(str(folder / "official.pth"), str(tmp_path / "out.h5"))
    with pytest.raises(CheckpointError, match=r"depths \(2, 2, 6, 2\).*not ConvNeXt-tiny"):
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
                                              r"the model expects \(40,\)"):
        kc.ConvNeXtAtto(weights=str(tmp_path / "wrong.pth"), classes=10)


def test_bfloat16_and_half_checkpoints_read_without_torch_loader(atto, tmp_path, pixels):
    peer, _ = atto
    torch.save({k: v.to(torch.bfloat16) for k, v in peer.state_dict().items()}, tmp_path / "bf16.pth")
    model = kc.ConvNeXtAtto(weights=str(tmp_path / "bf16.pth"), classes=10, input_shape=(64, 64, 3))
    expected = peer.state_dict()["stem.0.weight"].to(torch.bfloat16).float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("downsample_layers_0_0").kernel), expected)


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
