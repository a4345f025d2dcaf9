"""Run folders you can trust: one writer each, config and checkpoint checked against each other,
metadata under the checksum, no dead ends, and one line (never a traceback) for every bad input
or interruption. Several tests start real ``xpnet`` processes: locks, signals and pipes are
properties of processes, not of function calls."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error as one_line
from typer.testing import CliRunner
from xpnet.cli import run as run_module
from xpnet.cli.app import app
from xpnet.cli.folder import FolderLock

import xpnet
from xpnet.io import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
WDBC = ["--dataset", "wdbc", "--hidden", "16,8", "--batch-size", "32"]
# The console script's own code path, in a process of its own.
SCRIPT = "import sys\nfrom xpnet.cli.main import main\nsys.exit(main(sys.argv[1:]))"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def xpnet_process(*args, stdout=subprocess.PIPE):
    env = {**os.environ, "XPNET_THREADS": "0", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".xpnet.lock"}


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "two"
    result = invoke("train", *WDBC, "--epochs", 2, "--out", run, "--quiet")
    assert result.exit_code == 0, result.output
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


# ------------------------------------------------------------------ one writer per folder
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(two_epochs, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    with FolderLock(busy):
        process = xpnet_process("train", *WDBC, "--epochs", 1, "--out", busy)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2, err
        assert err.strip().splitlines() == [
            f"xpnet: {busy} is in use by another xpnet process (pid {os.getpid()}): "
            "one run folder has one writer at a time; wait for it to finish"
        ]
        assert sorted(p.name for p in busy.iterdir()) == [".xpnet.lock"]  # nothing written
    copy = copy_of(two_epochs, tmp_path)
    before = files_of(copy)
    with FolderLock(copy):
        process = xpnet_process("train", "--resume", copy, "--epochs", 3)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2 and "is in use by another xpnet process" in err, err
    assert files_of(copy) == before


def test_two_trainings_started_together_leave_one_coherent_run(tmp_path):
    out = tmp_path / "shared"
    processes = [xpnet_process("train", *WDBC, "--epochs", 40, "--seed", seed, "--out", out) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by another xpnet process" in loser or "already holds a run" in loser, loser
    config = json.loads((out / "config.json").read_text())
    checkpoint = load_checkpoint(out / "checkpoint.safetensors")
    assert checkpoint.meta["run"]["seed"] == config["seed"]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 41))  # one run's epochs, not two interleaved
    assert json.loads((out / "results.json").read_text())["epochs"] == 40


def test_two_resumes_at_once_one_is_refused(two_epochs, tmp_path):
    copy = copy_of(two_epochs, tmp_path)
    processes = [xpnet_process("train", "--resume", copy, "--epochs", 60) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by another xpnet process" in loser or "has finished its 60 epochs" in loser, loser
    epochs = [json.loads(line)["epoch"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 61))
    assert load_checkpoint(copy / "checkpoint.safetensors").meta["epochs_done"] == 60


def test_a_killed_writer_leaves_no_lock_and_the_run_resumes(tmp_path):
    out = tmp_path / "killed"
    process = xpnet_process("train", *WDBC, "--epochs", 3000, "--out", out)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    # two lines: epoch 2's line is written after epoch 1's checkpoint, so there is one to resume
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=30)
    done = load_checkpoint(out / "checkpoint.safetensors").meta["epochs_done"]
    assert 1 <= done < 3000
    result = invoke("train", "--resume", out, "--epochs", done + 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "checkpoint.safetensors").meta["epochs_done"] == done + 1


# ------------------------------------------------- config.json and the checkpoint agree
@pytest.mark.parametrize(
    "key, value",
    [("activation", "tanh"), ("dtype", "float64"), ("seed", 7), ("lr", 0.5), ("optimizer", "sgd")],
)
def test_an_edited_config_is_refused_not_run_as_another_network(two_epochs, tmp_path, key, value):
    copy = copy_of(two_epochs, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, key: value}))
    before = files_of(copy)
    np.save(tmp_path / "row.npy", np.zeros(30))
    pattern = rf"does not fit this run: config.json has {key} {value!r}, the checkpoint was made with"
    one_line(invoke("evaluate", copy), 2, pattern)
    one_line(invoke("predict", copy, tmp_path / "row.npy"), 2, pattern)
    one_line(invoke("train", "--resume", copy, "--epochs", 4), 2, pattern)
    assert files_of(copy) == before


def test_the_architecture_is_checked_against_the_one_the_checkpoint_embeds(two_epochs, tmp_path):
    """A checkpoint whose run configuration agrees but whose network does not (made by hand)."""
    copy = copy_of(two_epochs, tmp_path)
    saved = load_checkpoint(copy / "checkpoint.safetensors")
    other = xpnet.Sequential([xpnet.Dense(30, 16), xpnet.Tanh(), xpnet.Dense(16, 8), xpnet.ReLU(), xpnet.Dense(8, 1)])
    meta = {k: v for k, v in saved.meta.items() if k not in ("format", "model", "optimizer", "sha256")}
    save_checkpoint(copy / "checkpoint.safetensors", other, extra=saved.extra, meta=meta)
    one_line(
        invoke("evaluate", copy),
        2,
        r"does not fit this model: it embeds the network Dense\(30, 16\) Tanh Dense\(16, 8\) ReLU Dense\(8, 1\), "
        r"float32; the configuration builds Dense\(30, 16\) ReLU Dense\(16, 8\) ReLU",
    )


# ------------------------------------------------------- the checksum covers the metadata
def test_a_flipped_digit_in_the_metadata_is_refused(two_epochs, tmp_path):
    copy = copy_of(two_epochs, tmp_path)
    path = copy / "checkpoint.safetensors"
    data = path.read_bytes()
    steps = load_checkpoint(path).meta["optimizer"]["steps"]
    marker = f'\\"steps\\": {steps}'.encode()
    assert data.count(marker) == 1
    flipped = f'\\"steps\\": {steps + 1 if steps % 10 != 9 else steps - 1}'.encode()
    assert len(flipped) == len(marker)
    path.write_bytes(data.replace(marker, flipped))
    before = files_of(copy)
    for command in (["evaluate", copy], ["train", "--resume", copy, "--epochs", 3]):
        one_line(invoke(*command), 2, "is corrupted or truncated .its metadata and tensors do not match their SHA-256")
    assert files_of(copy) == before


def test_deep_json_and_nan_weights_in_a_checkpoint_are_refused(two_epochs, tmp_path):
    copy = copy_of(two_epochs, tmp_path)
    path = copy / "checkpoint.safetensors"
    from safetensors.numpy import save_file

    save_file({"model/0.W": np.zeros(2, np.float32)}, str(path), metadata={"xpnet": "[" * 100_000})
    one_line(invoke("evaluate", copy), 2, "is not an xpnet checkpoint .no readable metadata")
    model = xpnet.mlp(30, [16, 8], 1)
    model.layers[0].params["W"][0, 0] = np.nan
    save_checkpoint(path, model, meta={"run": {}})
    one_line(invoke("evaluate", copy), 2, r"tensor 'model/0.W' holds NaN or infinite values")


def test_an_unreadable_checkpoint_says_so(two_epochs, tmp_path, monkeypatch):
    copy = copy_of(two_epochs, tmp_path)
    path = copy / "checkpoint.safetensors"
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads a mode-000 file: make the open fail as it would for anyone else
        import builtins

        real_open = builtins.open

        def refusing(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing)
    one_line(invoke("evaluate", copy), 2, rf"cannot read the checkpoint {path} \(Permission denied\)")


# ------------------------------------------------------------------- no clobbering, no dead ends
def test_out_never_overwrites_the_files_of_a_partial_run(two_epochs, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(two_epochs / "metrics.jsonl", partial)
    shutil.copy(two_epochs / "results.json", partial)
    before = files_of(partial)
    one_line(invoke("train", *WDBC, "--out", partial), 2, "holds the metrics.jsonl or results.json of a run")
    one_line(invoke("train", "--resume", partial), 2, "is not an xpnet run folder")
    assert files_of(partial) == before


def test_resume_cannot_shrink_a_run_and_leaves_its_config_until_a_checkpoint(two_epochs, tmp_path, monkeypatch):
    copy = copy_of(two_epochs, tmp_path)
    (copy / "results.json").unlink()
    before = files_of(copy)
    one_line(invoke("train", "--resume", copy, "--epochs", 1), 2, "has 2 epochs done: --epochs must be at least 2")
    assert files_of(copy) == before

    def ctrl_c(self, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.RunRecorder, "on_batch_end", ctrl_c, raising=False)
    one_line(invoke("train", "--resume", copy, "--epochs", 5), 130, "holds epoch 2 of 5")
    assert json.loads((copy / "config.json").read_text())["epochs"] == 2  # the failure left nothing behind
    assert (copy / "checkpoint.safetensors").read_bytes() == before["checkpoint.safetensors"]
    monkeypatch.undo()
    assert invoke("train", "--resume", copy, "--epochs", 3, "--quiet").exit_code == 0
    assert json.loads((copy / "config.json").read_text())["epochs"] == 3
    assert load_checkpoint(copy / "checkpoint.safetensors").meta["run"]["epochs"] == 3
    assert invoke("evaluate", copy).exit_code == 0  # the two agree again


@pytest.mark.parametrize("option", ["--resume", "--out"])
def test_an_empty_folder_name_is_refused(tmp_path, option, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line(invoke("train", *WDBC, option, ""), 2, f"{option} needs a run folder, got an empty name")
    assert list(tmp_path.iterdir()) == []


def test_a_run_interrupted_before_its_first_checkpoint_is_no_dead_end(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert invoke("train", *WDBC, "--epochs", 2, "--out", whole, "--quiet").exit_code == 0
    original = run_module.save_run_checkpoint

    def killed_before_the_first_checkpoint(run_dir, *args, **kwargs):
        Path(run_dir, ".checkpoint.safetensors.abc123.tmp").write_bytes(b"\0" * 1000)  # a write cut short
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "save_run_checkpoint", killed_before_the_first_checkpoint)
    broken = tmp_path / "broken"
    one_line(invoke("train", *WDBC, "--epochs", 2, "--out", broken), 130, "resume with: xpnet train --resume")
    assert (broken / "config.json").is_file() and not (broken / "checkpoint.safetensors").exists()
    monkeypatch.setattr(run_module, "save_run_checkpoint", original)
    again = tmp_path / "again"
    shutil.copytree(broken, again)

    assert invoke("train", "--resume", broken, "--quiet").exit_code == 0  # resumable: from the start
    assert invoke("train", *WDBC, "--epochs", 2, "--out", again, "--quiet").exit_code == 0  # or reusable
    for folder in (broken, again):
        assert not list(folder.glob(".*.tmp"))  # the killed write's temporary file is gone
        reference = load_checkpoint(whole / "checkpoint.safetensors").model
        for key, value in load_checkpoint(folder / "checkpoint.safetensors").model.items():
            np.testing.assert_array_equal(value, reference[key])


def test_out_that_is_a_file_under_a_file_or_read_only(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line(invoke("train", *WDBC, "--out", tmp_path / "file"), 2, "--out .*file is a file, not a folder")
    one_line(invoke("train", *WDBC, "--out", tmp_path / "file" / "run"), 2, "cannot create the folder")
    assert (tmp_path / "file").read_text() == "x"
    one_line(invoke("train", *WDBC, "--out", "/sys/xpnet-run"), 2, "--out /sys/xpnet-run: cannot create the folder")
    one_line(invoke("train", *WDBC, "--out", "/sys"), 2, "/sys: cannot write to the run folder")


def test_out_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    result = invoke("train", *WDBC, "--epochs", 1, "--out", "~/tilde", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run_dir"] == str(tmp_path / "tilde")
    assert (tmp_path / "tilde" / "checkpoint.safetensors").is_file()


# --------------------------------------------------------------------------- options
def test_val_split_for_wdbc_is_refused_and_recorded_as_null(two_epochs):
    one_line(invoke("train", *WDBC, "--val-split", "0.3"), 2, "--val-split does not apply to wdbc")
    assert json.loads((two_epochs / "config.json").read_text())["val_split"] is None


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["train", "--hidden", "²"], "--hidden must be positive integers separated by commas"),
        (["train", "--hidden", "99999999"], r"--hidden 99999999 .* needs about .* [GT]iB to train, more than"),
        (["gradcheck", "--tolerance", "nan"], "--tolerance must be a finite positive number, got nan"),
    ],
)
def test_bad_options_name_the_option(tmp_path, args, pattern):
    one_line(invoke(*args, *(["--out", tmp_path / "run"] if args[0] == "train" else [])), 2, pattern)
    assert not (tmp_path / "run").exists()


def test_a_huge_network_is_refused_before_memory_is_taken(tmp_path):
    """Under a 1 GiB address-space limit: a regression fails with MemoryError, it cannot take the machine."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from xpnet.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "XPNET_THREADS": "0", "OPENBLAS_NUM_THREADS": "1"}
    out = tmp_path / "huge"
    args = ["train", "--dataset", "wdbc", "--hidden", "20000000", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "--hidden 20000000" in done.stderr and "GiB" in done.stderr
    assert not out.exists()


# ------------------------------------------------------------------------ plot
def test_plot_refuses_missing_or_bad_metrics_and_a_plots_file(two_epochs, tmp_path):
    copy = copy_of(two_epochs, tmp_path)
    (copy / "metrics.jsonl").unlink()
    one_line(invoke("plot", copy), 2, r"metrics.jsonl: no such file")
    assert not (copy / "plots").exists()
    (copy / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n{"loss": 0.4}\n')
    one_line(invoke("plot", copy), 2, r"metrics.jsonl, line 2: not a metrics line")
    assert not (copy / "plots").exists()
    shutil.copy(two_epochs / "metrics.jsonl", copy)
    (copy / "plots").write_text("mine")
    one_line(invoke("plot", copy), 2, "plots is a file")
    assert (copy / "plots").read_text() == "mine"


# ------------------------------------------------------------- interruptions and pipes
def _signalled_train(tmp_path, name: str, args: list, delay: float, disposition) -> tuple:
    """(exit code, stdout, stderr) of ``xpnet train *args`` started with SIGINT at ``disposition``
    (SIG_DFL: as a foreground command starts, whatever this process's own: a test run started in
    the background, by ``cmd &`` or nohup, ignores SIGINT, and its children would inherit that) and
    sent SIGINT ``delay`` seconds after the calling script says it started."""
    started = tmp_path / "started"
    started.unlink(missing_ok=True)
    code = f"import pathlib, sys\nfrom xpnet.cli.main import main\npathlib.Path({str(started)!r}).touch()\n"
    code += "sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "XPNET_THREADS": "0", "OPENBLAS_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code, "train", *args, "--out", str(tmp_path / name)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition),
    )
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path):
    """From the moment xpnet's code runs: its imports (typer, NumPy, xpnet are imported inside
    ``main``), loading data, building the model, training. (Before that, Python's own start-up,
    such as the .pth files of site-packages, and the few bytecodes of the calling script before
    ``main``'s first line, are not xpnet's to handle: the first delay is 20 ms after the script
    says it started.)"""
    for i, delay in enumerate((0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0)):
        code, _, err = _signalled_train(tmp_path, f"run{i}", [*WDBC, "--epochs", "3000"], delay, signal.SIG_DFL)
        assert code == 130, (delay, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xpnet: interrupted"), (delay, err)


def test_a_run_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """Started with SIGINT ignored (nohup, a script's background job), xpnet ignores it, as Python
    does: during its imports (where it otherwise defers a Ctrl-C) and during training."""
    for i, delay in enumerate((0.01, 0.3)):
        args = [*WDBC, "--epochs", "20", "--quiet"]
        code, out, err = _signalled_train(tmp_path, f"run{i}", args, delay, signal.SIG_IGN)
        assert code == 0 and err == "", (delay, err)
        assert out.startswith("test accuracy"), out


@pytest.mark.parametrize("command", ["evaluate", "--help"])
def test_a_closed_output_pipe_is_one_line(two_epochs, command):
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head -1` does once it has its line
    try:
        args = ["evaluate", two_epochs] if command == "evaluate" else ["--help"]
        process = xpnet_process(*args, stdout=write_end)
    finally:
        os.close(write_end)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert err.strip().splitlines() == [
        "xpnet: the standard output was closed before everything was written (broken pipe)"
    ]


# ------------------------------------------------------------ what the review found
def test_a_config_json_of_another_program_is_never_overwritten(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"name": "mine"}')
    one_line(invoke("train", *WDBC, "--epochs", 1, "--out", folder), 2, "holds a config.json that is not an xpnet run")
    assert (folder / "config.json").read_text() == '{"name": "mine"}'
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()  # a folder where a run's file goes
    one_line(invoke("train", *WDBC, "--epochs", 1, "--out", folder), 2, "or a folder where a run's file goes")
    one_line(invoke("evaluate", folder), 2, "config.json is not a file")


def test_a_linked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / ".xpnet.lock").symlink_to(notes)
    one_line(invoke("train", *WDBC, "--epochs", 1, "--out", folder), 2, r"\.xpnet\.lock is a symbolic link")
    assert notes.read_text() == "mine"


def test_a_moved_data_folder_is_followed_by_editing_config_json(tmp_path):
    from xpnet.data import load_dataset

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(load_dataset.__globals__["_embedded"]("wdbc.csv"), data / "wdbc.csv")
    run = tmp_path / "run"
    assert invoke("train", *WDBC, "--epochs", 1, "--data-dir", data, "--out", run, "--quiet").exit_code == 0
    data.rename(tmp_path / "moved")
    one_line(invoke("evaluate", run), 2, "wdbc.csv: cannot read the file")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data_dir": str(tmp_path / "moved")}))
    assert invoke("evaluate", run).exit_code == 0  # the data's place is not part of what the run is


def test_a_kill_between_a_resumes_checkpoint_and_its_config_is_repaired(two_epochs, tmp_path, monkeypatch):
    copy = copy_of(two_epochs, tmp_path)
    (copy / "results.json").unlink()

    def killed(run_dir, config):  # the checkpoint with epochs 5 is saved; config.json is not rewritten
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "write_config", killed)
    one_line(invoke("train", "--resume", copy, "--epochs", 5), 130, "holds epoch 3 of 5")
    monkeypatch.undo()
    assert json.loads((copy / "config.json").read_text())["epochs"] == 2
    assert load_checkpoint(copy / "checkpoint.safetensors").meta["run"]["epochs"] == 5
    assert invoke("evaluate", copy).exit_code == 0
    result = invoke("train", "--resume", copy, "--json")  # the checkpoint's 5 epochs win
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 5
    assert json.loads((copy / "config.json").read_text())["epochs"] == 5  # and config.json follows it


def test_a_resume_removes_the_results_of_fewer_epochs(two_epochs, tmp_path, monkeypatch):
    copy = copy_of(two_epochs, tmp_path)
    original = run_module.RunRecorder.on_epoch_end

    def stop_after_epoch_three(self, state, logs):
        original(self, state, logs)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module.RunRecorder, "on_epoch_end", stop_after_epoch_three)
    one_line(invoke("train", "--resume", copy, "--epochs", 5), 130, "holds epoch 3 of 5")
    monkeypatch.undo()
    assert not (copy / "results.json").exists()  # it tested epoch 2's weights
    result = invoke("train", "--resume", copy, "--epochs", 3, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["epochs"] == 3
    assert json.loads((copy / "results.json").read_text())["epochs"] == 3


def test_a_run_with_its_checkpoint_but_no_config_json_goes_on(two_epochs, tmp_path):
    copy = copy_of(two_epochs, tmp_path)
    (copy / "config.json").unlink()
    assert invoke("evaluate", copy).exit_code == 0  # the checkpoint carries the whole configuration
    result = invoke("train", "--resume", copy, "--epochs", 3, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "config.json").read_text())["epochs"] == 3


def test_padded_or_huge_run_files_are_refused_unread(two_epochs, tmp_path):
    copy = copy_of(two_epochs, tmp_path)
    with open(copy / "checkpoint.safetensors", "r+b") as handle:  # 2 GB of holes after the tensors
        handle.truncate(2 << 30)
    started = time.monotonic()
    one_line(invoke("evaluate", copy), 2, "its header accounts for .* bytes, the file has 2,147,483,648")
    assert time.monotonic() - started < 20
    shutil.copy(two_epochs / "checkpoint.safetensors", copy)
    with open(copy / "config.json", "r+b") as handle:
        handle.truncate(8 << 30)
    one_line(invoke("evaluate", copy), 2, "too large to be a run configuration")


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda c: {**c, "data_dir": 5}, "config.json: data_dir must be a folder name or null, got 5"),
        (lambda c: {**c, "xpnet_version": 3}, "config.json: xpnet_version must be a string"),
        (lambda c: {**c, "hidden": "16,8"}, "config.json: hidden must be a list"),
        (lambda c: {**c, "lr": -1}, "config.json: --lr must be a finite positive number"),
        (lambda c: {**c, "data_dir": "~nobody-here/x"}, "cannot expand ~"),
    ],
)
def test_bad_values_in_config_json_name_the_file(two_epochs, tmp_path, edit, pattern):
    copy = copy_of(two_epochs, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(edit(config)))
    one_line(invoke("evaluate", copy), 2, pattern)


def test_dataset_names_in_any_case_and_paths_that_cannot_expand(tmp_path):
    result = invoke("train", "--dataset", "WDBC", "--hidden", "8", "--epochs", 1, "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["dataset"] == "wdbc"
    one_line(invoke("train", *WDBC, "--out", "~nobody-here/x"), 2, "--out ~nobody-here/x: cannot expand ~")
    one_line(invoke("evaluate", "~nobody-here/x"), 2, "cannot expand ~")


def test_predict_on_a_folder_says_so(two_epochs, tmp_path):
    one_line(invoke("predict", two_epochs, tmp_path), 2, "not a regular file")


def test_large_logits_give_no_overflow_warnings(two_epochs, tmp_path):
    copy = copy_of(two_epochs, tmp_path)
    saved = load_checkpoint(copy / "checkpoint.safetensors")
    model = saved.build_model()
    last = model.layers[-1]
    last.params["W"][...] *= 1e4  # logits far beyond float32's exp range
    meta = {k: v for k, v in saved.meta.items() if k not in ("format", "model", "optimizer", "sha256")}
    save_checkpoint(copy / "checkpoint.safetensors", model, extra=saved.extra, meta=meta)
    np.save(tmp_path / "rows.npy", load_checkpoint(copy / "checkpoint.safetensors").extra["data_mean"][None, :] + 3)
    for command in (["evaluate", copy], ["predict", copy, tmp_path / "rows.npy"]):
        process = xpnet_process(*command)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0 and err == "", err


def test_damaged_standardization_statistics_are_refused(two_epochs, tmp_path):
    copy = copy_of(two_epochs, tmp_path)
    saved = load_checkpoint(copy / "checkpoint.safetensors")
    model = saved.build_model()
    meta = {k: v for k, v in saved.meta.items() if k not in ("format", "model", "optimizer", "sha256")}
    np.save(tmp_path / "row.npy", np.zeros(30))
    for extra, pattern in (
        ({**saved.extra, "data_std": np.zeros(30, np.float32)}, "data_std must be positive"),
        ({**saved.extra, "data_mean": np.zeros(7, np.float32)}, r"data_mean has shape \(7,\), expected \(30,\)"),
    ):
        save_checkpoint(copy / "checkpoint.safetensors", model, extra=extra, meta=meta)
        one_line(invoke("predict", copy, tmp_path / "row.npy"), 2, pattern)


def test_ctrl_c_before_the_config_is_written_says_nothing_needs_keeping(tmp_path, monkeypatch):
    def interrupted(run_dir, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "write_config", interrupted)
    out = tmp_path / "early"
    one_line(invoke("train", *WDBC, "--out", out), 130, "before training started: nothing that needs keeping")
    monkeypatch.undo()
    assert invoke("train", *WDBC, "--epochs", 1, "--out", out, "--quiet").exit_code == 0


def test_a_closed_pipe_while_training_says_how_to_resume(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = tmp_path / "piped"
    try:
        process = xpnet_process("train", *WDBC, "--epochs", 3, "--out", out, stdout=write_end)
    finally:
        os.close(write_end)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "(broken pipe)" in lines[0], err
    assert "nothing that needs keeping" in lines[0] or f"resume with: xpnet train --resume {out}" in lines[0]
