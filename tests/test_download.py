"""The downloader against a local HTTP server on 127.0.0.1 serving files made by the test."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest

from xpnet.data import DATASETS, DataError, download, load_dataset, md5_of, write_idx
from xpnet.data.datasets import Remote


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        mode, _, name = self.path.strip("/").partition("/")
        self.server.requests.append(self.path)
        body = self.files.get(name)
        if mode == "drop" or body is None and mode != "missing":
            self.connection.shutdown(socket.SHUT_RDWR)  # no response at all
            return
        if mode == "missing":
            self.send_error(404)
            return
        if mode == "corrupt":
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)
        if mode == "truncated":
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def payload(tmp_path):
    path = tmp_path / "source" / "train-labels-idx1-ubyte.gz"
    path.parent.mkdir()
    write_idx(path, np.arange(10, dtype=np.uint8))
    data = path.read_bytes()
    _Handler.files = {"train-labels-idx1-ubyte.gz": data}
    return data, hashlib.md5(data).hexdigest()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_download_lands_atomically(server, payload, tmp_path):
    httpd, base = server
    data, md5 = payload
    target = tmp_path / "cache" / "train-labels-idx1-ubyte.gz"
    assert download([f"{base}/good/{target.name}"], target, md5, timeout=5) == target
    assert target.read_bytes() == data and md5_of(target) == md5
    assert _leftovers(target.parent) == [target.name]  # no temporary file left behind
    download([f"{base}/good/{target.name}"], target, md5, timeout=5)
    assert len(httpd.requests) == 1  # a verified cached file is not fetched again


@pytest.mark.parametrize(
    "mode, message",
    [
        ("truncated", "IncompleteRead|download incomplete"),
        ("corrupt", "checksum mismatch"),
        ("drop", "download failed"),
        ("missing", "HTTP 404 Not Found"),
    ],
)
def test_bad_downloads_leave_nothing_behind(server, payload, tmp_path, mode, message):
    _, base = server
    _, md5 = payload
    target = tmp_path / "cache" / "train-labels-idx1-ubyte.gz"
    url = f"{base}/{mode}/{target.name}"
    with pytest.raises(DataError, match=message) as info:
        download([url], target, md5, timeout=5)
    assert url in str(info.value)
    assert "by hand" in str(info.value)
    assert _leftovers(target.parent) == []


def test_the_next_mirror_is_tried(server, payload, tmp_path):
    httpd, base = server
    data, md5 = payload
    target = tmp_path / "cache" / "train-labels-idx1-ubyte.gz"
    download([f"{base}/corrupt/{target.name}", f"{base}/good/{target.name}"], target, md5, timeout=5)
    assert target.read_bytes() == data
    assert [r.split("/")[1] for r in httpd.requests] == ["corrupt", "good"]


def test_a_corrupted_cached_file_is_replaced(server, payload, tmp_path):
    _, base = server
    data, md5 = payload
    target = tmp_path / "cache" / "train-labels-idx1-ubyte.gz"
    target.parent.mkdir()
    target.write_bytes(data[:5])  # an earlier, interrupted download
    download([f"{base}/good/{target.name}"], target, md5, timeout=5)
    assert target.read_bytes() == data


def test_no_network_names_the_url_and_the_manual_way(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/train-labels-idx1-ubyte.gz"
    with pytest.raises(DataError) as info:
        download([url], tmp_path / "train-labels-idx1-ubyte.gz", "0" * 32, timeout=5)
    text = str(info.value)
    assert url in text and "download failed" in text
    assert f"in {tmp_path} by hand" in text and "--data-dir" in text
    assert _leftovers(tmp_path) == []


def test_named_dataset_downloads_into_the_cache(server, tmp_path, monkeypatch):
    httpd, base = server
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    source.mkdir()
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, size=8).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, size=3).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(source / name, array)
    _Handler.files = {name: (source / name).read_bytes() for name in arrays}
    checksums = {name: md5_of(source / name) for name in arrays}
    monkeypatch.setitem(
        DATASETS, "fashion-mnist", Remote(mirrors=(f"{base}/good/",), md5=checksums, classes=tuple("abcdefghij"))
    )
    monkeypatch.setenv("XPNET_DATA_DIR", str(tmp_path / "cache"))
    ds = load_dataset("fashion-mnist")
    assert ds.train.x.shape == (8, 784) and ds.test.y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir()) == sorted(arrays)
    assert len(httpd.requests) == 4
    load_dataset("fashion-mnist")  # cached and verified: no new requests
    assert len(httpd.requests) == 4


def test_registered_datasets_have_checksums_for_all_four_files():
    for name in ("fashion-mnist", "kmnist"):
        remote = DATASETS[name]
        assert sorted(remote.md5) == sorted(
            [
                "train-images-idx3-ubyte.gz",
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
            ]
        )
        assert all(len(md5) == 32 for md5 in remote.md5.values()) and len(remote.classes) == 10
