"""The parameter store and layer state: the layout stays whatever a layer or an optimizer writes,
writes are checked, non-trainable state is saved and never optimized."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import host

import xpnet as xn
from xpnet.io import load_checkpoint, save_checkpoint


@xn.register_layer
class RunningCentre(xn.Layer):
    """y = x − μ with μ a running mean of the training batches (non-trainable state):
    μ ← (1 − m) μ + m · mean(x) in training, which centres on the batch mean; evaluation uses μ.
    Backward (training): ∂L/∂x = δ − mean(δ) over the batch."""

    keeps_shape = True

    def __init__(self, features: int, momentum: float = 0.5):
        super().__init__()
        self.features, self.momentum = features, momentum

    def build(self, device, dtype, next_layer=None):
        super().build(device, dtype, next_layer)
        self.state["mean"] = device.to_device(np.zeros(self.features), dtype)

    def forward(self, x, training=False):
        xp = self.xp
        if not training:
            return x - self.state["mean"]
        batch = xp.mean(x, axis=0)
        self.state["mean"] = (1.0 - self.momentum) * self.state["mean"] + self.momentum * batch
        return x - batch

    def backward(self, dy, need_input_grad=True):
        return dy - self.xp.mean(dy, axis=0)

    def config(self):
        return {"features": self.features, "momentum": self.momentum}


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 4)) + 3.0).astype(np.float32)
    return x, (x[:, 0] > 3.0).astype(np.int64)


def _model(device, seed=0):
    return xn.Sequential([RunningCentre(4), xn.Dense(4, 6), xn.ReLU(), xn.Dense(6, 2)], device=device, seed=seed)


def test_layer_state_is_saved_restored_and_never_optimized(backend, tmp_path):
    x, y = _data()
    model = _model(backend)
    optimizer = xn.Adam(0.01)
    xn.fit(model, "cross_entropy", optimizer, x, y, epochs=2, batch_size=16)
    mean = host(model.device, model.layers[0].state["mean"])
    assert np.all(np.abs(mean - 3.0) < 0.5)  # it followed the batches
    assert "0.mean" in model.state_dict() and "0.mean" not in model.named_parameters()
    assert not any(key.startswith("0.") for key in optimizer.state_dict()["slots"])  # never optimized

    save_checkpoint(tmp_path / "c.safetensors", model, optimizer)
    saved = load_checkpoint(tmp_path / "c.safetensors")
    assert sorted(saved.model) == ["0.mean", "1.W", "1.b", "3.W", "3.b"]
    rebuilt = saved.build_model(device=backend)
    np.testing.assert_array_equal(host(rebuilt.device, rebuilt.layers[0].state["mean"]), mean)
    np.testing.assert_array_equal(
        host(rebuilt.device, xn.predict(rebuilt, x)), host(model.device, xn.predict(model, x))
    )

    fresh = _model(backend, seed=1)
    fresh.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(host(fresh.device, fresh.layers[0].state["mean"]), mean)
    with pytest.raises(ValueError, match=r"missing \['0.mean'\]"):
        fresh.load_state_dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"^state '0.mean' has shape \(3,\) in the state dict but \(4,\) in the model"):
        fresh.load_state_dict({**model.state_dict(), "0.mean": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(host(fresh.device, fresh.layers[0].state["mean"]), mean)  # left as it was


def test_a_state_name_that_is_also_a_parameter_is_refused():
    class Both(xn.Layer):
        def build(self, device, dtype, next_layer=None):
            super().build(device, dtype, next_layer)
            self.params["w"] = device.to_device(np.ones(2), dtype)
            self.state["w"] = device.to_device(np.ones(2), dtype)

    with pytest.raises(ValueError, match=r"^layer 0 \(Both\) has 'w' both as a parameter and as state$"):
        xn.Sequential([Both()])


@pytest.mark.parametrize("fast", [True, False], ids=["flat", "separate"])
def test_an_evaluation_pass_between_forward_and_backward_changes_no_gradient(fast):
    x, y = _data()
    rng = np.random.default_rng(3)
    loss = xn.get_loss("cross_entropy")
    results = []
    for aside in (False, True):
        model = _model(xn.Device("cpu", fast=fast))
        with model.device.ops.reusing() if fast else _nothing():  # as fit's loop runs: buffers reused
            out = model.forward(x, training=True)
            if aside:
                model.forward(rng.normal(size=(5, 4)).astype(np.float32))  # another batch, evaluated
            _, delta = loss.value_and_grad(out, model.device.to_device(y))
            model.backward(delta)
        results.append({key: np.array(g) for key, g in model.named_gradients().items()})
    for key in results[0]:
        np.testing.assert_array_equal(results[1][key], results[0][key], err_msg=key)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("fast", [True, False], ids=["flat", "separate"])
def test_writes_to_parameters_gradients_and_slots_are_checked_and_keep_the_layout(fast):
    model = _model(xn.Device("cpu", fast=fast))
    dense = model.layers[1]
    W = dense.params["W"]
    dense.params["W"] = np.full((6, 4), 0.25, np.float32)
    assert (dense.params["W"] is W) == fast  # flat: written into the view; separate: the new array kept
    np.testing.assert_array_equal(model.named_parameters()["1.W"], np.full((6, 4), 0.25))
    with pytest.raises(ValueError, match=r"^the gradient of 1.W must have shape \(6, 4\), got \(4, 6\)$"):
        dense.grads["W"] = np.zeros((4, 6), np.float32)
    with pytest.raises(TypeError, match=r"^the gradient of 1.W must be an array of shape \(6, 4\), got list"):
        dense.grads["W"] = [[0.0] * 4] * 6
    with pytest.raises(KeyError, match=r"Dense has no parameter 'V'"):
        dense.params["V"] = np.zeros((6, 4), np.float32)
    with pytest.raises(TypeError, match=r"belong to the model's parameter store"):
        del dense.params["W"]
    with pytest.raises(TypeError, match=r"belong to the model's parameter store"):
        dense.grads.pop("W", None)
    with pytest.raises(AttributeError, match=r"Dense.grads belongs to the model's parameter store"):
        dense.grads = {}

    optimizer = xn.Adam(0.01)
    optimizer.bind(model)
    slots = model.store.groups(optimizer._slots, elementwise=False)[0].slots  # 1.W's
    with pytest.raises(ValueError, match=r"^the optimizer slot m of 1.W must have shape \(6, 4\), got \(2,\)$"):
        slots["m"] = np.zeros(2, np.float32)
    with pytest.raises(KeyError, match=r"the optimizer has no slot 'w'"):
        slots["w"] = np.zeros((6, 4), np.float32)
    if fast:  # every array still a view into the store's flat arrays
        for key, value in model.named_parameters().items():
            assert np.shares_memory(value, model.store._flat_values), key


def test_an_optimizer_step_without_gradients_names_the_parameters():
    model = xn.Sequential([xn.Dense(3, 2)], seed=0)
    with pytest.raises(RuntimeError, match=r"^no gradient for 0.W, 0.b: call model.backward before optimizer.step$"):
        xn.SGD(0.1).step(model)
