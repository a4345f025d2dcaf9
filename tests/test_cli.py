"""The ``xpnet`` command line, through typer's CliRunner and once as the installed script."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner
from xpnet.cli.app import app
from xpnet.cli.main import main

import xpnet
from xpnet.data import load_dataset, write_idx
from xpnet.io import load_checkpoint

runner = CliRunner()
WDBC = ["--dataset", "wdbc", "--hidden", "16,8", "--dropout", "0.2", "--batch-size", "32"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def wdbc_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "wdbc"
    result = invoke("train", *WDBC, "--epochs", 30, "--early-stopping", 10, "--out", run, "--json")
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """``xpnet train`` with no options but the run folder: the default MLP, 5 epochs of MNIST."""
    run = tmp_path_factory.mktemp("runs") / "mnist"
    result = invoke("train", "--out", run)
    assert result.exit_code == 0, result.output
    return run, result


# ---------------------------------------------------------------------------------- train
def test_default_training_run_on_mnist(mnist_run):
    run, result = mnist_run
    out = result.stdout
    assert "training on mnist with cpu: hidden [128, 64], adam lr 0.001, 5 epochs, batch 128" in out
    assert "epoch 5/5  loss " in out and "val_accuracy" in out and "samples/s" in out
    summary = json.loads((run / "results.json").read_text())
    assert summary["test_accuracy"] >= 0.97
    assert f"test accuracy {summary['test_accuracy']:.4f}" in out
    config = json.loads((run / "config.json").read_text())
    assert config["hidden"] == [128, 64] and config["epochs"] == 5 and config["val_split"] == 0.1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5]
    checkpoint = load_checkpoint(run / "checkpoint.safetensors")
    assert checkpoint.meta["epochs_done"] == 5 and checkpoint.meta["finished"]
    assert checkpoint.build_model().num_parameters() == 109_386
    assert set(checkpoint.optimizer["0.W"]) == {"m", "v"}


def test_json_output_for_scripts(wdbc_run):
    _, summary = wdbc_run
    assert {"test_accuracy", "test_loss", "epochs", "seconds", "samples_per_second"} <= set(summary)
    assert summary["test_accuracy"] >= 0.93
    assert 10 < summary["epochs"] <= 30 and summary["samples_per_second"] > 0


def test_progress_degrades_to_plain_lines_and_quiet_prints_the_result(tmp_path):
    result = invoke("train", *WDBC, "--epochs", 2, "--out", tmp_path / "a")
    assert result.exit_code == 0
    assert "\r" not in result.stdout and "\033[" not in result.stdout  # not a terminal: no redraws
    assert result.stdout.count("epoch ") >= 2
    quiet = invoke("train", *WDBC, "--epochs", 2, "--out", tmp_path / "b", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout.count("\n") == 1 and quiet.stdout.startswith("test accuracy")


def test_progress_bar_on_a_terminal(monkeypatch):
    import io

    monkeypatch.setenv("COLUMNS", "200")  # rich crops a line to the terminal's width (80 without one)

    from xpnet.cli.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream, interactive=True, refresh=0.0)
    model = xpnet.mlp(2, [4], 2)
    x = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    xpnet.fit(
        model, "cross_entropy", xpnet.SGD(0.1), x, (x[:, 0] > 0).astype(int), epochs=1, batch_size=10, callbacks=[bar]
    )
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())  # rich's colours and cursor moves
    redraws = re.findall(r"epoch 1/1 \S+ +(\d+)% loss (\d\.\d{4})  ([\d,]+) samples/s  (\d+:\d\d) left", text)
    # one redraw per batch of 10 of 40 (then rich's last frame, as it stops: the same 100%)
    assert [int(done) for done, _, _, _ in redraws] in ([25, 50, 75, 100], [25, 50, 75, 100, 100])
    assert redraws[-1][3] == "0:00"  # nothing left at 100% (a slow first step may show 0:01 before)
    assert text.endswith("samples/s\n") and re.search(r"[\r\n]epoch 1/1  loss", text)  # the summary replaces the bar


def test_a_used_run_folder_is_not_overwritten(wdbc_run):
    run, _ = wdbc_run
    before = (run / "checkpoint.safetensors").read_bytes()
    result = invoke("train", *WDBC, "--out", run)
    assert_one_line_error(result, 2, "already holds a run: resume it with --resume")
    assert (run / "checkpoint.safetensors").read_bytes() == before


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = [*WDBC, "--epochs", 4, "--early-stopping", 3, "--schedule", "cosine"]
    assert invoke("train", *args, "--out", tmp_path / "whole", "--quiet").exit_code == 0

    from xpnet.cli import run as run_module

    original = run_module.RunRecorder.on_epoch_end

    def ctrl_c_after_two_epochs(self, state, logs):
        original(self, state, logs)
        if state.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module.RunRecorder, "on_epoch_end", ctrl_c_after_two_epochs)
    broken = invoke("train", *args, "--out", tmp_path / "broken", "--quiet")
    assert_one_line_error(broken, 130, rf"epoch 2 of 4; resume with: xpnet train --resume {tmp_path / 'broken'}")
    assert load_checkpoint(tmp_path / "broken" / "checkpoint.safetensors").meta["epochs_done"] == 2
    monkeypatch.setattr(run_module.RunRecorder, "on_epoch_end", original)

    resumed = invoke("train", "--resume", tmp_path / "broken", "--json")
    assert resumed.exit_code == 0, resumed.output
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors")
    again = load_checkpoint(tmp_path / "broken" / "checkpoint.safetensors")
    assert whole.model.keys() == again.model.keys()
    for key in whole.model:
        np.testing.assert_array_equal(again.model[key], whole.model[key])  # bit-identical
    for key, slots in whole.optimizer.items():
        for slot, value in slots.items():
            np.testing.assert_array_equal(again.optimizer[key][slot], value)
    strip = [
        {k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_second")}
        for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    ]
    strip_again = [
        {k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_second")}
        for line in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip_again == strip and len(strip) == 4
    assert (
        json.loads(resumed.stdout)["test_accuracy"]
        == json.loads((tmp_path / "whole" / "results.json").read_text())["test_accuracy"]
    )


ES_ARGS = [
    "--dataset",
    "wdbc",
    "--hidden",
    "32,16",
    "--lr",
    "0.01",
    "--batch-size",
    "16",
    "--epochs",
    "40",
    "--early-stopping",
    "6",
]


def _same_checkpoints(a, b):
    first, second = load_checkpoint(a / "checkpoint.safetensors"), load_checkpoint(b / "checkpoint.safetensors")
    for group in ("model", "extra"):
        assert getattr(first, group).keys() == getattr(second, group).keys()
        for key, value in getattr(first, group).items():
            np.testing.assert_array_equal(getattr(second, group)[key], value)
    assert first.meta["early_stopping"] == second.meta["early_stopping"]
    assert first.meta["epochs_done"] == second.meta["epochs_done"]


def test_resume_mid_epoch_while_early_stopping_waits(tmp_path, monkeypatch):
    assert invoke("train", *ES_ARGS, "--out", tmp_path / "whole", "--quiet").exit_code == 0
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors")
    assert whole.meta["stopped_early"] and whole.meta["epochs_done"] < 40

    from xpnet.cli import run as run_module

    def ctrl_c_in_epoch_five(self, state):
        if state.epoch == 4 and state.step == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module.RunRecorder, "on_batch_end", ctrl_c_in_epoch_five, raising=False)
    broken = invoke("train", *ES_ARGS, "--out", tmp_path / "broken", "--quiet")
    assert_one_line_error(broken, 130, "the checkpoint holds epoch 4 of 40")
    saved = load_checkpoint(tmp_path / "broken" / "checkpoint.safetensors")
    assert saved.meta["epochs_done"] == 4 and saved.meta["early_stopping"]["wait"] > 0
    monkeypatch.undo()
    assert invoke("train", "--resume", tmp_path / "broken", "--quiet").exit_code == 0
    _same_checkpoints(tmp_path / "whole", tmp_path / "broken")
    assert (tmp_path / "broken" / "metrics.jsonl").read_text().count("\n") == whole.meta["epochs_done"]
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "broken")]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
    # the run stopped early: nothing to resume, and evaluate uses the best weights, as the test did
    assert_one_line_error(invoke("train", "--resume", tmp_path / "broken"), 2, "stopped early after epoch")
    report = json.loads(invoke("evaluate", tmp_path / "broken", "--json").stdout)
    assert report["accuracy"] == pytest.approx(results[1]["test_accuracy"])


def test_interrupt_in_the_first_epoch_resumes_from_the_start(tmp_path, monkeypatch):
    args = [*WDBC, "--epochs", 2]
    assert invoke("train", *args, "--out", tmp_path / "whole", "--quiet").exit_code == 0
    from xpnet.cli import run as run_module

    def ctrl_c(self, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.RunRecorder, "on_batch_end", ctrl_c, raising=False)
    assert_one_line_error(invoke("train", *args, "--out", tmp_path / "broken", "--quiet"), 130, "holds epoch 0 of 2")
    monkeypatch.undo()
    assert invoke("train", "--resume", tmp_path / "broken", "--quiet").exit_code == 0
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors").model
    again = load_checkpoint(tmp_path / "broken" / "checkpoint.safetensors").model
    for key in whole:
        np.testing.assert_array_equal(again[key], whole[key])


def test_resume_with_more_epochs_equals_the_longer_run(tmp_path):
    assert invoke("train", *WDBC, "--epochs", 5, "--out", tmp_path / "long", "--quiet").exit_code == 0
    assert invoke("train", *WDBC, "--epochs", 3, "--out", tmp_path / "short", "--quiet").exit_code == 0
    result = invoke("train", "--resume", tmp_path / "short", "--epochs", 5, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["epochs"] == 5
    assert json.loads((tmp_path / "short" / "config.json").read_text())["epochs"] == 5
    long, short = (load_checkpoint(tmp_path / name / "checkpoint.safetensors").model for name in ("long", "short"))
    for key in long:
        np.testing.assert_array_equal(short[key], long[key])


def test_resume_refuses_changes_it_cannot_honour(tmp_path):
    assert (
        invoke("train", *WDBC, "--epochs", 2, "--schedule", "cosine", "--out", tmp_path / "run", "--quiet").exit_code
        == 0
    )
    assert_one_line_error(
        invoke("train", "--resume", tmp_path / "run", "--epochs", 4),
        2,
        "--epochs cannot change when resuming a run with the cosine schedule",
    )
    assert_one_line_error(
        invoke("train", "--resume", tmp_path / "run", "--lr", "0.5"), 2, "--lr cannot change when resuming"
    )
    assert_one_line_error(invoke("train", "--resume", tmp_path / "run", "--out", tmp_path / "x"), 2, "not both")


def test_resume_of_a_finished_run_asks_for_more_epochs(wdbc_run):
    run, summary = wdbc_run
    result = invoke("train", "--resume", run)
    assert_one_line_error(result, 2, r"has finished its \d+ epochs; pass --epochs N")


def test_divergence_stops_with_the_epoch_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = xpnet.BinaryCrossEntropy.value_and_grad

    def poisoned(self, z, target):
        calls["n"] += 1
        value, grad = original(self, z, target)
        return (value * float("nan"), grad) if calls["n"] > 11 else (value, grad)  # 11 steps per epoch

    monkeypatch.setattr(xpnet.BinaryCrossEntropy, "value_and_grad", poisoned)
    result = invoke("train", *WDBC, "--epochs", 3, "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result, 1, "loss became nan in epoch 2; try a lower learning rate.*epoch 1 is intact")
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert checkpoint.meta["epochs_done"] == 1
    assert all(np.all(np.isfinite(v)) for v in checkpoint.model.values())


# ------------------------------------------------------------------ evaluate and predict
def test_evaluate_reports_per_class_figures(mnist_run):
    run, _ = mnist_run
    result = invoke("evaluate", run)
    assert result.exit_code == 0, result.output
    assert "precision" in result.stdout and "recall" in result.stdout and "confusion matrix" in result.stdout
    report = json.loads(invoke("evaluate", run, "--json").stdout)
    summary = json.loads((run / "results.json").read_text())
    assert report["accuracy"] == pytest.approx(summary["test_accuracy"])
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 10_000
    assert matrix.sum(axis=1).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert report["recall"][0] == pytest.approx(matrix[0, 0] / 980)


def test_predict_images_and_arrays(mnist_run, tmp_path):
    from PIL import Image

    run, _ = mnist_run
    test = load_dataset("mnist", flatten=False).test
    # a dark digit on light paper, larger than 28×28: resized and inverted like MNIST
    Image.fromarray((255 - test.x[0] * 255).astype(np.uint8)).resize((90, 90)).save(tmp_path / "seven.png")
    Image.fromarray((test.x[1] * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "two.jpg", quality=95)
    np.save(tmp_path / "rows.npy", test.x[2:4])
    result = invoke("predict", run, tmp_path / "seven.png", tmp_path / "two.jpg", tmp_path / "rows.npy")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'seven.png'}: 7 (probability")
    assert lines[1].startswith(f"{tmp_path / 'two.jpg'}: 2 (probability")
    assert lines[2].startswith(f"{tmp_path / 'rows.npy'}[0]: 1 (") and lines[3].startswith(
        f"{tmp_path / 'rows.npy'}[1]: 0 ("
    )
    probability = float(lines[0].split("probability ")[1].rstrip(")"))
    assert 0.5 < probability <= 1.0


def test_predict_bad_files(mnist_run, tmp_path):
    run, _ = mnist_run
    (tmp_path / "noise.png").write_bytes(b"not a png at all")
    assert_one_line_error(invoke("predict", run, tmp_path / "noise.png"), 2, "not an image Pillow can read")
    assert_one_line_error(invoke("predict", run, tmp_path / "absent.png"), 2, "no such file")
    np.save(tmp_path / "odd.npy", np.zeros(5))
    assert_one_line_error(invoke("predict", run, tmp_path / "odd.npy"), 2, r"does not divide into rows of 784")
    np.save(tmp_path / "nan.npy", np.full(784, np.nan))
    assert_one_line_error(invoke("predict", run, tmp_path / "nan.npy"), 2, "NaN")


def test_wdbc_predict_standardizes_rows_like_training(wdbc_run, tmp_path):
    run, _ = wdbc_run
    ds = load_dataset("wdbc")
    np.save(tmp_path / "patients.npy", ds.test.x[:10])
    result = invoke("predict", run, tmp_path / "patients.npy")
    assert result.exit_code == 0, result.output
    predicted = ["malignant" in line for line in result.stdout.splitlines()]
    assert np.mean(np.array(predicted) == (ds.test.y[:10] == 1)) >= 0.8


# -------------------------------------------------------------- checkpoints across devices
def test_checkpoint_from_a_device_loads_on_cpu_and_back(tmp_path):
    run = tmp_path / "device1"
    result = invoke("train", *WDBC, "--epochs", 3, "--device", "strict:device1", "--out", run, "--json")
    assert result.exit_code == 0, result.output
    on_device = json.loads(result.stdout)["test_accuracy"]
    on_cpu = json.loads(invoke("evaluate", run, "--device", "cpu", "--json").stdout)["accuracy"]
    assert on_cpu == pytest.approx(on_device)
    back = json.loads(invoke("evaluate", run, "--device", "strict:device1", "--json").stdout)["accuracy"]
    assert back == pytest.approx(on_device)
    resumed = invoke("train", "--resume", run, "--epochs", 4, "--device", "cpu", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["epochs"] == 4


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--epochs", 0], "--epochs must be a positive integer, got 0"),
        (["--epochs", -3], "--epochs must be a positive integer, got -3"),
        (["--hidden", "128,x"], "--hidden must be positive integers"),
        (["--hidden", "64,0"], "--hidden must be positive integers"),
        (["--dropout", "1.5"], r"--dropout must be in \[0, 1\)"),
        (["--optimizer", "rmsprop"], "--optimizer must be one of"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/folder"], "not a folder"),
        (["--lr", "-1"], "--lr must be a finite positive number"),
        (["--lr", "inf"], "--lr must be a finite positive number"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite non-negative number"),
        (["--val-split", "0", "--early-stopping", "3"], "--early-stopping watches the validation loss"),
    ],
)
def test_bad_training_options(tmp_path, args, pattern):
    result = invoke("train", *args, "--out", tmp_path / "run")
    assert_one_line_error(result, 2, pattern)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_cuda_without_cupy_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed
    result = invoke("train", "--device", "cuda", "--out", tmp_path / "run")
    assert_one_line_error(result, 2, r"device 'cuda' needs CuPy.*xpnet\[cuda12\]")


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    import types

    class NoDriver(Exception):
        pass

    def no_device_count():
        raise NoDriver("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device_count))
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    result = invoke("train", "--device", "cuda:1", "--out", tmp_path / "run")
    assert_one_line_error(result, 2, "device 'cuda' is not usable: no CUDA driver or GPU found")


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda config: [1, 2], "does not hold a JSON object"),
        (lambda config: None, "does not hold a JSON object"),
        (lambda config: {}, "lacks device, dataset, data_dir"),
        (lambda config: {k: v for k, v in config.items() if k != "data_dir"}, "lacks data_dir: it is damaged"),
        (lambda config: {**config, "batch_size": "big"}, "batch_size must be of type int"),
        (lambda config: {**config, "hidden": None}, "config.json: hidden must be a list of layer sizes, got None"),
        (lambda config: {**config, "hidden": [16, 0]}, "config.json: --hidden must be positive integers"),
        (lambda config: {**config, "colour": "blue"}, "unknown fields colour"),
        (lambda config: "{not json", "is not valid JSON"),
    ],
)
def test_malformed_run_config(wdbc_run, tmp_path, edit, pattern):
    run, _ = wdbc_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    edited = edit(json.loads((copy / "config.json").read_text()))
    (copy / "config.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    before = {path.name: path.read_bytes() for path in copy.iterdir() if path.is_file()}
    assert_one_line_error(invoke("evaluate", copy), 2, pattern)
    assert_one_line_error(invoke("train", "--resume", copy, "--epochs", 99), 2, pattern)
    assert {path.name: path.read_bytes() for path in copy.iterdir() if path.is_file()} == before


def test_usage_errors_are_one_line(capsys):
    assert main(["train", "--epochs", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Invalid value for '--epochs'" in err
    assert main(["train", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No such option: --bogus" in err


def test_malformed_data_folder(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        write_idx(folder / stem, np.zeros((3, 28, 28) if "images" in stem else 3, dtype=np.uint8))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x08\x01junk")
    result = invoke("train", "--data-dir", folder, "--val-split", "0", "--out", tmp_path / "run")
    assert_one_line_error(result, 2, "t10k-labels-idx1-ubyte: wrong magic number 01020801")


@pytest.mark.parametrize("damage", ["corrupt", "flip-data", "truncate", "empty"])
def test_damaged_checkpoints(wdbc_run, tmp_path, damage):
    run, _ = wdbc_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    path = copy / "checkpoint.safetensors"
    data = path.read_bytes()
    if damage == "corrupt":
        path.write_bytes(b"\xff" * 16 + data[16:])
    elif damage == "flip-data":  # inside the tensors: the header still parses
        path.write_bytes(data[:-100] + bytes(b ^ 0x55 for b in data[-100:-60]) + data[-60:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    np.save(tmp_path / "row.npy", np.zeros(30))
    for command in (
        ["evaluate", copy],
        ["train", "--resume", copy, "--epochs", 99],
        ["predict", copy, tmp_path / "row.npy"],
    ):
        assert_one_line_error(invoke(*command), 2, "is corrupted or truncated")


MISFIT = r"does not fit this run: config.json has hidden \[16, 8\], the checkpoint was made with \[8\]"


def test_checkpoint_of_another_architecture(wdbc_run, tmp_path):
    run, _ = wdbc_run
    other = tmp_path / "other"
    assert (
        invoke("train", "--dataset", "wdbc", "--hidden", "8", "--epochs", 1, "--out", other, "--quiet").exit_code == 0
    )
    shutil.copy(other / "checkpoint.safetensors", tmp_path / "x.safetensors")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.copy(tmp_path / "x.safetensors", copy / "checkpoint.safetensors")
    assert_one_line_error(invoke("evaluate", copy), 2, MISFIT)
    np.save(tmp_path / "row.npy", np.zeros(30))
    assert_one_line_error(invoke("predict", copy, tmp_path / "row.npy"), 2, MISFIT)
    assert_one_line_error(invoke("train", "--resume", copy, "--epochs", 99), 2, MISFIT)
    assert_one_line_error(invoke("evaluate", tmp_path / "nowhere"), 2, "is not an xpnet run folder")


# ---------------------------------------------------------------- the other commands
def test_gradcheck_command():
    result = invoke("gradcheck", "--device", "strict:device1")
    assert result.exit_code == 0, result.output
    assert "input" in result.stdout and "passed" in result.stdout
    errors = [float(line.split()[-1]) for line in result.stdout.splitlines()[2:-1]]
    assert len(errors) == 7 and max(errors) < 1e-6
    assert_one_line_error(invoke("gradcheck", "--device", "strict:no_float64"), 2, "does not support float64")


def test_devices_command():
    result = invoke("devices")
    assert result.exit_code == 0
    assert f"xpnet {xpnet.__version__}" in result.stdout
    assert "numpy" in result.stdout and "cpu " in result.stdout and "strict:device1" in result.stdout


def test_plot_command_writes_pngs(mnist_run):
    pytest.importorskip("matplotlib")
    run, _ = mnist_run
    result = invoke("plot", run)
    assert result.exit_code == 0, result.output
    names = {line.rsplit("/", 1)[-1] for line in result.stdout.split()}
    assert names == {"curves.png", "confusion.png", "first_layer_weights.png", "misclassified.png"}
    for name in names:
        data = (run / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_plot_without_matplotlib_says_how_to_install(mnist_run, monkeypatch):
    run, _ = mnist_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert_one_line_error(invoke("plot", run), 2, r"plotting needs matplotlib: pip install 'xpnet\[plot\]'")


def test_version_through_main(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"xpnet {xpnet.__version__}"


def test_installed_console_script_runs(tmp_path):
    script = shutil.which("xpnet")
    if script is None:
        pytest.skip("xpnet is not installed as a console script here (pip install -e .)")
    result = subprocess.run(
        [script, "train", *WDBC, "--epochs", "2", "--out", str(tmp_path / "run"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["epochs"] == 2
    bad = subprocess.run([script, "train", "--device", "tpu"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_the_command_line_installs_as_xpnet_cli_with_one_version(tmp_path):
    """Outside the repository, the installed distribution gives xpnet.cli and no top-level `cli`
    (a name other projects use too); its version is xpnet.__version__, written in one place."""
    code = (
        "import importlib.metadata, importlib.util, xpnet, xpnet.cli.app; "
        "print(importlib.util.find_spec('cli') is None, importlib.metadata.version('xpnet') == xpnet.__version__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_the_library_imports_without_typer():
    code = "import sys; sys.modules['typer'] = None; import xpnet, xpnet.data, xpnet.io; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ------------------------------------------------------------------------------ parity
def test_parity_against_the_strict_stand_in():
    result = invoke("parity", "--device", "strict:device1", "--no-mnist")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "parity: cpu against strict:device1"
    assert lines[-1] == "54 of 54 checks passed"  # 13 layers × forward/backward × 2 dtypes, 2 optimizers
    for name in ("Conv2D", "MaxPool2D", "AvgPool2D", "BatchNorm", "Residual"):
        assert any(line.startswith(f"{name} backward (float64)") and line.endswith("ok") for line in lines), name
    assert any(line.startswith("parameters after 10 Adam steps") and line.endswith("ok") for line in lines)


def test_parity_fails_loudly_when_a_device_computes_differently(monkeypatch):
    from xpnet.cli import parity

    class Skewed(xpnet.Layer):
        """Identity on the CPU, ×1.001 elsewhere: a device bug parity must catch."""

        def forward(self, x, training=False):
            return x * (1.0 if self.device.kind == "numpy" else 1.001)

        def backward(self, dy, need_input_grad=True):
            return dy

    monkeypatch.setattr(parity, "LAYERS", {"Skewed": (lambda: [xpnet.Dense(6, 5), Skewed()], parity.ROWS)})
    result = invoke("parity", "--device", "strict:device1", "--no-mnist")
    assert result.exit_code == 1
    assert "Skewed forward (float32)" in result.stdout and "FAILED" in result.stdout
    assert_one_line_error(invoke("parity", "--device", "tpu"), 2, "unknown device 'tpu'")


def test_a_cuda_index_that_does_not_exist(tmp_path, monkeypatch):
    import types

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 2)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    result = invoke("train", "--device", "cuda:5", "--out", tmp_path / "run")
    assert_one_line_error(result, 2, r"device 'cuda:5' does not exist: this machine has 2 GPU\(s\), cuda:0 to cuda:1")


def test_bench_command_prints_a_table(monkeypatch):
    from xpnet.cli import bench

    monkeypatch.setattr(
        bench, "available", lambda name, *_: "left out in this test" if name in ("pytorch", "sklearn") else None
    )
    result = invoke("bench", "--batch-sizes", "4096", "--epochs", "2", "--no-rss")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "pytorch: skipped, left out in this test" in out and "sklearn: skipped" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("4096 ")]
    assert [row[1] for row in rows] == ["xpnet", "floor"]
    xpnet_seconds, floor_seconds = float(rows[0][2]), float(rows[1][2])
    assert xpnet_seconds > 0 and floor_seconds > 0
    assert float(rows[1][-1]) == pytest.approx(xpnet_seconds / floor_seconds, rel=0.02)  # the xpnet/floor ratio
    assert_one_line_error(invoke("bench", "--batch-sizes", "a,b"), 2, "--batch-sizes must be integers")
    assert_one_line_error(invoke("bench", "--model", "rnn"), 2, "--model must be one of mlp, cnn, got 'rnn'")


def test_gpu_benchmark_runs_its_implementations_on_the_cpu_stand_in():
    """The GPU benchmark's code, run where there is no GPU: xpnet with and without its fast
    paths and PyTorch (when installed) on the CPU; CUDA graphs are skipped with the reason."""
    from xpnet.cli.bench_gpu import run_gpu_benchmark, table

    from xpnet.data import load_dataset

    full = load_dataset("mnist")
    small = dataclasses.replace(full, train=full.train.take(slice(0, 3000)), test=full.test.take(slice(0, 1000)))
    logged = []
    rows = run_gpu_benchmark((500,), 2, device="cpu", data=small, log=logged.append)
    from xpnet.cli.bench import available

    # no graphs without a GPU; without torch, both PyTorch references say that instead
    why = "CUDA graphs need a GPU" if available("pytorch") is None else available("pytorch")
    assert f"pytorch-graph: skipped, {why}" in logged
    assert ("pytorch" in {row["implementation"] for row in rows}) is (available("pytorch") is None)
    by_name = {row["implementation"]: row for row in rows}
    assert {"xpnet", "xpnet-reference"} <= set(by_name)
    fast, reference = by_name["xpnet"], by_name["xpnet-reference"]
    assert fast["ms_per_step"] == pytest.approx(1000 * fast["seconds_per_epoch"] / 6)
    assert fast["seconds_per_epoch"] == fast["epoch_seconds"][1]  # the median of epochs 2..N (one here)
    # the same math with and without the fused kernels: the same predictions, up to a rare tie
    assert abs(fast["test_accuracy"] - reference["test_accuracy"]) <= 0.002 and fast["test_accuracy"] > 0.6
    printed = table(rows).splitlines()
    ratio_line = next(line for line in printed if "xpnet-reference" in line)
    assert float(ratio_line.split()[-1]) == pytest.approx(
        fast["seconds_per_epoch"] / reference["seconds_per_epoch"], abs=0.01
    )
