"""fit / evaluate / predict: the worked tiny network, XOR, overfitting, callbacks, early stopping."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from conftest import host, on

import xpnet
from xpnet import (
    SGD,
    Adam,
    BinaryCrossEntropy,
    Callback,
    Dense,
    Dropout,
    EarlyStopping,
    Flatten,
    ReLU,
    Sequential,
    Tanh,
    TrainingDiverged,
    evaluate,
    fit,
    predict,
)

XOR_X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
XOR_Y = np.array([0, 1, 1, 0])


def test_tiny_network_worked_example(backend):
    """x=0.5, w1=1.0, b1=0.3 (ReLU), w2=1.5, b2=0.2 (sigmoid output, BCE), y=1."""
    model = Sequential([Dense(1, 1), ReLU(), Dense(1, 1)], device=backend)
    model.load_state_dict({"0.W": [[1.0]], "0.b": [0.3], "2.W": [[1.5]], "2.b": [0.2]})
    x, y = on(model.device, [[0.5]]), on(model.device, [1.0])
    z2 = model.forward(x, training=True)
    z1 = model.layers[0].forward(x)
    assert float(host(model.device, z1)[0, 0]) == pytest.approx(0.8, abs=5e-4)
    assert float(host(model.device, z2)[0, 0]) == pytest.approx(1.4, abs=5e-4)
    p = xpnet.Sigmoid()
    p.build(model.device, model.dtype)
    assert float(host(model.device, p.forward(z2))[0, 0]) == pytest.approx(0.802, abs=5e-4)
    loss, delta = BinaryCrossEntropy().value_and_grad(z2, y)
    # The exact loss is −log σ(1.4) = 0.2204; the design notes print 0.221 from p rounded to 0.802.
    assert float(host(model.device, loss)) == pytest.approx(-math.log(0.802), abs=1e-3)
    assert float(host(model.device, loss)) == pytest.approx(0.2204, abs=5e-5)
    model.forward(x, training=True)  # forward again so the layers hold this example's activations
    model.backward(delta)
    grads = {k: float(host(model.device, v).reshape(-1)[0]) for k, v in model.named_gradients().items()}
    assert grads == pytest.approx({"2.W": -0.158, "2.b": -0.198, "0.W": -0.148, "0.b": -0.297}, abs=5e-4)
    SGD(0.1).step(model)
    params = {k: float(host(model.device, v).reshape(-1)[0]) for k, v in model.named_parameters().items()}
    assert params["2.W"] == pytest.approx(1.5158, abs=5e-5)
    assert params["2.b"] == pytest.approx(0.220, abs=5e-4)
    assert params["0.W"] == pytest.approx(1.0148, abs=5e-5)


def test_xor_learned_to_100_percent(backend):
    model = Sequential([Dense(2, 4), Tanh(), Dense(4, 1)], device=backend, seed=0)
    history = fit(model, "bce", Adam(0.05), XOR_X, XOR_Y, epochs=300, batch_size=4)
    assert history["loss"][-1] < 0.05 < history["loss"][0]
    assert history["binary_accuracy"][-1] == 1.0
    result = evaluate(model, "bce", XOR_X, XOR_Y)
    assert result["binary_accuracy"] == 1.0
    logits = host(model.device, predict(model, XOR_X))
    np.testing.assert_array_equal((logits[:, 0] > 0).astype(int), XOR_Y)


def test_small_batch_overfitted_to_100_percent(backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 20)).astype(np.float32)
    y = rng.integers(0, 10, size=32)  # random labels: only memorization gets them all
    model = Sequential([Dense(20, 64), ReLU(), Dense(64, 10)], device=backend, seed=1)
    history = fit(model, "cross_entropy", Adam(0.01), x, y, epochs=150, batch_size=32)
    assert history["accuracy"][-1] == 1.0
    assert evaluate(model, "cross_entropy", x, y)["accuracy"] == 1.0
    losses = history["loss"]
    assert losses[-1] < 0.05 < 2.0 < losses[0]
    assert all(later <= earlier * 1.05 for earlier, later in zip(losses[::10], losses[10::10]))  # keeps falling


def _blobs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]])
    y = rng.integers(0, 3, size=n)
    return (centers[y] + rng.normal(size=(n, 2))).astype(np.float32), y


def test_training_is_identical_on_every_backend(backend):
    x, y = _blobs()

    def run(device):
        model = Sequential([Dense(2, 16), ReLU(), Dropout(0.2), Dense(16, 3)], device=device, seed=3)
        history = fit(model, "cross_entropy", Adam(0.01), x, y, epochs=3, batch_size=32, validation_split=0.2)
        return history, {k: host(model.device, v) for k, v in model.named_parameters().items()}

    # against the Array API code on NumPy, fast paths off (on numpy, the fast paths are the difference)
    (h_ref, w_ref), (h, w) = run(xpnet.Device("cpu", fast=False)), run(backend)
    for key in w_ref:
        np.testing.assert_allclose(w[key], w_ref[key], rtol=1e-5, atol=1e-6)
    assert h["loss"] == pytest.approx(h_ref["loss"], rel=1e-5)
    assert h["val_accuracy"] == h_ref["val_accuracy"]


def test_validation_split_is_seeded_and_logged(backend):
    x, y = _blobs()
    runs = []
    for _ in range(2):
        model = Sequential([Dense(2, 8), ReLU(), Dense(8, 3)], device=backend, seed=5)
        runs.append(fit(model, "cross_entropy", Adam(0.05), x, y, epochs=10, batch_size=50, validation_split=0.2))
    first, second = runs
    assert set(first.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    assert first["val_loss"] == second["val_loss"] and first["loss"] == second["loss"]
    assert len(first) == 10 and first.epochs == list(range(10))
    assert first["val_accuracy"][-1] > 0.8


def test_validation_data_and_evaluate_agree(backend):
    x, y = _blobs(seed=1)
    xv, yv = _blobs(n=97, seed=2)
    model = Sequential([Dense(2, 8), ReLU(), Dense(8, 3)], device=backend)
    history = fit(model, "cross_entropy", Adam(0.01), x, y, epochs=2, batch_size=64, validation_data=(xv, yv))
    result = evaluate(model, "cross_entropy", xv, yv, batch_size=10)
    assert result["loss"] == pytest.approx(history["val_loss"][-1], rel=1e-5)
    assert result["accuracy"] == history["val_accuracy"][-1]
    logits = host(model.device, predict(model, xv, batch_size=7))
    assert logits.shape == (97, 3)
    assert (logits.argmax(axis=1) == yv).mean() == pytest.approx(result["accuracy"])
    whole = host(model.device, model.forward(model.device.to_device(xv, model.dtype)))
    np.testing.assert_allclose(logits, whole, rtol=1e-6, atol=1e-6)


class Recorder(Callback):
    def __init__(self):
        self.events = []
        self.running = []

    def on_train_begin(self, state):
        self.events.append("train_begin")

    def on_epoch_begin(self, state):
        self.events.append(f"epoch_begin {state.epoch}")

    def on_batch_end(self, state):
        self.events.append("batch")
        if state.step == state.steps_per_epoch - 1:
            self.running.append(state.running_loss())

    def on_epoch_end(self, state, logs):
        self.events.append(f"epoch_end {state.epoch}")

    def on_train_end(self, state):
        self.events.append("train_end")


def test_callbacks_see_every_stage_and_the_running_loss(backend):
    x, y = _blobs(n=100)
    recorder = Recorder()
    model = Sequential([Dense(2, 4), ReLU(), Dense(4, 3)], device=backend)
    history = fit(model, "cross_entropy", SGD(0.1), x, y, epochs=2, batch_size=30, callbacks=[recorder])
    batches = ["batch"] * 4  # 100 examples in batches of 30: 30, 30, 30, 10
    assert recorder.events == [
        "train_begin",
        "epoch_begin 0",
        *batches,
        "epoch_end 0",
        "epoch_begin 1",
        *batches,
        "epoch_end 1",
        "train_end",
    ]
    assert recorder.running == pytest.approx(history["loss"], rel=1e-6)


def test_early_stopping_restores_the_best_weights(backend):
    # Validation labels are the opposite of the training labels: the better the model fits the
    # training set, the worse its validation loss, so the best epoch is the first.
    x = np.tile(XOR_X, (8, 1))
    y = np.tile(XOR_Y, 8)
    stopper = EarlyStopping(patience=2)
    snapshots = []

    class Snapshot(Callback):
        def on_epoch_end(self, state, logs):
            snapshots.append(state.model.state_dict())

    model = Sequential([Dense(2, 8), Tanh(), Dense(8, 1)], device=backend, seed=2)
    history = fit(
        model,
        "bce",
        Adam(0.05),
        x,
        y,
        epochs=50,
        batch_size=8,
        validation_data=(x, 1 - y),
        callbacks=[Snapshot(), stopper],
    )
    best = int(np.argmin(history["val_loss"]))
    assert len(history) < 50
    assert stopper.stopped_epoch == len(history) - 1 == stopper.best_epoch + 2 == best + 2
    for key, value in model.named_parameters().items():
        np.testing.assert_array_equal(host(model.device, value), host(model.device, snapshots[best][key]))
    assert evaluate(model, "bce", x, 1 - y)["loss"] == pytest.approx(min(history["val_loss"]), rel=1e-5)


def test_early_stopping_needs_validation():
    model = Sequential([Dense(2, 1)])
    with pytest.raises(ValueError, match="monitors 'val_loss'"):
        fit(model, "bce", SGD(0.1), XOR_X, XOR_Y, epochs=2, callbacks=[EarlyStopping()])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_divergence_is_reported_with_the_epoch():
    model = Sequential([Dense(2, 1)])
    targets = np.array([[1e30], [1e30], [-1e30], [1e30]], dtype=np.float32)
    with pytest.raises(TrainingDiverged, match="in epoch 1; try a lower learning rate"):
        fit(model, "mse", SGD(1e10), XOR_X, targets, epochs=3, batch_size=4)


@pytest.mark.parametrize(
    "x, y, kwargs, message",
    [
        (np.array([[0.0, np.nan]]), np.array([0]), {}, "NaN or infinite"),
        (XOR_X, XOR_Y[:3], {}, "x has 4 examples but y has 3"),
        (XOR_X, XOR_Y, {"epochs": 0}, "epochs must be a positive integer"),
        (XOR_X, XOR_Y, {"batch_size": 0}, "batch_size must be a positive integer"),
        (XOR_X, XOR_Y, {"validation_split": 1.5}, "validation_split"),
        (XOR_X, XOR_Y + 5, {}, "class labels range from 5 to 6 but the model has 2 outputs"),
    ],
)
def test_bad_training_input_is_refused_clearly(x, y, kwargs, message):
    model = Sequential([Dense(2, 2)])
    with pytest.raises(ValueError, match=message):
        fit(model, "cross_entropy", SGD(0.1), x, y, **kwargs)


def test_fit_accepts_device_arrays(backend):
    model = Sequential([Dense(2, 4), Tanh(), Dense(4, 1)], device=backend, seed=0)
    x = model.device.to_device(XOR_X, model.dtype)
    y = model.device.to_device(XOR_Y.astype(np.float32), model.dtype)
    history = fit(model, "bce", Adam(0.05), x, y, epochs=300, batch_size=4)
    assert history["binary_accuracy"][-1] == 1.0


def test_validation_split_is_a_seeded_permutation_not_the_tail(backend):
    device = xpnet.Device(backend, seed=0)
    train_idx, val_idx = xpnet.train_validation_split(device, 1000, 0.2)
    train_idx, val_idx = host(device, train_idx), host(device, val_idx)
    assert len(val_idx) == 200 and len(train_idx) == 800
    assert set(train_idx).isdisjoint(val_idx) and set(train_idx) | set(val_idx) == set(range(1000))
    assert val_idx.min() < 500  # not the tail 800..999
    assert (val_idx >= 800).mean() == pytest.approx(0.2, abs=0.08)
    again = xpnet.train_validation_split(xpnet.Device(backend, seed=0), 1000, 0.2)[1]
    np.testing.assert_array_equal(host(device, again), val_idx)
    with pytest.raises(ValueError, match="leaves 0 of 3 examples"):
        xpnet.train_validation_split(device, 3, 0.1)


def test_sorted_data_split_keeps_every_class_in_validation():
    x, y = _blobs(n=300)
    order = np.argsort(y, kind="stable")  # sorted by class: a tail split would validate on class 2 only
    model = Sequential([Dense(2, 8), ReLU(), Dense(8, 3)], seed=0)
    history = fit(
        model, "cross_entropy", Adam(0.05), x[order], y[order], epochs=10, batch_size=30, validation_split=0.3
    )
    assert history["val_accuracy"][-1] > 0.8


def test_host_reads_per_epoch_do_not_grow_with_the_batch_count(monkeypatch):
    reads = []
    original = xpnet.Device.to_host
    monkeypatch.setattr(xpnet.Device, "to_host", lambda self, x: reads.append(1) or original(self, x))
    x, y = _blobs(n=600)

    def count(batch_size):
        reads.clear()
        model = Sequential([Dense(2, 8), ReLU(), Dense(8, 3)])
        fit(model, "cross_entropy", SGD(0.1), x, y, epochs=3, batch_size=batch_size, validation_split=0.1)
        return len(reads)

    few_batches, many_batches = count(270), count(6)  # 2 against 90 batches per epoch
    assert few_batches == many_batches
    assert many_batches <= 3 * 4 + 4  # per epoch: loss, accuracy, val_loss, val_accuracy; a few checks at start


def test_on_train_end_runs_when_training_fails():
    recorder = Recorder()
    model = Sequential([Dense(2, 1)])
    targets = np.array([[1e30], [1e30], [-1e30], [1e30]], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(TrainingDiverged):
        fit(model, "mse", SGD(1e10), XOR_X, targets, epochs=3, batch_size=4, callbacks=[recorder])
    assert recorder.events[-1] == "train_end"


def test_validation_targets_are_checked():
    model = Sequential([Dense(2, 2)])
    with pytest.raises(ValueError, match="class labels range from 7 to 8 but the model has 2 outputs"):
        fit(model, "cross_entropy", SGD(0.1), XOR_X, XOR_Y, validation_data=(XOR_X, XOR_Y + 7))


def test_optimizer_by_name_and_bad_optimizer():
    model = Sequential([Dense(2, 4), Tanh(), Dense(4, 1)], seed=0)
    assert len(fit(model, "bce", "adam", XOR_X, XOR_Y, epochs=2, batch_size=4)) == 2
    with pytest.raises(TypeError, match="optimizer must be an xpnet Optimizer"):
        fit(model, "bce", object(), XOR_X, XOR_Y)


def test_shuffle_off_takes_batches_in_order_and_explicit_metrics(backend):
    x, y = _blobs(n=64)
    seen = []

    class FirstRows(Callback):
        def on_batch_end(self, state):
            seen.append(state.samples_seen)

    runs = []
    for _ in range(2):
        model = Sequential([Dense(2, 3)], device=backend, seed=0)
        runs.append(
            fit(
                model,
                "cross_entropy",
                SGD(0.1),
                x,
                y,
                epochs=2,
                batch_size=16,
                shuffle=False,
                metrics=["accuracy"],
                callbacks=[FirstRows()],
            )
        )
    assert seen[:4] == [16, 32, 48, 64]
    assert runs[0]["loss"] == runs[1]["loss"]
    # without shuffling, fit is exactly the loop over consecutive batches
    fitted = Sequential([Dense(2, 3)], device=backend, seed=0)
    fit(fitted, "cross_entropy", SGD(0.1), x, y, epochs=1, batch_size=16, shuffle=False)
    model = Sequential([Dense(2, 3)], device=backend, seed=0)
    device = model.device
    for start in range(0, 64, 16):
        out = model.forward(device.to_device(x[start : start + 16], model.dtype), training=True)
        _, delta = xpnet.SoftmaxCrossEntropy().value_and_grad(out, device.to_device(y[start : start + 16]))
        model.backward(delta)
        SGD(0.1).step(model)
    for key, value in model.named_parameters().items():
        np.testing.assert_allclose(
            host(device, fitted.named_parameters()[key]), host(device, value), rtol=1e-5, atol=1e-7
        )
    assert set(runs[0].history) == {"loss", "accuracy", "seconds"}


def test_early_stopping_options():
    def feed(stopper, values, mode_model=None):
        model = mode_model or Sequential([Dense(1, 1)])
        state = xpnet.TrainingState(model, None, len(values), 1, 1, None)
        stopper.on_train_begin(state)
        for epoch, value in enumerate(values):
            state.epoch = epoch
            model.load_state_dict({"0.W": [[float(epoch)]], "0.b": [0.0]})
            stopper.on_epoch_end(state, {"val_loss": value, "val_accuracy": value})
            if state.stop_training:
                break
        stopper.on_train_end(state)
        return model, state

    # min_delta: 0.95 is not better than 1.0 by more than 0.1, so it does not reset the wait
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    model, state = feed(stopper, [1.0, 0.95, 0.92, 0.5])
    assert state.stop_training and stopper.stopped_epoch == 2 and stopper.best_epoch == 0
    assert float(host(model.device, model.named_parameters()["0.W"])[0, 0]) == 0.0  # restored epoch 0
    # mode="max" on accuracy
    stopper = EarlyStopping(patience=1, monitor="val_accuracy", mode="max")
    model, state = feed(stopper, [0.5, 0.7, 0.6, 0.9])
    assert stopper.best_epoch == 1 and stopper.stopped_epoch == 2
    assert float(host(model.device, model.named_parameters()["0.W"])[0, 0]) == 1.0
    # restore_best_weights=False keeps the last weights
    stopper = EarlyStopping(patience=1, restore_best_weights=False)
    model, state = feed(stopper, [0.5, 0.7])
    assert float(host(model.device, model.named_parameters()["0.W"])[0, 0]) == 1.0


def test_predict_and_evaluate_outputs(backend):
    model = Sequential([Dense(2, 3)], device=backend)
    out = predict(model, XOR_X, batch_size=3)
    from conftest import assert_on_device

    assert_on_device(model.device, out, "float32")
    assert tuple(out.shape) == (4, 3)
    result = evaluate(model, "cross_entropy", XOR_X, XOR_Y)
    assert set(result) == {"loss", "accuracy"} and all(type(v) is float for v in result.values())
    with pytest.raises(ValueError, match="0 rows"):
        predict(model, XOR_X[:0])


def _spy_on_backward(model) -> list:
    """(layer index, need_input_grad, shape of what it returned or None) for each layer's backward
    call from now on, in the order of the calls."""
    calls = []
    for i, layer in enumerate(model.layers):

        def spy(delta, need_input_grad=True, i=i, backward=layer.backward):
            result = backward(delta, need_input_grad=need_input_grad)
            calls.append((i, need_input_grad, None if result is None else tuple(result.shape)))
            return result

        layer.backward = spy
    return calls


def test_first_layer_input_gradient_is_skipped(backend):
    model = Sequential([Flatten(), Dense(2, 3), ReLU(), Dense(3, 1)], device=backend, seed=0)
    calls = _spy_on_backward(model)
    device = model.device
    model.forward(device.to_device(XOR_X, model.dtype), training=True)
    delta = device.to_device(np.ones((4, 1)), model.dtype)
    assert model.backward(delta) is None
    # the Dense that takes the input is told not to compute ∂L/∂x and returns none; the Flatten
    # before it (no parameters) is not run at all
    assert calls == [(3, True, (4, 3)), (2, True, (4, 3)), (1, False, None)]
    calls.clear()
    dx = model.backward(delta, input_grad=True)
    assert calls == [(3, True, (4, 3)), (2, True, (4, 3)), (1, True, (4, 2)), (0, True, (4, 2))]
    W1, b1, W2 = (host(device, model.named_parameters()[key]) for key in ("1.W", "1.b", "3.W"))
    delta1 = (np.ones((4, 1)) @ W2) * (XOR_X @ W1.T + b1 > 0)  # through the ReLU, by hand
    assert np.count_nonzero(delta1) > 0
    np.testing.assert_allclose(host(device, dx), delta1 @ W1, rtol=1e-5, atol=1e-6)
    # fit never asks for it either: every step's backward of the first Dense returns None
    calls.clear()
    fit(model, "mse", SGD(0.1), XOR_X, np.zeros((4, 1), np.float32), epochs=2, batch_size=2, shuffle=False)
    assert [call for call in calls if call[0] <= 1] == [(1, False, None)] * 4


class _CountedProducts:
    """Stands in for a weight matrix in backward: counts the matrix products it takes part in
    (the only product with W in Dense.backward is ∂L/∂x = δ W)."""

    def __init__(self, W):
        self.W, self.products = W, 0
        self.shape, self.dtype = W.shape, W.dtype

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):  # `delta @ W` and np.matmul(..., out=)
        self.products += ufunc is np.matmul
        return getattr(ufunc, method)(*(self.W if a is self else a for a in inputs), **kwargs)


@pytest.mark.parametrize("in_fit", [False, True], ids=["outside-fit", "fit-buffers"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_first_layer_computes_no_input_gradient_product(fast, in_fit):
    model = Sequential([Dense(2, 3), ReLU(), Dense(3, 1)], device=xpnet.Device("cpu", fast=fast), seed=0)
    first = model.layers[0]
    delta = np.ones((4, 1), np.float32)
    for input_grad, products in ((False, 0), (True, 1)):
        with model.reusing_buffers() if in_fit else contextlib.nullcontext():  # as fit's loop runs it
            model.forward(XOR_X, training=True)
            W = first.params["W"]
            # stand-in for the layer's read alone (dict's own setitem: the store refuses a non-array)
            dict.__setitem__(first.params, "W", counted := _CountedProducts(W))
            try:
                model.backward(delta, input_grad=input_grad)
            finally:
                dict.__setitem__(first.params, "W", W)
        assert counted.products == products, (input_grad, counted.products)


def test_the_training_set_moves_to_the_device_once(monkeypatch):
    moved = []
    original = xpnet.Device.to_device
    monkeypatch.setattr(
        xpnet.Device,
        "to_device",
        lambda self, a, *args, **kw: moved.append(np.shape(a)) or original(self, a, *args, **kw),
    )
    x, y = _blobs(n=300)
    model = Sequential([Dense(2, 8), ReLU(), Dense(8, 3)])
    fit(model, "cross_entropy", SGD(0.1), x, y, epochs=4, batch_size=10)
    assert moved.count((300, 2)) == 1 and moved.count((300,)) == 1 + 4  # the labels once, a permutation per epoch


def test_fit_continues_from_initial_epoch_like_an_unbroken_run(backend):
    x, y = _blobs(n=200)
    validation = _blobs(n=60, seed=9)

    def model_and_parts():
        model = Sequential([Dense(2, 8), ReLU(), Dropout(0.2), Dense(8, 3)], device=backend, seed=4)
        return model, Adam(0.01), EarlyStopping(patience=10)

    def train(model, optimizer, stopper, epochs, **kw):
        return fit(
            model,
            "cross_entropy",
            optimizer,
            x,
            y,
            epochs=epochs,
            batch_size=32,
            validation_data=validation,
            callbacks=[stopper],
            **kw,
        )

    model, optimizer, stopper = model_and_parts()
    whole = train(model, optimizer, stopper, 4)

    first, first_optimizer, first_stopper = model_and_parts()
    history = train(first, first_optimizer, first_stopper, 2)
    saved = (
        first.state_dict(),
        first_optimizer.state_dict(),
        first.device.rng_state(),
        first_stopper.state_dict(),
        first_stopper.best_weights,
    )

    second, second_optimizer, second_stopper = model_and_parts()
    second.load_state_dict(saved[0])
    second_optimizer.load_state_dict(saved[1], second)
    second.device.set_rng_state(saved[2])
    second_stopper.load_state_dict(saved[3], saved[4])
    resumed = train(second, second_optimizer, second_stopper, 4, initial_epoch=2, history=history)

    assert resumed.epochs == [0, 1, 2, 3]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert resumed[key] == whole[key]  # exactly: the same computation in the same order
    for key, value in model.named_parameters().items():
        np.testing.assert_array_equal(host(model.device, second.named_parameters()[key]), host(model.device, value))
    assert second_stopper.state_dict() == stopper.state_dict()
    with pytest.raises(ValueError, match="initial_epoch must be between 0 and epochs=4"):
        fit(second, "cross_entropy", second_optimizer, x, y, epochs=4, initial_epoch=5)


def test_early_stopping_state_round_trip():
    model = Sequential([Dense(1, 1)])
    stopper = EarlyStopping(patience=3)
    state = xpnet.TrainingState(model, None, 5, 1, 1, None)
    stopper.on_train_begin(state)
    for epoch, value in enumerate([0.5, 0.4, 0.45]):
        state.epoch = epoch
        stopper.on_epoch_end(state, {"val_loss": value})
    saved, best = stopper.state_dict(), stopper.best_weights
    assert saved == {"best": 0.4, "best_epoch": 1, "wait": 1}
    restored = EarlyStopping(patience=3)
    restored.load_state_dict(saved, best)
    restored.on_train_begin(state)  # a resumed fit must not reset what was restored
    assert restored.state_dict() == saved and restored.best_weights is best
    restored.on_train_begin(state)  # a later, fresh fit does reset
    assert restored.state_dict() == {"best": float("inf"), "best_epoch": None, "wait": 0}
