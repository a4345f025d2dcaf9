"""Residual blocks: y = x + f(x), gradients through both paths; inner layers' parameters and state
are the model's (saved, restored, in the store's layout)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import host, on

import xpnet as xn
from xpnet.io import load_checkpoint, save_checkpoint


def _block(channels=2, bias=False):
    return xn.Residual(
        [
            xn.Conv2D(channels, channels, 3, padding="same", bias=bias),
            xn.BatchNorm(channels),
            xn.ReLU(),
            xn.Conv2D(channels, channels, 3, padding="same"),
        ]
    )


def _model(device="cpu", dtype="float32", seed=0):
    return xn.Sequential(
        [xn.Conv2D(1, 2, 3, padding=1), xn.ReLU(), _block(), xn.ReLU(), xn.GlobalAvgPool2D(), xn.Dense(2, 3)],
        device=device,
        dtype=dtype,
        seed=seed,
    )


def test_a_residual_network_passes_gradcheck_in_both_modes():
    rng = np.random.default_rng(0)
    model = _model(dtype="float64")
    x, y = rng.normal(size=(4, 1, 6, 6)), rng.integers(0, 3, 4)
    for training in (True, False):
        report = xn.gradcheck(model, "cross_entropy", x, y, training=training)
        assert report.max_error < 1e-6, report.table()
    assert set(report.errors) == {
        "0.W",
        "0.b",
        "2.0.W",
        "2.1.gamma",
        "2.1.beta",
        "2.3.W",
        "2.3.b",
        "5.W",
        "5.b",
        "input",
    }


def test_the_block_equals_pytorch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    inner = [xn.Conv2D(3, 3, 3, padding="same"), xn.Tanh(), xn.Conv2D(3, 3, 1)]
    model = xn.Sequential([xn.Residual(inner)], dtype="float64", seed=0)
    x = rng.normal(size=(2, 3, 5, 5))
    weights = [(np.array(layer.params["W"]), np.array(layer.params["b"])) for layer in (inner[0], inner[2])]
    tx = torch.tensor(x, requires_grad=True)
    tW = [(torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True)) for W, b in weights]
    f = torch.nn.functional
    ty = tx + f.conv2d(torch.tanh(f.conv2d(tx, *tW[0], padding=1)), *tW[1])
    dy = rng.normal(size=x.shape)
    ty.backward(torch.tensor(dy))
    y = model.forward(x, training=True)
    dx = model.backward(dy, input_grad=True)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    for layer, (W, b) in zip((inner[0], inner[2]), tW):
        np.testing.assert_allclose(layer.grads["W"], W.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grads["b"], b.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_inner_parameters_and_state_round_trip_through_checkpoints(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 1, 6, 6)).astype(np.float32)
    y = (x[:, 0, :3].sum(axis=(1, 2)) > 0).astype(int) + (x[:, 0, 3:].sum(axis=(1, 2)) > 0)
    model, optimizer = _model(), xn.Adam(0.01)
    history = xn.fit(model, "cross_entropy", optimizer, x, y, epochs=5, batch_size=16)
    assert history["loss"][-1] < history["loss"][0]
    assert sorted(model.named_state()) == ["2.1.running_mean", "2.1.running_var"]
    assert "2.0.W" in optimizer.state_dict()["slots"]
    save_checkpoint(tmp_path / "res.safetensors", model, optimizer)
    saved = load_checkpoint(tmp_path / "res.safetensors")
    rebuilt = saved.build_model()
    assert rebuilt.config() == model.config() and rebuilt.config()["layers"][2]["type"] == "Residual"
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(host(rebuilt.device, rebuilt.state_dict()[key]), value, err_msg=key)
    again = xn.Adam(0.01)
    saved.load_optimizer_into(again, rebuilt)
    np.testing.assert_array_equal(xn.predict(rebuilt, x), xn.predict(model, x))


def test_fast_and_reference_training_agree_and_the_layout_holds_the_inner_layers():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 48)
    trained = []
    for fast in (True, False):
        model = _model(device=xn.Device("cpu", fast=fast))
        xn.fit(model, "cross_entropy", xn.Adam(0.01), x, y, epochs=2, batch_size=16)
        trained.append({key: np.array(value) for key, value in model.state_dict().items()})
        if fast:
            assert model.store.layout == "flat"
            inner = model.layers[2].sublayers[0]
            assert np.shares_memory(inner.params["W"], model.store._flat_values)
            assert np.shares_memory(inner.grads["W"], model.store._flat_grads)
    for key in trained[0]:
        np.testing.assert_allclose(trained[0][key], trained[1][key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_the_block_runs_on_every_backend(backend):
    device = xn.Device(backend)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 1, 5, 5)).astype(np.float32)
    model, reference = _model(device=device), _model()
    out = model.forward(on(device, x), training=True)
    np.testing.assert_allclose(host(device, out), reference.forward(x, training=True), rtol=1e-4, atol=1e-5)
    back = model.backward(on(device, np.ones((3, 3))), input_grad=True)
    np.testing.assert_allclose(
        host(device, back), reference.backward(np.ones((3, 3), np.float32), input_grad=True), rtol=1e-4, atol=1e-5
    )


def test_a_block_that_changes_the_shape_is_one_clear_error():
    model = xn.Sequential([xn.Residual([xn.Dense(4, 3)])], seed=0)
    with pytest.raises(
        ValueError, match=r"^Residual: its layers turn input of shape \(2, 4\) into \(2, 3\); y = x \+ f"
    ):
        model.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"^Residual needs at least one layer$"):
        xn.Residual([])
    with pytest.raises(ValueError, match=r"^layer 0 of a Residual block must be a dict with a 'type'"):
        xn.Residual([3])
