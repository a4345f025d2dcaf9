"""The IDX format of MNIST and its relatives.

An IDX file is big-endian: two zero bytes, a type code (0x08 = uint8, ...), the number of
dimensions d, then d uint32 sizes, then the values row-major. Files may be gzip-compressed.

The reader streams: it reads (and inflates) the header alone first, computes the payload size
the header declares, refuses a size beyond the memory limit (``limits.memory_limit``) before
allocating anything (counting the copies the caller says it will make, such as the image
loaders' float32 copy of the pixels), then reads exactly that many bytes into one preallocated
buffer. A raw file's
length is compared with the declared size from ``os.stat`` before any of the payload is read; a
gzip stream is inflated no further than one byte past the declared payload. So neither a lying
header nor a decompression bomb can take more memory than the array it declares.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import zlib

import numpy as np

from . import limits
from .errors import DataError, os_reason

__all__ = ["read_idx", "write_idx", "read_idx_pair"]

_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dtype: code for code, dtype in _TYPES.items()}
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


class _Raw:
    """An uncompressed file: its bytes as they are, and its length (None unless a regular file)."""

    def __init__(self, handle, prefix: bytes):
        self._handle, self._prefix = handle, prefix
        status = os.fstat(handle.fileno())
        self.size = status.st_size if stat.S_ISREG(status.st_mode) else None

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes; fewer only at the end of the file."""
        head, self._prefix = self._prefix[:limit], self._prefix[limit:]
        return head + self._handle.read(limit - len(head))

    def readinto(self, view: memoryview) -> int:
        if self._prefix:
            head = self.read(min(len(view), len(self._prefix)))
            view[: len(head)] = head
            return len(head)
        return self._handle.readinto(view)


class _Gzip:
    """A gzip file inflated on demand: never more output than asked for.

    Members follow one another as in ``gzip.decompress``; zero bytes after the last member are
    padding. Corrupted or truncated streams raise DataError naming the file.
    """

    size = None  # unknown until inflated

    def __init__(self, handle, prefix: bytes, path):
        self._handle, self._input, self._path = handle, prefix, path
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def _corrupted(self, reason):
        return DataError(f"{self._path}: the gzip stream is corrupted or truncated ({reason})")

    def _next_member(self) -> bool:
        """After a member's end: start the next member (True) or find only padding (False)."""
        rest = self._inflate.unused_data.lstrip(b"\0")  # all input after the end; unconsumed_tail repeats it
        while not rest:
            chunk = self._handle.read(_CHUNK)
            if not chunk:
                self._input = b""
                return False
            rest = chunk.lstrip(b"\0")
        self._inflate, self._input = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
        return True

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` inflated bytes (at least one unless at the end of the stream)."""
        if limit <= 0:  # zlib reads a max_length of 0 as "no limit"
            return b""
        try:
            while True:
                if self._inflate.eof and not self._next_member():
                    return b""
                if not self._input:
                    self._input = self._handle.read(_CHUNK)
                at_end = not self._input
                out = self._inflate.decompress(self._input, limit)
                self._input = self._inflate.unconsumed_tail
                if out:
                    return out
                if at_end and not self._inflate.eof:
                    raise self._corrupted("the file ends before the end-of-stream marker")
        except zlib.error as exc:
            raise self._corrupted(exc) from exc

    def readinto(self, view: memoryview) -> int:
        out = self.read(min(len(view), _CHUNK))
        view[: len(out)] = out
        return len(out)


def _open(path, handle):
    """The stream of ``handle``: inflated when the file starts with the gzip magic number."""
    prefix = handle.read(2)
    return _Gzip(handle, prefix, path) if prefix == _GZIP_MAGIC else _Raw(handle, prefix)


def _read_upto(stream, n: int) -> bytes:
    """``n`` bytes, or fewer when the stream ends first."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_header(path, stream) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, the shape and the header's length, every part of the header checked."""
    magic = _read_upto(stream, 4)
    if len(magic) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(magic)} bytes)")
    if magic[0] != 0 or magic[1] != 0:
        raise DataError(f"{path}: wrong magic number {magic.hex()}: an IDX file starts with two zero bytes")
    code, ndim = magic[2], magic[3]
    if code not in _TYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x} in the magic number {magic.hex()}")
    if ndim == 0:
        raise DataError(f"{path}: the IDX header declares 0 dimensions")
    sizes = _read_upto(stream, 4 * ndim)
    header = 4 + 4 * ndim
    if len(sizes) < 4 * ndim:
        have = 4 + len(sizes)
        raise DataError(f"{path}: truncated header: {ndim} dimensions need {header} bytes, the file has {have}")
    shape = tuple(int(n) for n in np.frombuffer(sizes, dtype=">u4"))
    return _TYPES[code], shape, header


def _length_error(path, shape, expected: int, found) -> DataError:
    problem = "truncated payload" if isinstance(found, int) and found < expected else "extra bytes after the payload"
    return DataError(f"{path}: {problem}: shape {shape} needs {expected} bytes of data, found {found}")


def _read_payload(path, stream, dtype, shape, header: int, copies) -> np.ndarray:
    """Exactly the bytes ``shape`` declares into a preallocated buffer, after checking that they
    fit in memory together with the ``copies`` the caller will make of them."""
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if stream.size is not None and stream.size - header != expected:
        raise _length_error(path, shape, expected, stream.size - header)
    if copies:
        made = [(name, count * per_element) for name, per_element in copies]
        limits.check_fits(path, expected, f"shape {shape} {dtype.name}", copies=made)
    else:
        limits.check_fits(path, expected, f"shape {shape}")
    try:
        buffer = np.empty(expected, dtype=np.uint8)
    except MemoryError as exc:
        raise DataError(f"{path}: cannot allocate {limits.format_bytes(expected)} for shape {shape}") from exc
    view, filled = memoryview(buffer), 0
    while filled < expected:
        n = stream.readinto(view[filled:])
        if not n:
            raise _length_error(path, shape, expected, filled)
        filled += n
    if stream.read(1):
        raise _length_error(path, shape, expected, "more than that")
    return buffer


def read_idx(path, *, copies=()) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed or raw), after checking its header, its
    declared size against memory and its payload length.

    ``copies``: what the caller will make of the array, as pairs (description, bytes per
    element), e.g. ``(("float32 copy", 4),)``; they are counted with the payload in the memory
    check, which is made from the header, before any of the payload is read."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({os_reason(exc, path)})") from exc
    try:
        with handle:
            stream = _open(path, handle)
            dtype, shape, header = _read_header(path, stream)
            buffer = _read_payload(path, stream, dtype, shape, header, tuple(copies))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({os_reason(exc, path)})") from exc
    if not dtype.isnative:
        buffer.view(dtype).byteswap(inplace=True)
    return buffer.view(dtype.newbyteorder("=")).reshape(shape)


def write_idx(path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in .gz)."""
    array = np.asarray(array)
    big_endian = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big_endian not in _CODES:
        raise DataError(f"{path}: IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, _CODES[big_endian], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    content = header + array.astype(big_endian, copy=False).tobytes()
    if compress if compress is not None else os.fspath(path).endswith(".gz"):
        content = gzip.compress(content, compresslevel=6)
    with open(path, "wb") as handle:
        handle.write(content)


def read_idx_pair(images_path, labels_path, *, num_classes: int = 10, image_copies=()) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) int64 from two IDX files, checked against each other
    (N ≥ 1, one label per image, each label in 0..num_classes−1).

    ``image_copies``: the copies the caller will make of the images (see ``read_idx``), counted
    in the images file's memory check; the labels' int64 copy is counted in theirs."""
    images = read_idx(images_path, copies=image_copies)
    labels = read_idx(labels_path, copies=(("int64 copy", 8),))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, rows, cols), got {images.dtype} {images.shape}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{images_path}: holds no examples (shape {images.shape})")
    if images.size == 0:
        raise DataError(f"{images_path}: images of shape {images.shape[1:]} hold no pixels")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: expected a vector of integer labels, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {os.path.basename(images_path)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(f"{labels_path}: label {int(bad[0])} is outside 0–{num_classes - 1}")
    return images, labels.astype(np.int64)
