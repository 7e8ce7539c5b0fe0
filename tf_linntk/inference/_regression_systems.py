"""Linear systems of GP regression on a linearized network, in both spaces.

All vectors are float64; products run in the model's dtype and are cast back.
Notation: K = J Jᵀ [N·O, N·O], D = diag(noise) [N·O] (σ²_o tiled over
examples), s² the prior variance, r = y − m(x) flattened example-major.
"""

import logging

import tensorflow as tf

from tf_linntk import _operators
from tf_linntk import likelihoods
from tf_linntk import preconditioners
from tf_linntk import solvers

# CG tolerance of the solves behind variance="exact". The variance is the prior
# s² k** minus a reduction of almost the same size near the training inputs, so
# the reduction needs far more digits than the posterior mean.
EXACT_VARIANCE_TOL = 1e-10

_logger = logging.getLogger(__name__)

# Salt that keeps the randomized root's test matrix apart from other draws.
RANDOMIZED_ROOT_SALT = 7

# Ritz values at or below this fraction of the largest one are dropped from the
# covariance root: they are rounding noise of a rank-deficient kernel.
RITZ_RELATIVE_CUTOFF = 1e-12


class RegressionProblem:
    """The training data of one `adapt` call and the products it needs.

    Args:
        lin: the `LinearizedModel`.
        x: converted inputs with N examples.
        residual: float64 [N, O], y − m(x).
        noise: float64 [O], per-output noise variances σ².
        prior_variance: float s².
    """

    def __init__(self, lin, x, residual, noise, prior_variance):
        self.lin = lin
        self.functional = lin.functional
        self.x = x
        self.residual = residual
        self.noise = noise
        self.prior_variance = prior_variance
        self.num_examples = int(residual.shape[0])
        self.num_outputs = int(residual.shape[1])
        self.noise_flat = tf.tile(noise, [self.num_examples])  # [N·O]
        self.function_size = self.num_examples * self.num_outputs
        self.parameter_size = lin.num_parameters
        self.ntk = lin.ntk(x)
        self._fisher_operators = {}
        self._preconditioners = {}

    # ------------------------------------------------------------------ operators

    def kernel_matmul(self, rhs):
        """K V for float64 V [N·O, R]."""
        dtype = self.functional.dtype
        return tf.cast(self.ntk.matmul(tf.cast(rhs, dtype)), tf.float64)

    def function_matmul(self, rhs):
        """(s² K + D) V for float64 V [N·O, R]."""
        return self.prior_variance * self.kernel_matmul(rhs) + self.noise_flat[:, None] * rhs

    def data_precision_matmul(self, rhs, method="ggn"):
        """Jᵀ D⁻¹ J V for float64 V [P, R], with the chosen Fisher product."""
        operator = self.fisher_operator(method)
        return tf.cast(operator.matmul(tf.cast(rhs, operator.dtype)), tf.float64)

    def parameter_matmul(self, rhs, method="ggn"):
        """(s² Jᵀ D⁻¹ J + I) V for float64 V [P, R]."""
        return self.prior_variance * self.data_precision_matmul(rhs, method) + rhs

    def fisher_operator(self, method):
        """Return the Fisher operator Jᵀ D⁻¹ J [P, P] for `method`, built once.

        Call it eagerly before a solver loop: an operator first built while a
        `tf.function` traces would hold tensors of that trace, which later
        traces cannot use.
        """
        if method not in self._fisher_operators:
            from tf_linntk import fisher

            self._fisher_operators[method] = fisher.fisher_operator(
                self.lin, self.x, likelihoods.Gaussian(noise_variance=self.noise.numpy()),
                method=method,
            )
        return self._fisher_operators[method]

    # ------------------------------------------------------------------ mean

    def solve_weights(self, space, options):
        """Return (w [P], records) from a CG solve in `space`."""
        if space == "function":
            return self._solve_function_space(options)
        return self._solve_parameter_space(options)

    def _solve_function_space(self, options):
        rhs = tf.reshape(self.residual, [-1, 1])  # [N·O, 1]
        preconditioner = self._function_preconditioner(options)
        alpha, record = solvers.conjugate_gradient(
            _operator(self.function_matmul, self.function_size),
            rhs,
            tol=options["tol"],
            max_iterations=options["max_iterations"],
            preconditioner=preconditioner,
            on_nonconvergence=options["on_nonconvergence"],
            verbose=options["verbose"],
        )
        # w = s² Jᵀ α
        cotangents = tf.reshape(alpha, [self.num_examples, self.num_outputs])
        weights = self.prior_variance * tf.cast(
            self.functional.vjp(self.x, tf.cast(cotangents, self.functional.dtype)), tf.float64
        )
        return weights, {"solve": record}

    def _solve_parameter_space(self, options):
        method = options["fisher"]
        self.fisher_operator(method)
        scaled = self.residual / self.noise[None, :]  # D⁻¹ r, [N, O]
        rhs = self.prior_variance * tf.cast(
            self.functional.vjp(self.x, tf.cast(scaled, self.functional.dtype)), tf.float64
        )
        data_term = _operator(lambda v: self.data_precision_matmul(v, method), self.parameter_size)
        preconditioner = self._preconditioner(
            options, self.parameter_size, data_term, self.prior_variance, 1.0
        )
        weights, record = solvers.conjugate_gradient(
            _operator(lambda v: self.parameter_matmul(v, method), self.parameter_size),
            rhs[:, None],
            tol=options["tol"],
            max_iterations=options["max_iterations"],
            preconditioner=preconditioner,
            on_nonconvergence=options["on_nonconvergence"],
            verbose=options["verbose"],
        )
        return weights[:, 0], {"solve": record}

    def _function_preconditioner(self, options):
        """Return the preconditioner of s² K + D (None if not used), built once."""
        if "function" not in self._preconditioners:
            self._preconditioners["function"] = self._preconditioner(
                options, self.function_size, self.ntk, self.prior_variance, self.noise_flat
            )
        return self._preconditioners["function"]

    def _preconditioner(self, options, size, data_operator, scale, shift):
        rank = min(options["preconditioner_rank"], size)
        choice = options["preconditioner"]
        if choice == "none" or (choice == "auto" and size <= 2 * rank):
            return None
        try:
            return preconditioners.nystrom_preconditioner(
                data_operator, rank, scale=scale, shift=shift, seed=options["seed"]
            )
        except ValueError as error:
            # NOTE: a float32 Gauss–Newton sketch can fail the Nyström positivity
            # check. CG then runs unpreconditioned: more iterations, same solution.
            if choice == "nystrom":
                raise
            _logger.warning("Nyström preconditioner skipped: %s", error)
            return None

    # ------------------------------------------------------------------ covariance

    def covariance_root(self, space, rank, seed, method="lanczos", verbose=0):
        """Return (U [P, k], θ [k], record): top Ritz pairs of Jᵀ D⁻¹ J = U diag(θ) Uᵀ.

        `verbose=1` shows a progress bar over the Lanczos iterations. The
        randomized method has no iterations, so it shows none.
        """
        if method == "randomized":
            return self._randomized_root(rank, seed)
        if space == "function":
            return self._root_from_function_space(rank, seed, verbose)
        return self._root_from_parameter_space(rank, seed, verbose)

    def _root_from_function_space(self, rank, seed, verbose):
        inv_sqrt_noise = tf.math.rsqrt(self.noise_flat)  # [N·O]

        # C = D^-1/2 K D^-1/2, whose eigenpairs give those of Jᵀ D⁻¹ J.
        def scaled_kernel(v):
            return inv_sqrt_noise[:, None] * self.kernel_matmul(inv_sqrt_noise[:, None] * v)

        rank = min(rank, self.function_size)
        values, vectors = solvers.lanczos_eigh(
            _operator(scaled_kernel, self.function_size), rank, seed=seed, verbose=verbose
        )
        values, vectors, record = _keep_significant(values, vectors)
        # U = Jᵀ D^-1/2 V Θ^-1/2, one batched VJP.
        cotangents = inv_sqrt_noise[:, None] * vectors * tf.math.rsqrt(values)[None, :]
        cotangents = tf.reshape(
            tf.transpose(cotangents), [-1, self.num_examples, self.num_outputs]
        )  # [k, N, O]
        root = tf.cast(
            self.functional.vjp_batched(self.x, tf.cast(cotangents, self.functional.dtype)),
            tf.float64,
        )  # [k, P]
        return tf.transpose(root), values, record

    def _randomized_root(self, rank, seed):
        """Top eigenpairs of Jᵀ D⁻¹ J by a randomized range finder and Rayleigh–Ritz.

        Z = Jᵀ D^-1/2 Ω, for k Gaussian columns Ω, spans the dominant right
        singular subspace of D^-1/2 J. With Z = Q R, B = D^-1/2 J Q and
        Bᵀ B = W Θ Wᵀ, the Ritz pairs are U = Q W and θ. Cost: one batched VJP
        and one batched JVP with k right-hand sides, plus O(P·k²); no sequential
        matvecs, unlike Lanczos.
        """
        rank = min(rank, self.function_size, self.parameter_size)
        dtype = self.functional.dtype
        inv_sqrt_noise = tf.reshape(tf.math.rsqrt(self.noise_flat), [self.num_examples, -1])
        seed_pair = tf.constant([0 if seed is None else seed, RANDOMIZED_ROOT_SALT], tf.int32)
        omega = tf.random.stateless_normal(
            [rank, self.num_examples, self.num_outputs], seed_pair, dtype=tf.float64
        )  # [k, N, O]
        sketch = self.functional.vjp_batched(self.x, tf.cast(omega * inv_sqrt_noise, dtype))
        basis, _ = tf.linalg.qr(tf.transpose(tf.cast(sketch, tf.float64)))  # Q [P, k]
        projected = self.functional.jvp_batched(self.x, tf.cast(tf.transpose(basis), dtype))
        projected = tf.reshape(
            tf.cast(projected, tf.float64) * inv_sqrt_noise, [rank, -1]
        )  # B [k, N·O]
        values, rotation = tf.linalg.eigh(tf.matmul(projected, projected, transpose_b=True))
        values, rotation = tf.reverse(values, [0]), tf.reverse(rotation, [1])
        values, vectors, record = _keep_significant(values, tf.matmul(basis, rotation))
        record["method"] = "randomized"
        return vectors, values, record

    def _root_from_parameter_space(self, rank, seed, verbose):
        rank = min(rank, self.parameter_size)
        self.fisher_operator("ggn")
        values, vectors = solvers.lanczos_eigh(
            _operator(lambda v: self.data_precision_matmul(v, "ggn"), self.parameter_size),
            rank,
            seed=seed,
            verbose=verbose,
        )
        values, vectors, record = _keep_significant(values, vectors)
        return vectors, values, record

    # ------------------------------------------------------------------ exact variances

    def exact_covariance(self, x_test, joint, options):
        """Latent predictive covariance at x_test from CG solves against K(X, x*).

        The N*·O columns of K(X, x*) come from one batched VJP over x* and one
        batched JVP over X (`dense_kernel_matrix`), so J(X) is never formed; the
        cross matrix is subject to `max_dense_bytes`. The solves use the
        adapt-time `max_iterations`, `on_nonconvergence` and preconditioner, with
        tolerance `EXACT_VARIANCE_TOL`.

        Returns:
            A tuple (covariance, record): float64 marginal variances [N*, O], or
            the joint covariance [N*·O, N*·O] when `joint`, and the CG record.
        """
        cross_operator = self.lin.ntk(self.x, x_test)
        self.lin.check_dense_size(
            tuple(cross_operator.shape), "variance='exact'", None,
            "predict on fewer test inputs per call",
        )
        cross = dense_kernel_matrix(cross_operator)  # K(X, x*) [N·O, N*·O]
        solution, record = solvers.conjugate_gradient(
            _operator(self.function_matmul, self.function_size),
            cross,
            tol=EXACT_VARIANCE_TOL,
            max_iterations=options["max_iterations"],
            preconditioner=self._function_preconditioner(options),
            on_nonconvergence=options["on_nonconvergence"],
        )
        s2 = self.prior_variance
        if joint:
            prior = dense_kernel_matrix(self.lin.ntk(x_test))  # K(x*, x*) [N*·O, N*·O]
            covariance = s2 * prior - s2**2 * tf.matmul(cross, solution, transpose_a=True)
            return covariance, record
        prior_diag = tf.cast(self.lin.ntk(x_test).diag_part(), tf.float64)  # [N*·O]
        reduction = tf.reduce_sum(cross * solution, axis=0)  # [N*·O]
        variance = s2 * prior_diag - s2**2 * reduction
        return tf.reshape(variance, [-1, self.num_outputs]), record  # [N*, O]


def dense_kernel_matrix(ntk):
    """Return the NTK operator's dense matrix [N1·O, N2·O] in float64 by a product with I.

    One batched VJP over the column inputs x2 gives J(x2) [N2·O, P] as
    tangents, and one batched JVP over the row inputs x1 maps them to the
    columns. Unlike `ntk.to_dense()`, J(x1) is never formed, so memory is
    O(N2·O·(P + N1·O)) for training rows x1 and a few test columns x2.
    """
    identity = tf.eye(int(ntk.shape[1]), dtype=ntk.dtype)  # [N2·O, N2·O]
    return tf.cast(ntk.matmul(identity), tf.float64)  # [N1·O, N2·O]


def _keep_significant(values, vectors):
    """Drop Ritz pairs whose value is rounding noise (≤ cutoff · max).

    Returns (values [k], vectors [M, k], record) where the record states the
    Lanczos iterations run (one Ritz pair each, fewer than requested when the
    Krylov space became invariant) and the number of pairs kept.
    """
    num_iterations = int(values.shape[0])
    keep = values > RITZ_RELATIVE_CUTOFF * tf.reduce_max(values)
    values = tf.boolean_mask(values, keep)
    vectors = tf.boolean_mask(vectors, keep, axis=1)
    record = {"iterations": int(num_iterations), "rank": int(values.shape[0])}
    return values, vectors, record


def _operator(matmul, size):
    """Wrap a float64 matmul callable as a self-adjoint LinearOperator [size, size]."""
    return _operators.CallableOperator(matmul, size)
