"""The real download path, against a local HTTP server on 127.0.0.1 serving files the test makes."""

import dataclasses
import hashlib
import http.server
import os
import threading
import time

import numpy as np
import pytest

import keras_convnext as kc
from keras_convnext import presets as presets_lib
from keras_convnext import weights as weights_lib

torch = pytest.importorskip("torch")


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}  # path -> bytes
    hits = {}

    def do_GET(self):  # noqa: N802
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        if self.path.startswith("/truncated/"):
            body = _Handler.files[self.path.replace("/truncated", "")]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return
        body = _Handler.files.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), 1 << 16):  # slowly, so that two clients overlap
            self.wfile.write(body[start:start + (1 << 16)])
            time.sleep(0.01)

    def log_message(self, *args):
        pass


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
    import io

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
    ("/truncated/convnext_atto_d2.pth", {}, r"download of \S+/truncated/convnext_atto_d2.pth (is truncated|broke off)"),
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
