"""CPU/device parity: the same seeded network on the CPU (NumPy) and on another device.

Same initial weights, batch order and dropout masks (drawn as the backend module draws them), so
every difference is arithmetic. Checks, with TF32 off:
  * every layer's forward and backward on random inputs (float32 ≤ 1e-5, float64 ≤ 1e-12);
  * the parameters after 10 SGD and 10 Adam steps (≤ 1e-4);
  * one epoch of MNIST: the training loss (within 1e-3) and test accuracy (within 0.3 points).
Each check reports its difference against its tolerance: for arrays the largest relative one,
max|a − b| / max|b|; for the MNIST loss an absolute one, for accuracy one in points.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

import xpnet as xn


@dataclasses.dataclass
class Check:
    name: str
    difference: float
    tolerance: float
    unit: str = "relative"

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.difference)) and self.difference <= self.tolerance


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a - b), initial=0.0))


ROWS, IMAGES = (8, 6), (8, 2, 6, 6)
#: Each layer checked: the layers of a small model (after a Dense or a Conv2D that feeds it) and
#: the input's shape.
LAYERS = {
    "Dense": (lambda: [xn.Dense(6, 5)], ROWS),
    "ReLU": (lambda: [xn.Dense(6, 5), xn.ReLU()], ROWS),
    "LeakyReLU": (lambda: [xn.Dense(6, 5), xn.LeakyReLU(0.1)], ROWS),
    "Sigmoid": (lambda: [xn.Dense(6, 5), xn.Sigmoid()], ROWS),
    "Tanh": (lambda: [xn.Dense(6, 5), xn.Tanh()], ROWS),
    "Softmax": (lambda: [xn.Dense(6, 5), xn.Softmax()], ROWS),
    "Dropout": (lambda: [xn.Dense(6, 5), xn.Dropout(0.3)], ROWS),
    "Flatten": (lambda: [xn.Flatten(), xn.Dense(6, 5)], (8, 2, 3)),
    "Conv2D": (lambda: [xn.Conv2D(2, 3, 3, padding=1), xn.Conv2D(3, 2, 3, stride=2)], IMAGES),
    "MaxPool2D": (lambda: [xn.Conv2D(2, 3, 1), xn.MaxPool2D(2)], IMAGES),
    "AvgPool2D": (lambda: [xn.Conv2D(2, 3, 1), xn.AvgPool2D(3, 2)], IMAGES),
    "BatchNorm": (lambda: [xn.Conv2D(2, 3, 3, bias=False), xn.BatchNorm(3)], IMAGES),
    "Residual": (lambda: [xn.Residual([xn.Conv2D(2, 2, 3, padding="same"), xn.ReLU()])], IMAGES),
}


def _host(model, x):
    return model.device.to_host(x)


def layer_checks(device: str, dtype: str, seed: int) -> list[Check]:
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    rng = np.random.default_rng(seed)
    checks = []
    for name, (make, shape) in LAYERS.items():
        x = rng.normal(size=shape)
        dy = None
        results = []
        for where in ("cpu", device):
            model = xn.Sequential(make(), device=where, dtype=dtype, seed=seed)
            out = model.forward(model.device.to_device(x, dtype), training=True)
            if dy is None:  # δ of the output's shape, drawn once for both devices
                dy = rng.normal(size=tuple(out.shape))
            dx = model.backward(model.device.to_device(dy, dtype), input_grad=True)
            grads = {k: _host(model, g) for k, g in model.named_gradients().items()}
            results.append((_host(model, out), _host(model, dx), grads))
        (out_a, dx_a, g_a), (out_b, dx_b, g_b) = results
        backward = max([relative(dx_b, dx_a)] + [relative(g_b[k], g_a[k]) for k in g_a])
        checks.append(Check(f"{name} forward ({dtype})", relative(out_b, out_a), tolerance))
        checks.append(Check(f"{name} backward ({dtype})", backward, tolerance))
    return checks


def optimizer_checks(device: str, seed: int) -> list[Check]:
    rng = np.random.default_rng(seed)
    batches = [(rng.normal(size=(32, 20)).astype(np.float32), rng.integers(0, 4, 32)) for _ in range(10)]
    checks = []
    for name, make in (("10 SGD steps", lambda: xn.SGD(0.1)), ("10 Adam steps", lambda: xn.Adam(0.01))):
        params = []
        for where in ("cpu", device):
            model = xn.mlp(20, [16, 8], 4, device=where, seed=seed)
            optimizer = make()
            loss = xn.SoftmaxCrossEntropy()
            for x, y in batches:
                out = model.forward(model.device.to_device(x, "float32"), training=True)
                _, delta = loss.value_and_grad(out, model.device.to_device(y))
                model.backward(delta)
                optimizer.step(model)
            params.append({k: _host(model, p) for k, p in model.named_parameters().items()})
        checks.append(
            Check(f"parameters after {name}", max(relative(params[1][k], params[0][k]) for k in params[0]), 1e-4)
        )
    return checks


def mnist_checks(device: str, seed: int) -> list[Check]:
    from xpnet.data import load_dataset

    data = load_dataset("mnist")
    results = []
    for where in ("cpu", device):
        model = xn.mlp(784, [128, 64], 10, dropout=0.1, device=where, seed=seed)
        history = xn.fit(model, "cross_entropy", xn.Adam(1e-3), data.train.x, data.train.y, epochs=1, batch_size=128)
        test = xn.evaluate(model, "cross_entropy", data.test.x, data.test.y)
        results.append((history["loss"][0], test["accuracy"]))
    (loss_a, acc_a), (loss_b, acc_b) = results
    return [
        Check("MNIST training loss after 1 epoch", abs(loss_b - loss_a), 1e-3, "absolute"),
        Check("MNIST test accuracy after 1 epoch (points)", 100 * abs(acc_b - acc_a), 0.3, "points"),
    ]


def full_float32() -> None:
    """TF32 off, before CuPy or cuBLAS start: CuPy's own switch (off by default) and NVIDIA's
    override for every CUDA library."""
    os.environ["CUPY_TF32"] = "0"
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"


def run_parity(device: str, *, seed: int = 0, mnist: bool = True) -> list[Check]:
    full_float32()
    target = xn.Device(device)
    checks = layer_checks(device, "float32", seed)
    if target.supports_float64:
        checks += layer_checks(device, "float64", seed)
    checks += optimizer_checks(device, seed)
    if mnist:
        checks += mnist_checks(device, seed)
    return checks


def table(checks: list[Check], device: str) -> str:
    lines = [f"parity: cpu against {device}", f"{'check':<48} {'difference':>12} {'kind':<9} {'tolerance':>9}  result"]
    for check in checks:
        verdict = "ok" if check.passed else "FAILED"
        lines.append(f"{check.name:<48} {check.difference:>12.3e} {check.unit:<9} {check.tolerance:>9.0e}  {verdict}")
    failed = sum(not c.passed for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks passed")
    return "\n".join(lines)
