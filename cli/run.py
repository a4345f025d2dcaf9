"""Runs: the training configuration, the run folder, and rebuilding a run from it.

A run folder holds
    config.json             every option of the run (rewritten only when a resume changes --epochs
                            or --data-dir, after the first checkpoint made with the new value)
    metrics.jsonl           one JSON line per finished epoch
    checkpoint.safetensors  model, optimizer, random state, history and early stopping, as of the
                            last finished epoch (epoch 0: the initial state), plus the best weights
                            and a copy of the run's configuration; its SHA-256 covers all of it
    results.json            the test figures, when training has finished
    .xpnet.lock             the writer's lock (see ``folder``): one writer at a time

Every file is replaced through a temporary file and a rename: an interruption at any moment
leaves a run that ``xpnet train --resume`` continues. A folder where a run was interrupted before
its first checkpoint holds nothing to lose: ``--out`` reuses it and ``--resume`` starts it afresh.

``config.json`` is for people to read; the checkpoint is the record. Every field of the two must
agree but ``LOCATIONS`` (the device, the data folder, and the epochs, whose count the checkpoint's
copy decides), and the model's architecture must be the one the checkpoint embeds: a
contradiction is one clear error, never a silent fallback to defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

import xpnet as xn
from xpnet.data import load_dataset
from xpnet.io import CheckpointError, load_checkpoint, save_checkpoint, write_json_atomic, write_text_atomic

from .errors import BROKEN_PIPE, CLIError, stdout_closed
from .folder import CHECKPOINT, CONFIG, MAX_CONFIG_BYTES, METRICS, RESULTS, FolderLock, describe, make_folder

__all__ = ["CLIError", "CHECKPOINT", "CONFIG", "METRICS", "RESULTS"]


DEFAULTS = {
    "device": "cpu",
    "dataset": "mnist",
    "data_dir": None,
    "model": "mlp",
    "arch": None,
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
#: The networks --model names: the MLP of --hidden, and the MNIST CNN (xn.cnn), with BatchNorm or not.
MODELS = ("mlp", "cnn", "cnn-bn")
#: The model of a run whose network is the --arch spec (xn.from_arch): set by --arch, never given alone.
ARCH = "arch"
#: The CNN's dropout before its last layer, unless --dropout says otherwise.
CNN_DROPOUT = 0.5
#: The CNNs' learning rates with Adam or AdamW, and schedule, unless --lr or --schedule say
#: otherwise. 12 epochs, test accuracy (bench/NOTES.md): cnn 99.27 / 99.25 / 99.26% (seeds 0-2)
#: against 99.17 / 99.15 / 99.06% with the MLP's constant 1e-3; cnn-bn (BatchNorm takes a larger
#: step) 99.33 / 99.27 / 99.34% at 1e-2, against 99.25 / 99.15% (seeds 0, 1) at 3e-3.
CNN_LR, CNN_SCHEDULE = {"cnn": 3e-3, "cnn-bn": 1e-2}, "cosine"
#: Every field a saved config.json must hold, besides these.
SAVED_EXTRA = ("xpnet_version",)


def parse_hidden(text) -> list[int]:
    if isinstance(text, list) and text and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in text):
        return text
    parts = [part.strip() for part in str(text).split(",")]
    # ASCII digits only: str.isdigit accepts '²', which int() refuses
    if isinstance(text, list) or not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
        raise CLIError(f"--hidden must be positive integers separated by commas, such as 128,64; got {text!r}")
    return [int(part) for part in parts]


_TYPES = {
    "device": str,
    "dataset": str,
    "model": str,
    "activation": str,
    "optimizer": str,
    "schedule": str,
    "dtype": str,
    "epochs": int,
    "batch_size": int,
    "seed": int,
    "early_stopping": int,
    "dropout": (int, float),
    "weight_decay": (int, float),
    "val_split": (int, float),
    "lr": (int, float),
}


def resolve_config(options: dict, saved: dict | None = None, *, source: str = "the command line") -> dict:
    """Options given on the command line, over the saved run's (on resume), over the defaults.

    A saved config must be whole: a missing or unknown field is an error, never a default.
    """
    if saved is not None:
        _check_saved_fields(saved, source)
    config = {**DEFAULTS, **(saved or {})}
    config.update({key: value for key, value in options.items() if value is not None})
    config.pop("xpnet_version", None)
    try:
        return _resolved(config, options, saved)
    except CLIError as exc:  # name the file a bad saved value came from
        if source != "the command line" and not str(exc).startswith(source):
            raise CLIError(f"{source}: {exc}") from None
        raise


def _resolved(config: dict, options: dict, saved: dict | None) -> dict:
    config["hidden"] = parse_hidden(config["hidden"])
    if config["lr"] is None:  # the optimizer's own default; an unknown optimizer is reported below
        model, optimizer = (str(config[key]) for key in ("model", "optimizer"))  # (their types: checked below)
        cnn = model in CNN_LR and optimizer in ("adam", "adamw")
        config["lr"] = CNN_LR[model] if cnn else DEFAULT_LR.get(optimizer, 1e-3)
    for key, kind in _TYPES.items():
        if key == "val_split" and config[key] is None:
            continue  # wdbc: checked by _check_val_split
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise CLIError(f"{key} must be of type {getattr(kind, '__name__', 'number')}, got {config[key]!r}")
    config["dataset"] = config["dataset"].lower()  # as load_dataset reads it
    _check_model(config, options, saved)
    if config["data_dir"] is not None:
        if not isinstance(config["data_dir"], str):
            raise CLIError(f"data_dir must be a folder name or null, got {config['data_dir']!r}")
        if not config["data_dir"].strip():
            raise CLIError("--data-dir needs a folder, got an empty string")
        config["data_dir"] = str(expand(config["data_dir"], "--data-dir").resolve())
    _check_val_split(config, options, saved)
    checks = [
        (config["epochs"] >= 1, f"--epochs must be a positive integer, got {config['epochs']}"),
        (config["batch_size"] >= 1, f"--batch-size must be a positive integer, got {config['batch_size']}"),
        (0.0 <= config["dropout"] < 1.0, f"--dropout must be in [0, 1), got {config['dropout']}"),
        (
            config["val_split"] is None or 0.0 <= config["val_split"] < 1.0,
            f"--val-split must be in [0, 1), got {config['val_split']}",
        ),
        (
            config["early_stopping"] >= 0,
            f"--early-stopping must be 0 (off) or a patience, got {config['early_stopping']}",
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
        (
            math.isfinite(config["weight_decay"]) and config["weight_decay"] >= 0,
            f"--weight-decay must be a finite non-negative number, got {config['weight_decay']}",
        ),
        (
            math.isfinite(config["lr"]) and config["lr"] > 0,
            f"--lr must be a finite positive number, got {config['lr']}",
        ),
        (config["seed"] >= 0, f"--seed must be non-negative, got {config['seed']}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CLIError(message)
    return config


def _check_model(config: dict, options: dict, saved: dict | None) -> None:
    """--model: one of MODELS; a CNN takes images, has no --hidden or --activation, and drops out
    CNN_DROPOUT before its last layer unless --dropout is given; it trains with CNN_SCHEDULE unless
    --schedule is given (and with Adam or AdamW at CNN_LR unless --lr is: ``_resolved``). --arch:
    see ``_check_arch``."""
    if options.get("arch") is not None or config["arch"] is not None or config["model"] == ARCH:
        _check_arch(config, options)
        return
    model = config["model"]
    if model not in MODELS:
        raise CLIError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if model == "mlp":
        return
    if config["dataset"] == "wdbc":
        raise CLIError(f"--model {model} takes images; wdbc is a table of 30 features: use --model mlp")
    for option in ("hidden", "activation"):
        if options.get(option) is not None:
            raise CLIError(f"--{option} shapes the MLP; --model {model} is a fixed network (xn.cnn)")
    if saved is None and options.get("dropout") is None:
        config["dropout"] = CNN_DROPOUT
    if saved is None and options.get("schedule") is None:
        config["schedule"] = CNN_SCHEDULE


def _check_arch(config: dict, options: dict) -> None:
    """--arch SPEC: the network is the spec's (xn.from_arch), recorded as model "arch" with the
    spec written back without whitespace. --model, --hidden, --activation and --dropout do not
    apply (dropout goes into the spec); wdbc, a table, takes a spec without image layers."""
    arch, model = config["arch"], options.get("model")
    if model not in (None, ARCH) and arch is not None:
        if options.get("arch") is None:  # a resume
            raise CLIError(f"the run's network is its --arch spec; --model {model} names another")
        raise CLIError(f"--arch gives the whole network; --model {model} names another: give one of them")
    if options.get("arch") is not None:
        config["model"] = ARCH
    if arch is None:
        raise CLIError("--model arch is the network of an --arch SPEC: give --arch (or --model mlp, cnn or cnn-bn)")
    if config["model"] != ARCH:  # a saved config's two fields disagree
        raise CLIError(f"arch is given, so model must be {ARCH!r}, got {config['model']!r}")
    if not isinstance(arch, str):
        raise CLIError(f"arch must be an architecture spec (text) or null, got {arch!r}")
    for option, instead in (("hidden", "dense(N) layers"), ("activation", "activations"), ("dropout", "dropout(RATE)")):
        if options.get(option) is not None:
            raise CLIError(f"--{option} does not apply to --arch: write {instead} into the spec")
    try:
        config["arch"] = xn.arch.canonical_arch(arch)
        images = xn.arch.arch_takes_images(arch)
    except ValueError as exc:
        raise CLIError(f"--arch: {exc}") from None
    if images and config["dataset"] == "wdbc":
        raise CLIError(
            f"--arch with {', '.join(xn.arch.IMAGE_LAYERS)} layers takes images; wdbc is a table of 30 features: "
            "use dense, bn, dropout and activations alone"
        )


def takes_images(config: dict) -> bool:
    """Whether the run's network takes images (N, 1, H, W): the CNNs, and an --arch with image layers."""
    if config["model"] == ARCH:
        return xn.arch.arch_takes_images(config["arch"])
    return config["model"] != "mlp"


def _check_saved_fields(saved, source: str) -> None:
    if not isinstance(saved, dict):
        raise CLIError(f"{source} does not hold a JSON object")
    # "model" came with the CNNs, "arch" after them: a run saved before it is an MLP's (or a CNN's)
    missing = [key for key in DEFAULTS if key not in saved and key not in ("model", "arch")]
    unknown = [key for key in saved if key not in DEFAULTS and key not in SAVED_EXTRA]
    if missing:
        raise CLIError(f"{source} lacks {', '.join(missing)}: it is damaged or not an xpnet run configuration")
    if unknown:
        raise CLIError(f"{source} has unknown fields {', '.join(unknown)}: it is damaged or from another program")
    if not isinstance(saved.get("xpnet_version", ""), str):
        raise CLIError(f"{source}: xpnet_version must be a string, got {saved['xpnet_version']!r}")
    if not isinstance(saved["hidden"], list):
        raise CLIError(f"{source}: hidden must be a list of layer sizes, got {saved['hidden']!r}")


def _check_val_split(config: dict, options: dict, saved: dict | None) -> None:
    """wdbc has its own fixed 341/114/114 split: --val-split does not apply, and is recorded as null."""
    if config["dataset"] != "wdbc":
        if config["val_split"] is None:
            raise CLIError(f"--val-split must be a number for {config['dataset']}, got null")
        return
    if options.get("val_split") is not None:
        raise CLIError("--val-split does not apply to wdbc, which comes split 341/114/114 (train/validation/test)")
    if saved is not None and saved.get("val_split") is not None:
        raise CLIError(f"the run's val_split is {saved['val_split']!r}, but wdbc has a fixed split: it must be null")
    config["val_split"] = None


@dataclasses.dataclass
class Data:
    """The dataset of a run, split and (for tables) standardized, plus what the model needs."""

    dataset: object
    loss: str
    extra: dict
    #: The shape of one example as the model takes it: (C, H, W) for a CNN (or an --arch with
    #: image layers), None for rows.
    example_shape: tuple | None = None

    def model_input(self, x):
        """x (rows of pixels, or images) as the model takes it."""
        return x if self.example_shape is None else np.reshape(x, (x.shape[0], *self.example_shape))


def load_data(config: dict) -> Data:
    """The run's data. The breast-cancer table keeps its fixed 341/114/114 split (seed 0, whatever
    --seed is, so that every run is tested on the same rows); image sets hold out --val-split of
    the training images, stratified and seeded by --seed."""
    table = config["dataset"] == "wdbc"
    try:  # image sets: the validation split is made on the uint8 pixels, before scaling
        dataset = load_dataset(
            config["dataset"],
            data_dir=config["data_dir"],
            seed=0 if table else config["seed"],
            validation=0.0 if table else config["val_split"],
        )
    except xn.data.DataError as exc:
        raise CLIError(str(exc)) from exc
    extra = {}
    if dataset.task == "binary":  # tables are standardized with the training split's statistics
        dataset = dataset.standardized()
        extra = {"data_mean": dataset.standardization[0], "data_std": dataset.standardization[1]}
    shape = None
    if takes_images(config):  # the images of every split as (N, 1, H, W): views, no copies
        shape = (1, *dataset.image_shape)
        dataset = dataclasses.replace(
            dataset,
            **{
                name: xn.data.Split(np.reshape(part.x, (len(part), *shape)), part.y)
                for name in ("train", "val", "test")
                if (part := getattr(dataset, name)) is not None
            },
        )
    return Data(dataset, "bce" if dataset.task == "binary" else "cross_entropy", extra, shape)


def class_probabilities(model, data: Data, x) -> np.ndarray:
    """(N, C) class probabilities on the host: softmax of the logits, or [1 − σ, σ] for a binary
    model's single logit."""
    logits = model.device.to_host(xn.predict(model, data.model_input(x))).astype(np.float64)  # exp: float64
    if data.dataset.task == "binary":
        p = 1.0 / (1.0 + np.exp(-np.clip(logits[:, 0], -500, 500)))
        return np.stack([1.0 - p, p], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def confusion_matrix(truth, predicted, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def make_device(name: str, seed: int = 0) -> xn.Device:
    try:
        return xn.Device(name, seed=seed)
    except xn.DeviceError as exc:
        raise CLIError(str(exc)) from exc


def training_bytes(config: dict, data: Data) -> tuple[int, int]:
    """(parameters, bytes) of training the run's MLP: each parameter with its gradient, two
    optimizer slots and early stopping's copy of the best weights, plus a batch's activations
    and their gradients (three arrays per layer)."""
    itemsize = 4 if config["dtype"] == "float32" else 8
    batch = min(config["batch_size"], len(data.dataset.train))
    if config["model"] == ARCH:  # the spec laid out: its parameters and each layer's output per example
        plan = arch_plan(config, data)
        widths = [math.prod(plan.input_shape), plan.activations]
        return plan.parameters, itemsize * (5 * plan.parameters + 3 * batch * sum(widths))
    if config["model"] != "mlp":  # the CNN's activations per example: 28², 32·26², 32·13², 64·11², 64·5², 10
        side = data.dataset.image_shape[0]
        sizes = [side - 2, (side - 2) // 2, (side - 2) // 2 - 2, ((side - 2) // 2 - 2) // 2]
        widths = [side * side, 32 * sizes[0] ** 2, 32 * sizes[1] ** 2, 64 * sizes[2] ** 2, 64 * sizes[3] ** 2, 10]
        parameters = 32 * 10 + 64 * (32 * 9 + 1) + (64 * sizes[3] ** 2 + 1) * data.dataset.num_outputs
        return parameters, itemsize * (5 * parameters + 3 * batch * sum(widths))
    widths = [data.dataset.num_features, *config["hidden"], data.dataset.num_outputs]
    parameters = sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(widths, widths[1:]))
    return parameters, itemsize * (5 * parameters + 3 * batch * sum(widths))


def check_memory(config: dict, data: Data) -> None:
    """Refuse a network that cannot fit in memory before any of it is allocated."""
    from xpnet.data.limits import format_bytes, memory_limit

    parameters, needed = training_bytes(config, data)
    limit = memory_limit()
    if limit is not None and needed > limit:
        network = "--arch" if config["model"] == ARCH else f"--hidden {','.join(map(str, config['hidden']))}"
        raise CLIError(
            f"{network} with --batch-size {config['batch_size']} makes a "
            f"network of {parameters:,} parameters that needs about {format_bytes(needed)} to train, more than the "
            f"{format_bytes(limit)} of memory here"
        )


def arch_plan(config: dict, data: Data):
    """The run's --arch spec laid out for its data (``xpnet.arch.plan_arch``), or one line saying why not."""
    shape = data.example_shape or (data.dataset.num_features,)
    try:
        return xn.arch.plan_arch(config["arch"], shape, data.dataset.num_outputs)
    except ValueError as exc:
        raise CLIError(f"--arch: {exc}") from None


def build_model(config: dict, data: Data, device: xn.Device) -> xn.Sequential:
    check_memory(config, data)
    if config["model"] == ARCH:
        layers = arch_plan(config, data).layers
        return xn.Sequential(layers, device=device, dtype=config["dtype"], seed=config["seed"])
    try:
        if config["model"] != "mlp":
            return xn.cnn(
                batch_norm=config["model"] == "cnn-bn",
                in_channels=data.example_shape[0],
                image_size=data.example_shape[1],
                n_outputs=data.dataset.num_outputs,
                dropout=config["dropout"],
                device=device,
                dtype=config["dtype"],
                seed=config["seed"],
            )
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
    """After every epoch: append the metrics line, then save the whole state to the checkpoint,
    then (once, on a resume that changed --epochs or --data-dir) rewrite config.json to match it.

    Runs after EarlyStopping, so the checkpoint knows whether this epoch ended the run.
    """

    def __init__(self, run_dir: Path, config: dict, data: Data, early_stopping, epochs_saved: int, rewrite_config):
        self.run_dir, self.config, self.data, self.early_stopping = run_dir, config, data, early_stopping
        self.epochs_saved = epochs_saved
        self.rewrite_config = rewrite_config

    def on_epoch_end(self, state, logs):
        line = {"epoch": state.epoch + 1, **logs, "samples_per_second": state.num_samples / max(logs["seconds"], 1e-9)}
        with open(self.run_dir / METRICS, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        last = state.stop_training or state.epoch + 1 == state.epochs
        save_run_checkpoint(
            self.run_dir,
            self.config,
            state.model,
            state.optimizer,
            self.data,
            state.history,
            state.epoch + 1,
            self.early_stopping,
            finished=last,
            stopped_early=state.stop_training,
        )
        self.epochs_saved = state.epoch + 1
        if self.rewrite_config:
            write_config(self.run_dir, self.config)
            self.rewrite_config = False


def write_config(run_dir: Path, config: dict) -> None:
    write_json_atomic(run_dir / CONFIG, {**config, "xpnet_version": xn.__version__})


def save_run_checkpoint(
    run_dir,
    config,
    model,
    optimizer,
    data,
    history,
    epochs_done,
    early_stopping,
    *,
    finished=False,
    stopped_early=False,
):
    extra = dict(data.extra)
    meta = {
        "run": config,
        "epochs_done": epochs_done,
        "finished": finished,
        "stopped_early": stopped_early,
        "history": history.history,
        "rng_state": model.device.rng_state(),
        "saved_on": model.device.name,
    }
    if early_stopping is not None:
        meta["early_stopping"] = early_stopping.state_dict()
        for key, value in (early_stopping.best_weights or {}).items():
            extra[f"best/{key}"] = value
    save_checkpoint(Path(run_dir) / CHECKPOINT, model, optimizer, extra=extra, meta=meta)


def expand(value: str, option: str) -> Path:
    """``value`` as a path with ``~`` and ``~user`` expanded, or one line saying why it cannot be."""
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:  # ~nouser, or no home folder at all
        raise CLIError(f"{option} {value}: cannot expand ~ ({exc})") from None


def folder_option(value: str, option: str) -> Path:
    """A run folder named on the command line: ``~`` expanded, an empty name refused."""
    if not value or not value.strip():
        raise CLIError(f"{option} needs a run folder, got an empty name")
    return expand(value, option)


def read_config(run_dir) -> dict:
    """The run's configuration from config.json, or, where config.json is gone but the checkpoint
    is there, from the copy the checkpoint carries (it holds the whole configuration)."""
    path = Path(run_dir) / CONFIG
    try:
        exists = path.exists()
        if exists and not path.is_file():
            raise CLIError(f"{path} is not a file: {run_dir} is not an xpnet run folder")
        if not exists:
            if (Path(run_dir) / CHECKPOINT).is_file():
                return resolve_config({}, _recorded(read_checkpoint(run_dir)), source=f"the copy in {CHECKPOINT}")
            raise CLIError(f"{run_dir} is not an xpnet run folder (no {CONFIG})")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CLIError(f"{path} is {path.stat().st_size:,} bytes: too large to be a run configuration")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot read {path} ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from exc
    try:
        saved = json.loads(text)
    except ValueError as exc:
        raise CLIError(f"{path} is not valid JSON ({exc})") from exc
    except RecursionError:
        raise CLIError(f"{path} is not a run configuration (its JSON is nested too deeply)") from None
    _check_saved_fields(saved, str(path))  # null too: a saved config is never replaced by the defaults
    return resolve_config({}, saved, source=str(path))


def _recorded(checkpoint) -> dict:
    recorded = checkpoint.meta.get("run")
    if not isinstance(recorded, dict):
        raise CLIError(f"{checkpoint.path} holds no run configuration: it was not written by xpnet train")
    return {**recorded, "xpnet_version": recorded.get("xpnet_version", xn.__version__)}


def read_checkpoint(run_dir):
    try:
        return load_checkpoint(Path(run_dir) / CHECKPOINT)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc


#: Fields config.json may hold apart from the checkpoint's copy: the device (any loads any
#: checkpoint), the data folder (a location: data may move), and the epochs (rewritten in
#: config.json just after the checkpoint of a resume that changed them: the checkpoint's count wins).
LOCATIONS = ("device", "data_dir", "epochs")


def check_agreement(config: dict, checkpoint) -> None:
    """config.json and the configuration the checkpoint was saved with agree on every field that
    says what the run is (all but ``LOCATIONS``)."""
    recorded = resolve_config({}, _recorded(checkpoint), source=f"the run configuration in {checkpoint.path}")
    for key in DEFAULTS:
        if key not in LOCATIONS and config[key] != recorded[key]:
            raise CLIError(
                f"{checkpoint.path} does not fit this run: {CONFIG} has {key} {config[key]!r}, the checkpoint was "
                f"made with {recorded[key]!r} (one of the two was edited or copied from another run)"
            )


def recorded_epochs(checkpoint) -> int:
    return int(_recorded(checkpoint)["epochs"])


def _network(spec) -> str:
    """A network's config in a few words: 'Dense(30, 16) ReLU Dense(16, 1), float32'."""
    if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
        return "no readable network"
    words = []
    for layer in spec["layers"]:
        layer = layer if isinstance(layer, dict) else {}
        args = ", ".join(str(v) for v in layer.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
        words.append(f"{layer.get('type', '?')}({args})" if args else str(layer.get("type", "?")))
    return f"{' '.join(words)}, {spec.get('dtype')}"


def check_architecture(model: xn.Sequential, checkpoint) -> None:
    """The model built from the configuration is the network the checkpoint embeds."""
    saved = checkpoint.meta.get("model")
    if model.config() != saved:
        raise CLIError(
            f"{checkpoint.path} does not fit this model: it embeds the network {_network(saved)}; "
            f"the configuration builds {_network(model.config())}"
        )


def best_weights(checkpoint) -> dict:
    """The weights a run was tested with: early stopping's best, else the last epoch's."""
    best = {key[len("best/") :]: value for key, value in checkpoint.extra.items() if key.startswith("best/")}
    return best or checkpoint.model


def load_run(run_dir, device_name: str | None = None):
    """(config, data, model, checkpoint) of a run, the model holding the weights it was tested with."""
    run_dir = folder_option(str(run_dir), "RUN_DIR")
    config = read_config(run_dir)
    checkpoint = read_checkpoint(run_dir)
    check_agreement(config, checkpoint)
    data = load_data(config)
    if "data_mean" in checkpoint.extra:  # the statistics the model was trained with
        data.extra = _statistics(checkpoint, data)
    device = make_device(device_name or config["device"], config["seed"])
    model = build_model(config, data, device)
    check_architecture(model, checkpoint)
    try:
        model.load_state_dict(best_weights(checkpoint))
    except ValueError as exc:
        raise CLIError(f"{checkpoint.path} does not fit this model: {exc}") from exc
    return config, data, model, checkpoint


def _statistics(checkpoint, data: Data) -> dict:
    """The standardization the model was trained with, checked: one finite mean and one finite
    positive std per feature."""
    mean, std = checkpoint.extra.get("data_mean"), checkpoint.extra.get("data_std")
    features = data.dataset.num_features
    for name, value in (("data_mean", mean), ("data_std", std)):
        if value is None or value.shape not in ((features,), (1, features)):
            shape = None if value is None else value.shape
            raise CLIError(f"{checkpoint.path}: {name} has shape {shape}, expected ({features},) for this data")
    if not (np.all(np.isfinite(mean)) and np.all(std > 0)):
        raise CLIError(f"{checkpoint.path}: data_std must be positive (and data_mean finite) in every feature")
    return {"data_mean": mean, "data_std": std}


RESUME_OVERRIDES = ("epochs", "device", "data_dir")


def _resume_config(run_dir: Path, options: dict) -> tuple[dict, dict]:
    saved = read_config(run_dir)
    fixed = {k: v for k, v in options.items() if v is not None and k not in RESUME_OVERRIDES}
    if fixed:
        wanted = resolve_config(fixed, saved)
        changed = [k for k in fixed if wanted[k] != saved[k]]
        if changed:
            key = changed[0]
            raise CLIError(
                f"--{key.replace('_', '-')} cannot change when resuming (the run has "
                f"{saved[key]!r}); only --epochs, --device and --data-dir can"
            )
    config = resolve_config({k: options[k] for k in RESUME_OVERRIDES if options.get(k) is not None}, saved)
    return config, saved


def _check_epochs_change(config: dict, previous: int) -> None:
    if config["epochs"] != previous and config["schedule"] in ("cosine", "warmup"):
        raise CLIError(
            f"--epochs cannot change when resuming a run with the {config['schedule']} schedule, "
            f"which spans its {previous} epochs"
        )


def _restore(run_dir: Path, config, model, optimizer, early_stopping):
    """Load the run's checkpoint into model, optimizer, random state and early stopping."""
    return _restore_from(read_checkpoint(run_dir), config, model, optimizer, early_stopping)


def _restore_from(checkpoint, config, model, optimizer, early_stopping):
    """Load ``checkpoint`` (read by this rank, or by rank 0 and sent) into model, optimizer,
    random state and early stopping; returns (checkpoint, history)."""
    check_agreement(config, checkpoint)
    check_architecture(model, checkpoint)
    try:
        checkpoint.load_model_into(model)
        checkpoint.load_optimizer_into(optimizer, model)
        meta = checkpoint.meta
        model.device.set_rng_state(meta["rng_state"])  # host streams: the same on every backend
        history = xn.History()
        losses = meta["history"].get("loss", [])
        for epoch in range(len(losses)):
            history.append(epoch, {key: values[epoch] for key, values in meta["history"].items()})
        if len(history) != int(meta["epochs_done"]):
            raise CheckpointError(
                f"{checkpoint.path}: its history has {len(history)} epochs, not {meta['epochs_done']}"
            )
        if early_stopping is not None and "early_stopping" in meta:
            best = {k[len("best/") :]: v for k, v in checkpoint.extra.items() if k.startswith("best/")}
            early_stopping.load_state_dict(
                meta["early_stopping"], {k: model.device.to_device(v, model.dtype) for k, v in best.items()} or None
            )
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        raise CLIError(
            f"{checkpoint.path}: the checkpoint's metadata is incomplete or damaged ({type(exc).__name__}: {exc})"
        ) from exc
    return checkpoint, history


def _check_new_folder(run_dir: Path) -> None:
    """``--out`` must name a folder that holds no run, or one interrupted before its first checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CLIError(f"--out {run_dir} is a file, not a folder")
    state = describe(run_dir)
    if state == "run":
        raise CLIError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or choose another --out")
    if state == "foreign":
        raise CLIError(
            f"{run_dir} holds a {CONFIG} that is not an xpnet run's, or a folder where a run's file goes: "
            "it is left as it is; choose another --out"
        )
    if state == "partial":
        raise CLIError(
            f"{run_dir} holds the {METRICS} or {RESULTS} of a run but no checkpoint: it is left as it is; "
            "choose another --out"
        )


def _start(run_dir: Path, config, model, optimizer, data, early_stopping) -> xn.History:
    """A run's first files: its config, no epochs, and the epoch-0 checkpoint (so it is resumable)."""
    history = xn.History()
    write_config(run_dir, config)
    write_text_atomic(run_dir / METRICS, "")
    save_run_checkpoint(run_dir, config, model, optimizer, data, history, 0, early_stopping)
    return history


def train_run(options: dict, *, out: str | None, resume: str | None, callbacks_for, communicator=None) -> dict:
    """Train (or continue) a run; return the summary. ``callbacks_for(config)`` adds display.

    ``communicator`` (``xpnet.distributed``; None: this process alone): on the ranks of an MPI job
    rank 0 alone reads and writes the run folder (it holds the lock) and sends the others what
    they need; every rank builds the model, loads the data and trains its share."""
    where = {"dir": None, "epoch": None, "epochs": None}
    comm = communicator if communicator is not None else xn.distributed.SingleProcess()
    try:
        return _train_run(options, out, resume, callbacks_for, where, comm)
    except KeyboardInterrupt:
        raise CLIError(f"interrupted{_what_is_kept(where)}", code=130) from None
    except BrokenPipeError:  # `xpnet train | head -1`: the display has nowhere to go
        stdout_closed()
        raise CLIError(f"{BROKEN_PIPE}{_what_is_kept(where)}", code=2) from None
    except OSError as exc:  # a full disk, a file that cannot be replaced
        place = f" {exc.filename}" if getattr(exc, "filename", None) else f" in {where['dir']}"
        raise CLIError(f"cannot write{place} ({exc.strerror or exc}){_what_is_kept(where)}", code=1) from None


def _what_is_kept(where) -> str:
    """What an interrupted run leaves, and how to go on."""
    folder = where["dir"]
    if folder is None or not (Path(folder) / CONFIG).is_file():
        return " before training started: nothing that needs keeping was written"
    if where["epoch"] is None:
        return f" before training started; resume with: xpnet train --resume {folder}"
    return (
        f": the checkpoint holds epoch {where['epoch']()} of {where['epochs']}; "
        f"resume with: xpnet train --resume {folder}"
    )


def _train_run(options, out, resume, callbacks_for, where, comm) -> dict:
    lead = comm.rank == 0
    plan = None
    with comm.together():  # rank 0 reads the run folder; a refusal there ends every rank
        if lead:
            plan = _plan(options, out, resume)
    config, saved, previous, run_dir = comm.broadcast_object(plan)
    with comm.together():  # every rank's device, data and model (one rank's missing data ends them all)
        device = make_device(rank_device(config["device"], comm), config["seed"])
        data = load_data(config)
        ds = data.dataset
        if config["early_stopping"] and ds.val is None:
            raise CLIError("--early-stopping watches the validation loss: give --val-split above 0")
        model = build_model(config, data, device)
        optimizer = build_optimizer(config, math.ceil(len(ds.train) / config["batch_size"]))
        early_stopping = xn.EarlyStopping(config["early_stopping"]) if config["early_stopping"] else None
    with contextlib.ExitStack() as held:
        opened = None
        with comm.together():
            if lead:
                if resume is None:
                    make_folder(run_dir, "--out")
                held.enter_context(FolderLock(run_dir))
                where["dir"] = run_dir
                given = tuple(key for key in RESUME_OVERRIDES if options.get(key) is not None)
                opened = _open_run(
                    run_dir, resume, given, config, saved, previous, model, optimizer, early_stopping, data
                )
        checkpoint = comm.broadcast_object(None if opened is None else opened[0])
        with comm.together():
            if lead:
                checkpoint, history, saved = opened
            elif checkpoint is not None:  # the other ranks restore what rank 0 read
                _, history = _restore_from(checkpoint, config, model, optimizer, early_stopping)
            else:
                history = xn.History()
        return _train(
            run_dir,
            config,
            saved,
            data,
            model,
            optimizer,
            early_stopping,
            checkpoint,
            history,
            callbacks_for,
            where,
            comm,
        )


def rank_device(name: str, comm) -> str:
    """The device a rank computes on: ``--device cuda`` on the ranks of an MPI job means each
    rank's own GPU of its machine (local rank modulo the GPUs there); any other name as given."""
    if not comm.parallel or name.lower() != "cuda":
        return name
    gpus = [found for found in xn.available_devices() if found.startswith("cuda:")]
    return gpus[comm.local_rank % len(gpus)] if gpus else name


def _plan(options, out, resume):
    """(config, saved config, previous epochs, run folder) of the run to train, checked as far as
    can be before the data loads (again under the lock)."""
    given = tuple(key for key in RESUME_OVERRIDES if options.get(key) is not None)
    if resume is not None:
        run_dir = folder_option(resume, "--resume")
        if not run_dir.is_dir():
            raise CLIError(f"{run_dir} is not an xpnet run folder (no such folder)")
        config, saved = _resume_config(run_dir, options)
        previous = saved["epochs"]
        if describe(run_dir) == "run":  # early, before the data loads; again under the lock
            checkpoint = read_checkpoint(run_dir)
            check_agreement(config, checkpoint)
            previous = recorded_epochs(checkpoint)  # the checkpoint's count wins over config.json's
            if "epochs" not in given:
                config["epochs"] = previous
        _check_epochs_change(config, previous)
    else:
        config, saved, previous = resolve_config(options), None, None
        run_dir = (
            folder_option(out, "--out")
            if out is not None
            else Path("runs") / f"{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        _check_new_folder(run_dir)  # early, before the data loads; again under the lock
    return config, saved, previous, run_dir


def _open_run(run_dir, resume, given, config, saved, previous, model, optimizer, early_stopping, data):
    """Under the lock: the checkpoint restored into the model (a resume), or the run's first
    files written (a new run). Returns (checkpoint or None, history, saved config)."""
    checkpoint = None
    state = describe(run_dir)
    if resume is not None and state in ("partial", "foreign"):
        raise CLIError(
            f"{run_dir} holds files of a run but no checkpoint, or a folder where a run's file goes: "
            "nothing to resume from"
        )
    if resume is not None and state == "run":
        checkpoint, history = _restore(run_dir, config, model, optimizer, early_stopping)
        done = len(history)
        if checkpoint.meta.get("stopped_early"):
            if (run_dir / RESULTS).exists() or config["epochs"] != previous:
                raise CLIError(
                    f"{run_dir} stopped early after epoch {done} (no better validation loss "
                    f"for {config['early_stopping']} epochs): there is nothing to resume"
                )
        elif done >= config["epochs"] and (run_dir / RESULTS).exists():
            raise CLIError(f"{run_dir} has finished its {done} epochs; pass --epochs N (more than {done}) to continue")
        if config["epochs"] < done:
            raise CLIError(f"{run_dir} has {done} epochs done: --epochs must be at least {done}")
        if "epochs" not in given and saved["epochs"] != previous:  # killed between the two writes
            write_config(run_dir, {**config, "data_dir": saved["data_dir"]})
            saved = {**saved, "epochs": previous}
        _keep_epochs(run_dir, done)
        if done < config["epochs"] and not checkpoint.meta.get("stopped_early"):
            (run_dir / RESULTS).unlink(missing_ok=True)  # it tested fewer epochs than the run will have
    else:  # a new run, or one interrupted before its first checkpoint: start from epoch 0
        if resume is None:
            _check_new_folder(run_dir)
        history = _start(run_dir, config, model, optimizer, data, early_stopping)
    return checkpoint, history, saved


def _keep_epochs(run_dir: Path, done: int) -> None:
    """metrics.jsonl cut to the epochs the checkpoint holds (a killed run may have written one more)."""
    path = run_dir / METRICS
    try:
        if path.exists() and path.stat().st_size > MAX_METRICS_BYTES:
            raise CLIError(f"{path} is {path.stat().st_size:,} bytes: too large to be this run's metrics")
        kept = path.read_text(encoding="utf-8").splitlines()[:done] if path.exists() else []
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from exc
    write_text_atomic(path, "".join(line + "\n" for line in kept))


#: The largest metrics.jsonl xpnet reads: some 200,000 epochs of lines.
MAX_METRICS_BYTES = 64 << 20


def _train(
    run_dir, config, saved, data, model, optimizer, early_stopping, checkpoint, history, callbacks_for, where, comm
):
    ds = data.dataset
    initial_epoch = len(history)
    stopped = checkpoint is not None and checkpoint.meta.get("stopped_early")
    training_left = initial_epoch < config["epochs"] and not stopped
    rewrite = checkpoint is not None and any(config[key] != saved[key] for key in ("epochs", "data_dir"))
    recorder = None
    if comm.rank == 0:  # rank 0 alone writes the run folder and shows progress
        recorder = RunRecorder(run_dir, config, data, early_stopping, initial_epoch, rewrite)
        where["epoch"], where["epochs"] = (lambda: recorder.epochs_saved), config["epochs"]
    callbacks = [c for c in (early_stopping, recorder) if c is not None]
    if comm.rank == 0:
        callbacks += callbacks_for(config)
    started = time.perf_counter()
    try:
        with np.errstate(all="ignore"):  # a diverging run ends with one message, not a page of warnings
            if training_left:
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
                    communicator=comm,
                )
            else:  # finished training but not its test evaluation (interrupted there)
                model.load_state_dict(best_weights(checkpoint))
            seconds = time.perf_counter() - started
            return _finish(run_dir, config, data, model, history, initial_epoch, seconds, comm)
    except xn.TrainingDiverged as exc:
        saved_epochs = recorder.epochs_saved if recorder is not None else initial_epoch
        # from exc: on the ranks of a job it stays raised on every rank, as the divergence was
        raise CLIError(f"{exc}; the checkpoint of epoch {saved_epochs} is intact in {run_dir}", code=1) from exc


def _finish(run_dir, config, data, model, history, initial_epoch, seconds, comm) -> dict:
    """Test the trained model (early stopping has put its best weights back) and write results.json
    (rank 0; every rank tests its share of the test set)."""
    ds = data.dataset
    test = xn.evaluate(model, data.loss, ds.test.x, ds.test.y, communicator=comm)
    metric = "binary_accuracy" if data.loss == "bce" else "accuracy"
    summary = {
        "run_dir": str(run_dir),
        "dataset": config["dataset"],
        "device": model.device.name,
        "test_accuracy": test[metric],
        "test_loss": test["loss"],
        "epochs": len(history),
        "seconds": seconds,
        "samples_per_second": (len(history) - initial_epoch) * len(ds.train) / max(seconds, 1e-9),
        "parameters": model.num_parameters(),
        "ranks": comm.size,
    }
    if comm.rank == 0:
        write_json_atomic(run_dir / RESULTS, summary)
    return summary
