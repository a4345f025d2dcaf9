"""Backpropagation against central differences, in float64, for every layer and loss."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpnet import (
    BinaryCrossEntropy,
    Dense,
    Dropout,
    Flatten,
    LeakyReLU,
    MeanSquaredError,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
    SoftmaxCrossEntropy,
    Tanh,
    gradcheck,
)

TOLERANCE = 1e-6
SETTINGS = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

ACTIVATIONS = {
    "relu": ReLU,
    "leaky_relu": lambda: LeakyReLU(0.1),
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "softmax": Softmax,
    "dropout": lambda: Dropout(0.4),
}

shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 5),
        "n_in": st.integers(1, 6),
        "hidden": st.integers(1, 6),
        "n_out": st.integers(2, 4),
        "seed": st.integers(0, 2**31 - 1),
        "scale": st.floats(0.3, 3.0),
    }
)


def _check(backend, layers, loss, x, y, seed):
    model = Sequential(layers, device=backend, dtype="float64", seed=seed)
    report = gradcheck(model, loss, x, y)
    assert set(report.errors) == {*model.named_parameters(), "input"}
    assert report.max_error < TOLERANCE, report.table()
    return report


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@SETTINGS
@given(s=shapes)
def test_gradcheck_each_layer(backend64, activation, s):
    rng = np.random.default_rng(s["seed"])
    x = rng.normal(size=(s["batch"], s["n_in"])) * s["scale"]
    y = rng.normal(size=(s["batch"], s["n_out"]))
    layers = [Dense(s["n_in"], s["hidden"]), ACTIVATIONS[activation](), Dense(s["hidden"], s["n_out"])]
    _check(backend64, layers, MeanSquaredError(), x, y, s["seed"])


@SETTINGS
@given(s=shapes)
def test_gradcheck_dense_without_bias_and_flatten(backend64, s):
    rng = np.random.default_rng(s["seed"])
    x = rng.normal(size=(s["batch"], 2, s["n_in"])) * s["scale"]
    y = rng.normal(size=(s["batch"], s["n_out"]))
    _check(backend64, [Flatten(), Dense(2 * s["n_in"], s["n_out"], bias=False)], MeanSquaredError(), x, y, s["seed"])


@SETTINGS
@given(s=shapes)
def test_gradcheck_softmax_cross_entropy(backend64, s):
    rng = np.random.default_rng(s["seed"])
    x = rng.normal(size=(s["batch"], s["n_in"])) * s["scale"]
    labels = rng.integers(0, s["n_out"], size=s["batch"])
    layers = lambda: [Dense(s["n_in"], s["hidden"]), Tanh(), Dense(s["hidden"], s["n_out"])]  # noqa: E731
    _check(backend64, layers(), SoftmaxCrossEntropy(), x, labels, s["seed"])
    soft_targets = rng.dirichlet(np.ones(s["n_out"]), size=s["batch"])
    _check(backend64, layers(), SoftmaxCrossEntropy(), x, soft_targets, s["seed"])  # a layer is in one model


@SETTINGS
@given(s=shapes)
def test_gradcheck_binary_cross_entropy(backend64, s):
    rng = np.random.default_rng(s["seed"])
    x = rng.normal(size=(s["batch"], s["n_in"])) * s["scale"]
    y = rng.uniform(size=s["batch"])  # soft targets too: any value in [0, 1]
    layers = [Dense(s["n_in"], s["hidden"]), ReLU(), Dense(s["hidden"], 1)]
    _check(backend64, layers, BinaryCrossEntropy(), x, y, s["seed"])


def test_gradcheck_of_a_deep_mlp_reports_every_parameter(backend64):
    rng = np.random.default_rng(0)
    layers = [Dense(7, 9), ReLU(), Dropout(0.3), Dense(9, 8), LeakyReLU(), Dense(8, 6), Sigmoid(), Dense(6, 4)]
    report = _check(backend64, layers, SoftmaxCrossEntropy(), rng.normal(size=(6, 7)), rng.integers(0, 4, 6), 1)
    assert report.checked == {
        "0.W": 63,
        "0.b": 9,
        "3.W": 72,
        "3.b": 8,
        "5.W": 48,
        "5.b": 6,
        "7.W": 24,
        "7.b": 4,
        "input": 42,
    }
    assert "relative error" in report.table()


def test_gradcheck_samples_large_parameters():
    rng = np.random.default_rng(1)
    model = Sequential([Dense(40, 30), Tanh(), Dense(30, 3)], dtype="float64")
    report = gradcheck(model, "cross_entropy", rng.normal(size=(4, 40)), rng.integers(0, 3, 4), max_entries=50)
    assert report.checked["0.W"] == 50 and report.checked["2.W"] == 50 and report.checked["0.b"] == 30
    assert report.passed(TOLERANCE)


class _WrongTanh(Tanh):
    """tanh with the derivative 1 − a instead of 1 − a²: gradcheck must catch it."""

    def backward(self, da, need_input_grad=True):
        return da * (1.0 - self.a)


def test_gradcheck_catches_a_wrong_derivative():
    rng = np.random.default_rng(2)
    model = Sequential([Dense(3, 4), _WrongTanh(), Dense(4, 2)], dtype="float64")
    report = gradcheck(model, "mse", rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
    assert report.errors["2.W"] < TOLERANCE  # the last layer does not see the activation's derivative
    assert report.errors["0.W"] > 1e-2 and report.errors["input"] > 1e-2
    assert not report.passed(TOLERANCE)


def test_gradcheck_needs_float64():
    model = Sequential([Dense(2, 2)])
    with pytest.raises(ValueError, match="float64"):
        gradcheck(model, "mse", np.ones((1, 2)), np.ones((1, 2)))
