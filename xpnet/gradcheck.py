"""Gradient checking: backpropagation against central differences, in float64.

For each checked entry θ_k of a parameter (and of the input),
    ∂L/∂θ_k ≈ (L(θ + ε e_k) − L(θ − ε e_k)) / 2ε,
with an error of order ε² from the Taylor series. Per parameter, the report gives
    relative error = ‖g_backprop − g_numeric‖ / (‖g_backprop‖ + ‖g_numeric‖)
over the checked entries (0 when both are zero). Correct backprop in float64 lands near 1e-9;
a wrong formula lands near 1. Dropout masks are held fixed by restoring the device's random
state before every forward pass.
"""

from __future__ import annotations

import math
import random

from .backend import dtype_name
from .losses import get_loss

__all__ = ["gradcheck", "GradcheckReport"]


class GradcheckReport:
    """Relative errors by parameter key (and ``"input"``), and how many entries were checked."""

    def __init__(self):
        self.errors: dict[str, float] = {}
        self.checked: dict[str, int] = {}

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def passed(self, tolerance: float = 1e-6) -> bool:
        return self.max_error < tolerance

    def table(self) -> str:
        rows = [f"{'parameter':<12} {'entries':>8} {'relative error':>15}"]
        rows += [f"{key:<12} {self.checked[key]:>8} {err:>15.3e}" for key, err in self.errors.items()]
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"GradcheckReport(max_error={self.max_error:.3e}, errors={self.errors})"


def _relative_error(analytic: list[float], numeric: list[float]) -> float:
    diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(analytic, numeric)))
    scale = math.sqrt(sum(a * a for a in analytic)) + math.sqrt(sum(b * b for b in numeric))
    return diff / scale if scale > 0 else 0.0


def gradcheck(
    model,
    loss,
    x,
    y,
    *,
    eps: float = 1e-5,
    max_entries: int = 256,
    training: bool = True,
    check_input: bool = True,
    seed: int = 0,
) -> GradcheckReport:
    """Compare ``model.backward`` with central differences for every parameter and the input.

    The model must be float64. Parameters with more than ``max_entries`` entries are checked
    on a seeded random subset of that many entries.
    """
    if dtype_name(model.dtype) != "float64":
        raise ValueError(
            f"gradcheck needs a float64 model (got {dtype_name(model.dtype)}): build it with dtype='float64'"
        )
    loss = get_loss(loss)
    device, xp = model.device, model.xp
    X = device.to_device(x, model.dtype)
    Y = device.to_device_targets(y, model.dtype, class_labels=loss.class_labels)
    rng_state = device.rng_state()
    chooser = random.Random(seed)

    def loss_of(inputs) -> float:
        device.set_rng_state(rng_state)
        return device.item(loss.value(model.forward(inputs, training=training), Y))

    with device:  # layer state (running statistics) as it is now: the probes' passes must not move it
        kept_state = {key: xp.asarray(a, copy=True) for key, a in model.named_state().items()}
    model.forget_pass()  # a training pass of the caller's, pending: this backward is not its
    device.set_rng_state(rng_state)
    with device:
        _, delta = loss.value_and_grad(model.forward(X, training=training), Y)
        dx = model.backward(delta, input_grad=True)
    # copies: the gradients may live in the store's arrays, which later passes reuse
    analytic = {key: device.to_host(xp.asarray(g, copy=True)) for key, g in model.named_gradients().items()}
    if check_input:
        analytic["input"] = device.to_host(dx)

    def probe(key, original, assign):
        """Numeric derivatives of L at a subset of entries of ``original``, put back by assign."""
        shape, size = tuple(original.shape), math.prod(original.shape)
        entries = range(size) if size <= max_entries else sorted(chooser.sample(range(size), max_entries))
        flat_index = xp.arange(size, device=device.native)
        numeric, expected = [], []
        for k in entries:
            basis = xp.reshape(xp.astype(flat_index == k, model.dtype), shape)
            f_plus = assign(original + eps * basis)
            f_minus = assign(original - eps * basis)
            numeric.append((f_plus - f_minus) / (2.0 * eps))
            expected.append(float(analytic[key].reshape(-1)[k]))
        assign(original)
        report.errors[key] = _relative_error(expected, numeric)
        report.checked[key] = len(numeric)

    report = GradcheckReport()
    with device:
        for key, layer, name in model.parameter_slots():

            def assign(value, layer=layer, name=name):
                layer.params[name] = value
                return loss_of(X)

            probe(key, xp.asarray(layer.params[name], copy=True), assign)  # a copy: assigning may write in place
        if check_input:
            probe("input", X, loss_of)
    device.set_rng_state(rng_state)
    model.forget_pass()  # the probes' training passes have no backward
    if kept_state:
        model.load_state_dict({**model.named_parameters(), **kept_state})
    return report
