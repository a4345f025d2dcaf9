"""What every backend provides; the defaults suit a CPU library with no fast paths."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["Backend", "DeviceError"]


class DeviceError(ValueError):
    """A device string that cannot be resolved here, with the reason in the message."""


class Backend:
    """One array library on one device.

    Subclasses set ``kind`` (a short name), ``forms`` (the device strings they take, for messages),
    and in ``__init__`` ``xp`` (the array-api-compat namespace), ``native`` (the library's device
    object) and ``name`` (the canonical device string).
    """

    kind = "?"
    forms: tuple[str, ...] = ()
    xp = None
    native = None
    name = "?"

    # ------------------------------------------------------------ resolving
    @classmethod
    def claims(cls, text: str):
        """The detail this backend parses from device string ``text`` (an index, a device name),
        True when it takes the string with no detail, or None when the string is not its own.
        Raises DeviceError for a string of its own that is malformed."""
        raise NotImplementedError

    @classmethod
    def available(cls) -> list[str]:
        """The device strings of this backend that resolve here (none if the library is missing)."""
        return []

    @classmethod
    def is_array(cls, x) -> bool:
        """Whether ``x`` is an array of this library (without importing it)."""
        raise NotImplementedError

    # ------------------------------------------------------------- arrays
    def owns(self, a) -> bool:
        """Whether ``a`` is an array of this library on this device."""
        raise NotImplementedError

    def from_host(self, host: np.ndarray, copy: bool):
        """A NumPy array as an array on this device (a copy, or ``host`` itself where it may be)."""
        raise NotImplementedError

    @classmethod
    def host_copy(cls, x) -> np.ndarray:
        """A NumPy copy (or view) of one of this library's arrays, on any of its devices."""
        return np.asarray(x)

    @property
    def supports_float64(self) -> bool:
        return True

    # ------------------------------------------------------- device control
    #: Whether ``enter``/``exit`` do anything (a backend that overrides them sets this True).
    switches = False

    def enter(self) -> None:
        """Make this device current (CuPy creates arrays on the current GPU whatever ``device=`` says)."""

    def exit(self, *exc) -> None:
        pass

    def sync(self) -> None:
        """Wait until the device has finished all queued work."""

    def start_timer(self):
        """A token for ``elapsed``: device time from now (host clock after a sync, by default)."""
        self.sync()
        return time.perf_counter()

    def elapsed(self, token) -> float:
        self.sync()
        return time.perf_counter() - token

    # ------------------------------------------------------------ reporting
    def fast_paths(self):
        """This backend's fast paths (buffered and fused operations), or None."""
        return None

    def ops(self, fast):
        """The Ops this backend computes with: the Array API reference (``xpnet.ops.Ops``) by
        default; a backend with fast paths returns its subclass when ``fast`` holds them."""
        from ..ops import Ops

        return Ops(self.xp, self.native)

    def describe(self, fast) -> str:
        """One line about the device and whether ``fast`` (its fast paths, or None) are on."""
        raise NotImplementedError
