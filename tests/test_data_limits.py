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

from xpnet.data import DataError, limits, read_idx, read_idx_pair, split_indices, write_idx
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
def test_memory_limit_is_the_smaller_of_memory_and_rlimit_as():
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < memory_limit() <= physical
    result = run_capped("from xpnet.data.limits import memory_limit\nprint(memory_limit())")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == min(GIB, physical)


def test_sizes_are_written_in_human_units(monkeypatch):
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(10_000_000 * 28 * 28) == "7.3 GiB"
    monkeypatch.setattr(limits, "memory_limit", lambda: GIB)
    check_fits("f.idx", GIB, "shape (9,)")  # exactly the limit fits
    with pytest.raises(DataError, match=r"^f.idx: shape \(9,\) needs 2.0 GiB, more than the 1.0 GiB of memory"):
        check_fits("f.idx", 2 * GIB, "shape (9,)")


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
        result, str(path), "shape (10000000, 28, 28) needs 7.3 GiB, more than the 1.0 GiB of memory available"
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
    assert_refused_in_child(result, str(path), "needs 100.0 GiB, more than the 1.0 GiB of memory available")


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
