"""Device strings, host/device transfers, dtypes and the seeded random streams."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
from conftest import assert_on_device, host, on

import xpnet
from xpnet.backend import Device, DeviceError


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("cpu", "cpu"),
        ("CPU", "cpu"),
        ("strict", "strict"),
        ("strict:device1", "strict:device1"),
        ("strict:no_float64", "strict:no_float64"),
    ],
)
def test_device_strings_resolve(name, canonical):
    assert Device(name).name == canonical


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu:0", "strict:device9", "", "cuda:-1"])
def test_unknown_device_strings_are_refused(name):
    with pytest.raises(DeviceError, match="device"):
        Device(name)


def test_non_string_device_is_refused():
    with pytest.raises(DeviceError, match="string"):
        Device(0)


def test_cuda_without_cupy_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(DeviceError, match=r"needs CuPy.*xpnet\[cuda12\]"):
        Device("cuda")


def test_float64_refused_on_no_float64_device():
    device = Device("strict:no_float64")
    assert not device.supports_float64
    with pytest.raises(ValueError, match="does not support float64"):
        device.dtype("float64")
    with pytest.raises(ValueError, match="does not support float64"):
        xpnet.Sequential([xpnet.Dense(2, 2)], device=device, dtype="float64")


def test_unknown_dtype_refused():
    with pytest.raises(ValueError, match="float16"):
        Device("cpu").dtype("float16")


def test_transfers_round_trip(backend):
    device = Device(backend)
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    x = device.to_device(values)
    assert_on_device(device, x, "float32")
    np.testing.assert_array_equal(host(device, x), values)
    labels = device.to_device(np.array([3, 1, 2]))
    assert device.xp.isdtype(labels.dtype, "integral")


def test_transfer_between_strict_devices():
    a = Device("strict:device1")
    b = Device("strict")
    x = on(a, [[1.0, 2.0]])
    y = b.to_device(x)
    assert y.device == b.native
    np.testing.assert_array_equal(host(b, y), [[1.0, 2.0]])


def test_same_seed_same_initial_weights_on_every_backend(backend):
    def weights(name):
        model = xpnet.Sequential([xpnet.Dense(5, 7), xpnet.ReLU(), xpnet.Dense(7, 3)], device=name, seed=42)
        return {k: host(model.device, v) for k, v in model.named_parameters().items()}

    reference, here = weights("cpu"), weights(backend)
    assert reference.keys() == here.keys()
    for key in reference:
        np.testing.assert_array_equal(here[key], reference[key])  # bit-identical
    other_seed = xpnet.Sequential([xpnet.Dense(5, 7)], device="cpu", seed=43)
    assert not np.array_equal(host(other_seed.device, other_seed.named_parameters()["0.W"]), reference["0.W"])


def test_same_seed_same_batch_order(backend):
    orders = [host(Device(name, seed=7), Device(name, seed=7).permutation(50)) for name in ("cpu", backend)]
    np.testing.assert_array_equal(orders[0], orders[1])
    assert sorted(orders[0].tolist()) == list(range(50))
    device = Device(backend, seed=7)
    first, second = host(device, device.permutation(50)), host(device, device.permutation(50))
    assert not np.array_equal(first, second)  # a new order every epoch


def test_dropout_stream_identical_across_backends(backend):
    draws = {}
    for name in ("cpu", backend):
        device = Device(name, seed=3)
        draws[name] = [host(device, device.random((64, 33), "float32")) for _ in range(3)]
    for a, b in zip(draws["cpu"], draws[backend]):
        np.testing.assert_array_equal(a, b)
    first, second, third = draws["cpu"]
    assert not np.array_equal(first, second) and not np.array_equal(second, third)


def test_random_stream_is_uniform():
    device = Device("cpu", seed=0)
    u = host(device, device.random((200_000,), "float32"))
    assert u.dtype == np.float32
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.003
    assert abs(u.var() - 1 / 12) < 0.002
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - 20_000) < 600)  # ~4.4 standard deviations
    # neighbouring elements and consecutive draws are uncorrelated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    v = host(device, device.random((200_000,), "float32"))
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.01


def test_rng_state_round_trip(backend):
    device = Device(backend, seed=11)
    device.permutation(10)
    state = device.rng_state()
    expected = (
        host(device, device.permutation(10)),
        host(device, device.random((4, 4), "float32")),
        host(device, device.normal((3,), 1.0, "float32")),
    )
    device.set_rng_state(state)
    again = (
        host(device, device.permutation(10)),
        host(device, device.random((4, 4), "float32")),
        host(device, device.normal((3,), 1.0, "float32")),
    )
    for a, b in zip(expected, again):
        np.testing.assert_array_equal(a, b)


def test_seed_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="seed"):
        Device("cpu", seed=-1)


def test_available_devices_lists_cpu_and_strict():
    names = xpnet.available_devices()
    assert names[0] == "cpu"
    assert "strict:device1" in names


LIBRARY = pathlib.Path(xpnet.__file__).parent
# The backend and its NumPy fast paths (handed out by the backend only), and the host-side I/O:
# the data package (files before anything reaches a device) and io.py (checkpoints: host copies).
ALLOWED_TO_IMPORT_NUMPY = {"backend.py", "backends", "_fast_numpy.py", "data", "io.py"}


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def test_only_the_backend_modules_import_numpy_or_cupy():
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        relative = path.relative_to(LIBRARY)
        if relative.parts[0] in ALLOWED_TO_IMPORT_NUMPY:
            continue
        offenders += [f"{relative}: {n}" for n in _imports(path) if n.split(".")[0] in ("numpy", "cupy")]
    assert offenders == []
    # and the check itself sees imports: the backend module does import numpy
    assert "numpy" in _imports(LIBRARY / "backend.py")


def test_only_the_backends_package_names_a_device_library():
    """CuPy, array-api-strict and PyTorch each live in one backend class: no other module imports them."""
    libraries = ("cupy", "array_api_strict", "torch")
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        relative = path.relative_to(LIBRARY)
        if relative.parts[0] == "backends" or relative.name == "_fast_cupy.py":
            continue
        offenders += [f"{relative}: {n}" for n in _imports(path) if n.split(".")[0] in libraries]
    assert offenders == []
    found = {n.split(".")[0] for p in (LIBRARY / "backends").glob("*.py") for n in _imports(p)}
    assert set(libraries) <= found  # the check sees the imports where they are


def _lowbias32_in_uint32(x: np.ndarray) -> np.ndarray:
    """The dropout hash written independently, in NumPy's wrapping uint32 arithmetic."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def test_the_dropout_hash_is_uint32_arithmetic_on_every_backend(backend):
    """The stream is computed in int64 with a split multiply (not every library has uint32
    arithmetic): its draws equal the uint32 formula's, so masks are those of earlier versions."""
    from xpnet._random import _U32, _mix32

    device = Device(backend, seed=5)
    k0, k1 = device._dropout_key
    key = _mix32(k0 ^ _mix32((0 * 0x9E3779B9 + k1) & _U32))
    with np.errstate(over="ignore"):
        counters = np.arange(1000, dtype=np.uint32) * np.uint32(0x9E3779B9)
    bits = _lowbias32_in_uint32(_lowbias32_in_uint32(counters ^ np.uint32(key)) ^ np.uint32(k1))
    expected = ((bits >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)).reshape(10, 100)
    np.testing.assert_array_equal(host(device, device.random((10, 100), "float32")), expected)


@pytest.mark.parametrize("name", ["torch:tpu", "torch:cuda:x", "torch:cuda:-1"])
def test_malformed_torch_device_strings_are_refused(name):
    with pytest.raises(DeviceError, match="PyTorch device|unknown"):
        Device(name)


def test_torch_backend_strings_and_transfers():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not tested")
    device = Device("torch", seed=0)
    assert device.name == "torch" and Device("torch:cpu").name == "torch"
    x = device.to_device(np.arange(6.0).reshape(2, 3), "float32")
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and device.owns(x)
    np.testing.assert_array_equal(device.to_host(x), np.arange(6.0, dtype=np.float32).reshape(2, 3))
    assert Device("cpu").to_device(x).dtype == np.float32  # a tensor moves to NumPy
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="PyTorch sees no CUDA GPU"):
            Device("torch:cuda:0")
    assert "PyTorch" in device.describe() and device.fast is None
