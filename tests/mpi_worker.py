"""What tests/test_mpi.py runs on each rank under ``mpiexec -n N python tests/mpi_worker.py SCENARIO OUT``.

Each scenario trains or fails in a known way; the ranks' parameters (and layer state) go to
OUT/rank{R}.npz, and anything else a test reads to OUT/rank{R}.json. The models and data are
made by ``setup`` here, which the tests also call to compute the single-process answer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

import xpnet as xn

#: The networks of the scenarios: an MLP with dropout, a small CNN with dropout, one with BatchNorm.
ARCHS = {
    "mlp": "dense(16),relu,dropout(0.25),dense(3)",
    "cnn": "conv(4,3),relu,maxpool(2),flatten,dropout(0.3),dense(3)",
    "bn": "conv(4,3),bn,relu,maxpool(2),flatten,dense(3)",
    "dense-bn": "dense(16),bn,relu,dense(3)",
}


def setup(arch: str, rows: int, seed: int = 0, device: str = "cpu", data_seed: int | None = None):
    """(model, x, y): the scenario's seeded network on ``device`` and its data (images for the CNNs;
    drawn from ``data_seed``, by default the model's seed)."""
    rng = np.random.default_rng(seed if data_seed is None else data_seed)
    shape = (1, 8, 8) if arch in ("cnn", "bn") else (20,)
    x = rng.normal(size=(rows, *shape)).astype(np.float32)
    y = rng.integers(0, 3, size=rows)
    plan = xn.arch.plan_arch(ARCHS[arch], shape, 3)
    return xn.Sequential(plan.layers, device=device, seed=seed), x, y


def train(arch: str, rows: int, batch_size: int, epochs: int, communicator=None, optimizer="adam", device="cpu"):
    """The scenario's model after ``fit`` (Adam at 0.01 unless told otherwise), and its history."""
    model, x, y = setup(arch, rows, device=device)
    opt = xn.get_optimizer(optimizer, lr=0.01)
    history = xn.fit(model, "cross_entropy", opt, x, y, epochs=epochs, batch_size=batch_size, communicator=communicator)
    return model, history


def arrays(model) -> dict:
    return {
        key: model.device.to_host(value) for key, value in {**model.named_parameters(), **model.named_state()}.items()
    }


def main(scenario: str, out: Path) -> None:
    comm = xn.distributed.MPICommunicator()
    rank = comm.rank
    report = {"rank": rank, "size": comm.size, "threads": comm.threads, "local_size": comm.local_size}
    if scenario.startswith("fit:"):  # fit:ARCH:ROWS:BATCH:EPOCHS[:OPTIMIZER[:DEVICE]]
        _, arch, rows, batch, epochs, *rest = scenario.split(":", 6)
        model, history = train(arch, int(rows), int(batch), int(epochs), comm, *rest)
        np.savez(out / f"rank{rank}.npz", **arrays(model))
        report["history"] = history.history
        report["stats"] = comm.stats.as_dict()
        report["evaluated"] = xn.evaluate(model, "cross_entropy", *setup(arch, int(rows))[1:], communicator=comm)
    elif scenario == "nan-on-rank-1":  # bad data on one rank: every rank stops before training
        model, x, y = setup("mlp", 64)
        if rank == 1:
            x[5, 3] = np.nan
        try:
            xn.fit(model, "cross_entropy", "adam", x, y, batch_size=16, communicator=comm)
        except Exception as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
    elif scenario == "seeds-differ":  # rank r's model and streams from seed 7r: rank 0's count
        model, x, y = setup("mlp", 200, seed=7 * rank, data_seed=0)
        history = xn.fit(model, "cross_entropy", "adam", x, y, batch_size=32, validation_split=0.25, communicator=comm)
        np.savez(out / f"rank{rank}.npz", **arrays(model))
        report["history"] = history.history
    elif scenario in ("labels-out-of-range", "early-stopping-without-validation", "float64-on-rank-1"):
        model, x, y = setup("mlp", 64)
        callbacks, optimizer = [], "adam"
        if scenario == "labels-out-of-range":
            y[10] = 7
        elif scenario == "early-stopping-without-validation":
            callbacks = [xn.EarlyStopping(2)]
        elif rank == 1:
            model = xn.Sequential(xn.arch.plan_arch(ARCHS["mlp"], (20,), 3).layers, dtype="float64", seed=0)
        try:
            xn.fit(model, "cross_entropy", optimizer, x, y, batch_size=16, callbacks=callbacks, communicator=comm)
        except Exception as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
    elif scenario == "retry-after-divergence":  # every rank diverges; the retry fails on rank 1 alone
        model, x, y = setup("mlp", 256)
        try:
            xn.fit(model, "cross_entropy", xn.SGD(1e30), x, y, batch_size=32, communicator=comm)
        except xn.TrainingDiverged:

            class Fail(xn.Callback):
                def on_batch_end(self, state):
                    if rank == 1 and state.step == 2:
                        raise RuntimeError("failed while handling a divergence")

            model, x, y = setup("mlp", 256)
            xn.fit(model, "cross_entropy", "adam", x, y, batch_size=32, communicator=comm, callbacks=[Fail()])
        report["finished"] = True
    elif scenario == "exit-on-rank-1":  # sys.exit in a callback of one rank, mid-epoch
        model, x, y = setup("mlp", 4096)

        class Leave(xn.Callback):
            def on_batch_end(self, state):
                if rank == 1 and state.step == 10:
                    sys.exit(0)

        xn.fit(model, "cross_entropy", "adam", x, y, epochs=50, batch_size=16, communicator=comm, callbacks=[Leave()])
        report["finished"] = True
    elif scenario == "fewer-rows-on-rank-1":  # the ranks were given different data
        model, x, y = setup("mlp", 64 if rank == 0 else 60)
        try:
            xn.fit(model, "cross_entropy", "adam", x, y, batch_size=16, communicator=comm)
        except Exception as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
    elif scenario in ("raise-on-rank-1", "kill-rank-1"):  # one rank fails in the middle of an epoch
        model, x, y = setup("mlp", 4096)

        class Fail(xn.Callback):
            def on_batch_end(self, state):
                if rank == 1 and state.step == 20:
                    if scenario == "kill-rank-1":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError("injected failure in a callback")

        xn.fit(model, "cross_entropy", "adam", x, y, epochs=50, batch_size=16, communicator=comm, callbacks=[Fail()])
        report["finished"] = True
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def cli_failing_on_rank_1(argv: list[str]) -> int:
    """``xpnet ARGV`` on every rank, where rank 1's 30th backward pass raises MemoryError."""
    from xpnet.cli.main import main as xpnet_main

    if xn.distributed.launched_rank() == 1:
        backward, calls = xn.Sequential.backward, [0]

        def failing(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 30:
                raise MemoryError("injected on one rank")
            return backward(self, *args, **kwargs)

        xn.Sequential.backward = failing
    return xpnet_main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "cli-fail-rank-1":
        sys.exit(cli_failing_on_rank_1(sys.argv[2:]))
    main(sys.argv[1], Path(sys.argv[2]))
