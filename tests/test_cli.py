import json
import subprocess
import sys

import pytest

from keras_convnext.cli import build_parser, main
from conftest import once


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


FRAMEWORKS = ("keras", "tensorflow", "jax", "torch")


def test_help_and_argument_errors_import_no_framework():
    # --help of every command and argparse's errors answer from keras-free modules alone (variants.py).
    argvs = [["--help"], *([c, "--help"] for c in ("demo", "predict", "convert", "train", "export", "benchmark")),
             [], ["train"], ["export", "m.keras", "out", "--format", "zip"], ["convert", "a", "b", "--variant", "mega"],
             ["train", "data", "--out", "run", "--recipe", "in2k"], ["predict"], ["demo", "--epochs", "x"]]
    script = (
        "import json, sys\n"
        "from keras_convnext.cli import main\n"
        "codes = []\n"
        f"for argv in {argvs!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        f"print(json.dumps([codes, [m for m in {FRAMEWORKS!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    codes, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [0] * 7 + [2] * 7 and loaded == []
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 7 and all(line.endswith("(--help shows the usage)") for line in errors), errors


def test_recipe_choices_are_the_recipes():
    from keras_convnext.cli import RECIPE_NAMES, VARIANT_NAMES
    from keras_convnext.recipes import list_recipes
    from keras_convnext.variants import VARIANTS

    assert sorted(RECIPE_NAMES) == list_recipes() and len(set(RECIPE_NAMES)) == len(RECIPE_NAMES)
    assert VARIANT_NAMES == tuple(VARIANTS)


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


def test_convert_and_predict_on_a_real_photograph(tmp_path, capsys):
    # The console script runs once per command (a process each, with the backend's start-up); the refusal
    # and the table run in this process through `main`, which is what the script calls.
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
    code, err = _run_main(capsys, "convert", str(tmp_path / "atto.pth"), str(tmp_path / "atto.keras"))
    _assert_one_line(code, err, "--overwrite", "Received: dst=")

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

    main(["predict", str(tmp_path / "chelsea.png"), "--weights", str(tmp_path / "atto.keras")])
    assert f"1. {names[best[0]][1]}" in capsys.readouterr().out


def test_predict_errors_are_one_line():
    done = _cli("predict", "nowhere.png", "--preset", "convnext_tiny.not_a_tag")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Unknown preset" in done.stderr and "Received: preset='convnext_tiny.not_a_tag'" in done.stderr
    assert "Traceback" not in done.stderr


# --- every user error: one line on stderr, exit status 2, no traceback --------------------------

def _run_main(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    return e.value.code, err


def _assert_one_line(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    if not any(line.startswith("usage:") for line in lines):  # argparse prints its usage line first
        assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def hostile(tmp_path):
    """A folder of broken inputs, each made here."""
    import h5py
    import numpy as np
    from PIL import Image

    (tmp_path / "folder.pth").mkdir()
    (tmp_path / "truncated.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    with h5py.File(tmp_path / "no_names.h5", "w") as f:
        f.create_group("model_weights").attrs["backend"] = "tensorflow"
        f.create_dataset("x", data=np.zeros(3))
    (tmp_path / "garbage.pth").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    (tmp_path / "not_an_image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    Image.fromarray(np.zeros((40, 40, 3), "uint8")).save(tmp_path / "ok.png")
    return tmp_path


@pytest.mark.parametrize("argv, fragments", [
    (["predict", "{d}/ok.png", "--weights", "{d}/folder.pth"], ["Received: weights="]),
    (["predict", "{d}/ok.png", "--weights", "{d}/missing.pth"], ["No checkpoint file", "Received: weights="]),
    (["predict", "{d}/missing.png"], ["No image file", "Received: path="]),
    (["predict", "{d}/not_an_image.png"], ["not_an_image.png"]),
    (["predict", "{d}/ok.png", "--top", "0"], ["Received: top=0"]),
    (["convert", "{d}/missing.pth", "{d}/out.keras"], ["Received: src="]),
    (["convert", "{d}/ok.png", "{d}/out.keras", "--variant", "bogus"], ["invalid choice: 'bogus'"]),
    (["convert", "{d}/truncated.weights.h5", "{d}/out.keras"], ["truncated.weights.h5"]),
    (["convert", "{d}/no_names.h5", "{d}/out.keras"], ["no_names.h5"]),
    (["convert", "{d}/garbage.pth", "{d}/out.keras"], ["garbage.pth"]),
    (["convert", "{d}/ok.png", "{d}/out.txt"], ["Received: dst="]),
    (["train", "{d}/missing", "--out", "{d}/run"], ["Received: data="]),
    (["train", "{d}", "--out", "{d}/run", "--set", "mixup=abc"], ["Received: mixup='abc'"]),
    (["train", "{d}", "--out", "{d}/run", "--set", "mixupp=0.1"], ["Unknown recipe field 'mixupp'"]),
    (["train", "{d}", "--out", "{d}/run", "--set", "novalue"], ["key=value"]),
    (["train", "{d}", "--out", "{d}/run", "--set", "epochs=3"], ["has its own flag (--epochs)", "--set epochs=3"]),
    (["train", "{d}", "--out", "{d}/run", "--set", "seed=1"], ["(--seed)"]),
    (["train", "{d}", "--out", "{d}/run", "--set", "scale=(2, 1)"], ["0 < low <= high <= 1.0", "Received: scale=(2, 1)"]),
    (["train", "{d}", "--out", "{d}/run", "--epochs", "0"], ["Received: epochs=0"]),
    (["train", "{d}", "--out", "{d}/run", "--lr", "nan"], ["Received: lr=nan"]),
    (["export", "{d}/missing.keras", "{d}/out"], ["Received: model="]),
    (["export", "{d}/missing.keras", "{d}/out", "--format", "onnx", "--crop-pct", "0"], ["Received: crop_pct=0"]),
    (["export", "{d}/missing.keras", "{d}/out", "--format", "tflite"], ["invalid choice: 'tflite'"]),
    (["benchmark", "--steps", "0"], ["Received: steps=0"]),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragments, hostile, capsys):
    argv = [a.format(d=hostile) for a in argv]
    if argv[0] == "export" and "--format" not in argv:
        argv += ["--format", "saved_model"]
    code, err = _run_main(capsys, *argv)
    _assert_one_line(code, err, *fragments)


def test_convert_checks_its_arguments_first(tmp_path):
    import keras_convnext as kc

    with pytest.raises(ValueError, match=r"`overwrite` must be True or False. Received: overwrite='no'"):
        kc.convert(str(tmp_path / "missing.pth"), str(tmp_path / "out.keras"), overwrite="no")
    with pytest.raises(ValueError, match=r"Unknown variant.*Received: variant='mega'"):
        kc.convert(str(tmp_path / "missing.pth"), str(tmp_path / "out.keras"), variant="mega")


def test_download_error_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    import dataclasses

    from keras_convnext import presets as presets_lib

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    name = "convnext_atto.d2_in1k"
    unreachable = dataclasses.replace(presets_lib.PRESETS[name], url="http://127.0.0.1:9/convnext_atto.pth")
    monkeypatch.setitem(presets_lib.PRESETS, name, unreachable)
    code, err = _run_main(capsys, "convert", name, str(tmp_path / "atto.keras"))
    _assert_one_line(code, err, "http://127.0.0.1:9/convnext_atto.pth")


@once  # the missing-file error and --debug are the same Python on every backend
def test_debug_shows_the_traceback(tmp_path):
    done = _cli("convert", str(tmp_path / "missing.pth"), str(tmp_path / "out.keras"), "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "Received: src=" in done.stderr
    done = _cli("convert", str(tmp_path / "missing.pth"), str(tmp_path / "out.keras"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_train_names_a_corrupt_image_and_a_stale_backup_in_one_line(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((36, 36, 3), 40 * i, "uint8")).save(tmp_path / "data" / name / f"{i}.png")
    good = (tmp_path / "data" / "dog" / "2.png").read_bytes()
    (tmp_path / "data" / "dog" / "2.png").write_bytes(good[: len(good) // 2])  # cut short
    code, err = _run_main(capsys, "train", str(tmp_path / "data"), "--out", str(tmp_path / "run"))
    _assert_one_line(code, err, "2.png", "--skip-bad-images")
    (tmp_path / "data" / "dog" / "2.png").write_bytes(good)
    backup = tmp_path / "run" / "backup"
    backup.mkdir(parents=True)
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 1, "weights": "epoch-1.weights.h5"}))
    code, err = _run_main(capsys, "train", str(tmp_path / "data"), "--out", str(tmp_path / "run"))
    _assert_one_line(code, err, "--restart", str(backup))


def test_argparse_errors_are_one_line_too(capsys):
    code, err = _run_main(capsys, "export", "m.keras", "out", "--format", "zip")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "invalid choice: 'zip'" in err and "(--help shows the usage)" in err
    code, err = _run_main(capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "required: COMMAND" in err


def test_tensorflow_start_up_lines_do_not_precede_an_error(tmp_path):
    # Keras and TensorFlow start inside the command line, with their C++ start-up lines set aside.
    done = _cli("train", str(tmp_path / "missing"), "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"keras-convnext train: error: `data` must be a folder of class folders or a TFDS name. "
        f"Received: data={str(tmp_path / 'missing')!r}"]
