"""BatchNorm: PyTorch's numbers in both modes (running statistics included), gradcheck, its state
saved and restored, every backend, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_on_device, host, on
from hypothesis import given, settings
from hypothesis import strategies as st

import xpnet as xn
from xpnet.io import load_checkpoint, save_checkpoint


def _loaded(features, rng, dtype="float64", momentum=0.1):
    bn = xn.BatchNorm(features, momentum=momentum)
    model = xn.Sequential([bn], dtype=dtype, seed=0)
    model.load_state_dict(
        {
            "0.gamma": rng.normal(size=features),
            "0.beta": rng.normal(size=features),
            "0.running_mean": rng.normal(size=features),
            "0.running_var": np.abs(rng.normal(size=features)) + 0.5,
        }
    )
    return bn, model


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 5), (2, 4, 1, 3)])
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_batchnorm_equals_pytorch_in_both_modes(shape, training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bn, model = _loaded(4, rng)
    layer = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(host(model.device, bn.params["gamma"])))
        layer.bias.copy_(torch.tensor(host(model.device, bn.params["beta"])))
        layer.running_mean.copy_(torch.tensor(host(model.device, bn.state["running_mean"])))
        layer.running_var.copy_(torch.tensor(host(model.device, bn.state["running_var"])))
    layer.train(training)
    x = rng.normal(size=shape) * 3 + 1
    tx = torch.tensor(x, requires_grad=True)
    ty = layer(tx)
    dy = rng.normal(size=shape)
    ty.backward(torch.tensor(dy))
    for _ in range(1):
        y = model.forward(x, training=training)
        dx = model.backward(dy, input_grad=True)
    pairs = [
        (y, ty),
        (dx, tx.grad),
        (bn.grads["gamma"], layer.weight.grad),
        (bn.grads["beta"], layer.bias.grad),
        (bn.state["running_mean"], layer.running_mean),  # momentum 0.1, the unbiased variance: PyTorch's
        (bn.state["running_var"], layer.running_var),
    ]
    for mine, theirs in pairs:
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(images=st.booleans(), batch=st.integers(4, 6), features=st.integers(2, 3), seed=st.integers(0, 2**16))
def test_batchnorm_passes_gradcheck_on_random_shapes(images, batch, features, seed):
    rng = np.random.default_rng(seed)
    if images:
        x = rng.normal(size=(batch, 1, 4, 3))
        layers = [
            xn.Conv2D(1, features, 2, bias=False),
            xn.BatchNorm(features),
            xn.Tanh(),
            xn.Flatten(),
            xn.Dense(features * 6, 2),
        ]
    else:
        x = rng.normal(size=(batch, 3))
        layers = [xn.Dense(3, features, bias=False), xn.BatchNorm(features), xn.Tanh(), xn.Dense(features, 2)]
    # no bias before BatchNorm: the batch mean takes it out, so its true gradient is 0 and the
    # numeric one rounding noise (a relative error of 1 between two zeros)
    model = xn.Sequential(layers, dtype="float64", seed=0)
    for training in (True, False):
        report = xn.gradcheck(model, "cross_entropy", x, rng.integers(0, 2, batch), training=training)
        assert report.max_error < 1e-6, report.table()


def test_running_statistics_are_saved_restored_and_never_optimized(tmp_path):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(128, 1, 6, 6)) * 2 + 3).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 3).astype(int)
    model = xn.Sequential([xn.Conv2D(1, 3, 3), xn.BatchNorm(3), xn.ReLU(), xn.Flatten(), xn.Dense(48, 2)], seed=0)
    optimizer = xn.Adam(0.01)
    xn.fit(model, "cross_entropy", optimizer, x, y, epochs=3, batch_size=32)
    bn = model.layers[1]
    running = {name: host(model.device, a).copy() for name, a in bn.state.items()}
    assert np.all(np.abs(running["running_var"] - 1.0) > 1e-3)  # they moved from their start
    assert sorted(optimizer.state_dict()["slots"]) == ["0.W", "0.b", "1.beta", "1.gamma", "4.W", "4.b"]
    save_checkpoint(tmp_path / "bn.safetensors", model, optimizer)
    rebuilt = load_checkpoint(tmp_path / "bn.safetensors").build_model()
    for name, value in running.items():
        np.testing.assert_array_equal(host(rebuilt.device, rebuilt.layers[1].state[name]), value)
    np.testing.assert_array_equal(xn.predict(rebuilt, x), xn.predict(model, x))  # evaluation: the running ones


def test_an_evaluation_pass_between_forward_and_backward_leaves_batchnorms_gradients():
    rng = np.random.default_rng(2)
    x, other = rng.normal(size=(16, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    delta = rng.normal(size=(16, 2)).astype(np.float32)
    grads = []
    for aside in (False, True):
        model = xn.Sequential([xn.Dense(5, 4), xn.BatchNorm(4), xn.ReLU(), xn.Dense(4, 2)], seed=0)
        model.forward(x, training=True)
        if aside:
            model.forward(other)  # evaluation: the running statistics, and no cache of the training pass lost
        model.backward(delta)
        grads.append({key: np.array(g) for key, g in model.named_gradients().items()})
    for key in grads[0]:
        np.testing.assert_array_equal(grads[1][key], grads[0][key], err_msg=key)


def test_batchnorm_keeps_namespace_device_and_dtype_on_every_backend(backend):
    device = xn.Device(backend)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3, 4, 4)).astype(np.float32)
    model = xn.Sequential([xn.BatchNorm(3)], device=device, seed=0)
    reference = xn.Sequential([xn.BatchNorm(3)], seed=0)
    for training in (True, False):
        out = model.forward(on(device, x), training=training)
        assert_on_device(device, out, "float32")
        np.testing.assert_allclose(host(device, out), reference.forward(x, training=training), rtol=1e-5, atol=1e-5)
    for array in (*model.layers[0].state.values(), *model.layers[0].params.values()):
        assert_on_device(device, array, "float32")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: xn.BatchNorm(0), r"^BatchNorm features must be a positive integer, got 0$"),
        (lambda: xn.BatchNorm(3, momentum=0.0), r"^BatchNorm momentum must be a number in \(0, 1\], got 0.0$"),
        (lambda: xn.BatchNorm(3, eps=-1), r"^BatchNorm eps must be a positive number, got -1$"),
    ],
)
def test_bad_arguments_are_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_input_is_one_clear_error():
    model = xn.Sequential([xn.BatchNorm(3)], seed=0)
    with pytest.raises(ValueError, match=r"^x has shape \(2, 4\), but BatchNorm\(.*\) takes \(batch, 3\) or"):
        model.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"^BatchNorm in training needs more than one value per feature"):
        model.forward(np.zeros((1, 3), np.float32), training=True)


def test_gradcheck_moves_no_running_statistics_and_ignores_a_pending_training_pass():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 3))
    model = xn.Sequential([xn.Dense(3, 2, bias=False), xn.BatchNorm(2), xn.Tanh(), xn.Dense(2, 2)], dtype="float64")
    model.forward(rng.normal(size=(7, 3)), training=True)  # the caller's pass, never backpropagated
    before = {key: np.array(a) for key, a in model.named_state().items()}
    for training in (True, False):  # evaluation right after training: its backward is the evaluation pass's
        report = xn.gradcheck(model, "cross_entropy", x, [0, 1, 1, 0, 1], training=training)
        assert report.max_error < 1e-6, report.table()
    for key, value in model.named_state().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
