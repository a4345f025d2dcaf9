"""``xpnet train --model cnn|cnn-bn``: images reach the network as (N, 1, 28, 28); evaluate, predict
and --resume work with CNNs (BatchNorm's running statistics included). On a small slice of MNIST,
written as IDX files, so that a CNN epoch takes seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, train_json, write_mnist_slice
from typer.testing import CliRunner

from cli.app import app
from xpnet.data import load_dataset
from xpnet.io import load_checkpoint

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    """600 training and 200 test images of MNIST, as the four IDX files."""
    return write_mnist_slice(tmp_path_factory.mktemp("small-mnist"), 600, 200)


def _train(folder, run, *extra):
    return train_json(invoke, folder, run, *extra)


@pytest.mark.parametrize("model", ["cnn", "cnn-bn"])
def test_a_cnn_trains_evaluates_predicts_and_resumes_bit_for_bit(small_mnist, tmp_path, model, monkeypatch):
    whole = _train(small_mnist, tmp_path / "whole", "--model", model, "--epochs", 3)
    assert whole["test_accuracy"] > 0.5  # 540 images, 3 epochs: well above chance (0.1)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["model"] == model and config["dropout"] == 0.5  # the CNNs' defaults
    assert config["lr"] == {"cnn": 0.003, "cnn-bn": 0.01}[model] and config["optimizer"] == "adam"
    assert config["schedule"] == "cosine"
    saved = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors")
    kinds = [layer["type"] for layer in saved.meta["model"]["layers"]]
    assert kinds[:2] == (["Conv2D", "BatchNorm"] if model == "cnn-bn" else ["Conv2D", "ReLU"])
    if model == "cnn-bn":
        assert "1.running_mean" in saved.model and "1.running_var" in saved.model

    # the cosine schedule spans the run's 3 epochs: the run is cut after its first, then resumed
    from cli import run as run_module  # the module cli.app (imported above) uses

    original = run_module.RunRecorder.on_epoch_end

    def ctrl_c_after_one_epoch(self, state, logs):
        original(self, state, logs)
        if state.epoch == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(run_module.RunRecorder, "on_epoch_end", ctrl_c_after_one_epoch)
        cut = invoke(
            "train",
            "--data-dir",
            small_mnist,
            "--batch-size",
            64,
            "--val-split",
            0.1,
            "--out",
            tmp_path / "part",
            "--model",
            model,
            "--epochs",
            3,
        )
    assert cut.exit_code == 130, cut.output
    result = invoke("train", "--resume", tmp_path / "part", "--json")
    assert result.exit_code == 0, result.output
    resumed = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    for key, value in saved.model.items():  # parameters and BatchNorm's running statistics
        np.testing.assert_array_equal(resumed.model[key], value, err_msg=key)
    assert json.loads(result.stdout)["test_accuracy"] == whole["test_accuracy"]

    report = invoke("evaluate", tmp_path / "whole", "--json")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["accuracy"] == pytest.approx(whole["test_accuracy"])
    test = load_dataset("mnist", flatten=False).test
    np.save(tmp_path / "rows.npy", test.x[:3].reshape(3, -1))
    predicted = invoke("predict", tmp_path / "whole", tmp_path / "rows.npy")
    assert predicted.exit_code == 0, predicted.output
    assert len(predicted.stdout.splitlines()) == 3
    plotted = invoke("plot", tmp_path / "whole")
    assert plotted.exit_code == 0, plotted.output
    names = sorted(path.name for path in (tmp_path / "whole" / "plots").glob("*.png"))
    assert names == ["confusion.png", "curves.png", "first_layer_weights.png", "misclassified.png"]


def test_cnn_options_that_do_not_apply_are_one_clear_error(small_mnist, tmp_path):
    run = tmp_path / "run"
    assert_one_line_error(
        invoke("train", "--model", "cnn", "--hidden", "32", "--out", run), 2, "--hidden shapes the MLP; --model cnn"
    )
    assert_one_line_error(
        invoke("train", "--model", "cnn", "--dataset", "wdbc", "--out", run), 2, "--model cnn takes images; wdbc"
    )
    assert_one_line_error(invoke("train", "--model", "resnet", "--out", run), 2, "--model must be one of mlp, cnn")
    assert not run.exists()


def test_train_help_shows_each_options_default():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split()).split("Options:", 1)[1]
    expected = [
        ("--device", "cpu"),
        ("--dataset", "mnist"),
        ("--model", "mlp"),
        ("--hidden", "128,64"),
        ("--activation", "relu"),
        ("--dropout", "0; cnn 0.5"),
        ("--optimizer", "adam"),
        ("--lr", "0.001 for adam/adamw (cnn 0.003, cnn-bn 0.01), 0.1 sgd, 0.05 momentum"),
        ("--weight-decay", "0"),
        ("--schedule", "none; cnn cosine"),
        ("--epochs", "5"),
        ("--batch-size", "128"),
        ("--seed", "0"),
        ("--val-split", "0.1"),
        ("--early-stopping", "0, off"),
        ("--dtype", "float32"),
        ("--out", "runs/DATASET-TIME"),
    ]
    starts = [text.index(f" {option} ") for option, _ in expected] + [len(text)]
    assert starts[:-1] == sorted(starts[:-1])  # in this order in the help
    for (option, default), start, end in zip(expected, starts, starts[1:]):
        assert f"[default: {default}]" in text[start:end], option
