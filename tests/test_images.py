"""What ``xpnet predict`` reads (cli/images.py): images checked for their pixel count before
anything is decoded, and .npy arrays checked from their header before anything is allocated."""

from __future__ import annotations

import re
import struct
import zipfile
import zlib

import numpy as np
import pytest
from test_data_limits import assert_refused_in_child, run_capped
from xpnet.cli.images import MAX_PIXELS, load_array, load_image
from xpnet.cli.run import CLIError

from xpnet.data import limits

Image = pytest.importorskip("PIL.Image")


# ------------------------------------------------------------------------------- images
def _png_claiming(path, width: int, height: int):
    """A real 2×2 PNG whose IHDR is patched to claim width × height (with a correct CRC)."""
    Image.new("L", (2, 2), 128).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_a_normal_image_still_loads(tmp_path):
    Image.new("L", (90, 60), 20).save(tmp_path / "dark.png")
    pixels = load_image(tmp_path / "dark.png", (28, 28))
    assert pixels.shape == (28, 28) and pixels.dtype == np.float32
    assert pixels.max() == pytest.approx(20 / 255, abs=1e-3)


def test_a_decompression_bomb_is_one_line_naming_the_pixel_count(tmp_path):
    path = _png_claiming(tmp_path / "bomb.png", 10**6, 10**6)
    with pytest.raises(CLIError) as info:
        load_image(path, (28, 28))
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "1,000,000,000,000 pixels" in text and "\n" not in text
    assert info.value.code == 2


@pytest.mark.parametrize("size", [(10**6, 10**6), (10_000, 6_000)])
def test_the_pixel_count_is_checked_before_decoding(tmp_path, monkeypatch, size):
    """With Pillow's own limit off (and below it: 60 megapixels), nothing is decoded."""
    path = _png_claiming(tmp_path / "big.png", *size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    width, height = size
    with pytest.raises(CLIError) as info:
        load_image(path, (28, 28))
    assert str(info.value) == (
        f"{path}: {width} × {height} = {width * height:,} pixels, more than the {MAX_PIXELS:,} (50 megapixels) "
        "an input image may have"
    )


# ------------------------------------------------------------------------------- arrays
def test_arrays_become_float32_rows(tmp_path):
    cases = {
        "u8": (np.array([[0, 51, 255, 102]], dtype=np.uint8), [[0.0, 0.2, 1.0, 0.4]]),
        "bool": (np.array([True, False, True, True]), [[1.0, 0.0, 1.0, 1.0]]),
        "i64": (np.arange(8, dtype=np.int64).reshape(2, 2, 2), [[0, 1, 2, 3], [4, 5, 6, 7]]),
        "f64": (np.array([0.5, -1.0, 2.0, 3.0]), [[0.5, -1.0, 2.0, 3.0]]),
        "big_endian": (np.array([1.5, 2, 3, 4], dtype=">f4"), [[1.5, 2, 3, 4]]),
        "fortran": (np.asfortranarray(np.arange(8.0).reshape(2, 4)), [[0, 1, 2, 3], [4, 5, 6, 7]]),
    }
    for name, (array, expected) in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        rows = load_array(tmp_path / f"{name}.npy", 4)
        assert rows.dtype == np.float32 and rows.shape == (len(expected), 4), name
        np.testing.assert_allclose(rows, expected, rtol=1e-6, err_msg=name)


def _refused(path, num_features, pattern):
    with pytest.raises(CLIError, match=pattern) as info:
        load_array(path, num_features)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_an_npz_archive_named_npy_is_named(tmp_path):
    path = tmp_path / "rows.npy"
    np.savez(path.with_suffix(".npz"), rows=np.zeros((2, 4)))
    path.write_bytes(path.with_suffix(".npz").read_bytes())
    assert zipfile.is_zipfile(path)
    _refused(path, 4, r"an \.npz archive")
    path.write_bytes(b"plain text, no array")
    _refused(path, 4, r"not a \.npy file")


@pytest.mark.parametrize(
    "array",
    [
        np.array([1 + 2j, 3, 4, 5]),
        np.array(["a", "b", "c", "d"]),
        np.array([b"a", b"b", b"c", b"d"]),
        np.zeros(4, dtype=[("x", "f4"), ("y", "f4")]),
        np.array(["2020-01-01"] * 4, dtype="datetime64[D]"),
        np.array([1, 2, 3, 4], dtype="timedelta64[s]"),
    ],
    ids=["complex", "str", "bytes", "structured", "datetime", "timedelta"],
)
def test_arrays_that_are_not_real_numbers_are_named_by_dtype(tmp_path, array):
    """Complex is refused too: converting it would silently drop the imaginary part."""
    path = tmp_path / "rows.npy"
    np.save(path, array)
    _refused(path, 4, "dtype " + re.escape(str(array.dtype)) + " ")


def test_object_arrays_are_refused_without_unpickling(tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "rows.npy"
    np.save(path, np.array([1, "x", None, 2.0], dtype=object), allow_pickle=True)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    _refused(path, 4, r"dtype object holds Python objects")


def test_npy_versions_and_extra_bytes(tmp_path):
    path = tmp_path / "rows.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, np.arange(8, dtype=np.int16).reshape(2, 4), version=(2, 0))
    assert load_array(path, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    path.write_bytes(path.read_bytes() + b"\0\0")
    _refused(path, 4, r"extra bytes after the array: shape \(2, 4\) int16 needs 16 bytes of data, the file has 18")
    data = bytearray(path.read_bytes())
    data[6:8] = b"\x04\x00"
    path.write_bytes(bytes(data))
    _refused(path, 4, r"\.npy format version 4\.0 is not supported")


def test_a_truncated_array_is_named(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, np.zeros((10, 4), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-8])
    _refused(path, 4, r"truncated: shape \(10, 4\) float32 needs 160 bytes of data, the file has 152")


def test_rows_of_the_wrong_width_and_bad_values_are_named(tmp_path):
    np.save(tmp_path / "odd.npy", np.zeros(5))
    _refused(tmp_path / "odd.npy", 784, r"shape \(5,\) does not divide into rows of 784 features")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [0.0, 1.0]]))
    _refused(tmp_path / "nan.npy", 2, r"contains NaN or infinite values \(first at row 0, column 1\)")
    np.save(tmp_path / "huge.npy", np.array([1e300, 0.0]))
    _refused(tmp_path / "huge.npy", 2, r"beyond the float32 range")
    np.save(tmp_path / "empty.npy", np.zeros((0, 2)))
    _refused(tmp_path / "empty.npy", 2, r"holds no values")


def test_an_array_beyond_the_memory_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    np.save(tmp_path / "rows.npy", np.zeros((64, 1024), dtype=np.float32))
    monkeypatch.setattr(limits, "memory_limit", lambda: 1 << 17)
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated"))
    _refused(tmp_path / "rows.npy", 1024, r"needs 256.0 KiB, more than the 128.0 KiB of memory available")


LOAD_ARRAY_IN_CHILD = """
import sys
from xpnet.cli.images import load_array
from xpnet.cli.run import CLIError
try:
    rows = load_array(sys.argv[1], 784)
except CLIError as exc:
    print(exc)
    sys.exit(2)
print("read", rows.shape)
"""


def _npy_header(shape, descr="<f4") -> bytes:
    """A version 1.0 .npy header declaring ``shape`` (no data follows)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def test_a_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    """(10**12, 784) claimed by a 128-byte file; (10**6, 784) float64 in a sparse 5.8 GiB file:
    both refused from the header in a child capped at 1 GiB of address space."""
    claimed = tmp_path / "claimed.npy"
    claimed.write_bytes(_npy_header((10**12, 784)))
    assert_refused_in_child(run_capped(LOAD_ARRAY_IN_CHILD, claimed), str(claimed), "truncated")
    sparse = tmp_path / "sparse.npy"
    sparse.write_bytes(_npy_header((10**6, 784), "<f8"))
    with open(sparse, "r+b") as handle:
        handle.truncate(len(_npy_header((10**6, 784), "<f8")) + 10**6 * 784 * 8)
    result = run_capped(LOAD_ARRAY_IN_CHILD, sparse)
    assert_refused_in_child(result, str(sparse), "needs", "iB of memory available")


@pytest.mark.parametrize(
    "shape, shown",
    [((-30, 1), r"-30"), ((2, -784), r"-784"), ((True, 784), r"True"), ((-1, -784), r"-1")],
)
def test_a_header_with_a_negative_or_non_integer_dimension_is_named(tmp_path, shape, shown):
    """NumPy's header reader lets a negative (or bool) dimension through; the size it gives is
    nonsense ("needs -120 bytes"): refused by name, before the size is computed."""
    path = tmp_path / "bad.npy"
    path.write_bytes(_npy_header(shape) + bytes(16))
    _refused(path, 784, rf"the \.npy header declares shape \(.*\): dimension {shown} is not a non-negative integer")


def test_a_header_with_a_float_dimension_is_named(tmp_path):
    path = tmp_path / "float.npy"
    path.write_bytes(_npy_header((2.0, 784)) + bytes(16))
    _refused(path, 784, r"the \.npy header cannot be read \(shape is not valid: \(2\.0, 784\)\)")
