"""Losses: the mean loss over a batch and its gradient with respect to the network's output.

``value_and_grad(output, target)`` returns (L, ∂L/∂output): L is a 0-d array on the device
(read it to the host only when it is reported), and the gradient has the output's shape.

Called directly, SoftmaxCrossEntropy checks that integer labels are class indices of the logits
(a read of two numbers: a host sync on a GPU); ``fit`` and ``evaluate`` check the whole target
array once with ``check_targets`` and run their batches inside ``targets_checked()``, which skips it.

Losses are found by name (``get_loss("mse")``, ``fit(model, "cross_entropy", ...)``) in the loss
registry; a loss of your own joins it with ``@xpnet.register_loss``.
"""

from __future__ import annotations

import contextlib
import math

import array_api_compat

from . import functional as F
from .ops import ops_for, trusted
from .registry import Registry

__all__ = [
    "Loss",
    "SoftmaxCrossEntropy",
    "BinaryCrossEntropy",
    "MeanSquaredError",
    "get_loss",
    "loss_registry",
    "register_loss",
]


def _like(xp, target, output):
    """Targets in the output's dtype: float64 targets never upcast a float32 network."""
    return target if target.dtype == output.dtype else xp.astype(target, output.dtype)


class Loss:
    name = "loss"
    #: Whether integer targets are class indices (kept as integers) rather than values.
    class_labels = False
    #: What the targets must be, for error messages ("y has dtype <U1 (text): ... needs <this>").
    targets_needed = "numeric targets"
    #: True inside ``targets_checked()``: the caller has checked the whole target array already.
    _targets_checked = False

    def value_and_grad(self, output, target):
        raise NotImplementedError

    def value(self, output, target):
        return self.value_and_grad(output, target)[0]

    def check_targets(self, targets, num_outputs: int) -> None:
        """Validate a whole target array once, before training (reads two numbers from it)."""

    @contextlib.contextmanager
    def targets_checked(self):
        """Within this, ``value`` and ``value_and_grad`` skip their per-call target checks: the
        caller (fit, evaluate) ran ``check_targets`` on the whole target array once, and a check
        per batch would read the device every step."""
        before = self._targets_checked
        self._targets_checked = True
        try:
            yield self
        finally:
            self._targets_checked = before

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Loss classes by name (``get_loss``); a class is registered under its own ``name`` attribute
#: when it sets one, else under its class name.
loss_registry = Registry("loss", Loss, default_name=lambda cls: cls.__dict__.get("name") or cls.__name__)


def register_loss(cls=None, *, name: str | None = None):
    """Register a Loss subclass under ``name`` (by default the ``name`` the class sets, else its
    class name), so that ``get_loss`` and ``fit(model, name, ...)`` find it: ``@xpnet.register_loss``
    or ``@xpnet.register_loss(name="...")``. Returns the class unchanged; a different class under a
    taken name is refused (ValueError naming both), the same class again does nothing."""
    return loss_registry.register(cls, name=name)


@register_loss
class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of softmax(z) against the true classes, from the logits z.

    With p = softmax(z) and integer labels c:  L = −(1/B) Σ_i log p_{i, c_i}
    computed as log-sum-exp(z_i) − z_{i, c_i} (never log of a rounded-to-zero p).
    The gradient fuses softmax and cross-entropy:  ∂L/∂z = (p − y) / B,
    where y is one-hot — subtracted through a boolean class mask, never built as a matrix.

    Targets may also be (B, C) probabilities y ≥ 0 (one-hot rows, soft labels, or rows of any
    total): L = −(1/B) Σ_i Σ_c y_ic log p_ic. Since ∂ log p_ic / ∂z_ik = [c = k] − p_ik,
        ∂L/∂z_ik = (1/B) (p_ik Σ_c y_ic − y_ik),   δ = (p · Σy − y) / B  (Σy: each row's total),
    which is (p − y)/B exactly when each row sums to 1 (bit for bit for one-hot rows, whose sum
    is exactly 1). Negative or non-finite probabilities are refused (ValueError).
    """

    name = "softmax_cross_entropy"
    class_labels = True
    targets_needed = (
        "integer class labels 0 to C-1 (np.unique(y, return_inverse=True)[1] numbers text labels) "
        "or (examples, C) probabilities"
    )

    def _check_labels(self, z, target) -> None:
        """Integer labels must index the logits' classes: checked before any compiled kernel reads
        row[label] (out of range, it would read and write outside the arrays). Probability targets
        must be finite and non-negative. (Two numbers read from the device.)"""
        if getattr(z, "ndim", None) != 2 or not hasattr(target, "dtype") or getattr(target, "ndim", None) not in (1, 2):
            return  # the shape checks that follow say what is wrong
        xp = array_api_compat.array_namespace(target)
        if target.ndim == 2:
            if xp.isdtype(target.dtype, "real floating") and target.shape[0]:
                _check_probabilities(xp, target)
            return
        if not xp.isdtype(target.dtype, "integral") or target.shape[0] == 0:
            return
        classes = z.shape[1]
        lo, hi = int(xp.min(target)), int(xp.max(target))
        if lo < 0 or hi >= classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"class label {bad} is outside 0 to {classes - 1} for logits of {classes} classes "
                f"(the labels range from {lo} to {hi})"
            )

    def _terms(self, z, target):
        xp = array_api_compat.array_namespace(z, target)
        if z.ndim != 2:
            raise ValueError(f"SoftmaxCrossEntropy expects logits of shape (B, C), got {tuple(z.shape)}")
        log_p = F.log_softmax(xp, z)
        if xp.isdtype(target.dtype, "integral"):
            if target.shape != (z.shape[0],):
                raise ValueError(
                    f"integer labels must have shape ({z.shape[0]},) for logits {tuple(z.shape)}, "
                    f"got {tuple(target.shape)}"
                )
            is_true = F.class_mask(xp, target, z.shape[1], array_api_compat.device(z))
            loss = -xp.mean(xp.sum(xp.where(is_true, log_p, 0.0), axis=1))
            return xp, loss, log_p, is_true
        if target.shape != z.shape:
            raise ValueError(
                f"probability targets must have the logits' shape {tuple(z.shape)}, got {tuple(target.shape)}"
                + ("; class labels must be an integer array" if target.ndim == 1 else "")
            )
        target = _like(xp, target, z)
        loss = -xp.mean(xp.sum(target * log_p, axis=1))
        return xp, loss, log_p, None

    def value(self, z, target):
        if not (self._targets_checked and trusted(target)):
            self._check_labels(z, target)
        return self._terms(z, target)[1]

    def check_targets(self, targets, num_outputs):
        xp = array_api_compat.array_namespace(targets)
        if math.prod(targets.shape) == 0:
            return
        if targets.ndim == 2 and xp.isdtype(targets.dtype, "real floating"):
            _check_probabilities(xp, targets)
            return
        if not xp.isdtype(targets.dtype, "integral"):
            return
        lo, hi = int(xp.min(targets)), int(xp.max(targets))
        if lo < 0 or hi >= num_outputs:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"label {bad} is out of range (class labels range from {lo} to {hi} but the model has "
                f"{num_outputs} outputs, so labels 0 to {num_outputs - 1})"
            )

    def value_and_grad(self, z, target):
        """(L, δ). Integer labels: ``Ops.softmax_cross_entropy`` (the reference in xpnet/ops.py;
        a backend may fuse it into one pass). Probabilities: δ = (p · Σy − y) / B here."""
        if not (self._targets_checked and trusted(target)):  # (fit and evaluate check theirs once)
            self._check_labels(z, target)
        ops = ops_for(z)
        if z.ndim == 2 and target.shape == (z.shape[0],) and ops.integral(target.dtype):
            return ops.softmax_cross_entropy(z, target)
        xp, loss, log_p, _ = self._terms(z, target)
        p = xp.exp(log_p)
        batch = z.shape[0]
        y = _like(xp, target, z)
        delta = p * xp.sum(y, axis=1, keepdims=True) - y  # p · 1.0 is p itself: one-hot rows give p − y exactly
        return loss, delta * (1.0 / batch)


def _check_probabilities(xp, targets) -> None:
    """ValueError unless every probability target is finite and ≥ 0 (a NaN shows in min and max)."""
    lo, hi = float(xp.min(targets)), float(xp.max(targets))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"probability targets must be finite, got values from {lo} to {hi} (NaN or infinite values)")
    if lo < 0:
        raise ValueError(f"probability targets must be non-negative, got values from {lo} to {hi}")


@register_loss
class BinaryCrossEntropy(Loss):
    """Binary cross-entropy of σ(z) against targets y ∈ [0, 1], from the logits z.

    L = mean(−y log σ(z) − (1 − y) log(1 − σ(z))) = mean(max(z, 0) − z y + log(1 + e^(−|z|))),
    the second form finite for every z. Gradient: ∂L/∂z = (σ(z) − y) / N, N the element count.
    Targets of shape (B,) are accepted for outputs of shape (B, 1).
    """

    name = "binary_cross_entropy"
    targets_needed = "0/1 targets (or probabilities in [0, 1]) shaped like the output"

    def _prepare(self, z, target):
        xp = array_api_compat.array_namespace(z, target)
        if target.shape != z.shape:
            if target.ndim == 1 and z.shape == (target.shape[0], 1):
                target = xp.reshape(target, z.shape)
            else:
                raise ValueError(
                    f"BinaryCrossEntropy target shape {tuple(target.shape)} does not match output {tuple(z.shape)}"
                )
        return xp, _like(xp, target, z)

    def check_targets(self, targets, num_outputs):
        xp = array_api_compat.array_namespace(targets)
        if math.prod(targets.shape) == 0:
            return
        lo, hi = float(xp.min(targets)), float(xp.max(targets))
        if lo < 0 or hi > 1:
            raise ValueError(f"binary targets must lie in [0, 1], got values from {lo} to {hi}")

    def value(self, z, target):
        xp, y = self._prepare(z, target)
        return xp.mean(xp.maximum(z, 0.0) - z * y + xp.log1p(xp.exp(-xp.abs(z))))

    def value_and_grad(self, z, target):
        xp, y = self._prepare(z, target)
        loss = self.value(z, y)
        return loss, (F.sigmoid(xp, z) - y) * (1.0 / math.prod(z.shape))


@register_loss
class MeanSquaredError(Loss):
    """The quadratic cost: L = mean((a − y)²) over all elements; ∂L/∂a = 2 (a − y) / N."""

    name = "mean_squared_error"
    targets_needed = "numbers (a float array shaped like the output)"

    def value_and_grad(self, a, target):
        xp = array_api_compat.array_namespace(a, target)
        if target.shape != a.shape:
            raise ValueError(
                f"MeanSquaredError target shape {tuple(target.shape)} does not match output {tuple(a.shape)}"
            )
        diff = a - _like(xp, target, a)
        return xp.mean(diff * diff), diff * (2.0 / math.prod(a.shape))


register_loss(SoftmaxCrossEntropy, name="cross_entropy")
register_loss(BinaryCrossEntropy, name="bce")
register_loss(MeanSquaredError, name="mse")


def get_loss(name_or_loss) -> Loss:
    """A loss by its registered name ('cross_entropy', 'bce', 'mse', or one of your own), made
    with no arguments, or a Loss instance as it is."""
    if isinstance(name_or_loss, Loss):
        return name_or_loss
    return loss_registry.lookup(name_or_loss)()
