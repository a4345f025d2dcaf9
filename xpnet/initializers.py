"""Initial weights: He and Xavier/Glorot, normal and uniform; zero biases.

A weight matrix is shaped (fan_out, fan_in) — one row per neuron — and any trailing axes
(a convolution's kernel) multiply both fans. Values are drawn on the host by the device's seeded
stream and moved once, so one seed gives the same weights on every backend.

* He (Kaiming) for ReLU-like units keeps Var(z) constant through the layers: Var(W) = 2 / fan_in.
  Normal: std = √(2 / fan_in); uniform: limit = √(6 / fan_in).
* Xavier (Glorot) for tanh / sigmoid / linear units balances forward and backward variance:
  Var(W) = 2 / (fan_in + fan_out). Normal: std = √(2 / (fan_in + fan_out));
  uniform: limit = √(6 / (fan_in + fan_out)).
"""

from __future__ import annotations

import math


def _fans(shape) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"weight initializers need a shape of 2 or more axes, got {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def he_normal(device, shape, dtype):
    fan_in, _ = _fans(shape)
    return device.normal(shape, math.sqrt(2.0 / fan_in), dtype)


def he_uniform(device, shape, dtype):
    fan_in, _ = _fans(shape)
    limit = math.sqrt(6.0 / fan_in)
    return device.uniform(shape, -limit, limit, dtype)


def xavier_normal(device, shape, dtype):
    fan_in, fan_out = _fans(shape)
    return device.normal(shape, math.sqrt(2.0 / (fan_in + fan_out)), dtype)


def xavier_uniform(device, shape, dtype):
    fan_in, fan_out = _fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return device.uniform(shape, -limit, limit, dtype)


def zeros(device, shape, dtype):
    return device.xp.zeros(shape, dtype=dtype, device=device.native)


INITIALIZERS = {
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "xavier_normal": xavier_normal,
    "xavier_uniform": xavier_uniform,
    "glorot_normal": xavier_normal,
    "glorot_uniform": xavier_uniform,
    "zeros": zeros,
}


def get_initializer(name_or_fn):
    """An initializer by name ('he_normal', 'xavier_uniform', ...) or a callable as it is."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return INITIALIZERS[name_or_fn]
    except KeyError:
        raise ValueError(
            f"unknown initializer {name_or_fn!r}; choose one of {', '.join(sorted(INITIALIZERS))}"
        ) from None
