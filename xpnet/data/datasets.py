"""Datasets by name: embedded MNIST and breast cancer, downloaded Fashion-MNIST and KMNIST, and
any folder of IDX files.

A ``Dataset`` holds host (NumPy) arrays split into train / validation / test. Standardization
takes its statistics from the training split only, and a split can only be made before
standardizing, so no statistic of a held-out example leaks into training through this API.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import io
import math
import numbers
import os
from pathlib import Path

import numpy as np

from .download import cache_dir, download, md5_of
from .errors import DataError, os_reason, shown
from .idx import read_idx_pair
from .preprocess import _PIXEL_SCALE, _standardization_stats, checked_seed, scale_pixels, split_indices

__all__ = [
    "Split",
    "Dataset",
    "load_dataset",
    "load_idx_folder",
    "load_wdbc",
    "read_table",
    "DATASETS",
    "IDX_FILES",
    "NAMES",
]

#: The four standard IDX file names; each may also end in .gz.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class Split:
    """Examples x (N, ...) and targets y (N,) of one part of a dataset."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, indices) -> Split:
        return Split(self.x[indices], self.y[indices])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named dataset split into train, optional validation, and test (host arrays).

    ``task`` is "multiclass" (integer labels 0..C−1, softmax cross-entropy) or "binary"
    (labels 0/1, binary cross-entropy on one output).
    """

    name: str
    train: Split
    test: Split
    val: Split | None = None
    classes: tuple[str, ...] = ()
    task: str = "multiclass"
    image_shape: tuple[int, ...] | None = None
    standardization: tuple[np.ndarray, np.ndarray] | None = None
    feature_names: tuple[str, ...] = ()

    @property
    def num_features(self) -> int:
        return int(np.prod(self.train.x.shape[1:]))

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "binary" else len(self.classes)

    def with_validation(self, fraction: float, *, seed: int = 0, stratify: bool = False) -> Dataset:
        """Hold out ``fraction`` of the training split as validation (seeded permutation)."""
        if self.val is not None:
            raise DataError(f"{self.name} already has a validation split of {len(self.val)} examples")
        if self.standardization is not None:
            raise DataError("split before standardizing: the statistics must come from the training split alone")
        kept, held = split_indices(self.train.y, fraction, seed=seed, stratify=stratify)
        return dataclasses.replace(self, train=self.train.take(kept), val=self.train.take(held))

    def standardized(self, *, without_validation: bool = False) -> Dataset:
        """Every split standardized with the training split's per-feature mean and std.

        Split off the validation examples first (``with_validation``): statistics taken before
        the split would include them. ``without_validation=True`` says that no validation split
        will be made from this training data.
        """
        if self.standardization is not None:
            raise DataError(f"{self.name} is standardized already")
        if self.val is None and not without_validation:
            raise DataError(
                f"{self.name} has no validation split yet: call with_validation() before standardized(), "
                "or standardized(without_validation=True) if there will be none"
            )
        mean, std = _standardization_stats(self.train.x)

        def apply(split):
            return None if split is None else Split(((split.x - mean) / std).astype(np.float32), split.y)

        return dataclasses.replace(
            self, train=apply(self.train), val=apply(self.val), test=apply(self.test), standardization=(mean, std)
        )

    def summary(self) -> str:
        parts = [f"train {len(self.train)}"]
        if self.val is not None:
            parts.append(f"validation {len(self.val)}")
        parts.append(f"test {len(self.test)}")
        return f"{self.name}: {', '.join(parts)}; {self.num_features} features, {len(self.classes)} classes"


@dataclasses.dataclass(frozen=True)
class _Options:
    """How image sets are prepared: flattened or not, and a validation split made from the uint8
    pixels as they are scaled (no copy of the pixels is made for it)."""

    flatten: bool = True
    validation: float = 0.0
    seed: int = 0
    stratify: bool = True


#: What an image loader makes of an images file: the float32 copy of its pixels. Counted with
#: the uint8 pixels in the file's memory check, from its header (``read_idx``).
_FLOAT32_COPY = (("float32 copy", 4),)

#: The uint8 pixels gathered at a time when a split is scaled (a block of rows, copied once).
_SCALE_BLOCK_BYTES = 1 << 24


def _scaled(path, images: np.ndarray, rows=None) -> np.ndarray:
    """float32 pixels in [0, 1] of ``images[rows]`` (all of them when ``rows`` is None), the
    values of ``scale_pixels``. A selection is gathered a block of rows at a time into the float32
    result, so the loader holds no more than the uint8 pixels and their float32 copy, the two
    sizes the header check counted."""
    if rows is None:
        try:
            return scale_pixels(images)
        except MemoryError as exc:
            raise DataError(f"{path}: cannot allocate the float32 copy of images of shape {images.shape}") from exc
    try:
        out = np.empty((rows.shape[0], *images.shape[1:]), dtype=np.float32)
    except MemoryError as exc:
        raise DataError(f"{path}: cannot allocate the float32 copy of {rows.shape[0]} images") from exc
    per_block = max(1, _SCALE_BLOCK_BYTES // max(1, math.prod(images.shape[1:])))
    for start in range(0, rows.shape[0], per_block):
        stop = min(start + per_block, rows.shape[0])
        np.multiply(images[rows[start:stop]], _PIXEL_SCALE, out=out[start:stop], dtype=np.float32)
    return out


def _images_dataset(name, paths: dict, classes, options: _Options) -> Dataset:
    """A dataset from the four IDX files in ``paths`` (keyed as IDX_FILES). The training images are
    read, split and scaled first and their uint8 pixels let go; then the test images are read, so
    the two files' uint8 pixels are never held together."""
    classes = tuple(classes)

    def split(images, labels, rows, path):
        x = _scaled(path, images, rows)
        return Split(x.reshape(x.shape[0], -1) if options.flatten else x, labels if rows is None else labels[rows])

    def read(images_key, labels_key):
        return read_idx_pair(paths[images_key], paths[labels_key], num_classes=len(classes), image_copies=_FLOAT32_COPY)

    images, labels = read("train_images", "train_labels")
    shape = tuple(images.shape[1:])
    val = None
    if options.validation:
        kept, held = split_indices(labels, options.validation, seed=options.seed, stratify=options.stratify)
        val = split(images, labels, held, paths["train_images"])
        train = split(images, labels, kept, paths["train_images"])
    else:
        train = split(images, labels, None, paths["train_images"])
    del images, labels  # the training pixels as uint8: not needed while the test images are read
    test_images, test_labels = read("test_images", "test_labels")
    if tuple(test_images.shape[1:]) != shape:
        raise DataError(f"{name}: training images are {shape} but test images are {tuple(test_images.shape[1:])}")
    return Dataset(
        name=name,
        train=train,
        test=split(test_images, test_labels, None, paths["test_images"]),
        val=val,
        classes=classes,
        image_shape=shape,
    )


def _checked_path(path, name: str, *, optional: bool = True):
    """``path`` as given when it is a str or path (or None, when ``optional``): TypeError naming
    ``name`` for another type, DataError for an empty string (which would read the current folder)."""
    if path is None and optional:
        return None
    if not isinstance(path, (str, os.PathLike)):
        allowed = "a str or path, or None" if optional else "a str or path"
        raise TypeError(f"{name} must be {allowed}, got {shown(path)}")
    if os.fspath(path) in ("", b""):
        raise DataError(f"{name} is an empty string: name a folder (or file), or leave it out (None)")
    return path


def _folder_entries(folder: Path) -> set[str]:
    """The names in ``folder``; DataError naming the folder and the reason when it is not one or
    cannot be listed (never a raw PermissionError or NotADirectoryError)."""
    try:
        return set(os.listdir(folder))
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: not a folder (no such file or directory)") from exc
    except NotADirectoryError as exc:
        raise DataError(f"{folder}: not a folder ({os_reason(exc, folder)})") from exc
    except OSError as exc:
        raise DataError(f"{folder}: cannot read the folder ({os_reason(exc, folder)})") from exc


def _find_idx(folder: Path, entries: set[str], stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if name in entries:
            return folder / name
    raise DataError(f"{folder}: no {stem} or {stem}.gz (an IDX dataset folder holds {', '.join(IDX_FILES.values())})")


def load_idx_folder(
    folder, *, name: str | None = None, classes=None, flatten: bool = True, options: _Options | None = None
) -> Dataset:
    """A dataset from a folder with the four standard IDX files (gz or raw), read as they are:
    no checksums, nothing written."""
    options = options or _Options(flatten=flatten)
    folder = Path(_checked_path(folder, "folder", optional=False))
    entries = _folder_entries(folder)
    paths = {key: _find_idx(folder, entries, stem) for key, stem in IDX_FILES.items()}
    return _images_dataset(name or folder.name, paths, classes or [str(i) for i in range(10)], options)


@dataclasses.dataclass(frozen=True)
class Remote:
    """A downloadable IDX dataset: mirrors (tried in order) and the MD5 of each .gz file."""

    mirrors: tuple[str, ...]
    md5: dict
    classes: tuple[str, ...]


DATASETS = {
    "fashion-mnist": Remote(
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # S3 websites serve HTTP only; MD5 guards
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "kmnist": Remote(
        mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        md5={
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}


def _check_published(name: str, folder: Path, filename: str, md5: str) -> None:
    """A user's copy of a published file must have its MD5; a mismatch is reported, the file left."""
    path = folder / filename
    try:
        actual = md5_of(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({os_reason(exc, path)})") from exc
    if actual != md5:
        raise DataError(
            f"{path}: MD5 {actual}, expected {md5} (the published {filename} of {name}); the file was left "
            f"untouched. To load {folder} anyway as a plain IDX folder, without checksums (classes named 0-9): "
            f"--dataset mnist --data-dir {folder}, or load_dataset('mnist', data_dir=...) in Python"
        )


def _check_user_folder(name: str, remote: Remote, folder: Path) -> None:
    """A folder the user names is read, never written: every file must be there already, each .gz
    with the published MD5 (an uncompressed file is checked by the IDX reader alone)."""
    entries = _folder_entries(folder)
    missing = [
        f"{filename} or {filename.removesuffix('.gz')}"
        for filename in remote.md5
        if filename not in entries and filename.removesuffix(".gz") not in entries
    ]
    if missing:
        raise DataError(
            f"{folder}: no {', '.join(missing)} for {name}. xpnet reads a folder given with --data-dir "
            f"(data_dir=) as it is and never downloads into it; without --data-dir xpnet downloads {name} "
            f"into its cache, {cache_dir() / name}"
        )
    for filename, md5 in remote.md5.items():
        if filename in entries:
            _check_published(name, folder, filename, md5)


def _load_remote(name: str, data_dir, options: _Options) -> Dataset:
    """From the folder the user names (checked, never modified), else from xpnet's cache, where
    missing or corrupted files are downloaded."""
    remote = DATASETS[name]
    if data_dir is not None:
        folder = Path(data_dir)
        _check_user_folder(name, remote, folder)
        return load_idx_folder(folder, name=name, classes=remote.classes, options=options)
    folder = cache_dir() / name
    entries = _folder_entries(folder) if os.path.isdir(folder) else set()
    for filename, md5 in remote.md5.items():
        if filename.removesuffix(".gz") in entries and filename not in entries:
            continue  # uncompressed files put there by hand: the IDX reader checks them
        download([mirror + filename for mirror in remote.mirrors], folder / filename, md5)
    return load_idx_folder(folder, name=name, classes=remote.classes, options=options)


def _embedded(*parts) -> Path:
    resource = importlib.resources.files("xpnet.data").joinpath("files", *parts)
    path = Path(str(resource))
    if not path.is_file():
        raise DataError(f"the embedded file {'/'.join(parts)} is missing from the installed package ({path})")
    return path


def _load_mnist(options: _Options) -> Dataset:
    paths = {key: _embedded("mnist", f"{stem}.gz") for key, stem in IDX_FILES.items()}
    return _images_dataset("mnist", paths, [str(i) for i in range(10)], options)


def _read_text(path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({os_reason(exc, path)})") from exc
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from exc


def _check_header(path, header: list[str], target: str) -> None:
    """Every column named, no name twice (a repeated target would leak it in as a feature)."""
    for i, name in enumerate(header, start=1):
        if not name.strip():
            raise DataError(f"{path}: column {i} of the header has no name")
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: the header names the column {name!r} twice")
        seen.add(name)
    if target not in header:
        raise DataError(f"{path}: no column named {target!r} in the header")


def read_table(path, target: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """A numeric CSV (UTF-8) with a header: features (N, F) float32, the ``target`` column, the
    feature names. Refused: a header with an unnamed or repeated column, a row of another width,
    a value that is not a finite number."""
    try:
        rows = list(csv.reader(io.StringIO(_read_text(path), newline="")))
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV table ({exc})") from exc
    if len(rows) < 2:
        raise DataError(f"{path}: no data rows under the header")
    header, body = rows[0], rows[1:]
    _check_header(path, header, target)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
    try:
        table = np.array(body, dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path}: a value is not a number ({exc})") from exc
    if not np.all(np.isfinite(table)):
        line = int(np.flatnonzero(~np.all(np.isfinite(table), axis=1))[0]) + 2
        raise DataError(f"{path}, line {line}: NaN or infinite value")
    column = header.index(target)
    features = np.delete(table, column, axis=1).astype(np.float32)
    names = tuple(name for i, name in enumerate(header) if i != column)
    return features, table[:, column], names


def load_wdbc(path=None, *, seed: int = 0) -> Dataset:
    """Breast Cancer Wisconsin (Diagnostic): 569 × 30, target ``malignant`` (1) vs benign (0).

    The default split is seeded and stratified: 341 train / 114 validation / 114 test.
    """
    path = _checked_path(path, "path")
    seed = checked_seed(seed)
    path = _embedded("wdbc.csv") if path is None else path
    x, target, names = read_table(path, "malignant")
    if not np.all((target == 0) | (target == 1)):
        raise DataError(f"{path}: the 'malignant' column must hold 0 or 1")
    y = target.astype(np.int64)
    rest, test = split_indices(y, 114 / 569, seed=seed, stratify=True)
    train, val = split_indices(y[rest], 114 / 455, seed=seed + 1, stratify=True)
    everything = Split(x, y)
    return Dataset(
        name="wdbc",
        train=everything.take(rest[train]),
        val=everything.take(rest[val]),
        test=everything.take(test),
        classes=("benign", "malignant"),
        task="binary",
        feature_names=names,
    )


NAMES = ("mnist", "wdbc", "fashion-mnist", "kmnist")


def load_dataset(
    name: str = "mnist",
    *,
    data_dir=None,
    flatten: bool = True,
    seed: int = 0,
    validation: float = 0.0,
    stratify: bool = True,
) -> Dataset:
    """A dataset by name: 'mnist' and 'wdbc' ship with xpnet; 'fashion-mnist' and 'kmnist' are
    downloaded on first use into xpnet's cache ($XPNET_DATA_DIR/NAME, else the user cache).

    A ``data_dir`` is read as it is and never written to: nothing is downloaded into it. With name
    'mnist' its four IDX files are read without checksums (any IDX folder); with 'fashion-mnist'
    or 'kmnist' each .gz there must have the published MD5.
    Images come as float32 in [0, 1], flattened to (N, H·W) unless ``flatten=False``.
    ``validation``: the fraction of the training images held out (seeded by ``seed``, stratified
    unless told otherwise), split from the uint8 pixels as they are scaled (no extra copy); the
    same split as ``with_validation``. 'wdbc' has its own fixed split (seeded by ``seed``).
    An images file is refused from its header when its uint8 pixels and their float32 copy
    would not fit in the memory available (``xpnet.data.limits.memory_limit``).
    Refused by name: a ``name`` that is not a str (TypeError), a ``data_dir`` that is not a str or
    path (TypeError) or is an empty string, a ``seed`` that is not a non-negative integer, a
    ``validation`` outside [0, 1) (ValueError; DataError is one).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name, a str ({', '.join(NAMES)}), got {shown(name)}")
    data_dir = _checked_path(data_dir, "data_dir")
    seed = checked_seed(seed)
    if isinstance(validation, bool) or not isinstance(validation, numbers.Real) or not 0 <= validation < 1:
        raise ValueError(f"validation must be a fraction in [0, 1) (0 for none), got {shown(validation)}")
    key = name.lower()
    if key == "wdbc":
        if validation:
            raise DataError("wdbc comes split 341/114/114 already: give no validation fraction")
        return load_wdbc(Path(data_dir) / "wdbc.csv" if data_dir is not None else None, seed=seed)
    options = _Options(flatten=flatten, validation=validation, seed=seed, stratify=stratify)
    if key in DATASETS:
        return _load_remote(key, data_dir, options)
    if key == "mnist":
        if data_dir is not None:
            return load_idx_folder(data_dir, name="mnist", options=options)
        return _load_mnist(options)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}, or give an IDX folder")
