"""Backends for the test suite.

Every test that takes the ``backend`` fixture runs once per backend: ``numpy``, ``strict``
(array-api-strict's CPU device), ``strict:device1`` (a non-default device that refuses host
conversions and device mixing, standing in for a GPU), ``strict:no_float64`` (refuses float64),
``torch`` (PyTorch tensors on the CPU through array-api-compat: the reference code on a library
that is not NumPy; skipped without PyTorch) and ``cuda`` (CuPy; skipped without a CUDA device).
``backend64`` leaves out no_float64.
``pytest --backend numpy --backend cuda`` restricts the run to the named backends.
"""

from __future__ import annotations

import numpy as np
import pytest

import xpnet

BACKENDS = ["numpy", "strict", "strict:device1", "strict:no_float64", "torch", "cuda"]
DEVICE_OF = {"numpy": "cpu", "cuda": "cuda:0"}


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="run backend-parametrized tests on this backend only (repeatable)",
    )


def _unavailable(backend: str) -> str | None:
    try:
        xpnet.Device(DEVICE_OF.get(backend, backend))
    except (xpnet.DeviceError, ImportError) as exc:
        return str(exc)
    return None


def _params(config, names):
    chosen = config.getoption("--backend") or BACKENDS
    return [name for name in names if name in chosen]


def pytest_generate_tests(metafunc):
    for fixture, names in (("backend", BACKENDS), ("backend64", [b for b in BACKENDS if b != "strict:no_float64"])):
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, _params(metafunc.config, names), indirect=True)


def _backend(request):
    reason = _unavailable(request.param)
    if reason:
        pytest.skip(f"backend {request.param} unavailable: {reason}")
    return DEVICE_OF.get(request.param, request.param)


@pytest.fixture
def backend(request) -> str:
    """A device string for each backend (float32 tests)."""
    return _backend(request)


@pytest.fixture
def backend64(request) -> str:
    """A device string for each backend that has float64."""
    return _backend(request)


def on(device: xpnet.Device, values, dtype="float32"):
    """A device array from nested lists / NumPy values."""
    return device.to_device(np.asarray(values), dtype)


def host(device: xpnet.Device, x) -> np.ndarray:
    return np.asarray(device.to_host(x))


def assert_on_device(device: xpnet.Device, x, dtype) -> None:
    """x lives in the device's namespace, on its device, with the expected dtype."""
    import array_api_compat

    assert array_api_compat.array_namespace(x) is device.xp
    assert array_api_compat.device(x) == device.native
    assert x.dtype == device.dtype(dtype)


def assert_one_line_error(result, code: int, pattern: str) -> None:
    """A CliRunner result that failed with ``code`` and one stderr line matching ``pattern``."""
    import re

    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert re.search(pattern, lines[0]), lines[0]


def write_mnist_slice(folder, train: int, test: int):
    """The first ``train`` training and ``test`` test images of MNIST, as the four IDX files in
    ``folder``: a CNN's epoch on them takes seconds. Returns the folder."""
    from xpnet.data import load_dataset, write_idx

    ds = load_dataset("mnist", flatten=False)
    for split, stem, n in ((ds.train, "train", train), (ds.test, "t10k", test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", np.round(split.x[:n] * 255).astype(np.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte", split.y[:n].astype(np.uint8))
    return folder


def train_json(invoke, folder, run, *extra) -> dict:
    """``xpnet train`` on the IDX files in ``folder`` into ``run`` (batch 64, val split 0.1, --json),
    through ``invoke``; its summary, after asserting exit code 0."""
    import json

    result = invoke(
        "train", "--data-dir", folder, "--batch-size", 64, "--val-split", 0.1, "--out", run, "--json", *extra
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)
