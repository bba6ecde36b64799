"""Writing files so that nothing is lost or left half-written: the one owner of write-aside-then-rename.

Every file or folder the library produces is written under a temporary name beside its target,
given the user's usual permissions (umask), and renamed into place only when complete. The
temporary names carry the writer's process id (`.partial-<pid>-...`), so that the next writer into
the same folder removes what a killed run left behind, and never what a live one is writing.
"""

import contextlib
import os
import shutil
import tempfile

PARTIAL = ".partial-"


def _umask():
    # os.umask can only be read by setting it; set it straight back (one call pair, no I/O between).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path, directory=False):
    """Gives `path` the mode a plain `open()`/`mkdir` would (mkstemp/mkdtemp make 0600/0700)."""
    mode = (0o777 if directory else 0o666) & ~_umask()
    os.chmod(path, mode)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner_pid(name):
    """The pid in a `.partial-<pid>-...` name, or None for any other name."""
    if not name.startswith(PARTIAL):
        return None
    pid = name[len(PARTIAL):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def clean_leftovers(folder):
    """Removes the temporary files and folders that killed writers left in `folder`; returns their names."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        pid = _owner_pid(name)
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def partial_name(tag=""):
    """The prefix of a temporary name owned by this process (`tag` says what it is, for a reader)."""
    return f"{PARTIAL}{os.getpid()}-{tag + '-' if tag else ''}"


@contextlib.contextmanager
def atomic_path(path, directory=False):
    """Yields a temporary path beside `path` (same suffix); renames it onto `path` on success.

    On an exception the temporary file or folder is removed and `path` is untouched. A folder
    target that exists is moved aside, replaced, and only then removed, so a reader sees either
    the old or the new one, never a mix.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    clean_leftovers(folder)
    base = os.path.basename(path)
    if directory:
        tmp = tempfile.mkdtemp(dir=folder, prefix=partial_name(base))
    else:
        suffix = "".join(s for s in (".weights.h5",) if base.endswith(s)) or os.path.splitext(base)[1]
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=partial_name(), suffix=suffix)
        os.close(fd)
    try:
        yield tmp
        apply_umask(tmp, directory)
        if directory:
            _replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def _exchange(a, b):
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system has no such call."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_dir(new, target):
    # An existing folder is swapped with the new one in one step where the system can (a kill at any
    # instant leaves the old or the new version in place); `new` then holds the old one, removed by the caller.
    if os.path.isdir(target) and not os.path.islink(target) and _exchange(new, target):
        return
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=partial_name("old"))
        os.rename(target, os.path.join(old, "previous"))
    os.rename(new, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def work_folder(folder, tag="work"):
    """A context manager: a private temporary folder in `folder`, removed when the block ends.

    Named for this process (`partial_name`), so that `clean_leftovers` removes it if the process is killed.
    """
    return tempfile.TemporaryDirectory(dir=folder, prefix=partial_name(tag))


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """`open()` a temporary file beside `path`; it becomes `path` only when the block ends without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_text(path, text):
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
