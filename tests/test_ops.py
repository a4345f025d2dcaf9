"""The seam: every Ops override equals the Array API reference (``xpnet.ops.Ops``), and the
reference computes the same on every backend as on NumPy."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import host, on

import xpnet as xn
from xpnet.ops import Ops, ops_for


def _logits(n=300, c=10, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, c)) * 3).astype(dtype)
    z[:20] = np.round(z[:20])  # ties
    return z, rng.integers(0, c, n)


def _fast_ops():
    ops = xn.Device("cpu", fast=True).ops
    if type(ops) is Ops:
        pytest.skip("the NumPy fast paths are off here")
    return ops


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_softmax_cross_entropy_equals_the_reference(dtype):
    ops, reference = _fast_ops(), Ops(xn.Device("cpu").xp)
    z, labels = _logits(dtype=dtype)
    expected_loss, expected_delta = reference.softmax_cross_entropy(z, labels)
    calls = []
    kernel = ops.fast.softmax_cross_entropy
    ops.fast.softmax_cross_entropy = lambda *a: calls.append(1) or kernel(*a)
    try:
        with ops.reusing(), Ops.trusting(labels):  # where the fused pass runs: fit's loop, labels checked
            loss, delta = ops.softmax_cross_entropy(z, labels)
            again = ops.softmax_cross_entropy(z, labels)[1]
        with ops.reusing():  # labels nobody checked: never the compiled pass (it reads row[label])
            ops.softmax_cross_entropy(z, labels)
    finally:
        del ops.fast.softmax_cross_entropy
    assert calls == [1, 1]
    assert again is not delta  # δ is the caller's: never a buffer a second call overwrites
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=tolerance)
    np.testing.assert_allclose(delta, expected_delta, rtol=tolerance, atol=tolerance)
    assert delta.dtype == dtype and np.asarray(loss).dtype == dtype
    outside = ops.softmax_cross_entropy(z, labels)  # outside reusing(): new arrays, the reference
    assert outside[1] is not delta
    np.testing.assert_array_equal(outside[1], expected_delta)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_count_correct_equals_the_reference(dtype):
    ops, reference = _fast_ops(), Ops(xn.Device("cpu").xp)
    z, labels = _logits(dtype=dtype)
    z[20, 3] = np.nan  # the first NaN wins, as in np.argmax
    labels[:30] = np.argmax(z[:30], axis=1)
    expected = int(reference.count_correct(z, labels))
    assert 30 <= expected < 300
    assert int(ops.count_correct(z, labels)) == expected
    assert int(ops.count_correct(z, labels.astype(np.int32))) == expected  # no kernel: the reference


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("batch", [1, 64, 512, 1000])
def test_numpy_batches_equal_the_reference(shuffle, batch):
    ops, reference = _fast_ops(), Ops(xn.Device("cpu").xp)
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(1000, 784)).astype(np.float32), rng.integers(0, 10, 1000)
    order = rng.permutation(1000) if shuffle else None
    expected = [(a, b, x.copy(), y.copy()) for a, b, x, y in reference.batches(X, Y, order, batch)]
    with ops.reusing(), contextlib.closing(ops.batches(X, Y, order, batch)) as batches:
        got = [(a, b, x.copy(), y.copy()) for a, b, x, y in batches]  # copies: buffers are reused
    assert [(a, b) for a, b, _, _ in got] == [(a, b) for a, b, _, _ in expected]
    for (_, _, x, y), (_, _, ex, ey) in zip(got, expected):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_a_loop_left_early_leaves_no_copy_running():
    ops = _fast_ops()
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(4000, 50)).astype(np.float32), rng.integers(0, 2, 4000)
    with ops.reusing(), contextlib.closing(ops.batches(X, Y, rng.permutation(4000), 100)) as batches:
        for step, _ in enumerate(batches):
            if step == 2:
                break
    assert ops.fast._ahead is None  # closing the generator finished the gather running ahead


def test_the_reference_is_the_same_on_every_backend(backend):
    device = xn.Device(backend)
    z, labels = _logits(n=64, c=5)
    zd, yd = on(device, z), device.to_device(labels)
    loss, delta = Ops(device.xp, device.native).softmax_cross_entropy(zd, yd)
    expected_loss, expected_delta = Ops(xn.Device("cpu").xp).softmax_cross_entropy(z, labels)
    np.testing.assert_allclose(host(device, delta), expected_delta, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(host(device, loss)), float(expected_loss), rtol=1e-6)
    assert int(host(device, device.ops.count_correct(zd, yd))) == int(np.count_nonzero(z.argmax(1) == labels))


def test_losses_and_metrics_use_the_active_ops_of_their_namespace():
    device = xn.Device("cpu", fast=True)
    z, labels = _logits(n=32, c=4)
    assert type(ops_for(z)) is Ops  # nothing active: the reference
    with device.ops.active():
        assert ops_for(z) is device.ops
        strict = xn.Device("strict")
        assert type(ops_for(on(strict, z))) is Ops  # another namespace: its own reference
    assert type(ops_for(z)) is Ops


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_numpy_affine_equals_the_reference(dtype, activation, bias):
    ops, reference = _fast_ops(), Ops(xn.Device("cpu").xp)
    rng = np.random.default_rng(5)
    x, W = rng.normal(size=(64, 30)).astype(dtype), rng.normal(size=(20, 30)).astype(dtype)
    b = rng.normal(size=20).astype(dtype) if bias else None
    site = {}  # a layer's scratch dict: where the reused buffers live
    expected = reference.affine(x, W, b, activation=activation)
    with ops.reusing():
        z = ops.affine(x, W, b, activation=activation, site=site)
        assert ops.affine(x, W, b, activation=activation, site=site) is z  # reused
    np.testing.assert_array_equal(z, expected)  # the same product, the same bias pass: bit for bit
    assert z.dtype == dtype
    delta = rng.normal(size=(64, 20)).astype(dtype)
    grad_W, grad_b, dx = reference.affine_backward(delta, x, W, bias=bias, need_dx=True)
    dW, db = np.empty_like(W), np.empty(20, dtype) if bias else None
    with ops.reusing():
        got = ops.affine_backward(delta, x, W, bias=bias, need_dx=True, dW=dW, db=db, site=site)
    assert got[0] is dW and (got[1] is db)  # into the gradient arrays given
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got[0], grad_W, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(got[2], dx, rtol=tolerance, atol=tolerance)
    if bias:
        np.testing.assert_allclose(got[1], grad_b, rtol=tolerance, atol=tolerance)
    assert ops.affine_backward(delta, x, W, bias=bias, need_dx=False, dW=dW, db=db)[2] is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_relu_and_its_backward_equal_the_reference(dtype):
    ops, reference = _fast_ops(), Ops(xn.Device("cpu").xp)
    rng = np.random.default_rng(6)
    z, da = rng.normal(size=(64, 40)).astype(dtype), rng.normal(size=(64, 40)).astype(dtype)
    z[0, :3] = [0.0, -0.0, np.nan]
    site = {}
    with ops.reusing():
        a = ops.relu(z, site=site)
        back = ops.relu_backward(da, a, site=site)
    np.testing.assert_array_equal(a, reference.relu(z))
    np.testing.assert_array_equal(back, reference.relu_backward(da, reference.relu(z)))


def test_the_model_fuses_only_declared_pairs_and_only_when_ops_can():
    """Fusion is asked for by declared capabilities (Dense absorbs a following 'relu'), never by
    sniffing types: a ReLU subclass that is another activation is not fused."""

    class Shifted(xn.ReLU):
        activation = None  # not the standard ReLU: computes its own output

        def forward(self, z, training=False, *, applied=False):
            return super().forward(z - 1.0, training)

    model = xn.Sequential([xn.Dense(4, 5), Shifted(), xn.Dense(5, 2), xn.ReLU()], device=xn.Device("cpu", fast=True))
    assert model._fusable == {2}  # Dense then the standard ReLU; the Shifted one computes its own
    x = np.random.default_rng(7).normal(size=(8, 4)).astype(np.float32)
    reference = model.forward(x, training=True)
    with model.reusing_buffers():
        np.testing.assert_array_equal(model.forward(x, training=True), reference)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_an_evaluation_pass_between_a_training_pass_and_its_backward_changes_no_gradient(fast, dropout):
    rng = np.random.default_rng(8)
    x, other = rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(40, 6)).astype(np.float32)
    delta = (rng.normal(size=(16, 3)) / 16).astype(np.float32)
    grads = []
    for interleave in (False, True):
        model = xn.mlp(6, [8, 5], 3, dropout=dropout, device=xn.Device("cpu", fast=fast), seed=1)
        with model.reusing_buffers():  # as in fit's loop, where buffers are reused
            model.forward(x, training=True)
            if interleave:
                evaluated = model.forward(other)  # a callback's prediction, say
                assert evaluated.shape == (40, 3)
            model.backward(delta)
        grads.append({k: np.array(v) for k, v in model.named_gradients().items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 6
    for key in grads[0]:
        np.testing.assert_array_equal(grads[1][key], grads[0][key])


def test_what_the_review_found_in_the_seam():
    """Subclasses do not inherit fusion; δ is the caller's own; a layer caching in a dict keeps its
    training state through an evaluation pass; labels fit did not check never reach the kernel."""

    class ReLU6(xn.ReLU):
        def forward(self, z, training=False):
            return super().forward(xn.Device("cpu").xp.minimum(z, 6.0), training)

    class Cached(xn.Layer):
        def __init__(self):
            super().__init__()
            self.cache = {}

        def forward(self, x, training=False):
            self.cache["x"] = x
            return x * 2.0

        def backward(self, dy, need_input_grad=True):
            return dy * 2.0 + 0.0 * self.cache["x"]

    fast = xn.Device("cpu", fast=True)
    model = xn.Sequential([xn.Dense(4, 5), ReLU6(), Cached(), xn.Dense(5, 2)], device=fast, seed=0)
    assert model._fusable == set()
    x = np.random.default_rng(9).normal(size=(8, 4)).astype(np.float32)
    with model.reusing_buffers():
        out = model.forward(x, training=True)
        cached = model.layers[2].cache["x"]
        model.forward(x[:3] * 5)  # an evaluation pass in between
        assert model.layers[2].cache["x"] is cached
        model.backward(np.ones_like(out) / 8)
    ops = fast.ops
    z, labels = _logits(n=8, c=3)
    with ops.reusing(), ops.active():
        first = xn.SoftmaxCrossEntropy().value_and_grad(z, labels % 3)[1]
        second = xn.SoftmaxCrossEntropy().value_and_grad(z * 2, labels % 3)[1]
        assert first is not second and not np.array_equal(first, second)
        bad = labels % 3
        bad[2] = 10**12
        with pytest.raises(ValueError, match="class label 1000000000000 is outside 0 to 2"):
            xn.SoftmaxCrossEntropy().value_and_grad(z, bad)


# ------------------------------------------------------------------ optimizer updates
def _ops_pair(native: bool):
    """(the NumPy fast Ops, with or without the compiled kernels, and the reference)."""
    from xpnet._fast_numpy import NumpyFastPaths
    from xpnet.backends.numpy import NumpyOps

    device = xn.Device("cpu")
    fast = NumpyFastPaths(native=native)
    if native and fast.native is None:
        pytest.skip("no compiled kernels here")
    return NumpyOps(device.xp, device.native, fast), Ops(device.xp)


def _moments(n, dtype, seed=7):
    rng = np.random.default_rng(seed)
    p, g, m = (rng.normal(size=n).astype(dtype) for _ in range(3))
    return p, g, m * 0.1, np.abs(rng.normal(size=n)).astype(dtype) * 0.01


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "numpy-passes"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay", [0.0, 1e-3], ids=["adam", "adamw"])
def test_numpy_adam_equals_the_reference(native, dtype, decay):
    ops, reference = _ops_pair(native)
    p, g, m, v = _moments(1000, dtype)
    mine = [a.copy() for a in (p, m, v)]
    theirs = [a.copy() for a in (p, m, v)]
    site = {}
    for step in (1, 2):  # the flat store's arrays, updated in place, twice (the scratch reused)
        args = (0.01 * step, 0.9, 0.999, 1e-8 / step)
        out = ops.adam(mine[0], g, mine[1], mine[2], *args, decay=decay, site=site)
        assert all(a is b for a, b in zip(out, mine))  # in place: the store's layout stays
        theirs = list(reference.adam(theirs[0], g, theirs[1], theirs[2], *args, decay=decay))
    eps = np.finfo(dtype).eps
    # m and v: the reference's operations in its order, bit for bit; θ's step one rounding apart
    # (ηₜ·(m/(√v+ε)) against (ηₜ·m)/(√v+ε)), so θ within a few ε of the step and of θ
    np.testing.assert_array_equal(mine[1], theirs[1])
    np.testing.assert_array_equal(mine[2], theirs[2])
    moved = float(np.max(np.abs(theirs[0] - p)))  # the largest of the two steps' sum
    np.testing.assert_allclose(mine[0], theirs[0], rtol=2 * eps, atol=4 * eps * moved)
    assert mine[0].dtype == dtype
    # arrays that are not the store's (2-D, no site): the reference's own code
    p2, m2, v2 = (a.reshape(10, 100).copy() for a in (p, m, v))
    out = ops.adam(p2, g.reshape(10, 100), m2, v2, 0.01, 0.9, 0.999, 1e-8, decay=decay)
    expected = reference.adam(*(a.reshape(10, 100).copy() for a in (p, g, m, v)), 0.01, 0.9, 0.999, 1e-8, decay=decay)
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)], ids=["plain", "heavy-ball", "nesterov"]
)
def test_the_sgd_update_on_every_backend_equals_numpys(backend, momentum, nesterov):
    device = xn.Device(backend)
    rng = np.random.default_rng(8)
    p, g, velocity = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3))
    ref = Ops(xn.Device("cpu").xp)
    expected = ref.sgd(p.copy(), g, 0.1, velocity.copy(), momentum=momentum, nesterov=nesterov)
    got = device.ops.sgd(on(device, p), on(device, g), 0.1, on(device, velocity), momentum=momentum, nesterov=nesterov)
    np.testing.assert_allclose(host(device, got[0]), expected[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(host(device, got[1]), expected[1], rtol=1e-6, atol=1e-7)


def test_the_adam_reference_on_every_backend_equals_numpys(backend):
    device = xn.Device(backend)
    p, g, m, v = _moments(300, np.float32)
    expected = Ops(xn.Device("cpu").xp).adam(p.copy(), g, m.copy(), v.copy(), 0.01, 0.9, 0.999, 1e-8, decay=1e-3)
    got = Ops(device.xp, device.native).adam(*(on(device, a) for a in (p, g, m, v)), 0.01, 0.9, 0.999, 1e-8, decay=1e-3)
    for mine, want in zip(got, expected):
        np.testing.assert_allclose(host(device, mine), want, rtol=1e-6, atol=1e-9)


def test_flat_storage_is_asked_of_the_ops():
    assert Ops(xn.Device("cpu").xp).flat_storage(10, np.float32) is None  # the reference: separate arrays
    ops, _ = _ops_pair(False)
    flat = ops.flat_storage(10, np.float32)
    assert flat.shape == (10,) and flat.dtype == np.float32 and not flat.any()
