"""Runs: the training configuration, the run folder, and rebuilding a run from it.

A run folder holds
    config.json          every option of the run (and the data's shape), written once
    metrics.jsonl        one JSON line per finished epoch
    checkpoint.safetensors  model, optimizer, random state, history, early stopping (each epoch)
    results.json         the test figures, when training has finished
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import xpnet as xn
from xpnet.data import load_dataset
from xpnet.io import CheckpointError, load_checkpoint, save_checkpoint, write_json_atomic


class CLIError(Exception):
    """A problem to report in one line; ``code`` is the exit status (2 bad input, 1 runtime)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


DEFAULTS = {
    "device": "cpu",
    "dataset": "mnist",
    "data_dir": None,
    "hidden": "128,64",
    "activation": "relu",
    "dropout": 0.0,
    "optimizer": "adam",
    "lr": None,
    "weight_decay": 0.0,
    "schedule": "none",
    "epochs": 5,
    "batch_size": 128,
    "seed": 0,
    "val_split": 0.1,
    "early_stopping": 0,
    "dtype": "float32",
}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "adamw": 1e-3}
SCHEDULES = ("none", "step", "exponential", "cosine", "warmup")
CONFIG, METRICS, CHECKPOINT, RESULTS = "config.json", "metrics.jsonl", "checkpoint.safetensors", "results.json"


def parse_hidden(text) -> list[int]:
    if isinstance(text, list):
        return text
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes) or not all(p.strip().isdigit() for p in str(text).split(",")):
        raise CLIError(f"--hidden must be positive integers separated by commas, such as 128,64; got {text!r}")
    return sizes


def resolve_config(options: dict, saved: dict | None = None) -> dict:
    """Options given on the command line, over the saved run's (on resume), over the defaults."""
    config = {**DEFAULTS, **(saved or {})}
    config.update({key: value for key, value in options.items() if value is not None})
    config["hidden"] = parse_hidden(config["hidden"])
    checks = [
        (
            isinstance(config["epochs"], int) and config["epochs"] >= 1,
            f"--epochs must be a positive integer, got {config['epochs']}",
        ),
        (config["batch_size"] >= 1, f"--batch-size must be a positive integer, got {config['batch_size']}"),
        (0.0 <= config["dropout"] < 1.0, f"--dropout must be in [0, 1), got {config['dropout']}"),
        (0.0 <= config["val_split"] < 1.0, f"--val-split must be in [0, 1), got {config['val_split']}"),
        (
            config["early_stopping"] >= 0,
            f"--early-stopping must be a patience of 0 (off) or more, got {config['early_stopping']}",
        ),
        (
            config["optimizer"] in DEFAULT_LR,
            f"--optimizer must be one of {', '.join(DEFAULT_LR)}, got {config['optimizer']!r}",
        ),
        (
            config["schedule"] in SCHEDULES,
            f"--schedule must be one of {', '.join(SCHEDULES)}, got {config['schedule']!r}",
        ),
        (
            config["activation"] in xn.model.ACTIVATIONS,
            f"--activation must be one of {', '.join(xn.model.ACTIVATIONS)}, got {config['activation']!r}",
        ),
        (config["dtype"] in ("float32", "float64"), f"--dtype must be float32 or float64, got {config['dtype']!r}"),
        (config["weight_decay"] >= 0, f"--weight-decay must be non-negative, got {config['weight_decay']}"),
        (config["seed"] >= 0, f"--seed must be non-negative, got {config['seed']}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CLIError(message)
    if config["lr"] is None:
        config["lr"] = DEFAULT_LR[config["optimizer"]]
    if not config["lr"] > 0:
        raise CLIError(f"--lr must be positive, got {config['lr']}")
    return config


@dataclasses.dataclass
class Data:
    """The dataset of a run, split and (for tables) standardized, plus what the model needs."""

    dataset: object
    loss: str
    extra: dict


def load_data(config: dict) -> Data:
    try:
        dataset = load_dataset(config["dataset"], data_dir=config["data_dir"], seed=config["seed"])
    except xn.data.DataError as exc:
        raise CLIError(str(exc)) from exc
    if dataset.val is None and config["val_split"] > 0:
        dataset = dataset.with_validation(config["val_split"], seed=config["seed"], stratify=True)
    extra = {}
    if dataset.task == "binary":  # tables are standardized with the training split's statistics
        dataset = dataset.standardized()
        extra = {"data_mean": dataset.standardization[0], "data_std": dataset.standardization[1]}
    return Data(dataset, "bce" if dataset.task == "binary" else "cross_entropy", extra)


def make_device(name: str, seed: int = 0) -> xn.Device:
    try:
        return xn.Device(name, seed=seed)
    except xn.DeviceError as exc:
        raise CLIError(str(exc)) from exc


def build_model(config: dict, data: Data, device: xn.Device) -> xn.Sequential:
    try:
        return xn.mlp(
            data.dataset.num_features,
            config["hidden"],
            data.dataset.num_outputs,
            activation=config["activation"],
            dropout=config["dropout"],
            device=device,
            dtype=config["dtype"],
            seed=config["seed"],
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def build_optimizer(config: dict, steps_per_epoch: int) -> xn.Optimizer:
    lr, total = config["lr"], config["epochs"] * steps_per_epoch
    schedule = {
        "none": lambda: lr,
        "step": lambda: xn.StepDecay(lr, step_size=steps_per_epoch, gamma=0.5),  # halve every epoch
        "exponential": lambda: xn.ExponentialDecay(lr, gamma=0.9 ** (1.0 / steps_per_epoch)),  # ×0.9 per epoch
        "cosine": lambda: xn.CosineDecay(lr, total_steps=total),
        "warmup": lambda: xn.Warmup(xn.CosineDecay(lr, total_steps=max(1, total - steps_per_epoch)), steps_per_epoch),
    }[config["schedule"]]()
    return xn.get_optimizer(config["optimizer"], lr=schedule, weight_decay=config["weight_decay"])


class RunRecorder(xn.Callback):
    """After every epoch: append the metrics line, then save the whole state to the checkpoint."""

    def __init__(self, run_dir: Path, data: Data, early_stopping: xn.EarlyStopping | None):
        self.run_dir, self.data, self.early_stopping = run_dir, data, early_stopping

    def on_epoch_end(self, state, logs):
        line = {"epoch": state.epoch + 1, **logs, "samples_per_second": state.num_samples / max(logs["seconds"], 1e-9)}
        with open(self.run_dir / METRICS, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        save_run_checkpoint(
            self.run_dir, state.model, state.optimizer, self.data, state.history, state.epoch + 1, self.early_stopping
        )


def save_run_checkpoint(run_dir, model, optimizer, data, history, epochs_done, early_stopping, finished=False):
    extra = dict(data.extra)
    meta = {
        "epochs_done": epochs_done,
        "finished": finished,
        "history": history.history,
        "rng_state": model.device.rng_state(),
        "saved_on": model.device.name,
    }
    if early_stopping is not None:
        meta["early_stopping"] = early_stopping.state_dict()
        for key, value in (early_stopping.best_weights or {}).items():
            extra[f"best/{key}"] = value
    save_checkpoint(Path(run_dir) / CHECKPOINT, model, optimizer, extra=extra, meta=meta)


def read_config(run_dir) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CLIError(f"{run_dir} is not an xpnet run folder (no {CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON ({exc})") from exc


def read_checkpoint(run_dir):
    try:
        return load_checkpoint(Path(run_dir) / CHECKPOINT)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc


def load_run(run_dir, device_name: str | None = None):
    """(config, data, model) of a finished or interrupted run, on the chosen device."""
    config = read_config(run_dir)
    checkpoint = read_checkpoint(run_dir)
    data = load_data(config)
    device = make_device(device_name or config["device"], config["seed"])
    model = build_model(config, data, device)
    try:
        checkpoint.load_model_into(model)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    return config, data, model, checkpoint


def train_run(options: dict, *, out: str | None, resume: str | None, callbacks_for) -> dict:
    """Train (or continue) a run; return the summary. ``callbacks_for(state)`` adds display."""
    saved = read_config(resume) if resume else None
    if resume and saved is not None:
        run_dir = Path(resume)
        config = resolve_config({k: options[k] for k in ("epochs", "device") if options.get(k) is not None}, saved)
    else:
        config = resolve_config(options)
        run_dir = Path(out) if out else Path("runs") / f"{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (run_dir / CHECKPOINT).exists():
            raise CLIError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or choose another --out")
    device = make_device(config["device"], config["seed"])
    data = load_data(config)
    ds = data.dataset
    model = build_model(config, data, device)
    steps_per_epoch = math.ceil(len(ds.train) / config["batch_size"])
    optimizer = build_optimizer(config, steps_per_epoch)
    early_stopping = xn.EarlyStopping(config["early_stopping"]) if config["early_stopping"] else None
    history, initial_epoch = xn.History(), 0

    if resume:
        checkpoint = read_checkpoint(run_dir)
        try:
            checkpoint.load_model_into(model)
            checkpoint.load_optimizer_into(optimizer, model)
        except CheckpointError as exc:
            raise CLIError(str(exc)) from exc
        meta = checkpoint.meta
        initial_epoch = int(meta["epochs_done"])
        if initial_epoch >= config["epochs"]:
            raise CLIError(
                f"{run_dir} has finished its {initial_epoch} epochs; "
                f"pass --epochs N (more than {initial_epoch}) to continue"
            )
        device.set_rng_state(meta["rng_state"])  # host streams: the same on every backend
        for epoch, _ in enumerate(meta["history"].get("loss", [])):
            history.append(epoch, {key: values[epoch] for key, values in meta["history"].items()})
        if early_stopping is not None and "early_stopping" in meta:
            best = {key[len("best/") :]: value for key, value in checkpoint.extra.items() if key.startswith("best/")}
            early_stopping.load_state_dict(
                meta["early_stopping"], {k: device.to_device(v, model.dtype) for k, v in best.items()} or None
            )
        lines = [
            json.dumps({"epoch": e + 1, **{k: v[e] for k, v in history.history.items()}}) for e in range(len(history))
        ]
        (run_dir / METRICS).write_text("".join(line + "\n" for line in lines))
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / CONFIG, {**config, "xpnet_version": xn.__version__})
        (run_dir / METRICS).write_text("")

    callbacks = [c for c in (early_stopping, RunRecorder(run_dir, data, early_stopping)) if c is not None]
    callbacks += callbacks_for(config)
    started = time.perf_counter()
    try:
        xn.fit(
            model,
            data.loss,
            optimizer,
            ds.train.x,
            ds.train.y,
            epochs=config["epochs"],
            batch_size=config["batch_size"],
            validation_data=None if ds.val is None else (ds.val.x, ds.val.y),
            callbacks=callbacks,
            initial_epoch=initial_epoch,
            history=history,
        )
    except KeyboardInterrupt:
        done = len(history)
        raise CLIError(
            f"interrupted: the checkpoint holds epoch {done} of {config['epochs']}; "
            f"resume with: xpnet train --resume {run_dir}",
            code=130,
        ) from None
    except xn.TrainingDiverged as exc:
        raise CLIError(f"{exc}; the checkpoint of epoch {len(history)} is intact in {run_dir}", code=1) from None
    seconds = time.perf_counter() - started
    epochs_run = len(history) - initial_epoch
    save_run_checkpoint(run_dir, model, optimizer, data, history, len(history), early_stopping, finished=True)
    test = xn.evaluate(model, data.loss, ds.test.x, ds.test.y)
    metric = "binary_accuracy" if data.loss == "bce" else "accuracy"
    summary = {
        "run_dir": str(run_dir),
        "dataset": config["dataset"],
        "device": device.name,
        "test_accuracy": test[metric],
        "test_loss": test["loss"],
        "epochs": len(history),
        "seconds": seconds,
        "samples_per_second": epochs_run * len(ds.train) / max(seconds, 1e-9),
        "parameters": model.num_parameters(),
    }
    write_json_atomic(run_dir / RESULTS, summary)
    return summary
