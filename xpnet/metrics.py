"""Metrics counted on the device, batch by batch, and read to the host once per epoch.

``count(output, target)`` returns (number correct, as a 0-d device array or an int, number
judged). Accuracy counts through ``Ops.count_correct``, which a backend may fuse into one pass.
Metrics are found by name in the metric registry (``fit(..., metrics=["accuracy"])``); one of
your own joins it with ``@xpnet.register_metric``.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace

from .ops import ops_for
from .registry import Registry

__all__ = [
    "Metric",
    "Accuracy",
    "BinaryAccuracy",
    "get_metric",
    "default_metrics",
    "metric_registry",
    "register_metric",
]


class Metric:
    name = "metric"

    def count(self, output, target):
        raise NotImplementedError


#: Metric classes by name (``get_metric``); a class is registered under its own ``name``
#: attribute when it sets one, else under its class name.
metric_registry = Registry("metric", Metric, default_name=lambda cls: cls.__dict__.get("name") or cls.__name__)


def register_metric(cls=None, *, name: str | None = None):
    """Register a Metric subclass under ``name`` (by default the ``name`` the class sets, else its
    class name), so that ``fit(..., metrics=[name])`` finds it. Returns the class unchanged; a
    different class under a taken name is refused (ValueError naming both)."""
    return metric_registry.register(cls, name=name)


@register_metric
class Accuracy(Metric):
    """Fraction of examples whose largest output is the true class (labels or one-hot rows)."""

    name = "accuracy"

    def count(self, output, target):
        """(correct, judged): argmax(output) == label, through ``Ops.count_correct``."""
        ops = ops_for(output)
        labels = target if target.ndim == 1 else ops.xp.argmax(target, axis=1)
        return ops.count_correct(output, labels), output.shape[0]


@register_metric
class BinaryAccuracy(Metric):
    """Fraction of outputs on the right side of the threshold: logits > 0 ⇔ σ(z) > 0.5.

    Use ``threshold=0.5`` for a model that ends in Sigmoid.
    """

    name = "binary_accuracy"

    def __init__(self, threshold: float = 0.0):
        self.threshold = float(threshold)

    def count(self, output, target):
        xp = array_namespace(output, target)
        target = xp.reshape(target, output.shape)
        truth = target > 0 if xp.isdtype(target.dtype, "integral") else target > 0.5
        return xp.count_nonzero((output > self.threshold) == truth), math.prod(output.shape)


def get_metric(name_or_metric) -> Metric:
    """A metric by its registered name, made with no arguments, or a Metric instance as it is."""
    if isinstance(name_or_metric, Metric):
        return name_or_metric
    return metric_registry.lookup(name_or_metric)()


def default_metrics(loss) -> list[Metric]:
    """Accuracy for softmax cross-entropy, binary accuracy for BCE, none for regression."""
    return {
        "softmax_cross_entropy": [Accuracy()],
        "binary_cross_entropy": [BinaryAccuracy()],
    }.get(loss.name, [])
