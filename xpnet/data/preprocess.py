"""Preprocessing on the host: pixel scaling, one-hot labels, seeded (stratified) splits,
and the statistics of standardization.
"""

from __future__ import annotations

import numpy as np

from ..checks import checked_integer
from .errors import DataError

__all__ = ["scale_pixels", "one_hot", "split_indices"]

_PIXEL_SCALE = np.float32(1.0 / 255.0)


def checked_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int when it is a non-negative integer (NumPy integers too, bools not);
    ValueError naming ``name`` otherwise (never NumPy's own message, which names nothing)."""
    return checked_integer(name, seed, minimum=0)


def scale_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 to float32 in [0, 1], in one pass."""
    if images.dtype != np.uint8:
        raise DataError(f"scale_pixels expects uint8 pixels, got {images.dtype}")
    return np.multiply(images, _PIXEL_SCALE, dtype=np.float32)


def one_hot(labels, num_classes: int, dtype="float32") -> np.ndarray:
    """(N,) integer labels to an (N, C) matrix with a single 1 per row (for soft-target losses,
    plots and metrics; the training loss never needs it)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"one_hot expects a vector of integer labels, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"one_hot: labels range from {labels.min()} to {labels.max()}, outside 0–{num_classes - 1}")
    out = np.zeros((labels.shape[0], num_classes), dtype=dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


def split_indices(labels, fraction: float, *, seed: int = 0, stratify: bool = False):
    """(kept, held_out) index arrays: a seeded permutation, the held-out part round(N·fraction).

    With ``stratify`` each class is split on its own, so the held-out part has the class
    proportions of the whole (to within one example per class).
    """
    seed = checked_seed(seed)
    labels = np.asarray(labels)
    n = labels.shape[0]
    if n == 0:
        raise DataError("split_indices: no examples to split")
    if not 0.0 < fraction < 1.0:
        raise DataError(f"a split fraction must be strictly between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(n)
        held = int(round(n * fraction))
        if not 0 < held < n:
            raise DataError(f"a split of {fraction} leaves {held} of {n} examples held out")
        return np.sort(order[held:]), np.sort(order[:held])
    classes, counts = np.unique(labels, return_counts=True)
    total_held = int(round(n * fraction))
    # largest-remainder apportionment: per-class shares that add up to exactly total_held
    shares = counts * fraction
    held_per_class = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - held_per_class), kind="stable")[: total_held - held_per_class.sum()]:
        held_per_class[i] += 1
    kept, held = [], []
    for cls, count in zip(classes, held_per_class):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(members.shape[0])]
        held.append(members[:count])
        kept.append(members[count:])
    kept, held = np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))
    if not 0 < held.size < n:
        raise DataError(f"a split of {fraction} leaves {held.size} of {n} examples held out")
    return kept, held


def _standardization_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (a constant feature gets std 1, not 0).

    Private on purpose: the only way to standardize is ``Dataset.standardized()``, which feeds
    this the training split alone.
    """
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)
