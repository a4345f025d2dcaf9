"""The downloader against a local HTTP server on 127.0.0.1 serving files made by the test, and
against a fake ``urllib.request.urlopen`` (no sockets at all) for what may touch which folder."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from xpnet.data import DATASETS, DataError, cache_dir, download, load_dataset, md5_of, write_idx
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


# ------------------------------------------------- which folders may be written: a fake urlopen
MIRROR = "http://mirror.invalid/fashion/"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class _Response(io.BytesIO):
    def __init__(self, body: bytes):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A registered 'fashion-mnist' whose four published files are made here, a cache in tmp_path,
    and ``urllib.request.urlopen`` replaced: it serves ``served`` by file name (else fails like
    an unreachable host) and records every URL asked for in ``asked``."""
    rng = np.random.default_rng(1)
    source = tmp_path / "published"
    source.mkdir()
    shapes = {"train-images": (6, 28, 28), "train-labels": (6,), "t10k-images": (2, 28, 28), "t10k-labels": (2,)}
    for name in FILES:
        write_idx(source / name, rng.integers(0, 10, size=shapes[name.split("-idx")[0]], dtype=np.uint8))
    good = {name: (source / name).read_bytes() for name in FILES}
    monkeypatch.setitem(
        DATASETS,
        "fashion-mnist",
        Remote(
            mirrors=(MIRROR,), md5={n: hashlib.md5(b).hexdigest() for n, b in good.items()}, classes=tuple("abcdefghij")
        ),
    )
    monkeypatch.setenv("XPNET_DATA_DIR", str(tmp_path / "cache"))
    state = {"good": good, "served": dict(good), "asked": [], "seen": []}

    def urlopen(url, timeout=None):
        state["asked"].append(url)
        state["seen"].append(sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").glob("*")))
        name = url.rsplit("/", 1)[-1]
        if name not in state["served"]:
            raise urllib.error.URLError("no network in this test")
        return _Response(state["served"][name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return state


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _other_idx_files(folder):
    """Four valid IDX .gz files that are not the published ones (like MNIST's copied there)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    write_idx(folder / FILES[0], rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8))
    write_idx(folder / FILES[1], rng.integers(0, 10, size=5, dtype=np.uint8))
    write_idx(folder / FILES[2], rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8))
    write_idx(folder / FILES[3], rng.integers(0, 10, size=3, dtype=np.uint8))


def test_a_folder_named_by_the_user_is_never_modified(published, tmp_path):
    """Wrong checksums in --data-dir: nothing deleted, written or downloaded; the message names
    the file, both MD5s, says it was left untouched and how to load the folder anyway."""
    folder = tmp_path / "mine"
    _other_idx_files(folder)
    before = _snapshot(folder)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=folder)
    text = str(info.value)
    first = folder / FILES[0]
    assert text.startswith(f"{first}: MD5 {md5_of(first)}, expected {DATASETS['fashion-mnist'].md5[FILES[0]]}")
    assert "left untouched" in text and "\n" not in text
    assert f"--dataset mnist --data-dir {folder}" in text and "load_dataset('mnist', data_dir=" in text
    assert published["asked"] == [] and _snapshot(folder) == before
    assert not (tmp_path / "cache").exists()
    ds = load_dataset("mnist", data_dir=folder)  # what the message advises does load the files
    assert ds.train.x.shape == (5, 784) and ds.test.y.shape == (3,)
    assert _snapshot(folder) == before


def test_missing_files_in_a_user_folder_are_named_not_downloaded(published, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / FILES[0]).write_bytes(published["good"][FILES[0]])
    write_idx(folder / FILES[3].removesuffix(".gz"), np.zeros(2, dtype=np.uint8))  # uncompressed counts
    before = _snapshot(folder)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=folder)
    text = str(info.value)
    assert text.startswith(f"{folder}: no {FILES[1]} or {FILES[1].removesuffix('.gz')}, {FILES[2]} or ")
    assert FILES[0] not in text and FILES[3] not in text
    assert "--data-dir" in text and f"into its cache, {cache_dir() / 'fashion-mnist'}" in text
    assert published["asked"] == [] and _snapshot(folder) == before
    assert not (tmp_path / "cache").exists()


def test_an_absent_user_folder_is_not_created(published, tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "absent")
    assert not (tmp_path / "absent").exists() and published["asked"] == []


def test_the_right_files_in_a_user_folder_load_without_network(published, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, body in published["good"].items():
        (folder / name).write_bytes(body)
    assert load_dataset("fashion-mnist", data_dir=folder).train.x.shape == (6, 784)
    assert published["asked"] == []


def test_a_bad_cached_file_is_replaced_without_being_deleted_first(published):
    folder = cache_dir() / "fashion-mnist"
    _other_idx_files(folder)
    for name in FILES[1:]:
        (folder / name).write_bytes(published["good"][name])
    load_dataset("fashion-mnist")
    assert published["asked"] == [MIRROR + FILES[0]]
    assert FILES[0] in published["seen"][0]  # still there while the good copy was downloading
    assert (folder / FILES[0]).read_bytes() == published["good"][FILES[0]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)


def test_when_every_mirror_fails_a_bad_cached_file_stays_as_it_was(published):
    folder = cache_dir() / "fashion-mnist"
    _other_idx_files(folder)
    before = _snapshot(folder)
    published["served"].clear()
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist")
    text = str(info.value)
    expected = DATASETS["fashion-mnist"].md5[FILES[0]]
    assert f"could not download {FILES[0]}" in text and "no network in this test" in text
    assert f"has MD5 {md5_of(folder / FILES[0])}, not the expected {expected}" in text and "left as it was" in text
    assert _snapshot(folder) == before


def test_stale_part_files_in_the_cache_are_cleaned(published):
    folder = cache_dir() / "fashion-mnist"
    folder.mkdir(parents=True)
    (folder / f".{FILES[1]}.k1ll3d.part").write_bytes(b"half")
    load_dataset("fashion-mnist")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_a_cache_that_cannot_be_created_is_reported(published, tmp_path, monkeypatch, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    monkeypatch.setenv("XPNET_DATA_DIR", str(blocker if where == "file" else blocker / "sub"))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist")
    text = str(info.value)
    assert text.startswith(f"{cache_dir() / 'fashion-mnist'}: cannot create the download folder")
    assert f"{blocker} is a file" in text and published["asked"] == []
