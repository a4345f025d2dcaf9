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
    correct predictions in one compiled pass each; convolutions as compiled im2col, one OpenBLAS
    product per chunk of images and compiled rearrangements, and max pooling in one compiled
    pass each way. Where the compiled kernels do not take the arrays, the reference computes."""

    def _output(self, site, name, shape, dtype):
        """Where a result goes: the layer's reused buffer within ``reusing()``, else a new array."""
        if self._mode.reusing and site is not None:
            return self.fast.buffer(site, name, tuple(shape), dtype)
        return np.empty(shape, dtype=dtype)

    def host_view(self, a):
        """The array itself: MPI reads and writes a NumPy buffer in place."""
        if isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable:
            return a
        return None

    def batch_norm(self, x, gamma, beta, *, axes, eps, mean=None, var=None, site=None):
        if axes == ((0,) if x.ndim == 2 else (0, 2, 3)):  # over the batch (and positions) per channel
            y, x_hat = self._output(site, "y", x.shape, x.dtype), self._output(site, "x_hat", x.shape, x.dtype)
            done = self.fast.batch_norm(x, gamma, beta, eps, mean, var, y, x_hat)
            if done is not None:
                return done
        return super().batch_norm(x, gamma, beta, axes=axes, eps=eps, mean=mean, var=var, site=site)

    def batch_norm_backward(self, dy, x_hat, inv_std, gamma, *, axes, batch_statistics, site=None):
        if axes == ((0,) if dy.ndim == 2 else (0, 2, 3)):
            dx = self._output(site, "dx", dy.shape, dy.dtype)
            done = self.fast.batch_norm_backward(dy, x_hat, inv_std, gamma, batch_statistics, dx)
            if done is not None:
                return done
        return super().batch_norm_backward(
            dy, x_hat, inv_std, gamma, axes=axes, batch_statistics=batch_statistics, site=site
        )

    def dropout(self, x, rate, draw, *, site=None):
        out, mask = self._output(site, "y", x.shape, x.dtype), self._output(site, "mask", x.shape, x.dtype)
        done = self.fast.dropout(x, rate, draw, out, mask)
        return super().dropout(x, rate, draw, site=site) if done is None else done

    def conv2d(self, x, W, b, *, stride, padding, activation=None, site=None):
        geometry = self.fast.conv_geometry(x, W, stride, padding)
        if geometry is not None and activation in (None, "relu"):
            out = self._output(site, "y", (x.shape[0], W.shape[0], *geometry[-2:]), x.dtype)
            scratch = {} if site is None else site
            if self.fast.conv2d(x, W, b, stride, padding, out, scratch, relu=activation == "relu") is not None:
                return out
        return super().conv2d(x, W, b, stride=stride, padding=padding, activation=activation, site=site)

    def conv2d_backward(self, dy, x, W, *, stride, padding, bias, need_dx, dW=None, db=None, site=None):
        dW = np.empty(W.shape, dtype=W.dtype) if dW is None else dW
        if bias and db is None:
            db = np.empty(W.shape[:1], dtype=W.dtype)
        dx = self._output(site, "dx", x.shape, x.dtype) if need_dx else None
        done = self.fast.conv2d_backward(
            dy, x, W, stride, padding, dW, db if bias else None, dx, {} if site is None else site
        )
        if done is None:
            return super().conv2d_backward(dy, x, W, stride=stride, padding=padding, bias=bias, need_dx=need_dx)
        return done

    def max_pool2d(self, x, *, size, stride, site=None):
        geometry = self.fast.pool_geometry(x, size, stride)
        if geometry is not None:
            shape = (*x.shape[:2], *geometry)
            out, winner = self._output(site, "y", shape, x.dtype), self._output(site, "winner", shape, np.int32)
            if self.fast.max_pool2d(x, size, stride, out, winner) is not None:
                return out, winner
        return super().max_pool2d(x, size=size, stride=stride, site=site)

    def max_pool2d_backward(self, dy, winner, shape, *, size, stride, site=None):
        dx = self._output(site, "dx", shape, dy.dtype)
        if self.fast.max_pool2d_backward(dy, winner, size, stride, dx) is not None:
            return dx
        return super().max_pool2d_backward(dy, winner, shape, size=size, stride=stride, site=site)

    def count_correct(self, z, labels):
        if labels.ndim == 1 and z.ndim == 2:
            correct = self.fast.count_correct(z, labels)
            if correct is not None:
                return correct
        return super().count_correct(z, labels)
