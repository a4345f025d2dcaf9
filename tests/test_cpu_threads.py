"""The CPU thread pool: split kernels give the one-thread results bit for bit, and OpenBLAS's
products on the pool equal its own threads' (tests/test_fast_paths.py holds the kernels to the
Array API reference)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from xpnet._fast_numpy import NumpyFastPaths

SCALAR = {np.float32: ctypes.c_float, np.float64: ctypes.c_double}


@pytest.fixture(scope="module")
def native():
    lib = NumpyFastPaths().native
    if lib is None:
        from xpnet._fast_numpy import native_status

        if os.environ.get("XPNET_REQUIRE_NATIVE") == "1":
            pytest.fail(f"XPNET_REQUIRE_NATIVE=1, but {native_status()[1]}")
        pytest.skip(native_status()[1])
    return lib


def _random(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _p(array):
    return array.ctypes.data


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts", [2, 3, 7])
def test_split_kernels_equal_one_thread_bit_for_bit(native, dtype, parts):
    suffix = "f32" if dtype == np.float32 else "f64"
    n = 10_007  # not a multiple of the 16-element lines the parts are cut on
    p, g, m, v = (_random(n, seed=s, dtype=dtype) for s in range(4))
    v = np.abs(v)
    runs = []
    for split in (False, True):
        state = [p.copy(), m.copy(), v.copy()]
        arguments = [_p(state[0]), _p(state[1]), _p(state[2]), _p(g), n] + [dtype(1e-3), dtype(0.1), dtype(1e-3)]
        arguments.append(dtype(1e-8))
        kernel = getattr(native, f"xpnet_adam_{suffix}" + ("_split" if split else ""))
        kernel(*arguments, *([parts] if split else []))
        runs.append(state)
    for one, many in zip(*runs):
        np.testing.assert_array_equal(one, many)
    assert not np.array_equal(runs[0][0], p)

    a, da = _random(301, 33, seed=5, dtype=dtype), _random(301, 33, seed=6, dtype=dtype)
    outs = [np.full_like(a, np.nan), np.full_like(a, np.nan)]
    getattr(native, f"xpnet_relu_backward_{suffix}")(_p(outs[0]), _p(a), _p(da), a.size)
    getattr(native, f"xpnet_relu_backward_{suffix}_split")(_p(outs[1]), _p(a), _p(da), a.size, parts)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[1], np.where(a > 0, da, 0))

    b = _random(33, seed=7, dtype=dtype)
    for bias, relu, expected in ((b, 1, np.maximum(a + b, 0)), (b, 0, a + b), (None, 1, np.maximum(a, 0))):
        zs = [a.copy(), a.copy()]
        pb = None if bias is None else _p(bias)
        getattr(native, f"xpnet_bias_act_{suffix}")(_p(zs[0]), pb, 301, 33, relu)
        getattr(native, f"xpnet_bias_act_{suffix}_split")(_p(zs[1]), pb, 301, 33, relu, parts)
        np.testing.assert_array_equal(zs[0], zs[1])
        np.testing.assert_array_equal(zs[1], expected)

    labels = np.random.default_rng(8).integers(0, 33, 301)
    deltas = [np.empty_like(a), np.empty_like(a)]
    one = getattr(native, f"xpnet_softmax_xent_{suffix}")(_p(a), _p(labels), _p(deltas[0]), 301, 33)
    many = getattr(native, f"xpnet_softmax_xent_{suffix}_split")(_p(a), _p(labels), _p(deltas[1]), 301, 33, parts)
    np.testing.assert_array_equal(deltas[0], deltas[1])
    assert many == one  # the rows' losses are added in the same order
    shifted = a - a.max(axis=1, keepdims=True)
    expected = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(301), labels])
    assert one == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_split_gather_is_numpy_take(native, parts):
    X = _random(1000, 7, 3)
    index = np.random.default_rng(1).permutation(1000)[:333]
    index[:2] = [-5, 4000]  # out of range: clipped, as np.take(mode="clip") does
    out = np.full((333, 7, 3), np.nan, np.float32)
    native.xpnet_take_rows(_p(out), _p(X), _p(index), 333, 1000, 7 * 3 * 4, parts)
    np.testing.assert_array_equal(out, np.take(X, index, axis=0, mode="clip"))


@pytest.fixture
def pooled():
    """Fast paths with OpenBLAS on the pool, as within fit (``computing``), for the test."""
    fast = NumpyFastPaths()
    if fast.pool_threads() < 2:
        pytest.skip("no pool here (one core, no compiled kernels, or a BLAS without the thread callback)")
    with fast.computing():
        assert fast.threads == fast.pool_threads()
        yield fast
    assert fast.threads == 1  # released: OpenBLAS has its own threads back


def test_take_rows_through_the_fast_paths_matches_take(pooled):
    fast = pooled
    X = _random(5000, 784)
    order = np.random.default_rng(2).permutation(5000)
    out = np.empty((512, 784), np.float32)  # 1.6 MB: split where the pool is there
    np.testing.assert_array_equal(fast.take_rows(X, order, 1000, 1512, out), X[order[1000:1512]])
    labels = np.arange(5000)
    np.testing.assert_array_equal(
        fast.take_rows(labels, order, 1000, 1512, np.empty(512, labels.dtype)), order[1000:1512]
    )


def test_a_gather_run_ahead_is_the_gather(pooled):
    X, order = _random(5000, 784), np.random.default_rng(3).permutation(5000)
    outs = [np.full((512, 784), np.nan, np.float32) for _ in range(3)]
    assert pooled.gathers_ahead(X, 512) and not pooled.gathers_ahead(X, 10_000)  # 31 MB: no second buffer
    pooled.take_rows_ahead(X, order, 0, 512, outs[0])
    np.testing.assert_array_equal(pooled.take_rows(X, order, 0, 512, outs[0]), X[order[:512]])
    assert pooled._ahead is None
    # finishing another gather first completes the one ahead, then makes its own
    pooled.take_rows_ahead(X, order, 512, 1024, outs[1])
    np.testing.assert_array_equal(pooled.take_rows(X, order, 2000, 2512, outs[2]), X[order[2000:2512]])
    np.testing.assert_array_equal(outs[1], X[order[512:1024]])
    # a second start completes the first; finish_ahead completes the last
    pooled.take_rows_ahead(X, order, 1024, 1536, outs[0])
    pooled.take_rows_ahead(X, order, 4488, 5000, outs[2])
    np.testing.assert_array_equal(outs[0], X[order[1024:1536]])
    pooled.finish_ahead()
    np.testing.assert_array_equal(outs[2], X[order[4488:]])
    assert pooled._ahead is None


def test_gathers_ahead_from_several_threads_with_products_between(pooled):
    import threading

    X, order = _random(4000, 300), np.random.default_rng(4).permutation(4000)
    A, B = _random(256, 300), _random(300, 128)
    product, failures = A @ B, []

    def work(k):
        mine = np.empty((97, 300), np.float32)
        for i in range(60):
            start = (k * 997 + i * 61) % 3900
            pooled.take_rows_ahead(X, order, start, start + 97, mine)
            if not np.array_equal(A @ B, product):  # a pooled product while the copy runs ahead
                failures.append("product")
            got = pooled.take_rows(X, order, start, start + 97, mine)
            if not np.array_equal(got, X[order[start : start + 97]]):
                failures.append((k, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pooled.finish_ahead()
    assert failures == []


def test_gathers_ahead_on_one_fast_object_shared_by_threads(pooled):
    import threading

    X, order = _random(20000, 512), np.random.default_rng(1).permutation(20000)
    done, late = threading.Event(), []

    def other_thread():  # its gathers complete the other thread's copy, whose arrays stay held
        small = np.empty((16, 512), np.float32)
        while not done.is_set():
            pooled.take_rows(X, order, 0, 16, small)

    helper = threading.Thread(target=other_thread)
    helper.start()
    try:
        for _ in range(300):
            pooled.take_rows_ahead(X, order, 0, 4096, np.empty((4096, 512), np.float32))  # a temporary, held
            out = np.empty((4096, 512), np.float32)
            pooled.take_rows_ahead(X, order, 0, 4096, out)
            pooled.finish_ahead()
            out[...] = 0.0  # complete: nothing may write here any more
            for _ in range(100):
                pass
            if out.any():
                late.append(1)
    finally:
        done.set()
        helper.join()
    assert late == []


def test_numpys_take_waits_for_a_copy_ahead_into_the_same_buffer(pooled):
    X, order = _random(20000, 512), np.random.default_rng(2).permutation(20000)
    out = np.empty((4096, 512), np.float32)
    pooled.take_rows_ahead(X, order, 0, 4096, out)
    other = order.astype(np.int32)  # not the compiled gather's index type: np.take does it
    np.testing.assert_array_equal(pooled.take_rows(X, other, 5000, 9096, out), X[order[5000:9096]])


_AHEAD_FORK = r"""
import os
import numpy as np
from xpnet._fast_numpy import NumpyFastPaths
fast = NumpyFastPaths()
held = fast.computing()  # as within fit
held.__enter__()
assert fast.threads > 1
X = np.random.default_rng(0).normal(size=(20000, 784)).astype(np.float32)
order = np.random.default_rng(1).permutation(20000)
out = np.full((4096, 784), np.nan, np.float32)
fast.take_rows_ahead(X, order, 100, 4196, out)
pid = os.fork()
if pid == 0:  # no workers here, and the copy may have stopped half-way: the child gathers it all
    os._exit(0 if np.array_equal(fast.take_rows(X, order, 100, 4196, out), X[order[100:4196]]) else 3)
_, status = os.waitpid(pid, 0)
assert os.WEXITSTATUS(status) == 0, "the forked child's gather differs"
assert np.array_equal(fast.take_rows(X, order, 100, 4196, out), X[order[100:4196]])
print("same")
"""


def test_a_fork_during_a_gather_ahead(pooled, tmp_path):
    script = tmp_path / "fork.py"
    script.write_text(_AHEAD_FORK)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["same"]


def test_an_epoch_that_raises_leaves_no_gather_running(pooled):
    import xpnet as xn

    class Stop(Exception):
        pass

    class RaiseOnThirdBatch(xn.Callback):
        def on_batch_end(self, state):
            if state.step == 2:
                raise Stop

    x = _random(2000, 50)
    y = (x[:, 0] > 0).astype(int)
    model = xn.mlp(50, [16], 2, device=xn.Device("cpu", fast=True), seed=0)  # the pool is a fast path
    assert model.device.fast.gathers_ahead(x, 100)
    with pytest.raises(Stop):
        xn.fit(model, "cross_entropy", "adam", x, y, batch_size=100, callbacks=[RaiseOnThirdBatch()])
    assert model.device.fast._ahead is None  # finished, and its buffers released


_PRODUCTS = r"""
import os, sys, threading
import numpy as np
import xpnet
fast = xpnet.Device("cpu").fast
held = fast.computing()  # OpenBLAS on the pool where it can be, as within fit, to the end
held.__enter__()
threads = fast.threads
rng = np.random.default_rng(0)
shapes = [(512, 784, 128), (128, 512, 784), (512, 128, 64), (64, 512, 128), (7, 5, 3), (1000, 1000, 1000)]
pairs = [(rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32))
         for m, k, n in shapes]
pairs += [(a.astype(np.float64), b.astype(np.float64)) for a, b in pairs[:3]]
before = [np.load(sys.argv[1] + f"/{i}.npy") for i in range(len(pairs))] if len(sys.argv) > 2 else None
now = [a @ b for a, b in pairs]
if before is None:
    for i, c in enumerate(now):
        np.save(sys.argv[1] + f"/{i}.npy", c)
    print("saved", threads)
    raise SystemExit
assert all(np.array_equal(x, y) for x, y in zip(before, now)), "products differ"
results = {}
def work(k):
    results[k] = [a @ b for a, b in pairs for _ in range(3)]
workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
for w in workers: w.start()
for w in workers: w.join()
assert all(np.array_equal(r, x) for k in results for r, x in zip(results[k], [c for c in now for _ in range(3)]))
pid = os.fork()
if pid == 0:  # the child has no pool threads: they are started again there
    ok = all(np.array_equal(a @ b, c) for (a, b), c in zip(pairs, now))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.WEXITSTATUS(status) == 0, "the forked child's products differ"
print("same", threads)
"""


def test_openblas_products_on_the_pool_equal_its_own_threads(tmp_path):
    script = tmp_path / "products.py"
    script.write_text(_PRODUCTS)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "XPNET_FAST": "1"}  # the pool is a fast path
    own = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env={**env, "XPNET_THREADS": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert own.returncode == 0, own.stderr
    assert own.stdout.split() == ["saved", "1"]  # XPNET_THREADS=0: OpenBLAS left alone
    pooled = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "compare"], env=env, capture_output=True, text=True, timeout=300
    )
    assert pooled.returncode == 0, pooled.stderr
    word, threads = pooled.stdout.split()
    assert word == "same"
    if threads == "1":
        pytest.skip("NumPy's BLAS here takes no thread callback (not OpenBLAS 0.3.28+): nothing was hooked")
    assert threads == "2"


_TRAIN = r"""
import sys
import numpy as np
import xpnet as xn
x = np.random.default_rng(0).normal(size=(3000, 300)).astype(np.float32)
y = (x[:, :10].sum(axis=1) > 0).astype(int) + 2 * (x[:, 10] > 0)
model = xn.mlp(300, [200, 100], 4, seed=1)
seen = []
class Look(xn.Callback):  # what the fast paths have within fit, on the pool while it trains
    def on_batch_end(self, state):
        seen.append((model.device.fast.threads, model.device.fast.gathers_ahead(x, 512)))
history = xn.fit(model, "cross_entropy", xn.Adam(1e-3), x, y, epochs=2, batch_size=512, callbacks=[Look()])
np.save(sys.argv[1], np.concatenate([np.ravel(p) for layer in model.layers for p in layer.params.values()]))
assert len(set(seen)) == 1 and model.device.fast.threads == 1  # the same at every step; released after
print(*seen[0], history["loss"][-1])
"""


def test_training_on_the_pool_equals_training_on_one_thread(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    outputs = []
    for flag in ("0", "1"):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / f"w{flag}.npy")],
            env={**os.environ, "XPNET_THREADS": flag, "OPENBLAS_NUM_THREADS": "2", "XPNET_FAST": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split())
    if outputs[1][0] == "1":
        pytest.skip("NumPy's BLAS here takes no thread callback: nothing to compare")
    assert outputs[0][1] == "False" and outputs[1][1] == "True"  # each batch gathered ahead on the pool
    np.testing.assert_array_equal(np.load(tmp_path / "w0.npy"), np.load(tmp_path / "w1.npy"))
    assert outputs[0][2] == outputs[1][2]  # the logged loss too


def test_only_numpys_own_openblas_is_hooked():
    from xpnet._cpu_threads import numpy_openblas

    numpy_dir = os.path.dirname(np.__file__)
    assert numpy_openblas(numpy_dir, "mkl-sdl") is None  # NumPy on another BLAS: nothing to hook
    assert numpy_openblas(numpy_dir, "accelerate") is None
    found = numpy_openblas(numpy_dir, "scipy-openblas")
    if found is not None:  # a wheel's OpenBLAS, beside NumPy, and the copy already loaded
        assert os.path.join(os.path.dirname(numpy_dir), "numpy.libs") in found._name


_HOOK = r"""
import numpy as np
import xpnet as xn
from xpnet._fast_numpy import native_status

lib = native_status()[0]
a = np.random.default_rng(0).random((600, 600), dtype=np.float32)
y = (a[:, 0] > 0.5).astype(int)


def products_on_the_pool(work):
    before = lib.xpnet_blas_calls()
    work()
    return lib.xpnet_blas_calls() - before


model = xn.mlp(600, [600], 2, seed=0)
counts = {
    "describe": products_on_the_pool(lambda: (xn.Device("cpu").describe(), a @ a)),
    "fit": products_on_the_pool(lambda: xn.fit(model, "cross_entropy", "sgd", a, y, batch_size=600)),
    "after fit": products_on_the_pool(lambda: a @ a),
    "predict": products_on_the_pool(lambda: xn.predict(model, a)),
    "evaluate": products_on_the_pool(lambda: xn.evaluate(model, "cross_entropy", a, y)),
    "after all": products_on_the_pool(lambda: a @ a),
}
print(" ".join(f"{key.replace(' ', '_')}={value}" for key, value in counts.items()))
"""


def test_openblas_runs_on_the_pool_only_while_xpnet_computes(pooled, tmp_path):
    """The hook is held by fit, predict and evaluate and given back after each: a product of the
    user's outside them runs on OpenBLAS's own threads (none reaches the pool's callback), and
    describing the device (what ``xpnet devices`` prints) hooks nothing."""
    script = tmp_path / "hook.py"
    script.write_text(_HOOK)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "XPNET_FAST": "1", "XPNET_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    counts = dict(item.split("=") for item in done.stdout.split())
    assert counts["describe"] == counts["after_fit"] == counts["after_all"] == "0", counts
    assert int(counts["fit"]) > 0 and int(counts["predict"]) > 0 and int(counts["evaluate"]) > 0, counts


_FORK_IN_FIT = r"""
import os
import numpy as np
import xpnet as xn
from xpnet._fast_numpy import native_status

lib = native_status()[0]
a = np.random.default_rng(0).random((600, 600), dtype=np.float32)
y = (a[:, 0] > 0.5).astype(int)


class ForkOnce(xn.Callback):
    done = False

    def on_batch_end(self, state):
        if self.done:
            return
        self.done = True
        pid = os.fork()
        if pid == 0:  # the child, forked while fit holds the hook: its products on OpenBLAS's threads
            before = lib.xpnet_blas_calls()
            c = a @ a
            xn.fit(xn.mlp(600, [8], 2, seed=1), "cross_entropy", "sgd", a, y, batch_size=600)
            after_fit = lib.xpnet_blas_calls()
            c = a @ a
            os._exit(0 if (lib.xpnet_blas_calls() == after_fit and c.shape == (600, 600)) else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.WEXITSTATUS(status), flush=True)


xn.fit(xn.mlp(600, [600], 2, seed=0), "cross_entropy", "sgd", a, y, batch_size=300, callbacks=[ForkOnce()])
before = lib.xpnet_blas_calls()
c = a @ a
print("parent", lib.xpnet_blas_calls() - before)
"""


def test_a_fork_inside_fit_leaves_the_child_with_openblass_own_threads(pooled, tmp_path):
    script = tmp_path / "fork_fit.py"
    script.write_text(_FORK_IN_FIT)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "XPNET_FAST": "1", "XPNET_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["child", "0", "parent", "0"], done.stdout
