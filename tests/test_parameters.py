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
    assert dense.params["W"] is W  # written into the store's own array, on either layout
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


# ------------------------------------------------------------------ what review found
def test_a_layer_belongs_to_one_place_in_one_model():
    shared = xn.Dense(4, 3)
    xn.Sequential([shared, xn.ReLU(), xn.Dense(3, 2)])
    with pytest.raises(ValueError, match=r"^layer 0 \(Dense\(.*\)\) is already in another model"):
        xn.Sequential([shared])
    twice = xn.Dense(3, 3)
    with pytest.raises(ValueError, match=r"^layer 2 is the same Dense object as layer 0: each place"):
        xn.Sequential([twice, xn.ReLU(), twice])


@xn.register_optimizer
class NormScaledSGD(xn.SGD):
    """θ ← θ − η g / ‖g‖ per parameter (a LARS-like update: it needs one parameter at a time), a
    subclass of SGD, whose own update is declared elementwise."""

    def update(self, param, lr):
        from array_api_compat import array_namespace

        xp = array_namespace(param.grad)
        norm = xp.sqrt(xp.sum(param.grad * param.grad))
        return param.value - (lr / (norm + 1e-12)) * param.grad


def test_a_subclass_with_its_own_update_sees_one_parameter_at_a_time_on_every_layout():
    x, y = _data()
    trained = []
    for fast in (True, False):
        model = xn.Sequential([xn.Dense(4, 5), xn.ReLU(), xn.Dense(5, 2)], device=xn.Device("cpu", fast=fast), seed=0)
        optimizer = NormScaledSGD(0.1)
        xn.fit(model, "cross_entropy", optimizer, x, y, epochs=2, batch_size=16)
        assert [g.key for g in optimizer._groups] == ["0.W", "0.b", "2.W", "2.b"]  # not inherited groups
        trained.append({k: np.array(v) for k, v in model.named_parameters().items()})
    for key in trained[0]:
        np.testing.assert_allclose(trained[0][key], trained[1][key], rtol=1e-5, atol=1e-6, err_msg=key)


@xn.register_layer
class SignedGradient(xn.Layer):
    """y = x ⊙ s; its backward changes the gradient array after handing it over (reference code
    may): the store holds a copy of its own, so the change reaches neither layout."""

    keeps_shape = True

    def build(self, device, dtype, next_layer=None):
        super().build(device, dtype, next_layer)
        self.params["s"] = device.to_device(np.ones(4), dtype)

    def forward(self, x, training=False):
        self.x = x
        return x * self.params["s"]

    def backward(self, dy, need_input_grad=True):
        g = self.xp.sum(dy * self.x, axis=0)
        self.grads["s"] = g
        g += 1000.0  # after the hand-over: not the store's array
        return dy * self.params["s"]


def test_the_two_layouts_treat_handed_over_arrays_alike():
    x, y = _data()
    results = []
    for fast in (True, False):
        model = xn.Sequential([SignedGradient(), xn.Dense(4, 2)], device=xn.Device("cpu", fast=fast), seed=0)
        assert model.layers[1].grads == {}  # no gradient before the first backward, on either layout
        with pytest.raises(KeyError):
            model.layers[1].grads["W"]
        xn.fit(model, "cross_entropy", xn.SGD(0.1), x, y, epochs=1, batch_size=16)
        # tying weights by assignment copies values (the store keeps its own arrays), on either layout
        other = xn.Sequential([xn.Dense(4, 4), xn.Dense(4, 4)], device=xn.Device("cpu", fast=fast), seed=0)
        other.layers[1].params["W"] = other.layers[0].params["W"]
        assert other.layers[1].params["W"] is not other.layers[0].params["W"]
        results.append({k: np.array(v) for k, v in model.named_parameters().items()})
    assert np.all(np.abs(results[0]["0.s"] - 1.0) < 10)  # the +1000 never reached the update
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_state_a_layer_makes_after_it_is_built_is_saved_and_non_arrays_are_refused():
    class Peak(xn.Layer):
        keeps_shape = True

        def forward(self, x, training=False):
            if training:
                self.state["peak"] = self.xp.max(x, axis=0)  # made on the first training pass
            return x

        def backward(self, dy, need_input_grad=True):
            return dy

    model = xn.Sequential([Peak(), xn.Dense(4, 2)], seed=0)
    assert "0.peak" not in model.state_dict()
    model.forward(np.ones((3, 4), np.float32), training=True)
    assert "0.peak" in model.state_dict()
    model.layers[0].state["peak"] = 3.0
    with pytest.raises(ValueError, match=r"^layer 0 \(Peak\) holds state 'peak' that is not an array of the model"):
        model.state_dict()


def test_no_decay_must_name_the_layers_parameters():
    class Typo(xn.Dense):
        no_decay = ("bias",)

    with pytest.raises(ValueError, match=r"^layer 0 \(Typo\) lists 'bias' in no_decay, which is not one of its"):
        xn.Sequential([Typo(3, 2)])

    class Letters(xn.Dense):
        no_decay = "b"

    with pytest.raises(TypeError, match=r"^Letters.no_decay must be a tuple of parameter names, got 'b'$"):
        xn.Sequential([Letters(3, 2)])


def test_an_array_of_another_device_is_refused_by_name():
    model = xn.Sequential([xn.Dense(3, 2)], device="strict:device1", seed=0)
    with pytest.raises(
        TypeError, match=r"^the parameter 0.W must be an array of the model's device \(strict:device1\)"
    ):
        model.layers[0].params["W"] = np.zeros((2, 3), np.float32)
    elsewhere = xn.Device("strict").to_device(np.zeros((2, 3)), "float32")
    with pytest.raises(TypeError, match=r"^the gradient of 0.W must be an array of the model's device"):
        model.layers[0].grads["W"] = elsewhere


def test_the_compiled_bias_pass_never_reads_past_a_short_bias():
    ops = xn.Device("cpu", fast=True).ops
    x, W = np.ones((3, 4), np.float32), np.ones((4, 4), np.float32)
    b = np.array([5.0], np.float32)  # broadcasts in the reference: one bias for every output
    with ops.reusing():
        z = ops.affine(x, W, b, site={})
    np.testing.assert_array_equal(z, x @ W.T + b)
