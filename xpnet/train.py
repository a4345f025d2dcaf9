"""Training: fit with shuffled mini-batches, evaluate and predict in batches, callbacks.

The data go to the device once; each epoch draws a permutation from the seeded shuffle stream,
and each batch is taken on the device by index (``xp.take``). One step is

    a = model.forward(x)                  forward pass, layer by layer
    L, δ = loss.value_and_grad(a, y)      δ = ∂L/∂a (p − y over B for softmax cross-entropy)
    model.backward(δ)                     every gradient first ...
    optimizer.step(model)                 ... then every update

The epoch's loss and metric counts accumulate on the device and are read once per epoch (or when
a callback asks for the running loss, as a throttled progress bar does), never per batch.

Arguments are checked once per call, before any batch: the data's types and shapes on what they
are (host or device arrays), its values in one pass, the labels against the model's outputs
before the first loss (compiled kernels index by label). The per-batch calls then skip the
loss's own label check (``Loss.targets_checked``).
"""

from __future__ import annotations

import contextlib
import math
import operator

from .checks import checked_count, real, shown
from .distributed import (
    average_state,
    broadcast_random_state,
    broadcast_training_state,
    checked_communicator,
    mark_everywhere,
    sum_gradients,
)
from .losses import get_loss
from .metrics import default_metrics, get_metric
from .model import _KINDS, dtype_kind
from .ops import trust, untrust
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
        self._rows_seen = 0  # this process's rows of the epoch so far (all of them on one process)
        #: The processes fit trains on (``xpnet.distributed``): ``communicator.rank`` is 0 on one process.
        self.communicator = None

    def running_loss(self) -> float:
        """The mean training loss of this epoch so far (on a rank of a data-parallel job: over
        its own rows). Reads the device: call it sparingly."""
        if not self._rows_seen:
            return math.nan
        return self.model.device.item(self._loss_sum) / self._rows_seen


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
def _array(device, a, name: str, rows: str = "one row per example"):
    """(``a``, its dtype's kind): ``a`` itself when it is an array of any backend, else the host
    array NumPy reads from it (lists); TypeError for None."""
    if a is None:
        raise TypeError(f"{name} must be an array with {rows}, got None")
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        try:
            a = device.to_host(a)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name} is not a rectangular array ({exc})") from None
    return a, dtype_kind(a.dtype)


def _described(dtype, kind) -> str:
    return f"{dtype} ({_KINDS.get(kind, 'not numbers')})"


def _checked_x(model, x, name: str = "x"):
    """x checked on its type and shape (no pass over its values), as it is (host or device)."""
    x, kind = _array(model.device, x, name)
    if kind not in "biuf":
        raise TypeError(f"{name} has dtype {_described(x.dtype, kind)}; the model takes numbers")
    model.check_input_shape(x.shape, name)
    return x


def _to_device_data(model, loss, x, y, names=("x", "y")):
    """(X, Y) on the device, checked once: types, shapes and lengths first (free), then one pass
    each for NaN and infinities."""
    xname, yname = names
    device = model.device
    x, kind = _array(device, x, xname)
    if kind not in "biuf":
        raise TypeError(f"{xname} has dtype {_described(x.dtype, kind)}; the model takes numbers")
    y, kind = _array(device, y, yname, "one entry per example")
    if kind not in "biuf":
        raise TypeError(
            f"{yname} has dtype {_described(y.dtype, kind)}: {type(loss).__name__} needs {loss.targets_needed}"
        )
    model.check_input_shape(x.shape, xname)
    if len(y.shape) == 0:
        raise ValueError(f"{yname} must have one entry per example, got shape ()")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{xname} has {x.shape[0]} examples but {yname} has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"{xname} has 0 examples: there is nothing to train or evaluate on")
    X = device.to_device(x, model.dtype)
    Y = device.to_device_targets(y, model.dtype, class_labels=loss.class_labels)
    xp = model.xp
    # a finite sum means finite data, in one pass and without an array of flags the data's size
    if not math.isfinite(device.item(xp.sum(X))) and not device.item(xp.all(xp.isfinite(X))):
        raise ValueError(f"{xname} contains NaN or infinite values")
    if xp.isdtype(Y.dtype, "real floating") and not device.item(xp.all(xp.isfinite(Y))):
        raise ValueError(f"{yname} contains NaN or infinite values")
    return X, Y


def _check_targets(loss, targets, num_outputs: int, name: str) -> None:
    """``loss.check_targets`` once over a whole target array, its errors naming the argument."""
    try:
        loss.check_targets(targets, num_outputs)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


class _MetricTally:
    """Metric counts summed on the device batch by batch, read to the host once at the end."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.correct = [0] * len(metrics)
        self.judged = [0] * len(metrics)

    def add(self, output, target) -> None:
        for i, metric in enumerate(self.metrics):
            correct, judged = metric.count(output, target)
            self.correct[i], self.judged[i] = self.correct[i] + correct, self.judged[i] + judged

    def logs(self, device, comm, loss_sum, rows) -> dict:
        """{"loss": the mean loss, and each metric}, from this process's sums (``loss_sum`` over
        ``rows`` rows) and every other rank's: one read of each, one collective."""
        local = [_host(device, v) for v in (loss_sum, rows, *self.correct, *self.judged)]
        total = comm.sum_floats(local) if comm.parallel else local
        count = len(self.metrics)
        logs = {"loss": total[0] / total[1] if total[1] else math.nan}
        for i, metric in enumerate(self.metrics):
            logs[metric.name] = total[2 + i] / total[2 + count + i] if total[2 + count + i] else math.nan
        return logs


def _host(device, value) -> float:
    """A count or sum as a Python float: Python numbers as they are, device arrays read once."""
    return float(value) if isinstance(value, (int, float)) else device.item(value)


def _evaluate_on_device(model, loss, X, Y, batch_size, metrics, comm) -> dict:
    """Loss and metrics over (X, Y); each rank of a data-parallel job computes its share of the
    rows (``comm.share``), and the sums are added over the ranks."""
    loss_sum, tally = 0.0, _MetricTally(metrics)
    first, last = comm.share(X.shape[0])
    token = trust(None)
    try:
        with model.device, model.device.ops.active():
            for start, stop in _batches(last - first, batch_size):
                start, stop = first + start, first + stop
                out = model.forward(X[start:stop, ...], training=False)
                yb = trust_rows(Y, start, stop)
                loss_sum = loss_sum + loss.value(out, yb) * (stop - start)
                tally.add(out, yb)
    finally:
        untrust(token)
    return tally.logs(model.device, comm, loss_sum, last - first)


def trust_rows(Y, start: int, stop: int):
    """Rows start:stop of targets checked whole, marked as checked (``xpnet.ops.trust``)."""
    rows = Y[start:stop, ...]
    trust(rows)
    return rows


def _check_batch_size(batch_size) -> int:
    return checked_count("batch_size", batch_size)


def _checked_callbacks(callbacks) -> tuple:
    """``callbacks`` as a tuple of Callback instances (None for none); TypeError naming the
    argument, or the entry, otherwise. Checked once per fit, before any data moves."""
    if callbacks is None:
        return ()
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list or tuple of xn.Callback objects, got {shown(callbacks)}")
    for i, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks[{i}] must be an xn.Callback (an instance of a subclass), got {shown(callback)}")
    return tuple(callbacks)


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
    communicator=None,
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

    ``communicator``: the processes to train on (``xpnet.distributed``; None: this one alone).
    With an ``MPICommunicator`` every rank calls fit with the same model, data and options; each
    takes its share of every batch of ``batch_size`` rows (the global batch), the gradients are
    summed over the ranks before each update, and every rank ends with the same parameters and
    the same logs. Callbacks run on every rank (``state.communicator.rank`` tells them apart).
    """
    epochs = checked_count("epochs", epochs)
    batch_size = _check_batch_size(batch_size)
    split = real(validation_split)
    if split is None or not 0.0 <= split < 1.0:
        raise ValueError(f"validation_split must be a number in [0, 1), got {shown(validation_split)}")
    validation_split = split
    if validation_data is not None and validation_split:
        raise ValueError("give validation_data or validation_split, not both")
    if validation_data is not None and (not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2):
        raise TypeError(f"validation_data must be a pair (x_val, y_val), got {shown(validation_data)}")
    try:
        first_epoch = None if isinstance(initial_epoch, bool) else operator.index(initial_epoch)
    except TypeError:
        first_epoch = None
    if first_epoch is None or not 0 <= first_epoch <= epochs:
        raise ValueError(
            f"initial_epoch must be between 0 and epochs={epochs} (an integer), got {shown(initial_epoch)}"
        )
    initial_epoch = first_epoch
    callbacks = _checked_callbacks(callbacks)
    if isinstance(optimizer, str):
        optimizer = get_optimizer(optimizer)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an xpnet Optimizer or its name, got {optimizer!r}")
    optimizer.bind(model)  # refused here, before any data moves, if it steps another model
    loss = get_loss(loss)
    metrics = default_metrics(loss) if metrics is None else [get_metric(m) for m in metrics]
    comm = checked_communicator(communicator)
    device, xp = model.device, model.xp

    with device, device.ops.computing(), comm.guarded():
        broadcast_random_state(comm, device)  # rank 0's streams, before a validation split draws
        with comm.together():  # a rank's bad data ends every rank here, before any exchange
            X, Y = _to_device_data(model, loss, x, y)
            val = None
            targets = [(Y, "y")]
            if validation_data is not None:
                val = _to_device_data(model, loss, *validation_data, names=("validation x", "validation y"))
                targets.append((val[1], "validation y"))
            elif validation_split:
                train_idx, val_idx = train_validation_split(device, X.shape[0], validation_split)
                val = (xp.take(X, val_idx, axis=0), xp.take(Y, val_idx, axis=0))
                X, Y = xp.take(X, train_idx, axis=0), xp.take(Y, train_idx, axis=0)
                targets = [(Y, "y"), (val[1], "y")]  # both parts of y
            n = X.shape[0]
            _check_ranks(comm, n, batch_size)
            # the targets, training and validation, checked whole, once, against the model's outputs
            outputs = model.forward(X[:1, ...]).shape[-1]
            for whole, name in targets:
                _check_targets(loss, whole, outputs, name)
        comm.check_same(
            examples=n,
            example_shape=tuple(X.shape[1:]),
            validation_examples=None if val is None else val[0].shape[0],
            parameters=[(key, tuple(p.shape)) for key, p in model.named_parameters().items()],
            dtype=str(model.dtype),
            layout=model.store.layout,
            optimizer=(type(optimizer).__name__, tuple(optimizer.slot_names)),
            loss=type(loss).__name__,
            metrics=[metric.name for metric in metrics],
            batch_size=batch_size,
            epochs=epochs,
            initial_epoch=initial_epoch,
            shuffle=bool(shuffle),
        )
        broadcast_training_state(comm, model, optimizer)

        history = History() if history is None else history
        state = TrainingState(model, optimizer, epochs, math.ceil(n / batch_size), n, history)
        state.first_epoch = initial_epoch
        state.communicator = comm
        with comm.together():  # a callback that fails on every rank (or on one) stops them all here
            for cb in callbacks:
                cb.on_train_begin(state)
        try:
            with loss.targets_checked():  # checked whole, once, above
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
                        )
                    average_state(comm, model)  # BatchNorm's running statistics: the ranks' mean
                    if val is not None:
                        val_logs = _evaluate_on_device(model, loss, *val, max(batch_size, 256), metrics, comm)
                        logs.update({f"val_{key}": value for key, value in val_logs.items()})
                    logs["seconds"] = clock.stop()
                    history.append(epoch, logs)
                    with comm.together():
                        for cb in callbacks:
                            cb.on_epoch_end(state, logs)
                    if comm.parallel:  # a callback on one rank stops them all
                        state.stop_training = comm.any(state.stop_training)
                    if state.stop_training:
                        break
        finally:
            for cb in callbacks:
                cb.on_train_end(state)
    return history


def _check_ranks(comm, n: int, batch_size: int) -> None:
    """Every rank must have two rows or more in the first step (``share_of``; the steps after it
    may leave a rank none)."""
    if comm.parallel and min(n, batch_size) < 2 * comm.size:
        raise ValueError(
            f"a batch of {min(n, batch_size)} examples cannot be shared by {comm.size} ranks: give a batch size "
            f"(and at least as many examples) of at least {2 * comm.size}, two a rank"
        )


def _train_epoch(model, loss, optimizer, X, Y, state, epoch, batch_size, shuffle, metrics, callbacks):
    """One pass over (X, Y) in shuffled mini-batches; returns the epoch's logs (one host read each).

    On a rank of a data-parallel job each step computes the rank's rows of the batch, and its
    gradient, weighted by its share, is summed with the other ranks' before the update."""
    device, n, comm = model.device, X.shape[0], state.communicator
    state.epoch, state.samples_seen, state._loss_sum, state._rows_seen = epoch, 0, 0.0, 0
    with comm.together():
        for cb in callbacks:
            cb.on_epoch_begin(state)
    order = device.permutation(n) if shuffle else None
    tally = _MetricTally(metrics)
    ops = device.ops
    share = comm.share if comm.parallel else None
    draws = None  # the dropout draws of one forward pass, which a rank without rows skips
    token = trust(None)
    try:
        with (
            ops.reusing(),
            ops.active(),
            contextlib.closing(ops.batches(X, Y, order, batch_size, share)) as batches,
        ):
            for step, (start, stop, xb, yb) in enumerate(batches):
                rows = xb.shape[0]
                if rows:
                    device.first_row = 0 if share is None else share(stop - start)[0]
                    counter = device.draws_made
                    out = model.forward(xb, training=True)
                    draws = device.draws_made - counter
                    trust(yb)  # rows of the targets checked above: the loss need not check them again
                    value, delta = loss.value_and_grad(out, yb)
                    if rows != stop - start:  # a rank's share: δ of its b_r rows weighted by b_r / B
                        delta = delta * (rows / (stop - start))
                    model.backward(delta)
                    state._loss_sum = state._loss_sum + value * rows
                    tally.add(out, yb)
                else:  # the last batch has fewer rows than there are ranks: this one adds nothing
                    model.store.zero_grads()
                    device.skip_draws(draws or 0)
                sum_gradients(comm, model)
                optimizer.step(model)
                state.step, state.samples_seen, state._rows_seen = step, stop, state._rows_seen + rows
                for cb in callbacks:
                    cb.on_batch_end(state)
    finally:
        device.first_row = 0
        untrust(token)
    logs = tally.logs(device, comm, state._loss_sum, state._rows_seen)
    if not math.isfinite(logs["loss"]):
        raise mark_everywhere(
            TrainingDiverged(
                f"the training loss became {logs['loss']} in epoch {epoch + 1}; "
                "try a lower learning rate or gradient clipping"
            )
        )
    return logs


def evaluate(model, loss, x, y, *, batch_size: int = 1024, metrics=None, communicator=None) -> dict:
    """Mean loss and metrics of ``model`` on (x, y), in batches, read once at the end.

    ``communicator``: as in ``fit``; every rank passes the same (x, y), computes its share of the
    rows, and every rank returns the figures of all of them."""
    loss = get_loss(loss)
    metrics = default_metrics(loss) if metrics is None else [get_metric(m) for m in metrics]
    batch_size = _check_batch_size(batch_size)
    comm = checked_communicator(communicator)
    with model.device, model.device.ops.computing(), comm.guarded():
        with comm.together():
            X, Y = _to_device_data(model, loss, x, y)
            _check_targets(loss, Y, model.forward(X[:1, ...]).shape[-1], "y")
        comm.check_same(examples=X.shape[0], parameters=model.store.total)
        with loss.targets_checked():
            return _evaluate_on_device(model, loss, X, Y, batch_size, metrics, comm)


def predict(model, x, *, batch_size: int = 1024):
    """The model's outputs for x (in evaluation mode), computed in batches, on the device."""
    batch_size = _check_batch_size(batch_size)
    x = _checked_x(model, x)
    if x.shape[0] == 0:
        raise ValueError("x has 0 examples: predict got an input with 0 rows")
    X = model.device.to_device(x, model.dtype)
    with model.device, model.device.ops.computing():
        outputs = [model.forward(X[start:stop, ...]) for start, stop in _batches(X.shape[0], batch_size)]
        return model.xp.concat(outputs, axis=0)
