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


@pytest.mark.skipif(sys.platform != "linux" or not hugepages._glibc_has_the_tunable(platform.libc_ver()),
                    reason="needs glibc 2.35 or later")
def test_a_process_starts_itself_again_once_with_the_tunable():
    # The kernel's mode is pretended to be "madvise", whatever this machine's is.
    code = ("import os; from keras_convnext import hugepages as h; h.thp_mode = lambda path=None: 'madvise'; "
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); h.restart_with_hugepages(); "
            "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    first, second, after = done.stdout.split("\n")[:3]
    pid = first.split()[0]
    assert first == f"{pid} None"
    assert second == f"{pid} glibc.malloc.hugetlb=1"  # the same process, started again
    assert after == f"after {pid} glibc.malloc.hugetlb=1"  # and only once
    env[hugepages.OPT_OUT] = "0"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split("\n")[1].startswith("after")


def test_the_command_line_restarts_only_as_a_process_of_its_own(monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages, "restart_with_hugepages", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == []  # called in-process (tests, a user's script): never replaces the caller
    monkeypatch.setattr(sys, "argv", ["keras-convnext", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [1]


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
