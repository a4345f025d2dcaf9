"""NumPy on the CPU: ``cpu`` (or ``numpy``)."""

from __future__ import annotations

import numpy as np

from ..ops import BufferedOps
from .base import Backend


class NumpyBackend(Backend):
    kind = "numpy"
    forms = ("'cpu'",)

    def __init__(self, detail=True):
        import array_api_compat.numpy

        self.xp = array_api_compat.numpy
        self.native = "cpu"
        self.name = "cpu"

    @classmethod
    def claims(cls, text):
        return True if text.lower() in ("cpu", "numpy") else None

    @classmethod
    def available(cls):
        return ["cpu"]

    @classmethod
    def is_array(cls, x):
        return isinstance(x, np.ndarray)

    def owns(self, a):
        return isinstance(a, np.ndarray)

    def from_host(self, host, copy):
        return np.array(host, copy=True) if copy else host

    @classmethod
    def host_copy(cls, x):
        return x

    def fast_paths(self):
        from .._fast_numpy import NumpyFastPaths

        return NumpyFastPaths()

    def ops(self, fast):
        return super().ops(fast) if fast is None else NumpyOps(self.xp, self.native, fast)

    def describe(self, fast):
        if fast is None:
            paths = "Array API code only (fast paths off)"
        else:
            from .._fast_numpy import native_status

            _, kernels = native_status()
            paths = "fast paths on; " + kernels
            threads = fast.pool_threads()
            if threads > 1:
                paths += f"; OpenBLAS and the kernels on one pool of {threads} threads while xpnet computes"
        return f"NumPy {np.__version__} on the CPU; {paths}"


class NumpyOps(BufferedOps):
    """The NumPy overrides: batches gathered by compiled row copies into reused buffers, the next
    batch's rows copied ahead by the pool's idle workers; softmax cross-entropy and the count of
    correct predictions in one compiled pass each."""

    def count_correct(self, z, labels):
        if labels.ndim == 1 and z.ndim == 2:
            correct = self.fast.count_correct(z, labels)
            if correct is not None:
                return correct
        return super().count_correct(z, labels)
