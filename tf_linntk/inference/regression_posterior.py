"""The regression posterior over the linearized weights and its predictive."""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk import _checks
from tf_linntk.inference import _regression_systems as systems
from tf_linntk.inference import base

tfd = tfp.distributions

__all__ = ["RegressionPosterior"]

# "lanczos" and "randomized" both use the cached low-rank covariance root.
VARIANCE_METHODS = ("lanczos", "randomized", "exact")


@base.register_posterior
class RegressionPosterior(base.Posterior):
    """Gaussian posterior δ ~ N(w, Σ) of GP regression on the linearized network.

    Σ = (Jᵀ D⁻¹ J + I/s²)⁻¹ = s² I − U diag(d) Uᵀ with U [P, k] the top Ritz
    vectors of Jᵀ D⁻¹ J (values θ) and d = s⁴ θ / (1 + s² θ). The root is exact
    when k covers the rank of Jᵀ D⁻¹ J; otherwise the dropped directions keep their
    prior variance, so variances err on the high side, never below the exact ones
    by more than the Lanczos error.

    Attributes:
        weights: float64 [P], the posterior mean w.
        root: float64 [P, k], U.
        eigenvalues: float64 [k], θ.
        noise_variance: float64 [O], σ² per output.
        variance_method: "lanczos", "randomized", "exact" or "none", the default for
            predictions. With "none" no covariance was computed, so `covariance`
            is None and `sample` and predictive variances raise.
        space: "function" or "parameter", the space of the CG solve for w.
    """

    def __init__(
        self,
        likelihood,
        weights,
        root,
        eigenvalues,
        prior_variance,
        convergence,
        variance_method="lanczos",
        training_problem=None,
        solver_options=None,
        space="function",
    ):
        s2 = float(prior_variance)
        # Variables rather than constants, so an exported SavedModel stores them
        # as variables instead of embedding them in its graph.
        self.root = _variable(root, "root")
        self.eigenvalues = _variable(eigenvalues, "eigenvalues")
        self.reduction = _variable(
            s2**2 * self.eigenvalues / (1.0 + s2 * self.eigenvalues), "reduction"
        )  # d, [k]
        num_parameters = int(self.root.shape[0])
        covariance = tf.linalg.LinearOperatorLowRankUpdate(
            tf.linalg.LinearOperatorScaledIdentity(
                num_parameters, tf.constant(s2, tf.float64), is_self_adjoint=True
            ),
            u=self.root,
            diag_update=-self.reduction,
            is_self_adjoint=True,
        )
        if variance_method == "none":
            covariance = None
        super().__init__(likelihood, _variable(weights, "weights"), covariance, s2, convergence)
        noise = tf.reshape(tf.convert_to_tensor(likelihood.noise_variance, tf.float64), [-1])
        self.noise_variance = _variable(noise, "noise_variance")
        self.variance_method = variance_method
        self.training_problem = training_problem
        self.solver_options = dict(solver_options or {})
        self.space = space

    # ------------------------------------------------------------------ saving

    def get_state(self):
        """Return (config, arrays) for saving; the training data is not kept.

        A posterior adapted with variance="exact" is saved with the Lanczos root
        that `adapt` also built. After loading, its variances need an explicit
        variance="lanczos", because the exact ones need the training data.
        """
        config = {
            "class_name": type(self).__name__,
            "prior_variance": self.prior_variance,
            "variance_method": self.variance_method,
            "space": self.space,
            "convergence": base.convergence_to_config(self.convergence),
        }
        arrays = {
            "weights": self.weights.numpy(),
            "root": self.root.numpy(),
            "eigenvalues": self.eigenvalues.numpy(),
            "noise_variance": self.noise_variance.numpy(),
        }
        return config, arrays

    @classmethod
    def from_state(cls, config, arrays):
        """Rebuild a saved posterior (see `get_state`)."""
        from tf_linntk import likelihoods

        variance_method = config["variance_method"]
        return cls(
            likelihood=likelihoods.Gaussian(noise_variance=arrays["noise_variance"]),
            weights=arrays["weights"],
            root=arrays["root"],
            eigenvalues=arrays["eigenvalues"],
            prior_variance=config["prior_variance"],
            convergence=base.convergence_from_config(config["convergence"]),
            variance_method=variance_method,
            space=config["space"],
        )

    @property
    def variables(self):
        """The tf.Variables that hold the posterior (tracked by SavedModel export)."""
        return [self.weights, self.root, self.eigenvalues, self.reduction, self.noise_variance]

    def serving_outputs(self, lin, x):
        """Return the serving signature's outputs for converted inputs x.

        Returns:
            dict with "mean" [N, O] (model dtype), "variance" [N, O] (predictive
            variance of y, noise included, float64) and "latent_variance" [N, O]
            (of f, float64). Without a covariance (variance="none") both
            variances are NaN.
        """
        mean = self.latent_mean(lin, x)
        if self.variance_method == "none":
            nan = tf.fill(tf.shape(mean), tf.constant(np.nan, tf.float64))
            return {"mean": mean, "variance": nan, "latent_variance": nan}
        latent = self._lanczos_variance(lin, x)
        return {
            "mean": mean,
            "variance": latent + self.noise_variance[None, :],
            "latent_variance": latent,
        }

    # ------------------------------------------------------------------ sampling

    def _sample(self, num_samples, seed):
        if self.variance_method == "none":
            raise ValueError(
                "This posterior has no covariance to sample from because it was adapted "
                "with `variance`='none'. Call `adapt(x, y, variance='lanczos')` first."
            )
        s = np.sqrt(self.prior_variance)
        z = tf.random.stateless_normal(
            [num_samples, int(self.root.shape[0])], seed, dtype=tf.float64
        )
        # Σ^1/2 = s I − U diag(s − sqrt(s² − d)) Uᵀ for orthonormal U.
        shrink = s - tf.sqrt(tf.maximum(self.prior_variance - self.reduction, 0.0))
        projected = tf.matmul(z, self.root) * shrink[None, :]  # [S, k]
        return self.weights[None, :] + s * z - tf.matmul(projected, self.root, transpose_b=True)

    # ------------------------------------------------------------------ predictive

    def predict_mean(self, lin, x):
        """Return m(x) + J(x) w in the model's output shape."""
        mean = self.latent_mean(lin, x)
        if lin.functional.output_projection is not None:
            return mean
        return lin.functional.unflatten_outputs(mean)

    def latent_mean(self, lin, x):
        """Return m(x) + J(x) w as [N, O] in the model's dtype."""
        functional = lin.functional
        prior_mean = lin._prior_mean_flat(x)
        if _is_empty(functional, x):
            return prior_mean
        shift = functional.jvp(x, tf.cast(self.weights, functional.dtype))
        return prior_mean + shift  # [N, O]

    def latent_variance(self, lin, x, variance=None):
        """Return the latent (noise-free) predictive variance [N, O] in float64.

        Args:
            lin: the adapted `LinearizedModel`.
            x: converted inputs with N examples.
            variance: "lanczos" or "randomized" (the cached root) or "exact";
                defaults to the adapt-time choice.
        """
        method = self._variance_method(variance)
        if _is_empty(lin.functional, x):
            return tf.zeros([0, lin.num_outputs], tf.float64)
        if method != "exact":
            return self._lanczos_variance(lin, x)
        prior = self.prior_variance * tf.cast(
            lin.functional.jacobian_sq_norms(x), tf.float64
        )  # s² diag K(x, x), [N, O]
        variance_values, _ = self.training_problem.exact_covariance(
            x, joint=False, options=self.solver_options
        )
        # Clip to [0, prior]: rounding can leave tiny negative values.
        return tf.clip_by_value(variance_values, 0.0, prior)

    def _lanczos_variance(self, lin, x):
        """s² diag K(x, x) − Σ_k d_k (J(x) u_k)², clipped to [0, prior], as [N, O]."""
        prior = self.prior_variance * tf.cast(
            lin.functional.jacobian_sq_norms(x), tf.float64
        )  # s² diag K(x, x), [N, O]
        projections = self._root_projections(lin, x)  # [k, N, O]
        reduction = tf.einsum("k,kno->no", self.reduction, tf.square(projections))
        return tf.clip_by_value(prior - reduction, 0.0, prior)

    def latent_covariance(self, lin, x, variance=None):
        """Return the joint latent covariance [N·O, N·O] (example-major) in float64."""
        method = self._variance_method(variance)
        n = lin.functional.num_examples(x)
        # NOTE: check_dense_size counts bytes in the model's dtype, so for a float32
        # model it counts half of this float64 covariance.
        lin.check_dense_size(
            (n * lin.num_outputs, n * lin.num_outputs), "predictive_distribution(joint=True)",
            None, "use the default independent marginals (joint=False)",
        )
        if method == "exact":
            covariance, _ = self.training_problem.exact_covariance(
                x, joint=True, options=self.solver_options
            )
            return covariance
        prior = self.prior_variance * systems.dense_kernel_matrix(lin.ntk(x))  # [N·O, N·O]
        projections = tf.reshape(self._root_projections(lin, x), [self.root.shape[1], -1])
        reduction = tf.matmul(projections * self.reduction[:, None], projections, transpose_a=True)
        return prior - reduction

    def predictive_distribution(self, lin, x, joint=False, include_noise=True, variance=None):
        """Return the predictive distribution of y (or of f without noise).

        Args:
            lin: the adapted `LinearizedModel`.
            x: converted inputs with N examples.
            joint: False for independent `tfd.Normal` marginals with batch shape
                [N, O]; True for one `tfd.MultivariateNormalTriL` over the N·O
                outputs (example-major event), limited by `max_dense_bytes`.
            include_noise: add σ² to the diagonal (predictive of y) or not (of f).
            variance: "lanczos" or "randomized" (the cached root) or "exact";
                defaults to the adapt-time choice.

        Returns:
            A `tfd.Normal` or `tfd.MultivariateNormalTriL` in float64.
        """
        if not isinstance(joint, bool) or not isinstance(include_noise, bool):
            raise TypeError(
                "`joint` and `include_noise` must be bools; received "
                f"joint={joint!r}, include_noise={include_noise!r}."
            )
        mean = tf.cast(self.latent_mean(lin, x), tf.float64)  # [N, O]
        noise = self.noise_variance if include_noise else tf.zeros_like(self.noise_variance)
        if not joint:
            latent = self.latent_variance(lin, x, variance)
            return tfd.Normal(loc=mean, scale=tf.sqrt(latent + noise[None, :]))
        covariance = self.latent_covariance(lin, x, variance)
        n = int(mean.shape[0])
        covariance += tf.linalg.diag(tf.tile(noise, [n]))
        return tfd.MultivariateNormalTriL(
            loc=tf.reshape(mean, [-1]), scale_tril=_safe_cholesky(covariance)
        )

    # ------------------------------------------------------------------ helpers

    def _root_projections(self, lin, x):
        """Return J(x) U as [k, N, O] in float64 (one batched JVP)."""
        functional = lin.functional
        tangents = tf.cast(tf.transpose(self.root), functional.dtype)  # [k, P]
        return tf.cast(functional.jvp_batched(x, tangents), tf.float64)

    def _variance_method(self, variance):
        method = self.variance_method
        if variance is not None:
            method = _checks.check_option("variance", variance, VARIANCE_METHODS)
        if method == "none":
            raise ValueError(
                "This posterior has no covariance because it was adapted with "
                "`variance`='none'. Call `adapt(x, y, variance='lanczos')` (or 'exact') "
                "to get predictive variances."
            )
        if method == "exact" and self.training_problem is None and variance is None:
            raise ValueError(
                "This posterior was adapted with variance='exact', and exact variances "
                "need the training data, which saving does not keep. Pass "
                "variance='lanczos' for the saved rank-k Lanczos approximation (it "
                "overestimates variances when the data inform more than k directions), "
                "or adapt again with the data."
            )
        if method == "exact" and self.training_problem is None:
            raise ValueError(
                "`variance`='exact' needs the training data, which this posterior does "
                "not keep (it was adapted with variance='lanczos' or loaded from a "
                "file). Call `adapt(x, y, variance='exact')` to keep it."
            )
        return method


def _is_empty(functional, x):
    n = functional.num_examples(x)
    return isinstance(n, int) and n == 0


def _safe_cholesky(covariance):
    """Cholesky factor of a PSD matrix, adding jitter 1e-10·mean(diag) if it fails."""
    try:
        return tf.linalg.cholesky(covariance)
    except tf.errors.InvalidArgumentError:
        jitter = 1e-10 * tf.reduce_mean(tf.linalg.diag_part(covariance))
        return tf.linalg.cholesky(covariance + jitter * tf.eye(covariance.shape[0], dtype=tf.float64))


def _variable(value, name):
    """Return a non-trainable float64 tf.Variable holding `value`."""
    return tf.Variable(tf.convert_to_tensor(value, tf.float64), trainable=False, name=name)
