"""NumPy fast paths for the hot loop: the same math as the Array API code, with ``out=`` buffers.

The Array API has no ``out=`` argument, so the reference code in layers, losses and optimizers
allocates a new array for every intermediate. On NumPy these versions write into buffers that
live across steps, and fuse what can be fused. Each one is checked against its reference by the
tests (tests/test_fast_paths.py); ``Device(..., fast=False)`` (or XPNET_FAST=0) turns them off.

Only the backend module hands these out, and only on the numpy backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

from . import _cpu_threads, _kernels

#: The compiled kernels: the bodies of ``_kernels`` in C loops, one per element type. Compiled on
#: first use with the system's C compiler and cached; without a compiler NumPy passes run instead.
_PRELUDE = r"""
#include <math.h>
#include <stddef.h>
#if defined(__SSE__)
#include <xmmintrin.h>
/* Moments of weights whose gradient is always 0 (MNIST's border pixels) decay through the
   subnormal range, where x86 arithmetic is ~100x slower: Adam flushes them to zero. */
#define FLUSH_BEGIN unsigned int csr_ = _mm_getcsr(); _mm_setcsr(csr_ | 0x8040);
#define FLUSH_END _mm_setcsr(csr_);
#else
#define FLUSH_BEGIN
#define FLUSH_END
#endif
"""


def _c_elementwise(name: str, spec: dict, flush: bool = False) -> str:
    """void name(outputs..., inputs..., n, scalars...): the body once per element."""
    outputs, inputs, scalars = spec["outputs"], spec["inputs"], spec["scalars"]
    params = [f"T *restrict {o}_" for o in outputs] + [f"const T *restrict {i}_" for i in inputs]
    params += ["ptrdiff_t n"] + [f"T {k}" for k in scalars]
    loads = " ".join([f"T {o} = {o}_[i];" for o in outputs] + [f"const T {i} = {i}_[i];" for i in inputs])
    stores = " ".join(f"{o}_[i] = {o};" for o in outputs)
    return (
        f"void {name}({', '.join(params)}) {{\n"
        + ("    FLUSH_BEGIN\n" if flush else "")
        + f"    for (ptrdiff_t i = 0; i < n; ++i) {{\n        {loads}\n        {{ {spec['body']} }}\n"
        + f"        {stores}\n    }}\n"
        + ("    FLUSH_END\n" if flush else "")
        + "}\n"
    )


def _c_split(name: str, spec: dict) -> str:
    """void name_split(<name's arguments>, int parts): ``name`` over ``parts`` threads of the pool,
    each on its own range of whole cache lines (the elements are independent: same results)."""
    arrays = [f"{o}_" for o in spec["outputs"]] + [f"{i}_" for i in spec["inputs"]]
    fields = [f"T *{a};" for a in arrays] + ["ptrdiff_t n;"] + [f"T {k};" for k in spec["scalars"]]
    params = [f"T *{a}" for a in arrays] + ["ptrdiff_t n"] + [f"T {k}" for k in spec["scalars"]]
    names = arrays + ["n"] + list(spec["scalars"])
    shifted = [f"t->{a} + lo" for a in arrays] + ["hi - lo"] + [f"t->{k}" for k in spec["scalars"]]
    return (
        f"struct {name}_task {{ {' '.join(fields)} }};\n"
        f"static void {name}_part(void *ctx, int part, int parts) {{\n"
        f"    const struct {name}_task *t = ctx;\n"
        "    const ptrdiff_t lines = (t->n + 15) / 16;\n"
        "    const ptrdiff_t lo = lines * part / parts * 16, end = lines * (part + 1) / parts * 16;\n"
        "    const ptrdiff_t hi = end < t->n ? end : t->n;\n"
        f"    if (lo < hi) {name}({', '.join(shifted)});\n}}\n"
        f"void {name}_split({', '.join(params)}, int parts) {{\n"
        f"    struct {name}_task task = {{{', '.join(names)}}};\n"
        f"    xpnet_pool_run({name}_part, &task, parts);\n}}\n"
    )


def _c_source() -> str:
    parts = [_PRELUDE, _cpu_threads.SOURCE]
    for type_name, suffix in (("float", "f32"), ("double", "f64")):
        parts.append(_kernels.math_defines(type_name))
        parts.append(_c_elementwise(f"xpnet_adam_{suffix}", _kernels.ADAM, flush=True))
        parts.append(_c_split(f"xpnet_adam_{suffix}", _kernels.ADAM))
        parts.append(_c_elementwise(f"xpnet_relu_backward_{suffix}", _kernels.RELU_BACKWARD))
        parts.append(_c_split(f"xpnet_relu_backward_{suffix}", _kernels.RELU_BACKWARD))
        # z (B, n) += b, then max(z, 0) when relu is set, in place in one pass; b may be NULL
        parts.append(
            f"void xpnet_bias_act_{suffix}(T *restrict z_, const T *restrict b_, ptrdiff_t B, ptrdiff_t n, "
            "int relu) {\n"
            "    for (ptrdiff_t r = 0; r < B; ++r) {\n"
            "        T *restrict row = z_ + r * n;\n"
            "        if (b_ && relu) for (ptrdiff_t c = 0; c < n; ++c) {\n"
            f"            T z = row[c]; const T b = b_[c]; {{ {_kernels.BIAS_RELU['body']} }} row[c] = z;\n"
            "        }\n"
            "        else if (b_) for (ptrdiff_t c = 0; c < n; ++c) row[c] += b_[c];\n"
            "        else if (relu) for (ptrdiff_t c = 0; c < n; ++c) row[c] = row[c] < (T)0 ? (T)0 : row[c];\n"
            "    }\n}\n"
            f"struct bias_act_task_{suffix} {{ T *z; const T *b; ptrdiff_t B, n; int relu; }};\n"
            f"static void bias_act_part_{suffix}(void *ctx, int part, int parts) {{\n"
            f"    const struct bias_act_task_{suffix} *t = ctx;\n"
            "    const ptrdiff_t lo = t->B * part / parts, hi = t->B * (part + 1) / parts;\n"
            f"    xpnet_bias_act_{suffix}(t->z + lo * t->n, t->b, hi - lo, t->n, t->relu);\n}}\n"
            f"void xpnet_bias_act_{suffix}_split(T *z, const T *b, ptrdiff_t B, ptrdiff_t n, int relu, int parts) {{\n"
            f"    struct bias_act_task_{suffix} task = {{z, b, B, n, relu}};\n"
            f"    xpnet_pool_run(bias_act_part_{suffix}, &task, parts);\n}}\n"
        )
        # mean softmax cross-entropy of z (B, C) with labels y; δ = (softmax(z) − onehot(y)) / B
        parts.append(
            f"static double xent_row_{suffix}(const T *restrict row, long long label, T *restrict out, "
            f"long long C, T inv_b) {{{_kernels.SOFTMAX_XENT_ROW}}}\n"
            f"static double xent_rows_{suffix}(const T *restrict z, const long long *restrict y, "
            "T *restrict delta, ptrdiff_t rows, ptrdiff_t C, T inv_b) {\n"
            "    double total = 0;\n"
            "    for (ptrdiff_t b = 0; b < rows; ++b)\n"
            f"        total += xent_row_{suffix}(z + b * C, y[b], delta + b * C, C, inv_b);\n"
            "    return total;\n}\n"
            f"double xpnet_softmax_xent_{suffix}(const T *restrict z, const long long *restrict y, "
            "T *restrict delta, ptrdiff_t B, ptrdiff_t C) {\n"
            f"    return xent_rows_{suffix}(z, y, delta, B, C, (T)1 / (T)B) / (double)B;\n}}\n"
            # the rows over the pool: each part writes its rows' losses, added up here in row
            # order, as the one-thread kernel adds them (the same loss, bit for bit)
            f"struct xent_task_{suffix} {{ const T *z; const long long *y; T *delta; double *losses; "
            "ptrdiff_t B, C; };\n"
            f"static void xent_part_{suffix}(void *ctx, int part, int parts) {{\n"
            f"    const struct xent_task_{suffix} *t = ctx;\n"
            "    const ptrdiff_t lo = t->B * part / parts, hi = t->B * (part + 1) / parts;\n"
            "    const T inv_b = (T)1 / (T)t->B;\n"
            "    for (ptrdiff_t b = lo; b < hi; ++b)\n"
            f"        t->losses[b] = xent_row_{suffix}(t->z + b * t->C, t->y[b], t->delta + b * t->C, t->C, inv_b);\n"
            "}\n"
            f"double xpnet_softmax_xent_{suffix}_split(const T *z, const long long *y, T *delta, ptrdiff_t B, "
            "ptrdiff_t C, int parts) {\n"
            "    double *losses = malloc((size_t)B * sizeof(double));\n"
            f"    if (!losses) return xpnet_softmax_xent_{suffix}(z, y, delta, B, C);\n"
            f"    struct xent_task_{suffix} task = {{z, y, delta, losses, B, C}};\n"
            f"    xpnet_pool_run(xent_part_{suffix}, &task, parts);\n"
            "    double total = 0;\n"
            "    for (ptrdiff_t b = 0; b < B; ++b) total += losses[b];\n"
            "    free(losses);\n"
            "    return total / (double)B;\n}\n"
        )
        # how many rows of z (B, C) have their argmax at the label y
        parts.append(
            f"static int argmax_is_{suffix}(const T *restrict row, long long label, long long C) "
            f"{{{_kernels.ARGMAX_ROW_IS}}}\n"
            f"long long xpnet_count_correct_{suffix}(const T *restrict z, const long long *restrict y, "
            "ptrdiff_t B, ptrdiff_t C) {\n"
            "    long long correct = 0;\n"
            f"    for (ptrdiff_t b = 0; b < B; ++b) correct += argmax_is_{suffix}(z + b * C, y[b], C);\n"
            "    return correct;\n}\n"
        )
        parts.append(_kernels.math_undefines())
    return "\n".join(parts)


_C_SOURCE = _c_source()
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
_SYMBOLS = (("xpnet_adam_f32", ctypes.c_float), ("xpnet_adam_f64", ctypes.c_double))
#: Below this size a split kernel costs more in handing over than it gains (a 128 × 784 float32
#: batch is 401 KB; Adam's 109,386 float32 parameters are 437 KB).
_SPLIT_BYTES = 1 << 17
#: The largest batch (of the training inputs) that fit gathers ahead, in bytes: it takes a second buffer.
_AHEAD_BYTES = 1 << 24


def _native_library():
    """The compiled fused kernels, or None: XPNET_NATIVE=0, no compiler, no usable cache folder,
    a failed build, or anything else that goes wrong. Never raises."""
    if os.environ.get("XPNET_NATIVE", "1") == "0":
        return None
    try:
        configured = os.environ.get("XPNET_CACHE_DIR")
        home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xpnet"
        return _load(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"), configured or str(home_cache))
    except Exception:  # a fast path that cannot be had is no error: the NumPy passes run instead
        return None


def _private(path: Path) -> bool:
    """Owned by this user and writable by no one else (a shared cache must not plant code)."""
    info = path.stat()
    return (not hasattr(os, "getuid") or info.st_uid == os.getuid()) and not info.st_mode & 0o022


@functools.cache
def _load(compiler: str | None, cache_dir: str):
    if not compiler:
        return None
    command = shlex.split(compiler)
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu = platform.processor()
    # -march=native code runs only on this kind of CPU: key the cache by its description too
    description = "".join(line for line in cpu.splitlines() if line.startswith(("flags", "model name")))
    key = hashlib.sha256("\0".join([_C_SOURCE, " ".join(_FLAGS), compiler, platform.machine(), description]).encode())
    cache = Path(cache_dir)
    library, digest = cache / f"fused-{key.hexdigest()[:16]}.so", cache / f"fused-{key.hexdigest()[:16]}.sha256"
    if library.exists() and not (digest.exists() and digest.read_text() == _sha256(library)):
        library.unlink()  # truncated or foreign: loading it could crash the process, so rebuild
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryDirectory(dir=cache) as work:
            source, built = Path(work) / "fused.c", Path(work) / "fused.so"
            source.write_text(_C_SOURCE)
            subprocess.run(
                [*command, *_FLAGS, "-o", str(built), str(source)], check=True, capture_output=True, timeout=120
            )
            tmp_digest = Path(work) / "fused.sha256"
            tmp_digest.write_text(_sha256(built))
            os.replace(tmp_digest, digest)  # the digest first: a library without one is rebuilt
            os.replace(built, library)
    if not (_private(library) and _private(cache)):
        return None
    lib = ctypes.CDLL(str(library))
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
    return lib


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        self._threads: int | None = None
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
        parts = self.threads if nbytes >= _SPLIT_BYTES else 1
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
        native, dtype = self.native, arrays[0].dtype
        if native is None or dtype.char not in "fd" or dtype.byteorder not in "=|":
            return None
        if any(array.dtype != dtype for array in arrays) or not all(a.flags.c_contiguous for a in everything):
            return None
        suffix = ("_f32" if dtype.char == "f" else "_f64") + ("_split" if parts > 1 else "")
        return (
            getattr(native, name + suffix),
            [array.ctypes.data for array in everything],
            (parts,) if parts > 1 else (),
        )

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
    @property
    def threads(self) -> int:
        """How many threads the split kernels use: OpenBLAS's, once its products run on the pool
        of the compiled library (``_cpu_threads``); 1 without compiled kernels or the hook."""
        if self._threads is None:
            native = self.native
            try:
                blas = np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]
            except (AttributeError, KeyError, TypeError):
                blas = "unknown"
            numpy_dir = str(Path(np.__file__).resolve().parent)
            self._threads = 1 if native is None else _cpu_threads.start(native, numpy_dir, str(blas))
        return self._threads

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
        if found is not None and out.ndim == 2:
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
