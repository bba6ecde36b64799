"""The command line and the benchmark start their processes with huge pages where the kernel leaves them to us."""

import os
import platform
import subprocess
import sys

import pytest

from keras_convnext import benchmark, cli, hugepages

GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("text, mode", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("always madvise never\n", ""),       # no choice marked
    ("[sometimes] madvise\n", ""),        # not a mode the kernel has
])
def test_the_kernels_mode_is_read_from_sysfs(text, mode, tmp_path):
    (tmp_path / "enabled").write_text(text)
    assert hugepages.thp_mode(str(tmp_path / "enabled")) == mode


def test_a_missing_or_binary_mode_file_reads_as_unknown(tmp_path):
    assert hugepages.thp_mode(str(tmp_path / "missing")) == ""
    (tmp_path / "binary").write_bytes(b"\xff\xfe[madvise]\x80")
    assert hugepages.thp_mode(str(tmp_path / "binary")) == ""


@pytest.mark.parametrize("environ, mode, libc, system, want", [
    ({}, "madvise", GLIBC, "linux", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC, "linux", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, "linux", False),  # the user chose
    ({"KERAS_CONVNEXT_HUGEPAGES": "0"}, "madvise", GLIBC, "linux", False),             # opted out
    ({"KERAS_CONVNEXT_HUGEPAGES": " Off"}, "madvise", GLIBC, "linux", False),
    ({"KERAS_CONVNEXT_HUGEPAGES": "1"}, "madvise", GLIBC, "linux", True),
    ({}, "always", GLIBC, "linux", False),     # every program has them already
    ({}, "never", GLIBC, "linux", False),      # nobody gets them
    ({}, "", GLIBC, "linux", False),           # unknown kernel mode
    ({}, "madvise", ("glibc", "2.31"), "linux", False),  # glibc before the tunable
    ({}, "madvise", ("", ""), "linux", False),           # musl and others
    ({}, "madvise", GLIBC, "darwin", False),
])
def test_huge_pages_are_wanted_only_where_a_restart_gives_them(environ, mode, libc, system, want):
    assert hugepages.wanted(environ, mode=mode, libc=libc, system=system) is want


def test_the_tunable_is_added_to_the_users_own(monkeypatch):
    monkeypatch.setattr(hugepages, "wanted", lambda environ=None, **kwargs: True)
    env = hugepages.environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "1"}
    assert hugepages.environ_with_hugepages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setattr(hugepages, "wanted", lambda environ=None, **kwargs: False)
    given = {"A": "1"}
    env = hugepages.environ_with_hugepages(given)
    assert env == given and env is not given


@pytest.mark.parametrize("libc, has", [
    (("glibc", "2.35"), True), (("glibc", "2.36"), True), (("glibc", "3.0"), True),
    (("glibc", "2.34"), False), (("glibc", "2.x"), False), (("glibc", ""), False), (("musl", "1.2"), False),
])
def test_the_tunable_needs_glibc_2_35(libc, has):
    assert hugepages._glibc_has_the_tunable(libc) is has


RESTART = ("import os, sys; from keras_convnext import hugepages as h; h.thp_mode = lambda path=None: 'madvise'; "
           "{drop}print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); "
           "h.restart_with_hugepages(); print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def _restart(code, env, *args):
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


needs_glibc = pytest.mark.skipif(sys.platform != "linux" or not hugepages._glibc_has_the_tunable(platform.libc_ver()),
                                 reason="needs glibc 2.35 or later")


@needs_glibc
def test_a_process_starts_itself_again_once_with_the_tunable_and_its_arguments():
    # The kernel's mode is pretended to be "madvise", whatever this machine's is.
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages.RESTARTED)}
    lines = _restart(RESTART.format(drop=""), env, "train", "--epochs", "2")
    assert len(lines) == 3, lines
    pid = lines[0].split()[0]
    assert lines[0] == f"{pid} None ['train', '--epochs', '2']"
    # the same process, started again with the same arguments, and only once
    assert lines[1] == f"{pid} glibc.malloc.hugetlb=1 ['train', '--epochs', '2']"
    assert lines[2] == f"after {pid} glibc.malloc.hugetlb=1"
    env[hugepages.OPT_OUT] = "0"
    assert _restart(RESTART.format(drop=""), env)[1].startswith("after")


@needs_glibc
def test_a_restarted_process_never_starts_again_even_where_glibc_drops_the_tunable():
    # glibc in secure mode (a setuid interpreter) removes the tunable: the restart marker still stops a loop.
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages.RESTARTED)}
    drop = "os.environ.pop('GLIBC_TUNABLES', None) if os.environ.get(h.RESTARTED) else None; "
    lines = _restart(RESTART.format(drop=drop), env)
    assert len(lines) == 3 and lines[1].endswith("None []") and lines[2].startswith("after"), lines


def test_a_program_read_from_stdin_is_not_started_again(monkeypatch):
    monkeypatch.setattr(hugepages, "wanted", lambda environ=None, **kwargs: True)
    monkeypatch.delenv(hugepages.RESTARTED, raising=False)
    monkeypatch.setattr(hugepages.os, "execve", lambda *a: pytest.fail("started again"))
    for argv, orig in ((["-"], ["python", "-"]), ([""], ["python"])):
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setattr(sys, "orig_argv", orig)
        hugepages.restart_with_hugepages()


def test_a_closed_stdout_does_not_stop_the_restart(monkeypatch):
    monkeypatch.setattr(hugepages, "wanted", lambda environ=None, **kwargs: True)
    monkeypatch.delenv(hugepages.RESTARTED, raising=False)
    started = []
    monkeypatch.setattr(hugepages.os, "execve", lambda path, argv, env: started.append((argv, env[hugepages.RESTARTED])))
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "argv", ["keras-convnext", "--help"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "keras-convnext", "--help"])
    hugepages.restart_with_hugepages()
    assert started == [(["python", "keras-convnext", "--help"], "1")]


def test_only_the_command_starts_itself_again_never_main(monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages, "restart_with_hugepages", lambda: calls.append("restart"))
    monkeypatch.setattr(sys, "argv", ["keras-convnext", "--help"])
    with pytest.raises(SystemExit):
        cli.main()  # called in-process (tests, a user's script): never replaces the caller
    assert calls == []
    with pytest.raises(SystemExit):
        cli.console_main()
    assert calls == ["restart"]
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["keras-convnext"] == "keras_convnext.cli:console_main"


def test_every_benchmark_process_gets_the_same_allocator_setting(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(hugepages, "wanted", lambda environ=None, **kwargs: "glibc.malloc" not in
                        (environ or {}).get("GLIBC_TUNABLES", ""))
    seen = []

    def fake_run(cmd, env, **kwargs):
        seen.append(env.get("GLIBC_TUNABLES"))
        return subprocess.CompletedProcess(cmd, 1, "", "stopped here")

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    for impl, backend in (("timm", "torch"), ("keras_convnext", "jax")):
        benchmark.measure(benchmark.Spec(impl, backend))
    assert seen == ["glibc.malloc.hugetlb=1"] * 2
    assert benchmark.report([])["machine"]["glibc_tunables"] == "glibc.malloc.hugetlb=1"
