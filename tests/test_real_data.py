"""Training on the real embedded data, short runs with real accuracy floors (NumPy backend)."""

from __future__ import annotations

import pytest

import xpnet as xn
from xpnet.data import load_dataset


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def test_one_epoch_of_mnist_reaches_95_percent(mnist):
    model = xn.mlp(784, [128, 64], 10, seed=0)
    history = xn.fit(model, "cross_entropy", xn.Adam(1e-3), mnist.train.x, mnist.train.y, epochs=1, batch_size=128)
    result = xn.evaluate(model, "cross_entropy", mnist.test.x, mnist.test.y)
    assert result["accuracy"] >= 0.95
    assert result["loss"] < 0.2 and history["loss"][0] < 0.4


def test_breast_cancer_recipe_generalizes():
    ds = load_dataset("wdbc").standardized()
    model = xn.mlp(30, [16, 8], 1, dropout=0.2, seed=1)
    stopper = xn.EarlyStopping(20)
    history = xn.fit(
        model,
        "bce",
        xn.Adam(1e-3),
        ds.train.x,
        ds.train.y,
        epochs=300,
        batch_size=32,
        validation_data=(ds.val.x, ds.val.y),
        callbacks=[stopper],
    )
    assert len(history) < 300 and stopper.best_epoch is not None
    assert min(history["val_loss"]) < 0.15
    assert xn.evaluate(model, "bce", ds.test.x, ds.test.y)["binary_accuracy"] >= 0.95
