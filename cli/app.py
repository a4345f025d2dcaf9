"""The ``xpnet`` command line: train, evaluate, predict, gradcheck, devices, plot."""

from __future__ import annotations

import functools
import json
import math
import platform
import signal
import sys
from pathlib import Path

import numpy as np
import typer

import xpnet as xn

from .errors import BROKEN_PIPE, report, stdout_closed
from .progress import ProgressBar
from .run import CLIError, class_probabilities, confusion_matrix, load_run, make_device, train_run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text as written: its "[default: ...]" is not rich markup to strip
    help="xpnet: train and inspect neural networks on NumPy (cpu) or CuPy (cuda).",
)


def _show_version(value: bool):
    if value:
        typer.echo(f"xpnet {xn.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="print the version"),
):
    """xpnet: train and inspect neural networks on NumPy (cpu) or CuPy (cuda)."""


#: The ranks the running command computes on (``xpnet train`` under mpiexec), for error reports.
_communicator = xn.distributed.SingleProcess()


def _failure(exc: BaseException) -> tuple[int, str]:
    """(exit status, the one line) for a failure of a command."""
    if isinstance(exc, CLIError):
        return exc.code, str(exc)
    if isinstance(exc, xn.distributed.RankFailure):
        return exc.code, str(exc)
    if isinstance(exc, (xn.DeviceError, xn.data.DataError, ValueError)):
        return 2, str(exc)
    if isinstance(exc, BrokenPipeError):  # `xpnet evaluate RUN | head -1`
        stdout_closed()
        return 2, BROKEN_PIPE
    if isinstance(exc, KeyboardInterrupt):  # before typer sees it (it would exit 130 without a word)
        return 130, "interrupted"
    return 1, f"{type(exc).__name__}: {exc}"  # a runtime failure: still one line, never a traceback


def reports_errors(command):
    """Print a failure as one line on stderr and exit with its code: never a traceback.

    On the ranks of an MPI job: a failure every rank met at once (``raised_everywhere``) is
    reported by rank 0 alone, and every rank exits with its code; a failure of one rank alone,
    while the others may be waiting for it in a collective, is reported by that rank, naming
    itself, and ends the whole job (MPI_Abort) at once."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            code, message = _failure(exc)
            comm = _communicator
            if not comm.parallel:
                report(message)
            elif xn.distributed.raised_everywhere(exc):
                if comm.rank == 0:
                    report(message)
            else:
                report(f"rank {comm.rank} of {comm.size}: {message}")
                comm.abort(code)
            raise typer.Exit(code) from None

    return wrapper


@app.command()
@reports_errors
def train(
    device: str | None = typer.Option(
        None, help="cpu, cuda, cuda:N, strict, strict:device1, torch, ... [default: cpu]"
    ),
    dataset: str | None = typer.Option(None, help="mnist, wdbc, fashion-mnist or kmnist [default: mnist]"),
    data_dir: str | None = typer.Option(None, help="a folder with the dataset's files (IDX, or wdbc.csv)"),
    model: str | None = typer.Option(None, help="mlp, cnn (the MNIST CNN) or cnn-bn (with BatchNorm) [default: mlp]"),
    arch: str | None = typer.Option(
        None,
        metavar="SPEC",
        help="a network of your own, such as conv(32,3),relu,maxpool(2),flatten,dense(10) (the grammar: README) "
        "[default: none]",
    ),
    hidden: str | None = typer.Option(None, help="hidden layer sizes, comma-separated [default: 128,64]"),
    activation: str | None = typer.Option(None, help="relu, leaky_relu, tanh or sigmoid [default: relu]"),
    dropout: float | None = typer.Option(
        None, help="dropout rate after each hidden layer (the CNN: before its last layer) [default: 0; cnn 0.5]"
    ),
    optimizer: str | None = typer.Option(None, help="sgd, momentum, adam or adamw [default: adam]"),
    lr: float | None = typer.Option(
        None, help="learning rate [default: 0.001 for adam/adamw (cnn 0.003, cnn-bn 0.01), 0.1 sgd, 0.05 momentum]"
    ),
    weight_decay: float | None = typer.Option(None, help="L2 (decoupled for adamw) weight decay [default: 0]"),
    schedule: str | None = typer.Option(
        None, help="none, step (halve per epoch), exponential, cosine, warmup [default: none; cnn cosine]"
    ),
    epochs: int | None = typer.Option(None, help="epochs in all (with --resume: the new total) [default: 5]"),
    batch_size: int | None = typer.Option(None, help="examples per step [default: 128]"),
    seed: int | None = typer.Option(None, help="seed for weights, split, batch order, dropout [default: 0]"),
    val_split: float | None = typer.Option(None, help="fraction of training data for validation [default: 0.1]"),
    early_stopping: int | None = typer.Option(
        None,
        "--early-stopping",
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without a better val loss [default: 0, off]",
    ),
    dtype: str | None = typer.Option(None, help="float32 or float64 [default: float32]"),
    out: str | None = typer.Option(None, metavar="RUN_DIR", help="run folder [default: runs/DATASET-TIME]"),
    resume: str | None = typer.Option(None, metavar="RUN_DIR", help="continue an interrupted run"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress and no epoch lines: the result only"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object at the end, nothing else"),
):
    """Train an MLP (default: 784-128-64-10 on the embedded MNIST, on the CPU), a CNN (--model cnn) or the
    network of an --arch spec."""
    options = dict(
        device=device,
        dataset=dataset,
        data_dir=data_dir,
        model=model,
        arch=arch,
        hidden=hidden,
        activation=activation,
        dropout=dropout,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        val_split=val_split,
        early_stopping=early_stopping,
        dtype=dtype,
    )
    comm = _ranks()  # first: then a refusal below is said by rank 0 alone
    if resume is not None and out is not None:
        # from the command line alone: every rank raises it
        raise xn.distributed.mark_everywhere(CLIError("give --resume RUN_DIR or --out RUN_DIR, not both"))
    talk = not (quiet or json_output) and comm.rank == 0

    def display(config):
        if not talk:
            return []
        network = {"mlp": f"hidden {config['hidden']}", "arch": f"arch {config['arch']}"}
        typer.echo(
            f"training on {config['dataset']} with {config['device']}: "
            + f"{network.get(config['model'], 'model ' + config['model'])}, "
            + f"{config['optimizer']} lr {config['lr']}, {config['epochs']} epochs, batch {config['batch_size']}"
        )
        return [ProgressBar(sys.stdout, interactive=sys.stdout.isatty())]

    summary = train_run(options, out=out, resume=resume, callbacks_for=display, communicator=comm)
    if comm.rank != 0:  # rank 0 alone speaks
        return
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(
            f"test accuracy {summary['test_accuracy']:.4f}  test loss {summary['test_loss']:.4f}  "
            f"{summary['seconds']:.1f}s  {summary['samples_per_second']:,.0f} samples/s  -> {summary['run_dir']}"
        )


def _ranks():
    """The processes ``xpnet train`` runs on: the ranks of the MPI job that started it
    (``mpiexec -n N xpnet train``), else this one alone."""
    global _communicator
    try:
        _communicator = xn.distributed.from_environment()
        _communicator.abort_on_failure = False  # reports_errors reports, then ends the job
        if _communicator.rank != 0:
            _leave_interrupts_to_rank_0()
    except ImportError as exc:
        if xn.distributed.launched_rank() != 0:  # rank 0 says it, once
            raise typer.Exit(2) from None
        ranks = xn.distributed.launched_ranks()
        raise CLIError(f"started as one of {ranks} MPI ranks, but {exc}", code=2) from None
    return _communicator


def _leave_interrupts_to_rank_0() -> None:
    """Ctrl-C reaches every rank of the job (mpiexec passes it on); rank 0 alone acts on it: it
    says what the run keeps and ends the job. The others go on meanwhile, so that rank 0 is never
    left waiting in a collective for a rank that has stopped."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main thread
        pass


def _predictions(model, data, x):
    """The predicted class of each row and its probability."""
    probabilities = class_probabilities(model, data, x)
    return probabilities.argmax(axis=1), probabilities.max(axis=1)


@app.command()
@reports_errors
def evaluate(
    run_dir: str = typer.Argument(..., help="a run folder written by xpnet train"),
    device: str | None = typer.Option(None, help="evaluate on this device [default: the run's]"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Test loss and accuracy, per-class precision and recall, and the confusion matrix."""
    _, data, model, _ = load_run(run_dir, device)
    ds = data.dataset
    result = xn.evaluate(model, data.loss, ds.test.x, ds.test.y)
    predicted, _ = _predictions(model, data, ds.test.x)
    classes = ds.classes
    matrix = confusion_matrix(ds.test.y, predicted, len(classes))
    precision = np.diag(matrix) / np.maximum(matrix.sum(axis=0), 1)
    recall = np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)
    accuracy = float(np.trace(matrix) / matrix.sum())
    if json_output:
        typer.echo(
            json.dumps(
                {
                    "loss": result["loss"],
                    "accuracy": accuracy,
                    "precision": precision.tolist(),
                    "recall": recall.tolist(),
                    "confusion_matrix": matrix.tolist(),
                    "classes": list(classes),
                }
            )
        )
        return
    typer.echo(f"{ds.name} test set: {len(ds.test)} examples  loss {result['loss']:.4f}  accuracy {accuracy:.4f}")
    typer.echo(f"\n{'class':>12} {'precision':>10} {'recall':>8} {'support':>8}")
    for i, name in enumerate(classes):
        typer.echo(f"{name:>12} {precision[i]:>10.4f} {recall[i]:>8.4f} {matrix[i].sum():>8}")
    typer.echo("\nconfusion matrix (rows: true class, columns: predicted)")
    width = max(5, len(str(matrix.max())) + 1)
    typer.echo(" " * 12 + "".join(f"{name[: width - 1]:>{width}}" for name in classes))
    for i, name in enumerate(classes):
        typer.echo(f"{name[:11]:>11} " + "".join(f"{v:>{width}}" for v in matrix[i]))


def _load_input(path: Path, data) -> np.ndarray:
    """One file as rows of model input: images become 28×28 grayscale like MNIST, .npy as is
    (each checked by ``cli.images`` from its header before its data is read)."""
    from .images import load_array, load_image

    ds = data.dataset
    try:
        if not path.exists():
            raise CLIError(f"{path}: no such file")
        if not path.is_file():
            raise CLIError(f"{path}: not a regular file (a folder, a device or a pipe cannot be read as input)")
    except OSError as exc:
        raise CLIError(f"{path}: cannot look at the file ({exc.strerror or exc})") from exc
    if path.suffix.lower() == ".npy":
        rows = load_array(path, ds.num_features)
    else:
        if ds.image_shape is None:
            raise CLIError(f"{path}: the {ds.name} model takes .npy rows of {ds.num_features} features, not images")
        rows = load_image(path, ds.image_shape).reshape(1, -1)
    if data.extra:
        rows = (rows - data.extra["data_mean"]) / data.extra["data_std"]
    return rows.astype(np.float32)


@app.command()
@reports_errors
def predict(
    run_dir: str = typer.Argument(..., help="a run folder written by xpnet train"),
    files: list[Path] = typer.Argument(..., help="PNG/JPEG images (up to 50 megapixels) or .npy arrays"),
    device: str | None = typer.Option(None, help="predict on this device [default: the run's]"),
):
    """The predicted class of each image or row, with its probability."""
    _, data, model, _ = load_run(run_dir, device)
    classes = data.dataset.classes
    for path in files:
        rows = _load_input(path, data)
        predicted, probability = _predictions(model, data, rows)
        for i, (cls, p) in enumerate(zip(predicted, probability)):
            label = f"{path}" + (f"[{i}]" if len(rows) > 1 else "")
            typer.echo(f"{label}: {classes[int(cls)]} (probability {p:.3f})")


@app.command()
@reports_errors
def gradcheck(
    device: str = typer.Option("cpu", help="the device to check on"),
    seed: int = typer.Option(0, help="seed for the network and the data"),
    tolerance: float = typer.Option(1e-6, help="largest relative error that passes"),
):
    """Backpropagation against central differences (float64) on a small random network."""
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise CLIError(f"--tolerance must be a finite positive number, got {tolerance}")
    dev = make_device(device, seed)
    model = xn.Sequential(
        [xn.Dense(6, 5), xn.Tanh(), xn.Dense(5, 4), xn.ReLU(), xn.Dropout(0.25), xn.Dense(4, 3)],
        device=dev,
        dtype="float64",
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    report = xn.gradcheck(model, "cross_entropy", rng.normal(size=(8, 6)), rng.integers(0, 3, size=8))
    typer.echo(f"gradient check on {dev.name}: 6-5-4-3 tanh/relu/dropout network, softmax cross-entropy, float64")
    typer.echo(report.table())
    verdict = "passed" if report.passed(tolerance) else "FAILED"
    typer.echo(f"largest relative error {report.max_error:.2e}: {verdict} (tolerance {tolerance:g})")
    if not report.passed(tolerance):
        raise typer.Exit(1)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


@app.command()
@reports_errors
def devices():
    """The backends and devices available here, with library versions."""
    typer.echo(f"xpnet {xn.__version__}, Python {platform.python_version()}")
    for package in (
        "numpy",
        "array-api-compat",
        "array-api-strict",
        "cupy-cuda12x",
        "cupy-cuda13x",
        "torch",
        "typer",
        "safetensors",
        "matplotlib",
        "pillow",
    ):
        found = _version(package)
        if found:
            typer.echo(f"  {package:18s} {found}")
    typer.echo("devices:")
    for name in xn.available_devices():
        typer.echo(f"  {name:18s} {xn.Device(name).describe()}")


@app.command()
@reports_errors
def parity(
    device: str = typer.Option("cuda", help="the device compared with the CPU (strict:device1 stands in for a GPU)"),
    seed: int = typer.Option(0, help="seed of the networks and data"),
    mnist: bool = typer.Option(True, help="include the one-epoch MNIST check"),
):
    """Train the same seeded network on the CPU and on DEVICE; a table per check; exit 1 on any failure."""
    from .parity import full_float32, run_parity, table

    full_float32()
    make_device(device)
    checks = run_parity(device, seed=seed, mnist=mnist)
    typer.echo(table(checks, device))
    if not all(check.passed for check in checks):
        raise typer.Exit(1)


@app.command()
@reports_errors
def bench(
    device: str = typer.Option("cpu", help="the device xpnet trains on (cuda: the GPU benchmark)"),
    model: str = typer.Option("mlp", help="mlp (784-128-64-10) or cnn (the MNIST CNN of --model cnn)"),
    batch_sizes: str | None = typer.Option(
        None, help="comma-separated batch sizes [default: 32,128,512; 128,512,4096 on cuda]"
    ),
    epochs: int | None = typer.Option(
        None, help="epochs per implementation (the median of epochs 2..N is reported) [default: 5; cnn 3]"
    ),
    rss: bool = typer.Option(True, help="CPU: measure each implementation's peak RSS in a short separate process"),
    json_file: str | None = typer.Option(None, "--json", metavar="FILE", help="also write the rows as JSON"),
    ranks: str | None = typer.Option(
        None,
        metavar="N,M,...",
        help="data-parallel: xpnet alone on each number of MPI ranks (mpiexec -n N), with the Allreduce's share "
        "[default: off; batch sizes 128,512]",
    ),
    rounds: int = typer.Option(2, help="with --ranks: jobs per rank count, alternating (the median is reported)"),
):
    """Train MNIST with xpnet and the references, interleaved; print a table.

    On the CPU: PyTorch eager, scikit-learn (the MLP only) and the bare matmuls (for the CNN,
    those of its im2col form). On a GPU: PyTorch eager and PyTorch with CUDA graphs on the same
    card, and xpnet without its fused kernels. With --ranks: xpnet on 1, 2, ... MPI ranks."""
    from .bench import MODELS

    if model not in MODELS:
        raise CLIError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if ranks is not None:
        return _bench_ranks(ranks, model, batch_sizes or "128,512", epochs, rounds, json_file)
    epochs = (3 if model == "cnn" else 5) if epochs is None else epochs
    gpu = make_device(device).kind == "cupy"
    batch_sizes = batch_sizes or ("128,512,4096" if gpu else "32,128,512")
    try:
        sizes = [int(b) for b in batch_sizes.split(",")]
    except ValueError:
        raise CLIError(f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}") from None
    if epochs < 1 or any(b < 1 for b in sizes):
        raise CLIError("--epochs and every batch size must be positive")
    if gpu:
        from .bench_gpu import run_gpu_benchmark, table

        rows = run_gpu_benchmark(sizes, epochs, device=device, model=model, log=typer.echo)
    else:
        from .bench import run_benchmark, table

        rows = run_benchmark(sizes, epochs, device=device, measure_rss=rss, model=model, log=typer.echo)
    typer.echo(table(rows))
    if json_file:
        Path(json_file).write_text(json.dumps(rows, indent=2))


def _counts(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise CLIError(f"{option} must be positive integers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise CLIError(f"{option} must be positive integers separated by commas, got {text!r}")
    return values


def _bench_ranks(ranks, model, batch_sizes, epochs, rounds, json_file) -> None:
    from .bench_ranks import run_ranks_benchmark, table

    counts, sizes = _counts(ranks, "--ranks"), _counts(batch_sizes, "--batch-sizes")
    epochs = (2 if model == "cnn" else 4) if epochs is None else epochs
    if epochs < 2 or rounds < 1:
        raise CLIError("with --ranks, --epochs must be at least 2 (the first warms up) and --rounds positive")
    try:
        rows = run_ranks_benchmark(counts, sizes, epochs, model, rounds, log=typer.echo)
    except RuntimeError as exc:
        raise CLIError(str(exc), code=1) from None
    typer.echo(table(rows))
    if json_file:
        Path(json_file).write_text(json.dumps(rows, indent=2))


@app.command()
@reports_errors
def plot(
    run_dir: str = typer.Argument(..., help="a run folder written by xpnet train"),
    device: str | None = typer.Option(None, help="compute predictions on this device [default: the run's]"),
):
    """PNG plots: learning curves, first-layer weights, confusion matrix, worst mistakes."""
    from .plots import plot_run

    for path in plot_run(run_dir, device):
        typer.echo(str(path))
