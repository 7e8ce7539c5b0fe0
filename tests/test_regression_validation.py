"""Tests of the input checks of regression `adapt`, its tf.data input and fitted hyperparameters."""

import functools
import logging

import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tests import reference
from tf_linntk import likelihoods
from tf_linntk.inference import hyperparameters

_TIGHT = dict(tol=1e-10, seed=0)


@functools.lru_cache(maxsize=None)
def _linearized():
    """Return a shared (model, lin) pair: a 2-4-1 tanh MLP with P = 17, in float64."""
    model = reference.tanh_mlp()
    # NOTE: LinearizedModel takes the global dtype policy, so under float32 Keras
    # would round float64 inputs before `call`; test_linearize.py has the xfail.
    with reference.keras_float_dtype("float64"):
        return model, tf_linntk.LinearizedModel(model)


# ---------------------------------------------------------------------- invalid data and options

_X, _Y = reference.regression_data(6)

# (id, adapt arguments, error type, message pattern). Every case names its argument.
_INVALID_CASES = [
    ("zero_examples", dict(x=np.zeros([0, 2]), y=np.zeros([0, 1])), ValueError,
     r"`x` must contain at least one example; received N=0"),
    ("y_none", dict(y=None), ValueError, r"`y` is required for regression"),
    ("y_other_num_examples", dict(y=np.zeros([5, 1])), ValueError,
     r"`y` must be \[N, O\] with N=6 \(from `x`\) and O=1.*y.shape=\(5, 1\)"),
    ("y_wrong_num_outputs", dict(y=np.zeros([6, 2])), ValueError,
     r"`y` must be \[N, O\] with N=6 \(from `x`\) and O=1.*y.shape=\(6, 2\)"),
    ("y_rank_3", dict(y=np.zeros([6, 1, 1])), ValueError, r"`y` must be \[N, O\]"),
    ("y_nan", dict(y=np.where(np.arange(6)[:, None] == 2, np.nan, _Y)), ValueError,
     r"`y` must be finite; received 1 NaN or Inf"),
    ("y_inf", dict(y=np.full([6, 1], np.inf)), ValueError, r"`y` must be finite"),
    ("y_string", dict(y=np.array([["a"]] * 6)), TypeError, r"`y` must be a numeric tensor \[N, O\]"),
    ("noise_zero", dict(noise_variance=0.0), ValueError,
     r"`noise_variance` must be finite and > 0; received \[0.0\]"),
    ("noise_negative", dict(noise_variance=-1.0), ValueError,
     r"`noise_variance` must be finite and > 0"),
    ("noise_nan", dict(noise_variance=float("nan")), ValueError,
     r"`noise_variance` must be finite and > 0; received \[nan\]"),
    ("noise_wrong_length", dict(noise_variance=[0.1, 0.2]), ValueError,
     r"`noise_variance` must be a scalar or a vector of length O=1; received shape \(2,\)"),
    ("noise_string", dict(noise_variance="small"), TypeError,
     r"`noise_variance` must be a float or a vector of length O"),
    ("prior_zero", dict(prior_variance=0.0), ValueError,
     r"`prior_variance` must be a finite float > 0; received 0.0"),
    ("prior_negative", dict(prior_variance=-2.0), ValueError, r"`prior_variance`"),
    ("prior_string", dict(prior_variance="1"), TypeError, r"`prior_variance` must be a positive float"),
    ("likelihood_unknown", dict(likelihood="laplace"), ValueError,
     r"`likelihood` must be one of .*'gaussian'.*received 'laplace'"),
    ("space_unknown", dict(space="weights"), ValueError,
     r"`space` must be one of 'auto', 'function', 'parameter'; received 'weights'"),
    ("variance_unknown", dict(variance="diagonal"), ValueError,
     r"`variance` must be one of 'lanczos', 'randomized', 'exact', 'none'; received 'diagonal'"),
    ("preconditioner_unknown", dict(preconditioner="cholesky"), ValueError,
     r"`preconditioner` must be one of 'auto', 'nystrom', 'none'; received 'cholesky'"),
    ("fisher_unknown", dict(fisher="kfac"), ValueError, r"`fisher` must be one of"),
    ("on_nonconvergence_unknown", dict(on_nonconvergence="stop"), ValueError,
     r"`on_nonconvergence` must be one of 'warn', 'raise', 'ignore'"),
    ("tol_zero", dict(tol=0.0), ValueError, r"`tol` must be a finite float > 0"),
    ("max_iterations_zero", dict(max_iterations=0), ValueError,
     r"`max_iterations` must be a positive integer; received 0"),
    ("max_iterations_float", dict(max_iterations=10.5), TypeError, r"`max_iterations`"),
    ("preconditioner_rank_zero", dict(preconditioner_rank=0), ValueError,
     r"`preconditioner_rank` must be a positive integer"),
    ("variance_rank_negative", dict(variance_rank=-1), ValueError,
     r"`variance_rank` must be a positive integer"),
    ("seed_negative", dict(seed=-1), ValueError, r"`seed` must be in \[0, 2\*\*31\)"),
    ("verbose_two", dict(verbose=2), ValueError,
     r"`verbose` must be 0 \(silent\) or 1 \(progress bar\); received 2"),
    ("unknown_keyword", dict(noise=0.1), TypeError, r"`adapt` got unknown option\(s\) \['noise'\]"),
]


@pytest.mark.parametrize(
    "arguments, error, pattern",
    [case[1:] for case in _INVALID_CASES],
    ids=[case[0] for case in _INVALID_CASES],
)
def test_adapt_rejects_invalid_input(arguments, error, pattern):
    """Invalid data or options raise the right error type naming the argument."""
    _, lin = _linearized()
    earlier = lin.posterior
    call = dict(x=_X, y=_Y, noise_variance=0.1, prior_variance=1.0, **_TIGHT)
    call.update(arguments)

    with pytest.raises(error, match=pattern):
        lin.adapt(**call)

    assert lin.posterior is earlier


def test_adapt_rejects_likelihood_noise_length():
    """A Gaussian likelihood whose noise vector does not match O raises naming `noise_variance`."""
    _, lin = _linearized()
    likelihood = likelihoods.Gaussian(noise_variance=[0.1, 0.2])

    with pytest.raises(ValueError, match=r"`noise_variance`.*O=1"):
        lin.adapt(_X, _Y, likelihood=likelihood, prior_variance=1.0)


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        (dict(joint="yes"), TypeError, r"`joint` and `include_noise` must be bools"),
        (dict(include_noise=1), TypeError, r"`joint` and `include_noise` must be bools"),
        (dict(variance="none"), ValueError,
         r"`variance` must be one of 'lanczos', 'randomized', 'exact'; received 'none'"),
    ],
    ids=["joint_string", "include_noise_int", "variance_none"],
)
def test_predictive_distribution_rejects_invalid_options(options, error, pattern):
    """Invalid predictive options raise naming the option."""
    _, lin = _linearized()
    lin.adapt(_X, _Y, noise_variance=0.1, **_TIGHT)

    with pytest.raises(error, match=pattern):
        lin.predictive_distribution(_X, **options)


# ---------------------------------------------------------------------- other inputs


def test_adapt_dataset_matches_arrays():
    """A batched tf.data.Dataset of (x, y) pairs gives the posterior of the same arrays."""
    _, lin = _linearized()
    lin.adapt(_X, _Y, noise_variance=0.1, **_TIGHT)
    expected = lin.posterior.weights.numpy()
    dataset = tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(4)

    lin.adapt(dataset, noise_variance=0.1, **_TIGHT)

    np.testing.assert_allclose(lin.posterior.weights.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "dataset, y, pattern",
    [
        (tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(4), _Y,
         r"`y` must be None when `x` is a tf.data.Dataset"),
        (tf.data.Dataset.from_tensor_slices(_X).batch(4), None,
         r"`x` must be a batched tf.data.Dataset of \(x, y\) pairs"),
        (tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(4).take(0), None,
         r"`x` must contain at least one example; received an empty dataset"),
    ],
    ids=["y_given", "inputs_only", "empty"],
)
def test_adapt_rejects_invalid_dataset(dataset, y, pattern):
    """A dataset with targets also in `y`, without targets, or empty raises naming the argument."""
    _, lin = _linearized()

    with pytest.raises(ValueError, match=pattern):
        lin.adapt(dataset, y, noise_variance=0.1)


def test_adapt_uses_noise_of_gaussian_likelihood():
    """A Gaussian likelihood object supplies σ² when `noise_variance` is not given."""
    model, lin = _linearized()
    x_test, _ = reference.regression_data(3, seed=1)

    lin.adapt(
        _X, _Y, likelihood=likelihoods.Gaussian(noise_variance=0.3), prior_variance=2.0,
        **_TIGHT,
    )

    expected_mean, _ = reference.dense_gp_predictive(model, _X, _Y, x_test, 0.3, 2.0)
    np.testing.assert_array_equal(lin.posterior.noise_variance.numpy(), [0.3])
    np.testing.assert_allclose(lin(x_test).numpy().reshape(-1), expected_mean, rtol=1e-6)
    assert "hyperparameters" not in lin.posterior.convergence


@pytest.mark.parametrize("verbose", [0, 1])
def test_adapt_logs_progress_only_when_verbose(verbose, caplog):
    """verbose=1 logs the problem size at INFO level, and verbose=0 logs nothing at INFO."""
    _, lin = _linearized()

    with caplog.at_level(logging.INFO, logger="tf_linntk.inference.regression"):
        lin.adapt(_X, _Y, noise_variance=0.1, variance="none", verbose=verbose, **_TIGHT)

    messages = [r.getMessage() for r in caplog.records if r.name == "tf_linntk.inference.regression"]
    expected = ["Adapting: N=6, O=1, P=17, function space."] if verbose else []
    assert messages == expected


# ---------------------------------------------------------------------- fitted hyperparameters


@pytest.mark.parametrize(
    "fixed",
    [dict(), dict(prior_variance=2.0), dict(noise_variance=0.05, prior_variance=None)],
    ids=["both_fitted", "noise_fitted", "prior_fitted"],
)
def test_adapt_fits_hyperparameters_by_marginal_likelihood(fixed):
    """noise_variance=None (or prior_variance=None) uses the marginal-likelihood maximizer."""
    _, lin = _linearized()
    x, y = reference.regression_data(12)
    options = dict(noise_variance=None, prior_variance=None)
    options.update(fixed)

    lin.adapt(x, y, **options, **_TIGHT)

    fitted = hyperparameters.maximize_marginal_likelihood(
        lin, x, y, noise_variance=options["noise_variance"],
        prior_variance=options["prior_variance"], seed=0,
    )
    record = lin.posterior.convergence["hyperparameters"]
    assert record["noise_variance"] == pytest.approx(fitted["noise_variance"], rel=1e-9)
    assert record["prior_variance"] == pytest.approx(fitted["prior_variance"], rel=1e-9)
    np.testing.assert_allclose(
        lin.posterior.noise_variance.numpy(), [fitted["noise_variance"]], rtol=1e-9
    )
    assert lin.posterior.prior_variance == pytest.approx(fitted["prior_variance"], rel=1e-9)
    for name, value in fixed.items():
        if value is not None:
            assert record[name] == pytest.approx(value)


def test_adapt_with_fitted_hyperparameters_matches_fixed():
    """The posterior with fitted σ² and s² equals the posterior with those values passed in."""
    _, lin = _linearized()
    x, y = reference.regression_data(12)

    lin.adapt(x, y, prior_variance=None, **_TIGHT)
    fitted = lin.posterior.convergence["hyperparameters"]
    weights = lin.posterior.weights.numpy()
    lin.adapt(
        x, y, noise_variance=fitted["noise_variance"], prior_variance=fitted["prior_variance"],
        **_TIGHT,
    )

    np.testing.assert_allclose(lin.posterior.weights.numpy(), weights, rtol=1e-9, atol=1e-12)
