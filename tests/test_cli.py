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


def test_later_commands_say_so():
    with pytest.raises(SystemExit, match="not part of this release yet"):
        main(["benchmark"])
