"""Downloading checkpoint files into the cache: the one job of this module.

Every download is written aside (`files.atomic_path`), checked, and only then renamed into place,
so the cache holds complete files or none: the byte count against Content-Length, the published
hash where there is one, and always the payload itself, by the readers' own checks in
`checkpoints` (a zip with every CRC right and no bomb, a safetensors header whose offsets fit the
file, an HDF5 file walked whole), so an HTML error page or a body cut short by a closed connection
never lands. A cached file that no longer reads is moved aside with a warning and fetched again.
Only http:// and https:// are fetched, redirects included; the whole transfer has a deadline and
waiting on another process's lock a bound.
"""

import contextlib
import glob
import hashlib
import http.client
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

from keras_convnext import checkpoints, checks, files

SCHEMES = ("http", "https")
SOCKET_TIMEOUT = 60  # seconds one read may wait for data
DEADLINE_ENV, DEFAULT_DEADLINE = "KERAS_CONVNEXT_DOWNLOAD_TIMEOUT", 3600.0
LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT = "KERAS_CONVNEXT_LOCK_TIMEOUT", 3600.0
FORMATS = ("torch_zip", "safetensors", "keras", "keras_weights_h5", "keras_h5_legacy")

# What each `Preset.format` is published as (keras_convnext.presets).
_PRESET_FORMATS = {"official": ("torch_zip",), "timm": ("torch_zip", "safetensors"),
                   "keras_h5": ("keras_h5_legacy",)}


class DownloadError(OSError):
    """A checkpoint could not be fetched or did not verify."""


def _error(message):
    return DownloadError(" ".join(message.split()))  # one line, whatever the causes printed


def cache_dir():
    """`$KERAS_HOME/keras_convnext` (default `~/.keras/keras_convnext`), as Keras caches files."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "keras_convnext")


def downloads_dir():
    return os.path.join(cache_dir(), "downloads")


def preset_cache_path(preset):
    """Where a preset's converted `.keras` file lives in the cache."""
    return os.path.join(cache_dir(), f"{preset.name}.keras")


def _by_hand(dest):
    return (f"Download it yourself and pass weights='/path/to/{os.path.basename(dest)}', or place it "
            f"at {dest}.")


def _seconds(value, env, default, name):
    """`value`, else the environment variable `env`, else `default`: a positive number of seconds."""
    if value is not None:
        return checks.number(name, value, 0.0, low_open=True)  # not True, nan, inf or "5"
    text = os.environ.get(env)
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"`{env}` must be a positive number of seconds. Received: {env}={text!r}")
    return seconds


# --- locks and leftovers ----------------------------------------------------------------------

@contextlib.contextmanager
def file_lock(path, what, timeout=None, way_out=""):
    """An exclusive lock on `path + ".lock"` between processes (POSIX), waited for `timeout` seconds.

    `what` says what the holder does ("downloading URL"), for the waiter's message. The kernel
    drops a dead holder's lock, so a killed run never leaves the cache locked. Elsewhere there
    is no lock; the atomic rename still keeps the cache whole.
    """
    timeout = _seconds(timeout, LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT, "lock_timeout")
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = path + ".lock"
    try:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        f = open(lock, "a")
    except OSError as e:
        raise _error(f"Cannot create the lock file {lock} ({e}): set KERAS_HOME to a writable folder. "
                     f"{way_out}") from e
    with f:
        start, pause, said = time.monotonic(), 0.05, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            waited = time.monotonic() - start
            if waited >= timeout:
                raise _error(
                    f"Gave up after {waited:.1f} s waiting for another process {what} (lock {lock}, "
                    f"held only while that process lives): wait longer with {LOCK_TIMEOUT_ENV}=SECONDS. "
                    f"{way_out}"
                )
            if not said:
                print(f"keras_convnext: waiting for another process {what} (lock {lock}), at most "
                      f"{timeout:g} s", file=sys.stderr, flush=True)
                said = True
            time.sleep(min(pause, timeout - waited))
            pause = min(2 * pause, 1.0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clean(folder):
    """Removes what killed runs left in `folder`; returns the names removed."""
    removed = files.clean_leftovers(folder)
    # Versions before files.partial_name wrote `.download-*.part` and `.convert-*`, with no owner
    # in the name: swept once nothing has written to them for an hour, and only in the cache,
    # where they wrote them; anywhere else such a name may be the user's own file.
    cache = {os.path.realpath(d) for d in (cache_dir(), downloads_dir())}
    if os.path.realpath(folder) not in cache:
        return removed
    for pattern in (".download-*.part", ".convert-*"):
        for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
            with contextlib.suppress(OSError):
                if os.path.isfile(path) and time.time() - os.path.getmtime(path) > 3600:
                    os.remove(path)
                    removed.append(os.path.basename(path))
    return removed


def move_aside(path, problem=None, what="the cached file"):
    """Renames a cached file that does not read to `<name>.corrupt-<time>` (only the latest kept).

    Returns the new name; with a `problem`, warns that the file is being fetched again.
    """
    for old in glob.glob(glob.escape(path) + ".corrupt-*"):
        with contextlib.suppress(OSError):
            os.remove(old)
    aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, aside)
    if problem is not None:
        warnings.warn(f"{what} {path} does not read ({problem}): moved it aside to {aside} and "
                      "fetching it again.", stacklevel=3)
    return aside


# --- what a payload must be -------------------------------------------------------------------

def _problem(check, path):
    """What `check(path)` (one of the readers' own checks) refuses in `path`, without the path; else None."""
    try:
        check(path)
    except checkpoints.CheckpointError as e:
        return str(e).replace(f"{path}: ", "").rstrip(".")
    return None


def checkpoint_problem(path, formats=None):
    """None if `path` is a complete checkpoint of one of `formats` (default: any), else what is wrong.

    The checks are the readers' own (`checkpoints`), by the limits the file will be read by: a
    zip has every member read through its CRC, an HDF5 file is walked, a safetensors header
    checked against the file's size.
    """
    formats = _formats(formats)
    if not os.path.isfile(path):
        return "no such file"
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    if head.lstrip()[:1] == b"<":
        return f"an HTML or XML page, not a checkpoint (it starts {head[:24]!r})"
    # The container first (a cut-short download shows here), then what it holds.
    problem = (_problem(checkpoints.check_zip, path) if head.startswith(checkpoints.ZIP_MAGIC)
               else _problem(checkpoints.check_hdf5, path) if head.startswith(checkpoints.HDF5_MAGIC) else None)
    if problem:
        return problem
    try:
        fmt = checkpoints.sniff_format(path)  # a "keras" archive holds config.json and model.weights.h5
    except (checkpoints.CheckpointError, OSError) as e:
        return str(e).replace(f"{path}: ", "").rstrip(".")
    if fmt not in formats:
        return f"a {fmt} file, not {' or '.join(formats)}"
    if fmt == "safetensors":
        return _problem(checkpoints.safetensors_header, path)  # offsets inside the file, no overlap, gap or tail
    return None


def _formats(formats):
    formats = (formats,) if isinstance(formats, str) else tuple(formats or FORMATS)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"`expect_format` must be among {FORMATS}. Received: expect_format={formats!r}")
    return formats


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_problem(path, sha256, sha256_prefix):
    expected = sha256 or sha256_prefix
    if not expected:
        return None
    digest = _sha256(path)
    if digest.startswith(expected):
        return None
    return f"fails its sha256 check: expected {expected}{'...' if not sha256 else ''}, got {digest}"


# --- fetching ---------------------------------------------------------------------------------

class _HttpRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http:// and https:// only (urllib's own allows ftp://)."""

    def __init__(self, way_out):
        self.way_out = way_out

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            new = urllib.parse.urljoin(req.full_url, target)
            if urllib.parse.urlsplit(new).scheme.lower() not in SCHEMES:
                fp.close()
                raise _error(f"Refusing the redirect from {req.full_url} to {new}: only http:// and "
                             f"https:// URLs are fetched. {self.way_out}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener(way_out):
    """urllib's default opener less its file://, ftp:// and data: handlers."""
    opener = urllib.request.OpenerDirector()
    handlers = [urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                urllib.request.HTTPDefaultErrorHandler(), _HttpRedirects(way_out),
                urllib.request.HTTPErrorProcessor()]
    if hasattr(urllib.request, "HTTPSHandler"):  # Python built with ssl
        handlers.append(urllib.request.HTTPSHandler())
    for handler in handlers:
        opener.add_handler(handler)
    return opener


def _fetch(url, tmp, deadline, progress, way_out):
    """Streams `url` into `tmp` within `deadline` seconds; checks the byte count."""
    end = time.monotonic() + deadline
    late = (f"The download of {url} did not finish within its {deadline:g} s deadline: allow longer "
            f"with {DEADLINE_ENV}=SECONDS (or deadline=). {way_out}")
    try:
        # A read waits at most the deadline: a silent server ends within twice the deadline at worst.
        response = _opener(way_out).open(url, timeout=min(SOCKET_TIMEOUT, deadline))
    except DownloadError:
        raise
    except urllib.error.HTTPError as e:
        with contextlib.suppress(Exception):
            e.close()
        raise _error(f"Fetching {url} failed: HTTP {e.code} {e.reason}. {way_out}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        if time.monotonic() > end:
            raise _error(late) from e
        raise _error(f"Cannot reach {url} ({getattr(e, 'reason', e)}). {way_out}") from e
    with response:
        if response.status != 200:
            raise _error(f"Fetching {url} failed: HTTP {response.status} {response.reason}, not 200. {way_out}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in ("text/html", "application/xhtml+xml"):
            raise _error(f"{url} answered with an HTML page (Content-Type {content_type}), not a checkpoint: "
                         f"the link may have moved or need a login. {way_out}")
        total = None
        if not getattr(response, "chunked", False):
            declared = response.headers.get("Content-Length")
            if declared is not None:
                if not declared.strip().isdigit():
                    raise _error(f"{url} declares an invalid Content-Length {declared!r}. {way_out}")
                total = int(declared)
        bar = None
        if progress:
            import keras

            bar = keras.utils.Progbar(total, unit_name="B")
        received = 0
        with open(tmp, "wb") as out:
            while True:
                if time.monotonic() > end:
                    raise _error(late)
                try:
                    chunk = response.read1(1 << 20)
                except (OSError, http.client.HTTPException) as e:  # a timeout, a reset, a bad chunk
                    if time.monotonic() > end:
                        raise _error(late) from e
                    if isinstance(e, TimeoutError):
                        raise _error(f"The download of {url} stalled after {received} bytes: no data for "
                                     f"{SOCKET_TIMEOUT} s. {way_out}") from e
                    raise _error(f"The download of {url} broke off after {received} bytes ({e!r}). {way_out}") from e
                if not chunk:
                    break
                received += len(chunk)
                if total is not None and received > total:
                    raise _error(f"{url} sent more than the {total} bytes it declared. {way_out}")
                out.write(chunk)
                if bar is not None:
                    bar.update(received)
            if bar is not None:
                bar.update(received, finalize=True)
    if total is not None and received < total:
        raise _error(f"The download of {url} is truncated: {received} of {total} bytes. {way_out}")


def download(url, dest, sha256=None, sha256_prefix=None, progress=True, expect_format=None,
             deadline=None, lock_timeout=None):
    """Fetches `url` to `dest`: written aside, verified, then renamed; returns `dest`.

    Args:
        url: an http:// or https:// URL (redirects are followed to those schemes only).
        dest: the file to create; an existing one is returned if it verifies, else moved aside.
        sha256, sha256_prefix: the published hash, or its first hex digits, if there is one.
        progress: show a `keras.utils.Progbar`.
        expect_format: the checkpoint format(s) of `checkpoints.sniff_format` the file must
            read as (default: any of them); the payload is checked whether or not a hash is given.
        deadline: seconds for the whole transfer (default `$KERAS_CONVNEXT_DOWNLOAD_TIMEOUT`, 3600).
        lock_timeout: seconds to wait for another process fetching `dest` (default
            `$KERAS_CONVNEXT_LOCK_TIMEOUT`, 3600).

    Hand-written rather than `keras.utils.get_file`, which writes in place (a crash or a second
    process sees a partial file) and names neither the URL nor the way out in its errors.
    Every failure is a `DownloadError` saying what, the URL and the way out.
    """
    dest = os.path.abspath(os.fspath(dest))
    way_out = _by_hand(dest)
    formats = _formats(expect_format)
    deadline = _seconds(deadline, DEADLINE_ENV, DEFAULT_DEADLINE, "deadline")
    if urllib.parse.urlsplit(url).scheme.lower() not in SCHEMES:
        raise _error(f"Refusing to fetch {url}: only http:// and https:// URLs are fetched (a local "
                     f"file is passed as weights=PATH). {way_out}")
    try:
        with file_lock(dest, f"downloading {url}", lock_timeout, way_out):
            clean(os.path.dirname(dest))
            if os.path.exists(dest):
                problem = _hash_problem(dest, sha256, sha256_prefix) or checkpoint_problem(dest, formats)
                if problem is None:
                    return dest  # placed by hand, or fetched by another process while this one waited
                move_aside(dest, problem, f"the download of {url} at")
            with files.atomic_path(dest) as tmp:
                _fetch(url, tmp, deadline, progress, way_out)
                problem = _hash_problem(tmp, sha256, sha256_prefix)
                if problem:
                    raise _error(f"The file from {url} {problem}. {way_out}")
                problem = checkpoint_problem(tmp, formats)
                if problem:
                    kind = "" if formats == FORMATS else " or ".join(formats) + " "
                    raise _error(f"The download of {url} is not a readable {kind}checkpoint: {problem}. "
                                 f"{way_out}")
    except DownloadError:
        raise
    except OSError as e:  # the cache itself: permissions, a full disk
        raise _error(f"Cannot write the download of {url} to {dest} ({e}): free space or set KERAS_HOME "
                     f"to a writable folder. {way_out}") from e
    return dest


def download_preset(preset, progress=True, deadline=None, lock_timeout=None):
    """Downloads a preset's source checkpoint into `downloads_dir()`; returns its path."""
    name = os.path.basename(urllib.parse.urlsplit(preset.url).path)
    if preset.format == "timm" and name == "model.safetensors":
        name = f"{preset.name}.safetensors"  # every Hugging Face file has the same name
    source = os.path.join(downloads_dir(), name)
    return download(preset.url, source, preset.sha256, preset.sha256_prefix, progress,
                    expect_format=_PRESET_FORMATS[preset.format], deadline=deadline, lock_timeout=lock_timeout)
