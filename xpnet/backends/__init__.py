"""Backends: one class per array library, the only code that names NumPy, CuPy, array-api-strict
or PyTorch.

A device string is offered to each backend class in turn (``claims``); the first that claims it
is built with the detail it parsed (``cuda:1`` → CupyBackend(1)). A backend gives the rest of
xpnet an ``xp`` namespace and a native device, moves arrays between the host (NumPy) and the
device, waits for the device, times it, and hands out its fast paths (or None: then the Array
API reference code runs). Nothing outside this package and ``xpnet.backend`` branches on which
library is underneath.
"""

from __future__ import annotations

from .base import Backend, DeviceError
from .cupy import CupyBackend
from .numpy import NumpyBackend
from .strict import StrictBackend
from .torch import TorchBackend

__all__ = ["Backend", "DeviceError", "BACKENDS", "resolve", "array_backend", "available_names"]

#: Every backend, in the order device strings are offered to them.
BACKENDS: tuple[type[Backend], ...] = (NumpyBackend, CupyBackend, StrictBackend, TorchBackend)


def resolve(name) -> Backend:
    """The backend a device string names, built (its library imported); DeviceError otherwise."""
    if not isinstance(name, str):
        raise DeviceError(f"device must be a string such as 'cpu' or 'cuda:0', got {name!r}")
    text = name.strip()
    for backend in BACKENDS:
        claimed = backend.claims(text)
        if claimed is not None:
            return backend(claimed)
    forms = ", ".join(form for backend in BACKENDS for form in backend.forms)
    raise DeviceError(f"unknown device {name!r}; use {forms}")


def array_backend(x) -> type[Backend] | None:
    """The backend class whose arrays ``x`` is one of (None for anything else: lists, scalars).
    Only libraries already imported are asked: looking never imports one."""
    for backend in BACKENDS:
        if backend.is_array(x):
            return backend
    return None


def available_names() -> list[str]:
    """The device strings that resolve on this machine."""
    return [name for backend in BACKENDS for name in backend.available()]
