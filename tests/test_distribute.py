"""Sharded products under tf.distribute.MirroredStrategy on two logical CPUs.

The comparison runs in its own processes (tests/_distributed_check.py), because
logical devices must be configured before TensorFlow initializes. Its two
sections, products and Fisher products, run at the same time.
"""

import os
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
    "adapt_parameter_finite_difference_mean",
    "streamed_jvp",
    "streamed_vjp",
    "streamed_fisher_finite_difference",
    "streamed_adapt_function_mean",
    "keras_predict",
    "streamed_reshuffle_error",
    "streamed_reshuffle_ntk_error",
]
# The cases of `FISHER_CASES` in tests/_distributed_check.py.
_FISHER_CASES = ["gaussian_n13", "categorical_n13", "bernoulli_n13", "categorical_n1"]
_FISHER_METHODS = ["ggn", "autodiff", "finite_difference", "central_difference"]
_FISHER_CHECKED = [
    f"fisher_{case}_{method}_{product}"
    for case in _FISHER_CASES
    for method in _FISHER_METHODS
    for product in ("matvec", "matmul", "diag")
]


@pytest.fixture(scope="module")
def differences():
    # The script imports the package from this checkout, installed or not.
    paths = [str(_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    sections = [
        subprocess.Popen(
            [sys.executable, str(_SCRIPT), section], cwd=_ROOT, env=environment, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for section in ("products", "fisher")
    ]
    lines = []
    try:
        for process in sections:
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-4000:]
            assert "replicas 2 sharded True" in stdout.splitlines(), stdout
            lines += stdout.splitlines()
    finally:
        for process in sections:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return {
        line.split()[1]: float(line.split()[2])
        for line in lines
        if line.startswith("max_abs_difference")
    }


@pytest.mark.parametrize("name", _CHECKED, ids=_CHECKED)
def test_sharded_equals_single_device(differences, name):
    """Each product and posterior moment under two replicas equals one device to 1e-10."""
    assert differences[name] <= 1e-10


@pytest.mark.parametrize("name", _FISHER_CHECKED, ids=_FISHER_CHECKED)
def test_sharded_fisher_equals_single_device(differences, name):
    """Each Fisher product under two replicas equals one device to 1e-10 in float64."""
    assert differences[name] <= 1e-10
