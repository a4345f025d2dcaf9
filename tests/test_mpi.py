"""Data-parallel training under a real ``mpiexec -n 2``: the ranks against one process, against
each other, the command line on the ranks, resuming on another number of ranks, and failures.

Each test launches MPI jobs (tests/mpi_worker.py, or ``xpnet train``) in a fresh folder. Skipped
where mpi4py or mpiexec is missing, unless XPNET_REQUIRE_MPI=1 (CI), where that fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mpi_worker  # tests/ is on sys.path, as for conftest
import numpy as np
import pytest
from conftest import write_mnist_slice
from xpnet.cli.bench_ranks import job_environment, launcher, mpiexec

import xpnet as xn
import xpnet.io

WORKER = Path(__file__).parent / "mpi_worker.py"
MPIEXEC = mpiexec()


def _missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    if MPIEXEC is None:
        return "no mpiexec on PATH (pip install mpich)"
    return None


@pytest.fixture(autouse=True)
def mpi():
    reason = _missing()
    if reason is not None:
        if os.environ.get("XPNET_REQUIRE_MPI") == "1":
            pytest.fail(f"XPNET_REQUIRE_MPI=1 but {reason}")
        pytest.skip(reason)


def launch(ranks: int, *command, cwd: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """``mpiexec -n ranks COMMAND`` (a Python script or ``xpnet``) in ``cwd``: its result and seconds."""
    started = time.monotonic()
    result = subprocess.run(
        [*launcher(ranks), *map(str, command)],
        cwd=cwd,
        env=job_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return result, time.monotonic() - started


def worker(ranks: int, scenario: str, tmp_path: Path, **kwargs):
    result, seconds = launch(ranks, sys.executable, WORKER, scenario, tmp_path, cwd=tmp_path, **kwargs)
    return result, seconds


def xpnet_cli(*args) -> list[str]:
    return [sys.executable, "-m", "xpnet.cli.main", *map(str, args)]


def rank_files(tmp_path: Path, ranks: int):
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    arrays = (
        [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(ranks)] if (tmp_path / "rank0.npz").exists() else []
    )
    return reports, arrays


# ------------------------------------------------------------------ the numbers
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_one_step_on_two_ranks_equals_one_process_to_rounding(tmp_path, arch):
    # one global batch of 101 rows: 51 on rank 0, 50 on rank 1; dropout draws each row's numbers
    result, _ = worker(2, f"fit:{arch}:101:101:1", tmp_path)
    assert result.returncode == 0, result.stderr
    _, (rank0, rank1) = rank_files(tmp_path, 2)
    single, _ = mpi_worker.train(arch, 101, 101, 1)
    for key, want in mpi_worker.arrays(single).items():
        np.testing.assert_array_equal(rank0[key], rank1[key])
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(rank0[key], want, rtol=1e-5, atol=1e-5 * scale, err_msg=key)
    # and the step moved the parameters: the comparison is not of two initial states
    initial = mpi_worker.arrays(mpi_worker.setup(arch, 101)[0])
    assert any(not np.allclose(initial[k], rank0[k], rtol=1e-3, atol=0) for k in initial)


@pytest.mark.parametrize("arch", ["mlp", "bn"])
def test_ranks_stay_identical_bit_for_bit(tmp_path, arch):
    # 161 rows in batches of 32: the last batch has one row, so rank 1 has none in that step
    result, _ = worker(2, f"fit:{arch}:161:32:2", tmp_path)
    assert result.returncode == 0, result.stderr
    (report0, report1), (rank0, rank1) = rank_files(tmp_path, 2)
    assert sorted(rank0) == sorted(rank1)
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    if arch == "bn":  # the running statistics moved from their start, identically on both ranks
        means = [key for key in rank0 if key.endswith("running_mean")]
        assert means and all(np.any(rank0[key] != 0) for key in means)
    for key in ("loss", "accuracy"):
        assert report0["history"][key] == report1["history"][key]
    assert report0["evaluated"] == report1["evaluated"]
    single, history = mpi_worker.train(arch, 161, 32, 2)
    if arch == "mlp":  # 12 steps later, still one process's numbers to rounding
        for key, want in mpi_worker.arrays(single).items():
            np.testing.assert_allclose(rank0[key], want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))))
        np.testing.assert_allclose(report0["history"]["loss"], history["loss"], rtol=1e-5)
    # fit's collectives: one per step (12), and per epoch two (the logs, the stop flag)
    calls = report0["stats"]["calls"]
    assert calls == 12 + 2 * 2 + (2 if arch == "bn" else 0)  # bn: its state averaged each epoch


def test_batchnorm_after_a_dense_layer_with_a_small_last_batch(tmp_path):
    # 67 rows in batches of 32: the last 3 go to rank 0 alone (one row would leave BatchNorm one value)
    result, _ = worker(2, "fit:dense-bn:67:32:2", tmp_path)
    assert result.returncode == 0, result.stderr
    _, (rank0, rank1) = rank_files(tmp_path, 2)
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)


def test_rank_0s_random_streams_draw_the_validation_split(tmp_path):
    result, _ = worker(2, "seeds-differ", tmp_path)
    assert result.returncode == 0, result.stderr
    (report0, _), (rank0, rank1) = rank_files(tmp_path, 2)
    model, x, y = mpi_worker.setup("mlp", 200, seed=0, data_seed=0)
    history = xn.fit(model, "cross_entropy", "adam", x, y, batch_size=32, validation_split=0.25)
    for key, want in mpi_worker.arrays(model).items():
        np.testing.assert_array_equal(rank0[key], rank1[key])
        np.testing.assert_allclose(rank0[key], want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))
    np.testing.assert_allclose(report0["history"]["val_loss"], history["val_loss"], rtol=1e-5)


def test_each_rank_takes_its_share_of_the_cores(tmp_path):
    result, _ = worker(2, "fit:mlp:64:16:1", tmp_path)
    assert result.returncode == 0, result.stderr
    reports, _ = rank_files(tmp_path, 2)
    cores = len(os.sched_getaffinity(0))
    for report in reports:
        assert report["local_size"] == 2
        assert report["threads"] == max(1, cores // 2)


@pytest.mark.parametrize("device", ["strict:device1", "torch"])
def test_other_backends_exchange_through_host_memory(tmp_path, device):
    # arrays without a host view (array-api-strict's second device, torch tensors) are staged
    try:
        xn.Device(device)
    except (xn.DeviceError, ImportError) as exc:
        pytest.skip(f"{device} unavailable: {exc}")
    result, _ = worker(2, f"fit:mlp:101:50:1:sgd:{device}", tmp_path)
    assert result.returncode == 0, result.stderr
    _, (rank0, rank1) = rank_files(tmp_path, 2)
    single, _ = mpi_worker.train("mlp", 101, 50, 1, None, "sgd", device)
    for key, want in mpi_worker.arrays(single).items():
        np.testing.assert_array_equal(rank0[key], rank1[key])
        np.testing.assert_allclose(rank0[key], want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))


# ------------------------------------------------------------------ the command line
def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_xpnet_train_on_two_ranks_matches_one_process(tmp_path):
    single, _ = launch(1, *xpnet_cli("train", "--epochs", 2, "--out", "one", "--json"), cwd=tmp_path)
    double, _ = launch(2, *xpnet_cli("train", "--epochs", 2, "--out", "two"), cwd=tmp_path)
    assert single.returncode == 0 and double.returncode == 0, single.stderr + double.stderr
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert two["ranks"] == 2 and one["ranks"] == 1 and two["epochs"] == 2
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.002, (one, two)
    assert one["test_accuracy"] > 0.95
    # rank 0 alone spoke: one header line, one line per epoch, one result line
    lines = double.stdout.splitlines()
    assert sum(line.startswith("training on mnist") for line in lines) == 1
    assert sum(line.startswith("test accuracy") for line in lines) == 1
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_two_rank_checkpoint_resumes_on_one_and_on_two_ranks(tmp_path):
    data = write_mnist_slice(_folder(tmp_path / "data"), 4000, 1000)
    options = ("--data-dir", data, "--batch-size", 64)
    first, _ = launch(2, *xpnet_cli("train", *options, "--epochs", 1, "--out", "run"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    first_epoch = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(first_epoch) == 1
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    on_one, _ = launch(1, *xpnet_cli("train", "--resume", "run", "--epochs", 3, "-q"), cwd=tmp_path)
    on_two, _ = launch(2, *xpnet_cli("train", "--resume", "run2", "--epochs", 3, "-q"), cwd=tmp_path)
    assert on_one.returncode == 0 and on_two.returncode == 0, on_one.stderr + on_two.stderr
    straight, _ = launch(1, *xpnet_cli("train", *options, "--epochs", 3, "--out", "straight", "-q"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    results = [_results(tmp_path / name) for name in ("run", "run2", "straight")]
    assert [r["epochs"] for r in results] == [3, 3, 3]
    assert [r["ranks"] for r in results] == [1, 2, 1]
    accuracies = [r["test_accuracy"] for r in results]
    assert max(accuracies) - min(accuracies) <= 0.01, accuracies  # 1,000 test images: 10 of them
    for name in ("run", "run2"):  # the first epoch's line is the 2-rank run's, then two more
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and lines[0] == first_epoch[0]


def test_a_refusal_is_said_once_by_rank_0(tmp_path):
    result, _ = launch(2, *xpnet_cli("train", "--epochs", 0), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["xpnet: --epochs must be a positive integer, got 0"]
    assert not (tmp_path / "runs").exists()


def test_a_diverged_run_is_said_once_and_every_rank_exits_1(tmp_path):
    options = ("--optimizer", "sgd", "--lr", "1e4", "--epochs", 2, "--out", "run")
    result, _ = launch(2, *xpnet_cli("train", *options), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "xpnet: the training loss became nan in epoch 1; try a lower learning rate or gradient clipping; "
        "the checkpoint of epoch 0 is intact in run"
    ]


def test_ctrl_c_on_the_job_says_what_is_kept_and_ends_every_rank(tmp_path):
    command = [*launcher(2), *xpnet_cli("train", "--epochs", 30, "--out", "run")]
    job = subprocess.Popen(command, cwd=tmp_path, env=job_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in job.stdout:  # the first epoch's line: its checkpoint is written
            if line.startswith(b"epoch 1/30"):
                break
        job.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends mpiexec
        started = time.monotonic()
        _, stderr = job.communicate(timeout=30)
    finally:
        job.kill()
    assert time.monotonic() - started < 30 and job.returncode != 0
    said = [line for line in stderr.decode().splitlines() if line.startswith("xpnet:")]
    assert len(said) == 1 and said[0].startswith("xpnet: rank 0 of 2: interrupted: the checkpoint holds epoch ")
    assert said[0].endswith("of 30; resume with: xpnet train --resume run")
    assert xpnet.io.load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").meta["epochs_done"] >= 1


# ------------------------------------------------------------------ failures
def test_bad_data_on_one_rank_stops_every_rank_before_training(tmp_path):
    result, seconds = worker(2, "nan-on-rank-1", tmp_path)
    assert result.returncode == 0, result.stderr
    (report0, report1), _ = rank_files(tmp_path, 2)
    assert report0["error"] == "RankFailure: rank 1 of 2: x contains NaN or infinite values"
    assert report1["error"] == "ValueError: x contains NaN or infinite values"


def test_ranks_given_different_data_are_refused(tmp_path):
    result, _ = worker(2, "fewer-rows-on-rank-1", tmp_path)
    assert result.returncode == 0, result.stderr
    reports, _ = rank_files(tmp_path, 2)
    for report in reports:
        assert report["error"].startswith("ValueError: the ranks disagree on examples: rank 0 has 64, rank 1 has 60")


@pytest.mark.parametrize(
    "scenario, message",
    [
        ("labels-out-of-range", "ValueError: y: "),
        ("early-stopping-without-validation", "ValueError: EarlyStopping monitors 'val_loss'"),
    ],
)
def test_a_failure_of_every_rank_is_raised_on_every_rank(tmp_path, scenario, message):
    result, _ = worker(2, scenario, tmp_path)
    assert result.returncode == 0, result.stderr  # caught by the script on each rank, not an abort
    reports, _ = rank_files(tmp_path, 2)
    for report in reports:
        assert report["error"].startswith(message), report["error"]


def test_ranks_with_another_dtype_are_refused(tmp_path):
    result, _ = worker(2, "float64-on-rank-1", tmp_path)
    assert result.returncode == 0, result.stderr
    reports, _ = rank_files(tmp_path, 2)
    for report in reports:
        assert "the ranks disagree on dtype" in report["error"]


@pytest.mark.parametrize(
    "scenario, said",
    [
        ("retry-after-divergence", "xpnet: rank 1 of 2: RuntimeError: failed while handling a divergence"),
        ("exit-on-rank-1", "xpnet: rank 1 of 2: SystemExit: 0"),
    ],
)
def test_a_rank_that_fails_alone_ends_the_job(tmp_path, scenario, said):
    result, seconds = worker(2, scenario, tmp_path, timeout=60)
    assert result.returncode != 0 and seconds < 30
    assert said in result.stderr
    assert not (tmp_path / "rank0.json").exists()


def test_a_rank_that_raises_ends_the_job_with_its_message(tmp_path):
    result, seconds = worker(2, "raise-on-rank-1", tmp_path, timeout=60)
    assert result.returncode != 0
    assert seconds < 30
    assert "xpnet: rank 1 of 2: RuntimeError: injected failure in a callback" in result.stderr
    assert not (tmp_path / "rank0.json").exists()  # rank 0 did not go on training alone


def test_a_killed_rank_ends_the_job(tmp_path):
    result, seconds = worker(2, "kill-rank-1", tmp_path, timeout=60)
    assert result.returncode != 0
    assert seconds < 30
    assert not (tmp_path / "rank0.json").exists()


def test_xpnet_train_with_a_failing_rank_ends_and_keeps_its_checkpoint(tmp_path):
    data = write_mnist_slice(_folder(tmp_path / "data"), 4000, 500)
    command = [sys.executable, WORKER, "cli-fail-rank-1", "train", "--data-dir", data, "--batch-size", 64]
    result, seconds = launch(2, *command, "--epochs", 3, "--out", "run", cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and seconds < 30
    assert "xpnet: rank 1 of 2: MemoryError: injected on one rank" in result.stderr
    checkpoint = xpnet.io.load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")  # intact: epoch 0
    assert checkpoint.meta["epochs_done"] == 0
    resumed, _ = launch(1, *xpnet_cli("train", "--resume", "run", "-q"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _results(tmp_path / "run")["epochs"] == 3
