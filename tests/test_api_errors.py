"""Bad input to the public API: a TypeError or ValueError naming the argument, never a crash.

Each group below is one kind of mistake: inputs to forward / predict / evaluate / fit, deltas to
backward, targets a loss cannot use, an optimizer shared by two models, hyperparameters, and
damaged optimizer state. The messages are matched on the argument's name and the bad value.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest

import xpnet as xn
from xpnet.data import load_dataset, load_idx_folder, load_wdbc, split_indices

X = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
Y = np.array([0, 1, 2, 0, 1, 2, 0, 1])


def _small(device="cpu", **kwargs):
    return xn.mlp(4, [5], 3, device=device, seed=0, **kwargs)


def _fit(model=None, x=X, y=Y, loss="cross_entropy", optimizer=None, **kwargs):
    model = _small() if model is None else model
    return xn.fit(model, loss, optimizer or xn.SGD(0.1), x, y, **kwargs)


# ------------------------------------------------------------- 1. model inputs
def test_forward_takes_host_lists_and_names_a_feature_mismatch():
    model = xn.mlp(784, [16], 10)
    with pytest.raises(ValueError, match=r"x has shape \(1, 20\).*\(batch, 784\)"):
        model.forward([[0.0] * 20])
    out = model.forward([[0.0] * 784])
    assert out.shape == (1, 10) and out.dtype == np.float32


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: m.forward(x),
        lambda m, x: xn.predict(m, x),
        lambda m, x: xn.evaluate(m, "cross_entropy", x, np.zeros(len(x), int)),
        lambda m, x: xn.fit(m, "cross_entropy", xn.SGD(0.1), x, np.zeros(len(x), int)),
    ],
    ids=["forward", "predict", "evaluate", "fit"],
)
def test_a_feature_count_mismatch_names_x_everywhere(call):
    model = xn.mlp(784, [16], 10)
    with pytest.raises(
        ValueError, match=r"^x has shape \(3, 20\), but the model expects input of shape \(batch, 784\)"
    ):
        call(model, np.zeros((3, 20), np.float32))


def test_forward_refuses_text_and_objects_naming_x():
    model = _small()
    with pytest.raises(TypeError, match=r"^x .*<U1"):
        model.forward([["a"] * 4])
    with pytest.raises(TypeError, match=r"^x must be an array"):
        model.forward(None)
    with pytest.raises(
        TypeError, match=r"^x has dtype float64, which does not match the model's float32"
    ):  # arrays are never cast
        model.forward(np.zeros((2, 4)))


def test_forward_moves_host_arrays_to_a_device_that_is_not_numpy():
    model = _small("strict:device1")
    out = model.forward(np.ones((2, 4), np.float32))
    assert out.device == model.device.native


# ---------------------------------------------------------------- 2. fit's arguments
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"x": None}, TypeError, r"^x must be an array.*got None"),
        ({"y": None}, TypeError, r"^y must be an array.*got None"),
        ({"x": "abc"}, TypeError, r"^x has dtype <U3"),
        ({"x": [[1.0, 2.0], [3.0]]}, ValueError, r"^x is not a rectangular array"),
        ({"x": X[0]}, ValueError, r"^x has shape \(4,\), but the model expects input of shape \(batch, 4\)"),
        ({"x": np.float32(1.0)}, ValueError, r"^x must have one row per example, got shape \(\)"),
        ({"y": np.int64(1)}, ValueError, r"^y must have one entry per example, got shape \(\)"),
        ({"y": Y[:5]}, ValueError, r"^x has 8 examples but y has 5"),
        ({"x": X[:0], "y": Y[:0]}, ValueError, r"^x has 0 examples"),
        ({"x": np.where(X > 1, np.nan, X)}, ValueError, r"^x contains NaN or infinite values"),
        ({"batch_size": 0}, ValueError, r"^batch_size must be a positive integer, got 0"),
        ({"batch_size": -3}, ValueError, r"^batch_size must be a positive integer, got -3"),
        ({"batch_size": 2.5}, ValueError, r"^batch_size must be a positive integer, got 2.5"),
        ({"batch_size": "32"}, ValueError, r"^batch_size must be a positive integer, got '32'"),
        ({"batch_size": True}, ValueError, r"^batch_size must be a positive integer, got True"),
        ({"epochs": -1}, ValueError, r"^epochs must be a positive integer, got -1"),
        ({"epochs": 2.0}, ValueError, r"^epochs must be a positive integer, got 2.0"),
        ({"validation_split": -0.1}, ValueError, r"^validation_split must be a number in \[0, 1\), got -0.1"),
        ({"validation_split": 1.0}, ValueError, r"^validation_split must be a number in \[0, 1\), got 1.0"),
        ({"validation_split": math.nan}, ValueError, r"^validation_split must be a number in \[0, 1\), got nan"),
        ({"validation_split": "0.1"}, ValueError, r"^validation_split must be a number in \[0, 1\), got '0.1'"),
        ({"initial_epoch": 0.5}, ValueError, r"^initial_epoch must be between 0 and epochs=1 \(an integer\), got 0.5"),
        ({"validation_data": X}, TypeError, r"^validation_data must be a pair \(x_val, y_val\)"),
        ({"validation_data": (X, Y[:3])}, ValueError, r"^validation x has 8 examples but validation y has 3"),
    ],
)
def test_fit_names_the_bad_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        _fit(**kwargs)


def test_numpy_integers_are_integers_for_fit():
    history = _fit(epochs=np.int64(2), batch_size=np.int32(4))
    assert len(history) == 2


# ----------------------------------------------------------------- 3. backward's delta
def test_sequential_backward_names_a_misshapen_delta():
    model = xn.mlp(784, [16], 10)
    model.forward(np.zeros((8, 784), np.float32))
    for shape in ((8, 9), (7, 10), (1, 10), (8,)):
        with pytest.raises(ValueError, match=rf"^delta has shape {re_shape(shape)}, expected \(8, 10\)"):
            model.backward(np.zeros(shape, np.float32))
    with pytest.raises(TypeError, match=r"^delta has dtype float64, expected float32"):
        model.backward(np.zeros((8, 10)))
    model.backward(np.zeros((8, 10), np.float32))  # the right shape still works


def re_shape(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize(
    "layer, x",
    [
        (xn.Dense(4, 3), np.ones((2, 4))),
        (xn.ReLU(), np.ones((2, 3))),
        (xn.LeakyReLU(), np.ones((2, 3))),
        (xn.Sigmoid(), np.ones((2, 3))),
        (xn.Tanh(), np.ones((2, 3))),
        (xn.Softmax(), np.ones((2, 3))),
        (xn.Dropout(0.5), np.ones((2, 3))),
        (xn.Flatten(), np.ones((2, 3, 1))),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, xn.Layer) else "",
)
def test_each_layer_backward_names_a_misshapen_delta(layer, x):
    device = xn.Device("cpu")
    layer.build(device, np.float32)
    out = layer.forward(x.astype(np.float32), training=True)
    bad = np.ones((1, *out.shape[1:]), np.float32)  # broadcastable: the reference code took it silently
    with pytest.raises(ValueError, match=rf"^{type(layer).__name__}.backward: delta has shape \(1, "):
        layer.backward(bad)
    assert layer.backward(np.ones(out.shape, np.float32)).shape == x.shape


def test_a_parameter_of_another_shape_is_refused_when_it_is_assigned():
    model = _small()
    before = np.array(model.layers[0].params["b"])
    with pytest.raises(ValueError, match=r"^the parameter 0.b must have shape \(5,\), got \(2,\)$"):
        model.layers[0].params["b"] = np.zeros(2, np.float32)  # the compiled bias pass would read past it
    with pytest.raises(TypeError, match=r"^the parameter 0.b must have the model's dtype float32, got float64"):
        model.layers[0].params["b"] = np.zeros(5)
    with pytest.raises(AttributeError, match=r"Dense.params belongs to the model's parameter store"):
        model.layers[0].params = {}
    np.testing.assert_array_equal(model.layers[0].params["b"], before)
    _fit(model)  # and the model still trains


# --------------------------------------------------------------------- 4. targets
@pytest.mark.parametrize(
    "loss, outputs, needs",
    [("cross_entropy", 3, "integer class labels"), ("bce", 1, "0/1 targets"), ("mse", 1, "numbers")],
)
def test_text_labels_name_y_its_dtype_and_what_the_loss_needs(loss, outputs, needs):
    model = xn.mlp(4, [5], outputs, seed=0)
    text = np.array(list("abcabcab"))
    for call in (lambda: _fit(model, y=text, loss=loss), lambda: xn.evaluate(model, loss, X, text)):
        with pytest.raises(TypeError, match=rf"^y has dtype <U1 \(text\).*{needs}"):
            call()


def test_whole_float_labels_for_cross_entropy_keep_their_hint():
    with pytest.raises(ValueError, match="class labels must be an integer array"):
        _fit(y=Y.astype(float))


@pytest.mark.parametrize("bad, label", [(-1, -1), (3, 3), (10**12, 10**12)])
def test_labels_out_of_range_name_y_and_the_label(bad, label):
    y = Y.copy()
    y[5] = bad
    for call in (
        lambda: _fit(y=y),
        lambda: _fit(validation_data=(X, y)),
        lambda: xn.evaluate(_small(), "cross_entropy", X, y),
    ):
        with pytest.raises(ValueError, match=rf"y.*label {label} .*3 outputs"):
            call()


@pytest.mark.parametrize("fast", [True, False])
def test_the_public_loss_refuses_labels_out_of_range(fast):
    device = xn.Device("cpu", fast=fast)
    z = device.to_device(np.zeros((4, 3)), "float32")
    loss = xn.SoftmaxCrossEntropy()
    for bad in (-1, 3):
        y = device.to_device(np.array([0, 1, bad, 2]))
        with pytest.raises(ValueError, match=rf"^class label {bad} is outside 0 to 2 for logits of 3 classes"):
            loss.value(z, y)
        with pytest.raises(ValueError, match=rf"^class label {bad} is outside 0 to 2"):
            loss.value_and_grad(z, y)


_CHILD = """
import numpy as np, xpnet as xn
device = xn.Device("cpu")
loss = xn.SoftmaxCrossEntropy()
z = np.zeros((300, 3), np.float32)
for bad in (3, -1, 10**9, -10**9):
    y = np.zeros(300, np.int64)
    y[7] = bad
    try:
        with device.ops.reusing(), device.ops.active():  # as in fit: the compiled kernel's path
            loss.value_and_grad(z, y)
        print("accepted", bad, flush=True)
    except ValueError as exc:
        print("refused", bad, exc, flush=True)
"""


def test_the_compiled_loss_never_sees_a_label_out_of_range():
    """In a child process: before the check, the compiled kernel wrote out of bounds (and a label of
    10**9 crashed the process with a segmentation fault)."""
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"the child died with {run.returncode}: {run.stdout}{run.stderr}"
    lines = run.stdout.splitlines()
    assert len(lines) == 4
    for line, bad in zip(lines, (3, -1, 10**9, -(10**9))):
        assert line.startswith(f"refused {bad} class label {bad} is outside 0 to 2"), line


# ----------------------------------------------------- 5. one optimizer, one model
@pytest.mark.parametrize("make", [lambda: xn.Adam(0.01), lambda: xn.SGD(0.1), lambda: xn.Momentum(0.1)])
@pytest.mark.parametrize("fast", [True, False])
def test_an_optimizer_is_bound_to_the_model_it_first_steps(make, fast):
    device = lambda: xn.Device("cpu", fast=fast)  # noqa: E731
    first, second = _small(device()), _small(device())
    optimizer = make()
    _fit(first, optimizer=optimizer)
    _fit(first, optimizer=optimizer)  # the same model again: fine
    assert optimizer.bound_model is first
    steps = optimizer.steps
    second.backward(second.forward(X, training=True))
    with pytest.raises(ValueError, match=r"is bound to another model.*create a new optimizer for each model"):
        optimizer.step(second)
    with pytest.raises(ValueError, match=r"is bound to another model"):
        _fit(second, optimizer=optimizer)
    assert optimizer.steps == steps


def test_binding_survives_state_round_trips_and_load_binds():
    model = _small()
    optimizer = xn.Adam(0.01)
    _fit(model, optimizer=optimizer)
    state = optimizer.state_dict()
    optimizer.load_state_dict(state, model)  # into the same model: fine
    _fit(model, optimizer=optimizer)
    resumed_model, resumed = _small(), xn.Adam(0.01)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(state, resumed_model)
    assert resumed.bound_model is resumed_model
    with pytest.raises(ValueError, match="bound to another model"):
        _fit(model, optimizer=resumed)
    _fit(resumed_model, optimizer=resumed)


# -------------------------------------------------------------- 6. hyperparameters
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: xn.Adam(lr=math.inf), r"^lr \(the learning rate\) must be a finite positive number, got inf"),
        (lambda: xn.Adam(lr=-1), r"^lr \(the learning rate\) must be a finite positive number, got -1"),
        (lambda: xn.Adam(lr=0), r"^lr \(the learning rate\) must be a finite positive number, got 0"),
        (lambda: xn.Adam(lr=math.nan), r"^lr .* got nan"),
        (lambda: xn.Adam(weight_decay=math.nan), r"^weight_decay must be a finite non-negative number, got nan"),
        (lambda: xn.Adam(weight_decay=-0.1), r"^weight_decay must be a finite non-negative number, got -0.1"),
        (lambda: xn.Adam(weight_decay=math.inf), r"^weight_decay must be a finite non-negative number, got inf"),
        (lambda: xn.Adam(beta1=1.0), r"^beta1 must be a number in \[0, 1\), got 1.0"),
        (lambda: xn.Adam(beta2=-0.5), r"^beta2 must be a number in \[0, 1\), got -0.5"),
        (lambda: xn.Adam(beta2=math.nan), r"^beta2 must be a number in \[0, 1\), got nan"),
        (lambda: xn.Adam(eps=0), r"^eps must be a finite positive number, got 0"),
        (lambda: xn.Adam(eps=math.nan), r"^eps must be a finite positive number, got nan"),
        (lambda: xn.Adam(eps=math.inf), r"^eps must be a finite positive number, got inf"),
        (lambda: xn.SGD(0.1, momentum=1.0), r"^momentum must be a number in \[0, 1\), got 1.0"),
        (lambda: xn.SGD(0.1, momentum=-0.1), r"^momentum must be a number in \[0, 1\), got -0.1"),
        (lambda: xn.Momentum(0.1, momentum=math.nan), r"^momentum must be a number in \[0, 1\), got nan"),
        (lambda: xn.SGD(0.1, clip_norm=0), r"^clip_norm must be a finite positive number .*got 0"),
        (lambda: xn.SGD(0.1, clip_norm=math.nan), r"^clip_norm must be a finite positive number .*got nan"),
        (lambda: xn.SGD(0.1, clip_norm=-1.0), r"^clip_norm must be a finite positive number .*got -1.0"),
        (lambda: xn.Adam(lr="fast"), r"^lr \(the learning rate\) must be a finite positive number.*got 'fast'"),
        (lambda: xn.StepDecay(math.nan, 10), r"^StepDecay lr must be a finite positive number, got nan"),
        (lambda: xn.StepDecay(0.1, 10, gamma=-0.5), r"^StepDecay gamma must be a finite positive number, got -0.5"),
        (lambda: xn.StepDecay(0.1, 2.5), r"^StepDecay step_size must be a positive integer, got 2.5"),
        (lambda: xn.ExponentialDecay(math.inf, 0.9), r"^ExponentialDecay lr must be a finite positive number, got inf"),
        (lambda: xn.ExponentialDecay(0.1, math.nan), r"^ExponentialDecay gamma must be a finite positive number"),
        (lambda: xn.CosineDecay(-0.1, 10), r"^CosineDecay lr must be a finite positive number, got -0.1"),
        (lambda: xn.CosineDecay(0.1, 10, min_lr=-1), r"^CosineDecay min_lr must be a finite number from 0 to lr"),
        (lambda: xn.CosineDecay(0.1, 10, min_lr=math.nan), r"^CosineDecay min_lr must be .*got nan"),
        (lambda: xn.CosineDecay(0.1, -10), r"^CosineDecay total_steps must be a positive integer, got -10"),
        (lambda: xn.Warmup(math.inf, 5), r"^Warmup lr must be a finite positive number, got inf"),
        (lambda: xn.Warmup(0.1, -5), r"^Warmup warmup_steps must be a positive integer, got -5"),
        (lambda: xn.Constant(math.nan), r"^Constant lr must be a finite positive number, got nan"),
    ],
)
def test_bad_hyperparameters_name_the_argument_and_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------- 7. damaged optimizer state
def _trained_state():
    model, optimizer = _small(), xn.Adam(0.01)
    _fit(model, optimizer=optimizer)
    return model, optimizer.state_dict()


def _deep(levels):
    value = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(steps=10**400), r"^optimizer state field steps must be an integer in \[0, 2\*\*53\), got"),
        (lambda s: s.update(steps=-5), r"^optimizer state field steps must be an integer .*got -5"),
        (lambda s: s.update(steps=2**53), r"^optimizer state field steps .*got 9007199254740992"),
        (lambda s: s.update(steps=3.0), r"^optimizer state field steps .*got 3.0"),
        (lambda s: s.update(steps=True), r"^optimizer state field steps .*got True"),
        (lambda s: s.update(steps="3"), r"^optimizer state field steps .*got '3'"),
        (lambda s: s.update(steps=_deep(5000)), r"^optimizer state field steps .*got a list"),
        (lambda s: s.pop("steps"), r"^optimizer state has no field steps"),
        (lambda s: s.update(type=_deep(5000)), r"^optimizer state field type .*got a list"),
        (lambda s: s.update(hyperparameters=[1]), r"^optimizer state field hyperparameters must be a dict"),
        (lambda s: s["hyperparameters"].update(eps=math.nan), r"^optimizer state hyperparameter eps must be a fin"),
        (lambda s: s["hyperparameters"].update(beta1=2.0), r"^optimizer state hyperparameter beta1 must be a num"),
        (lambda s: s["hyperparameters"].update(weight_decay=-1.0), r"^optimizer state hyperparameter weight_decay"),
        (lambda s: s["hyperparameters"].update(clip_norm=_deep(5000)), r"^optimizer state hyperparameter clip_norm"),
        (lambda s: s.update(slots=[1]), r"^optimizer state field slots must be a dict"),
        (lambda s: s["slots"].update({"0.W": 5}), r"^optimizer slots for '0.W' must be a dict"),
        (lambda s: s["slots"]["0.W"].update(m=np.zeros((3, 3))), r"^optimizer slot 0.W.m has shape \(3, 3\)"),
        (lambda s: s["slots"]["0.W"].update(m=np.full((5, 4), "a")), r"^optimizer slot 0.W.m has dtype <U1"),
        (lambda s: s["slots"]["0.b"].update(m=np.zeros(5, np.int64)), r"^optimizer slot 0.b.m has dtype int64"),
        (lambda s: s["slots"]["0.W"].update(v=np.full((5, 4), np.nan)), r"^optimizer slot 0.W.v holds NaN or inf"),
        (lambda s: s["slots"]["2.b"].update(m=np.full(3, np.inf)), r"^optimizer slot 2.b.m holds NaN or infinite"),
        (lambda s: s["slots"]["2.b"].update(v=-np.ones(3)), r"^optimizer slot 2.b.v holds negative values"),
    ],
)
def test_damaged_optimizer_state_is_refused_naming_the_field(change, message):
    model, state = _trained_state()
    change(state)
    optimizer = xn.Adam(0.01)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(state, model)
    assert optimizer.steps == 0 and optimizer.state == {} and optimizer.bound_model is None


def test_optimizer_state_must_be_a_dict():
    with pytest.raises(TypeError, match=r"^optimizer state must be a dict"):
        xn.Adam().load_state_dict([("steps", 1)], _small())


# ------------------------------------------------- 7. datasets, callbacks and seeds
@pytest.mark.parametrize("name", [None, 3, ["mnist"]])
def test_load_dataset_names_a_name_that_is_not_a_str(name):
    with pytest.raises(TypeError, match=r"^name must be a dataset name, a str \(mnist, wdbc, fashion-mnist, kmnist\)"):
        load_dataset(name)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist", "wdbc"])
def test_an_empty_data_dir_is_refused_not_read_as_the_current_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a current folder that holds a dataset would load, silently
    with pytest.raises(ValueError, match=r"^data_dir is an empty string"):
        load_dataset(name, data_dir="")


def test_data_dir_and_paths_of_another_type_are_named():
    with pytest.raises(TypeError, match=r"^data_dir must be a str or path, or None, got 3"):
        load_dataset("mnist", data_dir=3)
    with pytest.raises(ValueError, match=r"^folder is an empty string"):
        load_idx_folder("")
    with pytest.raises(ValueError, match=r"^path is an empty string"):
        load_wdbc("")


@pytest.mark.parametrize("seed", [-1, 2.5, True, "0"])
@pytest.mark.parametrize(
    "load",
    [
        lambda seed: load_dataset("mnist", validation=0.1, seed=seed),
        lambda seed: load_dataset("wdbc", seed=seed),
        lambda seed: load_wdbc(seed=seed),
        lambda seed: split_indices(np.arange(10), 0.5, seed=seed),
    ],
    ids=["load_dataset", "load_dataset-wdbc", "load_wdbc", "split_indices"],
)
def test_dataset_seeds_are_named(load, seed):
    """NumPy's own message ("expected non-negative integer") named no argument."""
    with pytest.raises(ValueError, match=rf"^seed must be a non-negative integer, got {re.escape(repr(seed))}$"):
        load(seed)


@pytest.mark.parametrize("validation", [-0.1, 1.0, math.nan, "0.1", True])
def test_load_dataset_names_a_bad_validation_fraction(validation):
    with pytest.raises(ValueError, match=r"^validation must be a fraction in \[0, 1\)"):
        load_dataset("mnist", validation=validation)


@pytest.mark.parametrize(
    "callbacks, message",
    [
        ("abc", r"^callbacks must be a list or tuple of xn\.Callback objects, got 'abc'"),
        (xn.EarlyStopping(), r"^callbacks must be a list or tuple of xn\.Callback objects, got an EarlyStopping"),
        ([object()], r"^callbacks\[0\] must be an xn\.Callback \(an instance of a subclass\), got an object"),
        ([xn.EarlyStopping], r"^callbacks\[0\] must be an xn\.Callback \(an instance of a subclass\), got a type"),
    ],
)
def test_fit_names_bad_callbacks_before_training(callbacks, message):
    model = _small()
    before = {name: np.array(value) for name, value in model.named_parameters().items()}
    with pytest.raises(TypeError, match=message):
        _fit(model, callbacks=callbacks)
    for name, value in model.named_parameters().items():
        np.testing.assert_array_equal(np.asarray(value), before[name])


def test_fit_takes_callbacks_as_a_list_a_tuple_or_none():
    for callbacks in ([xn.Callback()], (xn.Callback(),), None, ()):
        assert len(_fit(callbacks=callbacks)) == 1


@pytest.mark.parametrize("seed", [-1, 2.5, True, "0", 1.0])
@pytest.mark.parametrize(
    "make",
    [
        lambda seed: xn.mlp(4, [3], 2, seed=seed),
        lambda seed: xn.Sequential([xn.Dense(4, 2)], seed=seed),
        lambda seed: xn.Device("cpu", seed=seed),
        lambda seed: xn.Device("cpu").seed(seed),
    ],
    ids=["mlp", "Sequential", "Device", "Device.seed"],
)
def test_model_and_device_seeds_are_named(make, seed):
    with pytest.raises(ValueError, match=rf"^seed must be a non-negative integer, got {re.escape(repr(seed))}"):
        make(seed)


def test_numpy_integer_seeds_are_seeds():
    a = xn.mlp(4, [3], 2, seed=np.int64(7)).named_parameters()
    b = xn.mlp(4, [3], 2, seed=7).named_parameters()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    assert len(load_dataset("wdbc", seed=np.int32(1)).train) == 341


_EVERY_ENTRY = r"""
import numpy as np, xpnet as xn
rng = np.random.default_rng(0)
x = rng.normal(size=(300, 4)).astype(np.float32)
model = xn.mlp(4, [5], 3, seed=0)
device = model.device
z = device.to_device(rng.normal(size=(300, 3)), "float32")
entries = {
    "fit": lambda y: xn.fit(model, "cross_entropy", "adam", x, y, batch_size=100),
    "fit validation": lambda y: xn.fit(model, "cross_entropy", "adam", x, y % 3, validation_data=(x, y)),
    "evaluate": lambda y: xn.evaluate(model, "cross_entropy", x, y),
    "gradcheck": lambda y: xn.gradcheck(
        xn.mlp(4, [5], 3, dtype="float64", seed=0), "cross_entropy", x[:4].astype(np.float64), y[:4]
    ),
    "loss.value": lambda y: xn.SoftmaxCrossEntropy().value(z, device.to_device(y)),
    "loss.value_and_grad": lambda y: xn.SoftmaxCrossEntropy().value_and_grad(z, device.to_device(y)),
    "Accuracy.count": lambda y: xn.Accuracy().count(z, device.to_device(y)),
}
def in_fit_mode(f):  # as within fit's loop: buffers reused, the device's Ops active
    def run(y):
        with device.ops.reusing(), device.ops.active():
            return f(y)
    return run
entries.update({name + " (in fit's mode)": in_fit_mode(f) for name, f in list(entries.items()) if "." in name})
entries["ops.softmax_cross_entropy"] = in_fit_mode(lambda y: device.ops.softmax_cross_entropy(z, device.to_device(y)))
entries["ops.count_correct"] = in_fit_mode(lambda y: device.ops.count_correct(z, device.to_device(y)))
for bad in (3, -1, 10**9, -10**9, 2**62):
    y = np.zeros(300, np.int64)
    y[:4] = bad
    for name, call in entries.items():
        try:
            call(y)
            print("ran", name, bad, flush=True)
        except ValueError as exc:
            print("refused", name, bad, str(exc).splitlines()[0][:80], flush=True)
"""


def test_every_public_entry_with_labels_out_of_range_refuses_them_or_runs_without_crashing():
    """fit, evaluate, gradcheck, the loss, the metric and the Ops, each in the mode fit runs them:
    a label of 3, -1, 10**9, -10**9 or 2**62 for 3 classes is refused with a ValueError; the ones that
    index nothing by label (the accuracy count, the reference loss of the Ops) may run. The child
    must live: a compiled kernel reading row[label] would crash it."""
    run = subprocess.run([sys.executable, "-c", _EVERY_ENTRY], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"the child died with {run.returncode}: {run.stdout[-2000:]}{run.stderr[-2000:]}"
    lines = run.stdout.splitlines()
    assert len(lines) == 5 * 12, run.stdout
    ran = {line.split(" ", 1)[1].rsplit(" ", 1)[0] for line in lines if line.startswith("ran ")}
    assert ran <= {
        "Accuracy.count",
        "Accuracy.count (in fit's mode)",
        "ops.count_correct",
        "ops.softmax_cross_entropy",
    }, ran
    refused = [line for line in lines if line.startswith("refused fit ") or line.startswith("refused evaluate ")]
    assert len(refused) == 5 * 3 and all("label" in line for line in refused), refused
