"""The IDX format of MNIST and its relatives.

An IDX file is big-endian: two zero bytes, a type code (0x08 = uint8, ...), the number of
dimensions d, then d uint32 sizes, then the values row-major. Files may be gzip-compressed.
The reader checks every part of the header and the payload length before returning anything,
and parses with ``numpy.frombuffer`` (no per-byte Python loop).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from .errors import DataError

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


def _read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: the gzip stream is corrupted or truncated ({exc})") from exc


def read_idx(path) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed or raw), after checking its header."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: wrong magic number {data[:4].hex()}: an IDX file starts with two zero bytes")
    code, ndim = data[2], data[3]
    if code not in _TYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x} in the magic number {data[:4].hex()}")
    if ndim == 0:
        raise DataError(f"{path}: the IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header: {ndim} dimensions need {header} bytes, the file has {len(data)}")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _TYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        problem = "truncated payload" if payload < expected else "extra bytes after the payload"
        raise DataError(f"{path}: {problem}: shape {shape} needs {expected} bytes of data, found {payload}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


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


def read_idx_pair(images_path, labels_path, *, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) int64 from two IDX files, checked against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, rows, cols), got {images.dtype} {images.shape}"
        )
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
