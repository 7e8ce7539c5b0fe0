"""End-to-end runs of the examples in their `--quick` mode, in-process.

Each example's `main(argv)` runs with a temporary output directory and seed 0;
the tests check that its metrics are finite and in range and that it wrote its
table and plots. The four runs take about a minute on 2 CPU cores.
"""

import importlib
import math
import pathlib
import sys

import keras
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

EXAMPLES_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _import_example(name):
    """Import examples/<name>.py (the examples import their shared `_common` module)."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    return importlib.import_module(name)


def _run_quick(name, directory):
    """Run an example with --quick and seed 0 in float32; return (metrics, output folder)."""
    module = _import_example(name)
    previous = keras.config.floatx()
    keras.config.set_floatx("float32")
    try:
        result = module.main(["--quick", "--seed", "0", "--output", str(directory)])
    finally:
        keras.config.set_floatx(previous)
    return result, directory / name


def _assert_files(folder, names):
    for name in names:
        path = folder / name
        assert path.is_file(), f"{path} was not written"
        assert path.stat().st_size > 0, f"{path} is empty"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The quick digits_transfer run, shared by the tests below (it is the slowest)."""
    return _run_quick("digits_transfer", tmp_path_factory.mktemp("digits"))


def test_digits_classification_metrics_in_range(digits_run):
    """Every classifier has accuracy and ECE in [0, 1], NLL > 0 and a positive wall time."""
    result, _ = digits_run
    classification = result["classification"]
    assert set(classification) == {"laplace", "variational", "map", "last_layer",
                                   "fine_tune", "fine_tune_6x", "scratch"}
    for method, by_shots in classification.items():
        assert list(by_shots) == [5], method
        entry = by_shots[5]
        assert 0.0 <= entry["accuracy"] <= 1.0, (method, entry)
        assert 0.0 <= entry["ece"] <= 1.0, (method, entry)
        assert math.isfinite(entry["nll"]), (method, entry)
        assert entry["nll"] > 0.0, (method, entry)
        assert entry["seconds"] > 0.0, (method, entry)


def test_digits_regression_metrics_finite(digits_run):
    """Every angle regressor has a finite MSE ≥ 0 and a finite Gaussian NLL."""
    result, _ = digits_run
    regression = result["regression"]
    assert set(regression) == {"linearized_gp", "last_layer", "fine_tune", "fine_tune_6x",
                               "scratch"}
    for method, by_size in regression.items():
        entry = by_size[50]
        assert math.isfinite(entry["mse"]), (method, entry)
        assert entry["mse"] >= 0.0, (method, entry)
        assert math.isfinite(entry["nll"]), (method, entry)


def test_digits_laplace_beats_last_layer_nll(digits_run):
    """At k = 5 the linearized Laplace posterior has NLL ≤ the retrained last layer (seed 0)."""
    classification = digits_run[0]["classification"]
    laplace = classification["laplace"][5]["nll"]
    last_layer = classification["last_layer"][5]["nll"]
    assert laplace <= last_layer, f"Laplace NLL {laplace:.3f} > last-layer NLL {last_layer:.3f}"


def test_digits_writes_tables_and_plots(digits_run):
    """The run writes its markdown tables and one PNG per plotted metric."""
    _, folder = digits_run
    _assert_files(folder, [
        "results.md", "classification.md", "regression.md", "classification_accuracy.png",
        "classification_nll.png", "classification_ece.png", "regression_mse.png",
        "regression_nll.png",
    ])


def test_sinusoid_quick_run(tmp_path):
    """Every method has finite MSE ≥ 0 and NLL at each context size; files are written."""
    result, folder = _run_quick("sinusoid_transfer", tmp_path)
    assert set(result) == {"ntk_gp", "rbf_gp", "ablr"}
    for method, by_size in result.items():
        assert list(by_size) == [5, 20], method
        for size, entry in by_size.items():
            assert math.isfinite(entry["mse"]), (method, size, entry)
            assert entry["mse"] >= 0.0, (method, size, entry)
            assert math.isfinite(entry["nll"]), (method, size, entry)
    _assert_files(folder, ["results.md", "mse.png", "nll.png", "posteriors.png"])


def test_jacobian_similarity_quick_run(tmp_path):
    """Similarities lie in [0, 1], and same-distribution pairs are more similar than shifted ones."""
    result, folder = _run_quick("jacobian_similarity", tmp_path)
    groups = result["groups"]
    for group, entry in groups.items():
        assert entry["count"] > 0, group
        assert 0.0 <= entry["mean"] <= 1.0, (group, entry)
    for accuracy in result["accuracy"].values():
        assert 0.0 <= accuracy <= 1.0
    same = min(groups["same half, other seed"]["mean"], groups["other half"]["mean"])
    shifted = max(groups["permuted pixels"]["mean"], groups["inverted images"]["mean"])
    assert same > shifted, groups
    _assert_files(folder, ["results.md", "similarity.png"])


def test_diabetes_quick_run(tmp_path):
    """Every method has finite MSE ≥ 0 and NLL, and a 90% coverage in [0, 1]; files are written."""
    result, folder = _run_quick("diabetes_shift", tmp_path)
    assert set(result) == {"linearized_gp", "source_only", "last_layer", "fine_tune",
                           "bayesian_ridge"}
    for method, by_size in result.items():
        entry = by_size[20]
        assert math.isfinite(entry["mse"]), (method, entry)
        assert entry["mse"] >= 0.0, (method, entry)
        assert math.isfinite(entry["nll"]), (method, entry)
        assert 0.0 <= entry["coverage_90"] <= 1.0, (method, entry)
    _assert_files(folder, ["results.md", "mse.png", "nll.png", "coverage_90.png"])
