"""The real download path, against a local HTTP server on 127.0.0.1 serving files the test makes."""

import dataclasses
import hashlib
import http.server
import io
import os
import pathlib
import re
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile

import numpy as np
import pytest

import keras_convnext as kc
from keras_convnext import download as download_lib
from keras_convnext import presets as presets_lib
from keras_convnext import weights as weights_lib
from keras_convnext.download import DownloadError

torch = pytest.importorskip("torch")


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` at their path and, under a prefix, the ways a server fails.

    HTTP/1.0 (BaseHTTPRequestHandler's default): the connection closes after each response, so a
    body without Content-Length ends where the server stops writing.
    """

    files = {}  # path -> bytes
    hits = {}

    def do_GET(self):  # noqa: N802
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        prefix, _, rest = self.path.partition("/")[2].partition("/")
        if prefix == "redirect":
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(rest))
            self.end_headers()
            return
        body = _Handler.files.get(("/" + rest if prefix in _FAILURES else self.path).split("?")[0])
        if body is None:
            self.send_error(404, "Not Found")
            return
        try:
            _FAILURES.get(prefix, _serve)(self, body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def log_message(self, *args):
        pass


def _start(handler, status=200, length=None, content_type="application/octet-stream"):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()


def _serve(handler, body, pause=0.01):
    _start(handler, length=len(body))
    for start in range(0, len(body), 1 << 16):  # slowly, so that two clients overlap
        handler.wfile.write(body[start:start + (1 << 16)])
        time.sleep(pause)


def _drip(handler, body):
    _start(handler, length=len(body))
    for byte in body[:60]:  # one byte a second
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(1)


def _stall(handler, body):
    _start(handler, length=len(body))
    handler.wfile.flush()
    time.sleep(20)


_HTML = b"<!DOCTYPE html>\n<html><body>Please log in</body></html>\n"
_FAILURES = {
    "truncated": lambda h, body: (_start(h, length=len(body)), h.wfile.write(body[: len(body) // 2])),
    "overlong": lambda h, body: (_start(h, length=len(body) - 1000), h.wfile.write(body)),
    "close": lambda h, body: (_start(h), h.wfile.write(body)),
    "close-half": lambda h, body: (_start(h), h.wfile.write(body[: len(body) // 2])),
    "html": lambda h, body: (_start(h, length=len(_HTML), content_type="text/html; charset=utf-8"),
                             h.wfile.write(_HTML)),
    "html-as-binary": lambda h, body: (_start(h, length=len(_HTML)), h.wfile.write(_HTML)),
    "slow": lambda h, body: _serve(h, body, pause=0.1),
    "drip": _drip,
    "stall": _stall,
}


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def atto_file():
    from peers import timm_model

    peer = timm_model("convnext_atto", num_classes=1000)
    buffer = io.BytesIO()
    torch.save(peer.state_dict(), buffer)
    data = buffer.getvalue()
    _Handler.files["/convnext_atto_d2.pth"] = data
    return peer, data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    return tmp_path


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files
                  if not f.endswith(".lock"))


def test_download_success_verifies_and_renames(server, atto_file, tmp_path):
    _, data, sha = atto_file
    dest = tmp_path / "cache" / "a.pth"
    weights_lib.download(f"{server}/convnext_atto_d2.pth", str(dest), sha256=sha, progress=False)
    assert dest.read_bytes() == data
    assert listing(tmp_path / "cache") == ["a.pth"]


@pytest.mark.parametrize("path, kwargs, message", [
    ("/missing.pth", {}, r"Fetching http://127.0.0.1:\d+/missing.pth failed: HTTP 404"),
    ("/truncated/convnext_atto_d2.pth", {},
     r"download of \S+/truncated/convnext_atto_d2.pth is truncated: \d+ of \d+ bytes"),
    # http.client stops at the declared length: the payload is then a zip without its end.
    ("/overlong/convnext_atto_d2.pth", {},
     r"download of \S+/overlong/\S+ is not a readable checkpoint: cannot read the zip"),
    ("/close-half/convnext_atto_d2.pth", {},
     r"download of \S+/close-half/\S+ is not a readable checkpoint: cannot read the zip"),
    ("/close-half/convnext_atto_d2.pth", {"expect_format": "torch_zip"},
     r"download of \S+ is not a readable torch_zip checkpoint: cannot read the zip"),
    ("/html/convnext_atto_d2.pth", {},
     r"/html/convnext_atto_d2.pth answered with an HTML page \(Content-Type text/html\)"),
    ("/html-as-binary/convnext_atto_d2.pth", {},
     r"download of \S+ is not a readable checkpoint: an HTML or XML page, not a checkpoint \(it starts b'<!DOCTYPE"),
    ("/convnext_atto_d2.pth", {"sha256": "0" * 64}, r"fails its sha256 check: expected 0000"),
    ("/convnext_atto_d2.pth", {"sha256_prefix": "deadbeef"}, r"fails its sha256 check: expected deadbeef\.\.\."),
])
def test_download_failures_leave_nothing_behind(server, atto_file, tmp_path, path, kwargs, message):
    cache = tmp_path / "cache"
    with pytest.raises(kc.DownloadError, match=message) as info:
        weights_lib.download(server + path, str(cache / "a.pth"), progress=False, **kwargs)
    assert "Download it yourself and pass weights=" in str(info.value)
    assert f"place it at {cache / 'a.pth'}" in str(info.value)
    assert listing(cache) == []


def test_unreachable_network_names_the_url(tmp_path):
    with pytest.raises(kc.DownloadError, match=r"Cannot reach http://127.0.0.1:9/x.pth .*place it at"):
        weights_lib.download("http://127.0.0.1:9/x.pth", str(tmp_path / "x.pth"), progress=False)
    assert listing(tmp_path) == []


def test_two_concurrent_downloads_fetch_once_and_both_succeed(server, atto_file, tmp_path):
    _, data, sha = atto_file
    dest = tmp_path / "cache" / "c.pth"
    url = f"{server}/convnext_atto_d2.pth?concurrent"
    errors = []

    def fetch():
        try:
            weights_lib.download(url, str(dest), sha256=sha, progress=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert dest.read_bytes() == data
    assert _Handler.hits["/convnext_atto_d2.pth?concurrent"] == 1  # the second waited, then found it
    assert listing(tmp_path / "cache") == ["c.pth"]


def test_preset_download_converts_once_and_loads_without_the_source(server, atto_file, keras_home, monkeypatch):
    from peers import torch_logits

    peer, _, sha = atto_file
    preset = dataclasses.replace(presets_lib.PRESETS["convnext_atto.d2_in1k"],
                                 url=f"{server}/convnext_atto_d2.pth", sha256_prefix=sha[:8])
    monkeypatch.setitem(presets_lib.PRESETS, preset.name, preset)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    model = kc.ConvNeXtAtto(weights="imagenet", input_shape=(64, 64, 3), classifier_activation=None)
    diff = np.abs(model.predict(pixels, verbose=0) - torch_logits(peer, pixels)).max()
    assert diff <= 1e-4
    assert listing(keras_home) == ["keras_convnext/convnext_atto.d2_in1k.keras"]
    # The second build reads the converted file: no request, no torch checkpoint.
    hits = _Handler.hits["/convnext_atto_d2.pth"]
    again = kc.ConvNeXtAtto(weights="convnext_atto.d2_in1k", include_top=False, pooling="avg")
    assert _Handler.hits["/convnext_atto_d2.pth"] == hits
    assert again.input_shape == (None, None, None, 3)


def test_preset_with_a_bad_hash_leaves_no_converted_file(server, atto_file, keras_home, monkeypatch):
    preset = dataclasses.replace(presets_lib.PRESETS["convnext_atto.d2_in1k"],
                                 url=f"{server}/convnext_atto_d2.pth", sha256_prefix="01bb0f51")
    monkeypatch.setitem(presets_lib.PRESETS, preset.name, preset)
    with pytest.raises(kc.DownloadError, match=r"fails its sha256 check: expected 01bb0f51"):
        kc.ConvNeXtAtto()
    assert listing(keras_home) == []


def test_an_html_page_is_refused_and_the_right_body_then_lands(server, atto_file, tmp_path):
    _, data, sha = atto_file
    dest = tmp_path / "cache" / "a.pth"
    with pytest.raises(DownloadError, match=r"answered with an HTML page .*place it at"):
        download_lib.download(f"{server}/html/convnext_atto_d2.pth", dest, progress=False)
    assert listing(tmp_path / "cache") == []
    download_lib.download(f"{server}/convnext_atto_d2.pth", dest, sha256=sha, progress=False)
    assert dest.read_bytes() == data


def test_a_complete_close_delimited_body_is_accepted(server, atto_file, tmp_path):
    _, data, _ = atto_file
    dest = tmp_path / "cache" / "a.pth"
    download_lib.download(f"{server}/close/convnext_atto_d2.pth", dest, expect_format="torch_zip", progress=False)
    assert dest.read_bytes() == data


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.pth", "/etc/passwd", "data:,PK"])
def test_only_http_and_https_are_fetched(url, tmp_path):
    with pytest.raises(DownloadError, match=rf"Refusing to fetch {re.escape(url)}: only http:// and https:// URLs "
                                            r".*place it at"):
        download_lib.download(url, tmp_path / "a.pth", progress=False)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/a.pth"])
def test_a_redirect_to_another_scheme_is_refused(server, target, tmp_path):
    url = f"{server}/redirect/{urllib.parse.quote(target, safe='')}"
    with pytest.raises(DownloadError, match=rf"Refusing the redirect from {re.escape(url)} to {re.escape(target)}: "
                                            r"only http:// .*place it at"):
        download_lib.download(url, tmp_path / "a.pth", progress=False)
    assert listing(tmp_path) == []


def test_a_redirect_to_http_is_followed(server, atto_file, tmp_path):
    _, data, sha = atto_file
    dest = tmp_path / "a.pth"
    download_lib.download(f"{server}/redirect/%2Fconvnext_atto_d2.pth", dest, sha256=sha, progress=False)
    assert dest.read_bytes() == data


@pytest.mark.parametrize("path, how", [("/drip/convnext_atto_d2.pth", "argument"),
                                       ("/stall/convnext_atto_d2.pth", "env")])
def test_a_slow_server_ends_at_the_deadline(server, atto_file, tmp_path, monkeypatch, path, how):
    kwargs = {"deadline": 2} if how == "argument" else {}
    if how == "env":
        monkeypatch.setenv("KERAS_CONVNEXT_DOWNLOAD_TIMEOUT", "2")
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"did not finish within its 2 s deadline: allow longer with "
                                            r"KERAS_CONVNEXT_DOWNLOAD_TIMEOUT=SECONDS .*place it at"):
        download_lib.download(server + path, tmp_path / "a.pth", progress=False, **kwargs)
    # A drip ends at the first read after the deadline, a silent server when its read times out.
    assert 2 <= time.monotonic() - start < 5
    assert listing(tmp_path) == []


def test_a_bad_timeout_setting_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_CONVNEXT_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"`KERAS_CONVNEXT_DOWNLOAD_TIMEOUT` must be a positive number of "
                                         r"seconds. Received: KERAS_CONVNEXT_DOWNLOAD_TIMEOUT='soon'"):
        download_lib.download("http://127.0.0.1:9/a.pth", tmp_path / "a.pth", progress=False)
    with pytest.raises(ValueError, match=r"Received: lock_timeout=0"):
        download_lib.download("http://127.0.0.1:9/a.pth", tmp_path / "a.pth", progress=False, deadline=1,
                              lock_timeout=0)


def test_a_waiter_on_the_lock_says_so_and_gives_up(tmp_path, monkeypatch, capsys):
    fcntl = pytest.importorskip("fcntl")
    dest = tmp_path / "cache" / "a.pth"
    dest.parent.mkdir()
    monkeypatch.setenv("KERAS_CONVNEXT_LOCK_TIMEOUT", "0.5")
    url = "http://127.0.0.1:9/a.pth"  # never reached: the lock comes first
    with open(f"{dest}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another process downloading it would
        start = time.monotonic()
        with pytest.raises(DownloadError, match=rf"Gave up after 0\.5\d* s waiting for another process downloading "
                                                rf"{re.escape(url)} \(lock {re.escape(str(dest))}\.lock, held only "
                                                r"while that process lives\): wait longer with "
                                                r"KERAS_CONVNEXT_LOCK_TIMEOUT=SECONDS.*place it at"):
            download_lib.download(url, dest, progress=False)
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 2
    err = capsys.readouterr().err
    assert f"keras_convnext: waiting for another process downloading {url} (lock {dest}.lock), at most 0.5 s" in err
    assert listing(tmp_path) == []


def test_a_killed_download_is_cleaned_by_the_next(server, atto_file, tmp_path):
    _, data, sha = atto_file
    folder = tmp_path / "cache"
    dest = folder / "k.pth"
    code = ("from keras_convnext.download import download; "
            f"download({server + '/slow/convnext_atto_d2.pth'!r}, {str(dest)!r}, progress=False)")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        give_up = time.monotonic() + 120
        while not any(p.stat().st_size for p in folder.glob(".partial-*")):
            assert child.poll() is None and time.monotonic() < give_up, "the child never started writing"
            time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert [p.name for p in folder.glob(f".partial-{child.pid}-*")]  # what the killed run left
    download_lib.download(f"{server}/convnext_atto_d2.pth", dest, sha256=sha, progress=False)
    assert dest.read_bytes() == data
    assert sorted(os.listdir(folder)) == ["k.pth", "k.pth.lock"]


def test_downloads_get_the_users_umask(server, atto_file, tmp_path):
    _, _, sha = atto_file
    dest = tmp_path / "a.pth"
    old = os.umask(0o027)
    try:
        download_lib.download(f"{server}/convnext_atto_d2.pth", dest, sha256=sha, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~0o027


def test_the_progress_bar_counts_the_bytes(server, atto_file, tmp_path, capsys):
    _, data, sha = atto_file
    download_lib.download(f"{server}/convnext_atto_d2.pth", tmp_path / "a.pth", sha256=sha, progress=True)
    assert f"{len(data)}/{len(data)}" in capsys.readouterr().out


def test_a_damaged_earlier_download_is_moved_aside_and_fetched_again(server, atto_file, tmp_path):
    _, data, sha = atto_file
    dest = tmp_path / "a.pth"
    dest.write_bytes(data[: len(data) // 3])  # as a copy cut short by hand
    url, where = re.escape(f"{server}/convnext_atto_d2.pth"), re.escape(str(dest))
    with pytest.warns(UserWarning, match=rf"the download of {url} at {where} does not read \(.+\): moved it aside "
                                         rf"to {where}\.corrupt-\d{{8}}-\d{{6}} and fetching it again"):
        download_lib.download(f"{server}/convnext_atto_d2.pth", dest, progress=False)
    assert dest.read_bytes() == data
    assert [p.name.split("-")[0] for p in tmp_path.glob("a.pth.corrupt-*")] == ["a.pth.corrupt"]


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    else:  # one byte flipped inside model.weights.h5, which .keras stores uncompressed
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, problem", [("truncated", r"cannot read the zip archive"),
                                          ("flipped", r"fails its CRC check")])
def test_a_damaged_cached_preset_is_moved_aside_and_made_again(server, atto_file, keras_home, how, problem):
    _, _, sha = atto_file
    preset = dataclasses.replace(presets_lib.PRESETS["convnext_atto.d2_in1k"],
                                 url=f"{server}/convnext_atto_d2.pth?{how}", sha256_prefix=sha[:8])
    path = weights_lib.fetch_preset(preset, progress=False)
    _damage(pathlib.Path(path), how)
    where = re.escape(path)
    with pytest.warns(UserWarning, match=rf"the converted preset convnext_atto\.d2_in1k at {where} does not read "
                                         rf"\(.*{problem}.*\): moved it aside to {where}\.corrupt-\d{{8}}-\d{{6}}"):
        again = weights_lib.fetch_preset(preset, progress=False)
    assert again == path and download_lib.checkpoint_problem(path, "keras") is None
    assert _Handler.hits[f"/convnext_atto_d2.pth?{how}"] == 2
    assert [f.split(".corrupt-")[0] for f in listing(keras_home)] == [
        "keras_convnext/convnext_atto.d2_in1k.keras", "keras_convnext/convnext_atto.d2_in1k.keras"]


def test_a_preset_is_downloaded_as_its_own_format(server, safetensors_file, keras_home):
    preset = dataclasses.replace(presets_lib.PRESETS["convnext_tiny.fb_in1k"],  # an official .pth
                                 url=f"{server}/atto.safetensors")
    with pytest.raises(DownloadError, match=r"download of \S+/atto.safetensors is not a readable torch_zip "
                                            r"checkpoint: a safetensors file, not torch_zip. .*place it at"):
        weights_lib.fetch_preset(preset, progress=False)
    assert listing(keras_home) == []


@pytest.fixture(scope="module")
def safetensors_file(atto_file):
    from safetensors.torch import save

    peer, _, _ = atto_file
    data = save({k: v.contiguous() for k, v in peer.state_dict().items()})
    _Handler.files["/atto.safetensors"] = data
    return data


def _hdf5_bytes(tmp_path):
    import h5py

    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        f.create_dataset("dense/kernel", data=np.arange(4096, dtype="float32"))
    return path.read_bytes()


@pytest.mark.parametrize("fmt", ["torch_zip", "safetensors", "keras_h5_legacy"])
def test_every_format_is_checked_whole(fmt, atto_file, safetensors_file, tmp_path):
    data = {"torch_zip": atto_file[1], "safetensors": safetensors_file,
            "keras_h5_legacy": _hdf5_bytes(tmp_path)}[fmt]
    path = tmp_path / "x"
    path.write_bytes(data)
    assert download_lib.checkpoint_problem(path, fmt) is None
    path.write_bytes(data[:-100])
    problem = {"torch_zip": r"cannot read the zip archive \(BadZipFile",
               "safetensors": r"tensor '\S+' has data offsets .* outside the \d+ data bytes",
               "keras_h5_legacy": r"cannot read the HDF5 file \(OSError: .*truncated file"}[fmt]
    assert re.match(problem, download_lib.checkpoint_problem(path, fmt))
    if fmt == "safetensors":
        path.write_bytes(data + bytes(100))
        assert re.match(r"the safetensors data is \d+ bytes, its tensors cover \d+",
                        download_lib.checkpoint_problem(path, fmt))
    if fmt == "torch_zip":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
        assert re.match(r"zip member '\S+' fails its CRC check", download_lib.checkpoint_problem(path, fmt))


def test_ownerless_leftovers_of_older_versions_are_swept_after_an_hour_in_the_cache(server, atto_file, keras_home):
    _, _, sha = atto_file
    folder = pathlib.Path(download_lib.downloads_dir())
    folder.mkdir(parents=True)
    old, fresh = folder / ".download-x1.part", folder / ".download-x2.part"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200,) * 2)
    download_lib.download(f"{server}/convnext_atto_d2.pth", folder / "a.pth", sha256=sha, progress=False)
    assert sorted(os.listdir(folder)) == [".download-x2.part", "a.pth", "a.pth.lock"]


def test_files_named_like_old_leftovers_outside_the_cache_are_left_alone(server, atto_file, tmp_path, keras_home):
    _, _, sha = atto_file
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in (".convert-notes", ".download-x.part"):
        (mine / name).write_bytes(b"the user's own")
        os.utime(mine / name, (time.time() - 7200,) * 2)
    download_lib.download(f"{server}/convnext_atto_d2.pth", mine / "a.pth", sha256=sha, progress=False)
    assert sorted(os.listdir(mine)) == [".convert-notes", ".download-x.part", "a.pth", "a.pth.lock"]
    cache = pathlib.Path(download_lib.cache_dir())
    cache.mkdir(parents=True)
    (cache / ".convert-old").write_bytes(b"left by an old version")
    os.utime(cache / ".convert-old", (time.time() - 7200,) * 2)
    assert download_lib.clean(str(cache)) == [".convert-old"]


# --- review findings: each of these got through (or crashed) before its fix ---------------------

def _garbled_safetensors():
    return struct.pack("<Q", 10) + b"{not json}" + bytes(16)


def test_a_garbled_safetensors_header_is_a_download_error_naming_the_url(server, tmp_path):
    _Handler.files["/garbled.safetensors"] = _garbled_safetensors()
    with pytest.raises(DownloadError, match=r"download of \S+/garbled.safetensors is not a readable safetensors "
                                            r"checkpoint: cannot read the safetensors file \(JSONDecodeError"
                                            r".*place it"):
        download_lib.download(f"{server}/garbled.safetensors", tmp_path / "g.safetensors", progress=False,
                              expect_format="safetensors")
    assert listing(tmp_path) == []


def test_a_cached_safetensors_with_a_garbled_header_is_moved_aside(server, safetensors_file, tmp_path):
    dest = tmp_path / "atto.safetensors"
    dest.write_bytes(_garbled_safetensors())
    with pytest.warns(UserWarning, match=r"does not read \(cannot read the safetensors file \(JSONDecodeError.*"
                                         r"moved it aside"):
        download_lib.download(f"{server}/atto.safetensors", dest, progress=False)
    assert dest.read_bytes() == safetensors_file


def test_a_source_that_does_not_convert_is_moved_aside_and_fetched_again(server, atto_file, keras_home, monkeypatch):
    _, data, _ = atto_file
    buffer = io.BytesIO()
    torch.save({"stem.0.weight": torch.full((4,), float("nan"))}, buffer)
    _Handler.files["/unhashed.pth"] = buffer.getvalue()
    preset = dataclasses.replace(presets_lib.PRESETS["convnext_atto.d2_in1k"], url=f"{server}/unhashed.pth",
                                 sha256=None, sha256_prefix=None)  # nothing published: the payload is all we check
    with pytest.raises(kc.CheckpointError, match=r"unhashed.pth: tensor 'stem.0.weight' holds NaN .* Moved the "
                                                 r"download aside to \S+unhashed.pth.corrupt-\d{8}-\d{6}: the next call "
                                                 r"fetches it again"):
        weights_lib.fetch_preset(preset, progress=False)
    assert [f.split(".corrupt-")[0] for f in listing(keras_home)] == ["keras_convnext/downloads/unhashed.pth"]
    _Handler.files["/unhashed.pth"] = data
    path = weights_lib.fetch_preset(preset, progress=False)
    assert download_lib.checkpoint_problem(path, "keras") is None
    assert _Handler.hits["/unhashed.pth"] == 2


@pytest.mark.parametrize("kwargs, received", [
    ({"deadline": True}, "deadline=True"), ({"deadline": float("nan")}, "deadline=nan"),
    ({"deadline": float("inf")}, "deadline=inf"), ({"lock_timeout": -1}, "lock_timeout=-1"),
    ({"deadline": "5"}, "deadline='5'"),
])
def test_timeouts_are_positive_numbers(tmp_path, kwargs, received):
    with pytest.raises(ValueError, match=rf"Received: {re.escape(received)}$"):
        download_lib.download("http://127.0.0.1:9/a.pth", tmp_path / "a.pth", progress=False, **kwargs)
    assert listing(tmp_path) == []


def test_the_payload_check_is_the_readers_own(tmp_path, monkeypatch):
    from keras_convnext import checkpoints

    monkeypatch.setattr(checkpoints, "_EXPANSION_FLOOR", 2**16)  # each member passes on its own
    with zipfile.ZipFile(tmp_path / "bomb.pth", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02N.")
        for i in range(60):
            z.writestr(f"archive/data/{i}", bytes(2**16), compress_type=zipfile.ZIP_DEFLATED)
    assert re.match(r"its zip members inflate to over \d+ bytes \(at most 100x the file's",
                    download_lib.checkpoint_problem(tmp_path / "bomb.pth"))
    import h5py

    monkeypatch.setattr(checkpoints, "_EXPANSION_FLOOR", 2**20)
    with h5py.File(tmp_path / "fills.h5", "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        for i in range(40):
            f.create_dataset(f"dense/kernel_{i}", shape=(2**18,), dtype="f4")  # 1 MiB of fill value each
    assert re.match(r"its datasets declare over \d+ bytes", download_lib.checkpoint_problem(tmp_path / "fills.h5"))
