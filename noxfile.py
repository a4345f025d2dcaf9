"""nox sessions: the test suite per backend, CPU/device parity, and lint.

    nox -s tests-numpy      NumPy on the CPU
    nox -s tests-strict     array-api-strict: its CPU device, device1 and no_float64
    nox -s tests-cuda       CuPy on a CUDA GPU (skips itself when no GPU is present)
    nox -s tests-reference  every backend here with the fast paths off (XPNET_FAST=0): the Array
                            API reference code alone (tests of the fast paths themselves skip)
    nox -s parity           CPU against GPU (`nox -s parity -- strict:device1` without a GPU)
    nox -s lint             ruff

Each session installs xpnet with its test dependencies into a fresh virtual environment. On a
machine without a package index (such as a lent GPU box), run them against what is installed:
``nox --no-venv -s tests-cuda``. CuPy comes from the ``cuda12`` extra, or ``cuda13`` with
XPNET_CUDA=13.
"""

from __future__ import annotations

import os
import shutil

import nox

BACKENDS = {
    "numpy": ["--backend", "numpy"],
    "strict": ["--backend", "strict", "--backend", "strict:device1", "--backend", "strict:no_float64"],
    "cuda": ["--backend", "cuda"],
}
nox.options.sessions = [*(f"tests-{b}" for b in BACKENDS), "tests-reference", "parity", "lint"]


def _installing(session) -> bool:
    """False under --no-venv: then the session uses the packages already installed."""
    return not isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv)


def _cupy_extra() -> str:
    return "cuda13" if os.environ.get("XPNET_CUDA") == "13" else "cuda12"


def _tests(session, backend):
    if backend == "cuda" and shutil.which("nvidia-smi") is None:
        session.skip("no CUDA device here (nvidia-smi not found): the cuda backend is not tested")
    if _installing(session):
        extras = f"dev,{_cupy_extra()}" if backend == "cuda" else "dev"
        session.install("-e", f".[{extras}]")
    if backend == "cuda":
        session.run("python", "-c", "import xpnet; xpnet.Device('cuda')")  # fails loudly if CuPy cannot see a GPU
    session.run("python", "-m", "pytest", *BACKENDS[backend], *session.posargs)


def _tests_session(backend):
    def run(session):
        _tests(session, backend)

    run.__doc__ = f"pytest on the {backend} backend ({' '.join(BACKENDS[backend])})"
    return nox.session(name=f"tests-{backend}")(run)


for _backend in BACKENDS:
    _tests_session(_backend)


@nox.session(name="tests-mpi")
def tests_mpi(session):
    """The data-parallel tests under mpiexec -n 2 (mpi4py and MPICH from the package index; with
    --no-venv, the MPI already installed), required to run: they fail rather than skip."""
    if _installing(session):
        session.install("-e", ".[dev,mpi]", "mpich")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/test_mpi.py",
        "tests/test_distributed.py",
        *session.posargs,
        env={"XPNET_REQUIRE_MPI": "1"},
    )


@nox.session(name="tests-reference")
def tests_reference(session):
    """pytest with the fast paths off (XPNET_FAST=0), on every backend available here

    (CuPy too where there is a GPU): the Array API reference code alone must pass the whole suite."""
    if _installing(session):
        gpu = shutil.which("nvidia-smi") is not None
        session.install("-e", f".[dev,{_cupy_extra()}]" if gpu else ".[dev]")
    session.run("python", "-m", "pytest", *session.posargs, env={"XPNET_FAST": "0"})


@nox.session
def parity(session):
    """xpnet parity: the same seeded training on the CPU and on a device (default cuda; pass
    another after --, e.g. `nox -s parity -- strict:device1`, to run it without a GPU)."""
    device = session.posargs[0] if session.posargs else "cuda"
    if device.startswith("cuda") and shutil.which("nvidia-smi") is None:
        session.skip("no CUDA device here (nvidia-smi not found): run `nox -s parity -- strict:device1` instead")
    if _installing(session):
        session.install("-e", f".[dev,{_cupy_extra()}]" if device.startswith("cuda") else ".[dev]")
    session.run("xpnet", "parity", "--device", device)


@nox.session
def lint(session):
    if _installing(session):
        session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
