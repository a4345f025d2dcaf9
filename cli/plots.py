"""``xpnet plot``: what a run learned, as PNG files in RUN_DIR/plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .folder import FolderLock, make_folder
from .run import METRICS, CLIError, class_probabilities, confusion_matrix, folder_option, load_run


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise CLIError("plotting needs matplotlib: pip install 'xpnet[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir, device=None) -> list[Path]:
    """Write the plots of a run into RUN_DIR/plots (holding the run folder's lock); return their paths.

    Everything is read and checked before the folder is made, and each PNG is written to a
    temporary file and renamed, so a failure leaves no empty or half-written plot behind.
    """
    plt = _pyplot()
    _, data, model, _ = load_run(run_dir, device)
    run_dir = folder_option(str(run_dir), "RUN_DIR")
    lines = read_metrics(run_dir / METRICS)
    out = run_dir / "plots"
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} is a file: plot writes its PNGs into a folder of that name")
    with FolderLock(run_dir):
        make_folder(out, "plots folder")
        for leftover in out.glob(".*.png.*.tmp"):  # of a plot that was killed; no other writer is here
            leftover.unlink(missing_ok=True)
        written = [_curves(plt, lines, out)]
        ds = data.dataset
        probabilities = class_probabilities(model, data, ds.test.x)
        predicted = probabilities.argmax(axis=1)
        written.append(_confusion(plt, ds, predicted, out))
        if ds.image_shape is not None:
            first = _first_weights(model)
            # a Dense's rows are images of the input; a Conv2D's filters are k×k images (their first channel)
            if first is not None and (first.ndim == 4 or first.shape[1] == math.prod(ds.image_shape)):
                shape = ds.image_shape if first.ndim == 2 else first.shape[2:]
                unit = "neurons" if first.ndim == 2 else "filters"
                written.append(_weights(plt, first if first.ndim == 2 else first[:, 0], shape, out, unit))
            written.append(_mistakes(plt, ds, probabilities, predicted, out))
    return written


def _first_weights(model):
    """The weight W of the model's first Dense or Conv2D (inside a residual block too), on the host;
    None when it has none (an --arch network may start with BatchNorm or a block)."""
    from xpnet.layers import walk

    layer = next((layer for _, layer in walk(model.layers) if "W" in layer.params), None)
    return None if layer is None else model.device.to_host(layer.params["W"])


def read_metrics(path: Path) -> list[dict]:
    """The epochs of metrics.jsonl, each checked to be a JSON object with an epoch and a loss."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file (plot draws the learning curves from it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from exc
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("epoch"), int)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry.values())
            and "loss" in entry
        ):
            raise CLIError(f"{path}, line {number}: not a metrics line (a JSON object of numbers with epoch and loss)")
        lines.append(entry)
    if not lines:
        raise CLIError(f"{path} has no finished epoch to plot")
    return lines


def _curves(plt, lines: list[dict], out: Path) -> Path:
    epochs = [line["epoch"] for line in lines]
    metric = next((m for m in ("accuracy", "binary_accuracy") if all(m in line for line in lines)), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10 if metric else 5, 4), squeeze=False)
    for ax, key in zip(axes[0], ["loss", metric][: axes.shape[1]]):
        ax.plot(epochs, [line[key] for line in lines], "o-", label="train")
        if all(f"val_{key}" in line for line in lines):
            ax.plot(epochs, [line[f"val_{key}"] for line in lines], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("learning curves")
    return _save(plt, fig, out / "curves.png")


def _confusion(plt, ds, predicted, out: Path) -> Path:
    n = len(ds.classes)
    matrix = confusion_matrix(ds.test.y, predicted, n)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n, 1 + 0.5 * n))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(n), ds.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), ds.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix, test accuracy {np.trace(matrix) / matrix.sum():.4f}")
    return _save(plt, fig, out / "confusion.png")


def _weights(plt, weights: np.ndarray, shape, out: Path, unit: str = "neurons") -> Path:
    count = min(weights.shape[0], 64)
    cols = 8
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < count:
            image = weights[i].reshape(shape)
            limit = np.abs(image).max() or 1.0
            ax.imshow(image, cmap="seismic", vmin=-limit, vmax=limit)
    fig.suptitle(f"first-layer weights: {count} of {weights.shape[0]} {unit} (red +, blue −)")
    return _save(plt, fig, out / "first_layer_weights.png")


def _mistakes(plt, ds, probabilities, predicted, out: Path, count: int = 16) -> Path:
    wrong = np.flatnonzero(predicted != ds.test.y)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    cols = 8
    rows = max(1, math.ceil(len(worst) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(ds.test.x[i].reshape(ds.image_shape), cmap="gray")
        ax.set_title(
            f"{ds.classes[predicted[i]]} ({probabilities[i, predicted[i]]:.2f})\ntrue {ds.classes[ds.test.y[i]]}",
            fontsize=7,
        )
    fig.suptitle("most confidently misclassified test images: predicted (probability), true")
    return _save(plt, fig, out / "misclassified.png")


def _save(plt, fig, path: Path) -> Path:
    """Save through a temporary file and a rename: never a half-written PNG."""
    fig.tight_layout()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, dpi=100, format="png")
        os.replace(temporary, path)
    except OSError as exc:
        raise CLIError(f"cannot write {path} ({exc.strerror or exc})") from exc
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(fig)
    return path
