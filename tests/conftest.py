"""Fixtures shared by the core tests: float64 Keras and a cached model zoo."""

import pytest

import tf_linntk
from tests import reference


@pytest.fixture(scope="module")
def float64():
    """Build Keras layers in float64 for one test module; restore the settings after."""
    with reference.keras_float_dtype("float64"):
        yield


class ZooCache:
    """Zoo cases and their LinearizedModel wrappers, built on first use.

    Tracing the compiled products costs far more than running them on these small
    models, so all tests share the wrappers. Models keep the dtype they were built
    in, so the cache outlives the float64 settings it was built under.
    """

    def __init__(self):
        self._cases = {}
        self._wrappers = {}

    def case(self, name):
        """Return the `reference.ZooCase` called `name`, built in float64."""
        if name not in self._cases:
            with reference.keras_float_dtype("float64"):
                self._cases[name] = reference.build_case(name)
        return self._cases[name]

    def lin(self, name, batch_size=256):
        """Return a LinearizedModel of the zoo model `name` with `batch_size`."""
        key = (name, batch_size)
        if key not in self._wrappers:
            self._wrappers[key] = tf_linntk.LinearizedModel(
                self.case(name).model, batch_size=batch_size
            )
        return self._wrappers[key]


@pytest.fixture(scope="session")
def zoo():
    """A session-wide `ZooCache` of float64 zoo models."""
    return ZooCache()
