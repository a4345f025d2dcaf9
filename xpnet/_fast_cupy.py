"""CuPy fast paths: the same interface as ``_fast_numpy``, on the GPU, without host syncs.

The fused kernels' arithmetic is xpnet/_native/xpnet_kernels.h, the very header the CPU kernels
are built from, compiled by CuPy (NVRTC) with ``--fmad=false`` so that no multiply-add is contracted that the
reference code rounds twice: the Adam update in one kernel for m, v and the parameter, the bias
and ReLU after a matrix product, ReLU backward, and softmax cross-entropy one thread per row.
Products go to cuBLAS through ``cupy.matmul(..., out=)`` into buffers that live across steps.
The loss stays a device array; nothing here reads a value back to the host.

Each fused kernel checks itself on first use (``available``): once per process, device and dtype
it is compiled and run on a small seeded random input and compared with the Array API reference
computation on the same input. A kernel that fails to compile, raises, or disagrees gives one
RuntimeWarning line naming it and the reason, and is off from then on: its method runs the
reference code instead, with the same arguments and results, so callers never branch on it.

Only the backend module creates these, and only on the cupy backend; ``Device(..., fast=False)``
or XPNET_FAST=0 turns them off (the Array API reference code then runs).
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import warnings
from importlib import resources

import array_api_compat

#: NVRTC options: IEEE division and square root are NVRTC's defaults; no contraction into FMA.
#: CuPy adds its own to every compile, ours and its ufuncs' alike: ``--std=c++14`` and
#: ``-ftz=true`` (float32 subnormals flush to zero on the GPU, in the reference code too).
OPTIONS = ("--fmad=false",)


def _native_text(name: str) -> str:
    """A file of xpnet/_native (installed with the package)."""
    return resources.files("xpnet._native").joinpath(name).read_text()


#: The shared header, after C++ overloads that pick the float or double function from T (CuPy's
#: ElementwiseKernel defines T from the arguments' dtypes before the preamble).
PREAMBLE = "#define SQRT sqrt\n#define EXP exp\n#define LOG log\n" + _native_text("xpnet_kernels.h")
THREADS = 256

#: The fused kernels: the name ``available`` takes -> (the CUDA function's name, what it computes).
KERNELS = {
    "adam": ("xpnet_adam", "the Adam update"),
    "bias_relu": ("xpnet_bias_relu", "bias and ReLU after a matrix product"),
    "relu_backward": ("xpnet_relu_backward", "ReLU backward"),
    "softmax_xent": ("xpnet_softmax_xent", "softmax cross-entropy"),
}
#: The elementwise kernels: (in_params, out_params, operation) for CuPy's ElementwiseKernel, the
#: operation a macro of the header; inputs and scalars are read, outputs read and written (CuPy
#: binds them by reference).
ELEMENTWISE = {
    "adam": ("T g, T lr_t, T c1, T c2, T eps_t", "T p, T m, T v", "XPNET_ADAM(p, m, v, g, lr_t, c1, c2, eps_t)"),
    "bias_relu": ("T b", "T z", "XPNET_BIAS_RELU(z, b)"),
    "relu_backward": ("T a, T da", "T out", "XPNET_RELU_BACKWARD(out, a, da)"),
}

#: Machine epsilon of the dtypes the self-check covers (another dtype fails it: the reference runs).
EPS = {"float32": 2.0**-23, "float64": 2.0**-52}
#: Self-check tolerances, in ε of the dtype, times the magnitude of the terms each output is made of:
#: Adam 4 ε (m and v are the reference's own operations in its order, exact with --fmad=false;
#: the parameter's step is η_t·(m/(√v+ε_t)) against the reference's (η_t·m)/(√v+ε_t), one rounding
#: apart); softmax-CE 128 ε of each row's probabilities (the reference goes through log p and back,
#: so exp amplifies log p's absolute rounding, up to |log p|·ε; the kernel divides by a sum of C
#: rounded terms); bias+ReLU and ReLU backward exactly (one addition and a selection).
ADAM_ULPS = 4
SOFTMAX_ULPS = 128
#: Seed of the self-check's inputs (Python's generator: this module does not import NumPy).
SEED = 1407

#: Outcomes for this process: (device id, kernel, dtype name) -> None (passed) or why it failed.
_CHECKED: dict = {}
_LOCK = threading.Lock()


def softmax_xent_source(type_name: str) -> str:
    """The RawKernel's source: T and its math functions, the shared header, softmax_xent.cu."""
    functions = {"float": ("sqrtf", "expf", "logf"), "double": ("sqrt", "exp", "log")}[type_name]
    defines = f"#define T {type_name}\n" + "".join(
        f"#define {macro} {function}\n" for macro, function in zip(("SQRT", "EXP", "LOG"), functions)
    )
    return defines + _native_text("xpnet_kernels.h") + _native_text("softmax_xent.cu")


def _one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message (compiler logs
    run to many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = type(exc).__name__ + (f": {lines[0]}" if lines else "")
    if len(lines) > 1:
        text += " (…)"
    return text if len(text) <= 300 else text[:299] + "…"


class CupyFastPaths:
    """Buffered and fused versions of the hot-path operations, on CuPy arrays.

    Every method runs its fused kernel when the kernel passed its self-check and the reference
    code otherwise, with the same results in the same places: callers need not know which.
    """

    #: What ``Device.describe`` reports for the fused kernels.
    native = "CUDA kernels"

    def __init__(self, cupy):
        self.cp = cupy
        self.device_id = cupy.cuda.Device().id  # the backend makes these inside its device's context
        self._elementwise: dict = {}  # built on first use, inside the self-check
        self._softmax: dict = {}
        self._losses: dict = {}
        self._ready: dict = {}  # (kernel, dtype) -> bool: this instance's memo of _CHECKED
        self._reference_ops = None

    # ------------------------------------------------------------ self-check
    def available(self, kernel: str, dtype) -> bool:
        """Whether fused kernel ``kernel`` (a key of ``KERNELS``) runs for ``dtype`` on this device.

        The first ask per process, device and dtype runs the self-check (a compile, a launch on a
        small input, one host read); a failure warns once. Later asks are a dictionary look-up."""
        return self._ok(kernel, self.cp.dtype(dtype))

    def checked(self) -> dict:
        """This device's self-check outcomes so far: (kernel, dtype name) -> None when the kernel
        passed, else the reason it is off. Runs nothing."""
        return {(k, d): reason for (device, k, d), reason in _CHECKED.items() if device == self.device_id}

    def _ok(self, kernel, dtype) -> bool:
        ready = self._ready.get((kernel, dtype))
        return self._first_use(kernel, dtype) if ready is None else ready

    def _first_use(self, kernel, dtype) -> bool:
        if kernel not in KERNELS:
            raise KeyError(f"no fused kernel {kernel!r}; the kernels are {', '.join(KERNELS)}")
        key = (self.device_id, kernel, dtype.name)
        with _LOCK:
            if key in _CHECKED:
                reason = _CHECKED[key]
            else:
                try:
                    reason = _not_covered(dtype) or _SELF_CHECKS[kernel](self, dtype)
                except Exception as exc:  # a compile error, a launch failure: the kernel is off, said once
                    reason = _one_line(exc)
                _CHECKED[key] = reason
                if reason is not None:
                    name, what = KERNELS[kernel]
                    warnings.warn(
                        f"xpnet: CUDA kernel {name} ({what}, {dtype.name}) failed its self-check on "
                        f"cuda:{self.device_id} and is off for this process; the Array API reference code "
                        f"runs instead. Reason: {reason}",
                        RuntimeWarning,
                        stacklevel=4,  # _first_use <- _ok <- the fast-path method <- its caller
                    )
        ready = self._ready[(kernel, dtype)] = reason is None
        return ready

    def _reference(self, like):
        """The reference Ops, for the namespace of ``like``."""
        if self._reference_ops is None:
            from .ops import Ops

            self._reference_ops = Ops(array_api_compat.array_namespace(like))
        return self._reference_ops

    # ------------------------------------------------------------- kernels
    def _elementwise_kernel(self, kernel: str):
        compiled = self._elementwise.get(kernel)
        if compiled is None:
            in_params, out_params, operation = ELEMENTWISE[kernel]
            compiled = self._elementwise[kernel] = self.cp.ElementwiseKernel(
                in_params,
                out_params,
                operation,
                KERNELS[kernel][0],
                preamble=PREAMBLE,
                options=OPTIONS,
                no_return=True,
            )
        return compiled

    def _adam(self, p, g, m, v, lr_t, beta1, beta2, eps_t):
        dtype = p.dtype.type
        self._elementwise_kernel("adam")(g, dtype(lr_t), dtype(1.0 - beta1), dtype(1.0 - beta2), dtype(eps_t), p, m, v)

    def _bias_relu(self, b, z):
        self._elementwise_kernel("bias_relu")(b, z)

    def _relu_backward(self, a, da, out):
        self._elementwise_kernel("relu_backward")(a, da, out)

    def _softmax_xent(self, z, labels, delta):
        """The kernel's mean loss (a 0-d array of z's dtype); δ into ``delta``. z and labels (int64)
        contiguous."""
        cp = self.cp
        type_name = "float" if z.dtype == cp.float32 else "double"
        kernel = self._softmax.get(type_name)
        if kernel is None:
            kernel = self._softmax[type_name] = cp.RawKernel(
                softmax_xent_source(type_name), KERNELS["softmax_xent"][0], options=OPTIONS
            )
        batch, classes = z.shape
        losses = self._losses.get(batch)
        if losses is None:
            losses = self._losses[batch] = cp.empty(batch, dtype=cp.float64)
        blocks = (batch + THREADS - 1) // THREADS
        kernel((blocks,), (THREADS,), (z, labels, delta, losses, cp.int64(batch), cp.int64(classes)))
        return cp.mean(losses).astype(z.dtype)

    @staticmethod
    def computing():
        """Nothing to hold on the GPU for a computation (``Ops.computing``)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------- buffers
    def buffer(self, cache: dict, name: str, shape, dtype):
        array = cache.get(name)
        if array is None or array.shape != tuple(shape) or array.dtype != dtype:
            array = cache[name] = self.cp.empty(shape, dtype=dtype)
        return array

    def flat(self, size: int, dtype):
        return self.cp.zeros(size, dtype=dtype)

    # -------------------------------------------------------------- layers
    def take_rows(self, X, order, start: int, stop: int, out):
        return self.cp.take(X, order[start:stop], axis=0, out=out)

    @staticmethod
    def gathers_ahead(X, batch_size: int) -> bool:
        """False: on the GPU the gather is one kernel in the stream, already overlapped."""
        return False

    def linear(self, x, W, b, out, relu: bool = False):
        """z = x Wᵀ + b into ``out`` (cuBLAS); with ``relu``, max(z, 0) in the same pass as the bias
        (two passes, as the reference computes it, where that kernel is off)."""
        cp = self.cp
        cp.matmul(x, W.T, out=out)
        if b is not None and relu and self._ok("bias_relu", out.dtype):
            self._bias_relu(b, out)
            return out
        if b is not None:
            cp.add(out, b, out=out)
        if relu:
            cp.maximum(out, 0, out=out)
        return out

    def linear_backward(self, delta, x, W, dW, db, dx):
        cp = self.cp
        cp.matmul(delta.T, x, out=dW)
        if db is not None:
            cp.sum(delta, axis=0, out=db)
        if dx is not None:
            cp.matmul(delta, W, out=dx)
        return dx

    def relu(self, z, out):
        return self.cp.maximum(z, 0, out=out)

    def relu_backward(self, da, a, out):
        """δ = where(a > 0, da, 0) into ``out``."""
        if self._ok("relu_backward", out.dtype):
            self._relu_backward(a, da, out)
        else:
            self.cp.copyto(out, self.cp.where(a > 0, da, 0.0))
        return out

    def softmax_cross_entropy(self, z, labels, delta):
        """The mean loss as a 0-d device array, and δ = (p − y) / B into ``delta``."""
        cp = self.cp
        if not self._ok("softmax_xent", z.dtype):
            loss, reference_delta = self._reference(z).softmax_cross_entropy(z, labels)
            cp.copyto(delta, reference_delta)
            return loss, delta
        if labels.dtype != cp.int64:
            labels = labels.astype(cp.int64)
        z, labels = cp.ascontiguousarray(z), cp.ascontiguousarray(labels)
        return self._softmax_xent(z, labels, delta), delta

    # ------------------------------------------------------------- metrics
    @staticmethod
    def count_correct(z, labels):
        """None: the metric's own argmax and count_nonzero already run on the device with no host
        read, so there is nothing worth fusing here (the CPU fuses them to save Python calls)."""
        return None

    # ---------------------------------------------------------- optimizers
    def adam_(self, p, g, m, v, t, lr_t, beta1, beta2, eps_t):
        """One Adam step, in place: in one kernel (m, v and p read and written once each), or where
        that kernel is off in the reference's operations (``optim.Adam``'s per-parameter path)."""
        if self._ok("adam", p.dtype):
            self._adam(p, g, m, v, lr_t, beta1, beta2, eps_t)
            return
        m += (1.0 - beta1) * (g - m)
        v += (1.0 - beta2) * (g * g - v)
        p -= lr_t * m / (self.cp.sqrt(v) + eps_t)


# ------------------------------------------------------------------ the self-checks
# Each runs its kernel through the same launch code as the real calls (which compiles it: CuPy
# compiles lazily) on a small input drawn from a seeded generator and moved with cupy.asarray, and
# computes the reference on the same input with the Array API code; it returns None when the two
# agree within the tolerances above, else the reason. An exception is a failure too.


def _draw(fast, dtype, shape, kind="normal", scale=1.0, seed=SEED):
    rng = random.Random(seed)
    count = math.prod(shape)
    if kind == "normal":
        values = [scale * rng.gauss(0.0, 1.0) for _ in range(count)]
    else:  # uniform on [0, scale)
        values = [scale * rng.random() for _ in range(count)]
    return fast.cp.asarray(values, dtype=dtype).reshape(shape)


def _compare(fast, label, got, want, scale, ulps, dtype):
    """None when |got − want| ≤ ulps·ε·scale everywhere (NaN fails), else the reason. The check's
    host read: one count."""
    cp = fast.cp
    if tuple(got.shape) != tuple(want.shape):
        return f"{label} has shape {tuple(got.shape)}, the reference {tuple(want.shape)}"
    err = cp.abs(got.astype(cp.float64) - want.astype(cp.float64))
    tol = ulps * EPS[dtype.name]
    bad = int(cp.count_nonzero(~(err <= tol * scale)))
    if bad == 0:
        return None
    allowed = "exactly" if ulps == 0 else f"within {ulps} ε of the terms' magnitude"
    return f"{label}: {bad} of {err.size} values not {allowed} (largest difference {float(cp.max(err)):.3g})"


def _not_covered(dtype):
    return None if dtype.name in EPS else f"the self-check covers float32 and float64, not {dtype.name}"


def _check_adam(fast, dtype):
    cp, n = fast.cp, 1031
    beta1, beta2, step = 0.9, 0.999, 10  # η_t and ε_t as Adam computes them at step 10
    correction = math.sqrt(1.0 - beta2**step)
    lr_t, eps_t = 1e-3 * correction / (1.0 - beta1**step), 1e-8 * correction
    p0, g, m0 = (_draw(fast, dtype, (n,), seed=SEED + i) for i in range(3))
    m0 = m0 * 0.1
    v0 = _draw(fast, dtype, (n,), "uniform", 0.01, seed=SEED + 3)
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    fast._adam(p, g, m, v, lr_t, beta1, beta2, eps_t)
    xp = array_api_compat.array_namespace(p0)
    # the reference: optim.Adam's per-parameter path
    want_m = m0 + (1.0 - beta1) * (g - m0)
    want_v = v0 + (1.0 - beta2) * (g * g - v0)
    want_p = p0 - lr_t * want_m / (xp.sqrt(want_v) + eps_t)
    f64 = [a.astype(cp.float64) for a in (p0, g, m0, v0, want_p)]
    scales = {
        "m": cp.abs(f64[2]) + cp.abs(f64[1]),
        "v": f64[3] + f64[1] * f64[1],
        "p": cp.abs(f64[0]) + cp.abs(f64[0] - f64[4]),
    }
    for label, got, want in (("m", m, want_m), ("v", v, want_v), ("p", p, want_p)):
        reason = _compare(fast, label, got, want, scales[label], ADAM_ULPS, dtype)
        if reason:
            return reason
    return None


def _check_bias_relu(fast, dtype):
    z0 = _draw(fast, dtype, (40, 33))
    b = _draw(fast, dtype, (33,), seed=SEED + 1)
    z = z0.copy()
    fast._bias_relu(b, z)
    xp = array_api_compat.array_namespace(z0)
    want = xp.maximum(z0 + b, 0.0)  # Dense's z + b, then ReLU's maximum(z, 0)
    return _compare(fast, "z", z, want, 1.0, 0, dtype)


def _check_relu_backward(fast, dtype):
    da = _draw(fast, dtype, (40, 33), seed=SEED + 1)
    xp = array_api_compat.array_namespace(da)
    a = xp.maximum(_draw(fast, dtype, (40, 33)), 0.0)  # activations: about half exactly 0
    out = fast.cp.full((40, 33), float("nan"), dtype=dtype)
    fast._relu_backward(a, da, out)
    return _compare(fast, "delta", out, xp.where(a > 0, da, 0.0), 1.0, 0, dtype)


def _check_softmax_xent(fast, dtype):
    cp, batch, classes = fast.cp, 300, 10  # 300 rows: two blocks of THREADS, the second partial
    z = _draw(fast, dtype, (batch, classes), scale=2.0)
    rng = random.Random(SEED + 1)
    labels = cp.asarray([rng.randrange(classes) for _ in range(batch)], dtype=cp.int64)
    delta = cp.full((batch, classes), float("nan"), dtype=dtype)
    loss = fast._softmax_xent(z, labels, delta)
    want_loss, want_delta = fast._reference(z).softmax_cross_entropy(z, labels)
    if tuple(loss.shape) != () or loss.dtype != dtype:
        return f"the loss is of shape {tuple(loss.shape)} and {loss.dtype}, not a 0-d {dtype.name} array"
    onehot = (labels.reshape(batch, 1) == cp.arange(classes, dtype=cp.int64)).astype(cp.float64)
    # δ of each row is p − onehot over B: the error scales with p, which is |δ| + onehot/B
    scale = cp.abs(want_delta.astype(cp.float64)) + onehot / batch
    reason = _compare(fast, "delta", delta, want_delta, scale, SOFTMAX_ULPS, dtype)
    if reason:
        return reason
    # the loss: a mean of B non-negative rows, each off by up to about |log p|·ε
    return _compare(fast, "loss", loss, want_loss, 1.0 + cp.abs(want_loss.astype(cp.float64)), SOFTMAX_ULPS, dtype)


_SELF_CHECKS = {
    "adam": _check_adam,
    "bias_relu": _check_bias_relu,
    "relu_backward": _check_relu_backward,
    "softmax_xent": _check_softmax_xent,
}
