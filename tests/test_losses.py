"""Losses: the worked cross-entropy numbers, fused gradients, stability, target checks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_on_device, host, on

import xpnet as xn
from xpnet import BinaryCrossEntropy, Device, MeanSquaredError, SoftmaxCrossEntropy, get_loss


def _labels(device, values):
    return device.to_device(np.asarray(values, dtype=np.int64))


def _logits_for(probabilities):
    """Logits whose softmax is the given rows (log p is one such choice)."""
    return np.log(np.asarray(probabilities, dtype=np.float64))


@pytest.mark.parametrize(
    "probabilities, label, expected",
    [([0.659, 0.242, 0.099], 0, 0.417), ([0.95, 0.05], 0, 0.051), ([0.95, 0.05], 1, 2.996)],
    ids=["softmax-example", "confident-right", "confident-wrong"],
)
def test_cross_entropy_worked_numbers(backend, probabilities, label, expected):
    device = Device(backend)
    value = SoftmaxCrossEntropy().value(on(device, [_logits_for(probabilities)]), _labels(device, [label]))
    assert float(host(device, value)) == pytest.approx(expected, abs=5e-4)
    assert_on_device(device, value, "float32")


def test_cross_entropy_of_softmax_example_logits(backend):
    device = Device(backend)
    value = SoftmaxCrossEntropy().value(on(device, [[2.0, 1.0, 0.1]]), _labels(device, [0]))
    assert float(host(device, value)) == pytest.approx(0.417, abs=5e-4)


def test_cross_entropy_fused_gradient_is_p_minus_y_over_batch(backend):
    device = Device(backend)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4)) * 3
    y = np.array([0, 3, 1, 1, 2])
    value, grad = SoftmaxCrossEntropy().value_and_grad(on(device, z), _labels(device, y))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    one_hot = np.eye(4)[y]
    np.testing.assert_allclose(host(device, grad), (p - one_hot) / 5, rtol=1e-5, atol=1e-7)
    assert float(host(device, value)) == pytest.approx(-np.log(p[np.arange(5), y]).mean(), rel=1e-5)
    assert_on_device(device, grad, "float32")


def test_cross_entropy_accepts_probability_targets(backend):
    device = Device(backend)
    z = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]])
    one_hot = np.eye(3)[[2, 1]]
    from_labels = SoftmaxCrossEntropy().value_and_grad(on(device, z), _labels(device, [2, 1]))
    from_one_hot = SoftmaxCrossEntropy().value_and_grad(on(device, z), on(device, one_hot))
    for a, b in zip(from_labels, from_one_hot):
        np.testing.assert_allclose(host(device, a), host(device, b), rtol=1e-6, atol=1e-7)


def test_cross_entropy_is_finite_for_huge_logits(backend):
    device = Device(backend)
    value, grad = SoftmaxCrossEntropy().value_and_grad(on(device, [[1000.0, -1000.0]]), _labels(device, [1]))
    assert float(host(device, value)) == pytest.approx(2000.0)
    np.testing.assert_allclose(host(device, grad), [[1.0, -1.0]])


def test_cross_entropy_checks_shapes_and_label_range(backend):
    device = Device(backend)
    loss = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        loss.value(on(device, np.zeros((2, 3))), _labels(device, [0, 1, 2]))
    with pytest.raises(ValueError, match=r"range from 0 to 3 but the model has 3 outputs"):
        loss.check_targets(_labels(device, [0, 3, 1]), 3)
    loss.check_targets(_labels(device, [0, 2, 1]), 3)


def test_binary_cross_entropy_value_gradient_and_stability(backend):
    device = Device(backend)
    z = np.array([[-1000.0], [-2.0], [0.0], [1.4], [1000.0]])
    y = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    value, grad = BinaryCrossEntropy().value_and_grad(on(device, z), on(device, y))
    with np.errstate(over="ignore", divide="ignore"):
        p = 1 / (1 + np.exp(-z[:, 0]))
        finite_terms = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    finite_terms[0], finite_terms[4] = 1000.0, 1000.0  # the exact limits log(1 + e^1000) ≈ 1000
    assert float(host(device, value)) == pytest.approx(finite_terms.mean(), rel=1e-5)
    np.testing.assert_allclose(host(device, grad)[:, 0], (p - y) / 5, rtol=1e-5, atol=1e-8)
    assert_on_device(device, grad, "float32")
    assert tuple(grad.shape) == (5, 1)


def test_binary_cross_entropy_checks_targets(backend):
    device = Device(backend)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BinaryCrossEntropy().check_targets(on(device, [0.0, 2.0]), 1)
    with pytest.raises(ValueError, match="does not match output"):
        BinaryCrossEntropy().value(on(device, np.zeros((3, 2))), on(device, np.zeros(3)))


def test_mean_squared_error(backend):
    device = Device(backend)
    a, y = np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[0.0, 2.0], [4.0, 3.0]])
    value, grad = MeanSquaredError().value_and_grad(on(device, a), on(device, y))
    assert float(host(device, value)) == pytest.approx((1 + 0 + 1 + 4) / 4)
    np.testing.assert_allclose(host(device, grad), 2 * (a - y) / 4)
    with pytest.raises(ValueError, match="does not match output"):
        MeanSquaredError().value(on(device, a), on(device, y[:1]))


def test_losses_by_name():
    assert isinstance(get_loss("cross_entropy"), SoftmaxCrossEntropy)
    assert isinstance(get_loss("bce"), BinaryCrossEntropy)
    assert isinstance(get_loss("mse"), MeanSquaredError)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge")


def test_float64_targets_do_not_upcast_a_float32_network(backend64):
    device = Device(backend64)
    z = on(device, [[0.5, -1.0], [2.0, 0.0]])
    for loss, target in [
        (MeanSquaredError(), on(device, [[1.0, 0.0], [0.0, 1.0]], "float64")),
        (SoftmaxCrossEntropy(), on(device, [[1.0, 0.0], [0.0, 1.0]], "float64")),
        (BinaryCrossEntropy(), on(device, [[1.0, 0.0], [0.0, 1.0]], "float64")),
    ]:
        value, grad = loss.value_and_grad(z, target)
        assert_on_device(device, value, "float32")
        assert_on_device(device, grad, "float32")


def test_float_labels_for_cross_entropy_get_a_hint(backend):
    device = Device(backend)
    with pytest.raises(ValueError, match="class labels must be an integer array"):
        SoftmaxCrossEntropy().value(on(device, np.zeros((2, 3))), on(device, [0.0, 1.0]))


def _soft_targets(rng, shape, totals):
    """Probability rows of the given totals (a Dirichlet draw times each row's total)."""
    rows = rng.dirichlet(np.ones(shape[1]), size=shape[0])
    return rows * np.asarray(totals, dtype=np.float64)[:, None]


def test_cross_entropy_gradient_for_rows_not_summing_to_one_matches_central_differences(backend64):
    # L = −(1/B) Σ_i Σ_c y_ic log p_ic  ⇒  ∂L/∂z = (p · Σy − y) / B, not (p − y) / B
    device = Device(backend64)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4, 3)) * 2
    y = _soft_targets(rng, z.shape, [0.7, 1.3, 0.7, 1.3])
    loss = SoftmaxCrossEntropy()
    _, grad = loss.value_and_grad(on(device, z, "float64"), on(device, y, "float64"))
    grad = host(device, grad)

    eps, numeric = 1e-6, np.zeros_like(z)
    for index in np.ndindex(*z.shape):
        step = np.zeros_like(z)
        step[index] = eps
        up = float(host(device, loss.value(on(device, z + step, "float64"), on(device, y, "float64"))))
        down = float(host(device, loss.value(on(device, z - step, "float64"), on(device, y, "float64"))))
        numeric[index] = (up - down) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-10)

    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(grad, (p * y.sum(axis=1, keepdims=True) - y) / 4, rtol=1e-12, atol=1e-15)
    assert np.abs((p - y) / 4 - numeric).max() > 0.01  # the one-hot formula is wrong for these rows


def test_cross_entropy_soft_targets_pass_gradcheck_through_a_model(backend64):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3))
    y = _soft_targets(rng, (6, 4), [0.7, 1.3, 1.0, 0.7, 1.3, 0.5])
    model = xn.Sequential([xn.Dense(3, 5), xn.Tanh(), xn.Dense(5, 4)], device=backend64, dtype="float64", seed=0)
    report = xn.gradcheck(model, "cross_entropy", x, y)
    assert report.max_error < 1e-7, report.table()


def test_one_hot_float_targets_give_exactly_the_integer_label_gradient(backend):
    device = Device(backend)
    rng = np.random.default_rng(5)
    z = rng.normal(size=(7, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2, 0, 3])
    loss = SoftmaxCrossEntropy()
    value_int, grad_int = loss.value_and_grad(on(device, z), _labels(device, labels))
    value_hot, grad_hot = loss.value_and_grad(on(device, z), on(device, np.eye(4)[labels]))
    np.testing.assert_array_equal(host(device, grad_hot), host(device, grad_int))
    assert float(host(device, value_hot)) == pytest.approx(float(host(device, value_int)), rel=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[0.5, -0.1, 0.6], [0.2, 0.3, 0.5]], r"probability targets must be non-negative, got values from -0.1"),
        ([[0.5, np.nan, 0.5], [0.2, 0.3, 0.5]], r"probability targets must be finite"),
        ([[0.5, np.inf, 0.5], [0.2, 0.3, 0.5]], r"probability targets must be finite"),
    ],
    ids=["negative", "nan", "inf"],
)
def test_cross_entropy_refuses_negative_or_non_finite_probability_targets(backend, bad, message):
    device = Device(backend)
    loss, z, y = SoftmaxCrossEntropy(), on(device, np.zeros((2, 3))), on(device, bad)
    with pytest.raises(ValueError, match=message):
        loss.value_and_grad(z, y)
    with pytest.raises(ValueError, match=message):
        loss.value(z, y)
    with pytest.raises(ValueError, match=message):
        loss.check_targets(y, 3)


def test_fit_refuses_negative_probability_targets_once_by_name():
    model = xn.Sequential([xn.Dense(2, 3)])
    y = np.array([[0.5, 0.5, 0.0], [1.2, -0.2, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"^y: probability targets must be non-negative, got values from -0.2"):
        xn.fit(model, "cross_entropy", "sgd", np.zeros((2, 2), dtype=np.float32), y)
