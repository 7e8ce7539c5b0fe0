"""Static checks: ruff over the package, tests, examples and benchmarks."""

import pathlib
import shutil
import subprocess

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_reports_nothing():
    """`ruff check` with the pyproject.toml settings finds no problem."""
    completed = subprocess.run(
        ["ruff", "check", "tf_linntk", "tests", "examples", "bench", "docs"],
        cwd=_ROOT, capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
