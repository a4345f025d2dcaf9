"""array-api-strict, the standard's reference library: ``strict`` (its CPU device),
``strict:device1`` (a second device that refuses host conversions and device mixing: a
stand-in for a GPU) and ``strict:no_float64`` (refuses float64)."""

from __future__ import annotations

import sys

import numpy as np

from .base import Backend, DeviceError

_NAMES = ("CPU_DEVICE", "device1", "device2", "no_float64")


def _load(detail: str):
    try:
        import array_api_strict
    except ImportError as exc:
        raise DeviceError("the strict devices need array-api-strict: pip install 'array-api-strict>=2.6'") from exc
    try:
        return array_api_strict, array_api_strict.Device(detail)
    except ValueError as exc:  # older releases lack some devices (no_float64 came in 2.6)
        raise DeviceError(
            f"array-api-strict {array_api_strict.__version__} has no device {detail!r}: "
            "pip install 'array-api-strict>=2.6'"
        ) from exc


class StrictBackend(Backend):
    kind = "strict"
    forms = ("'strict'", "'strict:device1'", "'strict:no_float64'")

    def __init__(self, detail: str):
        self.xp, self.native = _load(detail)
        self.name = "strict" if detail == "CPU_DEVICE" else f"strict:{detail}"

    @classmethod
    def claims(cls, text):
        lowered = text.lower()
        if lowered == "strict":
            return "CPU_DEVICE"
        if not lowered.startswith("strict:"):
            return None
        detail = text.split(":", 1)[1]
        if detail not in _NAMES:
            raise DeviceError(
                f"unknown array-api-strict device {detail!r} in {text!r}; choose one of: {', '.join(_NAMES)}"
            )
        return detail

    @classmethod
    def available(cls):
        names = []
        for name, detail in (
            ("strict", "CPU_DEVICE"),
            ("strict:device1", "device1"),
            ("strict:no_float64", "no_float64"),
        ):
            try:
                _load(detail)
            except DeviceError:
                continue
            names.append(name)
        return names

    @classmethod
    def _array_type(cls):
        module = sys.modules.get("array_api_strict._array_object")
        return getattr(module, "Array", None)

    @classmethod
    def is_array(cls, x):
        array = cls._array_type()
        return array is not None and isinstance(x, array)

    def owns(self, a):
        return self.is_array(a) and a.device == self.native

    @property
    def supports_float64(self):
        return self.native != self.xp.Device("no_float64")

    def from_host(self, host, copy):
        if host.dtype == np.float64 and not self.supports_float64:
            raise ValueError(f"device {self.name!r} does not support float64; pass dtype='float32'")
        return self.xp.asarray(host, device=self.native)

    @classmethod
    def host_copy(cls, x):
        import array_api_strict

        return np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))

    def describe(self, fast):
        return f"array-api-strict {self.xp.__version__}, device {self.native} (a test stand-in)"
