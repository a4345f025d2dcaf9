"""The CNN benchmark (``xpnet bench --model cnn``): the same network and initial weights in each
implementation, and a table with the ratios."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from xpnet.cli import bench

import xpnet as xn
from xpnet.data import load_dataset


@pytest.fixture(scope="module")
def small():
    full = load_dataset("mnist")
    return dataclasses.replace(full, train=full.train.take(slice(0, 1500)), test=full.test.take(slice(0, 500)))


def test_pytorch_starts_from_xpnets_cnn(small):
    """Both networks, before any step, give the same logits on the same images."""
    if bench.available("pytorch", "cnn") is not None:
        pytest.skip(bench.available("pytorch", "cnn"))
    import torch

    initial = bench.initial_weights(3, model="cnn")
    run = bench.TorchRun(small, 100, 3, initial, model="cnn")
    images = bench.model_input(small.test.x[:64], "cnn")
    run.model.eval()
    with torch.no_grad():
        theirs = run.model(torch.from_numpy(images)).numpy()
    ours = xn.predict(bench.benchmark_model(3, model="cnn"), images)
    assert ours.shape == theirs.shape == (64, 10)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_the_cnn_benchmark_prints_xpnet_pytorch_and_the_floor(small):
    logged = []
    rows = bench.run_benchmark((250,), 2, measure_rss=False, model="cnn", data=small, log=logged.append)
    assert "sklearn: skipped, scikit-learn has no convolutional network" in logged
    assert logged[1].startswith("MNIST CNN (conv 32 3×3")
    by_name = {row["implementation"]: row for row in rows}
    expected = {"xpnet", "floor"} | ({"pytorch"} if bench.available("pytorch") is None else set())
    assert set(by_name) == expected
    for row in rows:
        assert row["seconds_per_epoch"] == row["epoch_seconds"][1] > 0
        assert row["samples_per_second"] == pytest.approx(1500 / row["seconds_per_epoch"])
    # two epochs on 1,500 images: well above chance (10%) for the trained networks
    assert by_name["xpnet"]["test_accuracy"] > 0.5
    if "pytorch" in by_name:
        assert by_name["pytorch"]["test_accuracy"] > 0.5
    lines = bench.table(rows).splitlines()
    floor = next(line for line in lines if " floor " in line).split()
    mine = by_name["xpnet"]["seconds_per_epoch"]
    assert float(floor[-1]) == pytest.approx(mine / by_name["floor"]["seconds_per_epoch"], rel=0.02)


def test_the_floor_of_the_cnn_is_its_products(small):
    """The floor's CNN epoch runs the products of the im2col form: ∂L/∂W of each layer and the
    columns' gradient of the second convolution have the shapes of the network's."""
    run = bench.FloorRun(small, 100, 0, "cnn")
    assert run.epoch() > 0
    shapes = {name: array.shape for name, array in run.buffers.items()}
    assert shapes["dW1"] == (32, 9) and shapes["dW2"] == (64, 288) and shapes["dW3"] == (10, 1600)
    assert shapes["dcols2"] == (288, 100 * 121) and shapes["y1"] == (32, 100 * 676)
