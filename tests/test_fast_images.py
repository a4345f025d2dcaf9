"""The compiled convolution, max-pooling and dropout paths give the Array API reference's results.

Each compiled path (``NumpyFastPaths.conv2d``, ``conv2d_backward``, ``max_pool2d``,
``max_pool2d_backward``, ``dropout``, and ``NumpyOps`` over them) is held to the reference
``Ops(array_api_compat.numpy)``: convolutions to rounding (their products add in another order),
pooling and dropout bit for bit. Where the kernels do not take the arrays, ``NumpyOps`` gives the
reference's result or raises the reference's error.
"""

from __future__ import annotations

import math

import array_api_compat.numpy as xp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fast_paths import _require_native, needs_fast

import xpnet as xn
import xpnet._fast_numpy as fast_numpy
from xpnet._fast_numpy import NumpyFastPaths
from xpnet.backends.numpy import NumpyOps
from xpnet.ops import Ops

REFERENCE = Ops(xp)
#: Tolerances of the convolutions, relative to the largest magnitude of the reference's result.
TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}
FEW = settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module")
def fast():
    return NumpyFastPaths()


@pytest.fixture
def ops(fast):
    """The NumPy Ops over the compiled kernels."""
    _require_native(fast)
    return NumpyOps(xp, "cpu", fast)


def _assert_close(got, want, dtype):
    """got equals want to the dtype's tolerance, relative to want's largest magnitude."""
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, (got.shape, want.shape, got.dtype)
    scale = float(np.max(np.abs(want), initial=0.0))
    error = float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0))
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g}, max |reference| {scale:.3g}"


def _bits(a):
    """The array's bytes as unsigned integers, to compare bit for bit (NaN and -0.0 included)."""
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def _assert_bits_equal(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _spy(monkeypatch, fast, name):
    """Record the arguments of each call to the compiled ``name`` (both types' versions)."""
    calls = []
    for suffix in ("_f32", "_f64"):
        kernel = getattr(fast.native, name + suffix)
        monkeypatch.setattr(
            fast.native,
            name + suffix,
            lambda *args, kernel=kernel, suffix=suffix: calls.append((suffix, args)) or kernel(*args),
        )
    return calls


# ------------------------------------------------------------------ convolution
@st.composite
def _convolutions(draw):
    k, padding, stride = draw(st.integers(1, 5)), draw(st.integers(0, 3)), draw(st.integers(1, 3))
    smallest = max(1, k - 2 * padding)  # at least one output position
    return {
        "batch": draw(st.integers(1, 9)),
        "channels": draw(st.integers(1, 4)),
        "out_channels": draw(st.integers(1, 4)),
        "height": draw(st.integers(smallest, 12)),
        "width": draw(st.integers(smallest, 12)),
        "k": k,
        "stride": stride,
        "padding": padding,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _conv_arrays(case, dtype):
    rng = np.random.default_rng(case["seed"])
    x = rng.normal(size=(case["batch"], case["channels"], case["height"], case["width"])).astype(dtype)
    W = rng.normal(size=(case["out_channels"], case["channels"], case["k"], case["k"])).astype(dtype)
    b = rng.normal(size=case["out_channels"]).astype(dtype)
    return x, W, b, rng


def _check_convolution(fast, x, W, b, rng, stride, padding, site):
    """The compiled forward and every backward variant against the reference, on these arrays."""
    dtype = x.dtype.type
    for bias in (b, None):
        want = REFERENCE.conv2d(x, W, bias, stride=stride, padding=padding)
        out = np.full(want.shape, np.nan, dtype)  # every element must be written
        assert fast.conv2d(x, W, bias, stride, padding, out, site) is out
        _assert_close(out, want, dtype)
    dy = rng.normal(size=want.shape).astype(dtype)
    for bias in (True, False):
        for need_dx in (True, False):
            want_dW, want_db, want_dx = REFERENCE.conv2d_backward(
                dy, x, W, stride=stride, padding=padding, bias=bias, need_dx=need_dx
            )
            dW = np.full(W.shape, np.nan, dtype)
            db = np.full(W.shape[:1], np.nan, dtype) if bias else None
            dx = np.full(x.shape, np.nan, dtype) if need_dx else None
            done = fast.conv2d_backward(dy, x, W, stride, padding, dW, db, dx, site)
            assert done is not None and done[0] is dW and done[1] is db and done[2] is dx
            _assert_close(dW, want_dW, dtype)
            if bias:
                _assert_close(db, want_db, dtype)
            else:
                assert want_db is None
            if need_dx:
                _assert_close(dx, want_dx, dtype)
            else:
                assert want_dx is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@FEW
@given(case=_convolutions())
def test_compiled_convolution_matches_the_reference(fast, dtype, case):
    _require_native(fast)
    x, W, b, rng = _conv_arrays(case, dtype)
    _check_convolution(fast, x, W, b, rng, case["stride"], case["padding"], {})


def _run_convolution(fast, x, W, b, dy, stride, padding, site):
    out = np.empty((x.shape[0], W.shape[0], dy.shape[2], dy.shape[3]), x.dtype)
    assert fast.conv2d(x, W, b, stride, padding, out, site) is out
    dW, db, dx = (np.full(shape, np.nan, x.dtype) for shape in (W.shape, W.shape[:1], x.shape))
    assert fast.conv2d_backward(dy, x, W, stride, padding, dW, db, dx, site) is not None
    return out, dW, db, dx


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_convolution_in_chunks_gives_the_one_chunk_results(fast, dtype, monkeypatch):
    _require_native(fast)
    rng = np.random.default_rng(4)
    batch, channels, k, stride, padding = 23, 3, 3, 2, 1
    x = rng.normal(size=(batch, channels, 9, 8)).astype(dtype)
    W, b = rng.normal(size=(5, channels, k, k)).astype(dtype), rng.normal(size=5).astype(dtype)
    _, _, _, _, _, rows, cols = fast.conv_geometry(x, W, stride, padding)
    depth, plane = channels * k * k, rows * cols
    dy = rng.normal(size=(batch, 5, rows, cols)).astype(dtype)
    image_bytes = depth * plane * x.itemsize  # one image's columns
    calls = _spy(monkeypatch, fast, "xpnet_im2col")
    results = {}
    for per in (batch, 5):  # one chunk; then 5, 5, 5, 5 and a last partial chunk of 3
        monkeypatch.setattr(fast_numpy, "COLUMN_BYTES", per * image_bytes + image_bytes - 1)
        calls.clear()
        site = {}
        results[per] = _run_convolution(fast, x, W, b, dy, stride, padding, site)
        assert site["columns"].shape == (depth * per * plane,)  # the columns of one chunk, no more
        chunks = math.ceil(batch / per)
        assert [args[2] for _, args in calls] == 2 * ([per] * (batch // per) + ([batch % per] if batch % per else []))
        assert len(calls) == 2 * chunks  # forward and backward: one im2col per chunk
        assert ("dW" in site) == (chunks > 1)  # the partial ∂L/∂W of the later chunks
    for one, chunked in zip(results[batch], results[5]):
        _assert_close(chunked, one, dtype)
    want = REFERENCE.conv2d(x, W, b, stride=stride, padding=padding)
    want_dW, want_db, want_dx = REFERENCE.conv2d_backward(
        dy, x, W, stride=stride, padding=padding, bias=True, need_dx=True
    )
    for got, expected in zip(results[5], (want, want_dW, want_db, want_dx)):
        _assert_close(got, expected, dtype)


def test_convolution_of_a_large_batch_splits_over_the_pool(fast, monkeypatch):
    """The default COLUMN_BYTES: several chunks of 74 images and a last one of 2, each pass split
    over the pool's threads within ``computing()``."""
    _require_native(fast)
    if fast.pool_threads() < 2:
        pytest.skip("no pool of several threads here: nothing is split")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(150, 2, 28, 28)).astype(np.float32)
    W, b = rng.normal(size=(8, 2, 3, 3)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    dy = rng.normal(size=(150, 8, 28, 28)).astype(np.float32)
    per = fast_numpy.COLUMN_BYTES // (18 * 784 * 4)
    assert per == 74
    calls = _spy(monkeypatch, fast, "xpnet_im2col")
    alone = _run_convolution(fast, x, W, b, dy, 1, 1, {})
    assert {args[-1] for _, args in calls} == {1}  # outside computing(): one thread
    calls.clear()
    site = {}
    with fast.computing():
        assert fast.threads == fast.pool_threads() > 1
        pooled = _run_convolution(fast, x, W, b, dy, 1, 1, site)
    assert fast.threads == 1
    assert [args[2] for _, args in calls] == [74, 74, 2] * 2
    assert [args[-1] > 1 for _, args in calls] == [True, True, False] * 2  # the last chunk is small
    assert site["columns"].size == 18 * 74 * 784
    want = REFERENCE.conv2d(x, W, b, stride=1, padding=1)
    want_grads = REFERENCE.conv2d_backward(dy, x, W, stride=1, padding=1, bias=True, need_dx=True)
    for got, one_thread, expected in zip(pooled, alone, (want, *want_grads)):
        _assert_close(got, one_thread, np.float32)
        _assert_close(got, expected, np.float32)


# ------------------------------------------------------------------ max pooling
@st.composite
def _poolings(draw):
    size, stride = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return {
        "shape": (
            draw(st.integers(1, 3)),
            draw(st.integers(1, 3)),
            draw(st.integers(size, 12)),
            draw(st.integers(size, 12)),
        ),
        "size": size,
        "stride": stride,
        "values": draw(st.sampled_from(["normal", "ties", "non-finite"])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _images(shape, values, seed, dtype):
    rng = np.random.default_rng(seed)
    if values == "ties":  # few distinct values: most windows have several maxima
        return rng.integers(-2, 3, size=shape).astype(dtype)
    x = rng.normal(size=shape).astype(dtype)
    if values == "non-finite":
        x[rng.random(shape) < 0.1] = np.nan
        x[rng.random(shape) < 0.05] = np.inf
        x[rng.random(shape) < 0.05] = -np.inf
        x[rng.random(shape) < 0.2] = 1.0  # ties among the finite values too
    return x


def _check_pooling(fast, x, size, stride, rng):
    want, want_winner = REFERENCE.max_pool2d(x, size=size, stride=stride)
    out = np.full(want.shape, 7.0, x.dtype)
    winner = np.full(want.shape, -5, np.int32)
    done = fast.max_pool2d(x, size, stride, out, winner)
    assert done[0] is out and done[1] is winner
    assert want_winner.dtype == np.int32
    _assert_bits_equal(out, want)
    np.testing.assert_array_equal(winner, want_winner)
    dy = rng.normal(size=want.shape).astype(x.dtype)
    dx = np.full(x.shape, np.nan, x.dtype)
    assert fast.max_pool2d_backward(dy, winner, size, stride, dx) is dx
    _assert_bits_equal(dx, REFERENCE.max_pool2d_backward(dy, want_winner, x.shape, size=size, stride=stride))
    return out, winner, dx


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@settings(max_examples=60, deadline=None)
@given(case=_poolings())
def test_compiled_max_pooling_equals_the_reference(fast, dtype, case):
    _require_native(fast)
    x = _images(case["shape"], case["values"], case["seed"], dtype)
    _check_pooling(fast, x, case["size"], case["stride"], np.random.default_rng(case["seed"] + 1))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "size, stride",
    [(2, 2), (2, 1), (3, 2), (3, 3), (1, 1), (1, 3), (2, 3), (2, 4), (4, 1), (4, 4), (3, 1)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("values", ["normal", "ties", "non-finite"])
def test_max_pooling_of_every_window_layout(fast, dtype, size, stride, values):
    """Overlapping windows (stride < size), side by side (=), with gaps (>); odd sizes leave rows
    and columns over, which no window reads (the 2 × 2 stride 2 kernel's edge too)."""
    _require_native(fast)
    x = _images((2, 3, 11, 9), values, size * 10 + stride, dtype)
    out, winner, dx = _check_pooling(fast, x, size, stride, np.random.default_rng(1))
    assert out.shape == (2, 3, (11 - size) // stride + 1, (9 - size) // stride + 1)
    if values == "ties" and size > 1:
        assert (winner > 0).any() and (winner == 0).any()
    if values == "non-finite" and size > 1:
        assert np.isnan(out).any() and np.isfinite(out).any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pooling_ties_and_nan_follow_the_reference_by_hand(fast, dtype):
    _require_native(fast)
    nan = np.nan
    x = np.array(
        [
            [1.0, 3.0, 2.0, 3.0, nan, 4.0, -np.inf, -np.inf],
            [3.0, 2.0, nan, 5.0, 1.0, 4.0, -np.inf, -np.inf],
        ],
        dtype,
    ).reshape(1, 1, 2, 8)
    out, winner = np.empty((1, 1, 1, 4), dtype), np.empty((1, 1, 1, 4), np.int32)
    fast.max_pool2d(x, 2, 2, out, winner)
    # a tie: the first 3 wins; a NaN after the best: NaN, the winner found before it stays;
    # a NaN first: NaN, winner 0; all -inf: -inf at offset 0
    np.testing.assert_array_equal(out.ravel(), np.array([3.0, nan, nan, -np.inf], dtype))
    np.testing.assert_array_equal(winner.ravel(), [1, 1, 0, 0])
    want, want_winner = REFERENCE.max_pool2d(x, size=2, stride=2)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(winner, want_winner)
    out3, winner3 = np.empty((1, 1, 1, 7), dtype), np.empty((1, 1, 1, 7), np.int32)
    fast.max_pool2d(x, 2, 1, out3, winner3)  # the general kernel on the same windows
    want3, want_winner3 = REFERENCE.max_pool2d(x, size=2, stride=1)
    _assert_bits_equal(out3[..., ::2], out)
    _assert_bits_equal(out3, want3)
    np.testing.assert_array_equal(winner3, want_winner3)


def test_max_pooling_backward_adds_overlapping_windows_and_skips_stray_winners(fast):
    _require_native(fast)
    x = np.zeros((1, 1, 3, 3), np.float64)
    x[0, 0, 1, 1] = 5.0  # the centre wins all four 2 × 2 windows at stride 1
    out, winner = np.empty((1, 1, 2, 2)), np.empty((1, 1, 2, 2), np.int32)
    fast.max_pool2d(x, 2, 1, out, winner)
    np.testing.assert_array_equal(winner.ravel(), [3, 2, 1, 0])
    dy = np.array([0.1, 0.2, 0.3, 0.4]).reshape(1, 1, 2, 2)
    dx = np.empty((1, 1, 3, 3))
    fast.max_pool2d_backward(dy, winner, 2, 1, dx)
    assert dx[0, 0, 1, 1] == ((0.4 + 0.3) + 0.2) + 0.1  # offset after offset, as the reference adds
    assert np.count_nonzero(dx) == 1
    _assert_bits_equal(dx, REFERENCE.max_pool2d_backward(dy, winner, x.shape, size=2, stride=1))
    for stride in (1, 2):  # winners outside 0 .. size² − 1 add nothing, in the reference too
        stray = np.array([-1, 4, 99, 0], np.int32).reshape(1, 1, 2, 2)
        rows = (3 - 2) // stride + 1
        stray, small_dy = stray[:, :, :rows, :rows].copy(), dy[:, :, :rows, :rows].copy()
        fast.max_pool2d_backward(small_dy, stray, 2, stride, dx)
        _assert_bits_equal(dx, REFERENCE.max_pool2d_backward(small_dy, stray, x.shape, size=2, stride=stride))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pooling_of_large_batches_splits_over_the_pool(fast, dtype, monkeypatch):
    _require_native(fast)
    if fast.pool_threads() < 2:
        pytest.skip("no pool of several threads here: nothing is split")
    forward, backward = _spy(monkeypatch, fast, "xpnet_max_pool"), _spy(monkeypatch, fast, "xpnet_max_pool_backward")
    for size, stride in ((2, 2), (3, 2), (3, 3)):
        x = _images((8, 15, 33, 31), "non-finite", size, dtype)
        with fast.computing():
            _check_pooling(fast, x, size, stride, np.random.default_rng(2))
    assert all(args[-1] > 1 for _, args in forward + backward) and len(forward) == len(backward) == 3


# ------------------------------------------------------------------ dropout
# the last two: a rank's rows of a global batch, from row 3, and from a row whose numbers wrap past 2³²
_DRAWS = [
    (0, 0),
    (0xFFFFFFFF, 0x9E3779B9),
    xn.Device("cpu", seed=5).next_draw(),
    (12345, 0xDEADBEEF),
    (12345, 0xDEADBEEF, 3),
    (99, 7, 2**31 - 1),
]


def _dropout_input(shape, dtype, seed=0):
    x = np.random.default_rng(seed).normal(size=shape).astype(dtype)
    if x.size > 3:
        x.flat[:3] = [np.nan, np.inf, -np.inf]  # dropped, they give NaN: the same NaN bits
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rate", [0.0, 0.1, 1 / 3, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(), (1,), (7, 13), (3, 5, 7), (0, 3), (1001,)], ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # inf · 0, dropped
def test_compiled_dropout_is_the_reference_bit_for_bit(fast, dtype, rate, shape):
    _require_native(fast)
    x = _dropout_input(shape, dtype)
    for draw in _DRAWS:
        want_y, want_mask = REFERENCE.dropout(x, rate, draw)
        out, mask = np.full(shape, np.nan, dtype), np.full(shape, np.nan, dtype)
        done = fast.dropout(x, rate, draw, out, mask)
        assert done[0] is out and done[1] is mask
        _assert_bits_equal(mask, want_mask)
        _assert_bits_equal(out, want_y)
    if x.size > 100:  # the kept fraction is 1 − rate (a check of the reference's numbers, too)
        kept = np.count_nonzero(mask) / mask.size
        assert abs(kept - (1 - rate)) < 0.08
        assert set(np.unique(mask)) <= {0.0, dtype(1.0 / (1.0 - rate))}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9])
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")
def test_dropout_over_the_pools_threads_is_the_reference(fast, dtype, rate, monkeypatch):
    _require_native(fast)
    if fast.pool_threads() < 2:
        pytest.skip("no pool of several threads here: nothing is split")
    calls = _spy(monkeypatch, fast, "xpnet_dropout")
    x = _dropout_input((301, 307), dtype, seed=3)  # 92,407 elements: parts end at odd places
    draw = _DRAWS[2]
    want_y, want_mask = REFERENCE.dropout(x, rate, draw)
    ops = NumpyOps(xp, "cpu", fast)
    with ops.computing():
        assert fast.threads > 1
        y, mask = ops.dropout(x, rate, draw)
    assert len(calls) == 1 and calls[0][1][-1] == fast.pool_threads() > 1
    _assert_bits_equal(mask, want_mask)
    _assert_bits_equal(y, want_y)
    calls.clear()
    y1, mask1 = ops.dropout(x, rate, draw)  # one thread: the same bits
    assert calls[0][1][-1] == 1
    _assert_bits_equal(mask1, mask)
    _assert_bits_equal(y1, y)


def _fit_recording_masks(fast, x, y, monkeypatch):
    model = xn.mlp(6, [16, 8], 3, dropout=0.3, device=xn.Device("cpu", fast=fast, seed=2), seed=3)
    ops, masks, compiled = model.device.ops, [], []
    original = ops.dropout

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        masks.append(np.array(result[1], copy=True))
        return result

    monkeypatch.setattr(ops, "dropout", recording)
    if fast:
        _require_native(model.device.fast)
        kernel = model.device.fast.dropout
        monkeypatch.setattr(model.device.fast, "dropout", lambda *a: compiled.append(kernel(*a)) or compiled[-1])
    history = xn.fit(model, "cross_entropy", xn.SGD(0.05), x, y, epochs=2, batch_size=20)
    return model, masks, compiled, history


def test_a_dropout_layers_masks_are_the_same_with_fast_paths_on_and_off(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(110, 6)).astype(np.float32)  # 5 batches of 20 and one of 10 per epoch
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    fast_model, fast_masks, compiled, fast_history = _fit_recording_masks(True, x, y, monkeypatch)
    slow_model, slow_masks, _, slow_history = _fit_recording_masks(False, x, y, monkeypatch)
    assert type(fast_model.device.ops) is NumpyOps and type(slow_model.device.ops) is Ops
    assert len(compiled) == len(fast_masks) == 2 * 2 * 6  # two Dropout layers, six batches, two epochs
    assert all(result is not None for result in compiled)  # the compiled kernel made every mask
    assert len(slow_masks) == len(fast_masks)
    for got, want in zip(fast_masks, slow_masks):
        _assert_bits_equal(got, want)
    assert {m.shape for m in fast_masks} == {(20, 16), (10, 16), (20, 8), (10, 8)}
    assert fast_model.device.rng_state()["dropout_counter"] == slow_model.device.rng_state()["dropout_counter"] == 24
    assert fast_history["loss"] == pytest.approx(slow_history["loss"], rel=1e-5)


# ------------------------------------------------------------------ fallbacks
def _outcome(call):
    """("value", result) or ("error", type, message) of ``call()``."""
    try:
        return ("value", call())
    except Exception as exc:  # the reference's error, whatever it is
        return ("error", type(exc), str(exc))


def _assert_same_outcome(got, want):
    assert got[0] == want[0], (got, want)
    if want[0] == "error":
        assert got[1:] == want[1:]
        return
    got_values = got[1] if isinstance(got[1], tuple) else (got[1],)
    want_values = want[1] if isinstance(want[1], tuple) else (want[1],)
    assert len(got_values) == len(want_values)
    for g, w in zip(got_values, want_values):
        if w is None:
            assert g is None
        else:
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)


def _conv_inputs():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 2, 7, 6)).astype(np.float32)
    W, b = rng.normal(size=(4, 2, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    return x, W, b


_X, _W, _B = _conv_inputs()
#: (x, W, b, stride, padding) that the compiled convolution does not take.
_CONV_REFUSED = {
    "transposed-x": (np.ascontiguousarray(_X.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2), _W, _B, 1, 1),
    "strided-x": (np.repeat(_X, 2, axis=3)[..., ::2], _W, _B, 2, 0),
    "transposed-W": (_X, np.ascontiguousarray(_W.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2), _B, 1, 0),
    "strided-bias": (_X, _W, np.repeat(_B, 2)[::2], 1, 1),
    "x32-W64": (_X, _W.astype(np.float64), _B, 1, 1),
    "bias64": (_X, _W, _B.astype(np.float64), 2, 1),
    "float16": (_X.astype(np.float16), _W.astype(np.float16), _B.astype(np.float16), 1, 1),
    "int-images": (np.round(_X * 3).astype(np.int64), np.round(_W * 3).astype(np.int64), None, 1, 0),
    "stride-0": (_X, _W, _B, 0, 1),
    "negative-padding": (_X, _W, _B, 1, -1),
    "bool-stride": (_X, _W, _B, True, 0),
    "bool-padding": (_X, _W, _B, 1, True),
    "float-stride": (_X, _W, _B, 2.0, 0),
    "no-output": (_X, np.ones((4, 2, 9, 9), np.float32), _B, 1, 0),
    "empty-batch": (_X[:0], _W, _B, 1, 1),
    "other-channels": (_X, np.ones((4, 3, 3, 3), np.float32), _B, 1, 1),
    "bias-of-another-length": (_X, _W, _B[:3], 1, 1),
    # strides past 2**31 (C would see 2**64 as 0, 2**63 + 1 as negative): the reference's
    "stride-2**64": (_X, _W, _B, 2**64, 0),
    "stride-2**63+1": (_X, _W, _B, 2**63 + 1, 1),
}
#: Cases refused for their bias alone: the backward pass, which takes none, is not refused.
_BIAS_ONLY = {"strided-bias", "bias64", "bias-of-another-length"}


@pytest.mark.parametrize("case", list(_CONV_REFUSED), ids=str)
def test_a_convolution_the_kernels_refuse_is_the_references(ops, case):
    x, W, b, stride, padding = _CONV_REFUSED[case]
    fast = ops.fast
    out = np.full((x.shape[0], W.shape[0], 5, 4), 7.0, x.dtype)  # the shape of any result here
    assert fast.conv2d(x, W, b, stride, padding, out, {}) is None
    assert (out == 7).all()  # nothing written
    want = _outcome(lambda: REFERENCE.conv2d(x, W, b, stride=stride, padding=padding))
    _assert_same_outcome(_outcome(lambda: ops.conv2d(x, W, b, stride=stride, padding=padding)), want)
    if case in _BIAS_ONLY:
        return
    if want[0] == "value":
        dy = np.random.default_rng(1).normal(size=want[1].shape).astype(want[1].dtype)
        dW, db, dx = np.full(W.shape, 7.0, x.dtype), np.full(W.shape[:1], 7.0, x.dtype), np.full(x.shape, 7.0, x.dtype)
        assert fast.conv2d_backward(dy, x, W, stride, padding, dW, db, dx, {}) is None
        assert (dW == 7).all() and (db == 7).all() and (dx == 7).all()  # nothing written
    else:
        dy = np.ones((x.shape[0], W.shape[0], 5, 4), x.dtype)
    for bias in (True, False):
        want = _outcome(
            lambda bias=bias: REFERENCE.conv2d_backward(
                dy, x, W, stride=stride, padding=padding, bias=bias, need_dx=True
            )
        )
        got = _outcome(
            lambda bias=bias: ops.conv2d_backward(dy, x, W, stride=stride, padding=padding, bias=bias, need_dx=True)
        )
        _assert_same_outcome(got, want)


def test_a_convolution_backward_with_refused_gradients_is_the_references(ops):
    x, W, b = _conv_inputs()
    dy = np.random.default_rng(2).normal(size=(3, 4, 7, 6)).astype(np.float32)
    want = REFERENCE.conv2d_backward(dy, x, W, stride=1, padding=1, bias=True, need_dx=True)
    for name, kwargs in {
        "strided-dy": {"dy": np.repeat(dy, 2, axis=3)[..., ::2]},
        "dy64": {"dy": dy.astype(np.float64)},
        "strided-dW": {"dW": np.empty((4, 2, 3, 6), np.float32)[..., ::2]},
        "dW64": {"dW": np.empty(W.shape, np.float64)},
        "misshapen-db": {"db": np.empty(3, np.float32)},
    }.items():
        args = {"dy": dy, "dW": None, "db": None, **kwargs}
        reference = REFERENCE.conv2d_backward(args["dy"], x, W, stride=1, padding=1, bias=True, need_dx=True)
        got = ops.conv2d_backward(
            args["dy"], x, W, stride=1, padding=1, bias=True, need_dx=True, dW=args["dW"], db=args["db"]
        )
        for g, r, w in zip(got, reference, want):
            assert g.dtype == r.dtype, name
            np.testing.assert_array_equal(g, r, err_msg=name)
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4, err_msg=name)


#: (x, size, stride) that the compiled pooling does not take.
_POOL_X = np.random.default_rng(3).normal(size=(2, 3, 8, 7)).astype(np.float32)
_POOL_REFUSED = {
    "transposed": (np.ascontiguousarray(_POOL_X.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2), 2, 2),
    "strided": (np.repeat(_POOL_X, 2, axis=2)[:, :, ::2], 3, 1),
    "float16": (_POOL_X.astype(np.float16), 2, 2),
    "int": (np.round(_POOL_X * 4).astype(np.int32), 2, 1),
    "stride-0": (_POOL_X, 2, 0),
    "size-0": (_POOL_X, 0, 1),
    "negative-stride": (_POOL_X, 2, -1),
    "bool-size": (_POOL_X, True, 1),
    "bool-stride": (_POOL_X, 2, True),
    "window-larger-than-images": (_POOL_X, 8, 1),
    "three-dimensional": (_POOL_X[0], 2, 2),
}


@pytest.mark.parametrize("case", list(_POOL_REFUSED), ids=str)
def test_a_pooling_the_kernels_refuse_is_the_references(ops, case):
    x, size, stride = _POOL_REFUSED[case]
    want = _outcome(lambda: REFERENCE.max_pool2d(x, size=size, stride=stride))
    _assert_same_outcome(_outcome(lambda: ops.max_pool2d(x, size=size, stride=stride)), want)
    if want[0] == "value":
        out, winner = np.full(want[1][0].shape, 7.0, np.float32), np.full(want[1][0].shape, 7, np.int32)
        assert ops.fast.max_pool2d(x, size, stride, out, winner) is None
        assert (out == 7).all() and (winner == 7).all()
        dy = np.random.default_rng(1).normal(size=want[1][0].shape).astype(x.dtype)
        back = _outcome(lambda: REFERENCE.max_pool2d_backward(dy, want[1][1], x.shape, size=size, stride=stride))
        got = _outcome(lambda: ops.max_pool2d_backward(dy, want[1][1], x.shape, size=size, stride=stride))
        _assert_same_outcome(got, back)


def test_a_pooling_backward_with_refused_arrays_is_the_references(ops):
    x = _POOL_X
    _, winner = REFERENCE.max_pool2d(x, size=2, stride=1)
    dy = np.random.default_rng(4).normal(size=winner.shape).astype(np.float32)
    for name, (d, w, into) in {  # into: the dtype of the dx given to the kernel
        "strided-dy": (np.repeat(dy, 2, axis=3)[..., ::2], winner, np.float32),
        "dy64-into-dx32": (dy.astype(np.float64), winner, np.float32),
        "dy16": (dy.astype(np.float16), winner, np.float16),
        "winner64": (dy, winner.astype(np.int64), np.float32),
        "strided-winner": (dy, np.repeat(winner, 2, axis=3)[..., ::2], np.float32),
        "winner-of-another-shape": (dy, winner[:, :, :-1], np.float32),
    }.items():
        dx = np.full(x.shape, 7.0, into)
        assert ops.fast.max_pool2d_backward(d, w, 2, 1, dx) is None, name
        assert (dx == 7).all()
        want = _outcome(lambda d=d, w=w: REFERENCE.max_pool2d_backward(d, w, x.shape, size=2, stride=1))
        _assert_same_outcome(_outcome(lambda d=d, w=w: ops.max_pool2d_backward(d, w, x.shape, size=2, stride=1)), want)


def test_pooling_into_refused_outputs_writes_nothing(ops):
    x = _POOL_X
    shape = (2, 3, 4, 3)
    for out, winner in (
        (np.empty(shape, np.float64), np.empty(shape, np.int32)),
        (np.empty(shape, np.float32), np.empty(shape, np.int64)),
        (np.empty((2, 3, 4, 4), np.float32), np.empty(shape, np.int32)),
        (np.empty(shape, np.float32), np.empty((2, 3, 4, 6), np.int32)[..., ::2]),
    ):
        out[...], winner[...] = 7, 7
        assert ops.fast.max_pool2d(x, 2, 2, out, winner) is None
        assert (out == 7).all() and (winner == 7).all()


@pytest.mark.parametrize(
    "case",
    ["transposed", "float16", "int", "rate-1", "negative-rate", "rate-above-1"],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf · 0; float16 numbers past 65504
def test_a_dropout_the_kernel_refuses_is_the_references(ops, case):
    x = _dropout_input((9, 11), np.float32)
    rate = {"rate-1": 1.0, "negative-rate": -0.25, "rate-above-1": 1.5}.get(case, 0.4)
    x = {"transposed": x.T, "float16": x.astype(np.float16), "int": np.arange(99).reshape(9, 11)}.get(case, x)
    draw = _DRAWS[3]
    want = _outcome(lambda: REFERENCE.dropout(x, rate, draw))
    _assert_same_outcome(_outcome(lambda: ops.dropout(x, rate, draw)), want)
    if x.dtype.kind == "f":
        out, mask = np.full(x.shape, 7.0, x.dtype), np.full(x.shape, 7.0, x.dtype)
        assert ops.fast.dropout(x, rate, draw, out, mask) is None
        assert (out == 7).all() and (mask == 7).all()


# ------------------------------------------------------------------ buffers
def test_outputs_land_in_reused_buffers_only_within_reusing(ops):
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(2, 4, 3, 8, 8)).astype(np.float32)
    W, b = rng.normal(size=(5, 3, 3, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    dy1, dy2 = rng.normal(size=(2, 4, 5, 8, 8)).astype(np.float32)
    pooled1, pooled2 = rng.normal(size=(2, 4, 5, 4, 4)).astype(np.float32)

    def step(x, dy, pooled, site):
        conv = ops.conv2d(x, W, b, stride=1, padding=1, site=site["conv"])
        grads = ops.conv2d_backward(dy, x, W, stride=1, padding=1, bias=True, need_dx=True, site=site["conv"])
        y, winner = ops.max_pool2d(dy, size=2, stride=2, site=site["pool"])
        dx = ops.max_pool2d_backward(pooled, winner, dy.shape, size=2, stride=2, site=site["pool"])
        dropped, mask = ops.dropout(x, 0.5, (7, 8), site=site["dropout"])
        return {"y": conv, "dx": grads[2], "pool": y, "winner": winner, "pool-dx": dx, "drop": dropped, "mask": mask}

    def expected(x, dy, pooled):
        y, winner = REFERENCE.max_pool2d(dy, size=2, stride=2)
        dropped, mask = REFERENCE.dropout(x, 0.5, (7, 8))
        return {
            "y": REFERENCE.conv2d(x, W, b, stride=1, padding=1),
            "dx": REFERENCE.conv2d_backward(dy, x, W, stride=1, padding=1, bias=True, need_dx=True)[2],
            "pool": y,
            "winner": winner,
            "pool-dx": REFERENCE.max_pool2d_backward(pooled, winner, dy.shape, size=2, stride=2),
            "drop": dropped,
            "mask": mask,
        }

    site = {"conv": {}, "pool": {}, "dropout": {}}
    with ops.reusing():
        first = step(x1, dy1, pooled1, site)
        second = step(x2, dy2, pooled2, site)
    for name in first:
        assert first[name] is second[name], name  # the same buffer, overwritten
    assert first["y"] is site["conv"]["y"] and first["dx"] is site["conv"]["dx"]
    assert first["pool"] is site["pool"]["y"] and first["winner"] is site["pool"]["winner"]
    assert first["mask"] is site["dropout"]["mask"] and first["drop"] is site["dropout"]["y"]
    want = expected(x2, dy2, pooled2)
    for name, value in second.items():
        if name in ("y", "dx"):
            _assert_close(value, want[name], np.float32)
        else:
            _assert_bits_equal(value, want[name])
    buffers = {name: value.copy() for name, value in second.items()}
    outside = [step(x1, dy1, pooled1, site), step(x1, dy1, pooled1, site)]
    with ops.reusing():
        no_site = [step(x1, dy1, pooled1, {"conv": None, "pool": None, "dropout": None}) for _ in range(2)]
    for one, two in (outside, no_site):
        for name in one:
            assert one[name] is not two[name] and not np.shares_memory(one[name], two[name]), name
            assert not np.shares_memory(one[name], second[name]), name
    for name, value in second.items():  # the buffers are left as the last reusing step left them
        np.testing.assert_array_equal(value, buffers[name])
    want = expected(x1, dy1, pooled1)
    for name, value in outside[1].items():
        if name in ("y", "dx"):
            _assert_close(value, want[name], np.float32)
        else:
            _assert_bits_equal(value, want[name])


def test_convolution_gradients_go_into_the_arrays_given(ops):
    x, W, b = _conv_inputs()
    dy = np.random.default_rng(6).normal(size=(3, 4, 7, 6)).astype(np.float32)
    dW, db = np.full(W.shape, np.nan, np.float32), np.full(4, np.nan, np.float32)
    got = ops.conv2d_backward(dy, x, W, stride=1, padding=1, bias=True, need_dx=False, dW=dW, db=db)
    assert got[0] is dW and got[1] is db and got[2] is None
    want = REFERENCE.conv2d_backward(dy, x, W, stride=1, padding=1, bias=True, need_dx=False)
    _assert_close(dW, want[0], np.float32)
    _assert_close(db, want[1], np.float32)
    got = ops.conv2d_backward(dy, x, W, stride=1, padding=1, bias=False, need_dx=False)
    assert got[1] is None and got[2] is None and got[0] is not dW
    _assert_close(got[0], want[0], np.float32)


# ------------------------------------------------------------------ whole models
def _train_cnn(fast, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.random((80, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 80)
    x[np.arange(80), 0, y, y] += 2.0  # something to learn
    model = xn.cnn(seed=0, device=xn.Device("cpu", fast=fast))
    compiled = []

    def spied(name, original):
        def call(*args, **kwargs):
            result = original(*args, **kwargs)
            compiled.append((name, result is not None))
            return result

        return call

    if fast:
        paths = model.device.fast
        _require_native(paths)
        for name in ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "dropout"):
            monkeypatch.setattr(paths, name, spied(name, getattr(paths, name)))
    history = xn.fit(model, "cross_entropy", xn.Adam(1e-3), x, y, epochs=2, batch_size=16)
    return model, history, compiled


def test_a_cnn_trains_to_the_same_losses_with_fast_paths_on_and_off(monkeypatch):
    fast_model, fast_history, compiled = _train_cnn(True, monkeypatch)
    slow_model, slow_history, _ = _train_cnn(False, monkeypatch)
    steps = 2 * 5  # two epochs of five batches
    # each step: two convolutions and two poolings each way (the first convolution's dx unwanted), one
    # dropout; and before the first, fit's forward of one row in evaluation (the targets' check)
    counts = {name: sum(1 for n, _ in compiled if n == name) for name, _ in compiled}
    assert counts == {
        "conv2d": 2 * steps + 2,
        "conv2d_backward": 2 * steps,
        "max_pool2d": 2 * steps + 2,
        "max_pool2d_backward": 2 * steps,
        "dropout": steps,
    }
    assert all(ran for _, ran in compiled)  # the compiled kernels took every call
    assert fast_history["loss"] == pytest.approx(slow_history["loss"], rel=1e-5)
    assert fast_history["loss"][-1] < fast_history["loss"][0]
    for key, value in slow_model.named_parameters().items():
        np.testing.assert_allclose(fast_model.named_parameters()[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


@needs_fast
def test_the_default_devices_cnn_computes_with_the_compiled_kernels(monkeypatch):
    model, reference = xn.cnn(seed=0, dropout=0.5), xn.cnn(seed=0, dropout=0.5, device=xn.Device("cpu", fast=False))
    _require_native(model.device.fast)
    im2col = _spy(monkeypatch, model.device.fast, "xpnet_im2col")
    pooled = _spy(monkeypatch, model.device.fast, "xpnet_max_pool")
    dropped = _spy(monkeypatch, model.device.fast, "xpnet_dropout")
    x = np.random.default_rng(1).random((6, 1, 28, 28)).astype(np.float32)
    for training in (False, True):
        got, want = model.forward(x, training=training), reference.forward(x, training=training)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert len(im2col) == 4 and len(pooled) == 4 and len(dropped) == 1  # evaluation passes no dropout
    _assert_bits_equal(model.layers[7].mask, reference.layers[7].mask)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("size, stride", [(2, 2), (3, 1), (2, 1)])
def test_max_pooling_of_signed_zeros_is_the_references_bit_for_bit(fast, dtype, size, stride):
    """A tie of -0.0 and +0.0 takes the sign NumPy's maximum gives (the later value's)."""
    _require_native(fast)
    x = np.random.default_rng(size + stride).choice([0.0, -0.0], size=(4, 3, 16, 16)).astype(dtype)
    assert np.signbit(x).any() and not np.signbit(x).all()
    _check_pooling(fast, x, size, stride, np.random.default_rng(3))


def test_cached_buffers_the_kernels_cannot_write_are_replaced(ops):
    """A site's buffer that is a broadcast view or read-only is not written through: a new one
    takes its place."""
    rng = np.random.default_rng(4)
    x, W = rng.normal(size=(3, 2, 6, 6)).astype(np.float32), rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    columns = 18 * 3 * 16
    site = {"columns": np.broadcast_to(np.zeros(1, np.float32), (columns,))}
    frozen = np.zeros(4 * 3 * 16, np.float32)
    frozen.flags.writeable = False
    site["products"] = frozen
    got = ops.conv2d(x, W, None, stride=1, padding=0, site=site)
    np.testing.assert_allclose(got, REFERENCE.conv2d(x, W, None, stride=1, padding=0), rtol=1e-5, atol=1e-5)
    assert site["columns"].flags.writeable and site["columns"].strides == (4,)
    assert site["products"] is not frozen and not frozen.any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_convolution_with_its_relu_in_the_same_pass_is_the_references(ops, dtype, bias):
    """``activation="relu"``: max(y, 0) computed in the rearranging pass; NaN stays NaN."""
    _require_native(ops.fast)
    rng = np.random.default_rng(7)
    x, W = rng.normal(size=(5, 3, 9, 8)).astype(dtype), rng.normal(size=(4, 3, 3, 3)).astype(dtype)
    x[0, 0, 0, 0] = np.nan
    b = rng.normal(size=4).astype(dtype) if bias else None
    want = REFERENCE.conv2d(x, W, b, stride=1, padding=1, activation="relu")
    np.testing.assert_array_equal(want, np.maximum(REFERENCE.conv2d(x, W, b, stride=1, padding=1), 0.0))
    got = ops.conv2d(x, W, b, stride=1, padding=1, activation="relu")
    assert np.isnan(got).any() and (got[~np.isnan(got)] >= 0).all() and (got == 0).any()
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    assert ops.fast.conv2d(x, W, b, 1, 1, np.empty_like(want), {}, relu=True) is not None


def test_the_model_asks_each_convolution_for_the_relu_after_it():
    model = xn.cnn(seed=0)
    fused = sorted(model._fusable)
    assert [type(model.layers[i]).__name__ for i in fused] == ["Conv2D", "Conv2D"]
    assert all(type(model.layers[i + 1]).__name__ == "ReLU" for i in fused)
    assert not xn.cnn(batch_norm=True, seed=0)._fusable  # BatchNorm stands between them
