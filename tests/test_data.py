"""IDX reading, the embedded datasets, splits and preprocessing (host-side, NumPy)."""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import pytest

from xpnet.data import (
    DataError,
    load_dataset,
    load_idx_folder,
    one_hot,
    read_idx,
    read_idx_pair,
    read_table,
    scale_pixels,
    split_indices,
    write_idx,
)
from xpnet.data.datasets import _embedded

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx_folder(folder, n_train=12, n_test=5, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if compress else ""
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 4, 3), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 4, 3), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test).astype(np.uint8),
    }
    for stem, array in data.items():
        write_idx(folder / f"{stem}{suffix}", array)
    return data


# ------------------------------------------------------------------------------- IDX reader
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, dtype, compress):
    array = (np.arange(60).reshape(3, 4, 5) - 20).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 4, 5)
    np.testing.assert_array_equal(back, array)


def _raw_idx(header: bytes, payload: bytes, tmp_path, name="bad-idx1-ubyte"):
    path = tmp_path / name
    path.write_bytes(header + payload)
    return path


@pytest.mark.parametrize(
    "header, payload, message",
    [
        (bytes([0, 1, 8, 1]) + (3).to_bytes(4, "big"), b"abc", "wrong magic number 00010801"),
        (bytes([0, 0, 0x42, 1]) + (3).to_bytes(4, "big"), b"abc", "unknown IDX type code 0x42"),
        (bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big"), b"abc", r"truncated payload: shape \(5,\) needs 5 bytes"),
        (bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big"), b"abc", "extra bytes after the payload"),
        (bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big"), b"", "truncated header: 3 dimensions need 16 bytes"),
        (bytes([0, 0, 8, 0]), b"", "declares 0 dimensions"),
        (b"\x00\x00", b"", "too short for an IDX header"),
    ],
)
def test_idx_errors_name_the_file_and_the_problem(tmp_path, header, payload, message):
    path = _raw_idx(header, payload, tmp_path)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(info.value).startswith(str(path))


def test_truncated_gzip_is_reported(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, np.zeros((50, 50), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="gzip stream is corrupted or truncated"):
        read_idx(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="cannot read the file"):
        read_idx(tmp_path / "nothing.gz")


def test_image_and_label_counts_must_agree(tmp_path):
    write_idx(tmp_path / "images", np.zeros((4, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "labels", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match="3 labels for 4 images"):
        read_idx_pair(tmp_path / "images", tmp_path / "labels")


def test_labels_must_be_digits(tmp_path):
    write_idx(tmp_path / "images", np.zeros((3, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "labels", np.array([1, 12, 3], dtype=np.uint8))
    with pytest.raises(DataError, match="label 12 is outside 0–9"):
        read_idx_pair(tmp_path / "images", tmp_path / "labels")


def test_images_must_be_three_dimensional(tmp_path):
    write_idx(tmp_path / "images", np.zeros((3, 4), dtype=np.uint8))
    write_idx(tmp_path / "labels", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match=r"shape \(N, rows, cols\)"):
        read_idx_pair(tmp_path / "images", tmp_path / "labels")


# ---------------------------------------------------------------------------- IDX folders
@pytest.mark.parametrize("compress", [True, False])
def test_any_idx_folder_loads(tmp_path, compress):
    data = _idx_folder(tmp_path, compress=compress)
    ds = load_idx_folder(tmp_path, flatten=False)
    assert ds.name == tmp_path.name
    assert ds.train.x.shape == (12, 4, 3) and ds.train.x.dtype == np.float32
    np.testing.assert_allclose(ds.train.x, data["train-images-idx3-ubyte"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.test.y, data["t10k-labels-idx1-ubyte"])
    assert ds.train.y.dtype == np.int64
    assert ds.image_shape == (4, 3)
    assert load_idx_folder(tmp_path).train.x.shape == (12, 12)
    assert load_dataset("mnist", data_dir=tmp_path).test.x.shape == (5, 12)


def test_idx_folder_missing_a_file(tmp_path):
    _idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        load_idx_folder(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        load_idx_folder(tmp_path / "absent")


def _blocker(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_a_data_dir_that_is_a_file_or_under_one_is_named(tmp_path, monkeypatch, name):
    """DataError naming the path and why, never NotADirectoryError / FileExistsError; nothing made."""
    monkeypatch.setenv("XPNET_DATA_DIR", str(tmp_path / "cache"))
    blocker = _blocker(tmp_path)
    with pytest.raises(DataError, match=rf"^{blocker}: not a folder \(it is a file\)"):
        load_dataset(name, data_dir=blocker)
    with pytest.raises(DataError, match=rf"^{blocker / 'sub'}: not a folder \({blocker} is a file\)"):
        load_dataset(name, data_dir=blocker / "sub")
    assert blocker.read_text() == "a file, not a folder" and sorted(os.listdir(tmp_path)) == ["blocker"]


def test_a_wdbc_data_dir_that_is_a_file_is_named(tmp_path):
    blocker = _blocker(tmp_path)
    with pytest.raises(DataError, match=rf"^{blocker / 'wdbc.csv'}: cannot read the file"):
        load_dataset("wdbc", data_dir=blocker)


def _chmod_stops_reading(folder) -> bool:
    try:
        os.listdir(folder)
    except PermissionError:
        return True
    return False


def test_an_unreadable_folder_is_named(tmp_path):
    (tmp_path / "locked").mkdir()
    _idx_folder(tmp_path / "locked")
    (tmp_path / "locked").chmod(0)
    try:
        if not _chmod_stops_reading(tmp_path / "locked"):
            pytest.skip("chmod 000 does not stop this user from reading a folder (root, or CAP_DAC_OVERRIDE)")
        for load in (load_idx_folder, lambda f: load_dataset("fashion-mnist", data_dir=f)):
            with pytest.raises(DataError, match=rf"^{tmp_path / 'locked'}: cannot read the folder \(Permission denied"):
                load(tmp_path / "locked")
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """The same refusal with the listing made to fail (runs as root too, where chmod cannot)."""
    _idx_folder(tmp_path)
    real_listdir = os.listdir

    def listdir(path="."):
        if os.fspath(path) == os.fspath(tmp_path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    for name in ("mnist", "fashion-mnist"):
        with pytest.raises(DataError, match=rf"^{tmp_path}: cannot read the folder \(Permission denied\)"):
            load_dataset(name, data_dir=tmp_path)


def test_an_idx_file_that_cannot_be_read_is_named(tmp_path):
    _idx_folder(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").mkdir()  # a folder where the file should be
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: cannot read the file \(Is a directory\)"):
        load_idx_folder(tmp_path)


# ------------------------------------------------------------------------ embedded MNIST
def test_embedded_mnist_files_are_the_canonical_ones():
    def md5(data):
        return hashlib.md5(data).hexdigest()

    raw_train_images = gzip.decompress(_embedded("mnist", "train-images-idx3-ubyte.gz").read_bytes())
    assert len(raw_train_images) == 47_040_016
    assert md5(raw_train_images) == "6bbc9ace898e44ae57da46a324031adb"
    assert md5(_embedded("mnist", "train-labels-idx1-ubyte.gz").read_bytes()) == "d53e105ee54ea40749a09fcbcd1e9432"
    assert md5(_embedded("mnist", "t10k-images-idx3-ubyte.gz").read_bytes()) == "9fb629c4189551a2d022fa330f9573f3"
    assert md5(_embedded("mnist", "t10k-labels-idx1-ubyte.gz").read_bytes()) == "ec29112dd5afa0611ce80d1b7f02629c"


def test_embedded_mnist_loads_with_exact_counts():
    ds = load_dataset("mnist")
    assert ds.train.x.shape == (60_000, 784) and ds.test.x.shape == (10_000, 784)
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int64
    assert ds.train.x.min() == 0.0 and ds.train.x.max() == 1.0
    assert np.bincount(ds.train.y).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.test.y).tolist() == MNIST_TEST_COUNTS
    assert ds.num_outputs == 10 and ds.image_shape == (28, 28)
    assert load_dataset("mnist", flatten=False).test.x.shape == (10_000, 28, 28)


# -------------------------------------------------------------------------- breast cancer
def test_wdbc_default_split_is_seeded_and_stratified():
    ds = load_dataset("wdbc")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (341, 114, 114)
    assert ds.train.x.shape == (341, 30) and ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int64
    counts = [np.bincount(s.y, minlength=2) for s in (ds.train, ds.val, ds.test)]
    assert sum(c[1] for c in counts) == 212 and sum(c[0] for c in counts) == 357
    for c, n in zip(counts, (341, 114, 114)):
        assert c[1] / n == pytest.approx(212 / 569, abs=0.01)  # each split keeps the class balance
    assert ds.task == "binary" and ds.num_outputs == 1 and len(ds.feature_names) == 30
    again = load_dataset("wdbc")
    np.testing.assert_array_equal(again.test.x, ds.test.x)
    other = load_dataset("wdbc", seed=1)
    assert not np.array_equal(other.test.x, ds.test.x)
    rows = {tuple(r) for s in (ds.train, ds.val, ds.test) for r in s.x}
    assert len(rows) == 569  # disjoint and complete


def test_standardization_uses_the_training_split_only():
    ds = load_dataset("wdbc")
    std = ds.standardized()
    mean, scale = ds.train.x.mean(axis=0), ds.train.x.std(axis=0)
    np.testing.assert_allclose(std.train.x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(std.train.x.std(axis=0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(std.test.x, (ds.test.x - mean) / scale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(std.val.x, (ds.val.x - mean) / scale, rtol=1e-4, atol=1e-4)
    assert np.abs(std.test.x.mean(axis=0)).max() > 0.01  # the test split was not fitted
    assert std.train.x.dtype == np.float32
    with pytest.raises(DataError, match="split before standardizing"):
        load_dataset("mnist").standardized(without_validation=True).with_validation(0.1)
    with pytest.raises(DataError, match="call with_validation\\(\\) before standardized\\(\\)"):
        load_dataset("mnist").standardized()
    with pytest.raises(DataError, match="standardized already"):
        std.standardized()


def test_with_validation_is_seeded_and_stratified_on_request():
    ds = load_dataset("mnist")
    split = ds.with_validation(0.1, seed=3, stratify=True)
    assert (len(split.train), len(split.val)) == (54_000, 6_000)
    np.testing.assert_allclose(np.bincount(split.val.y) / 6000, np.array(MNIST_TRAIN_COUNTS) / 60000, atol=2e-4)
    again = ds.with_validation(0.1, seed=3, stratify=True)
    np.testing.assert_array_equal(again.val.y, split.val.y)
    with pytest.raises(DataError, match="already has a validation split"):
        split.with_validation(0.1)


def test_split_indices():
    labels = np.repeat([0, 1, 2], [50, 30, 20])  # sorted: a tail split would hold out class 2 only
    kept, held = split_indices(labels, 0.2, seed=0, stratify=True)
    assert np.bincount(labels[held]).tolist() == [10, 6, 4]
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 100
    kept, held = split_indices(labels, 0.2, seed=0)
    assert len(held) == 20 and len(np.unique(labels[held])) == 3
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        split_indices(labels, 1.0)
    with pytest.raises(DataError, match="leaves 0 of 3"):
        split_indices(np.arange(3), 0.1)


def test_one_hot_and_scale_pixels():
    np.testing.assert_array_equal(one_hot([2, 0], 3), [[0, 0, 1], [1, 0, 0]])
    assert one_hot([1], 2).dtype == np.float32
    with pytest.raises(DataError, match="outside 0–2"):
        one_hot([3], 3)
    assert scale_pixels(np.array([0, 51, 255], dtype=np.uint8)).tolist() == pytest.approx([0.0, 0.2, 1.0])
    with pytest.raises(DataError, match="uint8"):
        scale_pixels(np.zeros(2))


@pytest.mark.parametrize(
    "text, message",
    [
        ("a,b,malignant\n1,2,0\n3,nan,1\n", "line 3: NaN or infinite"),
        ("a,b,malignant\n1,2,0\n3,1\n", "line 3: 2 fields, the header has 3"),
        ("a,b,malignant\n1,x,0\n", "not a number"),
        ("a,b,label\n1,2,0\n", "no column named 'malignant'"),
        ("a,b,malignant\n", "no data rows"),
        ("a,malignant,malignant\n1,0,0\n", "the header names the column 'malignant' twice"),
        ("a,b,b,malignant\n1,2,3,0\n", "the header names the column 'b' twice"),
        ("a,,malignant\n1,2,0\n", "column 2 of the header has no name"),
    ],
)
def test_malformed_tables_are_refused(tmp_path, text, message):
    path = tmp_path / "wdbc.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_table(path, "malignant")
    with pytest.raises(DataError, match=message):
        load_dataset("wdbc", data_dir=tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_validation_at_load_equals_with_validation():
    at_load = load_dataset("mnist", validation=0.1, seed=4)
    later = load_dataset("mnist").with_validation(0.1, seed=4, stratify=True)
    np.testing.assert_array_equal(at_load.val.y, later.val.y)
    np.testing.assert_array_equal(at_load.val.x, later.val.x)
    np.testing.assert_array_equal(at_load.train.x[:100], later.train.x[:100])
    assert (len(at_load.train), len(at_load.val)) == (54_000, 6_000)
    with pytest.raises(DataError, match="wdbc comes split"):
        load_dataset("wdbc", validation=0.1)


def test_a_table_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "wdbc.csv"
    path.write_bytes(b"a,b,malignant\n1,2,0\n\xff\xfe,3,1\n")
    message = rf"^{path}: not UTF-8 text \(byte 0xff at offset 20\)"
    with pytest.raises(DataError, match=message):
        read_table(path, "malignant")
    with pytest.raises(DataError, match=message):
        load_dataset("wdbc", data_dir=tmp_path)


def test_a_table_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "wdbc.csv"
    path.write_bytes("\ufeffa,malignant\n1.5,1\n".encode())
    x, target, names = read_table(path, "malignant")
    assert names == ("a",) and x.tolist() == [[1.5]] and target.tolist() == [1.0]
