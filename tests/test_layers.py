"""Layers and Sequential: the design notes' worked numbers, shapes, dtypes, devices, state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_on_device, host, on

import xpnet
from xpnet import Dense, Dropout, Flatten, LeakyReLU, ReLU, Sequential, Sigmoid, Softmax, Tanh


def _model(backend, layers, dtype="float32", seed=0):
    return Sequential(layers, device=backend, dtype=dtype, seed=seed)


def test_one_neuron_worked_example(backend):
    model = _model(backend, [Dense(2, 1), ReLU()])
    model.load_state_dict({"0.W": np.array([[0.5, -0.3]]), "0.b": np.array([0.1])})
    x = on(model.device, [[1.0, 2.0]])
    z = model.layers[0].forward(x)
    assert host(model.device, z)[0, 0] == pytest.approx(0.0, abs=1e-6)
    a = model.forward(x)
    assert host(model.device, a)[0, 0] == 0.0
    assert_on_device(model.device, a, "float32")


def test_three_neuron_layer_worked_example(backend):
    model = _model(backend, [Dense(2, 3)])
    model.load_state_dict({"0.W": np.array([[0.5, -0.3], [0.2, 0.8], [-0.1, 0.4]]), "0.b": np.array([0.1, 0.0, 0.2])})
    z = model.forward(on(model.device, [[1.0, 2.0]]))
    np.testing.assert_allclose(host(model.device, z)[0], [0.0, 1.8, 0.9], atol=5e-4)
    assert_on_device(model.device, z, "float32")


def test_weights_are_one_row_per_neuron(backend):
    model = _model(backend, [Dense(784, 128), ReLU(), Dense(128, 64), ReLU(), Dense(64, 10)])
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters().items()}
    assert shapes == {"0.W": (128, 784), "0.b": (128,), "2.W": (64, 128), "2.b": (64,), "4.W": (10, 64), "4.b": (10,)}
    assert model.num_parameters() == 109_386


def test_softmax_worked_example(backend):
    model = _model(backend, [Softmax()])
    p = model.forward(on(model.device, [[2.0, 1.0, 0.1]]))
    np.testing.assert_allclose(host(model.device, p)[0], [0.659, 0.242, 0.099], atol=5e-4)
    assert_on_device(model.device, p, "float32")


def test_sigmoid_is_finite_at_plus_minus_1000_in_float32(backend):
    model = _model(backend, [Sigmoid()])
    a = model.forward(on(model.device, [[-1000.0, -30.0, 0.0, 30.0, 1000.0]]))
    values = host(model.device, a)[0]
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values, [0.0, 9.357623e-14, 0.5, 1.0, 1.0], rtol=1e-5, atol=0)
    da = model.backward(on(model.device, np.ones((1, 5))), input_grad=True)
    assert np.all(np.isfinite(host(model.device, da)))
    assert_on_device(model.device, a, "float32")


@pytest.mark.parametrize(
    "layer, z, expected_a, expected_grad",
    [
        (ReLU(), [-2.0, 0.5, 3.0], [0.0, 0.5, 3.0], [0.0, 1.0, 1.0]),
        (LeakyReLU(0.1), [-2.0, 0.5, 3.0], [-0.2, 0.5, 3.0], [0.1, 1.0, 1.0]),
        (Tanh(), [-1.0, 0.0, 2.0], np.tanh([-1.0, 0.0, 2.0]), 1 - np.tanh([-1.0, 0.0, 2.0]) ** 2),
        (
            Sigmoid(),
            [-1.0, 0.0, 2.0],
            1 / (1 + np.exp(-np.array([-1.0, 0.0, 2.0]))),
            np.exp(-np.array([-1.0, 0.0, 2.0])) / (1 + np.exp(-np.array([-1.0, 0.0, 2.0]))) ** 2,
        ),
    ],
    ids=["relu", "leaky_relu", "tanh", "sigmoid"],
)
def test_activation_values_and_derivatives(backend, layer, z, expected_a, expected_grad):
    model = _model(backend, [type(layer)(**layer.config())])
    a = model.forward(on(model.device, [z]))
    np.testing.assert_allclose(host(model.device, a)[0], expected_a, rtol=1e-6, atol=1e-7)
    dz = model.backward(on(model.device, [[1.0, 1.0, 1.0]]), input_grad=True)
    np.testing.assert_allclose(host(model.device, dz)[0], expected_grad, rtol=1e-6, atol=1e-7)
    assert_on_device(model.device, dz, "float32")


def test_every_layer_keeps_namespace_device_and_dtype(backend):
    layers = [
        Flatten(),
        Dense(12, 6),
        LeakyReLU(),
        Dropout(0.3),
        Dense(6, 5),
        Tanh(),
        Dense(5, 4),
        Sigmoid(),
        Dense(4, 3),
        Softmax(),
    ]
    model = _model(backend, layers)
    x = on(model.device, np.random.default_rng(0).normal(size=(8, 3, 4)))
    out = x
    for layer in model.layers:
        out = layer.forward(out, training=True)
        assert_on_device(model.device, out, "float32")
    dy = out
    for layer in reversed(model.layers):
        dy = layer.backward(dy)
        assert_on_device(model.device, dy, "float32")
    assert tuple(dy.shape) == (8, 3, 4)
    for key, grad in model.named_gradients().items():
        assert_on_device(model.device, grad, "float32")
        assert tuple(grad.shape) == tuple(model.named_parameters()[key].shape)


def test_float64_models_stay_float64(backend64):
    model = _model(backend64, [Dense(3, 4), ReLU(), Dense(4, 2)], dtype="float64")
    out = model.forward(on(model.device, np.ones((2, 3)), "float64"))
    assert_on_device(model.device, out, "float64")
    model.backward(out)
    for grad in model.named_gradients().values():
        assert_on_device(model.device, grad, "float64")


def test_input_of_another_dtype_is_refused_not_upcast(backend64):
    model = _model(backend64, [Dense(3, 2)])
    with pytest.raises(TypeError, match="does not match the model"):
        model.forward(on(model.device, np.ones((2, 3)), "float64"))


def test_dense_checks_its_input_width(backend):
    model = _model(backend, [Dense(3, 2)])
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 3\)"):
        model.forward(on(model.device, np.ones((2, 4))))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_dense_sizes_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        Dense(bad, 3)


def test_dropout_is_inverted_and_off_in_evaluation(backend):
    model = _model(backend, [Dropout(0.25)], seed=5)
    x = on(model.device, np.ones((400, 250)))
    y_eval = host(model.device, model.forward(x, training=False))
    np.testing.assert_array_equal(y_eval, 1.0)
    y_train = host(model.device, model.forward(x, training=True))
    kept = y_train != 0
    np.testing.assert_allclose(y_train[kept], 1 / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.005  # 100,000 units: 4 standard deviations ≈ 0.0055
    assert abs(y_train.mean() - 1.0) < 0.01  # the expectation is preserved
    grad = host(model.device, model.backward(on(model.device, np.ones((400, 250))), input_grad=True))
    np.testing.assert_array_equal(grad, y_train)  # backward uses the same mask


def test_dropout_masks_reproducible_from_seed_and_identical_across_backends(backend):
    def masks(name, seed):
        model = _model(name, [Dropout(0.5)], seed=seed)
        x = on(model.device, np.ones((6, 9)))
        return [host(model.device, model.forward(x, training=True)) for _ in range(3)]

    reference = masks("cpu", 1)
    for a, b in zip(reference, masks(backend, 1)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(reference[0], reference[1])
    assert not all(np.array_equal(a, b) for a, b in zip(reference, masks("cpu", 2)))


def test_dropout_rate_validated():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_flatten_round_trip(backend):
    model = _model(backend, [Flatten()])
    x = on(model.device, np.arange(24).reshape(2, 3, 4))
    y = model.forward(x)
    assert tuple(y.shape) == (2, 12)
    np.testing.assert_array_equal(host(model.device, y), np.arange(24).reshape(2, 12))
    back = model.backward(y, input_grad=True)
    np.testing.assert_array_equal(host(model.device, back), np.arange(24).reshape(2, 3, 4))


def test_default_initialization_per_activation():
    model = Sequential([Dense(1000, 500), ReLU(), Dense(500, 400), Tanh(), Dense(400, 300)], seed=0)
    params = {k: host(model.device, v) for k, v in model.named_parameters().items()}
    # He normal before ReLU: std = sqrt(2 / fan_in)
    assert params["0.W"].std() == pytest.approx(math.sqrt(2 / 1000), rel=0.01)
    assert abs(params["0.W"].mean()) < 1e-3
    # Xavier uniform before tanh and at the output: limit = sqrt(6 / (fan_in + fan_out))
    for key, (fan_in, fan_out) in {"2.W": (500, 400), "4.W": (400, 300)}.items():
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert params[key].max() <= limit and params[key].min() >= -limit
        assert params[key].std() == pytest.approx(limit / math.sqrt(3), rel=0.01)
    for key in ("0.b", "2.b", "4.b"):
        np.testing.assert_array_equal(params[key], 0.0)


@pytest.mark.parametrize(
    "init, expected_std",
    [
        ("he_normal", math.sqrt(2 / 800)),
        ("he_uniform", math.sqrt(2 / 800)),
        ("xavier_normal", math.sqrt(2 / 1400)),
        ("xavier_uniform", math.sqrt(2 / 1400)),
    ],
)
def test_named_initializers_have_their_variance(init, expected_std):
    model = Sequential([Dense(800, 600, init=init)], seed=1)
    assert host(model.device, model.named_parameters()["0.W"]).std() == pytest.approx(expected_std, rel=0.01)


def test_unknown_initializer_refused():
    with pytest.raises(ValueError, match="unknown initializer 'lecun'"):
        Sequential([Dense(2, 2, init="lecun")])


def test_state_dict_round_trip_and_is_a_copy(backend):
    model = _model(backend, [Dense(4, 3), ReLU(), Dense(3, 2)], seed=1)
    state = model.state_dict()
    other = _model(backend, [Dense(4, 3), ReLU(), Dense(3, 2)], seed=2)
    other.load_state_dict(state)
    for key, value in other.named_parameters().items():
        np.testing.assert_array_equal(host(other.device, value), host(model.device, state[key]))
        assert_on_device(other.device, value, "float32")
    before = host(model.device, state["0.W"]).copy()
    model.forward(on(model.device, np.ones((2, 4))))
    model.backward(on(model.device, np.ones((2, 2))))
    xpnet.SGD(0.5).step(model)
    assert not np.array_equal(host(model.device, model.named_parameters()["0.W"]), before)  # the step moved 0.W ...
    np.testing.assert_array_equal(host(model.device, state["0.W"]), before)  # ... and not the saved copy


def test_state_dict_from_another_backend_loads(backend):
    source = _model("cpu", [Dense(3, 2)], seed=4)
    target = _model(backend, [Dense(3, 2)], seed=9)
    target.load_state_dict(source.state_dict())
    np.testing.assert_array_equal(
        host(target.device, target.named_parameters()["0.W"]), host(source.device, source.named_parameters()["0.W"])
    )


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    model = Sequential([Dense(3, 2), ReLU(), Dense(2, 1)])
    before = {k: host(model.device, v).copy() for k, v in model.named_parameters().items()}
    good = {k: np.full(v.shape, 7.0) for k, v in before.items()}
    with pytest.raises(ValueError, match=r"missing \['2.b'\]"):
        model.load_state_dict({k: v for k, v in good.items() if k != "2.b"})
    with pytest.raises(ValueError, match=r"unexpected \['9.W'\]"):
        model.load_state_dict({**good, "9.W": np.zeros(1)})
    with pytest.raises(ValueError, match=r"'2.W' has shape \(1, 3\) in the state dict but \(1, 2\)"):
        model.load_state_dict({**good, "2.W": np.zeros((1, 3))})
    for key, value in model.named_parameters().items():
        np.testing.assert_array_equal(host(model.device, value), before[key])


def test_config_rebuilds_the_architecture():
    model = Sequential([Flatten(), Dense(6, 4, init="he_uniform"), LeakyReLU(0.2), Dropout(0.1), Dense(4, 2)])
    rebuilt = Sequential.from_config(model.config(), device="strict")
    assert [repr(layer) for layer in rebuilt.layers] == [repr(layer) for layer in model.layers]
    assert rebuilt.num_parameters() == model.num_parameters() == 6 * 4 + 4 + 4 * 2 + 2
    with pytest.raises(ValueError, match="unknown layer type 'Conv9'"):
        Sequential.from_config({"layers": [{"type": "Conv9"}]})


def test_sequential_refuses_non_layers():
    with pytest.raises(TypeError, match="Layer objects"):
        Sequential([Dense(2, 2), "relu"])


def test_summary_lists_parameter_counts():
    text = Sequential([Dense(784, 128), ReLU(), Dense(128, 10)]).summary()
    assert "100,480" in text and "1,290" in text and "101,770" in text


def test_default_initialization_looks_through_dropout_and_flatten():
    model = Sequential([Flatten(), Dense(1000, 500), Dropout(0.5), ReLU(), Dense(500, 10)], seed=0)
    assert host(model.device, model.named_parameters()["1.W"]).std() == pytest.approx(math.sqrt(2 / 1000), rel=0.01)


def test_an_explicit_seed_reseeds_a_shared_device():
    device = xpnet.Device("cpu")
    first = Sequential([Dense(4, 4)], device=device, seed=8).named_parameters()["0.W"]
    second = Sequential([Dense(4, 4)], device=device, seed=8).named_parameters()["0.W"]
    third = Sequential([Dense(4, 4)], device=device).named_parameters()["0.W"]  # continues the stream
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(second, third)


def test_backward_before_forward_is_a_clear_error():
    model = Sequential([Dense(2, 2)])
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(model.device.to_device(np.ones((1, 2)), "float32"))


def test_mlp_builder():
    model = xpnet.mlp(784, [128, 64], 10)
    assert model.num_parameters() == 109_386
    assert [type(layer).__name__ for layer in model.layers] == ["Dense", "ReLU", "Dense", "ReLU", "Dense"]
    dropped = xpnet.mlp(30, [16, 8], 1, activation="tanh", dropout=0.2, dtype="float64")
    assert [type(layer).__name__ for layer in dropped.layers] == [
        "Dense",
        "Tanh",
        "Dropout",
        "Dense",
        "Tanh",
        "Dropout",
        "Dense",
    ]
    assert dropped.layers[2].rate == 0.2
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        xpnet.mlp(2, [2], 1, activation="swish")
