"""Side-by-side training benchmark on MNIST: xpnet, PyTorch eager, scikit-learn and the matmul floor.

One process trains the 784-128-64-10 ReLU MLP (softmax cross-entropy, He init, Adam lr 1e-3), or
with ``model="cnn"`` (``xpnet bench --model cnn``) the MNIST CNN of ``xn.cnn`` (34,826
parameters: conv 32 3×3, ReLU, max-pool 2, conv 64 3×3, ReLU, max-pool 2, dropout 0.5, dense
10), with every implementation, interleaved epoch by epoch so that machine noise hits all alike:

* xpnet on the chosen device (NumPy on the CPU);
* PyTorch eager with the same initial weights and optimizer (data in tensors, batches indexed by
  a permutation, ``torch.set_num_threads`` = the cores);
* scikit-learn's ``MLPClassifier(hidden_layer_sizes=(128, 64), solver='adam', batch_size=B)``,
  one ``partial_fit`` per epoch (the MLP only);
* the floor: only the matrix products one training step needs (three forward, two backward per
  layer but no input gradient for the first), on preallocated outputs; for the CNN, the products
  of the im2col form: per convolution W₂ cols forward, δ colsᵀ for ∂L/∂W and W₂ᵀ δ for the
  columns' gradient (not for the first), each as one product over the whole batch, without
  building the columns. It runs in a process of its own, driven epoch by epoch, because xpnet
  hands this process's OpenBLAS to its own thread pool; the floor is OpenBLAS on OpenBLAS's
  threads.

Each epoch starts after 0.2 s of rest, so that no implementation's threads are still spinning
from the one before.

Seconds per epoch are the median of epochs 2..N. Peak RSS comes from a separate short process per
implementation (RSS is per process). PyTorch and scikit-learn are optional.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import xpnet as xn
from xpnet.data import load_dataset

IMPLEMENTATIONS = ("xpnet", "pytorch", "sklearn", "floor")
#: The networks benchmarked, and how each is described in the log.
MODELS = {
    "mlp": "MNIST 784-128-64-10 ReLU MLP",
    "cnn": "MNIST CNN (conv 32 3×3, max-pool 2, conv 64 3×3, max-pool 2, dropout 0.5, dense 10)",
}
#: The repository root: child processes run there, so that ``cli`` imports.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Rest before each epoch of the interleaved runs (see ``interleave``).
SETTLE_SECONDS = 0.2


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TorchClock:
    """Seconds from creation to ``stop()``: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.started = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.started
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000


def benchmark_model(seed, device="cpu", model="mlp"):
    """The benchmarked network (the MLP, or the CNN): its weights depend on the seed alone."""
    if model == "cnn":
        return xn.cnn(device=device, seed=seed)
    return xn.mlp(784, [128, 64], 10, device=device, seed=seed)


def initial_weights(seed, device="cpu", model="mlp") -> dict:
    """Host copies of ``benchmark_model``'s initial parameters, for the other implementations."""
    network = benchmark_model(seed, device, model)
    return {k: network.device.to_host(v).copy() for k, v in network.named_parameters().items()}


def model_input(x, model):
    """MNIST rows as the network takes them: rows of 784 for the MLP, (N, 1, 28, 28) for the CNN."""
    return x.reshape(-1, 1, 28, 28) if model == "cnn" else x


class XpnetRun:
    name = "xpnet"

    def __init__(self, data, batch_size, seed, device="cpu", model="mlp"):
        self.model = benchmark_model(seed, device, model)
        self.optimizer = xn.Adam(1e-3)
        self.X = self.model.device.to_device(model_input(data.train.x, model), "float32")
        self.y = self.model.device.to_device(data.train.y)
        self.test_x = model_input(data.test.x, model)
        self.data, self.batch_size, self.history = data, batch_size, xn.History()

    def epoch(self) -> float:
        """The epoch's seconds as ``fit`` logs them (``device.stopwatch()``). One ``fit`` call per
        epoch keeps the implementations interleaved; its once-per-call setup (moving and checking
        the data, 0.027 s for MNIST on this CPU) would otherwise be charged to every epoch."""
        done = len(self.history)
        xn.fit(
            self.model,
            "cross_entropy",
            self.optimizer,
            self.X,
            self.y,
            epochs=done + 1,
            batch_size=self.batch_size,
            metrics=[],
            initial_epoch=done,
            history=self.history,
        )
        return self.history["seconds"][-1]

    def accuracy(self) -> float:
        return xn.evaluate(self.model, "cross_entropy", self.test_x, self.data.test.y)["accuracy"]


class TorchRun:
    name = "pytorch"

    def __init__(self, data, batch_size, seed, initial, device="cpu", model="mlp"):
        import torch

        torch.set_num_threads(cores())
        torch.manual_seed(seed)
        self.torch, self.device, nn = torch, torch.device(device), torch.nn
        if model == "cnn":  # layers numbered as xn.cnn numbers them
            self.model = nn.Sequential(
                nn.Conv2d(1, 32, 3),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Dropout(0.5),
                nn.Linear(1600, 10),
            )
            weighted = (0, 3, 8)
        else:
            self.model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
            weighted = (0, 2, 4)
        with torch.no_grad():  # the very weights xpnet starts from: W (out, in[, k, k]) in both
            for index in weighted:
                self.model[index].weight.copy_(torch.from_numpy(initial[f"{index}.W"]))
                self.model[index].bias.copy_(torch.from_numpy(initial[f"{index}.b"]))
        self.model.to(self.device)
        self.optimizer = self.make_optimizer()
        self.X = torch.from_numpy(model_input(data.train.x, model)).to(self.device)
        self.y = torch.from_numpy(data.train.y).to(self.device)
        self.test_x = model_input(data.test.x, model)
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def make_optimizer(self):
        return self.torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def step(self, index) -> None:
        loss = self.torch.nn.functional.cross_entropy(self.model(self.X[index]), self.y[index])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def epoch(self) -> float:
        clock = TorchClock(self.torch, self.device)
        order = self.torch.randperm(self.X.shape[0], generator=self.generator, device=self.device)
        self.model.train()
        for start in range(0, self.X.shape[0], self.batch_size):
            self.step(order[start : start + self.batch_size])
        return clock.stop()

    def accuracy(self) -> float:
        self.model.eval()
        with self.torch.no_grad():
            predicted = []
            for start in range(0, self.test_x.shape[0], 1000):
                part = self.torch.from_numpy(self.test_x[start : start + 1000]).to(self.device)
                predicted.append(self.model(part).argmax(dim=1).cpu().numpy())
        return float((np.concatenate(predicted) == self.data.test.y).mean())


class SklearnRun:
    name = "sklearn"

    def __init__(self, data, batch_size, seed):
        from sklearn.neural_network import MLPClassifier

        self.model = MLPClassifier(
            hidden_layer_sizes=(128, 64),
            solver="adam",
            batch_size=batch_size,
            learning_rate_init=1e-3,
            random_state=seed,
        )
        self.data = data

    def epoch(self) -> float:
        import warnings

        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.partial_fit(self.data.train.x, self.data.train.y, classes=np.arange(10))
        return time.perf_counter() - started

    def accuracy(self) -> float:
        return float((self.model.predict(self.data.test.x) == self.data.test.y).mean())


class FloorRun:
    """The matrix products of one epoch of training, and nothing else."""

    name = "floor"

    def __init__(self, data, batch_size, seed, model="mlp", rows=None):
        rng = np.random.default_rng(seed)
        self.X = data.train.x[:rows]
        self.batch_size, self.model = batch_size, model
        sizes = [(128, 784), (64, 128), (10, 64)] if model == "mlp" else [(32, 9), (64, 288), (10, 1600)]
        self.W = [rng.standard_normal(s, dtype=np.float32) * 0.05 for s in sizes]
        self.buffers = {}

    def buffer(self, name, shape, fill=False):
        if self.buffers.get(name) is None or self.buffers[name].shape != shape:
            self.buffers[name] = np.empty(shape, dtype=np.float32)
            if fill:  # operands stand in for columns: any finite values cost the same
                self.buffers[name][...] = 0.01
        return self.buffers[name]

    def epoch(self) -> float:
        return self._mlp_epoch() if self.model == "mlp" else self._cnn_epoch()

    def _cnn_epoch(self) -> float:
        """Per step: conv1 (32 × 9 by 9 × b·676) and its ∂L/∂W; conv2 (64 × 288 by 288 × b·121),
        its ∂L/∂W and the columns' gradient; the dense layer's three products."""
        W1, W2, W3 = self.W
        n, B, buffer = self.X.shape[0], self.batch_size, self.buffer
        started = time.perf_counter()
        for start in range(0, n, B):
            b = min(B, n - start)
            cols1, cols2 = buffer("cols1", (9, b * 676), True), buffer("cols2", (288, b * 121), True)
            y1 = np.matmul(W1, cols1, out=buffer("y1", (32, b * 676)))
            y2 = np.matmul(W2, cols2, out=buffer("y2", (64, b * 121)))
            h = buffer("h", (b, 1600), True)
            z = np.matmul(h, W3.T, out=buffer("z", (b, 10)))
            np.matmul(z.T, h, out=buffer("dW3", (10, 1600)))
            np.matmul(z, W3, out=buffer("dh", (b, 1600)))
            np.matmul(y2, cols2.T, out=buffer("dW2", (64, 288)))
            np.matmul(W2.T, y2, out=buffer("dcols2", (288, b * 121)))
            np.matmul(y1, cols1.T, out=buffer("dW1", (32, 9)))
        return time.perf_counter() - started

    def _mlp_epoch(self) -> float:
        W1, W2, W3 = self.W
        n, B, buffer = self.X.shape[0], self.batch_size, self.buffer
        started = time.perf_counter()
        for start in range(0, n, B):
            x = self.X[start : start + B]
            b = x.shape[0]
            h1 = np.matmul(x, W1.T, out=buffer("h1", (b, 128)))
            h2 = np.matmul(h1, W2.T, out=buffer("h2", (b, 64)))
            d3 = np.matmul(h2, W3.T, out=buffer("z3", (b, 10)))
            np.matmul(d3.T, h2, out=buffer("dW3", (10, 64)))
            d2 = np.matmul(d3, W3, out=buffer("d2", (b, 64)))
            np.matmul(d2.T, h1, out=buffer("dW2", (64, 128)))
            d1 = np.matmul(d2, W2, out=buffer("d1", (b, 128)))
            np.matmul(d1.T, x, out=buffer("dW1", (128, 784)))
        return time.perf_counter() - started

    def accuracy(self):
        return None


#: The floor's own process: reads "epoch" lines and answers each with one epoch's seconds.
_FLOOR_CHILD = """
import sys
from xpnet.cli.bench import FloorRun
from xpnet.data import load_dataset
run = FloorRun(load_dataset("mnist"), int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
for line in sys.stdin:
    if line.strip() != "epoch":
        break
    print(run.epoch(), flush=True)
"""


class FloorProcess:
    """The floor, timed in a process of its own and driven epoch by epoch, so that it stays
    interleaved. In this process xpnet's first ``fit`` hands NumPy's OpenBLAS to xpnet's thread
    pool (xpnet/_cpu_threads.py); the floor must be OpenBLAS on its own threads."""

    name = "floor"

    def __init__(self, batch_size, seed, model="mlp", rows=60000):
        env = {**os.environ, "XPNET_THREADS": "0"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _FLOOR_CHILD, str(batch_size), str(seed), model, str(rows)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=_ROOT,
            env=env,
        )

    def epoch(self) -> float:
        self.process.stdin.write("epoch\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the floor's process ended (exit code {self.process.wait()})")
        return float(line)

    def accuracy(self):
        return None

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _make(name, data, batch_size, seed, device, initial, model="mlp"):
    if name == "xpnet":
        return XpnetRun(data, batch_size, seed, device, model)
    if name == "pytorch":
        return TorchRun(data, batch_size, seed, initial, model=model)
    if name == "sklearn":
        return SklearnRun(data, batch_size, seed)
    return FloorProcess(batch_size, seed, model, data.train.x.shape[0])


def available(name, model="mlp") -> str | None:
    """None if the implementation can run here, else why not."""
    if name == "sklearn" and model != "mlp":
        return "scikit-learn has no convolutional network"
    module = {"pytorch": "torch", "sklearn": "sklearn"}.get(name)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return f"{module} is not installed"
    return None


def peak_rss_mib(name: str, batch_size: int, device: str, model: str = "mlp") -> float | None:
    """Peak RSS of a fresh process that loads MNIST and trains one epoch of ``name``."""
    code = (
        "from xpnet.cli.bench import _probe, vm_hwm_mib; "
        f"_probe({name!r}, {batch_size}, {device!r}, {model!r}); print(vm_hwm_mib())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=_ROOT, timeout=900)
    return float(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else None


def vm_hwm_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: on Linux that survives exec, so a
    child started by a large parent would report the parent's peak."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _probe(name, batch_size, device, model="mlp"):
    data = load_dataset("mnist")
    initial = initial_weights(0, device, model) if name == "pytorch" else None
    if name == "floor":
        run = FloorRun(data, batch_size, 0, model)
    else:
        run = _make(name, data, batch_size, 0, device, initial, model)
    run.epoch()


def run_benchmark(
    batch_sizes=(32, 128, 512),
    epochs=5,
    *,
    device="cpu",
    seed=0,
    measure_rss=True,
    implementations=IMPLEMENTATIONS,
    model="mlp",
    data=None,
    log=print,
) -> list[dict]:
    """The rows of the table: one per batch size and implementation. ``data``: MNIST, or a part
    of it (the tests'); the floor takes as many training rows."""
    data = load_dataset("mnist") if data is None else data
    missing = {name: available(name, model) for name in implementations}
    names = [name for name in implementations if missing[name] is None]
    for name in implementations:
        if missing[name] is not None:
            log(f"{name}: skipped, {missing[name]}")
    log(
        f"{MODELS[model]}, Adam 1e-3, {epochs} epochs, device {device}, {cores()} cores; "
        f"implementations interleaved epoch by epoch: {', '.join(names)}"
    )
    rows = []
    for batch_size in batch_sizes:
        initial = initial_weights(seed, device, model)
        runs = {name: _make(name, data, batch_size, seed, device, initial, model) for name in names}
        try:
            for name, run, seconds, times in interleave(runs, epochs, batch_size, log, settle=SETTLE_SECONDS):
                rows.append(
                    {
                        "batch_size": batch_size,
                        "implementation": name,
                        "seconds_per_epoch": seconds,
                        "epoch_seconds": times,
                        "samples_per_second": data.train.x.shape[0] / seconds,
                        "test_accuracy": run.accuracy(),
                        "peak_rss_mib": peak_rss_mib(name, batch_size, device, model) if measure_rss else None,
                    }
                )
        finally:
            for run in runs.values():
                if hasattr(run, "close"):
                    run.close()
    return rows


def interleave(runs: dict, epochs: int, batch_size: int, log, settle: float = 0.0):
    """Train every run one epoch at a time, in turn; yield (name, run, median seconds of epochs
    2..N, every epoch's seconds) per run. ``settle``: seconds of rest before each epoch, so that
    the threads of the run before have stopped spinning (OpenBLAS's spin for about 0.1 s)."""
    times = {name: [] for name in runs}
    for epoch in range(epochs):
        for name, run in runs.items():
            time.sleep(settle)
            times[name].append(run.epoch())
        log(f"batch {batch_size}, epoch {epoch + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    for name, run in runs.items():
        yield name, run, statistics.median(times[name][1:] if epochs > 1 else times[name]), times[name]


def ratio_cell(mine: dict | None, name: str, row: dict) -> str:
    """xpnet's epoch time over this row's, for the table's last column."""
    if mine is None or name == "xpnet":
        return ""
    return f"{mine['seconds_per_epoch'] / row['seconds_per_epoch']:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        f"{'batch':>5}  {'implementation':<14} {'s/epoch':>8} {'samples/s':>10} {'test acc':>8} "
        f"{'peak RSS':>9} {'xpnet/this':>10}"
    ]
    for batch_size in sorted({row["batch_size"] for row in rows}):
        group = {row["implementation"]: row for row in rows if row["batch_size"] == batch_size}
        mine = group.get("xpnet")
        for name, row in group.items():
            accuracy = "" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.2f}%"
            rss = "" if row["peak_rss_mib"] is None else f"{row['peak_rss_mib']:.0f} MiB"
            ratio = ratio_cell(mine, name, row)
            lines.append(
                f"{batch_size:>5}  {name:<14} {row['seconds_per_epoch']:>8.3f} "
                f"{row['samples_per_second']:>10,.0f} {accuracy:>8} {rss:>9} {ratio:>10}"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    parser.add_argument("--batch-sizes", default="32,128,512")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = run_benchmark(
        [int(b) for b in args.batch_sizes.split(",")],
        args.epochs,
        device=args.device,
        measure_rss=not args.no_rss,
        model=args.model,
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
