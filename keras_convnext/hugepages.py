"""Huge pages for the process's large buffers, where the kernel leaves them to the program.

XLA (JAX) allocates a step's buffers afresh each time it runs a program, and the kernel hands out new
memory a small page at a time, so a training step spends much of its time on first touches (page faults;
docs/performance.md has the measurement). glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for
transparent huge pages (`madvise`), which the kernel gives where its mode is "madvise" (Debian's and
Ubuntu's default); under "always" every program gets them already, under "never" nobody does. glibc reads
its tunables only when a process starts, so the `keras-convnext` command starts itself again with the
tunable (`restart_with_hugepages`, from `cli.console_main`), and the benchmark starts every
implementation's process, timm's included, with it.

Keras-free: the command line calls this before it imports any framework.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
# "0" (or "false", "no", "off"): leave the allocator as the system set it, e.g. to compare with and without.
OPT_OUT = "KERAS_CONVNEXT_HUGEPAGES"
# Set in the restarted process: it never starts itself again, even where glibc drops the tunable (a setuid
# or setgid interpreter runs in secure mode, which removes it from GLIBC_TUNABLES).
RESTARTED = "KERAS_CONVNEXT_HUGEPAGES_RESTARTED"
THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path=THP_MODE_PATH):
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"); "" where it cannot be read."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(256)  # "always [madvise] never"
    except (OSError, UnicodeDecodeError):
        return ""
    for word in text.split():
        if word.startswith("[") and word.endswith("]") and word[1:-1] in ("always", "madvise", "never"):
            return word[1:-1]
    return ""


def _glibc_has_the_tunable(libc):
    name, version = libc
    parts = version.split(".")
    return name == "glibc" and len(parts) >= 2 and all(p.isdigit() for p in parts[:2]) and (
        (int(parts[0]), int(parts[1])) >= (2, 35))  # glibc.malloc.hugetlb arrived in glibc 2.35


def wanted(environ=None, mode=None, libc=None, system=None):
    """Whether a process started with the tunable would get huge pages that this one does not have."""
    environ = os.environ if environ is None else environ
    system = system or sys.platform
    opted_out = environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off")
    if system != "linux" or opted_out or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    if not _glibc_has_the_tunable(libc or platform.libc_ver()):
        return False
    return (thp_mode() if mode is None else mode) == "madvise"


def environ_with_hugepages(environ):
    """A copy of `environ` whose GLIBC_TUNABLES also asks for huge pages where `wanted(environ)` (the user's
    own tunables kept); an unchanged copy elsewhere."""
    env = dict(environ)
    if wanted(env):
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
    return env


def restart_with_hugepages():
    """Starts this program again with the tunable (`os.execve`, same interpreter and arguments) where
    `wanted()`; returns where it is not, or where the program cannot be started again as it was."""
    argv = list(getattr(sys, "orig_argv", None) or [])
    # A program read from stdin (`python -`, or the REPL: sys.argv[0] "-" or "") cannot be read a second time.
    from_stdin = not sys.argv or sys.argv[0] in ("", "-")
    if os.environ.get(RESTARTED) or not sys.executable or len(argv) < 2 or from_stdin or not wanted():
        return
    env = environ_with_hugepages(os.environ)
    env[RESTARTED] = "1"
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed by the caller: nothing of ours is in it yet
            pass
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # no executable to start again: carry on with the allocator as it is
        return
