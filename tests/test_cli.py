import subprocess
import sys

import pytest

from keras_convnext.cli import build_parser, main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "keras_convnext.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("predict", "train", "export", "convert", "benchmark", "demo"):
        assert command in out


def test_console_script_is_installed():
    import os

    exe = os.path.join(os.path.dirname(sys.executable), "keras-convnext")
    assert os.access(exe, os.X_OK)
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: keras-convnext" in out


def test_missing_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([])
    assert e.value.code == 2


def test_train_requires_data_and_out():
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2


def _cli(*args):
    import os

    exe = os.path.join(os.path.dirname(sys.executable), "keras-convnext")
    return subprocess.run([exe, *args], capture_output=True, text=True)


def test_convert_and_predict_on_a_real_photograph(tmp_path):
    import json

    import numpy as np
    import skimage.data
    from PIL import Image

    torch = pytest.importorskip("torch")
    from peers import timm_model

    import keras_convnext as kc

    torch.save(timm_model("convnext_atto", num_classes=1000).state_dict(), tmp_path / "atto.pth")
    done = _cli("convert", str(tmp_path / "atto.pth"), str(tmp_path / "atto.keras"))
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'atto.keras'}" in done.stdout
    again = _cli("convert", str(tmp_path / "atto.pth"), str(tmp_path / "atto.keras"))
    assert again.returncode == 1 and "--overwrite" in again.stderr and "Received: dst=" in again.stderr

    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.png")
    done = _cli("predict", str(tmp_path / "chelsea.png"), "--weights", str(tmp_path / "atto.keras"),
                "--top", "3", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result) == 1 and result[0]["image"].endswith("chelsea.png")
    predictions = result[0]["predictions"]

    model = kc.ConvNeXtAtto(weights=str(tmp_path / "atto.keras"))
    probs = model.predict(kc.load_image(str(tmp_path / "chelsea.png"))[None], verbose=0)[0]
    best = np.argsort(-probs)[:3]
    names = kc.imagenet_classes()
    assert [p["wordnet_id"] for p in predictions] == [names[i][0] for i in best]
    np.testing.assert_allclose([p["probability"] for p in predictions], probs[best], atol=1e-5)

    table = _cli("predict", str(tmp_path / "chelsea.png"), "--weights", str(tmp_path / "atto.keras"))
    assert table.returncode == 0 and f"1. {names[best[0]][1]}" in table.stdout


def test_predict_errors_are_one_line():
    done = _cli("predict", "nowhere.png", "--preset", "convnext_tiny.not_a_tag")
    assert done.returncode == 1
    assert "Unknown preset" in done.stderr and "Received: preset='convnext_tiny.not_a_tag'" in done.stderr
    assert "Traceback" not in done.stderr
