"""Devices: the one module that knows NumPy, CuPy and array-api-strict by name.

Everything the Array API standard leaves out lives here:

* resolving a device string (``cpu``, ``cuda``, ``cuda:N``, ``strict``, ``strict:device1``,
  ``strict:no_float64``, ...) to an ``xp`` namespace and a native device object;
* moving arrays between the host (NumPy) and the device, and waiting for the device;
* randomness. The standard has no random number generator, so

  - initial weights and the shuffle order are drawn on the host from seeded
    ``numpy.random.Generator`` streams and moved to the device once: one seed gives
    bit-identical weights and batch order on every backend;
  - dropout masks come from a counter-based hash computed on the device with ``xp`` integer
    operations (``uniform``): the mask of the k-th draw depends only on the seed and k, so it is
    reproducible on every backend and the same on all of them, without a host transfer.

Every other module computes through ``device.xp`` only.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

import numpy as np

__all__ = ["Device", "DeviceError", "available_devices", "get_device"]

_FLOAT_DTYPES = ("float32", "float64")
_STRICT_NAMES = ("CPU_DEVICE", "device1", "device2", "no_float64")
_U32 = 0xFFFFFFFF


class DeviceError(ValueError):
    """A device string that cannot be resolved here, with the reason in the message."""


def _mix32(x):
    """A 32-bit integer hash (Wellons' 'lowbias32'); works on Python ints and uint32 arrays."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32 if isinstance(x, int) else x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32 if isinstance(x, int) else x * 0x846CA68B
    return x ^ (x >> 16)


def _parse(name: str) -> tuple[str, str | int | None]:
    """Split a device string into (kind, detail); raise DeviceError for unknown strings."""
    if not isinstance(name, str):
        raise DeviceError(f"device must be a string such as 'cpu' or 'cuda:0', got {name!r}")
    text = name.strip()
    lowered = text.lower()
    if lowered in ("cpu", "numpy"):
        return "numpy", None
    match = re.fullmatch(r"cuda(?::(\d+))?", lowered)
    if match:
        return "cupy", int(match.group(1) or 0)
    if lowered == "strict":
        return "strict", "CPU_DEVICE"
    if lowered.startswith("strict:"):
        detail = text.split(":", 1)[1]
        if detail in _STRICT_NAMES:
            return "strict", detail
        raise DeviceError(
            f"unknown array-api-strict device {detail!r} in {name!r}; choose one of: {', '.join(_STRICT_NAMES)}"
        )
    raise DeviceError(
        f"unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N', 'strict', 'strict:device1' or 'strict:no_float64'"
    )


def _load_cupy(index: int):
    try:
        import cupy
    except ImportError as exc:
        raise DeviceError(
            "device 'cuda' needs CuPy, which is not installed: "
            "pip install 'xpnet[cuda12]' (CUDA 12) or 'xpnet[cuda13]' (CUDA 13)"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver, among others
        raise DeviceError(f"device 'cuda' is not usable: no CUDA driver or GPU found ({exc})") from exc
    if count == 0:
        raise DeviceError("device 'cuda' is not usable: CUDA reports no GPU")
    if index >= count:
        raise DeviceError(
            f"device 'cuda:{index}' does not exist: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
        )
    return cupy


def _load_strict(detail: str):
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


class Device:
    """A backend and a device on it, with the run's seeded random streams.

    ``Device("cpu", seed=0)`` computes with NumPy, ``Device("cuda:1")`` with CuPy on the
    second GPU, ``Device("strict:device1")`` with array-api-strict on its non-default device
    (a stand-in for an accelerator: it refuses host conversions and mixing devices).
    """

    def __init__(self, name: str = "cpu", *, seed: int = 0, fast: bool | None = None):
        self.kind, detail = _parse(name)
        if self.kind == "numpy":
            import array_api_compat.numpy

            self.xp = array_api_compat.numpy
            self.native = "cpu"
            self.name = "cpu"
        elif self.kind == "cupy":
            self._cupy = _load_cupy(detail)
            import array_api_compat.cupy

            self.xp = array_api_compat.cupy
            self.native = self._cupy.cuda.Device(detail)
            self.name = f"cuda:{detail}"
        else:
            self.xp, self.native = _load_strict(detail)
            self.name = "strict" if detail == "CPU_DEVICE" else f"strict:{detail}"
        self.seed(seed)
        if fast is None:
            fast = os.environ.get("XPNET_FAST", "1") != "0"
        #: Backend-specific fast paths (None: the Array API reference code runs everywhere).
        self.fast = None
        if fast and self.kind == "numpy":
            from ._fast_numpy import NumpyFastPaths

            self.fast = NumpyFastPaths()
        elif fast and self.kind == "cupy":
            from ._fast_cupy import CupyFastPaths

            with self.native:
                self.fast = CupyFastPaths(self._cupy)

    def __repr__(self) -> str:
        return f"Device({self.name!r})"

    def __enter__(self) -> Device:
        """Make this the current device: CuPy creates new arrays on the current GPU whatever
        ``device=`` says, so the model, losses and training loop run their code inside this."""
        if self.kind == "cupy":
            self.native.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cupy":
            self.native.__exit__(*exc)

    def describe(self) -> str:
        """One line about the device: library version, and for a GPU its name and memory."""
        if self.kind == "numpy":
            if self.fast is None:
                paths = "Array API code only (fast paths off)"
            else:
                paths = "fast paths on, Adam " + ("compiled" if self.fast.native is not None else "in NumPy passes")
                if self.fast.threads > 1:
                    paths += f"; OpenBLAS and the kernels on one pool of {self.fast.threads} threads"
            return f"NumPy {np.__version__} on the CPU; {paths}"
        if self.kind == "cupy":
            cupy = self._cupy
            props = cupy.cuda.runtime.getDeviceProperties(self.native.id)
            free, total = self.native.mem_info
            pool = cupy.get_default_memory_pool()
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            return (
                f"{name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); CuPy {cupy.__version__}, "
                f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}; "
                f"memory pool {pool.used_bytes() / 2**20:.1f} MiB used of {pool.total_bytes() / 2**20:.1f} MiB held; "
                + ("fused CUDA kernels on" if self.fast is not None else "Array API code only (fast paths off)")
            )
        return f"array-api-strict {self.xp.__version__}, device {self.native} (a test stand-in)"

    def stopwatch(self) -> Stopwatch:
        """A started stopwatch on this device's clock: ``.stop()`` returns the seconds since."""
        return Stopwatch(self)

    # ----------------------------------------------------------------- dtypes
    @property
    def supports_float64(self) -> bool:
        return not (self.kind == "strict" and self.native == self.xp.Device("no_float64"))

    def dtype(self, name: Any, *, floating: bool = True):
        """The namespace's dtype for a name ('float32', 'float64', 'int64', ...) or a dtype.

        With ``floating`` (the default) only float32 and float64 are accepted.
        """
        text = name if isinstance(name, str) else dtype_name(name)
        if floating and text not in _FLOAT_DTYPES:
            raise ValueError(f"unsupported dtype {name!r}; use 'float32' or 'float64'")
        if text == "float64" and not self.supports_float64:
            raise ValueError(f"device {self.name!r} does not support float64; use float32")
        if not hasattr(self.xp, text):
            raise ValueError(f"unknown dtype {name!r}")
        return getattr(self.xp, text)

    # ------------------------------------------------------- moving arrays
    def _owns(self, a) -> bool:
        if self.kind == "numpy":
            return isinstance(a, np.ndarray)
        if self.kind == "cupy":
            return isinstance(a, self._cupy.ndarray) and a.device.id == self.native.id
        return isinstance(a, _strict_array_type()) and a.device == self.native

    def to_device(self, a, dtype=None, *, copy: bool = False):
        """Move ``a`` (NumPy array, list, or any backend's array) here, cast to ``dtype``.

        Arrays already on this device are cast (and copied when asked) in place of a transfer.
        """
        with self:
            return self._to_device(a, dtype, copy)

    def _to_device(self, a, dtype, copy):
        xp = self.xp
        target = None if dtype is None else self.dtype(dtype, floating=False)
        if self._owns(a):
            if target is not None and a.dtype != target:
                return xp.astype(a, target)
            return xp.asarray(a, copy=True) if copy else a
        host = self.to_host(a)
        if target is not None:
            host = host.astype(dtype_name(target), copy=False)
        if self.kind == "numpy":
            return np.array(host, copy=True) if copy else host
        if self.kind == "cupy":
            return self._cupy.asarray(host)
        if host.dtype == np.float64 and not self.supports_float64:
            raise ValueError(f"device {self.name!r} does not support float64; pass dtype='float32'")
        return xp.asarray(host, device=self.native)

    def to_device_targets(self, y, float_dtype, *, class_labels: bool = True):
        """Targets to the device: integer class labels as int64 (with ``class_labels``), anything
        else in ``float_dtype``."""
        host_kind = np.dtype(dtype_name(y.dtype)).kind if hasattr(y, "dtype") else np.asarray(y).dtype.kind
        return self.to_device(y, "int64" if class_labels and host_kind in "iu" else float_dtype)

    def to_host(self, x) -> np.ndarray:
        """A NumPy copy (or view) of any backend's array. Forces a sync on a GPU: not per batch."""
        if isinstance(x, np.ndarray):
            return x
        if _is_cupy_array(x):
            return x.get()
        if isinstance(x, _strict_array_type()):
            import array_api_strict

            return np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))
        return np.asarray(x)

    def item(self, x) -> float:
        """A 0-d device array as a Python float (one host read)."""
        return float(self.to_host(x))

    def sync(self) -> None:
        """Wait until the device has finished all queued work (a no-op on the CPU)."""
        if self.kind == "cupy":
            self.native.synchronize()

    # ------------------------------------------------------------ randomness
    def seed(self, seed: int) -> None:
        """Restart the three random streams (initial weights, shuffling, dropout) from ``seed``."""
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        init, shuffle, dropout = np.random.SeedSequence(seed).spawn(3)
        self._init_rng = np.random.Generator(np.random.PCG64(init))
        self._shuffle_rng = np.random.Generator(np.random.PCG64(shuffle))
        self._dropout_key = [int(k) for k in dropout.generate_state(2, np.uint32)]
        self._dropout_counter = 0

    def normal(self, shape, std: float, dtype):
        """N(0, std²) draws made on the host and moved once, identical on every backend."""
        draws = self._init_rng.standard_normal(shape) * std
        return self.to_device(draws, dtype)

    def uniform(self, shape, low: float, high: float, dtype):
        """U(low, high) draws made on the host and moved once, identical on every backend."""
        draws = self._init_rng.uniform(low, high, size=shape)
        return self.to_device(draws, dtype)

    def host_permutation(self, n: int) -> np.ndarray:
        """A permutation of range(n) from the shuffle stream, on the host (for splits)."""
        return self._shuffle_rng.permutation(n)

    def permutation(self, n: int):
        """A permutation of range(n) from the shuffle stream, moved to the device (batch order)."""
        return self.to_device(self.host_permutation(n))

    def random(self, shape, dtype):
        """Uniform [0, 1) numbers computed on the device by a counter-based hash.

        Draw k of a run hashes (seed, k, element index): the same numbers on NumPy, CuPy and
        array-api-strict, with no host transfer. Used for dropout masks.
        """
        xp = self.xp
        k0, k1 = self._dropout_key
        key = _mix32(k0 ^ _mix32((self._dropout_counter * 0x9E3779B9 + k1) & _U32))
        self._dropout_counter += 1
        n = math.prod(shape)
        bits = xp.arange(n, dtype=xp.uint32, device=self.native) * 0x9E3779B9
        bits = _mix32(_mix32(bits ^ key) ^ k1)
        # The top 24 bits give floats k / 2**24 exactly representable in float32.
        u = xp.astype(bits >> 8, self.dtype(dtype))
        return xp.reshape(u * (1.0 / 16777216.0), tuple(shape))

    def rng_state(self) -> dict:
        """The random streams' state, JSON-serializable, for checkpoints and exact resumes."""
        return {
            "init": self._init_rng.bit_generator.state,
            "shuffle": self._shuffle_rng.bit_generator.state,
            "dropout_key": list(self._dropout_key),
            "dropout_counter": self._dropout_counter,
        }

    def set_rng_state(self, state: dict) -> None:
        self._init_rng.bit_generator.state = state["init"]
        self._shuffle_rng.bit_generator.state = state["shuffle"]
        self._dropout_key = [int(k) for k in state["dropout_key"]]
        self._dropout_counter = int(state["dropout_counter"])


class Stopwatch:
    """Device time between its creation and ``stop()``: CUDA events recorded on the current
    stream on a GPU (no sync until ``stop``), the host clock after a sync elsewhere."""

    def __init__(self, device: Device):
        self.device = device
        self._events = None
        if device.kind == "cupy":
            with device:
                self._events = (device._cupy.cuda.Event(), device._cupy.cuda.Event())
                self._events[0].record()
        self._started = time.perf_counter()

    def stop(self) -> float:
        if self._events is None:
            self.device.sync()
            return time.perf_counter() - self._started
        start, end = self._events
        with self.device:
            end.record()
            end.synchronize()
        return self.device._cupy.cuda.get_elapsed_time(start, end) / 1000


def get_device(device: Device | str, *, seed: int | None = None) -> Device:
    """A new Device for a device string (seed 0 by default), or ``device`` itself, reseeded when
    ``seed`` is given."""
    if not isinstance(device, Device):
        return Device(device, seed=0 if seed is None else seed)
    if seed is not None:
        device.seed(seed)
    return device


def available_devices() -> list[str]:
    """The device strings that resolve on this machine."""
    names = ["cpu"]
    try:
        import cupy

        names += [f"cuda:{i}" for i in range(cupy.cuda.runtime.getDeviceCount())]
    except Exception:  # no CuPy, no driver: no CUDA devices
        pass
    for name in ("strict", "strict:device1", "strict:no_float64"):
        try:
            _load_strict(_parse(name)[1])
        except DeviceError:
            continue
        names.append(name)
    return names


def dtype_name(dtype) -> str:
    """The plain name of a dtype of any backend: "float32", "int64", ..."""
    try:
        return np.dtype(dtype).name
    except TypeError:  # array-api-strict's dtypes print as 'array_api_strict.float32'
        return str(dtype).rsplit(".", 1)[-1]


def _strict_array_type():
    try:
        from array_api_strict._array_object import Array
    except ImportError:  # array-api-strict not installed: nothing is a strict array
        return ()
    return Array


def _is_cupy_array(x) -> bool:
    return type(x).__module__.startswith("cupy")
