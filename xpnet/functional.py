"""Stable elementwise and row-wise functions shared by layers and losses.

Each takes the namespace ``xp`` and arrays from it; nothing here allocates on the host.
"""

from __future__ import annotations


def sigmoid(xp, z):
    """σ(z) = 1 / (1 + e^(−z)), computed from e^(−|z|) so that no exponential overflows.

    For z ≥ 0: 1 / (1 + e^(−z)); for z < 0: e^(z) / (1 + e^(z)). Both use e = e^(−|z|) ≤ 1,
    so σ(±1000) is exactly 1 and 0 in float32, never inf / inf.
    """
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def log_softmax(xp, z):
    """log softmax along the last axis: z − max(z) − log Σ exp(z − max(z))."""
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def softmax(xp, z):
    """softmax(z)_i = exp(z_i − max z) / Σ_j exp(z_j − max z), along the last axis."""
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def class_mask(xp, labels, num_classes: int, device):
    """Boolean (B, C) mask with True at [i, labels[i]]: the one-hot pattern without a float matrix."""
    classes = xp.arange(num_classes, dtype=labels.dtype, device=device)
    return xp.reshape(labels, (-1, 1)) == classes
