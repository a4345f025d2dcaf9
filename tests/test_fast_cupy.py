"""The CuPy fast paths give the Array API reference code's results (relative error ≤ 1e-6 in
float32), and switch off with one flag. The GPU tests skip without a CUDA device; the last tests
compile the CUDA text on this machine's C++ compiler, to catch what can be caught without one."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import xpnet as xn
from xpnet import _kernels
from xpnet._fast_cupy import PREAMBLE, elementwise_arguments, softmax_xent_source


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


# ------------------------------------------------------- without a GPU: the CUDA text compiles
_CUDA_STUBS = """
#include <cmath>
#include <cstddef>
#define __device__
#define __global__
struct dim3_ { unsigned int x; };
static dim3_ blockIdx, blockDim, threadIdx;
"""


def _compile(source: str, tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    path = tmp_path / "kernel.cpp"
    path.write_text(_CUDA_STUBS + source)
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("type_name", ["float", "double"])
def test_the_softmax_kernel_source_compiles(type_name, tmp_path):
    _compile(softmax_xent_source(type_name), tmp_path)


@pytest.mark.parametrize("type_name", ["float", "double"])
@pytest.mark.parametrize(
    "spec", [_kernels.ADAM, _kernels.RELU_BACKWARD, _kernels.BIAS_RELU], ids=["adam", "relu", "bias"]
)
def test_the_elementwise_bodies_compile_as_cupy_wraps_them(spec, type_name, tmp_path):
    """CuPy passes inputs by value and outputs by reference, with T a typedef of the dtype."""
    inputs, outputs = elementwise_arguments(spec)
    params = [f"const {p}" for p in inputs.split(", ") if p] + [p.replace("T ", "T &") for p in outputs.split(", ")]
    source = f"typedef {type_name} T;\n{PREAMBLE}__device__ void kernel({', '.join(params)}) {{ {spec['body']} }}\n"
    _compile(source, tmp_path)
