"""Data on the host: IDX files, embedded and downloadable datasets, splits and preprocessing.

This package works in NumPy (it reads files); ``fit`` moves the arrays to the device once.
"""

from .datasets import DATASETS, IDX_FILES, NAMES, Dataset, Split, load_dataset, load_idx_folder, load_wdbc, read_table
from .download import cache_dir, download, md5_of
from .errors import DataError
from .idx import read_idx, read_idx_pair, write_idx
from .preprocess import one_hot, scale_pixels, split_indices

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "NAMES",
    "DataError",
    "Dataset",
    "Split",
    "cache_dir",
    "download",
    "load_dataset",
    "load_idx_folder",
    "load_wdbc",
    "md5_of",
    "one_hot",
    "read_idx",
    "read_idx_pair",
    "read_table",
    "scale_pixels",
    "split_indices",
    "write_idx",
]
