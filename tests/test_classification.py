"""Tests for tf_linntk.inference.classification against dense NumPy references.

The toy model is one Dense layer on fixed features, so its linearization is exact
and the Bayesian GLM is multinomial (or binary) logistic regression on explicit
features, solved here by a dense Newton method.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_linntk
from tests import reference
from tf_linntk import solvers
from tf_linntk.inference import base
from tf_linntk.inference import classification

tfd = tfp.distributions

NUM_FEATURES = 3
NUM_CLASSES = 3
NUM_EXAMPLES = 60

# (likelihood name, number of outputs O, Dense layer with bias) per toy case.
CASES = {
    "categorical_bias": ("categorical", NUM_CLASSES, True),
    "categorical_no_bias": ("categorical", NUM_CLASSES, False),
    "bernoulli": ("bernoulli", 1, True),
}


# ---------------------------------------------------------------------- toy problems


def dense_model(num_outputs, use_bias, seed, weight_scale=0.5):
    """Return a float64 Keras model with one Dense layer on NUM_FEATURES inputs."""
    initializer = keras.initializers.RandomNormal(stddev=weight_scale, seed=seed)
    with reference.keras_float_dtype("float64"):
        inputs = keras.Input((NUM_FEATURES,))
        outputs = keras.layers.Dense(
            num_outputs, use_bias=use_bias, kernel_initializer=initializer,
            bias_initializer=keras.initializers.RandomNormal(stddev=weight_scale, seed=seed + 1),
        )(inputs)
        return keras.Model(inputs, outputs)


def toy_data(num_examples, num_outputs, seed):
    """Return features [N, D] and labels [N] drawn from a random logistic model."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((num_examples, NUM_FEATURES))
    true_weights = 1.5 * np.random.default_rng(1234).standard_normal((NUM_FEATURES, max(num_outputs, 2)))
    logits = features @ true_weights
    if num_outputs == 1:
        return features, (rng.random(num_examples) < sigmoid(logits[:, 1] - logits[:, 0])).astype(np.int64)
    probs = softmax(logits)
    labels = np.array([rng.choice(num_outputs, p=row) for row in probs])
    return features, labels


def explicit_jacobian(features, num_outputs, use_bias):
    """Return the Jacobian [N, O, P] of a Dense layer (kernel row-major, then bias)."""
    num_examples, num_features = features.shape
    num_parameters = num_features * num_outputs + (num_outputs if use_bias else 0)
    jacobian = np.zeros((num_examples, num_outputs, num_parameters))
    for output in range(num_outputs):
        jacobian[:, output, output:num_features * num_outputs:num_outputs] = features
        if use_bias:
            jacobian[:, output, num_features * num_outputs + output] = 1.0
    return jacobian


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits):
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


def output_hessians(logits, bernoulli):
    """Return the output Hessians H(fᵢ) [N, O, O] and the probabilities p [N, O]."""
    if bernoulli:
        p = sigmoid(logits)
        return (p * (1.0 - p))[:, :, None], p
    p = softmax(logits)
    return np.einsum("no,op->nop", p, np.eye(p.shape[1])) - p[:, :, None] * p[:, None, :], p


def reference_map(jacobian, prior_mean, labels, prior_variance, bernoulli):
    """Return the MAP δ [P] and the posterior precision [P, P] by dense Newton."""
    num_parameters = jacobian.shape[2]
    targets = labels[:, None].astype(float) if bernoulli else np.eye(jacobian.shape[1])[labels]
    weights = np.zeros(num_parameters)
    for _ in range(100):
        logits = prior_mean + jacobian @ weights
        hessians, p = output_hessians(logits, bernoulli)
        gradient = -np.einsum("nop,no->p", jacobian, targets - p) + weights / prior_variance
        precision = np.einsum("nop,noq,nqr->pr", jacobian, hessians, jacobian)
        precision += np.eye(num_parameters) / prior_variance
        weights = weights - np.linalg.solve(precision, gradient)
        if np.linalg.norm(gradient) < 1e-13:
            break
    hessians, _ = output_hessians(prior_mean + jacobian @ weights, bernoulli)
    precision = np.einsum("nop,noq,nqr->pr", jacobian, hessians, jacobian)
    return weights, precision + np.eye(num_parameters) / prior_variance


def reference_log_evidence(jacobian, prior_mean, labels, prior_variance, bernoulli):
    """Return the Laplace log evidence from the dense MAP and Hessian."""
    weights, precision = reference_map(jacobian, prior_mean, labels, prior_variance, bernoulli)
    logits = prior_mean + jacobian @ weights
    if bernoulli:
        log_likelihood = np.sum(labels * logits[:, 0] - np.logaddexp(0.0, logits[:, 0]))
    else:
        log_norm = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
        log_likelihood = np.sum(logits[np.arange(len(labels)), labels] - log_norm)
    _, log_det = np.linalg.slogdet(prior_variance * precision)
    return log_likelihood - weights @ weights / (2.0 * prior_variance) - 0.5 * log_det


class Toy:
    """A toy case: the model, its linearization, data and the explicit Jacobian."""

    def __init__(self, case):
        likelihood, num_outputs, use_bias = CASES[case]
        self.likelihood = likelihood
        self.bernoulli = likelihood == "bernoulli"
        self.model = dense_model(num_outputs, use_bias, seed=7)
        self.lin = tf_linntk.LinearizedModel(self.model)
        self.features, self.labels = toy_data(NUM_EXAMPLES, num_outputs, seed=3)
        self.test_features, _ = toy_data(8, num_outputs, seed=4)
        self.jacobian = explicit_jacobian(self.features, num_outputs, use_bias)
        self.test_jacobian = explicit_jacobian(self.test_features, num_outputs, use_bias)
        self.prior_mean = self.model(self.features).numpy()
        self.test_prior_mean = self.model(self.test_features).numpy()

    def adapt(self, **options):
        options.setdefault("seed", 0)
        self.lin.adapt(self.features, self.labels, likelihood=self.likelihood, **options)
        return self.lin.posterior


@pytest.fixture(scope="module", params=["categorical_bias", "bernoulli"])
def toy(request):
    return request.getfixturevalue(f"{request.param}_toy")


@pytest.fixture(scope="module", params=list(CASES))
def any_toy(request):
    return request.getfixturevalue(f"{request.param}_toy")


@pytest.fixture(scope="module")
def categorical_no_bias_toy():
    return Toy("categorical_no_bias")


@pytest.fixture(scope="module")
def categorical_bias_toy():
    return Toy("categorical_bias")


@pytest.fixture(scope="module")
def categorical_toy(categorical_bias_toy):
    return categorical_bias_toy


@pytest.fixture(scope="module")
def bernoulli_toy():
    return Toy("bernoulli")


# ---------------------------------------------------------------------- MAP


def test_map_newton_matches_dense_newton(any_toy):
    """Newton–CG MAP equals a dense Newton solve on the explicit features to 1e-6."""
    toy = any_toy
    posterior = toy.adapt(inference="map", prior_variance=0.7, tol=1e-10)
    expected, _ = reference_map(toy.jacobian, toy.prior_mean, toy.labels, 0.7, toy.bernoulli)

    np.testing.assert_allclose(posterior.weights.numpy(), expected, rtol=1e-6, atol=1e-8)
    assert posterior.convergence["map"].converged_all
    assert int(posterior.convergence["map"].iterations[0]) < 20


def test_map_lbfgs_matches_dense_newton(categorical_toy):
    """L-BFGS MAP equals the dense Newton solve to 1e-6."""
    posterior = categorical_toy.adapt(inference="map", prior_variance=0.7, optimizer="lbfgs",
                                      tol=1e-10)
    expected, _ = reference_map(categorical_toy.jacobian, categorical_toy.prior_mean,
                                categorical_toy.labels, 0.7, False)

    np.testing.assert_allclose(posterior.weights.numpy(), expected, rtol=1e-6, atol=1e-8)
    assert posterior.convergence["map"].solver == "lbfgs"


def test_map_adam_approaches_dense_newton(categorical_toy):
    """Minibatch Adam MAP comes within 1% of the dense Newton solve."""
    posterior = categorical_toy.adapt(
        inference="map", prior_variance=0.7, optimizer="adam", epochs=200, batch_size=30,
        learning_rate=0.05, on_nonconvergence="ignore",
    )
    expected, _ = reference_map(categorical_toy.jacobian, categorical_toy.prior_mean,
                                categorical_toy.labels, 0.7, False)

    error = np.linalg.norm(posterior.weights.numpy() - expected) / np.linalg.norm(expected)
    # First-order minibatch training stops near, not at, the optimum (measured 2.5e-3).
    assert error < 1e-2


def test_map_nonconvergence_warns_or_raises(categorical_toy):
    """One Newton step at a tight tolerance warns, or raises when asked."""
    with pytest.warns(solvers.ConvergenceWarning, match="`max_iterations`"):
        categorical_toy.adapt(inference="map", max_iterations=1, tol=1e-12)
    with pytest.raises(solvers.ConvergenceError, match="newton_cg"):
        categorical_toy.adapt(inference="map", max_iterations=1, tol=1e-12,
                              on_nonconvergence="raise")


# ---------------------------------------------------------------------- Laplace


def test_laplace_covariance_matches_dense_inverse(any_toy):
    """Σ v equals (Jᵀ H J + I/s²)⁻¹ v when variance_rank ≥ P."""
    toy = any_toy
    posterior = toy.adapt(prior_variance=0.7, tol=1e-10, variance_rank=50)
    _, precision = reference_map(toy.jacobian, toy.prior_mean, toy.labels, 0.7, toy.bernoulli)
    vectors = np.random.default_rng(0).standard_normal((precision.shape[0], 3))

    actual = posterior.covariance.matmul(tf.constant(vectors)).numpy()
    np.testing.assert_allclose(actual, np.linalg.solve(precision, vectors), rtol=1e-7, atol=1e-10)


def test_laplace_logit_covariance_matches_dense(toy):
    """Predictive logit covariances J* Σ J*ᵀ match the dense ones, blocks and diagonals."""
    posterior = toy.adapt(prior_variance=0.7, tol=1e-10, variance_rank=50)
    _, precision = reference_map(toy.jacobian, toy.prior_mean, toy.labels, 0.7, toy.bernoulli)
    covariance = np.linalg.inv(precision)
    expected = np.einsum("nop,pq,nrq->nor", toy.test_jacobian, covariance, toy.test_jacobian)
    x = toy.lin.functional.convert_inputs(toy.test_features)

    full = posterior.latent_covariance(toy.lin, x, full=True).numpy()
    diagonal = posterior.latent_covariance(toy.lin, x, full=False).numpy()
    np.testing.assert_allclose(full, expected, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(diagonal, np.einsum("noo->no", expected), rtol=1e-7, atol=1e-12)


def test_laplace_probit_matches_dense_formula(toy):
    """The probit predictive equals the formula on the dense mean and variances."""
    toy.adapt(prior_variance=0.7, tol=1e-10, variance_rank=50)
    weights, precision = reference_map(toy.jacobian, toy.prior_mean, toy.labels, 0.7,
                                       toy.bernoulli)
    mean = toy.test_prior_mean + toy.test_jacobian @ weights
    variance = np.einsum("nop,pq,noq->no", toy.test_jacobian, np.linalg.inv(precision),
                         toy.test_jacobian)
    scaled = mean / np.sqrt(1.0 + math.pi / 8.0 * variance)
    expected = sigmoid(scaled) if toy.bernoulli else softmax(scaled)

    np.testing.assert_allclose(toy.lin(toy.test_features).numpy(), expected, rtol=1e-7)


def test_laplace_evidence_matches_dense(toy):
    """The Laplace log evidence equals the dense formula with slogdet."""
    posterior = toy.adapt(prior_variance=0.7, tol=1e-10, variance_rank=50)
    expected = reference_log_evidence(toy.jacobian, toy.prior_mean, toy.labels, 0.7,
                                      toy.bernoulli)

    np.testing.assert_allclose(posterior.log_evidence, expected, rtol=1e-8)


def test_laplace_evidence_search_finds_maximum(bernoulli_toy):
    """prior_variance=None lands within 0.05 in log s² of the dense evidence maximizer."""
    posterior = bernoulli_toy.adapt(prior_variance=None, variance_rank=50)
    grid = np.exp(np.linspace(np.log(1e-2), np.log(1e2), 401))
    evidences = [
        reference_log_evidence(bernoulli_toy.jacobian, bernoulli_toy.prior_mean,
                               bernoulli_toy.labels, s2, True)
        for s2 in grid
    ]
    best = grid[int(np.argmax(evidences))]

    assert abs(math.log(posterior.prior_variance) - math.log(best)) < 0.05
    # The search stops at a bracket of width 0.05 in log s², where the evidence
    # is flat to about 1e-5 nats on this toy.
    assert posterior.log_evidence >= max(evidences) - 1e-4
    assert "prior_variance" in posterior.convergence


def test_laplace_sample_moments_match_covariance(categorical_toy):
    """Posterior samples have shape [S, P], mean w and covariance Σ (Monte Carlo)."""
    posterior = categorical_toy.adapt(prior_variance=0.7, variance_rank=50)
    samples = posterior.sample(20000, seed=5).numpy()
    covariance = posterior.covariance.to_dense().numpy()

    assert samples.shape == (20000, categorical_toy.lin.num_parameters)
    # Standard error of a sample mean is sqrt(Σ_jj / S); 5 of them bounds it.
    tolerance = 5.0 * np.sqrt(np.diag(covariance) / 20000)
    assert np.all(np.abs(samples.mean(0) - posterior.weights.numpy()) < tolerance)
    # Sample covariance entries have relative error about sqrt(2/S) ≈ 1%.
    np.testing.assert_allclose(np.cov(samples.T), covariance, atol=0.05 * np.max(np.diag(covariance)))


def test_laplace_samples_repeat_with_seed(categorical_toy):
    """Equal seeds give equal posterior samples."""
    posterior = categorical_toy.adapt(prior_variance=0.7)

    np.testing.assert_array_equal(posterior.sample(4, seed=3).numpy(),
                                  posterior.sample(4, seed=3).numpy())


# ---------------------------------------------------------------------- predictive


def test_predictive_monte_carlo_matches_quadrature_bernoulli(bernoulli_toy):
    """Bernoulli Monte Carlo probabilities match Gauss–Hermite quadrature within MC error."""
    posterior = bernoulli_toy.adapt(prior_variance=4.0)
    x = bernoulli_toy.lin.functional.convert_inputs(bernoulli_toy.test_features)
    mean = posterior.latent_mean(bernoulli_toy.lin, x).numpy()[:, 0]
    variance = posterior.latent_covariance(bernoulli_toy.lin, x, full=False).numpy()[:, 0]
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    exact = sigmoid(mean[:, None] + np.sqrt(variance)[:, None] * nodes) @ weights / np.sqrt(2 * np.pi)

    samples = 20000
    distribution = bernoulli_toy.lin.predictive_distribution(
        bernoulli_toy.test_features, link="monte_carlo", num_samples=samples, seed=1)
    probs = distribution.probs_parameter().numpy()[:, 0]
    # The standard error of the mean of sigmoid values in [0, 1] is at most 0.5/sqrt(S).
    assert np.all(np.abs(probs - exact) < 4 * 0.5 / np.sqrt(samples))


def test_predictive_monte_carlo_matches_numpy_sampling(categorical_toy):
    """Categorical Monte Carlo probabilities match NumPy draws from the same logit Gaussian."""
    posterior = categorical_toy.adapt(prior_variance=2.0)
    x = categorical_toy.lin.functional.convert_inputs(categorical_toy.test_features)
    mean = posterior.latent_mean(categorical_toy.lin, x).numpy()
    covariance = posterior.latent_covariance(categorical_toy.lin, x).numpy()
    rng = np.random.default_rng(0)
    reference = np.stack([
        softmax(rng.multivariate_normal(m, v, size=50000)).mean(axis=0)
        for m, v in zip(mean, covariance)
    ])

    samples = 20000
    probs = posterior.class_probabilities(categorical_toy.lin, x, link="monte_carlo",
                                          num_samples=samples, seed=2).numpy()
    # 4 standard errors of each estimate, each at most 0.5/sqrt(draws).
    assert np.max(np.abs(probs - reference)) < 4 * 0.5 * (1 / np.sqrt(samples) + 1 / np.sqrt(50000))


def test_predictive_probit_agrees_with_monte_carlo(toy):
    """Probit and Monte Carlo class probabilities agree to MC error plus probit error."""
    # Logit variances stay near 1 here; at s² = 2 (variances near 9) the extended
    # probit is off by up to 0.1 on this toy.
    toy.adapt(prior_variance=0.2)
    samples = 20000
    probit = toy.lin.predictive_distribution(toy.test_features, link="probit")
    monte_carlo = toy.lin.predictive_distribution(toy.test_features, link="monte_carlo",
                                                  num_samples=samples, seed=2)

    difference = np.abs(probit.probs_parameter().numpy() - monte_carlo.probs_parameter().numpy())
    # 4 standard errors (at most 0.5/sqrt(S) each) plus 0.02 for the probit
    # approximation, whose error on sigmoid integrals stays below about 0.02.
    assert np.max(difference) < 4 * 0.5 / np.sqrt(samples) + 0.02


@pytest.mark.parametrize("link", ["probit", "monte_carlo"])
def test_predictive_probabilities_valid_at_large_logits(toy, link):
    """Probabilities stay finite, in [0, 1] and normalized at logits of magnitude 500."""
    toy.adapt(prior_variance=0.7)
    features = toy.test_features * 500.0 / np.max(np.abs(toy.test_prior_mean))
    logits = toy.model(features).numpy()
    assert np.max(np.abs(logits)) > 100.0

    probs = toy.lin.predictive_distribution(features, link=link, num_samples=200,
                                            seed=0).probs_parameter().numpy()
    assert np.all(np.isfinite(probs))
    assert np.all((probs >= 0.0) & (probs <= 1.0))
    if not toy.bernoulli:
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)


def test_predictive_tiny_prior_gives_network_softmax(toy):
    """With s² = 1e-12 the predictive is the network's own softmax (sigmoid)."""
    toy.adapt(prior_variance=1e-12)
    expected = sigmoid(toy.test_prior_mean) if toy.bernoulli else softmax(toy.test_prior_mean)

    for link in ("probit", "monte_carlo"):
        probs = toy.lin.predictive_distribution(toy.test_features, link=link,
                                                num_samples=1000).probs_parameter()
        # Logit standard deviations are about 2e-6, so 1000 draws average to ~2e-8.
        np.testing.assert_allclose(probs.numpy(), expected, atol=1e-7)


def test_predictive_entropy_shrinks_with_more_data(toy):
    """Held-out predictive entropy is lower after 400 examples than after 10."""
    num_outputs = toy.lin.num_outputs
    test_features, _ = toy_data(200, num_outputs, seed=21)
    entropies = []
    for num_examples in (10, 400):
        features, labels = toy_data(num_examples, num_outputs, seed=num_examples)
        toy.lin.adapt(features, labels, likelihood=toy.likelihood, prior_variance=1.0, seed=0)
        entropy = toy.lin.predictive_distribution(test_features).entropy()
        entropies.append(float(tf.reduce_mean(entropy)))

    assert entropies[1] < entropies[0] - 0.1


def test_predictive_distribution_types_and_shapes(toy):
    """Categorical gives tfd.Categorical [N, O]; Bernoulli gives tfd.Bernoulli [N, 1]."""
    toy.adapt(prior_variance=0.7)
    distribution = toy.lin.predictive_distribution(toy.test_features)
    probs = toy.lin(toy.test_features)
    num_test = len(toy.test_features)

    if toy.bernoulli:
        assert isinstance(distribution, tfd.Bernoulli)
        assert tuple(distribution.batch_shape) == (num_test, 1)
        assert tuple(probs.shape) == (num_test, 1)
    else:
        assert isinstance(distribution, tfd.Categorical)
        assert tuple(distribution.batch_shape) == (num_test,)
        assert tuple(probs.shape) == (num_test, NUM_CLASSES)


def test_predictive_map_posterior_is_plug_in(categorical_toy):
    """A MAP posterior predicts softmax(m + J w) and has zero covariance."""
    posterior = categorical_toy.adapt(inference="map", prior_variance=0.7)
    mean = categorical_toy.test_prior_mean + categorical_toy.test_jacobian @ posterior.weights.numpy()

    np.testing.assert_allclose(categorical_toy.lin(categorical_toy.test_features).numpy(),
                               softmax(mean), rtol=1e-10)
    assert np.all(posterior.covariance.to_dense().numpy() == 0.0)


def test_predict_runs_in_batches_with_keras_predict(categorical_toy):
    """lin.predict (compiled, batched by Keras) equals lin(x)."""
    categorical_toy.adapt(prior_variance=0.7)
    # Keras 3.15's `predict` casts float inputs to floatx (float32) before the call.
    rounded = categorical_toy.test_features.astype(np.float32).astype(np.float64)
    expected = categorical_toy.lin(rounded).numpy()

    actual = categorical_toy.lin.predict(categorical_toy.test_features, batch_size=3, verbose=0)
    np.testing.assert_allclose(actual, expected, rtol=1e-10)


@pytest.mark.parametrize("inference", ["map", "laplace", "variational"])
def test_posterior_state_round_trip(categorical_toy, inference):
    """get_state and posterior_from_state rebuild a posterior with equal predictions."""
    posterior = categorical_toy.adapt(inference=inference, prior_variance=0.7, epochs=2)
    config, arrays = posterior.get_state()
    restored = base.posterior_from_state(config, arrays)
    x = categorical_toy.lin.functional.convert_inputs(categorical_toy.test_features)

    for link in ("probit", "monte_carlo"):
        np.testing.assert_allclose(
            restored.class_probabilities(categorical_toy.lin, x, link=link, num_samples=50).numpy(),
            posterior.class_probabilities(categorical_toy.lin, x, link=link, num_samples=50).numpy(),
            rtol=1e-12,
        )
    np.testing.assert_array_equal(restored.sample(3, seed=1).numpy(),
                                  posterior.sample(3, seed=1).numpy())
    assert restored.convergence["map"].converged_all


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("inference", ["map", "laplace", "variational"])
def test_adapt_leaves_model_weights_unchanged(categorical_toy, inference):
    """adapt never changes the wrapped model's weights."""
    before = [w.copy() for w in categorical_toy.model.get_weights()]
    categorical_toy.adapt(inference=inference, prior_variance=0.7, epochs=2)

    for old, new in zip(before, categorical_toy.model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_fit_accepts_one_hot_labels(categorical_toy):
    """One-hot labels [N, O] give the same MAP as class ids."""
    ids = categorical_toy.adapt(inference="map", prior_variance=0.7).weights.numpy()
    categorical_toy.lin.adapt(categorical_toy.features, np.eye(NUM_CLASSES)[categorical_toy.labels],
                              likelihood="categorical", inference="map", prior_variance=0.7)

    np.testing.assert_allclose(categorical_toy.lin.posterior.weights.numpy(), ids, rtol=1e-12)


@pytest.mark.parametrize(
    "labels, match",
    [
        (lambda y: np.where(y == 0, 3, y), r"`y` must contain class ids in \[0, 3\)"),
        (lambda y: y[:-1], r"`y` must contain num_examples=60"),
        (lambda y: y + 0.5, r"`y` must contain integer class ids"),
        (lambda y: None, r"`y` is required"),
    ],
    ids=["id_out_of_range", "count_differs", "non_integer", "missing"],
)
def test_fit_rejects_invalid_labels(categorical_toy, labels, match):
    """Invalid categorical labels raise ValueError naming `y`."""
    with pytest.raises(ValueError, match=match):
        categorical_toy.lin.adapt(categorical_toy.features, labels(categorical_toy.labels),
                                  likelihood="categorical")


def test_fit_rejects_bernoulli_with_several_outputs(categorical_toy):
    """The Bernoulli likelihood on a model with O = 3 raises naming `likelihood`."""
    with pytest.raises(ValueError, match=r"`likelihood`='bernoulli' needs a single-logit model"):
        categorical_toy.lin.adapt(categorical_toy.features, categorical_toy.labels % 2,
                                  likelihood="bernoulli")


def test_fit_rejects_categorical_with_one_output(bernoulli_toy):
    """The categorical likelihood on a single-logit model raises naming `likelihood`."""
    with pytest.raises(ValueError, match=r"`likelihood`='categorical' needs O ≥ 2"):
        bernoulli_toy.lin.adapt(bernoulli_toy.features, bernoulli_toy.labels,
                                likelihood="categorical")


def test_fit_rejects_non_binary_bernoulli_labels(bernoulli_toy):
    """Bernoulli labels other than 0/1 raise naming `y`."""
    with pytest.raises(ValueError, match=r"`y` must contain only 0 and 1"):
        bernoulli_toy.lin.adapt(bernoulli_toy.features, bernoulli_toy.labels + 1,
                                likelihood="bernoulli")


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"prior_variance": 0.0}, ValueError, r"`prior_variance` must be a finite float > 0"),
        ({"prior_variance": -1.0}, ValueError, r"`prior_variance`"),
        ({"inference": "exact"}, ValueError, r"`inference` must be one of"),
        ({"optimizer": "sgd"}, ValueError, r"`optimizer` must be one of"),
        ({"link": "logit"}, ValueError, r"`link` must be one of"),
        ({"num_samples": 0}, ValueError, r"`num_samples`"),
        ({"variance_rank": 1.5}, TypeError, r"`variance_rank`"),
        ({"tol": -1e-3}, ValueError, r"`tol`"),
        ({"seed": -1}, ValueError, r"`seed`"),
        ({"verbose": 2}, ValueError, r"`verbose` must be 0 \(silent\) or 1"),
        ({"on_nonconvergence": "stop"}, ValueError, r"`on_nonconvergence`"),
        ({"noise_variance": 0.1}, TypeError, r"unknown option\(s\) \['noise_variance'\]"),
    ],
    ids=["prior_zero", "prior_negative", "inference", "optimizer", "link", "num_samples",
         "variance_rank", "tol", "seed", "verbose", "on_nonconvergence", "unknown"],
)
def test_fit_rejects_invalid_options(categorical_toy, options, error, match):
    """Invalid or unknown options raise errors naming the option."""
    with pytest.raises(error, match=match):
        categorical_toy.lin.adapt(categorical_toy.features, categorical_toy.labels,
                                  likelihood="categorical", **options)


def test_predictive_rejects_invalid_link(categorical_toy):
    """predictive_distribution with an unknown link raises naming `link`."""
    categorical_toy.adapt(prior_variance=0.7)
    with pytest.raises(ValueError, match=r"`link` must be one of"):
        categorical_toy.lin.predictive_distribution(categorical_toy.test_features, link="logit")


def test_laplace_log_evidence_is_exported():
    """The module exports fit and laplace_log_evidence in __all__."""
    assert {"fit", "laplace_log_evidence", "ClassificationPosterior"} <= set(classification.__all__)
