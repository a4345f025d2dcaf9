"""NumPy fast paths for the hot loop: the same math as the Array API code, with ``out=`` buffers.

The Array API has no ``out=`` argument, so the reference code in layers, losses and optimizers
allocates a new array for every intermediate. On NumPy these versions write into buffers that
live across steps, and fuse what can be fused. Each one is checked against its reference by the
tests (tests/test_fast_paths.py); ``Device(..., fast=False)`` (or XPNET_FAST=0) turns them off.

Only the backend module hands these out, and only on the numpy backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import math
import os
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from . import _cpu_threads, _random
from ._native import sources

_SYMBOLS = (("xpnet_adam_f32", ctypes.c_float), ("xpnet_adam_f64", ctypes.c_double))
#: Below this size a split kernel costs more in handing over than it gains (a 128 × 784 float32
#: batch is 401 KB; Adam's 109,386 float32 parameters are 437 KB).
_SPLIT_BYTES = 1 << 17
#: The largest batch (of the training inputs) that fit gathers ahead, in bytes: it takes a second buffer.
_AHEAD_BYTES = 1 << 24
#: The most bytes of im2col columns a convolution holds at once: its images go a chunk at a time.
COLUMN_BYTES = 1 << 22


class NativeKernelsWarning(RuntimeWarning):
    """The compiled kernels are not there (or not usable): NumPy passes compute instead."""


#: (library or None, what to say of it), found once per process.
_NATIVE: list = []
_NATIVE_LOCK = threading.Lock()


def native_status() -> tuple:
    """(the compiled kernels or None, a line saying which library or why there is none).

    The library is the optional extension built when xpnet was installed (setup.py). It is used
    only if it was built from the sources beside it (``xpnet_source_hash``). None when
    XPNET_NATIVE=0, when it was not built (no C compiler at install time), or when it cannot be
    loaded; the first such finding in a process, other than XPNET_NATIVE=0, is one warning line."""
    if os.environ.get("XPNET_NATIVE", "1") == "0":
        return None, "no compiled kernels (XPNET_NATIVE=0): NumPy passes"
    with _NATIVE_LOCK:
        if _NATIVE:
            return _NATIVE[0]
        library, reason = _find_library()
        _NATIVE.append((library, reason))  # before the warning: under -W error it raises, once
    if library is None:
        # one line: no source line under it ("<xpnet>" is no file linecache reads)
        warnings.warn_explicit(f"xpnet: {reason}", NativeKernelsWarning, "<xpnet>", 0, module="xpnet")
    return library, reason


def _native_library():
    """The compiled fused kernels, or None (``native_status`` says why)."""
    return native_status()[0]


def _find_library():
    spec = importlib.util.find_spec("xpnet._native.fused")
    if spec is None or not spec.origin:
        return None, (
            "no compiled kernels: they were not built when xpnet was installed (no C compiler then? "
            "reinstall xpnet where cc works to build them); NumPy passes run instead"
        )
    path = Path(spec.origin)
    try:
        lib = ctypes.CDLL(str(path))
        lib.xpnet_source_hash.restype = ctypes.c_char_p
        built = lib.xpnet_source_hash().decode()
    except (OSError, AttributeError) as exc:
        return None, f"no compiled kernels: {path.name} cannot be loaded ({exc}); NumPy passes run instead"
    try:
        here = sources.source_hash()
    except OSError as exc:  # a source missing beside the library: it cannot be told from a stale build
        return None, (
            f"no compiled kernels: their sources cannot be read to check {path.name} ({exc}); NumPy passes run instead"
        )
    if built != here:
        return None, (
            f"no compiled kernels: {path.name} was built from other sources than these (a stale build: "
            "reinstall xpnet, or run pip install -e . in a checkout); NumPy passes run instead"
        )
    _declare(lib)
    return lib, f"compiled kernels {path.name} (built at install from these sources)"


def _declare(lib) -> None:
    """The argument and result types of the library's functions, for ctypes."""
    pointer = ctypes.c_void_p
    for name, scalar in _SYMBOLS:
        function = getattr(lib, name)
        function.argtypes = [pointer, pointer, pointer, pointer, ctypes.c_ssize_t, scalar, scalar, scalar, scalar]
        function.restype = None
    for name in ("xpnet_relu_backward_f32", "xpnet_relu_backward_f64"):
        function = getattr(lib, name)
        function.argtypes = [pointer, pointer, pointer, ctypes.c_ssize_t]
        function.restype = None
    for name in ("xpnet_bias_act_f32", "xpnet_bias_act_f64"):
        function = getattr(lib, name)
        function.argtypes = [pointer, pointer, ctypes.c_ssize_t, ctypes.c_ssize_t, ctypes.c_int]
        function.restype = None
    for name in ("xpnet_softmax_xent_f32", "xpnet_softmax_xent_f64"):
        function = getattr(lib, name)
        function.argtypes = [pointer, pointer, pointer, ctypes.c_ssize_t, ctypes.c_ssize_t]
        function.restype = ctypes.c_double
    # each name_split takes name's arguments and then the number of parts
    for base in ("xpnet_adam", "xpnet_relu_backward", "xpnet_bias_act", "xpnet_softmax_xent"):
        for suffix in ("f32", "f64"):
            one, split = getattr(lib, f"{base}_{suffix}"), getattr(lib, f"{base}_{suffix}_split")
            split.argtypes, split.restype = [*one.argtypes, ctypes.c_int], one.restype
    gather = [pointer, pointer, pointer, ctypes.c_ssize_t, ctypes.c_ssize_t, ctypes.c_ssize_t]
    for name, argtypes in (
        ("xpnet_take_rows", [*gather, ctypes.c_int]),
        ("xpnet_take_rows_finish", [*gather, ctypes.c_int]),
        ("xpnet_take_rows_ahead", gather),
    ):
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    for name in ("xpnet_count_correct_f32", "xpnet_count_correct_f64"):
        function = getattr(lib, name)
        function.argtypes = [pointer, pointer, ctypes.c_ssize_t, ctypes.c_ssize_t]
        function.restype = ctypes.c_longlong
    lib.xpnet_blas_calls.argtypes, lib.xpnet_blas_calls.restype = [], ctypes.c_longlong
    size, part = ctypes.c_ssize_t, ctypes.c_int
    images = [pointer, pointer, *[size] * 9, part]  # out, in, b, C, H, W, k, s, p, H', W', parts
    pools = [pointer, pointer, pointer, *[size] * 7, part]  # out, out/in, in, planes, H, W, size, s, H', W', parts
    columns = [pointer, pointer, pointer, size, size, size, part]  # out, in/sums, in/bias, b, O, P, parts
    from_columns = [*columns[:-1], part, part]  # ..., relu, parts
    for suffix in ("f32", "f64"):
        for name, argtypes in (
            ("xpnet_im2col", images),
            ("xpnet_col2im", images),
            ("xpnet_from_columns", from_columns),
            ("xpnet_to_columns", columns),
            ("xpnet_max_pool", pools),
            ("xpnet_max_pool_backward", pools),
        ):
            function = getattr(lib, f"{name}_{suffix}")
            function.argtypes, function.restype = argtypes, None
    for suffix, scalar in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        function = getattr(lib, f"xpnet_batch_norm_{suffix}")  # y, x̂, 1/σ, μ, σ², x, γ, β, B, C, P, ε, batch
        function.argtypes, function.restype = [*[pointer] * 8, size, size, size, scalar, part, part], None
        function = getattr(lib, f"xpnet_batch_norm_backward_{suffix}")  # dx, dγ, dβ, δ, x̂, 1/σ, γ, B, C, P, batch
        function.argtypes, function.restype = [*[pointer] * 7, size, size, size, part, part], None
        function = getattr(lib, f"xpnet_dropout_{suffix}")
        uint32 = ctypes.c_uint32  # y, mask, x, first, n, key, k1, rate, scale, parts
        function.argtypes = [pointer, pointer, pointer, size, size, uint32, uint32, scalar, scalar, part]
        function.restype = None


#: Every NumpyFastPaths, so that a forked child gets fresh gather-ahead locks (a lock held by
#: another thread at the fork would be held forever in the child, which has no such thread).
_INSTANCES: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for fast in list(_INSTANCES):
        fast._ahead_lock, fast._ahead = threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class NumpyFastPaths:
    """Buffered and fused versions of the hot-path operations, on NumPy arrays."""

    def __init__(self, native: bool = True):
        self._ones: dict = {}
        self._want_native = native
        self._native = None
        self._looked = False
        self._found: dict = {}
        self._ahead = None  # (X, order, out) of a gather running ahead
        self._ahead_lock = threading.Lock()
        _INSTANCES.add(self)

    @property
    def native(self):
        """The compiled kernels, built or loaded on first use (None without them)."""
        if not self._looked:
            self._native = _native_library() if self._want_native else None
            self._looked = True
        return self._native

    def _kernel(self, name: str, nbytes: int, arrays, others=()):
        """(kernel, addresses, tail), or None where no compiled code fits: the compiled ``name`` for
        the element type of ``arrays`` (float32 or float64, one dtype), the data addresses of
        ``arrays`` and then ``others`` (labels: any dtype), all C-contiguous, and what ends the
        kernel's arguments: ``(parts,)`` from ``_SPLIT_BYTES`` up, where the ``_split`` version runs
        over the pool's threads, else ()."""
        parts = self._parts(nbytes)
        everything = (*arrays, *others)
        key = (name, parts, *map(id, everything))
        return self._remembered(key, everything, lambda: self._find(name, parts, arrays, everything))

    def _remembered(self, key, arrays, find):
        """find(), looked up once per set of arrays and kept under ``key`` while they live.

        ``ndarray.ctypes.data`` costs ~3 µs a call, more than a small kernel: fit hands over the
        same buffers, parameters and optimizer state every step, so what is found from them is
        kept (weak references tell live arrays from new ones that reuse an id)."""
        entry = self._found.get(key)
        if entry is not None:
            for ref, array in zip(entry[0], arrays):
                if ref() is not array:
                    break
            else:
                return entry[1]
        found = find()
        if len(self._found) > 512:
            self._found.clear()
        self._found[key] = (tuple(map(weakref.ref, arrays)), found)
        return found

    def _find(self, name, parts, arrays, everything):
        suffix = self._suffix(*arrays)
        if suffix is None or not all(a.flags.c_contiguous for a in everything):
            return None
        return (
            getattr(self.native, name + suffix + ("_split" if parts > 1 else "")),
            [array.ctypes.data for array in everything],
            (parts,) if parts > 1 else (),
        )

    def _suffix(self, *arrays):
        """The compiled kernels' suffix ("_f32", "_f64") for these arrays, or None: no library,
        another element type, mixed types, or an array that is not C-contiguous."""
        if self.native is None:
            return None
        dtype = arrays[0].dtype
        if dtype.char not in "fd" or dtype.byteorder not in "=|":
            return None
        if any(a.dtype != dtype or not a.flags.c_contiguous for a in arrays):
            return None
        return "_f32" if dtype.char == "f" else "_f64"

    def _parts(self, nbytes: int) -> int:
        """How many threads a kernel over ``nbytes`` splits over: 1 below ``_SPLIT_BYTES``."""
        return self.threads if nbytes >= _SPLIT_BYTES else 1

    # ------------------------------------------------------------- buffers
    @staticmethod
    def buffer(cache: dict, name: str, shape, dtype) -> np.ndarray:
        """A reusable array in ``cache`` (one per layer), reallocated only when the shape changes."""
        array = cache.get(name)
        if array is None or array.shape != shape or array.dtype != dtype or not _writable(array):
            array = cache[name] = np.empty(shape, dtype=dtype)
        return array

    @staticmethod
    def flat(size: int, dtype) -> np.ndarray:
        return np.zeros(size, dtype=dtype)

    # -------------------------------------------------------------- layers
    @staticmethod
    @functools.cache
    def _blas() -> tuple[str, str]:
        """(NumPy's folder, the name of the BLAS it was built with)."""
        try:
            blas = np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]
        except (AttributeError, KeyError, TypeError):
            blas = "unknown"
        return str(Path(np.__file__).resolve().parent), str(blas)

    @property
    def threads(self) -> int:
        """How many threads the split kernels use now: OpenBLAS's while its products run on the
        pool of the compiled library (``computing``, in this or another thread), else 1."""
        return _cpu_threads.threads_now if self.native is not None else 1

    def pool_threads(self) -> int:
        """The threads OpenBLAS and the kernels share while xpnet computes (1: no pool here).
        Hooks nothing."""
        native = self.native
        return 1 if native is None else _cpu_threads.available(native, *self._blas())

    @contextlib.contextmanager
    def computing(self):
        """Within this, NumPy's OpenBLAS runs its products on the pool the kernels split over
        (``_cpu_threads.hold``); on leaving, the last holder gives OpenBLAS its own threads back."""
        native = self.native
        held = None if native is None else _cpu_threads.hold(native, *self._blas())
        try:
            yield self
        finally:
            if held is not None:
                self.finish_ahead()  # no copy of ours may run on the pool past this
                _cpu_threads.release(held)

    def take_rows(self, X, order, start: int, stop: int, out):
        """out = X[order[start:stop]], rows gathered into a reused buffer (order: a permutation,
        always in range). Compiled: one copy per row, the batch split over the pool's threads
        when large (the copy runs at memory speed, and one core does not reach it); or, when
        ``take_rows_ahead`` started this very gather, what is left of it."""
        found = self._gather(X, order, start, stop, out)
        if found is None:  # NumPy's take; but first no copy may be writing ahead into out
            self.finish_ahead()
            return np.take(X, order[start:stop], axis=0, out=out, mode="clip")  # "raise" copies through a temporary
        parts = self.threads if out.nbytes >= _SPLIT_BYTES else 1
        with self._ahead_lock:  # finishing any gather completes the one running ahead
            self.native.xpnet_take_rows_finish(*found, parts)
            self._ahead = None
        return out

    def gathers_ahead(self, X, batch_size: int) -> bool:
        """Whether fit should gather each next batch of X ahead (``take_rows_ahead``): with the
        pool's workers and compiled code, for batches up to ``_AHEAD_BYTES`` (the next batch
        needs a second buffer)."""
        row_bytes = X.dtype.itemsize * math.prod(X.shape[1:])
        return self.threads > 1 and row_bytes * batch_size <= _AHEAD_BYTES

    def take_rows_ahead(self, X, order, start: int, stop: int, out):
        """Start gathering X[order[start:stop]] into ``out`` on the pool's workers, in the time they
        would spend waiting for the next product while this thread runs Python and one-thread
        work. ``take_rows`` with the same arguments finishes it, as does any later gather or
        ``finish_ahead``; until then ``out`` must not be used. X, order and out are held here so
        that none is freed under the copy (one gather runs ahead at a time: the lock keeps the
        held arrays those of the copy in progress, whichever threads share these paths)."""
        found = self._gather(X, order, start, stop, out) if self.threads > 1 else None
        if found is not None:
            with self._ahead_lock:
                self.native.xpnet_take_rows_ahead(*found)  # completes the one before, if any
                self._ahead = (X, order, out)

    def finish_ahead(self) -> None:
        """Complete the gather running ahead, if any (fit calls this when an epoch ends, however
        it ends)."""
        if self.native is not None:
            with self._ahead_lock:
                self.native.xpnet_take_rows_ahead(None, None, None, 0, 0, 0)
                self._ahead = None

    def _gather(self, X, order, start, stop, out):
        """The compiled gather's arguments for X[order[start:stop]] into out, or None."""
        usable = (
            order.dtype == np.int64
            and order.ndim == 1
            and 0 <= start <= stop <= order.shape[0]
            and X.dtype == out.dtype
            and X.ndim >= 1
            and X.shape[0] > 0
            and out.shape == (stop - start, *X.shape[1:])
        )
        if not usable or self.native is None:
            return None
        arrays = (X, out, order)
        addresses = self._remembered(
            ("gather", *map(id, arrays)),
            arrays,
            lambda: [a.ctypes.data if a.flags.c_contiguous else None for a in arrays],
        )
        if None in addresses:
            return None
        px, pout, porder = addresses
        return pout, px, porder + 8 * start, stop - start, X.shape[0], X.itemsize * math.prod(X.shape[1:])

    def linear(self, x, W, b, out, relu: bool = False):
        """z = x Wᵀ + b into ``out``; with ``relu``, a = max(z, 0) in its place (Dense then ReLU).
        Compiled: the bias and the ReLU in one pass after the product."""
        np.matmul(x, W.T, out=out)
        if b is None and not relu:
            return out
        found = self._kernel("xpnet_bias_act", out.nbytes, (out,) if b is None else (out, b))
        # the compiled pass reads b[c] for every column c: only for a bias of exactly that length
        if found is not None and out.ndim == 2 and (b is None or b.shape == (out.shape[1],)):
            kernel, addresses, tail = found
            bias = addresses[1] if b is not None else None
            kernel(addresses[0], bias, out.shape[0], out.shape[1], relu, *tail)
            return out
        if b is not None:
            out += b
        if relu:
            np.maximum(out, 0.0, out=out)
        return out

    def linear_backward(self, delta, x, W, dW, db, dx):
        """dW = δᵀ x, db = Σ δ, dx = δ W (when ``dx`` is given), all into existing arrays.

        Σ over the batch is taken as 1ᵀδ, a BLAS product: NumPy's reduction along axis 0 of a
        small (B, n) array costs several times more per call."""
        np.matmul(delta.T, x, out=dW)
        if db is not None:
            ones = self._ones.get((delta.shape[0], delta.dtype))
            if ones is None:
                ones = self._ones[(delta.shape[0], delta.dtype)] = np.ones(delta.shape[0], dtype=delta.dtype)
            np.matmul(ones, delta, out=db)
        if dx is not None:
            np.matmul(delta, W, out=dx)
        return dx

    @staticmethod
    def relu(z, out):
        """a = max(z, 0) into ``out``."""
        return np.maximum(z, 0.0, out=out)

    def relu_backward(self, da, a, out):
        """where(a > 0, da, 0) into ``out`` (a > 0 exactly where z > 0; da there, 0 elsewhere,
        even where da is inf or NaN, as in the reference). Compiled: one pass."""
        found = self._kernel("xpnet_relu_backward", out.nbytes, (a, da, out))
        if found is not None and a.shape == da.shape == out.shape:
            kernel, (pa, pda, pout), tail = found
            kernel(pout, pa, pda, a.size, *tail)
            return out
        out[...] = 0.0
        np.copyto(out, da, where=a > 0.0)
        return out

    def softmax_cross_entropy(self, z, labels, delta):
        """Mean −log softmax(z)[label] and δ = (p − y) / B into ``delta``, without a one-hot matrix.
        Compiled: one pass per row. (Labels must be in range: fit checks them once.)"""
        # exp per element makes even a 256 × 10 batch worth splitting: weigh rows, not bytes
        weight = z.shape[0] * _SPLIT_BYTES // 256
        # z and the labels are fit's buffers (their addresses are remembered); δ may be new each
        # call, so its address is read directly (__array_interface__: far cheaper than .ctypes)
        found = self._kernel("xpnet_softmax_xent", weight, (z,), (labels,)) if labels.dtype == np.int64 else None
        usable = delta.dtype == z.dtype and delta.flags.c_contiguous and z.shape == delta.shape
        if found is not None and usable and z.ndim == 2 and labels.shape == z.shape[:1]:
            kernel, (pz, plabels), tail = found
            pdelta = delta.__array_interface__["data"][0]
            loss = kernel(pz, plabels, pdelta, z.shape[0], z.shape[1], *tail)
            return z.dtype.type(loss), delta
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

    # ------------------------------------------------------- batch normalization
    def batch_norm(self, x, gamma, beta, eps, mean, var, y, x_hat):
        """Batch normalization of x (B, C) or (B, C, H, W) per channel into ``y`` and ``x_hat``:
        (y, x̂, 1/σ, μ_B, σ²_B) as ``Ops.batch_norm`` returns them, μ_B and σ²_B None when the
        running ``mean`` and ``var`` are given. One compiled pass per channel for the statistics
        (sums in double precision), one for the output. None where the kernel does not fit."""
        given = mean is not None
        arrays = (x, gamma, beta, y, x_hat) + ((mean, var) if given else ())
        usable = x.ndim in (2, 4) and min(x.shape) > 0 and _writable(y, x_hat)
        suffix = self._suffix(*arrays) if usable else None
        if suffix is None or not (x.shape == y.shape == x_hat.shape) or (mean is None) != (var is None):
            return None
        channels = x.shape[1]
        if any(a.shape != (channels,) for a in arrays[1:3] + arrays[5:]):
            return None
        inv_std = np.empty(channels, x.dtype)
        if not given:
            mean, var = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
        kernel = getattr(self.native, "xpnet_batch_norm" + suffix)
        plane = x.shape[2] * x.shape[3] if x.ndim == 4 else 1
        pointers = (y, x_hat, inv_std, mean, var, x, gamma, beta)
        kernel(*map(_at, pointers), x.shape[0], channels, plane, eps, 0 if given else 1, self._parts(x.nbytes))
        return y, x_hat, inv_std, (None if given else mean), (None if given else var)

    def batch_norm_backward(self, dy, x_hat, inv_std, gamma, batch_statistics, dx):
        """(∂L/∂x into ``dx``, ∂L/∂γ, ∂L/∂β) of ``Ops.batch_norm_backward``, one compiled pass per
        channel for the sums and one for ∂L/∂x; None where the kernel does not fit."""
        arrays = (dy, x_hat, inv_std, gamma, dx)
        suffix = self._suffix(*arrays) if dy.ndim in (2, 4) and min(dy.shape) > 0 and _writable(dx) else None
        if suffix is None or not (dy.shape == x_hat.shape == dx.shape):
            return None
        channels = dy.shape[1]
        if inv_std.shape != (channels,) or gamma.shape != (channels,):
            return None
        grad_gamma, grad_beta = np.empty(channels, dy.dtype), np.empty(channels, dy.dtype)
        kernel = getattr(self.native, "xpnet_batch_norm_backward" + suffix)
        plane = dy.shape[2] * dy.shape[3] if dy.ndim == 4 else 1
        pointers = (dx, grad_gamma, grad_beta, dy, x_hat, inv_std, gamma)
        kernel(*map(_at, pointers), dy.shape[0], channels, plane, int(bool(batch_statistics)), self._parts(dy.nbytes))
        return dx, grad_gamma, grad_beta

    # ------------------------------------------------------------- dropout
    def dropout(self, x, rate, draw, out, mask):
        """Inverted dropout of x into ``out`` with its mask into ``mask``: the draw's uniform
        numbers, the mask and the product in one compiled pass (the reference's numbers, bit for
        bit). None where the kernel does not take these arrays."""
        suffix = self._suffix(x, out, mask) if _writable(out, mask) else None
        if suffix is None or not (x.shape == out.shape == mask.shape) or not 0.0 <= rate < 1.0:
            return None
        first = _random.first_element(draw, x.shape)
        if first is None:
            return None
        kernel = getattr(self.native, "xpnet_dropout" + suffix)
        scale, parts = 1.0 / (1.0 - rate), self._parts(x.nbytes)
        kernel(_at(out), _at(mask), _at(x), first, x.size, draw[0], draw[1], rate, scale, parts)
        return out, mask

    # ------------------------------------------------ convolution and pooling
    @staticmethod
    def _chunk(batch: int, column_bytes: int) -> int:
        """Images per chunk: as many as keep a chunk's im2col columns within COLUMN_BYTES (at least
        one image, whose columns may be more; the products' buffer is O / (C·k·k) of the columns')."""
        return max(1, min(batch, COLUMN_BYTES // max(column_bytes, 1)))

    #: (B, C, H, W, k, H', W') of a convolution the kernels can run, else None (``_conv_geometry``).
    conv_geometry = staticmethod(lambda x, W, stride, padding: _conv_geometry(x, W, stride, padding))
    #: (H', W') of a pooling the kernels can run, else None (``_pool_geometry``).
    pool_geometry = staticmethod(lambda x, size, stride: _pool_geometry(x, size, stride))

    def _chunks(self, x, W, geometry, stride, padding, suffix, site):
        """(start, n, cols, Y) for each chunk of the images x: cols (C·k·k, n·H'·W') holding the
        chunk's columns (compiled im2col), Y (O, n·H'·W') the buffer for the chunk's products."""
        batch, channels, _, _, k, rows, cols_out = geometry
        plane, depth, outs = rows * cols_out, channels * k * k, W.shape[0]
        per = self._chunk(batch, depth * plane * x.itemsize)
        columns = self.buffer(site, "columns", (depth * per * plane,), x.dtype)
        products = self.buffer(site, "products", (outs * per * plane,), x.dtype)
        for start in range(0, batch, per):
            n = min(per, batch - start)
            cols = columns[: depth * n * plane].reshape(depth, n * plane)
            self._image_pass("xpnet_im2col" + suffix, cols, x[start : start + n], geometry, stride, padding)
            yield start, n, cols, products[: outs * n * plane].reshape(outs, -1)

    def _image_pass(self, name, out, source, geometry, stride, padding):
        """The compiled im2col (images to columns) or col2im (columns to images) ``name`` of one
        chunk, out from source; the chunk's images are those of whichever of the two is 4-D."""
        _, channels, height, width, k, rows, cols_out = geometry
        n = (out if out.ndim == 4 else source).shape[0]
        kernel = getattr(self.native, name)
        nbytes = max(out.nbytes, source.nbytes)
        kernel(
            _at(out), _at(source), n, channels, height, width, k, stride, padding, rows, cols_out, self._parts(nbytes)
        )

    def conv2d(self, x, W, b, stride, padding, out, site, relu=False):
        """y = W ⋆ x + b into ``out`` (B, O, H', W'), a chunk of images at a time: the compiled
        im2col into cols (C·k·k, n·H'·W'), one product Y = W₂ cols (O, n·H'·W'), and Y put in
        NCHW order with the bias added (and with ``relu``, max(y, 0)), by one compiled pass. The
        columns and Y live in ``site``. None where the compiled kernels do not take these arrays
        (the caller computes the reference): every shape is checked here, before any kernel runs."""
        geometry = _conv_geometry(x, W, stride, padding)
        suffix = self._suffix(x, W, out) if geometry and _writable(out) else None
        if suffix is None or (b is not None and (b.shape != (W.shape[0],) or self._suffix(b, W) is None)):
            return None
        batch, channels, height, width, k, rows, cols_out = geometry
        if out.shape != (batch, W.shape[0], rows, cols_out):
            return None
        plane, outs = rows * cols_out, W.shape[0]
        from_columns = getattr(self.native, "xpnet_from_columns" + suffix)
        W2 = W.reshape(outs, -1)
        bias = None if b is None else _at(b)
        for start, n, cols, Y in self._chunks(x, W, geometry, stride, padding, suffix, site):
            np.matmul(W2, cols, out=Y)
            from_columns(_at(out[start : start + n]), _at(Y), bias, n, outs, plane, int(relu), self._parts(Y.nbytes))
        return out

    def conv2d_backward(self, dy, x, W, stride, padding, dW, db, dx, site):
        """∂L/∂W into ``dW``, ∂L/∂b into ``db`` (None: no bias) and ∂L/∂x into ``dx`` (None: not
        wanted), a chunk of images at a time: cols again by im2col, D = δ as (O, n·H'·W') (its
        sums added to ∂L/∂b in the same compiled pass), ∂L/∂W₂ += D colsᵀ, and ∂L/∂x = col2im(W₂ᵀ D)
        into the columns' buffer, then compiled col2im. None where the kernels do not take these
        arrays (nothing written then)."""
        geometry = _conv_geometry(x, W, stride, padding)
        arrays = (x, W, dy, dW) + tuple(a for a in (db, dx) if a is not None)
        outputs = (dW,) + tuple(a for a in (db, dx) if a is not None)
        suffix = self._suffix(*arrays) if geometry and _writable(*outputs) else None
        if suffix is None:
            return None
        batch, channels, height, width, k, rows, cols_out = geometry
        outs = W.shape[0]
        if dy.shape != (batch, outs, rows, cols_out) or dW.shape != W.shape:
            return None
        if (db is not None and db.shape != (outs,)) or (dx is not None and dx.shape != x.shape):
            return None
        plane, depth = rows * cols_out, channels * k * k
        to_columns = getattr(self.native, "xpnet_to_columns" + suffix)
        W2, dW2 = W.reshape(outs, depth), dW.reshape(outs, depth)
        if db is not None:
            db[...] = 0
        sums = None if db is None else _at(db)
        for start, n, cols, D in self._chunks(x, W, geometry, stride, padding, suffix, site):
            to_columns(_at(D), sums, _at(dy[start : start + n]), n, outs, plane, self._parts(D.nbytes))
            if start == 0:
                np.matmul(D, cols.T, out=dW2)
            else:
                partial = self.buffer(site, "dW", (outs, depth), x.dtype)
                np.matmul(D, cols.T, out=partial)
                dW2 += partial
            if dx is not None:
                np.matmul(W2.T, D, out=cols)  # the columns' gradient, where the columns were
                self._image_pass("xpnet_col2im" + suffix, dx[start : start + n], cols, geometry, stride, padding)
        return dW, db, dx

    def _pool_pass(self, name, arrays, shape, size, stride, geometry):
        """The compiled pooling kernel ``name`` on its three arrays, for images of ``shape``
        (B, C, H, W) and the (H', W') of ``geometry``; split by the images' bytes."""
        kernel = getattr(self.native, name)
        nbytes = math.prod(shape) * arrays[0].itemsize
        kernel(*map(_at, arrays), shape[0] * shape[1], shape[2], shape[3], size, stride, *geometry, self._parts(nbytes))

    def max_pool2d(self, x, size, stride, out, winner):
        """Max pooling of x (B, C, H, W) into ``out`` and the first winners' window offsets into
        ``winner`` (int32), both (B, C, H', W'), by one compiled pass; None where it does not fit."""
        geometry = _pool_geometry(x, size, stride)
        if geometry is None or self._suffix(x, out) is None or not _writable(out, winner):
            return None
        rows, cols_out = geometry
        if out.shape != winner.shape or out.shape != (*x.shape[:2], rows, cols_out) or winner.dtype != np.int32:
            return None
        self._pool_pass("xpnet_max_pool" + self._suffix(x), (out, winner, x), x.shape, size, stride, geometry)
        return out, winner

    def max_pool2d_backward(self, dy, winner, size, stride, dx):
        """∂L/∂x into ``dx``: 0, then each δ added at its window's winner (a winner outside
        0 .. size² − 1 adds nothing), by one compiled pass; None where it does not fit."""
        geometry = _pool_geometry(dx, size, stride)
        if geometry is None or self._suffix(dy, dx) is None or not (_writable(dx) and winner.flags.c_contiguous):
            return None
        if winner.dtype != np.int32 or dy.shape != winner.shape or dy.shape != (*dx.shape[:2], *geometry):
            return None
        self._pool_pass(
            "xpnet_max_pool_backward" + self._suffix(dx), (dx, dy, winner), dx.shape, size, stride, geometry
        )
        return dx

    # ------------------------------------------------------------- metrics
    def count_correct(self, z, labels):
        """How many rows of logits z (B, C) have their argmax at the integer label, as an int;
        None where there is no compiled kernel for these arrays (then the metric's own code runs).
        Compiled: one pass, instead of argmax, ==, and count_nonzero (~110 µs at 512 × 10)."""
        found = self._kernel("xpnet_count_correct", 0, (z,), (labels,)) if labels.dtype == np.int64 else None
        if found is None or z.ndim != 2 or z.shape[1] < 1 or labels.shape != z.shape[:1]:
            return None
        kernel, (pz, plabels), _ = found
        return kernel(pz, plabels, z.shape[0], z.shape[1])

    # ---------------------------------------------------------- optimizers
    def adam_(self, p, g, m, v, t, lr_t, beta1, beta2, eps_t):
        """One Adam step on flat contiguous arrays, in place:
        m += (1 − β₁)(g − m); v += (1 − β₂)(g² − v); p −= η_t m / (√v + ε_t).

        Compiled: one pass. Otherwise twelve NumPy passes into the scratch array ``t``, with no
        allocation. (Splitting the passes over two threads was slower in measurement: OpenBLAS's
        worker, still spinning after the backward products, takes the second core.)
        """
        same = p.ndim == 1 and p.shape == g.shape == m.shape == v.shape
        writable = p.flags.writeable and m.flags.writeable and v.flags.writeable
        found = self._kernel("xpnet_adam", p.nbytes, (p, g, m, v)) if same and writable else None
        if found is not None:
            kernel, (pp, pg, pm, pv), tail = found
            kernel(pp, pm, pv, pg, p.shape[0], lr_t, 1.0 - beta1, 1.0 - beta2, eps_t, *tail)
            return
        self.adam_passes(p, g, m, v, t, lr_t, beta1, beta2, eps_t)

    @staticmethod
    def adam_passes(p, g, m, v, t, lr_t, beta1, beta2, eps_t):
        """The twelve-pass NumPy version of ``adam_``."""
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


def _writable(*arrays) -> bool:
    """Whether the compiled kernels may write these arrays: C-contiguous (no broadcast or strided
    view) and writeable."""
    return all(a.flags.c_contiguous and a.flags.writeable for a in arrays)


def _at(array) -> int:
    """The address of an array's data (cheaper than ``ndarray.ctypes.data``)."""
    return array.__array_interface__["data"][0]


#: The largest stride, padding or kernel the compiled image kernels take: with image sides that
#: fit in memory, none of their index sums can then overflow 64 bits (larger ones: the reference).
_LARGEST = 1 << 31


def _whole(value, smallest: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and smallest <= value <= _LARGEST


def _conv_geometry(x, W, stride, padding):
    """(B, C, H, W, k, H', W') of a convolution the compiled kernels can run, else None: NCHW
    images, square kernels over the same channels, a stride of at least 1, a padding of at least
    0, and at least one output position."""
    if x.ndim != 4 or W.ndim != 4 or W.shape[1] != x.shape[1] or W.shape[2] != W.shape[3]:
        return None
    if not (_whole(stride, 1) and _whole(padding, 0) and _whole(W.shape[2], 1)) or min(x.shape) < 1 or W.shape[0] < 1:
        return None
    k = W.shape[2]
    rows, cols = (x.shape[2] + 2 * padding - k) // stride + 1, (x.shape[3] + 2 * padding - k) // stride + 1
    if x.shape[2] + 2 * padding < k or x.shape[3] + 2 * padding < k:
        return None
    return (*x.shape, k, rows, cols)


def _pool_geometry(x, size, stride):
    """(H', W') of a pooling the compiled kernels can run on x (B, C, H, W), else None."""
    if x.ndim != 4 or not (_whole(size, 1) and _whole(stride, 1)) or min(x.shape) < 1:
        return None
    if x.shape[2] < size or x.shape[3] < size:
        return None
    return (x.shape[2] - size) // stride + 1, (x.shape[3] - size) // stride + 1
