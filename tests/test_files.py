"""files.py: write aside, rename, the user's umask, and what killed writers leave behind."""

import os
import signal
import subprocess
import sys

import pytest

from keras_convnext import files


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_atomic_path_renames_on_success_with_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with files.atomic_path(tmp_path / "model.keras") as tmp:
            assert tmp.endswith(".keras") and os.path.basename(tmp).startswith(f".partial-{os.getpid()}-")
            with open(tmp, "w") as f:
                f.write("new")
            assert not (tmp_path / "model.keras").exists()  # nothing at the target until complete
        with files.atomic_path(tmp_path / "w.weights.h5") as tmp:
            assert tmp.endswith(".weights.h5")
        with files.atomic_path(tmp_path / "export", directory=True) as tmp:
            with open(os.path.join(tmp, "saved_model.pb"), "w") as f:
                f.write("pb")
    finally:
        os.umask(old)
    assert (tmp_path / "model.keras").read_text() == "new"
    assert _mode(tmp_path / "model.keras") == 0o640  # 0o666 & ~0o027, not mkstemp's 0o600
    assert _mode(tmp_path / "export") == 0o750
    assert sorted(os.listdir(tmp_path)) == ["export", "model.keras", "w.weights.h5"]


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "classes.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["classes.json"]


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "1"
    target.mkdir()
    (target / "old.pb").write_text("old")
    with files.atomic_path(target, directory=True) as tmp:
        (open(os.path.join(tmp, "new.pb"), "w")).close()
    assert os.listdir(target) == ["new.pb"]
    assert os.listdir(tmp_path) == ["1"]


def test_folders_are_swapped_in_one_step_on_linux(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").touch()
    assert files._exchange(tmp_path / "a", tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["from_a"] and os.listdir(tmp_path / "a") == []


def test_leftovers_of_a_killed_writer_are_cleaned_and_a_live_writers_are_not(tmp_path):
    script = (
        "import sys, time\n"
        "from keras_convnext import files\n"
        "with files.atomic_path(sys.argv[1]) as tmp:\n"
        "    open(tmp, 'w').write('partial')\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "big.keras")], stdout=subprocess.PIPE,
                             text=True)
    leftover = child.stdout.readline().strip()
    assert os.path.exists(leftover)
    files.clean_leftovers(tmp_path)
    assert os.path.exists(leftover)  # its writer is alive
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert os.path.exists(leftover)  # a SIGKILL runs no clean-up
    (tmp_path / "unrelated.txt").write_text("mine")
    with files.atomic_path(tmp_path / "other.keras") as tmp:  # the next writer cleans the folder first
        open(tmp, "w").close()
    assert sorted(os.listdir(tmp_path)) == ["other.keras", "unrelated.txt"]


def test_partial_names_carry_the_pid():
    assert files._owner_pid(files.partial_name("x") + "abc") == os.getpid()
    assert files._owner_pid(".partial-abc") is None and files._owner_pid("model.keras") is None
