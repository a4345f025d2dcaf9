"""The NumPy fast paths give the Array API reference code's results."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

import xpnet as xn
from xpnet._fast_numpy import NumpyFastPaths, _native_library, native_status

RTOL = 1e-6

#: Tests of what the default device does with its fast paths skip in a run with them off.
needs_fast = pytest.mark.skipif(
    os.environ.get("XPNET_FAST", "1") == "0",
    reason="XPNET_FAST=0: the default device has no fast paths, and this tests them",
)


def _compiler() -> str | None:
    """A C compiler on this machine, if there is one."""
    command = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return command if command and shutil.which(shlex.split(command)[0]) else None


def _require_native(fast) -> None:
    """Skip where the compiled kernels are off (XPNET_NATIVE=0) or were not built when xpnet was
    installed, saying why; fail instead under XPNET_REQUIRE_NATIVE=1 (CI builds them: a build
    that silently failed must not pass as skipped tests)."""
    if fast.native is not None:
        return
    if os.environ.get("XPNET_NATIVE", "1") == "0":
        pytest.skip("XPNET_NATIVE=0: the compiled kernels are off")
    reason = native_status()[1]
    if os.environ.get("XPNET_REQUIRE_NATIVE") == "1":
        pytest.fail(f"XPNET_REQUIRE_NATIVE=1, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def fast():
    return NumpyFastPaths()


def _random(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def test_linear_forward_and_backward_match_the_reference(fast):
    x, W, b, delta = _random(7, 5), _random(4, 5, seed=1), _random(4, seed=2), _random(7, 4, seed=3)
    np.testing.assert_allclose(fast.linear(x, W, b, np.empty((7, 4), np.float32)), x @ W.T + b, rtol=RTOL, atol=1e-6)
    dW, db, dx = np.empty((4, 5), np.float32), np.empty(4, np.float32), np.empty((7, 5), np.float32)
    fast.linear_backward(delta, x, W, dW, db, dx)
    np.testing.assert_allclose(dW, delta.T @ x, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(db, delta.sum(axis=0), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(dx, delta @ W, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_with_relu_is_max_of_the_reference(native, dtype, bias):
    fast = NumpyFastPaths(native=native)
    if native:
        _require_native(fast)
    x, W, b = _random(9, 5, dtype=dtype), _random(6, 5, seed=1, dtype=dtype), _random(6, seed=2, dtype=dtype)
    x[0, 0] = np.nan  # NaN goes through max(z, 0) as it does through NumPy's maximum
    reference = np.maximum(x @ W.T + b if bias else x @ W.T, 0)
    out = fast.linear(x, W, b if bias else None, np.empty((9, 6), dtype), relu=True)
    np.testing.assert_array_equal(out, reference)  # the same additions: equal bit for bit
    assert np.isnan(out[0]).all() and (out[1:] >= 0).all() and (out[1:] == 0).any()
    plain = fast.linear(x, W, b if bias else None, np.empty((9, 6), dtype))
    np.testing.assert_array_equal(plain, x @ W.T + b if bias else x @ W.T)


def test_kernel_addresses_follow_new_arrays_and_refuse_strided_ones(fast):
    _require_native(fast)
    for seed in range(20):  # fresh arrays, some of which reuse a freed one's id: each gets its own address
        a, da = _random(4, 8, seed=seed), _random(4, 8, seed=seed + 100)
        out = fast.relu_backward(da, a, np.empty_like(a))
        np.testing.assert_array_equal(out, np.where(a > 0, da, 0))
        del a, da, out
    a = _random(4, 16)
    assert fast._kernel("xpnet_relu_backward", 0, (a[:, ::2],)) is None  # strided: the NumPy code runs
    assert fast._kernel("xpnet_relu_backward", 0, (a, a), (a[:, ::2],)) is None
    assert fast._kernel("xpnet_relu_backward", 0, (a.astype(np.float16),)) is None
    assert fast._kernel("xpnet_relu_backward", 0, (a, a.astype(np.float64))) is None  # mixed dtypes


@needs_fast
def test_dense_then_relu_is_fused_only_while_fit_reuses_buffers():
    model = xn.mlp(5, [7, 6], 3, seed=0)
    x = _random(4, 5)
    reference = model.forward(x, training=True)
    dense, relu = model.layers[0], model.layers[1]
    ops = model.device.ops
    calls = []
    original = type(ops).affine

    def spy(self, x, W, b, *, activation=None, site=None):
        calls.append((site, activation))
        return original(self, x, W, b, activation=activation, site=site)

    type(ops).affine = spy
    try:
        with model.reusing_buffers():
            assert ops.fuses("relu")
            np.testing.assert_array_equal(model.forward(x, training=True), reference)
            np.testing.assert_array_equal(relu.a, np.maximum(x @ dense.params["W"].T + dense.params["b"], 0))
        assert calls == [(dense.scratch, "relu"), (model.layers[2].scratch, "relu"), (model.layers[4].scratch, None)]
        assert not ops.fuses("relu")  # outside fit's loop: every layer computes its own output
        calls.clear()
        model.forward(x, training=True)
        assert calls == [(dense.scratch, None), (model.layers[2].scratch, None), (model.layers[4].scratch, None)]
    finally:
        type(ops).affine = original


def test_relu_and_its_backward_match_the_reference(fast):
    z, da = _random(6, 9), _random(6, 9, seed=1)
    a = fast.relu(z, np.empty_like(z))
    np.testing.assert_array_equal(a, np.maximum(z, 0))
    back = fast.relu_backward(da, a, np.empty_like(z))
    np.testing.assert_array_equal(back, np.where(z > 0, da, 0))


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_matches_the_reference(native, dtype):
    fast = NumpyFastPaths(native=native)
    if native:
        _require_native(fast)
    z, labels = _random(11, 10, dtype=dtype) * 4, np.random.default_rng(1).integers(0, 10, 11)
    value, delta = fast.softmax_cross_entropy(z, labels, np.empty_like(z))
    reference_value, reference_delta = xn.SoftmaxCrossEntropy().value_and_grad(z, labels)
    assert value.dtype == dtype and float(value) == pytest.approx(float(reference_value), rel=1e-6)
    np.testing.assert_allclose(delta, reference_delta, rtol=1e-5, atol=1e-8)


def test_take_rows_matches_take(fast):
    X, order = _random(50, 3), np.random.default_rng(0).permutation(50)
    np.testing.assert_array_equal(fast.take_rows(X, order, 7, 19, np.empty((12, 3), np.float32)), X[order[7:19]])
    labels = np.arange(50) * 3
    np.testing.assert_array_equal(fast.take_rows(labels, order, 40, 50, np.empty(10, labels.dtype)), labels[order[40:]])
    strided = order[::2]  # not contiguous: NumPy's take does it
    np.testing.assert_array_equal(fast.take_rows(X, strided, 0, 5, np.empty((5, 3), np.float32)), X[strided[:5]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_adam_equals_the_numpy_passes(fast, dtype, monkeypatch):
    _require_native(fast)
    calls = []  # the compiled kernel runs (else this would compare the NumPy passes with themselves)
    suffix = "f32" if dtype == np.float32 else "f64"
    for name in (f"xpnet_adam_{suffix}", f"xpnet_adam_{suffix}_split"):
        kernel = getattr(fast.native, name)
        monkeypatch.setattr(fast.native, name, lambda *args, kernel=kernel: calls.append(1) or kernel(*args))
    arrays = [np.random.default_rng(i).random(5000).astype(dtype) for i in range(5)]
    one, two = [a.copy() for a in arrays], [a.copy() for a in arrays]
    for step in range(1, 4):
        fast.adam_(*one, 1e-3 * step, 0.9, 0.999, 1e-8)
        fast.adam_passes(*two, 1e-3 * step, 0.9, 0.999, 1e-8)
    assert len(calls) == 3
    for a, b in zip(one[:4], two[:4]):  # p, g, m, v bit for bit (the fifth is the passes' scratch)
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(one[0], arrays[0])


def test_compiled_adam_flushes_subnormal_moments_to_zero(fast):
    _require_native(fast)
    p, g, m, v, t = (np.zeros(4, np.float32) for _ in range(5))
    m[:] = 1e-39  # subnormal in float32: it would decay through the slow subnormal range
    fast.adam_(p, g, m, v, t, 1e-3, 0.9, 0.999, 1e-8)
    np.testing.assert_array_equal(m, 0.0)
    np.testing.assert_array_equal(p, 0.0)


def _train(fast: bool, optimizer, epochs=3, dropout=0.0):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)
    model = xn.mlp(6, [16, 8], 3, dropout=dropout, device=xn.Device("cpu", fast=fast), seed=3)
    history = xn.fit(model, "cross_entropy", optimizer, x, y, epochs=epochs, batch_size=32, validation_split=0.2)
    return model, history


@pytest.mark.parametrize(
    "make",
    [
        lambda: xn.Adam(0.01),
        lambda: xn.AdamW(0.01, weight_decay=0.1),
        lambda: xn.Adam(0.01, weight_decay=0.01),
        lambda: xn.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda: xn.Adam(0.01, clip_norm=0.5),
    ],
    ids=["adam", "adamw", "adam-l2", "nesterov-l2", "adam-clip"],
)
def test_training_with_fast_paths_matches_the_reference(make):
    fast_model, fast_history = _train(True, make(), dropout=0.1)
    slow_model, slow_history = _train(False, make(), dropout=0.1)
    assert fast_model.store.layout == "flat" and slow_model.store.layout == "separate"
    for key, value in slow_model.named_parameters().items():
        np.testing.assert_allclose(fast_model.named_parameters()[key], value, rtol=1e-5, atol=1e-6)
    assert fast_history["loss"] == pytest.approx(slow_history["loss"], rel=1e-5)


@needs_fast
def test_flat_parameters_are_views_and_stay_views():
    model = xn.mlp(4, [3], 2, seed=0)
    store = model.store
    assert store.layout == "flat"
    flat = store._flat_values
    flat[:] = 0.5
    assert all(np.all(p == 0.5) for p in model.named_parameters().values())
    model.load_state_dict({k: np.full(v.shape, 2.0, np.float32) for k, v in model.named_parameters().items()})
    assert np.all(flat == 2.0)
    for key, value in model.named_parameters().items():  # every parameter still a view into the layout
        assert np.shares_memory(value, flat) and model.layers[int(key[0])].params[key[2:]] is value
    # weight decay's metadata, declared by Dense (its bias takes none): the weights first, then the biases
    groups = store.groups(store.slots(()), elementwise=True)
    assert [(g.key, g.decay, g.value.shape) for g in groups] == [("0.W+2.W", True, (18,)), ("0.b+2.b", False, (5,))]


def test_optimizer_state_moves_between_fast_and_reference_models():
    fast_model, _ = _train(True, optimizer := xn.Adam(0.01), epochs=1)
    state, params = optimizer.state_dict(), fast_model.state_dict()
    assert set(state["slots"]) == {"0.W", "0.b", "2.W", "2.b", "4.W", "4.b"}
    x = np.random.default_rng(5).normal(size=(32, 6)).astype(np.float32)
    fast_model.backward(fast_model.forward(x, training=True))
    optimizer.step(fast_model)  # the step the saved optimizer takes next, without a save and load
    unbroken = fast_model.state_dict()
    for target_fast in (True, False):
        model = xn.mlp(6, [16, 8], 3, device=xn.Device("cpu", fast=target_fast), seed=9)
        model.load_state_dict(params)
        restored = xn.Adam(0.01)
        restored.load_state_dict(state, model)
        model.backward(model.forward(x, training=True))
        restored.step(model)
        assert model.store.layout == ("flat" if target_fast else "separate")
        for key, value in model.state_dict().items():
            np.testing.assert_allclose(value, unbroken[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_fast_paths_switch_off_with_one_flag(monkeypatch):
    monkeypatch.delenv("XPNET_FAST", raising=False)  # this test sets the flag itself
    monkeypatch.delenv("XPNET_NATIVE", raising=False)
    assert xn.Device("cpu").fast is not None
    assert xn.Device("cpu", fast=False).fast is None
    assert xn.Device("strict").fast is None
    monkeypatch.setenv("XPNET_FAST", "0")
    assert xn.Device("cpu").fast is None
    monkeypatch.setenv("XPNET_NATIVE", "0")
    assert _native_library() is None


def test_training_without_a_compiler_uses_the_numpy_passes(monkeypatch):
    monkeypatch.setenv("XPNET_NATIVE", "0")
    model, _ = _train(True, xn.Adam(0.01))
    assert model.device.fast.native is None
    monkeypatch.delenv("XPNET_NATIVE")
    reference, _ = _train(False, xn.Adam(0.01))
    for key, value in reference.named_parameters().items():
        np.testing.assert_allclose(model.named_parameters()[key], value, rtol=1e-4, atol=1e-5)


def test_the_kernel_restores_the_floating_point_state(fast):
    _require_native(fast)
    arrays = [np.ones(8, np.float32) for _ in range(5)]
    fast.adam_(*arrays, 1e-3, 0.9, 0.999, 1e-8)
    assert np.float32(1e-38) * np.float32(0.01) != 0  # subnormals work again outside the kernel


def test_kernel_refuses_mismatched_arrays_and_falls_back(fast):
    _require_native(fast)
    p, g, m, v, t = (np.zeros(6, np.float32) for _ in range(5))
    with pytest.raises(ValueError):  # the NumPy passes complain about the shapes, nothing is overrun
        fast.adam_(p, g, m[:3], v, t, 1e-3, 0.9, 0.999, 1e-8)


@needs_fast
def test_outputs_outside_fit_are_new_arrays():
    model = xn.mlp(4, [5], 3, seed=0)
    x = np.ones((2, 4), np.float32)
    first, second = model.forward(x, training=True), model.forward(x, training=True)
    assert first is not second and not np.shares_memory(first, second)
    a = model.backward(first, input_grad=True)
    b = model.backward(second, input_grad=True)
    assert a is not b and not np.shares_memory(a, b)
    for key, g in model.named_gradients().items():  # gradients still land in the flat storage
        assert np.shares_memory(g, model.store._flat_grads), key


def test_an_optimizer_moved_to_another_model_is_refused():
    optimizer = xn.Adam(0.01)
    for model in (xn.mlp(4, [5], 3, seed=0), xn.mlp(4, [7], 3, seed=0)):
        model.backward(model.forward(np.ones((2, 4), np.float32)))
        if model.layers[0].out_features == 5:
            optimizer.step(model)
        else:
            for _ in range(2):  # refused every time, not only the first
                with pytest.raises(ValueError, match="does not fit this model"):
                    optimizer.step(model)


def test_a_loss_subclass_is_not_replaced_by_the_fused_kernel():
    class Doubled(xn.SoftmaxCrossEntropy):
        def value_and_grad(self, z, target):
            value, grad = super().value_and_grad(z, target)
            return 2 * value, 2 * grad

    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    losses = []
    for loss in (xn.SoftmaxCrossEntropy(), Doubled()):
        model = xn.mlp(4, [5], 2, seed=0, device=xn.Device("cpu", fast=True))  # where the fused kernel is
        losses.append(xn.fit(model, loss, xn.SGD(0.0001), x, y, epochs=1, batch_size=64)["loss"][0])
    assert losses[1] == pytest.approx(2 * losses[0], rel=1e-5)


#: Runs in a child: the library as ``setup`` leaves it, then a short fit and what the device says.
_PROBE = r"""
import importlib.util, sys
setup, junk = sys.argv[1], sys.argv[2]
found = importlib.util.find_spec
if setup == "not-built":  # no library beside the sources, as after an install without a compiler
    importlib.util.find_spec = lambda name, *a: None if name == "xpnet._native.fused" else found(name, *a)
elif setup == "not-a-library":
    def find_spec(name, *a):
        spec = found(name, *a)
        if name == "xpnet._native.fused":
            spec.origin = junk
        return spec
    importlib.util.find_spec = find_spec
elif setup == "stale":
    from xpnet._native import sources
    sources.source_hash = lambda folder=None: "0" * 32
elif setup == "unreadable-sources":  # a packager left a header out: the library cannot be checked
    from xpnet._native import sources
    def missing(folder=None):
        raise FileNotFoundError(2, "No such file or directory", "pool.h")
    sources.source_hash = missing
import numpy as np
import xpnet as xn
model = xn.mlp(4, [5], 2, seed=0)
x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
history = xn.fit(model, "cross_entropy", "adam", x, (x[:, 0] > 0).astype(int), epochs=2, batch_size=16)
print(model.device.fast.native is None, history["loss"][-1] < history["loss"][0])
print(model.device.describe())
"""


@pytest.mark.parametrize(
    "setup, why",
    [
        ("not-built", "they were not built when xpnet was installed"),
        ("not-a-library", "cannot be loaded"),
        ("stale", "was built from other sources than these"),
        ("unreadable-sources", "their sources cannot be read to check"),
    ],
)
def test_missing_or_unusable_kernels_give_one_warning_line_and_numpy_passes(tmp_path, setup, why):
    import subprocess
    import sys

    junk = tmp_path / "fused.so"
    junk.write_bytes(b"\x7fELF not really a library")
    env = {key: value for key, value in os.environ.items() if key != "XPNET_NATIVE"}
    env["XPNET_FAST"] = "1"  # what is tested is the fast paths' fallback
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, setup, str(junk)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr  # never a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NativeKernelsWarning: xpnet: no compiled kernels: " in lines[0], result.stderr
    assert why in lines[0] and lines[0].endswith("NumPy passes run instead"), lines[0]
    trained, described = result.stdout.strip().splitlines()
    assert trained == "True True"  # the NumPy passes ran, and trained
    assert "fast paths on; no compiled kernels: " in described and why in described  # xpnet devices says why


def _build(tmp_path, *flags) -> Path:
    """The native sources compiled as setup.py compiles them (plus ``flags``) into tmp_path."""
    import subprocess

    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    folder = Path(xn.__file__).parent / "_native"
    library = tmp_path / f"fused{len(list(tmp_path.glob('*.so')))}.so"
    command = [
        *shlex.split(compiler),
        *("-std=c11", "-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-pthread", "-shared", *flags),
        str(folder / "fused.c"),
        str(folder / "pool.c"),
        "-o",
        str(library),
        "-lm",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return library


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_instruction_set_clones_give_the_baselines_numbers_bit_for_bit(tmp_path, dtype):
    """The installed library runs the best clone for this CPU (AVX-512 or AVX2 where present); a
    library of the baseline alone (-DXPNET_NO_CLONES) must compute the very same bits."""
    import ctypes

    from xpnet._fast_numpy import _declare

    fast = NumpyFastPaths()
    _require_native(fast)
    baseline = ctypes.CDLL(str(_build(tmp_path, "-DXPNET_NO_CLONES")))
    _declare(baseline)
    suffix = "_f32" if dtype == np.float32 else "_f64"
    rng = np.random.default_rng(11)
    n = 100_003  # not a multiple of any vector width: the loops' tails run too
    p, g, m = (rng.normal(size=n).astype(dtype) for _ in range(3))
    v = np.abs(rng.normal(size=n)).astype(dtype) * 1e-3
    v[:50] = np.finfo(dtype).tiny / 3  # subnormal moments: flushed by both
    a, da = rng.normal(size=n).astype(dtype), rng.normal(size=n).astype(dtype)
    z0, b = rng.normal(size=(101, 991)).astype(dtype), rng.normal(size=991).astype(dtype)
    results = []
    for lib in (fast.native, baseline):
        arrays, out, z = [x.copy() for x in (p, m, v, g)], np.empty(n, dtype), z0.copy()
        getattr(lib, "xpnet_adam" + suffix)(*(x.ctypes.data for x in arrays), n, 1e-3, 0.1, 0.001, 1e-8)
        getattr(lib, "xpnet_relu_backward" + suffix)(out.ctypes.data, a.ctypes.data, da.ctypes.data, n)
        getattr(lib, "xpnet_bias_act" + suffix)(z.ctypes.data, b.ctypes.data, 101, 991, 1)
        results.append([*arrays[:3], out, z])
    for mine, theirs in zip(*results):
        np.testing.assert_array_equal(mine.view(np.uint8), theirs.view(np.uint8))


def test_the_native_sources_compile_with_warnings_as_errors(tmp_path):
    """What CI's build does: every warning of gcc's -Wall -Wextra -Wpedantic is an error."""
    library = _build(tmp_path, "-Wall", "-Wextra", "-Wpedantic", "-Werror")
    assert library.stat().st_size > 10_000


def test_no_flag_ties_the_library_to_this_cpu():
    """-march=native (or -mtune=native, -mcpu=native) would make code that another CPU of the same
    architecture may not run, in a library that wheels and installed folders carry elsewhere."""
    import re

    setup = (Path(xn.__file__).parent.parent / "setup.py").read_text()
    flags = re.findall(r"extra_(?:compile|link)_args=\[([^\]]*)\]", setup)
    assert len(flags) == 2 and "-O3" in flags[0] and "-ffp-contract=off" in flags[0]
    assert not [flag for flag in flags if "native" in flag]


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "numpy"])
def test_relu_backward_keeps_where_semantics_for_non_finite_gradients(native):
    fast = NumpyFastPaths(native=native)
    if native:
        _require_native(fast)
    a = np.array([[0.0, 2.0, 0.0, 1.0]], np.float32)
    da = np.array([[np.nan, 3.0, np.inf, -1.0]], np.float32)
    out = fast.relu_backward(da, a, np.empty_like(a))
    np.testing.assert_array_equal(out, [[0.0, 3.0, 0.0, -1.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_accuracy_count_is_numpys_argmax(fast, dtype):
    _require_native(fast)
    z = _random(300, 10, dtype=dtype)
    z[:20] = np.round(z[:20])  # ties: the first maximum wins, as in np.argmax
    z[20, 3], z[21, 0], z[22, [2, 7]] = np.nan, np.nan, np.nan  # NaN: the first NaN wins
    z[23, 5] = np.inf
    labels = np.random.default_rng(1).integers(0, 10, 300)
    labels[:30] = np.argmax(z[:30], axis=1)  # the tie and NaN rows counted only if handled like NumPy
    expected = int(np.count_nonzero(np.argmax(z, axis=1) == labels))
    assert fast.count_correct(z, labels) == expected
    assert 30 <= expected < 300
    assert fast.count_correct(z[:, :1], labels) is None  # strided rows: the metric's own code
    assert fast.count_correct(z, labels.astype(np.int32)) is None
    accuracy, ops = xn.Accuracy(), xn.Device("cpu", fast=True).ops
    with ops.active():  # as fit and evaluate run it: through the NumPy Ops, the compiled count
        assert accuracy.count(z, labels) == (expected, 300)
        assert type(accuracy.count(z, labels)[0]) is int  # the kernel's count, not NumPy's
        assert int(accuracy.count(z, labels.astype(np.int32))[0]) == expected
        one_hot = np.eye(10, dtype=dtype)[labels]
        assert int(accuracy.count(z, one_hot)[0]) == expected
    assert int(accuracy.count(z, labels)[0]) == expected  # outside: the reference


def test_a_metric_without_a_fused_count_is_counted_as_written():
    class Recorded(xn.Metric):  # a user's metric that defines count only
        name = "recorded"

        def count(self, output, target):
            return np.count_nonzero(output[:, 0] > 0), output.shape[0]

    x = _random(64, 4)
    model = xn.mlp(4, [5], 2, seed=0)
    before = np.count_nonzero(model.forward(x, training=False)[:, 0] > 0)  # one batch: counted before its step
    logs = xn.fit(model, "cross_entropy", "sgd", x, (x[:, 0] > 0).astype(int), batch_size=64, metrics=[Recorded()])
    assert logs["recorded"][0] == before / 64 and 0 < before < 64


def test_an_accuracy_subclass_with_its_own_count_is_not_replaced_by_the_kernel():
    class TopTwo(xn.Accuracy):
        name = "top2"

        def count(self, output, target):
            top = np.argsort(output, axis=1)[:, -2:]
            return np.count_nonzero((top == target[:, None]).any(axis=1)), output.shape[0]

    x = _random(200, 6)
    y = np.random.default_rng(3).integers(0, 5, 200)
    model = xn.mlp(6, [8], 5, seed=0, device=xn.Device("cpu", fast=True))  # where the fused count is
    out = model.forward(x, training=False)
    expected = np.count_nonzero((np.argsort(out, axis=1)[:, -2:] == y[:, None]).any(axis=1)) / 200
    top1 = np.count_nonzero(out.argmax(axis=1) == y) / 200
    assert expected > top1  # the two counts differ on these data, so a swap would show
    assert xn.evaluate(model, "cross_entropy", x, y, metrics=[TopTwo()])["top2"] == expected
    before = expected
    logs = xn.fit(model, "cross_entropy", "sgd", x, y, batch_size=200, metrics=[TopTwo()])
    assert logs["top2"][0] == before  # one batch: counted before its step
