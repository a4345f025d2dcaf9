"""CuPy fast paths: the same interface as ``_fast_numpy``, on the GPU, without host syncs.

The fused kernels are the bodies of ``_kernels``, the very text the CPU kernels are built from,
compiled by CuPy (NVRTC) with ``--fmad=false`` so that no multiply-add is contracted that the
reference code rounds twice: the Adam update in one kernel for m, v and the parameter, the bias
and ReLU after a matrix product, ReLU backward, and softmax cross-entropy one thread per row.
Products go to cuBLAS through ``cupy.matmul(..., out=)`` into buffers that live across steps.
The loss stays a device array; nothing here reads a value back to the host.

Only the backend module creates these, and only on the cupy backend; ``Device(..., fast=False)``
or XPNET_FAST=0 turns them off (the Array API reference code then runs).
"""

from __future__ import annotations

from . import _kernels

#: NVRTC options: IEEE division and square root are NVRTC's defaults; no contraction into FMA.
OPTIONS = ("--fmad=false",)
#: C++ overloads pick the float or double function from T.
PREAMBLE = "#define SQRT sqrt\n#define EXP exp\n#define LOG log\n"
THREADS = 256


def elementwise_arguments(spec: dict) -> tuple[str, str]:
    """CuPy's (in_params, out_params) for a body of ``_kernels``: inputs and scalars are read,
    outputs read and written (CuPy passes them by reference)."""
    inputs = ", ".join([f"T {name}" for name in spec["inputs"]] + [f"T {name}" for name in spec["scalars"]])
    return inputs, ", ".join(f"T {name}" for name in spec["outputs"])


def softmax_xent_source(type_name: str) -> str:
    """A kernel, one thread per row: δ rows and each row's loss (averaged on the device)."""
    return (
        _kernels.math_defines(type_name)
        + "__device__ double xent_row(const T *__restrict__ row, long long label, T *__restrict__ out, "
        + f"long long C, T inv_b) {{{_kernels.SOFTMAX_XENT_ROW}}}\n"
        + 'extern "C" __global__ void xpnet_softmax_xent(const T *__restrict__ z, const long long *__restrict__ y,\n'
        + "        T *__restrict__ delta, double *__restrict__ losses, long long B, long long C) {\n"
        + "    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
        + "    if (b < B) losses[b] = xent_row(z + b * C, y[b], delta + b * C, C, (T)1 / (T)B);\n"
        + "}\n"
    )


class CupyFastPaths:
    """Buffered and fused versions of the hot-path operations, on CuPy arrays."""

    #: What ``Device.describe`` reports for the fused kernels.
    native = "CUDA kernels"

    def __init__(self, cupy):
        self.cp = cupy
        self._elementwise = {
            name: cupy.ElementwiseKernel(
                *elementwise_arguments(spec),
                spec["body"],
                f"xpnet_{name}",
                preamble=PREAMBLE,
                options=OPTIONS,
                no_return=True,
            )
            for name, spec in (
                ("adam", _kernels.ADAM),
                ("relu_backward", _kernels.RELU_BACKWARD),
                ("bias_relu", _kernels.BIAS_RELU),
            )
        }
        self._softmax = {}
        self._losses: dict = {}

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
        """z = x Wᵀ + b into ``out`` (cuBLAS); with ``relu``, max(z, 0) in the same pass as the bias."""
        cp = self.cp
        cp.matmul(x, W.T, out=out)
        if b is not None and relu:
            self._elementwise["bias_relu"](b, out)
        elif b is not None:
            cp.add(out, b, out=out)
        elif relu:
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
        self._elementwise["relu_backward"](a, da, out)
        return out

    def softmax_cross_entropy(self, z, labels, delta):
        """The mean loss as a 0-d device array, and δ = (p − y) / B into ``delta``."""
        cp = self.cp
        if labels.dtype != cp.int64:
            labels = labels.astype(cp.int64)
        z, labels = cp.ascontiguousarray(z), cp.ascontiguousarray(labels)
        type_name = "float" if z.dtype == cp.float32 else "double"
        kernel = self._softmax.get(type_name)
        if kernel is None:
            kernel = self._softmax[type_name] = cp.RawKernel(
                softmax_xent_source(type_name), "xpnet_softmax_xent", options=OPTIONS
            )
        batch, classes = z.shape
        losses = self._losses.get(batch)
        if losses is None:
            losses = self._losses[batch] = cp.empty(batch, dtype=cp.float64)
        blocks = (batch + THREADS - 1) // THREADS
        kernel((blocks,), (THREADS,), (z, labels, delta, losses, cp.int64(batch), cp.int64(classes)))
        return cp.mean(losses).astype(z.dtype), delta

    # ------------------------------------------------------------- metrics
    @staticmethod
    def count_correct(z, labels):
        """None: the metric's own argmax and count_nonzero already run on the device with no host
        read, so there is nothing worth fusing here (the CPU fuses them to save Python calls)."""
        return None

    # ---------------------------------------------------------- optimizers
    def adam_(self, p, g, m, v, t, lr_t, beta1, beta2, eps_t):
        """One Adam step in one kernel: m, v and p read and written once each."""
        dtype = p.dtype.type
        self._elementwise["adam"](g, dtype(lr_t), dtype(1.0 - beta1), dtype(1.0 - beta2), dtype(eps_t), p, m, v)
