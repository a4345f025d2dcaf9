"""``xpnet plot``: what a run learned, as PNG files in RUN_DIR/plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .run import METRICS, CLIError, class_probabilities, confusion_matrix, load_run


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise CLIError("plotting needs matplotlib: pip install 'xpnet[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir, device=None) -> list[Path]:
    plt = _pyplot()
    _, data, model, _ = load_run(run_dir, device)
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    written = [_curves(plt, Path(run_dir), out)]
    ds = data.dataset
    probabilities = class_probabilities(model, data, ds.test.x)
    predicted = probabilities.argmax(axis=1)
    written.append(_confusion(plt, ds, predicted, out))
    if ds.image_shape is not None:
        first = model.layers[0].params["W"]
        written.append(_weights(plt, model.device.to_host(first), ds.image_shape, out))
        written.append(_mistakes(plt, ds, probabilities, predicted, out))
    return written


def _curves(plt, run_dir: Path, out: Path) -> Path:
    lines = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
    if not lines:
        raise CLIError(f"{run_dir / METRICS} has no finished epoch to plot")
    epochs = [line["epoch"] for line in lines]
    metric = next((m for m in ("accuracy", "binary_accuracy") if m in lines[0]), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10 if metric else 5, 4), squeeze=False)
    for ax, key in zip(axes[0], ["loss", metric][: axes.shape[1]]):
        ax.plot(epochs, [line[key] for line in lines], "o-", label="train")
        if f"val_{key}" in lines[0]:
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


def _weights(plt, weights: np.ndarray, shape, out: Path) -> Path:
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
    fig.suptitle(f"first-layer weights: {count} of {weights.shape[0]} neurons (red +, blue −)")
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
