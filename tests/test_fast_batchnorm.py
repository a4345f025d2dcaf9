"""The compiled batch normalization (NumpyOps.batch_norm and its backward) gives the Array API
reference's numbers: the same operations in the same element type, only its sums taken in
double precision."""

from __future__ import annotations

import array_api_compat.numpy as anp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fast_paths import _require_native

from xpnet._fast_numpy import NumpyFastPaths
from xpnet.backends.numpy import NumpyOps
from xpnet.ops import Ops

REFERENCE = Ops(anp)


@pytest.fixture(scope="module")
def ops():
    fast = NumpyFastPaths()
    _require_native(fast)
    return NumpyOps(anp, "cpu", fast)


def _close(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(float(np.max(np.abs(want))), 1e-30)
    assert float(np.max(np.abs(got - want))) / scale < tol


@settings(max_examples=40, deadline=None)
@given(
    shape=st.one_of(
        st.tuples(st.integers(2, 9), st.integers(1, 6)),
        st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),
    ),
    dtype=st.sampled_from([np.float32, np.float64]),
    running=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batch_norm_both_ways_matches_the_reference(ops, shape, dtype, running, seed):
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    if not running and np.prod(shape) // shape[1] < 2:
        shape = (shape[0] + 1, *shape[1:])  # training needs two values per feature
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    gamma, beta = rng.standard_normal(shape[1]).astype(dtype), rng.standard_normal(shape[1]).astype(dtype)
    mean = rng.standard_normal(shape[1]).astype(dtype) if running else None
    var = (rng.random(shape[1]) + 0.5).astype(dtype) if running else None
    tol = 1e-12 if dtype == np.float64 else 3e-5
    want = REFERENCE.batch_norm(x, gamma, beta, axes=axes, eps=1e-5, mean=mean, var=var)
    got = ops.batch_norm(x, gamma, beta, axes=axes, eps=1e-5, mean=mean, var=var)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            _close(g, w, tol)
    dy = rng.standard_normal(shape).astype(dtype)
    want_back = REFERENCE.batch_norm_backward(dy, want[1], want[2], gamma, axes=axes, batch_statistics=not running)
    got_back = ops.batch_norm_backward(dy, got[1], got[2], gamma, axes=axes, batch_statistics=not running)
    for g, w in zip(got_back, want_back):
        _close(g, w, 10 * tol)


def test_the_batch_statistics_are_the_batchs_own(ops):
    """Per channel over batch and positions: the mean and the biased variance, to float32 rounding."""
    x = np.random.default_rng(1).normal(5.0, 2.0, size=(16, 3, 7, 7)).astype(np.float32)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, x_hat, inv_std, mean, var = ops.batch_norm(x, ones, zeros, axes=(0, 2, 3), eps=1e-5)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(y, x_hat)  # γ = 1, β = 0


def test_what_the_kernel_does_not_take_goes_to_the_reference(ops):
    """Another dtype, mixed dtypes, a strided view: the reference's result."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4, 5, 5)).astype(np.float32)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    fast = ops.fast
    assert (
        fast.batch_norm(
            x[:, :, ::2],
            gamma,
            beta,
            1e-5,
            None,
            None,
            np.empty((6, 4, 3, 5), np.float32),
            np.empty((6, 4, 3, 5), np.float32),
        )
        is None
    )
    for args in (
        (x.astype(np.float16), gamma.astype(np.float16), beta.astype(np.float16)),
        (x, gamma.astype(np.float64), beta),
        (x[:, :, ::2], gamma, beta),
    ):
        want = REFERENCE.batch_norm(*args, axes=(0, 2, 3), eps=1e-5)
        got = ops.batch_norm(*args, axes=(0, 2, 3), eps=1e-5)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
