"""Tests for tf_linntk.inference.hyperparameters against dense float64 references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tests import reference
from tf_linntk import solvers
from tf_linntk.inference.hyperparameters import log_marginal_likelihood
from tf_linntk.inference.hyperparameters import maximize_marginal_likelihood

NUM_INPUTS = 2
HIDDEN_UNITS = 8  # P = 3·8 + 9·O: 33 for O = 1, 51 for O = 3
PRIOR_VARIANCE = 1.3
PER_OUTPUT_NOISE = np.array([0.05, 0.1, 0.2])

# (num_outputs, mean, noise_variance) for the log p comparisons.
LOG_P_CASES = {
    "o1_network_scalar": (1, "network", 0.1),
    "o1_zero_scalar": (1, "zero", 0.1),
    "o3_network_per_output": (3, "network", PER_OUTPUT_NOISE),
    "o3_zero_per_output": (3, "zero", PER_OUTPUT_NOISE),
}

_MODELS = {}


def _linearized(num_outputs, mean="network"):
    """Return a cached LinearizedModel of a float64 tanh MLP 2 → 8 → O (fixed weights)."""
    key = (num_outputs, mean)
    if key not in _MODELS:
        with reference.keras_float_dtype("float64"):
            model = keras.Sequential([
                keras.Input((NUM_INPUTS,)),
                keras.layers.Dense(
                    HIDDEN_UNITS, activation="tanh",
                    kernel_initializer=keras.initializers.GlorotNormal(seed=1),
                    bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=2),
                ),
                keras.layers.Dense(
                    num_outputs, kernel_initializer=keras.initializers.GlorotNormal(seed=3),
                    bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=4),
                ),
            ])
        _MODELS[key] = tf_linntk.LinearizedModel(model, mean=mean)
    return _MODELS[key]


def _data(num_examples, num_outputs, seed=0):
    """Return inputs x [N, 2] and targets y [N, O] drawn from standard normals."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, NUM_INPUTS))
    y = rng.standard_normal((num_examples, num_outputs))
    return x, y


def _dense_jacobian(model, x):
    """Return J [N·O, P] of the Keras model by reverse-mode autodiff, independent of tf_linntk."""
    jacobian = reference.dense_jacobian(model, tf.constant(x))  # [N, O, P]
    return np.reshape(jacobian, [-1, jacobian.shape[-1]])


def _residual(lin, x, y):
    """Return r = y − m(x) flattened example-major [N·O], with m from the Keras model."""
    if lin.mean == "zero":
        return np.reshape(y, [-1])
    return np.reshape(y - lin.wrapped_model(tf.constant(x)).numpy(), [-1])


def _covariance(lin, x, noise_variance, prior_variance):
    """Return the dense A = s² J Jᵀ + diag(σ² tiled over examples) [N·O, N·O]."""
    jacobian = _dense_jacobian(lin.wrapped_model, x)
    noise = np.broadcast_to(noise_variance, [lin.num_outputs])
    return prior_variance * jacobian @ jacobian.T + np.diag(np.tile(noise, len(x)))


def _reference_log_p(lin, x, y, noise_variance, prior_variance):
    """Return the dense log N(r; 0, A) in float64."""
    covariance = _covariance(lin, x, noise_variance, prior_variance)
    residual = _residual(lin, x, y)
    _, log_det = np.linalg.slogdet(covariance)
    quadratic = residual @ np.linalg.solve(covariance, residual)
    return -0.5 * (quadratic + log_det + residual.size * np.log(2.0 * np.pi))


def _slq_standard_deviation(covariance, num_probes):
    """Return the standard deviation of the Rademacher estimate of tr(log A) with S probes.

    Var(zᵀ L z) = 2 Σ_{i≠j} L_ij² for Rademacher z and symmetric L = log A.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    log_matrix = (eigenvectors * np.log(eigenvalues)) @ eigenvectors.T
    off_diagonal = log_matrix - np.diag(np.diag(log_matrix))
    return np.sqrt(2.0 * np.sum(off_diagonal**2) / num_probes)


# ---------------------------------------------------------------------- log_marginal_likelihood


@pytest.mark.parametrize("case", list(LOG_P_CASES), ids=list(LOG_P_CASES))
def test_log_marginal_likelihood_cholesky_matches_dense(case):
    """method="cholesky" equals the dense Gaussian log density built from tape.jacobian."""
    num_outputs, mean, noise = LOG_P_CASES[case]
    lin = _linearized(num_outputs, mean)
    x, y = _data(40, num_outputs)
    value = log_marginal_likelihood(lin, x, y, noise, PRIOR_VARIANCE, method="cholesky")
    expected = _reference_log_p(lin, x, y, noise, PRIOR_VARIANCE)
    assert value.dtype == tf.float64
    assert value.shape == ()
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize(
    "case", ["o1_network_scalar", "o3_zero_per_output"], ids=["o1_network_scalar", "o3_zero_per_output"]
)
def test_log_marginal_likelihood_slq_matches_dense(case):
    """method="slq" with 30 probes is within 4 standard deviations of its Monte Carlo error."""
    num_outputs, mean, noise = LOG_P_CASES[case]
    lin = _linearized(num_outputs, mean)
    x, y = _data(40, num_outputs)
    value = log_marginal_likelihood(
        lin, x, y, noise, PRIOR_VARIANCE, method="slq", num_probes=30, tol=1e-10, seed=0
    )  # tol=1e-10 makes the CG part exact, leaving only the Monte Carlo error
    expected = _reference_log_p(lin, x, y, noise, PRIOR_VARIANCE)
    # log p = −½ log|A| + ..., so its error is half the log-determinant's. The
    # Lanczos steps reach N·O here (or 50 ≥ the number of distinct eigenvalues
    # that matter), so the quadrature error is negligible next to the Monte Carlo one.
    covariance = _covariance(lin, x, noise, PRIOR_VARIANCE)
    tolerance = 4.0 * 0.5 * _slq_standard_deviation(covariance, 30)
    np.testing.assert_allclose(value.numpy(), expected, atol=tolerance, rtol=0)


def test_log_marginal_likelihood_slq_repeats_with_same_seed():
    """Two "slq" calls with the same seed return the same value, bit for bit."""
    lin = _linearized(3, "network")
    x, y = _data(20, 3)
    first = log_marginal_likelihood(lin, x, y, PER_OUTPUT_NOISE, 0.7, method="slq", num_probes=4, seed=5)
    second = log_marginal_likelihood(lin, x, y, PER_OUTPUT_NOISE, 0.7, method="slq", num_probes=4, seed=5)
    np.testing.assert_array_equal(first.numpy(), second.numpy())


def test_log_marginal_likelihood_auto_picks_cholesky():
    """method="auto" with N·O ≤ 2,000 gives exactly the "cholesky" value."""
    lin = _linearized(1, "network")
    x, y = _data(30, 1)
    automatic = log_marginal_likelihood(lin, x, y, 0.2, PRIOR_VARIANCE)
    dense = log_marginal_likelihood(lin, x, y, 0.2, PRIOR_VARIANCE, method="cholesky")
    np.testing.assert_array_equal(automatic.numpy(), dense.numpy())


def test_log_marginal_likelihood_vector_targets_match_column():
    """For O = 1, targets [N] give the same value as [N, 1]."""
    lin = _linearized(1, "network")
    x, y = _data(30, 1)
    column = log_marginal_likelihood(lin, x, y, 0.2, PRIOR_VARIANCE, method="cholesky")
    vector = log_marginal_likelihood(lin, x, y[:, 0], 0.2, PRIOR_VARIANCE, method="cholesky")
    np.testing.assert_array_equal(vector.numpy(), column.numpy())


def test_log_marginal_likelihood_singular_covariance_raises():
    """A noise variance far below the rounding level of s²K raises, naming `noise_variance`."""
    lin = _linearized(1, "network")
    x, y = _data(60, 1)  # N·O = 60 > P = 33, so K is singular
    with pytest.raises(ValueError, match="not numerically positive definite.*`noise_variance`"):
        log_marginal_likelihood(lin, x, y, 1e-300, 1e10, method="cholesky")


# ---------------------------------------------------------------------- maximize_marginal_likelihood


def _synthetic_data(lin, num_examples, noise_variance, prior_variance, seed=0):
    """Return x and y = m(x) + J δ + ε with δ ~ N(0, s² I) and ε ~ N(0, σ²)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, NUM_INPUTS))
    jacobian = _dense_jacobian(lin.wrapped_model, x)  # [N·O, P]
    weights = np.sqrt(prior_variance) * rng.standard_normal(jacobian.shape[1])
    noise = np.tile(np.broadcast_to(noise_variance, [lin.num_outputs]), num_examples)
    signal = jacobian @ weights + np.sqrt(noise) * rng.standard_normal(noise.size)  # [N·O]
    mean = lin.wrapped_model(tf.constant(x)).numpy()
    return x, mean + np.reshape(signal, mean.shape)


@pytest.fixture(scope="module")
def synthetic_fit():
    """Return (lin, x, y, fitted) for data from the O = 3 model with σ² = 0.05, s² = 1, N = 60."""
    lin = _linearized(3, "network")
    x, y = _synthetic_data(lin, 60, 0.05, 1.0)
    return lin, x, y, maximize_marginal_likelihood(lin, x, y)


def test_maximize_marginal_likelihood_recovers_noise_variance(synthetic_fit):
    """On data drawn from the model with σ² = 0.05 (N = 60, O = 3) the fitted σ² is within a factor 1.5."""
    _, _, _, fitted = synthetic_fit
    assert fitted["method"] == "dense"
    assert fitted["converged"]
    assert isinstance(fitted["noise_variance"], float)
    # 180 observations against P = 51 weights leave about 129 degrees of freedom
    # for σ², so its estimate has a relative standard deviation near √(2/129) ≈ 12%.
    assert 0.05 / 1.5 < fitted["noise_variance"] < 0.05 * 1.5


def test_maximize_marginal_likelihood_optimum_beats_grid(synthetic_fit):
    """log p at the fitted (σ², s²) is at least log p at every point of a ±20% grid around it."""
    lin, x, y, fitted = synthetic_fit
    noise, prior = fitted["noise_variance"], fitted["prior_variance"]
    optimum = log_marginal_likelihood(lin, x, y, noise, prior, method="cholesky").numpy()
    np.testing.assert_allclose(fitted["log_marginal_likelihood"], optimum, rtol=1e-10)
    for noise_factor in (0.8, 1.0, 1.25):
        for prior_factor in (0.8, 1.0, 1.25):
            nearby = log_marginal_likelihood(
                lin, x, y, noise * noise_factor, prior * prior_factor, method="cholesky"
            ).numpy()
            assert optimum >= nearby, (noise_factor, prior_factor)


def test_maximize_marginal_likelihood_low_rank_exact():
    """method="low_rank" with rank 45 > rank(K) ≤ P = 33 reproduces the dense fit."""
    lin = _linearized(1, "network")
    x, y = _synthetic_data(lin, 60, 0.05, 1.0, seed=1)
    dense = maximize_marginal_likelihood(lin, x, y, method="dense")
    low_rank = maximize_marginal_likelihood(lin, x, y, method="low_rank", rank=45, seed=0)
    assert low_rank["method"] == "low_rank"
    np.testing.assert_allclose(low_rank["noise_variance"], dense["noise_variance"], rtol=1e-6)
    np.testing.assert_allclose(low_rank["prior_variance"], dense["prior_variance"], rtol=1e-6)
    np.testing.assert_allclose(
        low_rank["log_marginal_likelihood"], dense["log_marginal_likelihood"], rtol=1e-9
    )


@pytest.mark.parametrize("fixed", ["noise_variance", "prior_variance"], ids=["fixed_noise", "fixed_prior"])
def test_maximize_marginal_likelihood_keeps_fixed_value(fixed):
    """A given σ² or s² is returned unchanged, and the other one is a 1-D maximum."""
    lin = _linearized(1, "network")
    x, y = _synthetic_data(lin, 40, 0.05, 1.0, seed=2)
    fitted = maximize_marginal_likelihood(lin, x, y, **{fixed: 0.3})
    assert fitted[fixed] == 0.3
    free = "prior_variance" if fixed == "noise_variance" else "noise_variance"
    values = {fixed: 0.3}
    optimum = fitted["log_marginal_likelihood"]
    for factor in (0.9, 1.1):
        values[free] = fitted[free] * factor
        nearby = log_marginal_likelihood(lin, x, y, method="cholesky", **values).numpy()
        assert optimum >= nearby, factor


def test_maximize_marginal_likelihood_per_output_noise():
    """Per-output σ² = (0.02, 0.1, 0.5) is recovered per output within a factor 2 (N = 60)."""
    lin = _linearized(3, "zero")
    true_noise = np.array([0.02, 0.1, 0.5])
    x, y = _synthetic_data(lin, 60, true_noise, 1.0, seed=3)
    fitted = maximize_marginal_likelihood(lin, x, y, per_output_noise=True)
    assert fitted["noise_variance"].shape == (3,)
    # Each output has 60 observations that share P = 51 weights with the others,
    # so one variance is estimated from few degrees of freedom: a factor 2 band.
    np.testing.assert_array_less(true_noise / 2.0, fitted["noise_variance"])
    np.testing.assert_array_less(fitted["noise_variance"], true_noise * 2.0)
    value = log_marginal_likelihood(
        lin, x, y, fitted["noise_variance"], fitted["prior_variance"], method="cholesky"
    ).numpy()
    np.testing.assert_allclose(fitted["log_marginal_likelihood"], value, rtol=1e-10)


def test_maximize_marginal_likelihood_both_fixed_evaluates_only():
    """With σ² and s² given, no iteration runs and log p equals the Cholesky value."""
    lin = _linearized(3, "network")
    x, y = _data(20, 3)
    fitted = maximize_marginal_likelihood(lin, x, y, noise_variance=PER_OUTPUT_NOISE, prior_variance=0.5)
    expected = log_marginal_likelihood(lin, x, y, PER_OUTPUT_NOISE, 0.5, method="cholesky").numpy()
    assert fitted["iterations"] == 0
    np.testing.assert_array_equal(fitted["noise_variance"], PER_OUTPUT_NOISE)
    np.testing.assert_allclose(fitted["log_marginal_likelihood"], expected, rtol=1e-10)


def test_maximize_marginal_likelihood_per_output_low_rank_raises():
    """Per-output noise with method="low_rank" raises NotImplementedError naming the method."""
    lin = _linearized(3, "network")
    x, y = _data(20, 3)
    with pytest.raises(NotImplementedError, match="per-output noise only with method='dense'"):
        maximize_marginal_likelihood(lin, x, y, per_output_noise=True, method="low_rank")


@pytest.mark.parametrize(
    "on_nonconvergence, expected",
    [("warn", solvers.ConvergenceWarning), ("raise", solvers.ConvergenceError)],
    ids=["warn", "raise"],
)
def test_maximize_marginal_likelihood_reports_nonconvergence(on_nonconvergence, expected):
    """One L-BFGS iteration is not enough: the call warns or raises as requested."""
    lin = _linearized(1, "network")
    x, y = _synthetic_data(lin, 40, 0.05, 1.0, seed=2)
    match = "L-BFGS did not converge.*`max_iterations`"
    if on_nonconvergence == "warn":
        with pytest.warns(expected, match=match):
            maximize_marginal_likelihood(lin, x, y, max_iterations=1, on_nonconvergence="warn")
    else:
        with pytest.raises(expected, match=match):
            maximize_marginal_likelihood(lin, x, y, max_iterations=1, on_nonconvergence="raise")


# ---------------------------------------------------------------------- validation

# (keyword overrides of a valid call, exception type, message pattern).
LOG_P_ERRORS = {
    "y_wrong_count": (dict(y=np.zeros((7, 3))), ValueError, r"`y` must be \[N, O\] with N=10"),
    "y_wrong_outputs": (dict(y=np.zeros((10, 2))), ValueError, r"`y` must be \[N, O\].*O=3"),
    "y_vector_for_three_outputs": (dict(y=np.zeros(10)), ValueError, r"received y.shape=\(10,\)"),
    "y_not_finite": (dict(y=np.full((10, 3), np.nan)), ValueError, "`y` must be finite"),
    "y_not_numeric": (dict(y=np.full((10, 3), "a")), TypeError, "`y` must be a numeric"),
    "noise_negative": (dict(noise_variance=-0.1), ValueError, "`noise_variance` must be finite and > 0"),
    "noise_infinite": (
        dict(noise_variance=[0.1, np.inf, 0.1]), ValueError, "`noise_variance` must be finite"
    ),
    "noise_wrong_length": (
        dict(noise_variance=[0.1, 0.2]), ValueError,
        "`noise_variance` must be a scalar or a vector of length O=3",
    ),
    "noise_none": (dict(noise_variance=None), TypeError, "`noise_variance` must be a float"),
    "prior_zero": (dict(prior_variance=0.0), ValueError, "`prior_variance` must be a finite float > 0"),
    "prior_nan": (dict(prior_variance=np.nan), ValueError, "`prior_variance` must be a finite float > 0"),
    "prior_vector": (dict(prior_variance=[1.0, 2.0]), TypeError, "`prior_variance` must be a float > 0"),
    "method_unknown": (dict(method="dense"), ValueError, "`method` must be one of 'auto', 'cholesky', 'slq'"),
    "num_probes_zero": (dict(num_probes=0), ValueError, "`num_probes` must be a positive integer"),
    "lanczos_iterations_float": (
        dict(lanczos_iterations=2.5), TypeError, "`lanczos_iterations` must be a positive integer"
    ),
    "tol_negative": (dict(tol=-1.0), ValueError, "`tol` must be a finite float > 0"),
    "seed_negative": (dict(seed=-1), ValueError, r"`seed` must be in \[0, 2\*\*31\)"),
    "on_nonconvergence_unknown": (
        dict(on_nonconvergence="stop"), ValueError, "`on_nonconvergence` must be one of"
    ),
    "dense_too_large": (
        dict(method="cholesky", max_dense_bytes=100), ValueError,
        "`method='cholesky'` would form a dense tensor",
    ),
    "x_empty": (
        dict(x=np.zeros((0, 2)), y=np.zeros((0, 3))), ValueError, "`x` must contain at least one example"
    ),
}


@pytest.mark.parametrize("case", list(LOG_P_ERRORS), ids=list(LOG_P_ERRORS))
def test_log_marginal_likelihood_invalid_argument_raises(case):
    """Each invalid argument raises an error whose message names it."""
    overrides, error, match = LOG_P_ERRORS[case]
    x, y = _data(10, 3)
    arguments = dict(x=x, y=y, noise_variance=0.1, prior_variance=1.0)
    arguments.update(overrides)
    with pytest.raises(error, match=match):
        log_marginal_likelihood(_linearized(3, "network"), **arguments)


MAXIMIZE_ERRORS = {
    "per_output_with_given_noise": (
        dict(per_output_noise=True, noise_variance=0.1), ValueError, "`per_output_noise`=True fits σ²"
    ),
    "per_output_not_bool": (dict(per_output_noise=1), TypeError, "`per_output_noise` must be a bool"),
    "noise_zero": (dict(noise_variance=0.0), ValueError, "`noise_variance` must be finite and > 0"),
    "prior_negative": (dict(prior_variance=-2.0), ValueError, "`prior_variance` must be a finite float > 0"),
    "method_unknown": (
        dict(method="cholesky"), ValueError, "`method` must be one of 'auto', 'dense', 'low_rank'"
    ),
    "rank_zero": (dict(rank=0), ValueError, "`rank` must be a positive integer"),
    "max_iterations_zero": (
        dict(max_iterations=0), ValueError, "`max_iterations` must be a positive integer"
    ),
    "tol_zero": (dict(tol=0.0), ValueError, "`tol` must be a finite float > 0"),
    "y_wrong_count": (dict(y=np.zeros((3, 3))), ValueError, r"`y` must be \[N, O\] with N=10"),
    "dense_too_large": (
        dict(method="dense", max_dense_bytes=100), ValueError, "`method='dense'` would form a dense tensor"
    ),
}


@pytest.mark.parametrize("case", list(MAXIMIZE_ERRORS), ids=list(MAXIMIZE_ERRORS))
def test_maximize_marginal_likelihood_invalid_argument_raises(case):
    """Each invalid argument of the maximization raises an error whose message names it."""
    overrides, error, match = MAXIMIZE_ERRORS[case]
    x, y = _data(10, 3)
    arguments = dict(x=x, y=y)
    arguments.update(overrides)
    with pytest.raises(error, match=match):
        maximize_marginal_likelihood(_linearized(3, "network"), **arguments)
