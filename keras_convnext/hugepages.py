"""Huge pages for the process's large buffers, where the kernel leaves them to the program.

XLA (JAX) allocates a step's buffers afresh each time it runs a program, and the kernel hands out new
memory 4 KB at a time: ConvNeXt-T's float32 training step at batch 16 takes about 500,000 page faults
(docs/performance.md). glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for 2 MB transparent huge
pages (`madvise`), which the kernel gives where its mode is "madvise" (Debian's and Ubuntu's default);
under "always" every program gets them already, under "never" nobody does. glibc reads its tunables only
when a process starts, so the command line starts itself again with the tunable (`restart_with_hugepages`),
and the benchmark starts every implementation's process, timm's included, with it.

Keras-free: the command line calls this before it imports any framework.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "KERAS_CONVNEXT_HUGEPAGES"  # "0" (or "false", "no", "off"): leave the allocator as the system set it
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
    """Starts this program again with the tunable (`os.execve`, same arguments) where `wanted()`; else returns."""
    if not wanted() or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), environ_with_hugepages(os.environ))
    except OSError:  # no executable to start again: carry on with the allocator as it is
        return
