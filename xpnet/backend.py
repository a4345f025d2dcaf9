"""Devices: a backend (``xpnet.backends``: NumPy, CuPy, array-api-strict or PyTorch) with the
run's seeded random streams.

Everything the Array API standard leaves out lives here or in the backends:

* resolving a device string (``cpu``, ``cuda``, ``cuda:N``, ``strict``, ``strict:device1``,
  ``strict:no_float64``, ``torch``, ``torch:cuda:N``) to a backend: an ``xp`` namespace and a
  native device object;
* moving arrays between the host (NumPy) and the device, and waiting for the device;
* randomness. The standard has no random number generator, so

  - initial weights and the shuffle order are drawn on the host from seeded
    ``numpy.random.Generator`` streams and moved to the device once: one seed gives
    bit-identical weights and batch order on every backend;
  - dropout masks come from a counter-based hash computed on the device with ``xp`` integer
    operations (``random``): the mask of the k-th draw depends only on the seed and k, so it is
    reproducible on every backend and the same on all of them, without a host transfer.

Every other module computes through ``device.xp`` only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _random
from .backends import DeviceError, array_backend, available_names, resolve
from .checks import checked_integer

__all__ = ["Device", "DeviceError", "available_devices", "get_device"]

_FLOAT_DTYPES = ("float32", "float64")


class Device:
    """A backend and a device on it, with the run's seeded random streams.

    ``Device("cpu", seed=0)`` computes with NumPy, ``Device("cuda:1")`` with CuPy on the
    second GPU, ``Device("strict:device1")`` with array-api-strict on its non-default device
    (a stand-in for an accelerator: it refuses host conversions and mixing devices).
    """

    def __init__(self, name: str = "cpu", *, seed: int = 0, fast: bool | None = None):
        self.backend = resolve(name)
        self.kind, self.xp, self.native, self.name = (
            self.backend.kind,
            self.backend.xp,
            self.backend.native,
            self.backend.name,
        )
        #: Whether entering the device does anything (several times a step: a call saved where not).
        self._switches = self.backend.switches
        self.seed(seed)
        if fast is None:
            fast = os.environ.get("XPNET_FAST", "1") != "0"
        #: Backend-specific fast paths (None: the Array API reference code runs everywhere).
        self.fast = self.backend.fast_paths() if fast else None
        #: The primitives fit, losses and metrics compute with (xpnet.ops): the reference, or
        #: the backend's faster subclass where it has fast paths.
        self.ops = self.backend.ops(self.fast)

    def __repr__(self) -> str:
        return f"Device({self.name!r})"

    def __enter__(self) -> Device:
        """Make this the current device: CuPy creates new arrays on the current GPU whatever
        ``device=`` says, so the model, losses and training loop run their code inside this."""
        if self._switches:
            self.backend.enter()
        return self

    def __exit__(self, *exc) -> None:
        if self._switches:
            self.backend.exit(*exc)

    def describe(self) -> str:
        """One line about the device: library version, for a GPU its name and memory, and
        whether the fast paths are on."""
        return self.backend.describe(self.fast)

    def stopwatch(self) -> Stopwatch:
        """A started stopwatch on this device's clock: ``.stop()`` returns the seconds since."""
        return Stopwatch(self)

    # ----------------------------------------------------------------- dtypes
    @property
    def supports_float64(self) -> bool:
        return self.backend.supports_float64

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
    def owns(self, a) -> bool:
        """Whether ``a`` is an array of this device's library on this device."""
        return self.backend.owns(a)

    def to_device(self, a, dtype=None, *, copy: bool = False):
        """Move ``a`` (NumPy array, list, or any backend's array) here, cast to ``dtype``.

        Arrays already on this device are cast (and copied when asked) in place of a transfer.
        """
        with self:
            return self._to_device(a, dtype, copy)

    def _to_device(self, a, dtype, copy):
        xp = self.xp
        target = None if dtype is None else self.dtype(dtype, floating=False)
        if self.owns(a):
            if target is not None and a.dtype != target:
                return xp.astype(a, target)
            return xp.asarray(a, copy=True) if copy else a
        host = self.to_host(a)
        if target is not None:
            host = host.astype(dtype_name(target), copy=False)
        return self.backend.from_host(host, copy)

    def to_device_targets(self, y, float_dtype, *, class_labels: bool = True):
        """Targets to the device: integer class labels as int64 (with ``class_labels``), anything
        else in ``float_dtype``."""
        host_kind = np.dtype(dtype_name(y.dtype)).kind if hasattr(y, "dtype") else np.asarray(y).dtype.kind
        return self.to_device(y, "int64" if class_labels and host_kind in "iu" else float_dtype)

    def to_host(self, x) -> np.ndarray:
        """A NumPy copy (or view) of any backend's array. Forces a sync on a GPU: not per batch."""
        backend = array_backend(x)
        return np.asarray(x) if backend is None else backend.host_copy(x)

    def item(self, x) -> float:
        """A 0-d device array as a Python float (one host read)."""
        return float(self.to_host(x))

    def sync(self) -> None:
        """Wait until the device has finished all queued work (a no-op on the CPU)."""
        self.backend.sync()

    # ------------------------------------------------------------ randomness
    def seed(self, seed: int) -> None:
        """Restart the three random streams (initial weights, shuffling, dropout) from ``seed``, a
        non-negative integer (a NumPy integer too; not a bool, which NumPy would take as 0 or 1)."""
        value = checked_integer("seed", seed, minimum=0)
        init, shuffle, dropout = np.random.SeedSequence(value).spawn(3)
        self._init_rng = np.random.Generator(np.random.PCG64(init))
        self._shuffle_rng = np.random.Generator(np.random.PCG64(shuffle))
        self._dropout_key = [int(k) for k in dropout.generate_state(2, np.uint32)]
        self._dropout_counter = 0
        #: The row of the whole batch where the rows this process computes start: fit sets it on
        #: the ranks of a data-parallel job (``xpnet.distributed``), so that dropout draws for a
        #: rank's rows the numbers those rows have on one process.
        self.first_row = 0

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
        array-api-strict, with no host transfer. (Dropout takes its draws through ``next_draw``
        and ``Ops.dropout``, whose compiled version computes the same numbers.)
        """
        key, k1 = self.next_draw()
        return _random.uniform(self.xp, self.native, key, k1, shape, self.dtype(dtype))

    def next_draw(self) -> tuple[int, int]:
        """(key, k1) of the next draw of the dropout stream (``xpnet._random``), which it uses up.
        (``Ops.dropout`` also takes the batch's ``first_row``.)"""
        key = _random.draw_key(self._dropout_key, self._dropout_counter)
        self._dropout_counter += 1
        return key, self._dropout_key[1]

    @property
    def draws_made(self) -> int:
        """How many draws of the dropout stream have been used up."""
        return self._dropout_counter

    def skip_draws(self, count: int) -> None:
        """Use up ``count`` draws of the dropout stream unseen (a rank of a data-parallel job with
        no rows in a step keeps its stream where the other ranks' goes)."""
        self._dropout_counter += int(count)

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
        self._token = device.backend.start_timer()

    def stop(self) -> float:
        return self.device.backend.elapsed(self._token)


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
    return available_names()


def dtype_name(dtype) -> str:
    """The plain name of a dtype of any backend: "float32", "int64", ..."""
    try:
        return np.dtype(dtype).name
    except TypeError:  # array-api-strict's dtypes print as 'array_api_strict.float32'
        return str(dtype).rsplit(".", 1)[-1]


def is_device_array(x) -> bool:
    """Whether ``x`` is an array of a device library (any backend's but NumPy's host arrays)."""
    backend = array_backend(x)
    return backend is not None and backend.kind != "numpy"


def limit_threads(threads: int) -> None:
    """Compute with ``threads`` threads from now on: NumPy's OpenBLAS (and xpnet's pool of the
    compiled kernels, which takes OpenBLAS's count) and PyTorch's intra-op pool when PyTorch is
    loaded. For the ranks of a data-parallel job that share a machine's cores (``xpnet.distributed``)."""
    import sys

    from . import _cpu_threads
    from ._fast_numpy import NumpyFastPaths

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"limit_threads: the thread count must be a positive integer, got {threads!r}")
    _cpu_threads.set_blas_threads(threads, *NumpyFastPaths._blas())
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(threads)


def pack_to_host(device: Device, arrays):
    """The numbers of ``arrays`` (of one dtype, on ``device``) side by side in one new host buffer."""
    hosts = [device.to_host(a).reshape(-1) for a in arrays]
    return np.concatenate(hosts) if len(hosts) > 1 else np.array(hosts[0], copy=True)


def unpack_from_host(device: Device, host, arrays) -> None:
    """The pieces of ``host`` written back into ``arrays``, in the order ``pack_to_host`` laid them out."""
    offset = 0
    for a in arrays:
        size = int(np.prod(a.shape))
        a[...] = device.to_device(host[offset : offset + size].reshape(tuple(a.shape)), a.dtype)
        offset += size
