"""NumPy fast paths for the hot loop: the same math as the Array API code, with ``out=`` buffers.

The Array API has no ``out=`` argument, so the reference code in layers, losses and optimizers
allocates a new array for every intermediate. On NumPy these versions write into buffers that
live across steps, and fuse what can be fused. Each one is checked against its reference by the
tests (tests/test_fast_paths.py); ``Device(..., fast=False)`` (or XPNET_FAST=0) turns them off.

Only the backend module hands these out, and only on the numpy backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

#: A fused Adam step: one pass over p, g, m, v instead of NumPy's twelve. Compiled on first use
#: with the system's C compiler and cached; without a compiler the NumPy passes run instead.
_ADAM_C = r"""
#include <math.h>
#if defined(__SSE__)
#include <xmmintrin.h>
/* Moments of weights whose gradient is always 0 (MNIST's border pixels) decay through the
   subnormal range, where x86 arithmetic is ~100x slower: flush them to zero in this loop. */
#define FLUSH_BEGIN unsigned int csr_ = _mm_getcsr(); _mm_setcsr(csr_ | 0x8040);
#define FLUSH_END _mm_setcsr(csr_);
#else
#define FLUSH_BEGIN
#define FLUSH_END
#endif
#define ADAM(NAME, T, SQRT)                                                                  \
void NAME(T *restrict p, const T *restrict g, T *restrict m, T *restrict v, long n,          \
          T lr_t, T c1, T c2, T eps_t) { /* c1 = 1 - beta1, c2 = 1 - beta2, as NumPy rounds them */\
    FLUSH_BEGIN                                                                              \
    for (long i = 0; i < n; ++i) {                                                           \
        const T gi = g[i];                                                                   \
        const T mi = m[i] + c1 * (gi - m[i]);         /* m += (1 - b1)(g - m)   */           \
        const T vi = v[i] + c2 * (gi * gi - v[i]);    /* v += (1 - b2)(g^2 - v) */           \
        m[i] = mi;                                                                           \
        v[i] = vi;                                                                           \
        p[i] -= lr_t * (mi / (SQRT(vi) + eps_t));     /* p -= lr_t m / (sqrt(v) + eps_t) */  \
    }                                                                                        \
    FLUSH_END                                                                                \
}
ADAM(xpnet_adam_f32, float, sqrtf)
ADAM(xpnet_adam_f64, double, sqrt)
"""
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]


def _native_library():
    """The compiled fused kernels, or None (no compiler, XPNET_NATIVE=0, or a failed build)."""
    if os.environ.get("XPNET_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
    except OSError:
        cpu = platform.processor()
    # -march=native code runs only on this kind of CPU: key the cache by its description too
    key = hashlib.sha256(
        "\0".join(
            [
                _ADAM_C,
                " ".join(_FLAGS),
                compiler,
                platform.machine(),
                "".join(line for line in cpu.splitlines() if line.startswith(("flags", "model name"))),
            ]
        ).encode()
    ).hexdigest()[:16]
    cache = Path(
        os.environ.get("XPNET_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xpnet"
    )
    library = cache / f"fused-{key}.so"
    try:
        if not library.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as work:
                source = Path(work) / "fused.c"
                source.write_text(_ADAM_C)
                built = Path(work) / "fused.so"
                subprocess.run(
                    [compiler, *_FLAGS, "-o", str(built), str(source)], check=True, capture_output=True, timeout=120
                )
                os.replace(built, library)  # atomic: a concurrent build leaves one good file
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError):
        return None
    pointer = ctypes.c_void_p
    for name, scalar in (("xpnet_adam_f32", ctypes.c_float), ("xpnet_adam_f64", ctypes.c_double)):
        function = getattr(lib, name)
        function.argtypes = [pointer, pointer, pointer, pointer, ctypes.c_long, scalar, scalar, scalar, scalar]
        function.restype = None
    return lib


class NumpyFastPaths:
    """Buffered and fused versions of the hot-path operations, on NumPy arrays."""

    def __init__(self, native: bool = True):
        self.native = _native_library() if native else None

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
        """out = X[index], rows gathered into a reused buffer (index: a permutation, always in range)."""
        return np.take(X, index, axis=0, out=out, mode="clip")  # "raise" would copy through a temporary

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
    def adam_(self, p, g, m, v, t, lr_t, beta1, beta2, eps_t):
        """One Adam step on flat contiguous arrays, in place:
        m += (1 − β₁)(g − m); v += (1 − β₂)(g² − v); p −= η_t m / (√v + ε_t).

        Compiled: one pass. Otherwise twelve NumPy passes into the scratch array ``t``, with no
        allocation. (Splitting the passes over two threads was slower in measurement: OpenBLAS's
        worker, still spinning after the backward products, takes the second core.)
        """
        if self.native is not None and p.dtype in (np.float32, np.float64) and g.flags.c_contiguous:
            kernel = self.native.xpnet_adam_f32 if p.dtype == np.float32 else self.native.xpnet_adam_f64
            kernel(
                p.ctypes.data,
                g.ctypes.data,
                m.ctypes.data,
                v.ctypes.data,
                p.shape[0],
                lr_t,
                1.0 - beta1,
                1.0 - beta2,
                eps_t,
            )
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
