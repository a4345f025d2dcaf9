"""GPU benchmark on MNIST: xpnet on CuPy against PyTorch eager on the same card.

One process trains the 784-128-64-10 ReLU MLP (softmax cross-entropy, Adam lr 1e-3), or the
MNIST CNN with ``model="cnn"`` (``xpnet bench --model cnn --device cuda``; untested on a GPU so
far), with:

* ``xpnet``: CuPy with the fast paths (fused CUDA kernels, buffers reused across steps);
* ``xpnet-reference``: CuPy running the Array API reference code (``fast=False``);
* ``pytorch``: PyTorch eager, same initial weights, data on the GPU, batches by a permutation;
* ``pytorch-graph``: PyTorch with the whole step (gather, forward, backward, capturable Adam)
  captured once in a CUDA graph and replayed per full batch; the last, smaller batch runs eager.

Implementations are interleaved epoch by epoch. Epochs are timed with CUDA events; epoch 1 is
the warm-up (kernel compilation, cuBLAS handles, graph capture) and the figures are the median of
epochs 2..N; time per step is the epoch's time over its number of steps. On a machine without a
GPU the same code runs on the CPU (``--device cpu``; PyTorch on the CPU, no graphs): that is how
the tests exercise it.
"""

from __future__ import annotations

import math

import xpnet as xn
from xpnet.data import load_dataset

from .bench import MODELS, TorchClock, TorchRun, XpnetRun, available, initial_weights, interleave, ratio_cell

IMPLEMENTATIONS = ("xpnet", "xpnet-reference", "pytorch", "pytorch-graph")


class TorchGraphRun(TorchRun):
    name = "pytorch-graph"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph = None

    def make_optimizer(self):
        return self.torch.optim.Adam(self.model.parameters(), lr=1e-3, capturable=True)

    def _capture(self) -> None:
        torch = self.torch
        self.index = torch.zeros(self.batch_size, dtype=torch.int64, device=self.device)
        saved = [p.detach().clone() for p in self.model.parameters()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs warmed-up kernels and optimizer state
            for _ in range(3):
                self.step(self.index)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # undo the warm-up: start from the weights the others start from
            for p, value in zip(self.model.parameters(), saved):
                p.copy_(value)
            for state in self.optimizer.state.values():
                for value in state.values():
                    value.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss = torch.nn.functional.cross_entropy(self.model(self.X[self.index]), self.y[self.index])
            loss.backward()
            self.optimizer.step()

    def epoch(self) -> float:
        if self.graph is None:
            self._capture()
        torch, n, size = self.torch, self.X.shape[0], self.batch_size
        clock = TorchClock(torch, self.device)
        order = torch.randperm(n, generator=self.generator, device=self.device)
        full = n // size * size
        for start in range(0, full, size):
            self.index.copy_(order[start : start + size])
            self.graph.replay()
        if full < n:  # the last, smaller batch: eager, into the graph's gradient tensors
            loss = torch.nn.functional.cross_entropy(self.model(self.X[order[full:]]), self.y[order[full:]])
            for p in self.model.parameters():
                p.grad.zero_()
            loss.backward()
            self.optimizer.step()
        return clock.stop()


def torch_device(device: xn.Device) -> tuple[str | None, str | None]:
    """PyTorch's device for a comparison with ``device``, or None and why not."""
    missing = available("pytorch")
    if missing:
        return None, missing
    import torch

    if device.kind == "cupy":
        if not torch.cuda.is_available():
            return None, "this PyTorch has no CUDA device"
        return f"cuda:{device.native.id}", None
    return "cpu", None


def _make(name, data, batch_size, seed, device_name, torch_target, initial, model="mlp"):
    if name == "xpnet":
        return XpnetRun(data, batch_size, seed, xn.Device(device_name), model)
    if name == "xpnet-reference":
        return XpnetRun(data, batch_size, seed, xn.Device(device_name, fast=False), model)
    cls = TorchGraphRun if name == "pytorch-graph" else TorchRun
    return cls(data, batch_size, seed, initial, device=torch_target, model=model)


def run_gpu_benchmark(
    batch_sizes=(128, 512, 4096),
    epochs=5,
    *,
    device="cuda",
    seed=0,
    implementations=IMPLEMENTATIONS,
    data=None,
    model="mlp",
    log=print,
) -> list[dict]:
    data = data if data is not None else load_dataset("mnist")
    target = xn.Device(device)
    torch_target, why = torch_device(target)
    names = []
    for name in implementations:
        reason = why if name.startswith("pytorch") else None
        if name == "pytorch-graph" and reason is None and not torch_target.startswith("cuda"):
            reason = "CUDA graphs need a GPU"
        if reason:
            log(f"{name}: skipped, {reason}")
        else:
            names.append(name)
    log(
        f"{MODELS[model]}, Adam 1e-3, {epochs} epochs on {target.describe()}; "
        f"interleaved epoch by epoch: {', '.join(names)}"
    )
    n = data.train.x.shape[0]
    rows = []
    for batch_size in batch_sizes:
        initial = initial_weights(seed, target, model)
        runs = {name: _make(name, data, batch_size, seed, device, torch_target, initial, model) for name in names}
        for name, run, seconds, times in interleave(runs, epochs, batch_size, log):
            rows.append(
                {
                    "batch_size": batch_size,
                    "implementation": name,
                    "seconds_per_epoch": seconds,
                    "ms_per_step": 1000 * seconds / math.ceil(n / batch_size),
                    "epoch_seconds": times,
                    "samples_per_second": n / seconds,
                    "test_accuracy": run.accuracy(),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"{'batch':>5}  {'implementation':<16} {'ms/step':>8} {'s/epoch':>8} {'samples/s':>11} "
        f"{'test acc':>8} {'xpnet/this':>10}"
    ]
    for batch_size in sorted({row["batch_size"] for row in rows}):
        group = {row["implementation"]: row for row in rows if row["batch_size"] == batch_size}
        mine = group.get("xpnet")
        for name, row in group.items():
            ratio = ratio_cell(mine, name, row)
            lines.append(
                f"{batch_size:>5}  {name:<16} {row['ms_per_step']:>8.3f} {row['seconds_per_epoch']:>8.3f} "
                f"{row['samples_per_second']:>11,.0f} {100 * row['test_accuracy']:>7.2f}% {ratio:>10}"
            )
    return "\n".join(lines)
