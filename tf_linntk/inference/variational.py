"""Variational inference for the linearized classifier: a Gaussian q(δ) fit to the ELBO.

The ELBO of q(δ) against the prior N(0, s² I_P) is

    ELBO(q) = E_q[Σᵢ log p(yᵢ | m(xᵢ) + Jᵢ δ)] − KL(q ‖ N(0, s² I)).

The expectation is estimated on minibatches B with S reparameterized draws
δₛ ~ q: the logits m(x_B) + J_B δₛ come from one batched JVP (no second copy of
the network), and the gradient of the estimate with respect to each draw,
(N/|B|)/S · J_Bᵀ ∇_f log p, from one batched VJP; the tape then carries it to
q's parameters through the reparameterization. KL is analytic. Keras Adam
updates q's parameters; the wrapped model is untouched.

Families (`variational_family`):

- "mean_field": `tfd.MultivariateNormalDiag(μ, softplus(ρ))`, 2P parameters.
- "low_rank": `tfd.MultivariateNormalDiagPlusLowRankCovariance` with covariance
  diag(softplus(ρ)²) + V Vᵀ, V [P, r], (2 + r)·P parameters.

Initialization: μ starts at the MAP (`initialization="map"`) or at 0, and V
small and random. The variances start at 1/(diag G + 1/s²), the best diagonal
for a Gaussian posterior. diag G comes from a 16-probe Hutchinson estimate at
the initial logits, which costs one batched JVP and VJP.
"""

import logging
import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk import _checks
from tf_linntk.inference import _optimizers
from tf_linntk.inference import classification_posterior

tfd = tfp.distributions

__all__ = ["FAMILIES", "fit_variational", "kl_to_prior", "validate_options"]

FAMILIES = ("mean_field", "low_rank")

_logger = logging.getLogger(__name__)

# Rademacher probes of the Hutchinson estimate of diag(G) that sets q's initial
# variances; the estimate only needs to be of the right size.
_DIAGONAL_PROBES = 16
# Standard deviation of the initial low-rank factor V, as a fraction of s.
_INITIAL_FACTOR_FRACTION = 1e-2
# Draws of δ for the ELBO reported after training. Its Monte Carlo standard error,
# also reported, was 0.16 to 0.25 nats on the 60-example test toys.
_FINAL_ELBO_SAMPLES = 128
_FINAL_ELBO_BLOCK = 8


def validate_options(options):
    """Check the variational and Adam options; return them as a dict."""
    learning_rate = options["learning_rate"]
    if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        learning_rate = _checks.check_positive_float("learning_rate", learning_rate)
    return {
        "variational_family": _checks.check_option(
            "variational_family", options["variational_family"], FAMILIES
        ),
        "rank": _checks.check_positive_int("rank", options["rank"]),
        "epochs": _checks.check_positive_int("epochs", options["epochs"]),
        "batch_size": _checks.check_positive_int("batch_size", options["batch_size"]),
        "callbacks": _check_callbacks(options["callbacks"]),
        "learning_rate": learning_rate,
        "num_elbo_samples": _checks.check_positive_int(
            "num_elbo_samples", options["num_elbo_samples"]
        ),
    }


def _check_callbacks(callbacks):
    """Return `callbacks` as a list of Keras callbacks (empty for None)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.Callback):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)) or not all(
        isinstance(callback, keras.callbacks.Callback) for callback in callbacks
    ):
        raise TypeError(
            "`callbacks` must be None or a list of keras.callbacks.Callback objects; "
            f"received {callbacks!r}."
        )
    return list(callbacks)


def fit_variational(problem, prior_variance, initial_mean, initial_logits, records, options):
    """Train q(δ) by stochastic ELBO maximization and return it as the posterior.

    Cost per Adam step on a minibatch of b examples: one batched JVP and one
    batched VJP with S = `num_elbo_samples` right-hand sides over b examples.
    Memory O(S·(P + b·O)) plus the family's parameters.

    Args:
        problem: the `_glm.GLMProblem`.
        prior_variance: float s².
        initial_mean: float64 Tensor [P], the starting mean (the MAP or zeros).
        initial_logits: float64 Tensor [N, O], m(x) + J(x) `initial_mean`.
        records: dict of earlier records (e.g. "map"), extended in place with
            "variational": the ELBO per epoch (mean of the minibatch
            estimates), the final ELBO (128 draws on all data) with its Monte
            Carlo standard error, and the step count.
        options: validated options of `classification.fit`.

    Returns:
        A `ClassificationPosterior` with inference "variational".
    """
    num_steps = options["epochs"] * _optimizers.steps_per_epoch(problem.num_examples,
                                                                 options["batch_size"])
    key = ("variational", options["variational_family"],
           min(options["rank"], problem.num_parameters), options["num_elbo_samples"])
    trainer = _optimizers.cached_trainer(
        problem.state, key, options["learning_rate"],
        lambda schedule: _ElboTrainer(problem.state, *key[1:], schedule),
    )
    trainer.reset(options["learning_rate"], num_steps)
    diagonal = _initial_variances(problem, initial_logits, prior_variance, options["seed"])
    trainer.family.initialize(initial_mean, diagonal, prior_variance, options["seed"])
    prior_variance_tensor = tf.constant(prior_variance, tf.float64)
    seed = tf.constant(options["seed"], tf.int32)

    elbo_per_epoch = _optimizers.run_epochs(
        lambda batch: trainer.step(batch, prior_variance_tensor, seed),
        lambda epoch: problem.state.minibatches(options["batch_size"], options["seed"], epoch),
        options["epochs"], options["verbose"], metric="elbo",
        callbacks=options["callbacks"], model=problem.model,
    )
    num_steps = len(elbo_per_epoch) * _optimizers.steps_per_epoch(problem.num_examples,
                                                                   options["batch_size"])
    family = trainer.family
    final_elbo, standard_error = evaluate_elbo(
        problem, family.frozen_distribution(), family.kl_to_prior(prior_variance),
        _FINAL_ELBO_SAMPLES, options["seed"],
    )
    records["variational"] = {
        "elbo": np.array(elbo_per_epoch),
        "final_elbo": final_elbo,
        "final_elbo_standard_error": standard_error,
        "steps": num_steps,
        "family": options["variational_family"],
    }
    _logger.info("Variational fit: final ELBO %.6g.", final_elbo)
    factor = None if family.factor is None else tf.convert_to_tensor(family.factor)
    return classification_posterior.variational_posterior(
        problem.likelihood, tf.convert_to_tensor(family.loc), family.diagonal(), factor,
        prior_variance, records, options, elbo=final_elbo,
    )


def kl_to_prior(mean, diagonal, factor, prior_variance):
    """Return KL(N(μ, Σ) ‖ N(0, s² I)) for Σ = diag(diagonal) + V Vᵀ, analytically.

    KL = ½ [tr Σ / s² + ‖μ‖²/s² − P + P log s² − log|Σ|], with tr Σ = Σⱼ dⱼ + ‖V‖²_F
    and log|Σ| = Σⱼ log dⱼ + log|I_r + Vᵀ diag(d)⁻¹ V| (matrix determinant lemma),
    so the cost is O(P·r²) and nothing of size P² is formed.

    Args:
        mean: float64 Tensor [P], μ.
        diagonal: float64 Tensor [P], d > 0.
        factor: float64 Tensor [P, r] V, or None for a diagonal Σ.
        prior_variance: float or float64 scalar Tensor, s².

    Returns:
        float64 scalar Tensor.
    """
    num_parameters = tf.cast(tf.shape(mean)[0], tf.float64)
    trace = tf.reduce_sum(diagonal)
    log_det = tf.reduce_sum(tf.math.log(diagonal))
    if factor is not None:
        trace += tf.reduce_sum(tf.square(factor))
        capacitance = tf.matmul(factor / diagonal[:, None], factor, transpose_a=True)  # [r, r]
        capacitance += tf.eye(tf.shape(factor)[1], dtype=tf.float64)
        log_det += 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(
            tf.linalg.cholesky(capacitance))))
    prior_variance = tf.convert_to_tensor(prior_variance, dtype=tf.float64)
    quadratic = (trace + tf.reduce_sum(tf.square(mean))) / prior_variance
    log_prior_det = num_parameters * tf.math.log(prior_variance)
    return 0.5 * (quadratic - num_parameters + log_prior_det - log_det)


def evaluate_elbo(problem, distribution, kl, num_samples, seed):
    """Estimate the ELBO on all data with `num_samples` draws from `distribution`.

    Returns:
        (elbo, standard_error): floats in nats, the estimate of
        E_q[log p(y | δ)] − KL and the Monte Carlo standard error of its first term.
    """
    draws = []
    for block, start in enumerate(range(0, num_samples, _FINAL_ELBO_BLOCK)):
        count = min(_FINAL_ELBO_BLOCK, num_samples - start)
        block_seed = tf.constant([seed, 2**20 + block], tf.int32)
        samples = distribution.sample(count, seed=block_seed)  # [s, P]
        logits = problem.prior_mean + problem.jvp_batched(samples)  # [s, N, O]
        draws.append(_log_prob_per_draw(problem.likelihood, problem.labels, logits,
                                        problem.num_outputs).numpy())
    draws = np.concatenate(draws)  # [S]
    standard_error = float(np.std(draws, ddof=1) / np.sqrt(len(draws)))
    return float(np.mean(draws)) - float(kl), standard_error


# ---------------------------------------------------------------------- helpers


def _initial_variances(problem, logits, prior_variance, seed):
    """Return 1/(diag(G) + 1/s²) [P], the best diagonal variances for a Gaussian posterior.

    diag(G) at `logits` comes from a Hutchinson estimate E[z ⊙ G z] with 16
    Rademacher probes z (one batched GGN product: a JVP and a VJP with 16
    right-hand sides), clipped at 0.
    """
    problem.set_curvature(logits)
    shape = [problem.num_parameters, _DIAGONAL_PROBES]
    probes = tf.sign(tf.random.stateless_uniform(shape, [seed, 2], -1.0, 1.0, tf.float64))
    products = problem.ggn_operator.matmul(probes)  # G Z, [P, probes]
    diagonal = tf.maximum(tf.reduce_mean(probes * products, axis=1), 0.0)  # [P]
    return 1.0 / (diagonal + 1.0 / prior_variance)




class _ElboTrainer(_optimizers.AdamTrainer):
    """Adam on the parameters of q(δ), with the reparameterized ELBO gradient."""

    def __init__(self, state, family, rank, num_samples, schedule):
        self.state = state
        self.num_samples = num_samples
        self.family = _GaussianFamily(family, state.functional.num_parameters, rank)
        self.step_counter = tf.Variable(0, dtype=tf.int32, trainable=False)
        super().__init__(self.family.variables, schedule)

    def reset(self, learning_rate, total_steps):
        """Reset Adam and the step count that seeds the draws, so equal seeds repeat."""
        super().reset(learning_rate, total_steps)
        self.step_counter.assign(0)

    def _step(self, batch, prior_variance, seed):
        state, family = self.state, self.family
        functional = state.functional
        x, labels, prior_mean = batch
        step_seed = tf.stack([seed, self.step_counter.assign_add(1)])
        with tf.GradientTape() as tape:
            samples = family.distribution().sample(self.num_samples, seed=step_seed)  # [S, P]
            kl = family.kl_to_prior(prior_variance)

        # δₛ -> logits -> gradient of the minibatch log-likelihood estimate at each δₛ
        tangents = tf.cast(tf.stop_gradient(samples), functional.dtype)
        logits = prior_mean + tf.cast(functional.jvp_batched(x, tangents), tf.float64)  # [S, n, O]
        ratio = state.num_examples() / tf.cast(tf.shape(labels)[0], tf.float64)
        ratio /= self.num_samples
        log_likelihood = ratio * _sum_log_prob(state.likelihood, labels, logits, state.num_outputs)
        score = _score(state.likelihood, labels, logits, state.num_outputs)  # [S, n, O]
        sample_gradients = ratio * tf.cast(
            functional.vjp_batched(x, tf.cast(score, functional.dtype)), tf.float64
        )  # [S, P]

        # Chain rule through δₛ = μ + (scale)·ε to q's parameters; the ELBO is maximized.
        gradients = tape.gradient(
            [samples, kl], family.variables,
            output_gradients=[-sample_gradients, tf.ones_like(kl)],
        )
        self.optimizer.apply_gradients(zip(gradients, family.variables))
        return log_likelihood - kl


def _log_prob_per_draw(likelihood, labels, logits, num_outputs):
    """Return Σ over examples of log p(y | f) for each draw: [S] for logits [S, n, O]."""
    flat_labels, flat_logits = _flatten_draws(labels, logits, num_outputs)
    log_prob = tf.reshape(likelihood.log_prob(flat_labels, flat_logits), tf.shape(logits)[:2])
    return tf.reduce_sum(log_prob, axis=1)


def _sum_log_prob(likelihood, labels, logits, num_outputs):
    """Return Σ over draws and examples of log p(y | f) for logits [S, n, O]."""
    flat_labels, flat_logits = _flatten_draws(labels, logits, num_outputs)
    return tf.reduce_sum(likelihood.log_prob(flat_labels, flat_logits))


def _score(likelihood, labels, logits, num_outputs):
    """Return ∇_f log p(y | f) [S, n, O] for logits [S, n, O]."""
    flat_labels, flat_logits = _flatten_draws(labels, logits, num_outputs)
    return tf.reshape(likelihood.grad_log_prob(flat_labels, flat_logits), tf.shape(logits))


def _flatten_draws(labels, logits, num_outputs):
    """Return labels tiled to [S·n] and logits [S, n, O] reshaped to [S·n, O]."""
    flat_logits = tf.reshape(logits, [-1, num_outputs])  # [S·n, O]
    flat_labels = tf.tile(labels, [tf.shape(logits)[0]])  # [S·n]
    return flat_labels, flat_logits


class _GaussianFamily:
    """Trainable Gaussian q(δ): mean μ, scale softplus(ρ) and, for "low_rank", V [P, r]."""

    def __init__(self, family, num_parameters, rank):
        self.family = family
        self.loc = tf.Variable(tf.zeros([num_parameters], tf.float64), name="q_loc")
        self.raw_scale = tf.Variable(tf.zeros([num_parameters], tf.float64), name="q_raw_scale")
        self.variables = [self.loc, self.raw_scale]
        self.factor = None
        if family == "low_rank":
            self.factor = tf.Variable(tf.zeros([num_parameters, rank], tf.float64),
                                      name="q_factor")
            self.variables.append(self.factor)

    def initialize(self, mean, diagonal, prior_variance, seed):
        """Set μ = `mean` [P], the variances to `diagonal` [P], and V small and random."""
        self.loc.assign(tf.convert_to_tensor(mean, tf.float64))
        self.raw_scale.assign(tfp.math.softplus_inverse(tf.sqrt(diagonal)))
        if self.factor is not None:
            # V starts small and random, because V = 0 is a stationary point of the ELBO.
            rank = int(self.factor.shape[1])
            scale = _INITIAL_FACTOR_FRACTION * math.sqrt(prior_variance) / math.sqrt(rank)
            noise = tf.random.stateless_normal(self.factor.shape, [seed, 1], dtype=tf.float64)
            self.factor.assign(scale * noise)

    def diagonal(self):
        """Return the diagonal part softplus(ρ)² [P] of q's covariance."""
        return tf.square(tf.math.softplus(self.raw_scale))  # [P]

    def distribution(self, loc=None, raw_scale=None, factor=None):
        """Return q as a TFP distribution over [P] (of the current variables by default)."""
        loc = self.loc if loc is None else loc
        scale = tf.math.softplus(self.raw_scale if raw_scale is None else raw_scale)
        if self.family == "mean_field":
            return tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
        return tfd.MultivariateNormalDiagPlusLowRankCovariance(
            loc=loc, cov_diag_factor=tf.square(scale),
            cov_perturb_factor=self.factor if factor is None else factor,
        )

    def kl_to_prior(self, prior_variance):
        """Return KL(q ‖ N(0, s² I)) from the current variables."""
        return kl_to_prior(self.loc, self.diagonal(), self.factor, prior_variance)

    def frozen_distribution(self):
        """Return q with its current values as constants (no variables kept)."""
        factor = None if self.factor is None else tf.convert_to_tensor(self.factor)
        return self.distribution(tf.convert_to_tensor(self.loc),
                                 tf.convert_to_tensor(self.raw_scale), factor)
