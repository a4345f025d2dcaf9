"""One pool of threads on the CPU for OpenBLAS's products and for the compiled kernels.

Why: OpenBLAS keeps its own worker threads, and after each product they spin for about 0.1 s
waiting for the next one. On a machine with few cores they hold every core but the caller's,
so a kernel of ours split over two threads ran slower than on one (bench/NOTES.md, change 16).
OpenBLAS 0.3.28 and later can hand the jobs of a product to the caller's threads instead
(``openblas_set_threads_callback_function``). xpnet gives it this pool, and splits its own
kernels over the same threads: the gather of a batch, Adam, ReLU backward, bias plus ReLU and
softmax cross-entropy. The products are computed as before: OpenBLAS divides the work into the
same jobs; only the threads that run them change.

The hook is process-wide, so xpnet holds it only while it computes: ``fit``, ``evaluate`` and
``predict`` (``Ops.computing``) set it on entry and the last of them to end sets it back to
OpenBLAS's default (no callback: its own threads). While it is held every OpenBLAS product in the
process runs on this pool (callers take turns); outside, xpnet's kernels run on one thread.
``XPNET_THREADS=0`` leaves OpenBLAS alone. Without NumPy's OpenBLAS (another BLAS, an OpenBLAS
older than 0.3.28, or one built on OpenMP rather than its own pthreads) nothing is hooked either.
The pool itself is C (xpnet/_native/pool.c), built with the kernels.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from pathlib import Path

#: Where the callback setter may be, by the names OpenBLAS builds export (NumPy's wheels add a
#: scipy_ prefix and a 64_ suffix).
_SETTERS = (
    "scipy_openblas_set_threads_callback_function64_",
    "scipy_openblas_set_threads_callback_function",
    "openblas_set_threads_callback_function64_",
    "openblas_set_threads_callback_function",
)
_PARALLEL = (
    "scipy_openblas_get_parallel64_",
    "scipy_openblas_get_parallel",
    "openblas_get_parallel64_",
    "openblas_get_parallel",
)
_THREAD_COUNTS = (
    "scipy_openblas_get_num_threads64_",
    "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)


def numpy_openblas(numpy_dir: str, blas_name: str) -> ctypes.CDLL | None:
    """NumPy's OpenBLAS as already loaded in this process, or None (another BLAS, or not found).

    ``numpy_dir``: the folder NumPy is installed in; ``blas_name``: the BLAS NumPy was built
    with. Wheels keep their OpenBLAS in ``numpy.libs`` beside NumPy; SciPy's wheels carry their
    own, in ``scipy.libs``, which must not be taken for NumPy's.
    """
    if "openblas" not in blas_name.lower():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    loaded = sorted(set(re.findall(r"(/\S*openblas\S*\.so[\w.]*)", maps)))
    wheel = os.path.join(os.path.dirname(numpy_dir), "numpy.libs") + os.sep
    mine = [path for path in loaded if path.startswith(wheel)]
    if not mine:  # a NumPy built against the system's OpenBLAS
        mine = [path for path in loaded if ".libs" + os.sep not in path]
    if len(mine) != 1:
        return None
    try:  # the copy already loaded, never a second one from disk
        return ctypes.CDLL(mine[0], mode=os.RTLD_NOLOAD)
    except (OSError, AttributeError):
        return None


@functools.cache
def _hookable(native, numpy_dir: str, blas_name: str):
    """(NumPy's OpenBLAS's callback setter, its thread count), or None where nothing is to be
    hooked: XPNET_THREADS=0, another BLAS, an OpenBLAS without the callback or on OpenMP, one
    thread. Looks; changes nothing."""
    if os.environ.get("XPNET_THREADS", "1") == "0":
        return None
    blas = numpy_openblas(numpy_dir, blas_name)
    if blas is None:
        return None
    setter, parallel, count = (
        next((getattr(blas, name) for name in names if hasattr(blas, name)), None)
        for names in (_SETTERS, _PARALLEL, _THREAD_COUNTS)
    )
    if setter is None or parallel is None or count is None:
        return None
    parallel.restype = ctypes.c_int
    if parallel() != 1:  # 1: OpenBLAS's own pthreads; its OpenMP build is another story
        return None
    count.restype = ctypes.c_int
    threads = int(count())
    if threads < 2:
        return None
    setter.argtypes, setter.restype = [ctypes.c_void_p], None
    return setter, threads


def available(native, numpy_dir: str, blas_name: str) -> int:
    """How many threads OpenBLAS and the kernels would share while xpnet computes (1: no pool).
    Hooks nothing (``xpnet devices`` reports this)."""
    found = _hookable(native, numpy_dir, blas_name)
    return 1 if found is None else found[1]


_LOCK = threading.Lock()
_holders = 0  # how many hold() calls are not yet released, in this process
_reserved: dict = {}  # native library -> whether its pool's workers started
#: The threads the split kernels use now: the pool's while OpenBLAS is hooked, else 1.
threads_now = 1


_generation = 0  # counts forks: a hold taken before a fork is not the child's to release


def _after_fork_in_child() -> None:
    """A child forked while xpnet held the hook computes on its own: OpenBLAS gets its own threads
    back (the pool's workers do not exist in the child), and the parent's holds are not its own."""
    global _holders, threads_now, _generation, _LOCK
    _LOCK = threading.Lock()
    if _holders:
        for found in list(_HOOKED):
            found[0](None)
    _holders, threads_now, _generation = 0, 1, _generation + 1


_HOOKED: list = []  # the (setter, threads) pairs hooked in this process

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def hold(native, numpy_dir: str, blas_name: str):
    """Hand NumPy's OpenBLAS the pool of the compiled library ``native`` for as long as someone
    holds it (fit, evaluate and predict do, through ``Ops.computing``). Returns whether this call
    holds it: a token for ``release``, or None where nothing can be hooked."""
    global _holders, threads_now
    found = _hookable(native, numpy_dir, blas_name)
    if found is None:
        return None
    setter, threads = found
    with _LOCK:
        if _holders == 0:
            if native not in _reserved:  # the workers a product needs, before the hook
                native.xpnet_pool_reserve.argtypes, native.xpnet_pool_reserve.restype = [ctypes.c_int], ctypes.c_int
                _reserved[native] = native.xpnet_pool_reserve(threads) == 0
            if not _reserved[native]:
                return None
            setter(ctypes.cast(native.xpnet_blas_callback, ctypes.c_void_p))
            if found not in _HOOKED:
                _HOOKED.append(found)
            threads_now = threads
        _holders += 1
        return (_generation, found)


def release(token) -> None:
    """Undo the ``hold`` that returned ``token``; the last one gives OpenBLAS its own threads back
    (a NULL callback is OpenBLAS's default: its products then run on its own threads again). A
    hold of the parent process, in a forked child, is not undone there."""
    global _holders, threads_now
    generation, (setter, _) = token
    with _LOCK:
        if generation != _generation:
            return
        _holders -= 1
        if _holders == 0:
            threads_now = 1
            setter(None)


_SET_COUNTS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def set_blas_threads(threads: int, numpy_dir: str, blas_name: str) -> bool:
    """Make NumPy's OpenBLAS (``numpy_openblas``) compute on ``threads`` threads from now on, and
    so xpnet's pool, which takes OpenBLAS's count when it is next held. Returns whether there was
    an OpenBLAS to tell. Refused (RuntimeError) while xpnet computes: the pool's count is fixed
    for a computation."""
    with _LOCK:
        if _holders:
            raise RuntimeError("the thread count cannot change while fit, evaluate or predict runs")
        blas = numpy_openblas(numpy_dir, blas_name)
        setter = None if blas is None else next((getattr(blas, n) for n in _SET_COUNTS if hasattr(blas, n)), None)
        if setter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], None
            setter(max(1, int(threads)))
        _hookable.cache_clear()  # the count is read again at the next hold
        return setter is not None
