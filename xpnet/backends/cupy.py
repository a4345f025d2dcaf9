"""CuPy on an NVIDIA GPU: ``cuda`` (GPU 0) or ``cuda:N``."""

from __future__ import annotations

import re
import socket
import sys
import time

from ..ops import BufferedOps
from .base import Backend, DeviceError


def _load(index: int):
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


class CupyBackend(Backend):
    kind = "cupy"
    forms = ("'cuda'", "'cuda:N'")

    def __init__(self, index: int):
        self.cupy = _load(index)
        import array_api_compat.cupy

        self.xp = array_api_compat.cupy
        self.native = self.cupy.cuda.Device(index)
        self.name = f"cuda:{index}"

    @classmethod
    def claims(cls, text):
        match = re.fullmatch(r"cuda(?::(\d+))?", text.lower())
        return int(match.group(1) or 0) if match else None

    @classmethod
    def available(cls):
        try:
            import cupy

            return [f"cuda:{i}" for i in range(cupy.cuda.runtime.getDeviceCount())]
        except Exception:  # no CuPy, no driver: no CUDA devices
            return []

    @classmethod
    def is_array(cls, x):
        cupy = sys.modules.get("cupy")
        return cupy is not None and isinstance(x, cupy.ndarray)

    def owns(self, a):
        return isinstance(a, self.cupy.ndarray) and a.device.id == self.native.id

    def from_host(self, host, copy):
        return self.cupy.asarray(host)

    @classmethod
    def host_copy(cls, x):
        return x.get()

    switches = True

    def enter(self):
        self.native.__enter__()

    def exit(self, *exc):
        self.native.__exit__(*exc)

    def sync(self):
        self.native.synchronize()

    def start_timer(self):
        """CUDA events recorded on the current stream: no sync until ``elapsed``."""
        with self.native:
            events = (self.cupy.cuda.Event(), self.cupy.cuda.Event())
            events[0].record()
        return events

    def elapsed(self, token):
        start, end = token
        with self.native:
            end.record()
            end.synchronize()
        return self.cupy.cuda.get_elapsed_time(start, end) / 1000

    def fast_paths(self):
        from .._fast_cupy import CupyFastPaths

        with self.native:
            return CupyFastPaths(self.cupy)

    def ops(self, fast):
        return super().ops(fast) if fast is None else CupyOps(self.xp, self.native, fast)

    def describe(self, fast):
        cupy = self.cupy
        props = cupy.cuda.runtime.getDeviceProperties(self.native.id)
        free, total = self.native.mem_info
        pool = cupy.get_default_memory_pool()
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return (
            f"{name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); CuPy {cupy.__version__}, "
            f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}; "
            f"memory pool {pool.used_bytes() / 2**20:.1f} MiB used of {pool.total_bytes() / 2**20:.1f} MiB held; "
            + ("fused CUDA kernels on" if fast is not None else "Array API code only (fast paths off)")
        )


class CupyOps(BufferedOps):
    """The CuPy overrides: BufferedOps' (buffers, fused kernels), and the reference convolution
    on chunks of 128 images instead of 8. On the CPU 8 was fastest (the columns stay in cache);
    on a GPU each chunk costs a dozen kernel launches, and the columns of 128 images (32 channels,
    3 × 3, 11 × 11 outputs: 18 MB) are small for its memory. (Untested on a GPU so far.)"""

    conv_chunk = 128

    # ------------------------------------------------------------ across processes
    def _nccl_for(self, comm, arrays):
        """(nccl module, communicator, datatype) when every array can go to NCCL as it is (one
        C-contiguous float array on this GPU), else None."""
        if len(arrays) != 1 or not arrays[0].flags.c_contiguous or not comm.parallel:
            return None
        found = self._nccl(comm)
        if found is None:
            return None
        nccl, communicator = found
        kind = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}.get(arrays[0].dtype.name)
        return None if kind is None else (nccl, communicator, kind)

    def _nccl(self, comm):
        """(cupy.cuda.nccl, an NCCL communicator of comm's ranks on this GPU), made once per
        communicator and GPU (every rank takes part), or None where any rank's CuPy lacks NCCL or
        two ranks share a GPU (then the reference's staging through host memory runs)."""
        key = ("nccl", self.native.id)
        if key not in comm.backend_state:
            try:
                from cupy.cuda import nccl
            except ImportError:
                nccl = None
            usable = nccl is not None and bool(getattr(nccl, "available", True))
            found = comm.gather_objects((usable, socket.gethostname(), self.native.id))
            gpus = [(host, gpu) for _, host, gpu in found]
            if not all(ok for ok, _, _ in found) or len(set(gpus)) < len(gpus):  # NCCL refuses a GPU twice
                comm.backend_state[key] = None
            else:
                uid = comm.broadcast_object(nccl.get_unique_id() if comm.rank == 0 else None)
                with self.native:
                    comm.backend_state[key] = (nccl, nccl.NcclCommunicator(comm.size, uid, comm.rank))
        return comm.backend_state[key]

    def all_sum(self, comm, arrays, scale, device):
        """NCCL's allReduce on the GPU buffer itself where CuPy has NCCL (on the current stream),
        else the reference's staging through host memory. Untested: no GPU was available where
        this was written."""
        found = self._nccl_for(comm, arrays)
        if found is None:
            return super().all_sum(comm, arrays, scale, device)
        nccl, communicator, kind = found
        a = arrays[0]
        if scale != 1.0:
            a *= scale
        stream = device.backend.cupy.cuda.get_current_stream()
        started = time.perf_counter()
        communicator.allReduce(a.data.ptr, a.data.ptr, a.size, kind, nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()
        comm.stats.add(time.perf_counter() - started, a.nbytes)

    def broadcast(self, comm, arrays, device, root=0):
        found = self._nccl_for(comm, arrays)
        if found is None:
            return super().broadcast(comm, arrays, device, root)
        nccl, communicator, kind = found
        a = arrays[0]
        stream = device.backend.cupy.cuda.get_current_stream()
        communicator.bcast(a.data.ptr, a.size, kind, root, stream.ptr)
        stream.synchronize()
