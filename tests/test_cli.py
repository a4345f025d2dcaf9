"""The placeholder ``xpnet`` entry point (the full command line is a later issue)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import xpnet
from cli.main import main


def test_version_and_devices(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert f"xpnet {xpnet.__version__}" in out
    assert "devices: cpu" in out


def test_unknown_command_exits_2(capsys):
    assert main(["train"]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_installed_console_script_runs():
    script = shutil.which("xpnet")
    if script is None:
        pytest.skip("xpnet is not installed as a console script here (pip install -e .)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith(f"xpnet {xpnet.__version__}")
