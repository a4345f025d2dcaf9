"""The CuPy fast paths give the Array API reference code's results (relative error ≤ 1e-6 in
float32), and switch off with one flag. The GPU tests skip without a CUDA device.

Each fused kernel checks itself on first use (compiled, run on a small input, compared with the
reference); a failure warns once and the reference runs. Those tests run here without a GPU, on a
stand-in for CuPy built on NumPy whose kernels can be made to fail to compile or to compute a wrong
value. (tests/test_cuda_text.py compiles the kernels' CUDA text with nvcc.)"""

from __future__ import annotations

import types
import warnings
from collections import Counter

import array_api_compat.numpy as anp
import numpy as np
import pytest

import xpnet as xn
from xpnet import _fast_cupy
from xpnet._fast_cupy import KERNELS, OPTIONS, PREAMBLE, CupyFastPaths
from xpnet.ops import BufferedOps, Ops


def _gpu():
    try:
        return xn.Device("cuda")
    except (xn.DeviceError, ImportError) as exc:
        pytest.skip(f"no CUDA device: {exc}")


def _random(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _close(fast, reference, rtol=1e-6):
    fast, reference = np.asarray(fast, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    scale = np.maximum(np.abs(reference), 1e-30)
    assert np.max(np.abs(fast - reference) / scale) <= rtol


@pytest.fixture(autouse=True)
def _fresh_self_checks(monkeypatch):
    """Each test starts as a fresh process would: no kernel checked yet."""
    monkeypatch.setattr(_fast_cupy, "_CHECKED", {})


# ------------------------------------------------------------------------------ on a GPU
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_passes_its_self_check_on_this_gpu(dtype):
    device = _gpu()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed self-check warns: make it fail the test
        for kernel in KERNELS:
            assert device.fast.available(kernel, dtype), kernel
    assert all(reason is None for reason in device.fast.checked().values())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_kernel_matches_the_reference_update(dtype):
    device = _gpu()
    cp, fast = device.backend.cupy, device.fast
    host = [np.random.default_rng(i).random(10_000).astype(dtype) for i in range(4)]
    p, g, m, v = (cp.asarray(a) for a in host)
    fast.adam_(p, g, m, v, None, 1e-3, 0.9, 0.999, 1e-8)
    hp, hg, hm, hv = host
    hm = hm + dtype(1 - 0.9) * (hg - hm)
    hv = hv + dtype(1 - 0.999) * (hg * hg - hv)
    hp = hp - dtype(1e-3) * (hm / (np.sqrt(hv) + dtype(1e-8)))
    for got, want in ((p, hp), (m, hm), (v, hv)):
        _close(cp.asnumpy(got), want)


def test_layer_kernels_match_the_reference():
    device = _gpu()
    cp, fast = device.backend.cupy, device.fast
    x, W, b = _random(33, 20), _random(17, 20, seed=1), _random(17, seed=2)
    out = fast.linear(cp.asarray(x), cp.asarray(W), cp.asarray(b), cp.empty((33, 17), np.float32), relu=True)
    _close(cp.asnumpy(out), np.maximum(x @ W.T + b, 0), rtol=1e-5)  # cuBLAS sums in its own order
    a, da = np.maximum(_random(9, 11), 0), _random(9, 11, seed=3)
    back = fast.relu_backward(cp.asarray(da), cp.asarray(a), cp.empty((9, 11), np.float32))
    np.testing.assert_array_equal(cp.asnumpy(back), np.where(a > 0, da, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_kernel_matches_the_reference(dtype):
    device = _gpu()
    cp, fast = device.backend.cupy, device.fast
    z, labels = _random(300, 10, dtype=dtype) * 4, np.random.default_rng(1).integers(0, 10, 300)
    value, delta = fast.softmax_cross_entropy(cp.asarray(z), cp.asarray(labels), cp.empty((300, 10), dtype))
    reference_value, reference_delta = xn.SoftmaxCrossEntropy().value_and_grad(z, labels)
    assert isinstance(value, cp.ndarray) and value.dtype == dtype  # no host read
    _close(float(value), float(reference_value))
    np.testing.assert_allclose(cp.asnumpy(delta), reference_delta, rtol=1e-5, atol=1e-8)


def test_training_on_the_gpu_matches_the_reference_code():
    _gpu()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)
    weights = []
    for fast in (True, False):
        device = xn.Device("cuda", fast=fast)
        assert (device.fast is not None) is fast
        model = xn.mlp(6, [16, 8], 3, device=device, seed=3)
        xn.fit(model, "cross_entropy", xn.Adam(0.01), x, y, epochs=3, batch_size=32)
        weights.append({k: device.to_host(v) for k, v in model.named_parameters().items()})
    for key, value in weights[1].items():
        np.testing.assert_allclose(weights[0][key], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- without a GPU: a stand-in for CuPy
class CompileException(Exception):
    """Stands in for cupy.cuda.compiler.CompileException, whose message is NVRTC's whole log."""


def _adam(g, lr_t, c1, c2, eps_t, p, m, v):
    mi = m + c1 * (g - m)
    vi = v + c2 * (g * g - v)
    m[...], v[...] = mi, vi
    p[...] = p - lr_t * (mi / (np.sqrt(vi) + eps_t))


def _bias_relu(b, z):
    s = z + b
    z[...] = np.where(s < 0, z.dtype.type(0), s)


def _relu_backward(a, da, out):
    out[...] = np.where(a > 0, da, out.dtype.type(0))


def _softmax_xent(grid, block, args, inv_b=None):
    """The kernel's arithmetic, for the rows its launch covers (b < grid · block)."""
    z, y, delta, losses, batch, classes = args
    rows = min(int(batch), grid[0] * block[0])
    T = z.dtype.type
    zr, yr = z[:rows], y[:rows]
    top = zr.max(axis=1, keepdims=True)
    e = np.exp(zr - top)
    total = e.sum(axis=1, keepdims=True)
    losses[:rows] = np.log(total[:, 0]).astype(np.float64) - (zr[np.arange(rows), yr] - top[:, 0]).astype(np.float64)
    d = e / total
    d[np.arange(rows), yr] -= T(1)
    delta[:rows] = d * (T(1) / T(batch) if inv_b is None else T(inv_b))


#: What each kernel computes on the stand-in: the kernels' arithmetic in NumPy, by CUDA name.
FAITHFUL = {
    "xpnet_adam": _adam,
    "xpnet_bias_relu": _bias_relu,
    "xpnet_relu_backward": _relu_backward,
    "xpnet_softmax_xent": _softmax_xent,
}

#: A realistic bug in each, for the mismatch path.
WRONG = {
    "xpnet_adam": lambda g, lr_t, c1, c2, eps_t, p, m, v: _adam(g, lr_t, c2, c1, eps_t, p, m, v),  # β's swapped
    "xpnet_bias_relu": lambda b, z: np.maximum(z, 0, out=z),  # the bias forgotten
    "xpnet_relu_backward": lambda a, da, out: np.copyto(out, np.where(a >= 0, da, 0)),  # >= for >
    "xpnet_softmax_xent": lambda grid, block, args: _softmax_xent(grid, block, args, inv_b=1.0),  # no 1/B
}


class _Elementwise:
    def __init__(self, cupy, in_params, out_params, operation, name, **options):
        self.cupy, self.name, self.operation, self.options = cupy, name, operation, options
        self.nargs = len(in_params.split(",")) + len(out_params.split(","))

    def __call__(self, *args):
        if len(args) != self.nargs:  # as CuPy refuses a wrong argument count
            raise TypeError(f"Wrong number of arguments for {self.name!r}: {len(args)}, expected {self.nargs}")
        self.cupy.launch(self.name, *args)


class _Raw:
    def __init__(self, cupy, code, name, options=()):
        self.cupy, self.code, self.name, self.options = cupy, code, name, {"options": options}

    def __call__(self, grid, block, args):
        self.cupy.launch(self.name, grid, block, args)


class FakeCupy:
    """The parts of CuPy that CupyFastPaths uses, on NumPy. Only these names, each of which CuPy has
    with the same meaning: code that reaches for anything else fails here as it would there."""

    NAMES = (
        "abs",
        "add",
        "arange",
        "asarray",
        "ascontiguousarray",
        "copyto",
        "dtype",
        "empty",
        "float32",
        "float64",
        "full",
        "int64",
        "matmul",
        "max",
        "maximum",
        "mean",
        "ndarray",
        "sqrt",
        "sum",
        "take",
        "where",
        "zeros",
    )

    def __init__(self, device_id=0, broken=(), wrong=()):
        for name in self.NAMES:
            setattr(self, name, getattr(np, name))
        self.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=device_id))
        self.broken = dict(broken)  # CUDA name -> the exception its compile raises
        self.wrong = set(wrong)  # CUDA names that compute WRONG's value
        self.launches: Counter = Counter()
        self.built: list = []
        self.reads = 0  # host reads of a device value (the self-check's counts)

    def count_nonzero(self, x):
        self.reads += 1
        return np.count_nonzero(x)

    def ElementwiseKernel(self, in_params, out_params, operation, name, **options):
        kernel = _Elementwise(self, in_params, out_params, operation, name, **options)
        self.built.append(kernel)
        return kernel

    def RawKernel(self, code, name, options=()):
        kernel = _Raw(self, code, name, options)
        self.built.append(kernel)
        return kernel

    def launch(self, name, *args):
        if name in self.broken:  # CuPy compiles on the first call
            raise self.broken[name]
        self.launches[name] += 1
        (WRONG if name in self.wrong else FAITHFUL)[name](*args)


# One call of each fast-path method, its inputs, and what the reference code computes.
def _adam_call(fast, dtype):
    rng = np.random.default_rng(5)
    p, g, m = (rng.normal(size=257).astype(dtype) for _ in range(3))
    v = rng.random(257).astype(dtype)
    want_p, want_m, want_v = p.copy(), m.copy(), v.copy()
    lr_t, beta1, beta2, eps_t = 0.01, 0.9, 0.999, 1e-8
    fast.adam_(p, g, m, v, np.empty_like(p), lr_t, beta1, beta2, eps_t)
    want_m += (1.0 - beta1) * (g - want_m)  # optim.Adam's per-parameter path
    want_v += (1.0 - beta2) * (g * g - want_v)
    want_p -= lr_t * want_m / (np.sqrt(want_v) + eps_t)
    return (p, m, v), (want_p, want_m, want_v)


def _linear_call(fast, dtype):
    x, W, b = _random(9, 5, dtype=dtype), _random(7, 5, seed=1, dtype=dtype), _random(7, seed=2, dtype=dtype)
    out = fast.linear(x, W, b, np.empty((9, 7), dtype), relu=True)
    return (out,), (np.maximum(x @ W.T + b, 0.0),)


def _relu_backward_call(fast, dtype):
    a, da = np.maximum(_random(9, 7, dtype=dtype), 0), _random(9, 7, seed=3, dtype=dtype)
    out = np.full((9, 7), np.nan, dtype)
    back = fast.relu_backward(da, a, out)
    assert back is out
    return (out,), (np.where(a > 0, da, 0.0),)


def _softmax_call(fast, dtype):
    z, labels = _random(37, 6, dtype=dtype) * 3, np.random.default_rng(4).integers(0, 6, 37)
    delta = np.full((37, 6), np.nan, dtype)
    loss, back = fast.softmax_cross_entropy(z, labels, delta)
    assert back is delta and loss.dtype == dtype
    return (loss, delta), Ops(anp).softmax_cross_entropy(z, labels)


CALLS = {
    "adam": _adam_call,
    "bias_relu": _linear_call,
    "relu_backward": _relu_backward_call,
    "softmax_xent": _softmax_call,
}


def _assert_reference(got, want, dtype):
    """Equal to the reference within 64 ε of each value or of the largest (δ's p − 1 cancels)."""
    for g, w in zip(got, want):
        tol = 64 * np.finfo(dtype).eps
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(np.max(np.abs(w))))


def _self_check_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "self-check" in str(w.message)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_a_kernel_that_works_passes_its_check_silently_and_runs(kernel, dtype):
    cupy = FakeCupy()
    fast = CupyFastPaths(cupy)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, want = CALLS[kernel](fast, dtype)
        reads = cupy.reads
        for _ in range(3):
            CALLS[kernel](fast, dtype)
    assert record == []
    name = KERNELS[kernel][0]
    assert cupy.launches[name] == 1 + 4  # the check's launch, then every call
    assert reads > 0 and cupy.reads == reads  # the check read the device once; the calls never
    assert fast.available(kernel, dtype) and fast.checked() == {(kernel, np.dtype(dtype).name): None}
    _assert_reference(got, want, dtype)
    built = [k for k in cupy.built if k.name == name]
    assert len(built) == 1 and built[0].options["options"] == OPTIONS
    if kernel != "softmax_xent":
        assert built[0].options["preamble"] == PREAMBLE


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_a_kernel_that_fails_to_compile_warns_once_and_the_reference_runs(kernel):
    name = KERNELS[kernel][0]
    log = f'/tmp/kern.cu(7): error: identifier "SQRTX" is undefined\n\n1 error detected in {name}.cu\n'
    cupy = FakeCupy(broken={name: CompileException(log)})
    fast = CupyFastPaths(cupy)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, want = CALLS[kernel](fast, np.float32)
    [warning] = record
    message = str(warning.message)
    assert warning.category is RuntimeWarning and warning.filename == __file__  # points at the caller
    assert name in message and KERNELS[kernel][1] in message and "float32" in message
    assert 'CompileException: /tmp/kern.cu(7): error: identifier "SQRTX" is undefined' in message
    assert "\n" not in message and "reference code runs instead" in message
    assert not fast.available(kernel, np.float32)
    assert fast.checked()[(kernel, "float32")].startswith("CompileException")
    _assert_reference(got, want, np.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again, want = CALLS[kernel](fast, np.float32)
    assert record == [] and cupy.launches[name] == 0  # never launched, and said once
    _assert_reference(again, want, np.float32)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_a_kernel_that_computes_a_wrong_value_is_switched_off(kernel):
    name = KERNELS[kernel][0]
    cupy = FakeCupy(wrong={name})
    fast = CupyFastPaths(cupy)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, want = CALLS[kernel](fast, np.float64)
        again, _ = CALLS[kernel](fast, np.float64)
    [warning] = record
    assert name in str(warning.message) and "values not" in str(warning.message)
    assert cupy.launches[name] == 1  # the check's launch only
    assert not fast.available(kernel, np.float64)
    _assert_reference(got, want, np.float64)
    _assert_reference(again, want, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("kernel", "path", "passes", "fails"),
    [
        ("adam", (5,), 1, 16),  # p (argument 5): within 4 ε of |p| + |step|
        ("softmax_xent", (2, 2), 16, 512),  # δ (argument 2 of the launch's args): within 128 ε of p
    ],
)
def test_the_tolerances_are_a_few_roundings(kernel, path, passes, fails, dtype, monkeypatch):
    """A kernel whose result is a few roundings off the reference passes; a few more, it fails."""
    name = KERNELS[kernel][0]
    faithful = FAITHFUL[name]
    for ulps, expect_ok in ((passes, True), (fails, False)):
        monkeypatch.setattr(_fast_cupy, "_CHECKED", {})

        def launch(*args, ulps=ulps):
            faithful(*args)
            out = args
            for i in path:
                out = out[i]
            out *= 1 + ulps * np.finfo(out.dtype).eps

        monkeypatch.setitem(FAITHFUL, name, launch)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            ok = CupyFastPaths(FakeCupy()).available(kernel, dtype)
        assert ok is expect_ok, (ulps, [str(w.message) for w in record])
        assert len(record) == (0 if expect_ok else 1)


def test_the_check_runs_once_per_process_device_and_dtype():
    broken = {"xpnet_adam": CompileException("error")}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = CupyFastPaths(FakeCupy(broken=broken))
        assert not first.available("adam", "float32")
        second = CupyFastPaths(FakeCupy(broken=broken))  # another Device on the same GPU
        assert not second.available("adam", np.float32) and not first.available("adam", np.float32)
        assert len(record) == 1
        assert not second.available("adam", np.float64)  # another dtype: its own check
        assert len(record) == 2 and "float64" in str(record[1].message)
        other = CupyFastPaths(FakeCupy(device_id=1, broken=broken))  # another GPU: its own check
        assert not other.available("adam", np.float32)
        assert len(record) == 3 and "cuda:1" in str(record[2].message)
        assert other.checked().keys() == {("adam", "float32")}
    healthy = CupyFastPaths(FakeCupy())
    assert not healthy.available("adam", np.float32)  # cuda:0's outcome holds for the process
    with pytest.raises(KeyError, match="no fused kernel 'adma'"):
        healthy.available("adma", np.float32)


def test_a_dtype_the_check_does_not_cover_is_off():
    cupy = FakeCupy()
    with pytest.warns(RuntimeWarning, match="xpnet_relu_backward .*float16.* covers float32 and float64"):
        assert not CupyFastPaths(cupy).available("relu_backward", np.float16)
    assert cupy.launches["xpnet_relu_backward"] == 0


def test_the_check_catches_a_kernel_that_leaves_rows_unwritten(monkeypatch):
    """The check fills outputs with NaN first: a launch too small for the batch is a mismatch."""
    monkeypatch.setattr(_fast_cupy, "THREADS", 64)  # 300 rows need 5 blocks of 64: 2 leave 172 rows
    monkeypatch.setitem(FAITHFUL, "xpnet_softmax_xent", lambda grid, block, args: _softmax_xent((2,), block, args))
    with pytest.warns(RuntimeWarning, match="xpnet_softmax_xent .* delta: 1720 of 3000 values not within"):
        assert not CupyFastPaths(FakeCupy()).available("softmax_xent", np.float32)


def test_the_loss_ops_fall_back_through_buffered_ops():
    """BufferedOps, the caller of the fused softmax-CE, gets the reference's numbers when it is off."""
    fast = CupyFastPaths(FakeCupy(broken={"xpnet_softmax_xent": CompileException("error")}))
    ops = BufferedOps(anp, None, fast)
    z, labels = _random(20, 4) * 2, np.random.default_rng(0).integers(0, 4, 20)
    with ops.reusing(), Ops.trusting(labels), pytest.warns(RuntimeWarning, match="xpnet_softmax_xent"):
        loss, delta = ops.softmax_cross_entropy(z, labels)  # labels fit checked: the fused pass's turn
    want_loss, want_delta = Ops(anp).softmax_cross_entropy(z, labels)
    assert loss == want_loss
    np.testing.assert_array_equal(delta, want_delta)
