"""The posterior of a linearized classifier and its predictive class probabilities.

The posterior over δ = θ' − θ₀ is Gaussian (Laplace, variational) or a point
mass (MAP). At inputs x* the logits are then Gaussian, f* ~ N(μ*, V*), with
μ* = m(x*) + J* w [N, O] and one covariance V*ᵢ = J*ᵢ Σ J*ᵢᵀ [O, O] per example.
Class probabilities are E[softmax(f*)] (or E[sigmoid(f*)] for Bernoulli),
approximated by the probit link or by Monte Carlo over the logit Gaussian.
"""

import math

import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk import _checks
from tf_linntk import autodiff
from tf_linntk import likelihoods
from tf_linntk.inference import base

tfd = tfp.distributions

__all__ = ["LINKS", "ClassificationPosterior", "validate_predictive_options"]

LINKS = ("probit", "monte_carlo")

# Monte Carlo logits are drawn in blocks of this many samples, so memory is
# O(block · N · O) whatever `num_samples` is.
_SAMPLE_BLOCK = 128


@base.register_posterior
class ClassificationPosterior(base.Posterior):
    """Posterior over the linearized weights of a classifier, with its predictive.

    Attributes:
        likelihood: the `Categorical` or `Bernoulli` likelihood.
        weights: float64 Tensor [P], the posterior mean w (the MAP for "map" and
            "laplace", the mean of q for "variational").
        covariance: `tf.linalg.LinearOperator` [P, P] in float64: s² I − U diag(d) Uᵀ
            (Laplace), the covariance of q (variational), or zeros (MAP).
        distribution: a TFP distribution over δ with event shape [P], used by
            `sample`.
        prior_variance: float s².
        convergence: dict of records: "map" (`ConvergenceRecord` of the MAP
            optimizer), "map_trace", and "lanczos", "prior_variance" or
            "variational" where those steps ran.
        inference: "map", "laplace" or "variational".
        link, num_samples, seed: defaults of the predictive.
        log_evidence: the Laplace log evidence (Laplace only, else None).
        elbo: the final ELBO estimate (variational only, else None).
        root, eigenvalues: U [P, k] and θ [k] of the Laplace covariance, else None.
        variational_factors: (diagonal [P], V [P, r] or None) of the variational
            covariance diag(d) + V Vᵀ, else None.
    """

    def __init__(
        self, likelihood, weights, covariance, prior_variance, convergence, *, inference,
        distribution, link="probit", num_samples=1000, seed=None, log_evidence=None,
        elbo=None, root=None, eigenvalues=None, variational_factors=None,
    ):
        super().__init__(likelihood, tf.convert_to_tensor(weights, tf.float64), covariance,
                         float(prior_variance), convergence)
        self.distribution = distribution
        self.inference = inference
        self.link = link
        self.num_samples = num_samples
        self.seed = seed
        self.log_evidence = log_evidence
        self.elbo = elbo
        self.root = root
        self.eigenvalues = eigenvalues
        self.variational_factors = variational_factors

    def _sample(self, num_samples, seed):
        return self.distribution.sample(num_samples, seed=seed)

    # ------------------------------------------------------------------ saving

    def get_state(self):
        """Return (config, arrays) for saving: settings, records and the covariance factors."""
        config = {
            "class_name": type(self).__name__,
            "likelihood": self.likelihood.name,
            "inference": self.inference,
            "prior_variance": self.prior_variance,
            "link": self.link,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "log_evidence": self.log_evidence,
            "elbo": self.elbo,
            "convergence": base.convergence_to_config(self.convergence),
        }
        arrays = {"weights": self.weights.numpy()}
        if self.inference == "laplace":
            arrays.update(root=self.root.numpy(), eigenvalues=self.eigenvalues.numpy())
        if self.inference == "variational":
            diagonal, factor = self.variational_factors
            arrays["diagonal"] = diagonal.numpy()
            if factor is not None:
                arrays["factor"] = factor.numpy()
        return config, arrays

    @classmethod
    def from_state(cls, config, arrays):
        """Rebuild a saved posterior (see `get_state`)."""
        likelihood = likelihoods.get_likelihood(config["likelihood"])
        weights = tf.constant(arrays["weights"], tf.float64)
        records = base.convergence_from_config(config["convergence"])
        options = {key: config[key] for key in ("link", "num_samples", "seed")}
        s2 = config["prior_variance"]
        if config["inference"] == "laplace":
            return laplace_posterior(
                likelihood, weights, tf.constant(arrays["root"], tf.float64),
                tf.constant(arrays["eigenvalues"], tf.float64), s2, records, options,
                log_evidence=config["log_evidence"],
            )
        if config["inference"] == "variational":
            factor = arrays.get("factor")
            return variational_posterior(
                likelihood, weights, tf.constant(arrays["diagonal"], tf.float64),
                None if factor is None else tf.constant(factor, tf.float64), s2, records,
                options, elbo=config["elbo"],
            )
        return map_posterior(likelihood, weights, s2, records, options)

    # ------------------------------------------------------------------ logits

    def latent_mean(self, lin, x):
        """Return μ* = m(x) + J(x) w as float64 [N, O] (one forward pass and one JVP)."""
        functional = lin.functional
        prior_mean = tf.cast(lin._prior_mean_flat(x), tf.float64)
        if _is_empty(functional, x):
            return prior_mean
        shift = functional.jvp(x, tf.cast(self.weights, functional.dtype))
        return prior_mean + tf.cast(shift, tf.float64)  # [N, O]

    def latent_covariance(self, lin, x, full=True):
        """Return the logit covariances V*ᵢ = J*ᵢ Σ J*ᵢᵀ of each example, float64.

        Cost: per-example Jacobians (O reverse passes per example, via
        `tape.jacobian`) in chunks of at most 256 MiB each, and one product of
        Σ with the chunk's N·O Jacobian rows. Nothing of size N·O·P is kept.

        NOTE: the per-example Jacobians dominate when O·P is large (e.g. 1000
        classes); drawing δ ~ q and one batched JVP per draw would avoid them
        for the Monte Carlo link, but is not implemented.

        Args:
            lin: the adapted `LinearizedModel`.
            x: converted inputs with N examples.
            full: True for the blocks [N, O, O]; False for their diagonals [N, O].

        Returns:
            float64 Tensor [N, O, O] (full) or [N, O].
        """
        functional = lin.functional
        num_outputs = functional.num_outputs
        trailing = [num_outputs, num_outputs] if full else [num_outputs]
        if self.inference == "map" or _is_empty(functional, x):
            num_examples = functional.num_examples(x)
            return tf.zeros(tf.concat([[num_examples], trailing], 0), tf.float64)
        row_bytes = 2 * num_outputs * functional.num_parameters * 8
        chunk = int(max(1, min(functional.batch_size, autodiff.JACOBIAN_CHUNK_BYTES // row_bytes)))
        return _map_chunks(lambda xc: self._covariance_chunk(functional, xc, full), x, chunk,
                           trailing)

    def _covariance_chunk(self, functional, x, full):
        jacobian = tf.cast(functional.jacobian(x), tf.float64)  # [n, O, P]
        rows = tf.reshape(jacobian, [-1, functional.num_parameters])  # [n·O, P]
        product = tf.transpose(self.covariance.matmul(rows, adjoint_arg=True))  # J Σ, [n·O, P]
        product = tf.reshape(product, tf.shape(jacobian))  # [n, O, P]
        if full:
            return tf.einsum("nop,nqp->noq", product, jacobian)  # [n, O, O]
        return tf.reduce_sum(product * jacobian, axis=-1)  # [n, O]

    # ------------------------------------------------------------------ predictive

    def class_probabilities(self, lin, x, link=None, num_samples=None, seed=None):
        """Return predictive class probabilities E[softmax(f*)] at x.

        "probit": softmax(μ*/√(1 + π/8·diag V*)) for categorical (the extended
        probit approximation) and sigmoid(μ*/√(1 + π/8·V*)) for Bernoulli; it
        needs only diag V*. "monte_carlo": the mean of softmax (sigmoid) over
        `num_samples` draws f* ~ N(μ*, V*) from a symmetric eigendecomposition
        root of each V*, so singular V* are fine. A MAP posterior returns
        softmax(μ*) with both links.

        Args:
            lin: the adapted `LinearizedModel`.
            x: converted inputs with N examples.
            link: "probit" or "monte_carlo"; None uses the posterior's default.
            num_samples: Monte Carlo draws S; None uses the posterior's default.
            seed: int seed of the draws; None uses the posterior's default.

        Returns:
            float64 Tensor [N, O] for categorical (rows sum to 1) or [N, 1] of
            p(y = 1) for Bernoulli.
        """
        options = validate_predictive_options(link, num_samples, seed)
        link = options["link"] or self.link
        mean = self.latent_mean(lin, x)  # [N, O]
        if self.inference == "map":
            return _link_function(self.likelihood, mean)
        if link == "probit":
            variance = self.latent_covariance(lin, x, full=False)  # [N, O]
            return _probit(self.likelihood, mean, variance)
        covariance = self.latent_covariance(lin, x, full=True)  # [N, O, O]
        count = options["num_samples"] or self.num_samples
        seed = base.stateless_seed(self.seed if options["seed"] is None else options["seed"])
        return _monte_carlo(self.likelihood, mean, covariance, count, seed)

    @property
    def variables(self):
        """tf.Variables of the posterior; none, so an export embeds its tensors as constants."""
        # NOTE: the weights and covariance factors are constants in an exported
        # graph, which bounds exportable models by the 2 GiB GraphDef limit.
        return []

    def serving_outputs(self, lin, x):
        """Return {"probabilities": [N, C]} (float64) for the serving signature and layers."""
        return {"probabilities": tf.cast(self.class_probabilities(lin, x), tf.float64)}

    def predict_mean(self, lin, x):
        """Return the class probabilities with the default link, in the model's dtype."""
        return tf.cast(self.class_probabilities(lin, x), lin.functional.dtype)

    def predictive_distribution(self, lin, x, link=None, num_samples=None, seed=None):
        """Return the predictive distribution over labels at x.

        Args:
            lin: the adapted `LinearizedModel`.
            x: converted inputs with N examples.
            link, num_samples, seed: as in `class_probabilities`.

        Returns:
            `tfd.Categorical(probs=[N, O])` or `tfd.Bernoulli(probs=[N, 1])`, float64.

        Raises:
            ValueError, TypeError: for an invalid link, sample count or seed.
        """
        probs = self.class_probabilities(lin, x, link, num_samples, seed)
        if isinstance(self.likelihood, likelihoods.Bernoulli):
            return tfd.Bernoulli(probs=probs, dtype=tf.int64)
        return tfd.Categorical(probs=probs, dtype=tf.int64)


def validate_predictive_options(link, num_samples, seed):
    """Check the predictive options (None allowed) and return them as a dict."""
    return {
        "link": None if link is None else _checks.check_option("link", link, LINKS),
        "num_samples": _checks.check_positive_int("num_samples", num_samples, allow_none=True),
        "seed": _checks.check_seed("seed", seed),
    }


def laplace_posterior(likelihood, weights, root, eigenvalues, prior_variance, records, options,
                      log_evidence):
    """Build the Laplace posterior with Σ = s² I − U diag(d) Uᵀ, d = s⁴θ/(1 + s²θ).

    Samples use the symmetric root Σ^½ = s I − U diag(s − √(s² − d)) Uᵀ, valid
    because U has orthonormal columns.
    """
    s2 = float(prior_variance)
    s = math.sqrt(s2)
    num_parameters = int(root.shape[0])
    reduction = s2**2 * eigenvalues / (1.0 + s2 * eigenvalues)  # d, [k]
    covariance = _identity_minus_low_rank(num_parameters, s2, root, reduction)
    shrink = s - tf.sqrt(tf.maximum(s2 - reduction, 0.0))  # [k]
    scale = _identity_minus_low_rank(num_parameters, s, root, shrink)
    distribution = tfd.MultivariateNormalLinearOperator(loc=weights, scale=scale)
    return ClassificationPosterior(
        likelihood, weights, covariance, s2, records, inference="laplace",
        distribution=distribution, link=options["link"] or "probit",
        num_samples=options["num_samples"], seed=options["seed"], log_evidence=log_evidence,
        root=root, eigenvalues=eigenvalues,
    )


def map_posterior(likelihood, weights, prior_variance, records, options):
    """Build the point-mass posterior at the MAP w (zero covariance)."""
    num_parameters = int(weights.shape[0])
    covariance = tf.linalg.LinearOperatorZeros(
        num_parameters, dtype=tf.float64, is_self_adjoint=True, is_square=True
    )
    return ClassificationPosterior(
        likelihood, weights, covariance, prior_variance, records, inference="map",
        distribution=tfd.VectorDeterministic(loc=weights), link=options["link"] or "probit",
        num_samples=options["num_samples"], seed=options["seed"],
    )


def variational_posterior(likelihood, mean, diagonal, factor, prior_variance, records, options,
                          elbo):
    """Build the posterior q = N(μ, diag(d) + V Vᵀ) of a variational fit (V may be None)."""
    diagonal_operator = tf.linalg.LinearOperatorDiag(
        diagonal, is_self_adjoint=True, is_positive_definite=True
    )
    if factor is None:
        covariance = diagonal_operator
        distribution = tfd.MultivariateNormalDiag(loc=mean, scale_diag=tf.sqrt(diagonal))
    else:
        covariance = tf.linalg.LinearOperatorLowRankUpdate(
            diagonal_operator, u=factor, is_self_adjoint=True, is_positive_definite=True
        )
        distribution = tfd.MultivariateNormalDiagPlusLowRankCovariance(
            loc=mean, cov_diag_factor=diagonal, cov_perturb_factor=factor
        )
    return ClassificationPosterior(
        likelihood, mean, covariance, prior_variance, records, inference="variational",
        distribution=distribution, link=options["link"] or "probit",
        num_samples=options["num_samples"], seed=options["seed"], elbo=elbo,
        variational_factors=(diagonal, factor),
    )


# ---------------------------------------------------------------------- helpers


def _identity_minus_low_rank(size, scale, root, reduction):
    """Return the operator scale·I − U diag(reduction) Uᵀ [size, size] in float64."""
    return tf.linalg.LinearOperatorLowRankUpdate(
        tf.linalg.LinearOperatorScaledIdentity(
            size, tf.constant(scale, tf.float64), is_self_adjoint=True
        ),
        u=root,
        diag_update=-reduction,
        is_self_adjoint=True,
    )


def _link_function(likelihood, logits):
    """Return softmax(logits) [N, O], or sigmoid(logits) [N, 1] for Bernoulli."""
    if isinstance(likelihood, likelihoods.Bernoulli):
        return tf.sigmoid(logits)
    return tf.nn.softmax(logits, axis=-1)


def _probit(likelihood, mean, variance):
    """Return the (extended) probit approximation of E[softmax(f)], f ~ N(mean, V)."""
    scaled = mean / tf.sqrt(1.0 + (math.pi / 8.0) * variance)  # [N, O]
    return _link_function(likelihood, scaled)


def _monte_carlo(likelihood, mean, covariance, num_samples, seed):
    """Return the mean of softmax (sigmoid) over draws f ~ N(mean [N, O], covariance [N, O, O])."""
    values, vectors = tf.linalg.eigh(covariance)
    factor = vectors * tf.sqrt(tf.maximum(values, 0.0))[:, None, :]  # L with L Lᵀ = V, [N, O, O]
    total = tf.zeros_like(mean)
    for block, start in enumerate(range(0, num_samples, _SAMPLE_BLOCK)):
        count = min(_SAMPLE_BLOCK, num_samples - start)
        shape = tf.concat([[count], tf.shape(mean)], axis=0)
        block_seed = tf.random.experimental.stateless_fold_in(seed, block)
        noise = tf.random.stateless_normal(shape, block_seed, dtype=tf.float64)  # [s, N, O]
        logits = mean + tf.einsum("nok,snk->sno", factor, noise)  # [s, N, O]
        total += tf.reduce_sum(_link_function(likelihood, logits), axis=0)
    return total / num_samples


def _map_chunks(fn, x, chunk_size, trailing_shape):
    """Concatenate fn(x[start:stop]) (float64) over chunks of `chunk_size` examples."""
    num_examples = tf.shape(tf.nest.flatten(x)[0])[0]
    num_chunks = (num_examples + chunk_size - 1) // chunk_size

    def body(index, array):
        start = index * chunk_size
        stop = tf.minimum(start + chunk_size, num_examples)
        chunk = tf.nest.map_structure(lambda t: t[start:stop], x)
        return index + 1, array.write(index, fn(chunk))

    array = tf.TensorArray(tf.float64, size=num_chunks, infer_shape=False)
    _, array = tf.while_loop(lambda index, _: index < num_chunks, body, (0, array))
    shape = tf.concat([[num_examples], trailing_shape], axis=0)
    # An empty TensorArray cannot infer its element shape, so N = 0 gives zeros.
    return tf.cond(num_examples > 0, lambda: tf.reshape(array.concat(), shape),
                   lambda: tf.zeros(shape, tf.float64))


def _is_empty(functional, x):
    num_examples = functional.num_examples(x)
    return isinstance(num_examples, int) and num_examples == 0
