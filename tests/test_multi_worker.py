"""Sharded products under tf.distribute.MultiWorkerMirroredStrategy with two workers.

Two worker processes on this machine's loopback address run
tests/_multi_worker_check.py with `TF_CONFIG` set, as two machines would.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).with_name("_multi_worker_check.py")
_ROOT = _SCRIPT.parents[1]
_NUM_WORKERS = 2
_CHECKED = [
    "jvp",
    "vjp",
    "ntk_matvec",
    "fisher_ggn",
    "streamed_jvp",
    "streamed_vjp",
    "adapt_function_mean",
    "adapt_function_variance",
    "adapt_parameter_mean",
    "adapt_parameter_variance",
]


def _free_loopback_ports(count):
    """Return `count` TCP ports that are free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _run_workers():
    addresses = [f"127.0.0.1:{port}" for port in _free_loopback_ports(_NUM_WORKERS)]
    workers = []
    for index in range(_NUM_WORKERS):
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        # The checkout goes first on the path, so the workers import this tf_linntk.
        paths = [str(_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        environment = dict(
            os.environ, TF_CONFIG=json.dumps(config), CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=os.pathsep.join(paths),
        )
        workers.append(subprocess.Popen(
            [sys.executable, str(_SCRIPT)], cwd=_ROOT, env=environment, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))
    outputs = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=600)
            outputs.append((worker.returncode, stdout, stderr))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return outputs


@pytest.fixture(scope="module")
def differences():
    """Return each worker's max differences by quantity name."""
    per_worker = []
    for returncode, stdout, stderr in _run_workers():
        assert returncode == 0, stderr[-4000:]
        lines = stdout.splitlines()
        assert f"replicas {_NUM_WORKERS} sharded True" in lines, stdout
        per_worker.append({
            line.split()[1]: float(line.split()[2])
            for line in lines
            if line.startswith("max_abs_difference")
        })
    return per_worker


@pytest.mark.parametrize("name", _CHECKED, ids=_CHECKED)
def test_multi_worker_equals_single_device(differences, name):
    """Each product and posterior moment on two workers equals one device to 1e-10."""
    for worker, values in enumerate(differences):
        assert values[name] <= 1e-10, f"worker {worker}: {name} differs by {values[name]}"
