"""xpnet.distributed on one process: shares of a batch, the exchanges of every backend's Ops
against a stand-in for two ranks, dropout's rows of a global batch, the default communicator,
and mpi4py left alone. (The real thing, under mpiexec: tests/test_mpi.py.)"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import host
from hypothesis import given
from hypothesis import strategies as st

import xpnet as xn
from xpnet.distributed import Communicator, SingleProcess, share_of


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_the_shares_of_a_batch_cover_it_in_order(n, size):
    spans = [share_of(n, rank, size) for rank in range(size)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    lengths = [hi - lo for lo, hi in spans]
    assert lengths == sorted(lengths, reverse=True)
    taking = [length for length in lengths if length]
    assert max(taking, default=0) - min(taking, default=0) <= 1
    if n >= 2 * size:  # every rank takes some
        assert len(taking) == size
    if n > 1:  # never one row alone: BatchNorm needs two values per feature
        assert min(taking) >= 2


@pytest.mark.parametrize(
    "args, error",
    [
        ((10, 2, 2), ValueError),
        ((10, -1, 2), ValueError),
        ((10, 0, 0), ValueError),
        ((-1, 0, 2), ValueError),
        ((10.5, 0, 2), TypeError),
        ((10, True, 2), TypeError),
        ((10, 0, None), TypeError),
    ],
)
def test_share_of_refuses_what_is_not_a_rank_of_a_batch(args, error):
    with pytest.raises(error, match="share_of"):
        share_of(*args)


class TwoSameRanks(Communicator):
    """Two ranks that hold the same numbers: a sum doubles, a broadcast keeps them."""

    rank, size = 0, 2

    def __init__(self):
        super().__init__()
        self.buffers = []

    def all_sum_host(self, buffer):
        self.buffers.append(buffer)
        view = np.frombuffer(buffer, dtype=np.float64) if not isinstance(buffer, np.ndarray) else buffer
        view *= 2

    def broadcast_host(self, buffer, root=0):
        self.buffers.append(buffer)


def test_all_sum_scales_and_sums_in_place_on_every_backend(backend):
    device = xn.Device(backend)
    ops, comm = device.ops, TwoSameRanks()
    a = device.to_device(np.arange(6, dtype=np.float32).reshape(2, 3))
    b = device.to_device(np.array([1.0, -2.0], dtype=np.float32))
    ops.all_sum(comm, [a, b], 0.25, device)
    assert len(comm.buffers) == 1  # one collective for both arrays
    np.testing.assert_array_equal(host(device, a), np.arange(6).reshape(2, 3) * 0.5)
    np.testing.assert_array_equal(host(device, b), [0.5, -1.0])
    flat = device.to_device(np.ones(5, dtype=np.float32))
    ops.all_sum(comm, [flat], 1.0, device)
    np.testing.assert_array_equal(host(device, flat), np.full(5, 2.0))


def test_numpy_sums_the_flat_gradient_buffer_itself():
    model = xn.mlp(4, [3], 2)
    if model.device.fast is None:
        pytest.skip("the fast paths are off (XPNET_FAST=0): the reference lays parameters out one array each")
    buffers = model.store.buffers("grads")
    assert len(buffers) == 1 and buffers[0].shape == (model.num_parameters(),)
    comm = TwoSameRanks()
    model.device.ops.all_sum(comm, buffers, 0.5, model.device)
    assert comm.buffers[0] is buffers[0]  # MPI reads and writes the store's own array: no copy


def test_broadcast_writes_every_array_back(backend):
    device = xn.Device(backend)
    arrays = [device.to_device(np.full((2, 2), 3.0, dtype=np.float32)), device.to_device(np.zeros(3, np.float32))]
    device.ops.broadcast(TwoSameRanks(), arrays, device)
    np.testing.assert_array_equal(host(device, arrays[0]), np.full((2, 2), 3.0))
    np.testing.assert_array_equal(host(device, arrays[1]), np.zeros(3))


def test_a_ranks_rows_draw_the_dropout_numbers_of_the_whole_batch(backend):
    device = xn.Device(backend)
    x = device.to_device(np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32))
    key, k1 = device.next_draw()
    whole, whole_mask = device.ops.dropout(x, 0.4, (key, k1, 0))
    for lo, hi in ((0, 5), (5, 10), (3, 4)):
        part, mask = device.ops.dropout(x[lo:hi, ...], 0.4, (key, k1, lo))
        np.testing.assert_array_equal(host(device, mask), host(device, whole_mask)[lo:hi])
        np.testing.assert_array_equal(host(device, part), host(device, whole)[lo:hi])
    with pytest.raises(ValueError, match="first row must be an integer"):
        device.ops.dropout(x, 0.4, (key, k1, -1))


def test_fit_with_the_single_process_communicator_is_fit_alone():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(70, 5)).astype(np.float32), rng.integers(0, 3, 70)

    def trained(**kwargs):
        model = xn.mlp(5, [8], 3, dropout=0.2, seed=3)
        history = xn.fit(model, "cross_entropy", "adam", x, y, epochs=2, batch_size=16, **kwargs)
        return model, history

    (a, ha), (b, hb) = trained(), trained(communicator=SingleProcess())
    for key, value in a.named_parameters().items():
        np.testing.assert_array_equal(value, b.named_parameters()[key])
    assert ha["loss"] == hb["loss"] and ha["accuracy"] == hb["accuracy"]
    with pytest.raises(TypeError, match="communicator must be an xpnet.distributed.Communicator"):
        xn.fit(a, "cross_entropy", "adam", x, y, communicator="mpi")
    with pytest.raises(TypeError, match="communicator must be"):
        xn.evaluate(a, "cross_entropy", x, y, communicator=object())


def test_a_batch_smaller_than_the_ranks_is_refused():
    model = xn.mlp(5, [4], 3)
    x, y = np.zeros((10, 5), np.float32), np.zeros(10, np.int64)
    for batch in (1, 3):  # two rows a rank at least, as BatchNorm needs
        with pytest.raises(ValueError, match=f"a batch of {batch} examples cannot be shared by 2 ranks"):
            xn.fit(model, "cross_entropy", "adam", x, y, batch_size=batch, communicator=TwoSameRanks())


def test_the_launchers_variables_say_how_many_ranks(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert xn.distributed.launched_ranks() == 1 and xn.distributed.launched_rank() == 0
    assert type(xn.distributed.from_environment()) is SingleProcess
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert xn.distributed.launched_ranks() == 4 and xn.distributed.launched_rank() == 3


def _child(code: str, **env) -> subprocess.CompletedProcess:
    from xpnet.cli.bench_ranks import job_environment

    environment = {**job_environment(), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)


def test_training_on_one_process_never_imports_mpi4py():
    result = _child(
        "import sys, numpy as np, xpnet as xn\n"
        "m = xn.mlp(3, [2], 2)\n"
        "xn.fit(m, 'cross_entropy', 'sgd', np.zeros((4, 3), np.float32), np.zeros(4, np.int64))\n"
        "xn.evaluate(m, 'cross_entropy', np.zeros((4, 3), np.float32), np.zeros(4, np.int64))\n"
        "print('mpi4py' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("rank", [0, 1])
def test_xpnet_train_started_by_a_launcher_without_mpi4py_says_so_once(rank):
    code = "import sys; sys.modules['mpi4py'] = None\nfrom xpnet.cli.main import main\nsys.exit(main(['train']))"
    result = _child(code, PMI_SIZE="2", PMI_RANK=str(rank))
    assert result.returncode == 2
    if rank == 0:
        assert result.stderr.strip().splitlines() == [
            "xpnet: started as one of 2 MPI ranks, but data-parallel training needs mpi4py "
            "(import of mpi4py halted; None in sys.modules): pip install 'xpnet[mpi]' and an MPI (pip install mpich)"
        ]
    else:  # rank 0 says it; the others leave quietly
        assert result.stderr == "" and result.stdout == ""
