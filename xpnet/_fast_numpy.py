"""NumPy fast paths for the hot loop: the same math as the Array API code, with ``out=`` buffers.

The Array API has no ``out=`` argument, so the reference code in layers, losses and optimizers
allocates a new array for every intermediate. On NumPy these versions write into buffers that
live across steps, and fuse what can be fused. Each one is checked against its reference by the
tests (tests/test_fast_paths.py); ``Device(..., fast=False)`` (or XPNET_FAST=0) turns them off.

Only the backend module hands these out, and only on the numpy backend.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Below this many elements a second thread costs more than it saves.
_THREAD_MIN = 1 << 15


class NumpyFastPaths:
    """Buffered and fused versions of the hot-path operations, on NumPy arrays."""

    def __init__(self, threads: int = 1):
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    # ------------------------------------------------------------- buffers
    @staticmethod
    def buffer(cache: dict, name: str, shape, dtype) -> np.ndarray:
        """A reusable array in ``cache`` (one per layer), reallocated only when the shape changes."""
        array = cache.get(name)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = cache[name] = np.empty(shape, dtype=dtype)
        return array

    @staticmethod
    def flat(size: int, dtype) -> np.ndarray:
        return np.zeros(size, dtype=dtype)

    # -------------------------------------------------------------- layers
    @staticmethod
    def take_rows(X, index, out):
        """out = X[index], rows gathered into a reused buffer."""
        return np.take(X, index, axis=0, out=out)

    @staticmethod
    def linear(x, W, b, out):
        """z = x Wᵀ + b into ``out``."""
        np.matmul(x, W.T, out=out)
        if b is not None:
            out += b
        return out

    @staticmethod
    def linear_backward(delta, x, W, dW, db, dx):
        """dW = δᵀ x, db = Σ δ, dx = δ W (when ``dx`` is given), all into existing arrays."""
        np.matmul(delta.T, x, out=dW)
        if db is not None:
            np.sum(delta, axis=0, out=db)
        if dx is not None:
            np.matmul(delta, W, out=dx)
        return dx

    @staticmethod
    def relu(z, out):
        """a = max(z, 0) into ``out``."""
        return np.maximum(z, 0.0, out=out)

    @staticmethod
    def relu_backward(da, a, mask, out):
        """da ⊙ [a > 0] into ``out`` (a > 0 exactly where z > 0)."""
        np.greater(a, 0.0, out=mask)
        return np.multiply(da, mask, out=out)

    @staticmethod
    def softmax_cross_entropy(z, labels, delta):
        """Mean −log softmax(z)[label] and δ = (p − y) / B into ``delta``, without a one-hot matrix."""
        batch = z.shape[0]
        rows = np.arange(batch)
        np.subtract(z, z.max(axis=1, keepdims=True), out=delta)
        true_logit = delta[rows, labels]
        np.exp(delta, out=delta)
        total = delta.sum(axis=1, keepdims=True)
        loss = np.log(total[:, 0]).sum() - true_logit.sum()
        np.divide(delta, total, out=delta)
        delta[rows, labels] -= 1.0
        delta *= 1.0 / batch
        return (loss / batch).astype(z.dtype), delta

    # ---------------------------------------------------------- optimizers
    def _split(self, arrays, work):
        """Run ``work`` on matching halves of flat arrays in the thread pool (NumPy frees the GIL)."""
        n = arrays[0].shape[0]
        if self._pool is None or n < _THREAD_MIN:
            work(*arrays)
            return
        bounds = np.linspace(0, n, self.threads + 1).astype(int)
        parts = [[a[lo:hi] for a in arrays] for lo, hi in zip(bounds[:-1], bounds[1:])]
        for future in [self._pool.submit(work, *part) for part in parts]:
            future.result()

    def adam_(self, p, g, m, v, scratch, lr_t, beta1, beta2, eps_t):
        """One Adam step on flat arrays, in place, in 12 passes and no allocation:
        m += (1 − β₁)(g − m); v += (1 − β₂)(g² − v); p −= η_t m / (√v + ε_t)."""

        def work(p, g, m, v, t):
            np.subtract(g, m, out=t)
            t *= 1.0 - beta1
            m += t
            np.multiply(g, g, out=t)
            t -= v
            t *= 1.0 - beta2
            v += t
            np.sqrt(v, out=t)
            t += eps_t
            np.divide(m, t, out=t)
            t *= lr_t
            p -= t

        self._split((p, g, m, v, scratch), work)
