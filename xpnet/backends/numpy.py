"""NumPy on the CPU: ``cpu`` (or ``numpy``)."""

from __future__ import annotations

import numpy as np

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

    def describe(self, fast):
        if fast is None:
            paths = "Array API code only (fast paths off)"
        else:
            paths = "fast paths on, Adam " + ("compiled" if fast.native is not None else "in NumPy passes")
            if fast.threads > 1:
                paths += f"; OpenBLAS and the kernels on one pool of {fast.threads} threads"
        return f"NumPy {np.__version__} on the CPU; {paths}"
