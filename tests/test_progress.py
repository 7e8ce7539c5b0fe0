"""Tests of progress reporting: Keras progress bars at verbose=1, silence at verbose=0, and logs.

At verbose=1 the solvers run their compiled loops in chunks of iterations, so
these tests also check that chunked and single-loop runs agree bit for bit.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tests import reference
from tf_linntk import _progress
from tf_linntk import preconditioners
from tf_linntk import solvers

_SOLVER_LOGGER = "tf_linntk.solvers"


def _spd_matrix(size, shift, seed):
    """Return A Aᵀ/‖A Aᵀ‖₂ + shift·I [size, size], with condition number about 1/shift."""
    a = np.random.default_rng(seed).standard_normal((size, size))
    gram = a @ a.T
    return gram / np.linalg.norm(gram, 2) + shift * np.eye(size)


def _operator(matrix):
    return tf.linalg.LinearOperatorFullMatrix(tf.constant(matrix), is_self_adjoint=True)


def _rhs(size, columns, seed=1):
    return np.random.default_rng(seed).standard_normal((size, columns))


@pytest.fixture
def one_iteration_chunks(monkeypatch):
    """Make every chunk one iteration long, so chunked runs have the most chunk boundaries."""
    monkeypatch.setattr(_progress, "MAX_CHUNK_ITERATIONS", 1)


def _assert_records_equal(record, expected):
    np.testing.assert_array_equal(record.iterations, expected.iterations)
    np.testing.assert_array_equal(record.relative_residual, expected.relative_residual)
    np.testing.assert_array_equal(record.converged, expected.converged)
    assert record.max_iterations == expected.max_iterations
    assert record.tolerance == expected.tolerance


# ---------------------------------------------------------------------- conjugate gradients


def _cg_case(name):
    """Return (operator, rhs, keyword arguments) of a float64 solve named `name`."""
    matrix = _spd_matrix(80, 1e-3, seed=2)
    rhs = _rhs(80, 3)
    rhs[:, 2] = 0.0  # a zero column starts converged
    if name == "plain":
        return _operator(matrix), rhs, dict(tol=1e-10)
    if name == "preconditioned":
        preconditioner = preconditioners.pivoted_cholesky_preconditioner(
            _operator(matrix - 1e-3 * np.eye(80)), 10, shift=1e-3
        )
        return _operator(matrix), rhs, dict(tol=1e-10, preconditioner=preconditioner)
    if name == "initial_guess":
        return _operator(matrix), rhs, dict(tol=1e-10, x0=0.5 * rhs)
    if name == "unconverged":
        return _operator(matrix), rhs, dict(tol=1e-14, max_iterations=17, on_nonconvergence="ignore")
    return (lambda v: tf.matmul(tf.constant(matrix), v)), rhs, dict(tol=1e-10)  # callable


@pytest.mark.parametrize(
    "case", ["plain", "preconditioned", "initial_guess", "unconverged", "callable"]
)
@pytest.mark.usefixtures("one_iteration_chunks")
def test_conjugate_gradient_chunked_equals_single_loop(case, capsys):
    """A verbose=1 solve in one-iteration chunks returns the verbose=0 solution and record bit for bit."""
    operator, rhs, options = _cg_case(case)

    expected, expected_record = solvers.conjugate_gradient(operator, rhs, **options)
    solution, record = solvers.conjugate_gradient(operator, rhs, verbose=1, **options)

    np.testing.assert_array_equal(solution.numpy(), expected.numpy())
    _assert_records_equal(record, expected_record)
    assert "relative_residual" in capsys.readouterr().out


def test_conjugate_gradient_default_chunks_equal_single_loop():
    """With the default time-based chunk sizes the verbose=1 solve is bit-identical too."""
    operator, rhs, options = _cg_case("plain")

    expected, expected_record = solvers.conjugate_gradient(operator, rhs, **options)
    solution, record = solvers.conjugate_gradient(operator, rhs, verbose=1, **options)

    np.testing.assert_array_equal(solution.numpy(), expected.numpy())
    _assert_records_equal(record, expected_record)


def test_conjugate_gradient_progress_bar_shows_iterations(capsys):
    """verbose=1 prints a bar with the iterations run out of max_iterations and the residual."""
    operator, rhs, options = _cg_case("plain")

    _, record = solvers.conjugate_gradient(operator, rhs, max_iterations=500, verbose=1, **options)

    output = capsys.readouterr().out
    assert f"{int(np.max(record.iterations))}/500" in output
    assert "relative_residual" in output
    assert "/iteration" in output


def test_conjugate_gradient_verbose_zero_prints_nothing(capsys):
    """verbose=0 (the default) writes nothing to stdout or stderr."""
    operator, rhs, options = _cg_case("plain")

    solvers.conjugate_gradient(operator, rhs, verbose=0, **options)

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_conjugate_gradient_verbose_in_tf_function(capsys):
    """Under an outer tf.function verbose=1 prints nothing and returns the eager verbose=0 solution."""
    operator = _operator(_spd_matrix(30, 0.1, seed=3))
    rhs = _rhs(30, 2)

    @tf.function
    def solve(rhs):
        return solvers.conjugate_gradient(operator, rhs, tol=1e-12, verbose=1)[0]

    solution = solve(tf.constant(rhs))

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""
    expected, _ = solvers.conjugate_gradient(operator, rhs, tol=1e-12)
    # A graph may order the reductions differently, so agreement is to rounding, not bitwise.
    np.testing.assert_allclose(solution.numpy(), expected.numpy(), rtol=1e-12, atol=1e-14)


def test_conjugate_gradient_verbose_graph_has_no_python_callback():
    """verbose=1 adds no Python callback op to an outer graph beyond the one verbose=0 has."""
    operator = _operator(_spd_matrix(30, 0.1, seed=4))
    spec = tf.TensorSpec([30, 1], tf.float64)

    def callback_ops(verbose):
        solve = tf.function(lambda rhs: solvers.conjugate_gradient(operator, rhs, verbose=verbose)[0])
        graph = solve.get_concrete_function(spec).graph
        return sorted(op.type for op in graph.get_operations() if "PyFunc" in op.type)

    assert callback_ops(1) == callback_ops(0)


# ---------------------------------------------------------------------- logging


def test_conjugate_gradient_logs_start_and_stop(caplog):
    """A converged solve logs its start (size, columns, tol, max_iterations) and its stop at INFO."""
    operator, rhs, options = _cg_case("plain")

    with caplog.at_level(logging.INFO, logger=_SOLVER_LOGGER):
        solvers.conjugate_gradient(operator, rhs, max_iterations=300, **options)

    records = [r for r in caplog.records if r.name == _SOLVER_LOGGER]
    messages = [r.getMessage() for r in records]
    assert messages[0] == (
        "conjugate_gradient: start, size M=80, 3 column(s), tol=1e-10, max_iterations=300, "
        "preconditioner=NoneType"
    )
    assert messages[1].startswith("conjugate_gradient: stop, ConvergenceRecord(")
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]


def test_conjugate_gradient_logs_nonconvergence_warning(caplog):
    """An unconverged solve with on_nonconvergence="warn" logs the message at WARNING."""
    operator, rhs, options = _cg_case("unconverged")
    options["on_nonconvergence"] = "warn"

    with caplog.at_level(logging.INFO, logger=_SOLVER_LOGGER):
        with pytest.warns(solvers.ConvergenceWarning):
            solvers.conjugate_gradient(operator, rhs, **options)

    warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1
    assert warnings_logged[0].name == _SOLVER_LOGGER
    assert "did not converge for 2 of 3" in warnings_logged[0].getMessage()


def test_conjugate_gradient_ignored_nonconvergence_logs_info(caplog):
    """With on_nonconvergence="ignore" the non-convergence is logged at INFO, not WARNING."""
    operator, rhs, options = _cg_case("unconverged")

    with caplog.at_level(logging.INFO, logger=_SOLVER_LOGGER):
        solvers.conjugate_gradient(operator, rhs, **options)

    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("did not converge" in r.getMessage() for r in caplog.records)


def test_conjugate_gradient_logs_chunks_at_debug(caplog):
    """At verbose=1 each chunk logs its iteration count and residual at DEBUG."""
    operator, rhs, options = _cg_case("plain")

    with caplog.at_level(logging.DEBUG, logger=_SOLVER_LOGGER):
        _, record = solvers.conjugate_gradient(operator, rhs, verbose=1, **options)

    chunks = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert chunks
    assert chunks[-1].startswith(f"conjugate_gradient: iteration {int(np.max(record.iterations))} of ")
    assert "relative_residual=" in chunks[-1]


# ---------------------------------------------------------------------- Lanczos


@pytest.mark.parametrize("breakdown", [False, True], ids=["full", "breakdown"])
@pytest.mark.usefixtures("one_iteration_chunks")
def test_lanczos_chunked_equals_single_loop(breakdown, capsys):
    """A verbose=1 Lanczos run in one-iteration chunks returns the verbose=0 results bit for bit."""
    if breakdown:
        # 3 distinct eigenvalues, so Lanczos stops after 3 steps.
        matrix = np.diag(np.repeat([3.0, 2.0, 1.0], 10))
    else:
        matrix = _spd_matrix(40, 1e-2, seed=5)

    expected = solvers.lanczos(_operator(matrix), 20, seed=3)
    result = solvers.lanczos(_operator(matrix), 20, seed=3, verbose=1)

    for value, reference_value in zip(result, expected):
        np.testing.assert_array_equal(value.numpy(), reference_value.numpy())
    assert "relative_beta" in capsys.readouterr().out


def test_lanczos_progress_bar_shows_iterations(capsys):
    """verbose=1 prints a bar with the Lanczos iterations out of the requested number."""
    values, _ = solvers.lanczos_eigh(_operator(_spd_matrix(40, 1e-2, seed=6)), 25, seed=0, verbose=1)

    output = capsys.readouterr().out
    assert values.shape == (25,)
    assert "25/25" in output
    assert "relative_beta" in output


def test_lanczos_verbose_zero_prints_nothing(capsys):
    """verbose=0 Lanczos writes nothing to stdout or stderr."""
    solvers.lanczos_inverse_root(_operator(_spd_matrix(40, 1e-2, seed=7)), 10, seed=0)

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_lanczos_logs_start_and_stop(caplog):
    """Lanczos logs its start and the iterations run at INFO on the solvers logger."""
    with caplog.at_level(logging.INFO, logger=_SOLVER_LOGGER):
        solvers.lanczos(_operator(np.diag(np.repeat([3.0, 2.0, 1.0], 10))), 20, seed=3)

    messages = [r.getMessage() for r in caplog.records if r.name == _SOLVER_LOGGER]
    assert messages == [
        "lanczos: start, size M=30, num_iterations=20",
        "lanczos: stop after 3 of 20 requested iterations",
    ]


def test_lanczos_verbose_in_tf_function(capsys):
    """Under an outer tf.function verbose=1 Lanczos prints nothing and returns the eager result."""
    operator = _operator(_spd_matrix(30, 0.1, seed=8))

    @tf.function
    def tridiagonalize():
        return solvers.lanczos(operator, 10, seed=3, verbose=1)

    graph_results = tridiagonalize()

    assert capsys.readouterr().out == ""
    # A graph may order the reductions differently, so agreement is to rounding, not bitwise.
    for graph, eager in zip(graph_results, solvers.lanczos(operator, 10, seed=3)):
        np.testing.assert_allclose(graph.numpy(), eager.numpy(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- invalid verbose


_INVALID_VERBOSE = [True, False, 2, -1, 1.0, "1", None]


@pytest.mark.parametrize("verbose", _INVALID_VERBOSE, ids=repr)
def test_conjugate_gradient_rejects_invalid_verbose(verbose):
    """verbose other than the ints 0 and 1 raises a ValueError naming it and the received value."""
    with pytest.raises(ValueError, match=rf"`verbose` must be 0 \(silent\) or 1 .*received {verbose!r}"):
        solvers.conjugate_gradient(_operator(np.eye(3)), np.ones(3), verbose=verbose)


@pytest.mark.parametrize("verbose", _INVALID_VERBOSE, ids=repr)
def test_lanczos_rejects_invalid_verbose(verbose):
    """lanczos rejects the same invalid verbose values with the same message."""
    with pytest.raises(ValueError, match=rf"`verbose` must be 0 \(silent\) or 1 .*received {verbose!r}"):
        solvers.lanczos(_operator(np.eye(3)), 2, seed=0, verbose=verbose)


def test_conjugate_gradient_accepts_numpy_integer_verbose(capsys):
    """A NumPy integer 1 counts as verbose=1."""
    solvers.conjugate_gradient(_operator(np.eye(3)), np.ones(3), verbose=np.int64(1))

    assert "1/" in capsys.readouterr().out


# ---------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def regression_lin():
    """A LinearizedModel of a 2-4-1 float64 tanh MLP (P = 17) and 6 training examples."""
    model = reference.tanh_mlp()
    with reference.keras_float_dtype("float64"):
        lin = tf_linntk.LinearizedModel(model)
    return lin, reference.regression_data(6)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_regression_adapt_verbose_shows_cg_and_lanczos(regression_lin, space, capsys):
    """adapt(verbose=1) prints one bar for the CG solve of the mean and one for Lanczos."""
    lin, (x, y) = regression_lin

    lin.adapt(x, y, noise_variance=0.1, variance_rank=4, space=space, seed=0, verbose=1)

    output = capsys.readouterr().out
    assert "relative_residual" in output
    assert "relative_beta" in output
    assert "4/4" in output


def test_regression_adapt_verbose_zero_prints_nothing(regression_lin, capsys):
    """adapt(verbose=0) writes nothing to stdout or stderr."""
    lin, (x, y) = regression_lin

    lin.adapt(x, y, noise_variance=0.1, variance_rank=4, seed=0, verbose=0)

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


@pytest.fixture(scope="module")
def classification_lin():
    """A LinearizedModel of one float64 Dense layer 3 -> 3 (P = 12) and 30 labelled examples."""
    rng = np.random.default_rng(9)
    features = rng.standard_normal((30, 3))
    labels = np.argmax(features @ rng.standard_normal((3, 3)), axis=1)
    with reference.keras_float_dtype("float64"):
        inputs = keras.Input((3,))
        dense = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(seed=1))
        model = keras.Model(inputs, dense(inputs))
        lin = tf_linntk.LinearizedModel(model)
    return lin, features, labels


def test_classification_map_verbose_zero_prints_nothing(classification_lin, capsys):
    """The MAP fit at verbose=0 writes nothing to stdout or stderr."""
    lin, features, labels = classification_lin

    lin.adapt(features, labels, likelihood="categorical", inference="map", seed=0, verbose=0)

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_classification_map_verbose_shows_only_newton_bar(classification_lin, capsys):
    """The Newton–CG MAP at verbose=1 shows its step bar and keeps the inner CG solves silent."""
    lin, features, labels = classification_lin

    lin.adapt(features, labels, likelihood="categorical", inference="map", seed=0, verbose=1)

    output = capsys.readouterr().out
    steps = int(lin.posterior.convergence["map"].iterations[0])
    assert f"{steps}/50" in output
    assert "gradient_norm" in output
    assert "relative_residual" not in output


def test_classification_laplace_verbose_shows_lanczos_bar(classification_lin, capsys):
    """Laplace at verbose=1 adds a bar over the Lanczos steps of the covariance."""
    lin, features, labels = classification_lin

    lin.adapt(features, labels, likelihood="categorical", variance_rank=5, seed=0, verbose=1)

    output = capsys.readouterr().out
    assert "relative_beta" in output
    assert "5/5" in output
