"""Sharded products under tf.distribute.MirroredStrategy on two logical CPUs.

The comparison runs in its own process (tests/_distributed_check.py), because
logical devices must be configured before TensorFlow initializes.
"""

import pathlib
import subprocess
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).with_name("_distributed_check.py")
_ROOT = _SCRIPT.parents[1]
_CHECKED = [
    "jvp",
    "vjp",
    "ntk_matmul",
    "ntk_matvec",
    "ntk_diag",
    "fisher_ggn",
    "adapt_function_mean",
    "adapt_function_variance",
    "adapt_parameter_mean",
    "adapt_parameter_variance",
]


@pytest.fixture(scope="module")
def differences():
    completed = subprocess.run(
        [sys.executable, str(_SCRIPT)], capture_output=True, text=True, cwd=_ROOT, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.splitlines()
    assert "replicas 2 sharded True" in lines, completed.stdout
    return {
        line.split()[1]: float(line.split()[2])
        for line in lines
        if line.startswith("max_abs_difference")
    }


@pytest.mark.parametrize("name", _CHECKED, ids=_CHECKED)
def test_sharded_equals_single_device(differences, name):
    """Each product and posterior moment under two replicas equals one device to 1e-10."""
    assert differences[name] <= 1e-10
