"""What ``xpnet predict`` reads: images of any size and format Pillow reads, made to look like
MNIST, and .npy arrays of rows.

Both are checked before memory is taken: an image's pixel count from its header (before
anything is decoded), an array's dtype, shape and size from its .npy header against the file's
length and the memory limit (``xpnet.data.limits``). Every problem is one ``CLIError`` line
naming the file.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from xpnet.data import DataError, limits

from .run import CLIError

#: The most pixels an input image may have (width × height), checked before decoding: 50 megapixels.
MAX_PIXELS = 50_000_000


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise CLIError("reading images needs Pillow: pip install pillow") from exc
    return Image, UnidentifiedImageError


def _too_many_pixels(count: int) -> str:
    return f"{count:,} pixels, more than the {MAX_PIXELS:,} (50 megapixels) an input image may have"


def _check_pixels(path, size: tuple[int, int]) -> None:
    """Refuse an image whose header claims more than MAX_PIXELS, before it is decoded."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise CLIError(f"{path}: {width} × {height} = {_too_many_pixels(width * height)}")


def _bomb_message(path, exc: Exception) -> str:
    """Pillow's DecompressionBombError as one line with the pixel count it names."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return f"{path}: refused as a possible decompression bomb ({exc})"
    count = int(found.group(1))
    return f"{path}: {_too_many_pixels(count)} (Pillow refused it as a possible decompression bomb)"


def load_image(path, shape) -> np.ndarray:
    """A float32 image in [0, 1] of ``shape``: grayscale, resized, light strokes on a dark ground.

    MNIST digits are white on black; a photo or drawing of a dark digit on light paper (a bright
    image on average) is inverted to match. An image of more than MAX_PIXELS is refused from
    its header, whatever Pillow's own limit (Image.MAX_IMAGE_PIXELS) is set to.
    """
    Image, UnidentifiedImageError = _pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own limit
            with Image.open(path) as image:
                _check_pixels(path, image.size)
                gray = image.convert("L").resize((shape[1], shape[0]), Image.Resampling.LANCZOS)
    except Image.DecompressionBombError as exc:
        raise CLIError(_bomb_message(path, exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError, zlib.error) as exc:
        raise CLIError(f"{path}: not an image Pillow can read ({exc})") from exc
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    return 1.0 - pixels if pixels.mean() > 0.5 else pixels


# ------------------------------------------------------------------------------- arrays
_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def _read_npy_header(path, handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a .npy header; the handle is left at the data."""
    if handle.read(2) == b"PK":
        raise CLIError(
            f"{path}: an .npz archive (a zip of arrays), not a .npy array: "
            "save the one array of rows with np.save instead"
        )
    handle.seek(0)
    try:
        version = npy_format.read_magic(handle)
    except ValueError as exc:
        raise CLIError(f"{path}: not a .npy file (it does not start with the .npy magic string)") from exc
    if version not in _HEADER_READERS:
        raise CLIError(f"{path}: .npy format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
    try:
        return _HEADER_READERS[version](handle)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise CLIError(f"{path}: the .npy header cannot be read ({exc})") from exc


def _check_shape(path, shape) -> None:
    """Every dimension a non-negative int: NumPy's header reader lets a negative one (or a bool)
    through, and the size computed from it would be nonsense ("needs -120 bytes")."""
    for dimension in shape:
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 0:
            raise CLIError(
                f"{path}: the .npy header declares shape {shape}: dimension {dimension!r} is not a non-negative integer"
            )


def _check_dtype(path, dtype: np.dtype) -> None:
    """Only real numbers: bool, integer or float (complex would lose its imaginary part)."""
    if dtype.hasobject:
        raise CLIError(f"{path}: dtype {dtype} holds Python objects (stored pickled, never unpickled here)")
    if dtype.names is not None or dtype.subdtype is not None:
        raise CLIError(f"{path}: dtype {dtype} is structured (named fields); save one plain array of rows")
    if dtype.kind == "c":
        raise CLIError(
            f"{path}: dtype {dtype} is complex; the model takes real numbers, and converting would drop "
            "the imaginary part"
        )
    if dtype.kind not in "biuf":
        raise CLIError(f"{path}: dtype {dtype} is not numbers the model takes (bool, integer or float)")


def _check_size(path, shape, dtype: np.dtype, num_features: int, available: int) -> int:
    """The declared number of bytes, checked against the file's length, the row width and memory."""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    what = f"shape {shape} {dtype}"
    if available != nbytes:
        problem = "truncated" if available < nbytes else "extra bytes after the array"
        raise CLIError(f"{path}: {problem}: {what} needs {nbytes} bytes of data, the file has {available}")
    if count == 0:
        raise CLIError(f"{path}: holds no values (shape {shape})")
    if count % num_features:
        raise CLIError(f"{path}: shape {shape} does not divide into rows of {num_features} features")
    converted = 0 if dtype == np.dtype(np.float32) else count * 4  # the float32 copy
    try:
        limits.check_fits(path, nbytes + converted, what)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    return nbytes


def _read_exactly(path, handle, nbytes: int) -> np.ndarray:
    try:
        buffer = np.empty(nbytes, dtype=np.uint8)
    except MemoryError as exc:
        raise CLIError(f"{path}: cannot allocate {limits.format_bytes(nbytes)} for the array") from exc
    view, filled = memoryview(buffer), 0
    while filled < nbytes:
        n = handle.readinto(view[filled:])
        if not n:
            raise CLIError(f"{path}: truncated: the file ended after {filled} of {nbytes} bytes of data")
        filled += n
    return buffer


def _check_finite(path, rows: np.ndarray, array: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(rows))
    if not bad.size:
        return
    row, column = divmod(int(bad[0]), rows.shape[1])
    value = array[np.unravel_index(int(bad[0]), array.shape)]
    if np.isfinite(value):
        raise CLIError(f"{path}: the value {value} at row {row}, column {column} is beyond the float32 range (±3.4e38)")
    raise CLIError(f"{path}: contains NaN or infinite values (first at row {row}, column {column})")


def load_array(path, num_features: int) -> np.ndarray:
    """Rows (N, num_features) float32 from a .npy file, everything checked from the header first.

    Refused: a file that is not .npy (an .npz archive is named as one), a dimension that is not
    a non-negative integer, a dtype that is not bool, integer or float, a data size other than
    the header declares (truncated or extra bytes), more than the memory limit, no values, a size
    that does not divide into rows of ``num_features``, NaN or infinite values. uint8 pixels
    become float32 / 255; bool, integer and float arrays become float32.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            shape, fortran, dtype = _read_npy_header(path, handle)
            _check_shape(path, shape)
            _check_dtype(path, dtype)
            available = os.fstat(handle.fileno()).st_size - handle.tell()
            nbytes = _check_size(path, shape, dtype, num_features, available)
            buffer = _read_exactly(path, handle, nbytes)
    except OSError as exc:
        raise CLIError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    values = buffer.view(dtype)
    array = values.reshape(shape[::-1]).transpose() if fortran else values.reshape(shape)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, reported below
        rows = array.astype(np.float32, order="C", copy=False).reshape(-1, num_features)
    if dtype == np.uint8:
        np.divide(rows, np.float32(255.0), out=rows)
    _check_finite(path, rows, array)
    return rows
