"""Sizes checked before memory is taken: the IDX reader streams, refuses a declared size beyond
the memory limit before allocating, and stops at the first byte past the declared payload.

The tests that would take the machine's memory if the reader regressed run in a child Python
whose address space is capped (RLIMIT_AS) at 1 GiB: a regression shows as a failed child, not
as a machine out of memory.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from xpnet.data import (
    DataError,
    limits,
    load_dataset,
    load_idx_folder,
    read_idx,
    read_idx_pair,
    split_indices,
    write_idx,
)
from xpnet.data.limits import check_fits, format_bytes, memory_limit

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
ZERO_CHUNK = 1 << 26  # 64 MiB of zeros per repeated deflate block
ZERO_CHUNKS = 117  # 117 × 64 MiB = 7.3 GiB of zeros


def _header(shape, code=0x08) -> bytes:
    return bytes([0, 0, code, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes()


def run_capped(code: str, *args, limit: int = GIB) -> subprocess.CompletedProcess:
    """Run ``code`` in a child Python whose soft and hard RLIMIT_AS is ``limit`` bytes."""
    pytest.importorskip("resource")
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", prelude + code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


READ_IDX_IN_CHILD = """
import sys
from xpnet.data import DataError, read_idx
try:
    array = read_idx(sys.argv[1])
except DataError as exc:
    print(exc)
    sys.exit(2)
print("read", array.shape)
"""


def assert_refused_in_child(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The child printed one DataError line holding every fragment, exited 2, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def zeros_member(tmp_path_factory) -> Path:
    """A gzip member of 7.3 GiB of zeros (about 7.6 MB on disk), with its true CRC and length.

    Built from one deflate block of 64 MiB of zeros written 117 times: after a full flush the
    compressor restarts, so every later block of the same input compresses to the same bytes.
    """
    path = tmp_path_factory.mktemp("bomb") / "zeros.gz"
    zeros = bytes(ZERO_CHUNK)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    with open(path, "wb") as handle:
        handle.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header: deflate, no name
        for _ in range(ZERO_CHUNKS):
            handle.write(block)
            crc = zlib.crc32(zeros, crc)
        handle.write(deflate.flush())  # the final (empty) block
        handle.write(crc.to_bytes(4, "little") + ((ZERO_CHUNKS * ZERO_CHUNK) % (1 << 32)).to_bytes(4, "little"))
    return path


def _bomb(tmp_path, zeros_member, shape) -> Path:
    """An IDX gzip: a first member with the header for ``shape``, then the 7.3 GiB of zeros."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_header(shape)) + zeros_member.read_bytes())
    return path


# ---------------------------------------------------------------------------- the limit
def test_memory_limit_is_the_smallest_of_memory_available_memory_and_rlimit_as(monkeypatch):
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < memory_limit() <= physical
    for terms, expected in [((8, 5, 7), 5), ((8, None, 7), 7), ((None, None, None), None), ((3, 5, None), 3)]:
        for name, value in zip(("_physical_memory", "_available_memory", "_address_space_left"), terms):
            monkeypatch.setattr(limits, name, lambda value=value: value)
        assert memory_limit() == expected


def test_memory_limit_counts_the_memory_available_now(tmp_path, monkeypatch):
    """Linux's MemAvailable, not the machine's total: a 23 GiB machine with 2 GiB free has 2."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683652 kB\nMemFree:          123456 kB\nMemAvailable:    2097152 kB\n")
    monkeypatch.setattr(limits, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(limits, "_address_space_left", lambda: None)
    assert limits._available_memory() == 2 * GIB
    assert memory_limit() == min(2 * GIB, limits._physical_memory())
    meminfo.write_text("MemTotal:       24683652 kB\n")  # an old kernel: no MemAvailable line
    assert limits._available_memory() is None
    monkeypatch.setattr(limits, "_MEMINFO", str(tmp_path / "absent"))  # not Linux
    assert limits._available_memory() is None


def test_memory_limit_under_rlimit_as_is_what_is_left_of_the_address_space():
    """Capped at 1 GiB, the child has less than 1 GiB left to map: the interpreter and NumPy
    hold some of it already."""
    code = (
        "import numpy, xpnet.data\n"
        "from xpnet.data.limits import memory_limit\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * __import__('os').sysconf('SC_PAGE_SIZE')\n"
        "print(memory_limit(), used)"
    )
    result = run_capped(code)
    assert result.returncode == 0, result.stderr
    limit, used = map(int, result.stdout.split())
    assert 0 < used < GIB // 2
    assert GIB - used - (64 << 20) <= limit <= GIB - used


def test_sizes_are_written_in_human_units(monkeypatch):
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(10_000_000 * 28 * 28) == "7.3 GiB"
    monkeypatch.setattr(limits, "memory_limit", lambda: GIB)
    check_fits("f.idx", GIB, "shape (9,)")  # exactly the limit fits
    with pytest.raises(DataError, match=r"^f.idx: shape \(9,\) needs 2.0 GiB, more than the 1.0 GiB of memory"):
        check_fits("f.idx", 2 * GIB, "shape (9,)")
    check_fits("f.idx", GIB // 5, "shape (9,) uint8", copies=[("float32 copy", 4 * GIB // 5)])  # 1 GiB in all
    with pytest.raises(
        DataError,
        match=r"^f.idx: shape \(9,\) uint8 \(512.0 MiB\) and its float32 copy \(2.0 GiB\) need 2.5 GiB, more than",
    ):
        check_fits("f.idx", GIB // 2, "shape (9,) uint8", copies=[("float32 copy", 2 * GIB)])


# -------------------------------------------------------------- gzip: a decompression bomb
def test_a_gzip_declaring_a_small_shape_stops_at_the_first_extra_byte(tmp_path, zeros_member):
    """7.6 MB on disk inflating to 7.3 GiB behind a header declaring 10 images: refused, in a
    child capped at 1 GiB, with the one-line message."""
    path = _bomb(tmp_path, zeros_member, (10, 28, 28))
    assert path.stat().st_size < 10_000_000
    result = run_capped(READ_IDX_IN_CHILD, path)
    assert_refused_in_child(result, str(path), "extra bytes after the payload", "shape (10, 28, 28) needs 7840 bytes")


def test_a_gzip_declaring_a_huge_shape_is_refused_by_the_limit(tmp_path, zeros_member):
    path = _bomb(tmp_path, zeros_member, (10_000_000, 28, 28))
    result = run_capped(READ_IDX_IN_CHILD, path)
    assert_refused_in_child(
        result, str(path), "shape (10000000, 28, 28) needs 7.3 GiB, more than the", "iB of memory available"
    )


class _CountingInflater:
    """A zlib decompressor that adds up the bytes it produces."""

    produced = 0

    def __init__(self, inner):
        self._inner = inner

    def decompress(self, data, max_length=0):
        out = self._inner.decompress(data, max_length)
        _CountingInflater.produced += len(out)
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_a_gzip_is_inflated_no_further_than_one_byte_past_the_payload(tmp_path, monkeypatch):
    original = zlib.decompressobj
    monkeypatch.setattr(zlib, "decompressobj", lambda *a, **k: _CountingInflater(original(*a, **k)))
    _CountingInflater.produced = 0
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(_header((100,)) + bytes(100 + (32 << 20)), compresslevel=1))
    with pytest.raises(DataError, match="extra bytes after the payload"):
        read_idx(path)
    assert _CountingInflater.produced <= 8 + 100 + 1


def _images_folder(folder: Path, n_train: int, image: tuple[int, int] = (28, 28), n_test: int = 10) -> Path:
    """The four IDX files of a dataset whose training images really are ``n_train`` gzip-compressed
    images (a pattern that compresses well: the file stays small)."""
    folder.mkdir(parents=True, exist_ok=True)
    pattern = (np.arange(int(np.prod(image))) % 251).astype(np.uint8).tobytes()
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as handle:
        handle.write(_header((n_train, *image)))
        block = pattern * 4096
        for start in range(0, n_train, 4096):
            handle.write(block[: len(pattern) * min(4096, n_train - start)])
    labels = (np.arange(n_train) % 10).astype(np.uint8)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((n_test, *image), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", (np.arange(n_test) % 10).astype(np.uint8))
    return folder


LOAD_FOLDER_IN_CHILD = """
import sys
from xpnet.data import DataError, load_idx_folder
try:
    dataset = load_idx_folder(sys.argv[1])
except DataError as exc:
    print(exc)
    sys.exit(2)
print("loaded", dataset.train.x.shape, dataset.train.x.dtype)
"""


def test_images_whose_float32_copy_does_not_fit_are_refused_from_the_header(tmp_path):
    """400,000 real 28×28 images (a 2 MB gzip): their 299 MiB of uint8 pixels fit in a child
    capped at 1 GiB, the 1.2 GiB float32 copy the loader makes of them does not. Refused from the
    header, one line, exit 2 (it was a MemoryError after reading the whole file)."""
    folder = _images_folder(tmp_path / "big", 400_000)
    path = folder / "train-images-idx3-ubyte.gz"
    assert path.stat().st_size < 5_000_000
    result = run_capped(LOAD_FOLDER_IN_CHILD, folder)
    assert_refused_in_child(
        result,
        str(path),
        "shape (400000, 28, 28) uint8 (299.1 MiB) and its float32 copy (1.2 GiB) need 1.5 GiB",
        "more than the",
        "of memory available",
    )


def test_images_that_fit_with_their_float32_copy_load_under_the_cap(tmp_path):
    """The same loader, 100,000 images: 75 MiB of uint8 and 299 MiB of float32 fit in 1 GiB."""
    folder = _images_folder(tmp_path / "fits", 100_000)
    result = run_capped(LOAD_FOLDER_IN_CHILD, folder)
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    assert result.stdout.strip() == "loaded (100000, 784) float32"


def test_the_float32_copy_is_counted_before_the_payload_is_read(tmp_path, monkeypatch):
    """A limit between the uint8 pixels and the pixels with their float32 copy: refused before any
    payload is allocated, for every way of loading an images folder."""
    folder = _images_folder(tmp_path / "small", 12, image=(4, 3))
    uint8_bytes = 12 * 4 * 3
    monkeypatch.setattr(limits, "memory_limit", lambda: 2 * uint8_bytes)
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated"))
    message = r"shape \(12, 4, 3\) uint8 \(144 bytes\) and its float32 copy \(576 bytes\) need 720 bytes, more"
    for load in (load_idx_folder, lambda f: load_dataset("mnist", data_dir=f, validation=0.25)):
        with pytest.raises(DataError, match=message) as info:
            load(folder)
        assert str(info.value).startswith(str(folder / "train-images-idx3-ubyte.gz"))
    with pytest.raises(DataError, match=message):
        read_idx(folder / "train-images-idx3-ubyte.gz", copies=(("float32 copy", 4),))


def test_a_validation_split_makes_no_copy_of_the_pixels(tmp_path, monkeypatch):
    """The held-out and kept images are scaled straight from the uint8 pixels, a block at a time:
    at most the uint8 pixels and their float32 copy (what the header check counts) are held, split
    or not. (NumPy reports its allocations to tracemalloc.)"""
    import tracemalloc

    import xpnet.data.datasets as datasets

    monkeypatch.setattr(datasets, "_SCALE_BLOCK_BYTES", 1 << 16)
    folder = _images_folder(tmp_path / "split", 20_000)
    pixels = 20_000 * 28 * 28
    plain = load_idx_folder(folder)
    for validation in (0.0, 0.25):
        tracemalloc.start()
        try:
            dataset = load_dataset("mnist", data_dir=folder, validation=validation)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= 5 * pixels + (4 << 20), (validation, peak / pixels)
        if validation:
            assert len(dataset.train) == 15_000 and len(dataset.val) == 5000
            kept, held = split_indices(plain.train.y, 0.25, seed=0, stratify=True)
            np.testing.assert_array_equal(dataset.train.x, plain.train.x[kept])
            np.testing.assert_array_equal(dataset.val.x, plain.train.x[held])
            np.testing.assert_array_equal(dataset.val.y, plain.train.y[held])


def test_a_declared_size_beyond_the_limit_is_refused_before_allocating(tmp_path, monkeypatch):
    paths = [tmp_path / "big.gz", tmp_path / "big"]
    paths[0].write_bytes(gzip.compress(_header((2048, 1024))))
    paths[1].write_bytes(_header((2048, 1024)) + bytes(2 << 20))
    monkeypatch.setattr(limits, "memory_limit", lambda: 1 << 20)
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated"))
    for path in paths:
        with pytest.raises(DataError, match=r"shape \(2048, 1024\) needs 2.0 MiB, more than the 1.0 MiB of memory"):
            read_idx(path)


@pytest.mark.parametrize("compress", [True, False])
def test_streamed_reads_match_the_arrays_written(tmp_path, compress):
    """Multi-byte types come back in native byte order, larger than one read chunk."""
    array = np.arange(3 * 512 * 700, dtype=np.int32).reshape(3, 512, 700) - 5
    path = tmp_path / ("a.gz" if compress else "a")
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(np.int32) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_multi_member_and_zero_padded_gzip_files_read_like_gzip_does(tmp_path):
    data = _header((6,)) + bytes(range(6))
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(data[:5]) + gzip.compress(data[5:]) + bytes(7))
    assert read_idx(path).tolist() == list(range(6))
    path.write_bytes(gzip.compress(data) + b"garbage")
    with pytest.raises(DataError, match="gzip stream is corrupted or truncated"):
        read_idx(path)


@pytest.mark.parametrize(
    "payload, message",
    [(b"abc", r"truncated payload: shape \(5,\) needs 5 bytes of data, found 3"), (b"abcdefg", "extra bytes")],
)
def test_gzip_payload_length_errors(tmp_path, payload, message):
    path = tmp_path / "p.gz"
    path.write_bytes(gzip.compress(_header((5,)) + payload))
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(info.value).startswith(str(path))


# ------------------------------------------------------------------- raw: sizes from stat
def test_a_sparse_100_gib_file_is_refused_without_reading_it(tmp_path):
    """Small declared shape, 100 GiB on disk (sparse): refused from os.stat, in a capped child."""
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_header((10, 28, 28)))
    os.truncate(path, 100 * GIB)
    result = run_capped(READ_IDX_IN_CHILD, path)
    assert_refused_in_child(result, str(path), "extra bytes after the payload", f"found {100 * GIB - 16}")


def test_a_sparse_file_as_large_as_its_huge_shape_is_refused_by_the_limit(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_header((102_400, 1024, 1024)))
    os.truncate(path, 16 + 100 * GIB)
    result = run_capped(READ_IDX_IN_CHILD, path)
    assert_refused_in_child(result, str(path), "needs 100.0 GiB, more than the", "iB of memory available")


# ------------------------------------------------------------------------- empty files
def test_an_idx_file_with_no_examples_is_refused_by_name(tmp_path):
    write_idx(tmp_path / "images", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "labels", np.zeros(0, dtype=np.uint8))
    with pytest.raises(DataError, match="images: holds no examples") as info:
        read_idx_pair(tmp_path / "images", tmp_path / "labels")
    assert str(info.value).startswith(str(tmp_path / "images"))
    write_idx(tmp_path / "images", np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="0 labels for 3 images"):
        read_idx_pair(tmp_path / "images", tmp_path / "labels")


def test_no_examples_cannot_be_split():
    with pytest.raises(DataError, match="no examples to split"):
        split_indices(np.zeros(0, dtype=np.int64), 0.1, stratify=True)
