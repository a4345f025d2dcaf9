"""The registry: layers, losses, optimizers and metrics of one's own, by name, through configs and
checkpoints; duplicate and unknown names."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from array_api_compat import array_namespace
from conftest import host

import xpnet as xn
from xpnet.io import load_checkpoint, save_checkpoint


# ------------------------------------------------------------ classes of one's own
@xn.register_layer
class Scale(xn.Layer):
    """y = x ⊙ s, one learnable factor per feature (all ``factor`` at first).

    Backward, with δ = ∂L/∂y:  ∂L/∂s = Σ_batch δ ⊙ x,  ∂L/∂x = δ ⊙ s.
    """

    default_init = None  # a Dense before it takes the initializer of the layer after it

    def __init__(self, features: int, factor: float = 1.0):
        super().__init__()
        self.features, self.factor = features, factor

    def build(self, device, dtype, next_layer=None):
        super().build(device, dtype, next_layer)
        self.params["s"] = device.to_device(np.full(self.features, self.factor), dtype)

    def forward(self, x, training=False):
        self.x = x
        return x * self.params["s"]

    def backward(self, dy, need_input_grad=True):
        self.grads["s"] = self.xp.sum(dy * self.x, axis=0)
        return dy * self.params["s"] if need_input_grad else None

    def config(self):
        return {"features": self.features, "factor": self.factor}


@xn.register_optimizer
class DecoupledSGD(xn.SGD):
    """SGD (with its momentum), then decoupled weight decay θ ← θ − ηλθ on the parameters that take
    decay (as their layer declares: ``param.decay``), written per parameter as reference code is."""

    def __init__(self, lr=0.01, *, decay: float = 0.0, **kwargs):
        super().__init__(lr, **kwargs)
        self.decay = float(decay)

    def update(self, param, lr):
        p = super().update(param, lr)
        if self.decay and param.decay:
            p = p - (lr * self.decay) * p  # a new array: the store writes it into its layout
        return p

    def hyperparameters(self):
        return {**super().hyperparameters(), "decay": self.decay}


@xn.register_optimizer
class PlainHeavyBall(xn.Optimizer):
    """v ← μ v + g, θ ← θ − η v, written as plain reference code: new arrays every step, the
    velocity replaced in ``param.slots`` and the new value returned (not elementwise-declared, so
    it sees one parameter at a time)."""

    slot_names = ("velocity",)

    def __init__(self, lr=0.01, *, momentum: float = 0.9, **kwargs):
        super().__init__(lr, **kwargs)
        self.momentum = float(momentum)

    def update(self, param, lr):
        param.slots["velocity"] = self.momentum * param.slots["velocity"] + param.grad
        return param.value - lr * param.slots["velocity"]

    def hyperparameters(self):
        return {**super().hyperparameters(), "momentum": self.momentum}


@xn.register_loss(name="half_squared_error")
class HalfSquaredError(xn.Loss):
    """L = mean((a − y)²) / 2 over all N elements;  ∂L/∂a = (a − y) / N."""

    def value_and_grad(self, a, target):
        diff = a - target
        return array_namespace(a).mean(diff * diff) * 0.5, diff * (1.0 / math.prod(a.shape))


@xn.register_metric
class MeanAbsoluteError(xn.Metric):
    """mean |a − y| over all elements."""

    name = "mean_absolute_error"

    def count(self, output, target):
        xp = array_namespace(output, target)
        return xp.sum(xp.abs(output - target)), math.prod(output.shape)


@xn.register_layer
class NumpyConfig(xn.Layer):
    """A layer whose config is not JSON (a NumPy float): refused when the model is saved."""

    def __init__(self, factor=1.0):
        super().__init__()
        self.factor = factor

    def forward(self, x, training=False):
        return x

    def backward(self, dy, need_input_grad=True):
        return dy

    def config(self):
        return {"factor": np.float32(self.factor)}


# ------------------------------------------------------------------------ helpers
def _data(n=64, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1.0)
    return x, np.minimum(y, classes - 1)


def _scaled_model(device, dtype="float32"):
    return xn.Sequential(
        [xn.Dense(5, 8), Scale(8, factor=0.5), xn.ReLU(), xn.Dense(8, 3)], device=device, dtype=dtype, seed=0
    )


def _dense_model(device):
    """Built-in layers only: on a device with fast paths, optimizers step its flat storage."""
    return xn.Sequential([xn.Dense(5, 8), xn.ReLU(), xn.Dense(8, 3)], device=device, seed=0)


def _host_parameters(model) -> dict:
    return {key: host(model.device, value).copy() for key, value in model.named_parameters().items()}


def _host_slots(optimizer, model) -> dict:
    return {
        f"{key}.{slot}": host(model.device, value).copy()
        for key, slots in optimizer.state_dict().get("slots", {}).items()
        for slot, value in slots.items()
    }


# --------------------------------------------------------------------- user layer
def test_a_user_layer_trains_saves_and_reloads(backend, tmp_path):
    x, y = _data()
    model = _scaled_model(backend)
    history = xn.fit(model, "cross_entropy", xn.SGD(0.1, momentum=0.9), x, y, epochs=2, batch_size=16)
    losses = history["loss"]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    s = host(model.device, model.layers[1].params["s"])
    assert s.shape == (8,) and np.abs(s - 0.5).max() > 1e-3  # the factors learned

    config = model.config()
    assert config["layers"][1] == {"type": "Scale", "features": 8, "factor": 0.5}
    assert json.loads(json.dumps(config)) == config

    save_checkpoint(tmp_path / "scaled.safetensors", model)
    rebuilt = load_checkpoint(tmp_path / "scaled.safetensors").build_model(device=backend)
    assert type(rebuilt.layers[1]) is Scale and rebuilt.config() == config
    before, after = _host_parameters(model), _host_parameters(rebuilt)
    assert sorted(after) == sorted(before) == ["0.W", "0.b", "1.s", "3.W", "3.b"]
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    np.testing.assert_array_equal(
        host(rebuilt.device, xn.predict(rebuilt, x)), host(model.device, xn.predict(model, x))
    )


def test_the_user_layer_backward_passes_gradcheck(backend64):
    x, y = _data(n=6)
    report = xn.gradcheck(_scaled_model(backend64, "float64"), "cross_entropy", x.astype(np.float64), y)
    assert set(report.errors) == {"0.W", "0.b", "1.s", "3.W", "3.b", "input"}
    assert report.max_error < 1e-7, report.table()


def test_a_user_layer_gives_the_same_numbers_with_fast_paths_on_and_off():
    x, y = _data()
    trained = []
    for fast in (True, False):
        model = _scaled_model(xn.Device("cpu", fast=fast))
        xn.fit(model, "cross_entropy", xn.Adam(0.01), x, y, epochs=2, batch_size=16)
        trained.append(_host_parameters(model))
    for key in trained[0]:
        np.testing.assert_allclose(trained[0][key], trained[1][key], rtol=1e-5, atol=1e-6)


def test_a_reference_style_layer_keeps_the_fast_parameter_layout():
    x, y = _data()
    model = _scaled_model(xn.Device("cpu", fast=True))
    s_before = model.layers[1].params["s"]
    xn.fit(model, "cross_entropy", xn.SGD(0.1), x, y, epochs=1, batch_size=16)
    store = model.store
    assert store.layout == "flat"
    # Scale.backward assigned a new array to grads["s"]: the store copied it into its layout
    assert model.layers[1].params["s"] is s_before and np.shares_memory(s_before, store._flat_values)
    for key, g in model.named_gradients().items():
        assert np.shares_memory(g, store._flat_grads), key
    assert np.abs(host(model.device, s_before) - 0.5).max() > 1e-3  # and the factors trained


# ----------------------------------------------------------------- user optimizer
@pytest.mark.parametrize("layers", ["dense", "scaled"])
def test_a_user_optimizer_saves_reloads_and_continues_as_an_unbroken_run(backend, layers, tmp_path):
    x, y = _data()
    make = lambda: DecoupledSGD(0.05, momentum=0.9, decay=0.1)
    _model = _dense_model if layers == "dense" else _scaled_model

    whole_model, whole_optimizer = _model(backend), make()
    whole = xn.fit(whole_model, "cross_entropy", whole_optimizer, x, y, epochs=4, batch_size=16)

    model, optimizer = _model(backend), make()
    first = xn.fit(model, "cross_entropy", optimizer, x, y, epochs=2, batch_size=16)
    np.testing.assert_array_equal(first["loss"], whole["loss"][:2])
    assert optimizer.state_dict()["type"] == "DecoupledSGD"
    assert optimizer.config() == {
        "type": "DecoupledSGD",
        "lr": 0.05,
        "weight_decay": 0.0,
        "clip_norm": None,
        "momentum": 0.9,
        "nesterov": False,
        "decay": 0.1,
    }
    path = tmp_path / "run.safetensors"
    save_checkpoint(
        path, model, optimizer, meta={"rng_state": model.device.rng_state(), "optimizer_config": optimizer.config()}
    )

    saved = load_checkpoint(path)
    resumed_model = saved.build_model(device=backend)
    resumed_model.device.set_rng_state(saved.meta["rng_state"])
    resumed = xn.Optimizer.from_config(saved.meta["optimizer_config"])
    assert type(resumed) is DecoupledSGD and resumed.decay == 0.1 and resumed.momentum == 0.9
    saved.load_optimizer_into(resumed, resumed_model)
    assert resumed.steps == optimizer.steps == 2 * 4
    slots, resumed_slots = _host_slots(optimizer, model), _host_slots(resumed, resumed_model)
    assert sorted(resumed_slots) == sorted(slots) == [f"{key}.velocity" for key in sorted(model.named_parameters())]
    for key in slots:
        np.testing.assert_array_equal(resumed_slots[key], slots[key])

    rest = xn.fit(
        resumed_model, "cross_entropy", resumed, x, y, epochs=4, batch_size=16, initial_epoch=2, history=first
    )
    np.testing.assert_array_equal(rest["loss"], whole["loss"])
    assert resumed.steps == whole_optimizer.steps == 4 * 4
    expected = _host_parameters(whole_model)
    for key, value in _host_parameters(resumed_model).items():
        np.testing.assert_array_equal(value, expected[key])


def test_decoupled_decay_shrinks_the_weights_on_the_reference_path():
    x, y = _data()
    sums = {}
    for decay in (0.0, 0.5):
        model = _dense_model(xn.Device("cpu", fast=False))
        xn.fit(model, "cross_entropy", DecoupledSGD(0.05, momentum=0.9, decay=decay), x, y, epochs=4, batch_size=16)
        sums[decay] = float(np.abs(host(model.device, model.layers[0].params["W"])).sum())
    assert sums[0.5] < 0.8 * sums[0.0]


@pytest.mark.parametrize("layers", ["dense", "scaled"])
@pytest.mark.parametrize(
    "make",
    [lambda: DecoupledSGD(0.05, momentum=0.9, decay=0.5), lambda: PlainHeavyBall(0.05)],
    ids=["decoupled", "ball"],
)
def test_a_user_optimizer_gives_the_same_numbers_with_fast_paths_on_and_off(make, layers):
    x, y = _data()
    trained = []
    _model = _dense_model if layers == "dense" else _scaled_model
    for fast in (True, False):
        model = _model(xn.Device("cpu", fast=fast))
        assert model.store.layout == ("flat" if fast else "separate")
        start = _host_parameters(model)
        xn.fit(model, "cross_entropy", make(), x, y, epochs=4, batch_size=16)
        trained.append(_host_parameters(model))
        assert np.abs(trained[-1]["0.W"] - start["0.W"]).max() > 1e-2  # it trained
    for key in trained[0]:
        np.testing.assert_allclose(trained[0][key], trained[1][key], rtol=1e-5, atol=1e-6)


def test_weight_decay_follows_what_the_layer_declares():
    """Dense declares its bias free of decay (``no_decay``); Scale declares nothing, so its factors
    decay: with gradients of zero, one decoupled step shrinks exactly the parameters that take it."""
    for fast in (True, False):
        model = _scaled_model(xn.Device("cpu", fast=fast))
        for layer in model.layers:  # zero gradients everywhere, so only the decay moves anything
            for name in layer.params:
                layer.grads[name] = model.xp.zeros_like(layer.params[name])
        before = _host_parameters(model)
        xn.AdamW(0.1, weight_decay=0.5).step(model)
        after = _host_parameters(model)
        for key in before:
            shrink = 1.0 if key.endswith(".b") else 1.0 - 0.1 * 0.5
            np.testing.assert_allclose(after[key], before[key] * shrink, rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_an_optimizer_keeping_its_own_state_trains_saves_and_reloads(fast, tmp_path):
    x, y = _data()
    model = _dense_model(xn.Device("cpu", fast=fast))
    start = _host_parameters(model)
    optimizer = PlainHeavyBall(0.05)
    xn.fit(model, "cross_entropy", optimizer, x, y, epochs=1, batch_size=16)
    assert np.abs(_host_parameters(model)["0.W"] - start["0.W"]).max() > 1e-3  # it trained
    save_checkpoint(tmp_path / "ball.safetensors", model, optimizer)
    saved = load_checkpoint(tmp_path / "ball.safetensors")
    rebuilt = saved.build_model(device=xn.Device("cpu", fast=fast))
    again = PlainHeavyBall(0.05)
    saved.load_optimizer_into(again, rebuilt)
    assert again.steps == 4
    slots = _host_slots(optimizer, model)
    assert sorted(_host_slots(again, rebuilt)) == sorted(slots) == [f"{k}.velocity" for k in sorted(start)]


# ---------------------------------------------------------------- loss and metric
def test_a_user_loss_is_found_by_name_in_fit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3))
    y = x @ np.array([[0.5], [-1.0], [2.0]]) + 0.25
    assert isinstance(xn.get_loss("half_squared_error"), HalfSquaredError)
    assert isinstance(xn.get_loss("Half_Squared_Error"), HalfSquaredError)  # names match ignoring case

    runs = {}
    for loss, lr in (("half_squared_error", 0.2), ("mse", 0.1)):  # ½ the loss at twice the rate: the same steps
        model = xn.Sequential([xn.Dense(3, 1)], dtype="float64", seed=0)
        history = xn.fit(model, loss, xn.SGD(lr), x, y, epochs=2, batch_size=8, shuffle=False)
        runs[loss] = (history["loss"], _host_parameters(model))
    (half, half_params), (mse, mse_params) = runs["half_squared_error"], runs["mse"]
    np.testing.assert_allclose(half, 0.5 * np.asarray(mse), rtol=1e-12)
    assert half[1] < half[0]
    for key in mse_params:
        np.testing.assert_allclose(half_params[key], mse_params[key], rtol=1e-12)


def test_a_user_metric_is_found_by_name():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 1))
    model = xn.Sequential([xn.Dense(3, 1)], dtype="float64", seed=0)
    logs = xn.evaluate(model, "mse", x, y, metrics=["mean_absolute_error"])
    expected = np.abs(host(model.device, xn.predict(model, x)) - y).mean()
    assert logs["mean_absolute_error"] == pytest.approx(expected, rel=1e-12)


# -------------------------------------------------------------- duplicates, unknowns
def test_a_different_class_under_a_taken_name_is_refused():
    class Dense(xn.Layer):
        pass

    with pytest.raises(ValueError, match=r"cannot register .*test_registry.*Dense as the layer 'Dense'.*taken by "):
        xn.register_layer(Dense)
    with pytest.raises(ValueError, match=r"the optimizer 'sgd': that name is taken by xpnet\.optim\.SGD \(as 'SGD'\)"):
        xn.register_optimizer(name="sgd")(type("Other", (xn.SGD,), {}))
    with pytest.raises(ValueError, match=r"the loss 'mse'.*MeanSquaredError"):
        xn.register_loss(HalfSquaredError, name="mse")
    assert xn.layer_registry["Dense"] is xn.Dense and xn.loss_registry["mse"] is xn.MeanSquaredError
    assert xn.optimizer_registry["sgd"] is xn.SGD


def test_registering_the_same_class_again_changes_nothing():
    names = xn.layer_registry.names()
    assert xn.register_layer(Scale) is Scale and xn.register_layer(name="Scale")(Scale) is Scale
    assert xn.register_optimizer(xn.AdamW) is xn.AdamW
    assert xn.layer_registry.names() == names and xn.layer_registry.name_of(Scale) == "Scale"


def test_registering_what_is_not_a_class_of_the_kind_is_refused():
    with pytest.raises(TypeError, match=r"takes a subclass of xpnet.Layer"):
        xn.register_layer(HalfSquaredError)
    with pytest.raises(TypeError, match=r"write @xpnet.register_loss\(name='my_loss'\)"):
        xn.register_loss("my_loss")
    with pytest.raises(ValueError, match="non-empty string"):
        xn.register_metric(name=" ")(MeanAbsoluteError)


def test_aliases_and_lookups_of_a_registry():
    class Widget:
        pass

    class Gear(Widget):
        pass

    registry = xn.Registry("widget", Widget)
    registry.register(Gear)
    registry.register(Gear, name="cog")
    assert registry.name_of(Gear) == "Gear" and registry["COG"] is Gear and "gear" in registry
    assert list(registry) == ["cog", "Gear"] and len(registry) == 2
    assert registry.name_of(Widget) is None and registry.get("sprocket") is None and registry.get("gear") is Gear
    with pytest.raises(KeyError):
        registry["sprocket"]


def test_unknown_names_list_the_registered_ones_and_say_how_to_register():
    with pytest.raises(ValueError) as info:
        xn.Sequential.from_config({"layers": [{"type": "Conv9"}]})
    message = str(info.value)
    assert message.startswith(
        "unknown layer type 'Conv9' in the model config; registered: AvgPool2D, BatchNorm, Conv2D, Dense, "
    )
    assert "Scale" in message and message.endswith(
        "a layer of your own must be registered with @xpnet.register_layer before it is loaded"
    )
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'; registered: bce, .*half_squared_error.*register_loss"):
        xn.get_loss("hinge")
    with pytest.raises(ValueError, match=r"unknown optimizer 'rmsprop'; registered: Adam, AdamW, DecoupledSGD, "):
        xn.get_optimizer("rmsprop")
    with pytest.raises(ValueError, match=r"unknown optimizer 'Nope' in the optimizer config"):
        xn.Optimizer.from_config({"type": "Nope"})
    with pytest.raises(ValueError, match=r"unknown metric 'f1'; registered: accuracy, binary_accuracy, "):
        xn.evaluate(xn.Sequential([xn.Dense(2, 2)]), "cross_entropy", np.zeros((2, 2)), [0, 1], metrics=["f1"])


def test_a_layer_that_cannot_be_rebuilt_is_refused_when_saved(tmp_path):
    class Unregistered(xn.Layer):
        def forward(self, x, training=False):
            return x

    with pytest.raises(ValueError, match=r"layer 1 \(.*Unregistered\) cannot be saved: its class is not registered"):
        save_checkpoint(tmp_path / "no.safetensors", xn.Sequential([xn.Dense(2, 2), Unregistered()]))
    with pytest.raises(ValueError, match=r"layer 1 \(NumpyConfig\): config\(\) must return JSON values"):
        xn.Sequential([xn.Dense(2, 2), NumpyConfig(2.0)]).config()
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"layer 0 \(Scale\) cannot be rebuilt from its config \{'width': 3\}"):
        xn.Sequential.from_config({"layers": [{"type": "Scale", "width": 3}]})


def test_optimizer_configs_round_trip_with_schedules():
    optimizers = [
        xn.SGD(xn.Warmup(xn.CosineDecay(0.1, total_steps=100, min_lr=0.01), warmup_steps=5), momentum=0.9),
        xn.AdamW(xn.StepDecay(0.01, step_size=3, gamma=0.5), weight_decay=0.02, clip_norm=1.0),
        xn.Momentum(xn.ExponentialDecay(0.1, gamma=0.99), nesterov=True),
        DecoupledSGD(0.3, decay=0.2),
    ]
    for optimizer in optimizers:
        config = optimizer.config()
        assert json.loads(json.dumps(config)) == config
        rebuilt = xn.Optimizer.from_config(config)
        assert type(rebuilt) is type(optimizer) and rebuilt.config() == config
        assert [rebuilt.schedule(t) for t in (0, 4, 7, 50)] == [optimizer.schedule(t) for t in (0, 4, 7, 50)]
    assert optimizers[0].config()["lr"]["after"] == {
        "schedule": "CosineDecay",
        "lr": 0.1,
        "total_steps": 100,
        "min_lr": 0.01,
    }
    with pytest.raises(ValueError, match="the optimizer config is for SGD, not for Adam or a subclass of it"):
        xn.Adam.from_config(xn.SGD(0.1).config())


def test_a_saved_state_names_its_registered_optimizer():
    model = _scaled_model("cpu")
    state = DecoupledSGD(0.1, momentum=0.9).state_dict()
    assert state["type"] == "DecoupledSGD"
    with pytest.raises(ValueError, match="optimizer state is for 'DecoupledSGD', not SGD"):
        xn.SGD(0.1, momentum=0.9).load_state_dict(state, model)
    with pytest.raises(ValueError, match=r"is for 'Mystery', not SGD \(an optimizer of your own .*register_optimizer"):
        xn.SGD(0.1).load_state_dict({**xn.SGD(0.1).state_dict(), "type": "Mystery"}, model)
