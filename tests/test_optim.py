"""Optimizers against hand-computed steps, weight decay, clipping, schedules, saved state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_on_device, host, on

from xpnet import (
    SGD,
    Adam,
    AdamW,
    CosineDecay,
    Dense,
    ExponentialDecay,
    Momentum,
    Sequential,
    StepDecay,
    Warmup,
    clip_by_global_norm,
    get_optimizer,
)


def _scalar_model(backend, w=1.0, b=1.0):
    model = Sequential([Dense(1, 1)], device=backend)
    model.load_state_dict({"0.W": np.array([[w]]), "0.b": np.array([b])})
    return model


def _step(model, optimizer, gw, gb=None):
    layer = model.layers[0]
    layer.grads["W"] = on(model.device, [[gw]])
    layer.grads["b"] = on(model.device, [gw if gb is None else gb])
    optimizer.step(model)
    return float(host(model.device, layer.params["W"])[0, 0]), float(host(model.device, layer.params["b"])[0])


def test_sgd_step(backend):
    model = _scalar_model(backend)
    assert _step(model, SGD(0.1), 0.5) == pytest.approx((0.95, 0.95))
    assert_on_device(model.device, model.layers[0].params["W"], "float32")


def test_momentum_steps(backend):
    # v ← 0.9 v + g, θ ← θ − 0.1 v with g = 1: v = 1 then 1.9
    model = _scalar_model(backend)
    optimizer = Momentum(0.1, momentum=0.9)
    assert _step(model, optimizer, 1.0)[0] == pytest.approx(0.9, rel=1e-6)
    assert _step(model, optimizer, 1.0)[0] == pytest.approx(0.9 - 0.19, rel=1e-6)


def test_nesterov_steps(backend):
    # θ ← θ − 0.1 (g + 0.9 v) with the new v: 0.1·1.9 then 0.1·(1 + 0.9·1.9) = 0.271
    model = _scalar_model(backend)
    optimizer = SGD(0.1, momentum=0.9, nesterov=True)
    assert _step(model, optimizer, 1.0)[0] == pytest.approx(0.81, rel=1e-6)
    assert _step(model, optimizer, 1.0)[0] == pytest.approx(0.539, rel=1e-6)


def test_adam_first_two_steps_on_a_scalar(backend):
    # By hand, θ = 1, g₁ = 0.5, g₂ = −0.2, η = 0.1, β = (0.9, 0.999):
    # t=1: m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25, θ = 1 − 0.1·0.5/0.5 = 0.9
    # t=2: m = 0.025, v = 0.00028975, m̂ = 0.025/0.19, v̂ = 0.00028975/0.001999
    #      θ = 0.9 − 0.1·0.1315789/0.3807191 = 0.8654394
    model = _scalar_model(backend)
    optimizer = Adam(0.1)
    assert _step(model, optimizer, 0.5)[0] == pytest.approx(0.9, rel=1e-6)
    m_hat, v_hat = 0.025 / 0.19, 0.00028975 / (1 - 0.999**2)
    expected = 0.9 - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8)
    assert expected == pytest.approx(0.8654394, abs=1e-7)
    assert _step(model, optimizer, -0.2)[0] == pytest.approx(expected, rel=1e-6)
    state = optimizer.state["0.W"]
    assert float(host(model.device, state["m"])[0, 0]) == pytest.approx(0.025, rel=1e-6)
    assert float(host(model.device, state["v"])[0, 0]) == pytest.approx(0.00028975, rel=1e-5)
    assert_on_device(model.device, state["v"], "float32")


def test_l2_weight_decay_applies_to_weights_not_biases(backend):
    # W: g + λW = 0.5 + 0.1·2 = 0.7 → 2 − 0.07; b: 2 − 0.05
    model = _scalar_model(backend, w=2.0, b=2.0)
    assert _step(model, SGD(0.1, weight_decay=0.1), 0.5) == pytest.approx((1.93, 1.95), rel=1e-6)


def test_adamw_decay_is_decoupled(backend):
    # with g = 0 the Adam step is 0 and only θ ← θ − ηλθ moves the weight
    model = _scalar_model(backend, w=1.0, b=1.0)
    w, b = _step(model, AdamW(0.1, weight_decay=0.01), 0.0)
    assert (w, b) == pytest.approx((0.999, 1.0), rel=1e-6)
    # Adam's coupled L2 goes through the moments instead: the first step is a full η·sign
    model = _scalar_model(backend, w=1.0, b=1.0)
    assert _step(model, Adam(0.1, weight_decay=0.01), 0.0)[0] == pytest.approx(0.9, rel=1e-5)


def test_clip_by_global_norm(backend):
    model = _scalar_model(backend)
    grads = [on(model.device, [3.0, 4.0]), on(model.device, [[12.0]])]  # ‖g‖ = 13
    clipped = clip_by_global_norm(grads, 6.5)
    np.testing.assert_allclose(host(model.device, clipped[0]), [1.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(host(model.device, clipped[1]), [[6.0]], rtol=1e-6)
    assert_on_device(model.device, clipped[0], "float32")
    unclipped = clip_by_global_norm(grads, 20.0)
    np.testing.assert_allclose(host(model.device, unclipped[0]), [3.0, 4.0], rtol=1e-6)


def test_optimizer_clips_before_updating(backend):
    model = _scalar_model(backend, w=0.0, b=0.0)
    # g = (3, 4): norm 5, clipped to 1 → (0.6, 0.8), then θ ← θ − 1·g
    assert _step(model, SGD(1.0, clip_norm=1.0), 3.0, 4.0) == pytest.approx((-0.6, -0.8), rel=1e-6)


def test_schedules():
    step = StepDecay(0.1, step_size=10, gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert ExponentialDecay(0.1, 0.9)(2) == pytest.approx(0.081)
    cosine = CosineDecay(0.1, total_steps=100, min_lr=0.01)
    assert [cosine(s) for s in (0, 50, 100, 150)] == pytest.approx([0.1, 0.055, 0.01, 0.01])
    warm = Warmup(0.1, warmup_steps=5)
    assert [warm(s) for s in (0, 4, 5, 50)] == pytest.approx([0.02, 0.1, 0.1, 0.1])
    assert Warmup(CosineDecay(0.1, 10), 5)(10) == pytest.approx(0.05)
    for value in (warm(3), cosine(7)):
        assert type(value) is float  # host arithmetic only


def test_optimizer_follows_its_schedule(backend):
    model = _scalar_model(backend, w=0.0, b=0.0)
    optimizer = SGD(StepDecay(1.0, step_size=1, gamma=0.5))
    positions = [_step(model, optimizer, 1.0)[0] for _ in range(3)]
    assert positions == pytest.approx([-1.0, -1.5, -1.75])
    assert optimizer.lr == pytest.approx(0.125)


@pytest.mark.parametrize("make", [lambda: Adam(0.01), lambda: Momentum(0.05, nesterov=True), lambda: AdamW(0.01)])
def test_state_dict_restores_the_run_exactly(backend, make):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3))
    targets = rng.normal(size=(16, 2))

    def train(model, optimizer, steps):
        for _ in range(steps):
            out = model.forward(on(model.device, x))
            model.backward((out - on(model.device, targets)) * (2.0 / 32))
            optimizer.step(model)

    model, optimizer = Sequential([Dense(3, 2)], device=backend), make()
    train(model, optimizer, 3)
    saved_model, saved_optimizer = model.state_dict(), optimizer.state_dict()
    train(model, optimizer, 2)  # must not change the saved state: state_dict returns copies

    resumed, resumed_optimizer = Sequential([Dense(3, 2)], device=backend, seed=99), make()
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer, resumed)
    assert resumed_optimizer.steps == 3
    train(resumed, resumed_optimizer, 2)
    for key, value in model.named_parameters().items():
        np.testing.assert_array_equal(host(model.device, resumed.named_parameters()[key]), host(model.device, value))


def test_optimizer_state_is_validated():
    model = Sequential([Dense(3, 2)])
    adam = Adam()
    with pytest.raises(ValueError, match="for 'SGD', not Adam"):
        adam.load_state_dict(SGD(0.1).state_dict(), model)
    bad = {"type": "Adam", "steps": 1, "slots": {"0.W": {"m": np.zeros((2, 3)), "v": np.zeros((3, 3))}}}
    with pytest.raises(ValueError, match=r"slot 0.W.v has shape \(3, 3\)"):
        adam.load_state_dict(bad, model)
    assert adam.state == {} and adam.steps == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SGD(-1.0), "learning rate"),
        (lambda: SGD(0.1, momentum=1.5), "momentum"),
        (lambda: SGD(0.1, nesterov=True), "Nesterov"),
        (lambda: Adam(beta1=1.0), "beta1"),
        (lambda: Adam(weight_decay=-1), "weight_decay"),
        (lambda: SGD(0.1, clip_norm=0), "clip_norm"),
        (lambda: get_optimizer("rmsprop"), "unknown optimizer"),
        (lambda: StepDecay(0.1, 0), "step_size"),
    ],
)
def test_bad_hyperparameters_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_optimizers_by_name():
    assert type(get_optimizer("adam", lr=0.01)) is Adam
    assert get_optimizer("momentum").momentum == 0.9
    assert get_optimizer("AdamW").weight_decay == 0.01


def test_optimizer_state_dict_is_a_copy_on_the_device(backend):
    model = _scalar_model(backend)
    optimizer = Adam(0.1)
    _step(model, optimizer, 0.5)
    saved = optimizer.state_dict()
    before = host(model.device, saved["slots"]["0.W"]["m"]).copy()
    assert_on_device(model.device, saved["slots"]["0.W"]["m"], "float32")
    _step(model, optimizer, 0.7)
    np.testing.assert_array_equal(host(model.device, saved["slots"]["0.W"]["m"]), before)


def test_optimizer_state_with_other_hyperparameters_is_refused():
    model = _scalar_model("cpu")
    saved = Adam(0.1, beta2=0.9)
    _step(model, saved, 0.5)
    with pytest.raises(ValueError, match="saved with beta2=0.9, this optimizer has beta2=0.999"):
        Adam(0.1).load_state_dict(saved.state_dict(), model)


def test_step_before_backward_is_a_clear_error():
    model = Sequential([Dense(2, 2)])
    with pytest.raises(RuntimeError, match="no gradient for 0.W, 0.b: call model.backward"):
        SGD(0.1).step(model)


def test_numpy_float_clip_norm_does_not_upcast(backend):
    model = _scalar_model(backend, w=0.0, b=0.0)
    optimizer = SGD(1.0, clip_norm=np.float64(1.0))
    assert _step(model, optimizer, 3.0, 4.0) == pytest.approx((-0.6, -0.8), rel=1e-6)
    assert_on_device(model.device, model.layers[0].params["W"], "float32")


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (ExponentialDecay(1.0, 0.5), [-1.0, -1.5, -1.75]),
        (Warmup(1.0, 2), [-0.5, -1.5, -2.5]),
        (CosineDecay(1.0, total_steps=2), [-1.0, -1.5, -1.5]),
    ],
)
def test_each_schedule_drives_an_optimizer(backend, schedule, expected):
    model = _scalar_model(backend, w=0.0, b=0.0)
    optimizer = SGD(schedule)
    assert [_step(model, optimizer, 1.0)[0] for _ in range(3)] == pytest.approx(expected)
