"""Log marginal likelihood of GP regression on a linearized network, and its maximization.

Model: y = m(x) + J(x) δ + ε with δ ~ N(0, s² I_P) and ε ~ N(0, D), D diagonal
with one noise variance σ²_o per output. With K = J Jᵀ [N·O, N·O] (example-major)
and the residual r = y − m(x) flattened to [N·O], the targets are Gaussian with
covariance A = s² K + D, so

    log p(y) = −½ rᵀ A⁻¹ r − ½ log|A| − (N·O/2) log 2π.

`log_marginal_likelihood` evaluates it exactly (dense Cholesky) or by stochastic
estimates (conjugate gradients plus stochastic Lanczos quadrature).
`maximize_marginal_likelihood` chooses σ² and s² by type-II maximum likelihood,
running L-BFGS over their logarithms.
"""

import logging
import math
import warnings
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk import _checks
from tf_linntk import solvers
from tf_linntk.inference import _targets
from tf_linntk.inference import base

__all__ = [
    "DENSE_MAX_SIZE",
    "LOG_MARGINAL_LIKELIHOOD_METHODS",
    "MAXIMIZE_METHODS",
    "NOISE_VARIANCE_RANGE",
    "PRIOR_VARIANCE_RANGE",
    "log_marginal_likelihood",
    "maximize_marginal_likelihood",
]

_logger = logging.getLogger(__name__)

# Largest N·O for which method="auto" forms K densely. A is then at most a 32 MB
# float64 matrix; at N·O = 2,000 on a 2-core CPU its Cholesky took 0.3 s and its
# eigendecomposition 15 s (tf.linalg.cholesky and tf.linalg.eigh, TF 2.21).
DENSE_MAX_SIZE = 2000

LOG_MARGINAL_LIKELIHOOD_METHODS = ("auto", "cholesky", "slq")
MAXIMIZE_METHODS = ("auto", "dense", "low_rank")
_ON_NONCONVERGENCE = ("warn", "raise", "ignore")

# Search ranges of the maximization. σ² is searched in this range times the mean
# squared residual v = mean(r²) (per output for per-output noise), and s² in this
# range times v / κ with κ = trace(K) / (N·O), the s² at which s²K alone explains v.
NOISE_VARIANCE_RANGE = (1e-10, 1e3)
PRIOR_VARIANCE_RANGE = (1e-10, 1e10)

# The per-output (Cholesky) objective raises each σ²_o to at least
# s² trace(K) / MAX_CONDITION_NUMBER, so the condition number of A stays below it
# (trace(K) ≥ λ_max(K)) and its Cholesky succeeds in float64.
MAX_CONDITION_NUMBER = 1e12

# Starting points of L-BFGS: fractions of v given to the noise (with s²K taking
# the rest), and factors of v / κ for s² when σ² is fixed.
_NOISE_FRACTIONS = (0.5, 0.1, 0.01)
_PRIOR_FACTORS = (1.0, 0.1, 10.0)


def log_marginal_likelihood(
    lin, x, y, noise_variance, prior_variance, *, method="auto", num_probes=10, lanczos_iterations=50,
    tol=1e-6, max_iterations=None, seed=None, max_dense_bytes=None, on_nonconvergence="warn",
):
    """Compute log p(y) of the linearized-network GP, exactly or by stochastic estimates.

    log p(y) = −½ rᵀ A⁻¹ r − ½ log|A| − (N·O/2) log 2π, with A = s² K + D,
    K = J Jᵀ the finite NTK on x, D = diag(σ²) tiled over examples (entry i·O + o
    is σ²_o), and r = y − m(x) flattened example-major.

    Methods:
        "cholesky": forms J [N·O, P] and K densely, then a Cholesky of A, in
            float64. Exact to rounding. No jitter is added: when A is not
            numerically positive definite the call raises.
        "slq": rᵀ A⁻¹ r by conjugate gradients (stop when ‖A α − r‖ ≤ tol·‖r‖),
            and log|A| by stochastic Lanczos quadrature: for S Rademacher probes
            z_s, a Lanczos run on A started at z_s / ‖z_s‖ gives the tridiagonal
            T_s = U diag(θ) Uᵀ, and log|A| ≈ (1/S) Σ_s ‖z_s‖² Σ_j U[0, j]² log θ_j.
            The estimate is unbiased up to the quadrature error, with a Monte
            Carlo error that falls as 1/√S.
        "auto": "cholesky" when N·O ≤ `DENSE_MAX_SIZE` (2,000) and the dense J
            and K fit in `max_dense_bytes`, else "slq".

    Cost: "cholesky" takes one vectorized Jacobian (memory N·O·P values) and
    O((N·O)³) flops. "slq" takes about S · `lanczos_iterations` + CG iterations
    kernel matvecs, each one VJP and one JVP over x; memory O(N·O · lanczos_iterations).

    Args:
        lin: the `tf_linntk.LinearizedModel`.
        x: inputs with N ≥ 1 examples.
        y: float targets [N, O], or [N] when O = 1.
        noise_variance: σ² > 0, a float or a float vector [O] (one per output).
        prior_variance: s² > 0, a float.
        method: "auto", "cholesky" or "slq".
        num_probes: number S of Rademacher probes for "slq".
        lanczos_iterations: Lanczos steps per probe for "slq" (capped at N·O).
        tol: relative residual tolerance of the CG solve for "slq".
        max_iterations: CG iteration limit for "slq"; None uses the solver's
            default, min(10·N·O, 1000).
        seed: int seed of the probes for "slq"; equal seeds give equal results.
            None draws a fresh seed.
        max_dense_bytes: size limit for the dense J and K; defaults to the
            model's `max_dense_bytes`.
        on_nonconvergence: "warn", "raise" or "ignore" when CG stops before `tol`.

    Returns:
        float64 scalar Tensor, log p(y).

    Raises:
        TypeError: if `y` is not numeric or an option has the wrong type.
        ValueError: if `y`, `noise_variance` or `prior_variance` has the wrong
            shape or a non-finite or non-positive value, an option is invalid,
            method="cholesky" exceeds `max_dense_bytes`, or A is not numerically
            positive definite.
        tf_linntk.solvers.ConvergenceError: if CG does not converge and
            on_nonconvergence="raise".

    Example:
        >>> value = log_marginal_likelihood(lin, x, y, 0.1, 1.0)   # doctest: +SKIP
        >>> value.shape, value.dtype                               # doctest: +SKIP
        (TensorShape([]), tf.float64)
    """
    noise = _targets.convert_noise_variance(noise_variance, lin.num_outputs)
    prior = _convert_prior_variance(prior_variance)
    method = _checks.check_option("method", method, LOG_MARGINAL_LIKELIHOOD_METHODS)
    num_probes = _checks.check_positive_int("num_probes", num_probes)
    lanczos_iterations = _checks.check_positive_int("lanczos_iterations", lanczos_iterations)
    tol = _checks.check_positive_float("tol", tol)
    max_iterations = _checks.check_iteration_count("max_iterations", max_iterations, allow_none=True)
    seed = _checks.check_seed("seed", seed)
    _checks.check_option("on_nonconvergence", on_nonconvergence, _ON_NONCONVERGENCE)
    problem = _prepare_problem(lin, x, y)

    if _resolve_dense(lin, problem, method, "cholesky", max_dense_bytes):
        kernel = _dense_kernel(problem.ntk)
        return _cholesky_log_likelihood(kernel, problem, noise[None], prior[None, None])[0]
    # NOTE: the solvers trace their loops once per operator object, so every call
    # here traces CG and Lanczos again (seconds), also for repeated calls on the same x.
    operator = _MarginalCovariance(problem.ntk, prior, _tile(noise, problem.num_examples))
    solution, _ = solvers.conjugate_gradient(
        operator, problem.residual, tol=tol, max_iterations=max_iterations,
        on_nonconvergence=on_nonconvergence,
    )
    quadratic = tf.tensordot(problem.residual, solution, 1)
    log_det = _slq_log_det(operator, num_probes, lanczos_iterations, seed, tf.reduce_min(noise))
    return _assemble(quadratic, log_det, problem.size)


def maximize_marginal_likelihood(
    lin, x, y, *, noise_variance=None, prior_variance=None, per_output_noise=False, method="auto",
    rank=100, max_iterations=200, tol=1e-7, seed=None, max_dense_bytes=None, on_nonconvergence="warn",
):
    """Choose σ² and s² by maximizing log p(y) (type-II maximum likelihood) with L-BFGS.

    The free parameters are log σ² (when `noise_variance` is None) and log s²
    (when `prior_variance` is None); a given value stays fixed. L-BFGS
    (`tfp.optimizer.lbfgs_minimize`, gradients by autodiff) minimizes
    −log p(y) / (N·O) from three starting points at once and keeps the best
    end point. With v = mean(r²) and κ = trace(K) / (N·O) (the sum of the Ritz
    values in place of trace(K) for "low_rank"), the starts give the
    noise the fractions 0.5, 0.1 and 0.01 of v and s²K the rest (σ² = f·v,
    s² = (1 − f)·v/κ), or s² = (1, 0.1, 10)·v/κ when σ² is fixed. The
    log-parameters are clipped to σ² ∈ `NOISE_VARIANCE_RANGE`·v = [1e-10, 1e3]·v
    and s² ∈ `PRIOR_VARIANCE_RANGE`·v/κ = [1e-10, 1e10]·v/κ, so an optimum on a
    bound means the data push the parameter out of that range.

    Methods:
        "dense": forms K and, for scalar noise, eigendecomposes it once,
            K = V diag(λ) Vᵀ; each evaluation is then O(N·O):
            log p = −½ Σ c_i²/(s²λ_i + σ²) − ½ Σ log(s²λ_i + σ²) − (N·O/2) log 2π
            with c = Vᵀ r. Per-output noise has no shared eigenbasis, so there
            each evaluation takes a batched Cholesky of A, O((N·O)³). In that
            case σ²_o is raised to at least s² trace(K) / `MAX_CONDITION_NUMBER`
            (1e12).
        "low_rank": `rank` Lanczos steps on K from a seeded random start give the
            Ritz pairs (λ_i, v_i), i ≤ k, and the same formula with the rest of
            the spectrum set to zero:
            rᵀA⁻¹r ≈ Σ c_i²/(s²λ_i + σ²) + (‖r‖² − ‖c‖²)/σ²,
            log|A| ≈ Σ log(s²λ_i + σ²) + (N·O − k) log σ².
            This is the exact log p of the GP whose kernel is K projected onto the
            Krylov space, Q Qᵀ K Q Qᵀ. It equals log p for K when the Krylov space
            contains the range of K, which a random start reaches once k exceeds
            rank(K) (for distinct nonzero eigenvalues). Otherwise the eigenvalues
            left out, at most the smallest Ritz value each, are treated as zero:
            log|A| is underestimated and the fitted σ² absorbs their variance.
            Only scalar noise is supported.
        "auto": "dense" when N·O ≤ `DENSE_MAX_SIZE` (2,000) and the dense J and K
            fit in `max_dense_bytes`, else "low_rank".

    Cost: "dense" takes one vectorized Jacobian (memory N·O·P values) and one
    O((N·O)³) eigendecomposition or Cholesky; "low_rank" takes `rank` kernel
    matvecs (one VJP and one JVP each) and O(N·O·rank²) flops. The L-BFGS
    iterations then cost O(N·O) each for scalar noise.

    Args:
        lin: the `tf_linntk.LinearizedModel`.
        x: inputs with N ≥ 1 examples.
        y: float targets [N, O], or [N] when O = 1.
        noise_variance: None to fit σ², or a fixed σ² > 0 (a float or a vector
            [O]); a vector with equal entries counts as scalar noise.
        prior_variance: None to fit s², or a fixed s² > 0.
        per_output_noise: when fitting σ², fit one variance per output (True)
            or one shared by all outputs (False).
        method: "auto", "dense" or "low_rank".
        rank: Lanczos steps k for "low_rank" (capped at N·O).
        max_iterations: L-BFGS iteration limit.
        tol: L-BFGS stops when the largest gradient entry of −log p / (N·O)
            with respect to the log-parameters is at most `tol`.
        seed: int seed of the Lanczos start vector for "low_rank".
        max_dense_bytes: size limit for the dense J and K; defaults to the
            model's `max_dense_bytes`.
        on_nonconvergence: "warn" (a `tf_linntk.solvers.ConvergenceWarning`),
            "raise" (a `ConvergenceError`) or "ignore" when L-BFGS stops before
            `tol`.

    Returns:
        dict with keys
            "noise_variance": σ², a float, or a float64 NumPy array [O] when
                `per_output_noise` is True or a vector was given;
            "prior_variance": s², a float;
            "log_marginal_likelihood": float, log p(y) at the optimum as the
                chosen method computes it (approximate for "low_rank");
            "iterations": int, L-BFGS iterations (0 when nothing is fitted);
            "method": "dense" or "low_rank", the method used;
            "converged": bool, whether L-BFGS met `tol` at the chosen end point.

    Raises:
        TypeError: if `y` is not numeric or an option has the wrong type.
        ValueError: for invalid data or option values (the message names the
            argument), or per_output_noise=True with a given `noise_variance`.
        NotImplementedError: for per-output noise with method "low_rank" (or
            "auto" above the dense limits).
        tf_linntk.solvers.ConvergenceError: if L-BFGS does not converge and
            on_nonconvergence="raise".

    Example:
        >>> fitted = maximize_marginal_likelihood(lin, x, y)      # doctest: +SKIP
        >>> sorted(fitted)                                        # doctest: +SKIP
        ['converged', 'iterations', 'log_marginal_likelihood', 'method', 'noise_variance', 'prior_variance']
    """
    fixed_noise, fixed_prior = _fixed_values(lin, noise_variance, prior_variance, per_output_noise)
    method = _checks.check_option("method", method, MAXIMIZE_METHODS)
    rank = _checks.check_positive_int("rank", rank)
    max_iterations = _checks.check_iteration_count("max_iterations", max_iterations)
    tol = _checks.check_positive_float("tol", tol)
    seed = _checks.check_seed("seed", seed)
    _checks.check_option("on_nonconvergence", on_nonconvergence, _ON_NONCONVERGENCE)
    problem = _prepare_problem(lin, x, y)

    vector_noise = per_output_noise or np.ndim(noise_variance) == 1
    per_output = problem.num_outputs > 1 and (
        per_output_noise or (fixed_noise is not None and _has_distinct_entries(fixed_noise))
    )
    dense = _resolve_dense(lin, problem, method, "dense", max_dense_bytes)
    if per_output and not dense:
        raise NotImplementedError(
            "`maximize_marginal_likelihood` supports per-output noise only with "
            f"method='dense' and N·O ≤ {DENSE_MAX_SIZE}; received method={method!r} with "
            f"N·O={problem.size}. Use scalar noise (per_output_noise=False) or fewer examples."
        )

    objective = _build_objective(problem, dense, per_output, rank, seed)
    space = _SearchSpace.create(objective, problem, fixed_noise, fixed_prior, per_output)
    fitted = _run_lbfgs(objective, space, problem.size, max_iterations, tol)
    _report_lbfgs(fitted, max_iterations, tol, on_nonconvergence)
    return _package(fitted, problem, vector_noise, "dense" if dense else "low_rank")


# ---------------------------------------------------------------------- problem data


class _Problem(NamedTuple):
    ntk: tf.linalg.LinearOperator  # K [N·O, N·O] in the model's dtype
    residual: tf.Tensor  # r = y − m(x), float64 [N·O], example-major
    num_examples: int
    num_outputs: int

    @property
    def size(self):
        return self.num_examples * self.num_outputs


def _prepare_problem(lin, x, y):
    """Convert and validate x and y; return K and the residual r = y − m(x)."""
    x = lin._convert_x(x)
    num_examples = lin.functional.num_examples(x)
    if not isinstance(num_examples, int):
        raise ValueError("`x` must have a known number of examples N; received a dynamic batch size.")
    if num_examples == 0:
        raise ValueError("`x` must contain at least one example; received N=0.")
    targets = _targets.convert_targets(y, num_examples, lin.num_outputs)
    mean = tf.cast(lin.prior_mean(x), tf.float64)  # [N, O]
    residual = tf.reshape(targets - mean, [-1])  # [N·O]
    return _Problem(lin.ntk(x), residual, num_examples, lin.num_outputs)


def _convert_prior_variance(prior_variance):
    """Return s² as a float64 scalar Tensor after checking that it is a finite float > 0."""
    value = np.asarray(prior_variance, dtype=object if prior_variance is None else None)
    if value.dtype.kind not in "fiu" or value.ndim != 0:
        raise TypeError(f"`prior_variance` must be a float > 0; received {prior_variance!r}.")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`prior_variance` must be a finite float > 0; received {value}.")
    return tf.constant(value, tf.float64)


def _fixed_values(lin, noise_variance, prior_variance, per_output_noise):
    """Validate the fixed σ² [O] and s² of a maximization (None where they are fitted)."""
    if not isinstance(per_output_noise, bool):
        raise TypeError(f"`per_output_noise` must be a bool; received {per_output_noise!r}.")
    if per_output_noise and noise_variance is not None:
        raise ValueError(
            "`per_output_noise`=True fits σ², so `noise_variance` must be None; received "
            f"noise_variance={noise_variance!r}. Pass one or the other."
        )
    noise = None if noise_variance is None else _targets.convert_noise_variance(
        noise_variance, lin.num_outputs
    )
    prior = None if prior_variance is None else _convert_prior_variance(prior_variance)
    return noise, prior


def _has_distinct_entries(values):
    return bool(tf.reduce_max(values) > tf.reduce_min(values))


def _resolve_dense(lin, problem, method, dense_name, max_dense_bytes):
    """Return whether `method` (or "auto") forms K densely; check the size limit if so."""
    if max_dense_bytes is not None:
        max_dense_bytes = _checks.check_positive_int("max_dense_bytes", max_dense_bytes)
    shapes = [(problem.size, lin.num_parameters), (problem.size, problem.size)]
    if method == dense_name:
        for shape in shapes:
            lin.check_dense_size(
                shape, f"method={dense_name!r}", max_dense_bytes, "use method='auto'"
            )
        return True
    if method != "auto" or problem.size > DENSE_MAX_SIZE:
        return False
    limit = lin.max_dense_bytes if max_dense_bytes is None else max_dense_bytes
    item_bytes = max(lin.functional.dtype.size, tf.float64.size)
    return all(rows * columns * item_bytes <= limit for rows, columns in shapes)


def _dense_kernel(ntk):
    kernel = tf.cast(ntk.to_dense(), tf.float64)  # [N·O, N·O]
    return 0.5 * (kernel + tf.transpose(kernel))


def _tile(noise, num_examples):
    """Tile σ² [..., O] over examples to the diagonal of D [..., N·O] (entry i·O + o is σ²_o)."""
    multiples = tf.concat([tf.ones([tf.rank(noise) - 1], tf.int32), [num_examples]], axis=0)
    return tf.tile(noise, multiples)


def _assemble(quadratic, log_det, size):
    return -0.5 * (quadratic + log_det + size * math.log(2.0 * math.pi))


# ---------------------------------------------------------------------- log p evaluations


def _cholesky_log_likelihood(kernel, problem, noise, prior):
    """Return log p [B] for noise [B, O] and prior [B, 1] by Cholesky of A [B, M, M]."""
    diagonal = _tile(noise, problem.num_examples)  # [B, N·O]
    covariance = prior[:, :, None] * kernel + tf.linalg.diag(diagonal)  # [B, N·O, N·O]
    chol = _cholesky(covariance)
    residual = tf.broadcast_to(problem.residual[:, None], [tf.shape(chol)[0], problem.size, 1])
    whitened = tf.linalg.triangular_solve(chol, residual, lower=True)  # [B, N·O, 1]
    quadratic = tf.reduce_sum(tf.square(whitened), axis=[1, 2])  # [B]
    log_det = 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)), axis=1)  # [B]
    return _assemble(quadratic, log_det, problem.size)


def _cholesky(covariance):
    """Factor A = L Lᵀ, raising a ValueError that names the fix when A is not positive definite."""
    message = (
        "The marginal covariance s²K + diag(σ²) is not numerically positive definite, so its "
        "Cholesky failed; `noise_variance` is too small relative to `prior_variance` times the "
        "largest NTK eigenvalue. Increase `noise_variance` or use method='slq'."
    )
    try:
        chol = tf.linalg.cholesky(covariance)
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(message) from error
    if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(chol))):
        raise ValueError(message)
    return chol


class _MarginalCovariance(tf.linalg.LinearOperator):
    """A = s² K + diag(d) [M, M] in float64, with K applied in its own dtype."""

    def __init__(self, ntk, prior_variance, diagonal):
        self._ntk = ntk
        self._prior_variance = prior_variance
        self._diagonal = diagonal
        super().__init__(
            dtype=tf.float64, is_self_adjoint=True, is_positive_definite=True,
            is_non_singular=True, is_square=True, name="MarginalCovariance",
        )

    def _shape(self):
        return self._ntk.shape

    def _shape_tensor(self):
        return self._ntk.shape_tensor()

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        x = tf.linalg.adjoint(x) if adjoint_arg else x
        product = tf.cast(self._ntk.matmul(tf.cast(x, self._ntk.dtype)), tf.float64)  # [M, R]
        return self._prior_variance * product + self._diagonal[:, None] * x


def _slq_log_det(operator, num_probes, lanczos_iterations, seed, min_eigenvalue):
    """Estimate log|A| by stochastic Lanczos quadrature with Rademacher probes."""
    size = int(operator.shape[0])
    steps = min(lanczos_iterations, size)
    bits = tf.random.stateless_uniform(
        [num_probes, size], base.stateless_seed(seed), maxval=2, dtype=tf.int32
    )
    probes = tf.cast(2 * bits - 1, tf.float64)  # [S, M], so ‖z_s‖² = M

    # NOTE: the probes run one after another, because `solvers.lanczos` takes one
    # start vector; a batched Lanczos would need S times fewer passes over x.
    estimates = []
    for probe in tf.unstack(probes):
        _, alpha, beta = solvers.lanczos(operator, steps, start=probe)
        tridiagonal = tf.linalg.diag(alpha) + tf.linalg.diag(beta, k=1) + tf.linalg.diag(beta, k=-1)
        ritz_values, rotation = tf.linalg.eigh(tridiagonal)  # [k], [k, k]
        # Every eigenvalue of A is at least min σ², so smaller Ritz values are rounding.
        ritz_values = tf.maximum(ritz_values, min_eigenvalue)
        weights = tf.square(rotation[0])  # [k]
        estimates.append(size * tf.reduce_sum(weights * tf.math.log(ritz_values)))
    return tf.reduce_mean(tf.stack(estimates))


# ---------------------------------------------------------------------- maximization


class _Objective(NamedTuple):
    log_likelihood: object  # callable: noise [B, O'], prior [B, 1] -> log p [B]
    kernel_scale: float  # κ = trace(K) / (N·O), or its Krylov-space part for "low_rank"
    noise_floor: float  # σ² is raised to at least s² times this (0 for scalar noise)


class _Spectrum(NamedTuple):
    eigenvalues: tf.Tensor  # λ [k] ≥ 0
    coefficients_sq: tf.Tensor  # c² [k], c = Vᵀ r
    rest_sq: tf.Tensor  # ‖r‖² − ‖c‖², the part of r outside span(V)
    rest_count: int  # N·O − k eigenvalues treated as zero


def _build_objective(problem, dense, per_output, rank, seed):
    """Return the log p(σ², s²) evaluator and κ for the chosen method."""
    if dense and per_output:
        kernel = _dense_kernel(problem.ntk)
        trace = float(tf.linalg.trace(kernel))

        def log_likelihood(noise, prior):
            return _cholesky_log_likelihood(kernel, problem, noise, prior)

        return _Objective(log_likelihood, trace / problem.size, trace / MAX_CONDITION_NUMBER)

    # K = V diag(λ) Vᵀ exactly, or its top Ritz pairs from `rank` Lanczos steps.
    if dense:
        eigenvalues, eigenvectors = tf.linalg.eigh(_dense_kernel(problem.ntk))
    else:
        steps = min(rank, problem.size)
        eigenvalues, eigenvectors = solvers.lanczos_eigh(problem.ntk, steps, seed=seed)
    spectrum = _make_spectrum(eigenvalues, eigenvectors, problem)

    def log_likelihood(noise, prior):
        return _spectral_log_likelihood(spectrum, problem.size, noise, prior)

    return _Objective(log_likelihood, float(tf.reduce_sum(spectrum.eigenvalues)) / problem.size, 0.0)


def _make_spectrum(eigenvalues, eigenvectors, problem):
    rank = int(eigenvalues.shape[0])
    coefficients = tf.linalg.matvec(eigenvectors, problem.residual, transpose_a=True)  # [k]
    coefficients_sq = tf.square(coefficients)
    rest_sq = tf.constant(0.0, tf.float64)
    if rank < problem.size:
        rest_sq = tf.maximum(tf.reduce_sum(tf.square(problem.residual)) - tf.reduce_sum(coefficients_sq), 0.0)
    # K is positive semi-definite, so negative eigenvalues are rounding.
    return _Spectrum(tf.maximum(eigenvalues, 0.0), coefficients_sq, rest_sq, problem.size - rank)


def _spectral_log_likelihood(spectrum, size, noise, prior):
    """Return log p [B] for scalar noise [B, 1] and prior [B, 1] from K's (partial) spectrum."""
    variances = prior * spectrum.eigenvalues + noise  # [B, k], eigenvalues of A
    noise = noise[:, 0]  # [B]
    quadratic = tf.reduce_sum(spectrum.coefficients_sq / variances, axis=1) + spectrum.rest_sq / noise
    log_det = tf.reduce_sum(tf.math.log(variances), axis=1) + spectrum.rest_count * tf.math.log(noise)
    return _assemble(quadratic, log_det, size)


class _SearchSpace(NamedTuple):
    """Free log-parameters u [B, d]: log σ² (1 or O entries, when free), then log s² (when free)."""

    starts: tf.Tensor  # [B, d] starting points
    lower: tf.Tensor  # [d] lower bounds of u
    upper: tf.Tensor  # [d] upper bounds of u
    fixed_noise: tf.Tensor  # [O'] or None when σ² is free
    fixed_prior: tf.Tensor  # scalar or None when s² is free
    noise_floor: float  # σ² is raised to at least s² times this

    @classmethod
    def create(cls, objective, problem, fixed_noise, fixed_prior, per_output):
        """Build the starts and bounds from the data scale v and the kernel scale κ."""
        residual = tf.reshape(problem.residual, [problem.num_examples, problem.num_outputs])
        total_scale = _positive_or_one(tf.reduce_mean(tf.square(residual)))
        noise_scale = tf.reshape(total_scale, [1])  # [1]
        if per_output:
            noise_scale = tf.reduce_mean(tf.square(residual), axis=0)  # [O]
            noise_scale = tf.where(noise_scale > 0, noise_scale, total_scale)
        prior_scale = total_scale / _positive_or_one(objective.kernel_scale)
        if fixed_noise is not None and not per_output:
            fixed_noise = fixed_noise[:1]  # [1], all entries are equal

        starts, lower, upper = [], [], []
        if fixed_noise is None:
            noise_starts = [tf.math.log(f * noise_scale) for f in _NOISE_FRACTIONS]
            starts.append(tf.stack(noise_starts))  # [B, O']
            lower.append(tf.math.log(NOISE_VARIANCE_RANGE[0] * noise_scale))
            upper.append(tf.math.log(NOISE_VARIANCE_RANGE[1] * noise_scale))
        if fixed_prior is None:
            fractions = _PRIOR_FACTORS if fixed_noise is not None else [1.0 - f for f in _NOISE_FRACTIONS]
            starts.append(tf.math.log(tf.constant(fractions, tf.float64)[:, None] * prior_scale))  # [B, 1]
            lower.append(tf.math.log([PRIOR_VARIANCE_RANGE[0] * prior_scale]))
            upper.append(tf.math.log([PRIOR_VARIANCE_RANGE[1] * prior_scale]))
        fixed = (fixed_noise, fixed_prior, objective.noise_floor)
        if not starts:
            empty = tf.zeros([0], tf.float64)
            return cls(tf.zeros([1, 0], tf.float64), empty, empty, *fixed)
        return cls(tf.concat(starts, 1), tf.concat(lower, 0), tf.concat(upper, 0), *fixed)

    def unpack(self, position):
        """Map clipped log-parameters u [B, d] to noise [B, O'] (at least the floor) and prior [B, 1]."""
        values = tf.exp(tf.clip_by_value(position, self.lower, self.upper))  # [B, d]
        batch = tf.shape(position)[0]
        if self.fixed_noise is None:
            num_noise = int(self.starts.shape[1]) - (1 if self.fixed_prior is None else 0)
            noise, values = values[:, :num_noise], values[:, num_noise:]
        else:
            noise = tf.broadcast_to(self.fixed_noise[None], [batch, int(self.fixed_noise.shape[0])])
        prior = values if self.fixed_prior is None else tf.fill([batch, 1], self.fixed_prior)
        return tf.maximum(noise, prior * self.noise_floor), prior


def _positive_or_one(value):
    """Return a positive float64 scalar: `value` if it is > 0, else 1 (a scale of last resort)."""
    value = tf.cast(value, tf.float64)
    return tf.where(value > 0, value, tf.constant(1.0, tf.float64))


class _Fit(NamedTuple):
    noise: np.ndarray  # [O'] fitted or fixed σ²
    prior: float
    log_likelihood: float
    iterations: int
    converged: bool
    gradient_norm: float  # largest |∂(−log p / (N·O)) / ∂u| at the end point


def _run_lbfgs(objective, space, size, max_iterations, tol):
    """Minimize −log p / (N·O) over the free log-parameters from every start; keep the best."""

    def negative_log_likelihood(position):  # [B, d] -> [B]
        noise, prior = space.unpack(position)
        return -objective.log_likelihood(noise, prior) / size

    if int(space.starts.shape[1]) == 0:
        return _evaluate_fit(space, objective, space.starts[0], 0, True, 0.0)

    # Eager L-BFGS, because tracing it costs more than it saves for one call: for two
    # parameters and N·O = 180 on a 2-core CPU, tf.function took 11 s to trace and
    # 0.03 s to run, against 3 s for the eager run (TFP 0.25).
    results = tfp.optimizer.lbfgs_minimize(
        lambda position: tfp.math.value_and_gradient(negative_log_likelihood, position),
        initial_position=space.starts, tolerance=tol, max_iterations=max_iterations,
    )
    values = tf.where(tf.math.is_finite(results.objective_value), results.objective_value, np.inf)
    best = int(tf.argmin(values))
    gradient_norm = float(tf.reduce_max(tf.abs(results.objective_gradient[best])))
    converged = bool(results.converged[best]) and not bool(results.failed[best])
    return _evaluate_fit(
        space, objective, results.position[best], int(results.num_iterations), converged, gradient_norm
    )


def _evaluate_fit(space, objective, position, iterations, converged, gradient_norm):
    """Evaluate log p at the end point u [d], clipped to the bounds."""
    position = tf.clip_by_value(position, space.lower, space.upper)[None]  # [1, d]
    noise, prior = space.unpack(position)
    return _Fit(
        noise=noise[0].numpy(), prior=float(prior[0, 0]),
        log_likelihood=float(objective.log_likelihood(noise, prior)[0]),
        iterations=iterations, converged=converged, gradient_norm=gradient_norm,
    )


def _report_lbfgs(fit, max_iterations, tol, on_nonconvergence):
    """Log the fit, and warn or raise when L-BFGS stopped before `tol`."""
    _logger.info(
        "maximize_marginal_likelihood: noise_variance=%s, prior_variance=%g, log p=%.6g, "
        "%d L-BFGS iterations, converged=%s.",
        fit.noise, fit.prior, fit.log_likelihood, fit.iterations, fit.converged,
    )
    if fit.converged or on_nonconvergence == "ignore":
        return
    message = (
        f"L-BFGS did not converge while maximizing the log marginal likelihood: after "
        f"{fit.iterations} iterations (max_iterations={max_iterations}) the largest gradient "
        f"entry of −log p / (N·O) is {fit.gradient_norm:.3g}, tol={tol:g}. Increase "
        "`max_iterations` or loosen `tol`."
    )
    if on_nonconvergence == "raise":
        raise solvers.ConvergenceError(message)
    # stacklevel=3 points at the caller of maximize_marginal_likelihood.
    warnings.warn(message, solvers.ConvergenceWarning, stacklevel=3)


def _package(fit, problem, vector_noise, method):
    """Return the public result dict of `maximize_marginal_likelihood`."""
    if vector_noise:
        noise = np.broadcast_to(fit.noise, [problem.num_outputs]).astype(np.float64)
    else:
        noise = float(fit.noise[0])
    return {
        "noise_variance": noise,
        "prior_variance": fit.prior,
        "log_marginal_likelihood": fit.log_likelihood,
        "iterations": fit.iterations,
        "method": method,
        "converged": fit.converged,
    }
