"""Training: fit with shuffled mini-batches, evaluate and predict in batches, callbacks.

The data go to the device once; each epoch draws a permutation from the seeded shuffle stream,
and each batch is taken on the device by index (``xp.take``). One step is

    a = model.forward(x)                  forward pass, layer by layer
    L, δ = loss.value_and_grad(a, y)      δ = ∂L/∂a (p − y over B for softmax cross-entropy)
    model.backward(δ)                     every gradient first ...
    optimizer.step(model)                 ... then every update

The epoch's loss and metric counts accumulate on the device and are read once per epoch (or when
a callback asks for the running loss, as a throttled progress bar does), never per batch.
"""

from __future__ import annotations

import math

from .losses import SoftmaxCrossEntropy, get_loss
from .metrics import default_metrics, get_metric
from .optim import Optimizer, get_optimizer

__all__ = [
    "fit",
    "train_validation_split",
    "evaluate",
    "predict",
    "History",
    "Callback",
    "EarlyStopping",
    "TrainingState",
    "TrainingDiverged",
]


class TrainingDiverged(FloatingPointError):
    """The epoch's mean loss was NaN or infinite."""


class History:
    """Per-epoch logs: ``history["loss"]``, ``history["val_accuracy"]``, ... as lists of floats."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.epochs: list[int] = []

    def append(self, epoch: int, logs: dict) -> None:
        self.epochs.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __contains__(self, key: str) -> bool:
        return key in self.history

    def __len__(self) -> int:
        return len(self.epochs)

    def __repr__(self) -> str:
        return f"History(epochs={len(self)}, keys={sorted(self.history)})"


class TrainingState:
    """What callbacks see: the model, the optimizer, where training is, and a way to stop it."""

    def __init__(self, model, optimizer, epochs, steps_per_epoch, num_samples, history):
        self.model = model
        self.optimizer = optimizer
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.num_samples = num_samples
        self.history = history
        self.epoch = 0
        self.step = 0
        self.samples_seen = 0
        self.stop_training = False
        self.first_epoch = 0
        self._loss_sum = 0.0

    def running_loss(self) -> float:
        """The mean training loss of this epoch so far. Reads the device: call it sparingly."""
        if not self.samples_seen:
            return math.nan
        return self.model.device.item(self._loss_sum) / self.samples_seen


class Callback:
    """Hooks into ``fit``; every method is optional."""

    def on_train_begin(self, state: TrainingState) -> None: ...

    def on_epoch_begin(self, state: TrainingState) -> None: ...

    def on_batch_end(self, state: TrainingState) -> None: ...

    def on_epoch_end(self, state: TrainingState, logs: dict) -> None: ...

    def on_train_end(self, state: TrainingState) -> None: ...


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    With ``restore_best_weights`` the model ends with the parameters of its best epoch.
    """

    def __init__(
        self,
        patience: int = 5,
        *,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        mode: str = "min",
        restore_best_weights: bool = True,
    ):
        if patience < 0:
            raise ValueError(f"patience must be non-negative, got {patience}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.monitor, self.min_delta = int(patience), monitor, float(min_delta)
        self.mode, self.restore_best_weights = mode, restore_best_weights
        self._restored = False
        self.reset()

    def reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = None
        self.best_weights = None
        self.wait = 0
        self.stopped_epoch = None

    def on_train_begin(self, state):
        if not self._restored:  # a resumed run keeps the state it was saved with
            self.reset()
        self._restored = False

    def state_dict(self) -> dict:
        """Counters as JSON-ready values; ``best_weights`` (device arrays) are saved apart."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict, best_weights: dict | None = None) -> None:
        self.best, self.best_epoch, self.wait = float(state["best"]), state["best_epoch"], int(state["wait"])
        self.best_weights = best_weights
        self._restored = True

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, state, logs):
        if self.monitor not in logs:
            raise ValueError(
                f"EarlyStopping monitors {self.monitor!r}, which fit did not log "
                f"(logged: {', '.join(sorted(logs))}); give validation data or a validation split"
            )
        value = logs[self.monitor]
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, state.epoch, 0
            if self.restore_best_weights:
                self.best_weights = state.model.state_dict()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = state.epoch
            state.stop_training = True

    def on_train_end(self, state):
        if self.best_weights is not None:
            state.model.load_state_dict(self.best_weights)


# -------------------------------------------------------------------- helpers
def _to_device_data(model, loss, x, y):
    device = model.device
    X = device.to_device(x, model.dtype)
    Y = device.to_device_targets(y, model.dtype, class_labels=loss.class_labels)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"x has {X.shape[0]} examples but y has {Y.shape[0]}")
    if X.shape[0] == 0:
        raise ValueError("no examples to train or evaluate on")
    xp = model.xp
    # a finite sum means finite data, in one pass and without an array of flags the data's size
    if not math.isfinite(device.item(xp.sum(X))) and not device.item(xp.all(xp.isfinite(X))):
        raise ValueError("the input data contain NaN or infinite values")
    if xp.isdtype(Y.dtype, "real floating") and not device.item(xp.all(xp.isfinite(Y))):
        raise ValueError("the targets contain NaN or infinite values")
    return X, Y


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


class _MetricTally:
    """Metric counts summed on the device batch by batch, read to the host once at the end."""

    def __init__(self, metrics, fast=None):
        self.metrics, self.fast = metrics, fast
        self.correct = [0] * len(metrics)
        self.judged = [0] * len(metrics)

    def add(self, output, target) -> None:
        for i, metric in enumerate(self.metrics):
            correct, judged = metric.count_fast(output, target, self.fast)
            self.correct[i], self.judged[i] = self.correct[i] + correct, self.judged[i] + judged

    def logs(self, device) -> dict:
        return {m.name: device.item(c) / j for m, c, j in zip(self.metrics, self.correct, self.judged)}


def _evaluate_on_device(model, loss, X, Y, batch_size, metrics) -> dict:
    loss_sum, tally = 0.0, _MetricTally(metrics, model.device.fast)
    with model.device:
        for start, stop in _batches(X.shape[0], batch_size):
            out = model.forward(X[start:stop, ...], training=False)
            yb = Y[start:stop, ...]
            loss_sum = loss_sum + loss.value(out, yb) * (stop - start)
            tally.add(out, yb)
    return {"loss": model.device.item(loss_sum) / X.shape[0], **tally.logs(model.device)}


def _check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


# ------------------------------------------------------------------ public API
def train_validation_split(device, n: int, fraction: float):
    """Indices (train, validation) on the device: a seeded permutation of range(n), with the
    first round(n · fraction) positions held out. Never the tail of the data: sorted data would
    leave whole classes out of training."""
    n_val = int(round(n * fraction))
    if not 0 < n_val < n:
        raise ValueError(f"validation_split {fraction} leaves {n_val} of {n} examples for validation")
    order = device.permutation(n)
    return order[n_val:], order[:n_val]


def fit(
    model,
    loss,
    optimizer,
    x,
    y,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    validation_data=None,
    validation_split: float = 0.0,
    metrics=None,
    callbacks=(),
    shuffle: bool = True,
    initial_epoch: int = 0,
    history: History | None = None,
) -> History:
    """Train ``model`` on (x, y) and return the History of per-epoch logs.

    x, y: arrays of any backend (or NumPy); moved to the model's device once. Integer y are class
    labels. ``validation_data=(x_val, y_val)``, or ``validation_split`` = the fraction of examples
    held out, chosen by a seeded permutation (never the tail: sorted data would bias it).
    ``optimizer`` is an Optimizer or a name ('sgd', 'momentum', 'adam', 'adamw').
    Logs per epoch: loss, each metric, val_ versions of both, and seconds (the epoch and its
    validation, by ``device.stopwatch()``).
    To continue a run, pass ``initial_epoch`` (epochs already done) and its ``history``; with the
    model, optimizer, callbacks and device random state restored, the result is that of an
    unbroken run. Resume with ``validation_data``: a ``validation_split`` is drawn anew each call.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    _check_batch_size(batch_size)
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
    if validation_data is not None and validation_split:
        raise ValueError("give validation_data or validation_split, not both")
    if not 0 <= initial_epoch <= epochs:
        raise ValueError(f"initial_epoch must be between 0 and epochs={epochs}, got {initial_epoch}")
    if isinstance(optimizer, str):
        optimizer = get_optimizer(optimizer)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an xpnet Optimizer or its name, got {optimizer!r}")
    loss = get_loss(loss)
    metrics = default_metrics(loss) if metrics is None else [get_metric(m) for m in metrics]
    device, xp = model.device, model.xp

    with device:
        X, Y = _to_device_data(model, loss, x, y)
        val = None
        if validation_data is not None:
            val = _to_device_data(model, loss, *validation_data)
        elif validation_split:
            train_idx, val_idx = train_validation_split(device, X.shape[0], validation_split)
            val = (xp.take(X, val_idx, axis=0), xp.take(Y, val_idx, axis=0))
            X, Y = xp.take(X, train_idx, axis=0), xp.take(Y, train_idx, axis=0)

        n = X.shape[0]
        history = History() if history is None else history
        state = TrainingState(model, optimizer, epochs, math.ceil(n / batch_size), n, history)
        state.first_epoch = initial_epoch
        for cb in callbacks:
            cb.on_train_begin(state)
        try:
            for epoch in range(initial_epoch, epochs):
                clock = device.stopwatch()  # CUDA events on a GPU, the host clock elsewhere
                with model.reusing_buffers():
                    logs = _train_epoch(
                        model,
                        loss,
                        optimizer,
                        X,
                        Y,
                        state,
                        epoch,
                        batch_size,
                        shuffle,
                        metrics,
                        callbacks,
                        all_targets=[Y] if val is None else [Y, val[1]],
                    )
                if val is not None:
                    val_logs = _evaluate_on_device(model, loss, *val, max(batch_size, 256), metrics)
                    logs.update({f"val_{key}": value for key, value in val_logs.items()})
                logs["seconds"] = clock.stop()
                history.append(epoch, logs)
                for cb in callbacks:
                    cb.on_epoch_end(state, logs)
                if state.stop_training:
                    break
        finally:
            for cb in callbacks:
                cb.on_train_end(state)
    return history


def _train_epoch(model, loss, optimizer, X, Y, state, epoch, batch_size, shuffle, metrics, callbacks, all_targets):
    """One pass over (X, Y) in shuffled mini-batches; returns the epoch's logs (one host read each)."""
    device, xp, n = model.device, model.xp, X.shape[0]
    state.epoch, state.samples_seen, state._loss_sum = epoch, 0, 0.0
    for cb in callbacks:
        cb.on_epoch_begin(state)
    order = device.permutation(n) if shuffle else None
    fast, buffers = device.fast, {}
    tally = _MetricTally(metrics, fast)
    # the fused softmax-CE only stands in for exactly SoftmaxCrossEntropy on integer labels
    fast_loss = fast is not None and type(loss) is SoftmaxCrossEntropy and xp.isdtype(Y.dtype, "integral")
    # each next batch's rows copied ahead by CPU threads that would wait otherwise (two buffers in turn)
    ahead = order is not None and fast is not None and fast.gathers_ahead(X, batch_size)
    try:
        for step, (start, stop) in enumerate(_batches(n, batch_size)):
            if order is None:
                xb, yb = X[start:stop, ...], Y[start:stop, ...]
            elif fast is not None:  # gathered into buffers reused every step
                name = f"x{step % 2}" if ahead else "x"
                xb = fast.take_rows(
                    X, order, start, stop, fast.buffer(buffers, name, (stop - start, *X.shape[1:]), X.dtype)
                )
                yb = fast.take_rows(
                    Y, order, start, stop, fast.buffer(buffers, "y", (stop - start, *Y.shape[1:]), Y.dtype)
                )
                if ahead and stop < n:
                    after = min(stop + batch_size, n)
                    following = fast.buffer(buffers, f"x{(step + 1) % 2}", (after - stop, *X.shape[1:]), X.dtype)
                    fast.take_rows_ahead(X, order, stop, after, following)
            else:
                idx = order[start:stop]
                xb, yb = xp.take(X, idx, axis=0), xp.take(Y, idx, axis=0)
            out = model.forward(xb, training=True)
            if step == 0 and epoch == state.first_epoch:  # the targets, training and validation, checked once
                for targets in all_targets:
                    loss.check_targets(targets, out.shape[-1])
            if fast_loss:
                value, delta = loss.value_and_grad(out, yb, fast=fast, buffers=buffers)
            else:
                value, delta = loss.value_and_grad(out, yb)
            model.backward(delta)
            optimizer.step(model)
            state._loss_sum = state._loss_sum + value * (stop - start)
            tally.add(out, yb)
            state.step, state.samples_seen = step, stop
            for cb in callbacks:
                cb.on_batch_end(state)
    finally:  # however the epoch ends, no copy may still be writing into a buffer
        if ahead:
            fast.finish_ahead()
    logs = {"loss": state.running_loss()}
    if not math.isfinite(logs["loss"]):
        raise TrainingDiverged(
            f"the training loss became {logs['loss']} in epoch {epoch + 1}; "
            "try a lower learning rate or gradient clipping"
        )
    logs.update(tally.logs(device))
    return logs


def evaluate(model, loss, x, y, *, batch_size: int = 1024, metrics=None) -> dict:
    """Mean loss and metrics of ``model`` on (x, y), in batches, read once at the end."""
    loss = get_loss(loss)
    metrics = default_metrics(loss) if metrics is None else [get_metric(m) for m in metrics]
    with model.device:
        X, Y = _to_device_data(model, loss, x, y)
        loss.check_targets(Y, model.forward(X[:1, ...]).shape[-1])
        return _evaluate_on_device(model, loss, X, Y, _check_batch_size(batch_size), metrics)


def predict(model, x, *, batch_size: int = 1024):
    """The model's outputs for x (in evaluation mode), computed in batches, on the device."""
    _check_batch_size(batch_size)
    X = model.device.to_device(x, model.dtype)
    if X.shape[0] == 0:
        raise ValueError("predict got no examples (an input with 0 rows)")
    with model.device:
        outputs = [model.forward(X[start:stop, ...]) for start, stop in _batches(X.shape[0], batch_size)]
        return model.xp.concat(outputs, axis=0)
