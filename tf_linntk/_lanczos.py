"""Lanczos tridiagonalization with full reorthogonalization, and what it yields."""

import logging
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import _operators
from tf_linntk import _progress

_logger = logging.getLogger("tf_linntk.solvers")

# Lanczos stops when ‖w‖ ≤ _BREAKDOWN_FACTOR·√M·eps·‖A‖ (see `lanczos`).
_BREAKDOWN_FACTOR = 1000.0
# Salt that keeps the Lanczos start vector apart from other draws with the same `seed`.
_LANCZOS_SALT = 1


def lanczos(operator, num_iterations, *, seed=None, start=None, dtype=tf.float64, verbose=0):
    """Tridiagonalize a symmetric operator with Lanczos and full reorthogonalization.

    Builds an orthonormal basis Q [M, k] of the Krylov space
    span{q₀, A q₀, …, A^(k−1) q₀} and T = Qᵀ A Q, which is tridiagonal with
    diagonal `alpha` and off-diagonals `beta`. Every new vector is
    orthogonalized twice against all earlier ones, so Q stays orthonormal to
    rounding error.

    When the Krylov space becomes invariant under A (the new vector's norm
    falls below 1000·√M·eps·‖A‖, with eps of the operator's dtype and ‖A‖
    estimated by the largest ‖A qⱼ‖ seen), the iteration stops early and
    returns a shorter k. Then A Q = Q T up to that residual. The factor 1000
    covers the rounding noise measured after an invariant subspace in float64
    (up to about 200·√M·eps·‖A‖ on low-rank-plus-shift test matrices).

    Cost: k matvecs with one column each, plus O(M·k²) for the
    reorthogonalization and an [M, k] buffer.

    Progress and logging: at `verbose=1` the loop runs in compiled chunks of
    iterations, as in `conjugate_gradient`. After each chunk a
    `keras.utils.Progbar` over `num_iterations` shows the iterations run and
    `relative_beta`, the last βⱼ over the estimate of ‖A‖. That ratio falls
    toward the breakdown threshold as the Krylov space nears an invariant one.
    The results are bit-identical to those of `verbose=0`. Under an outer
    `tf.function` no bar is shown and the single compiled loop runs. The logger
    `tf_linntk.solvers` records the start and, in eager mode, the stop at INFO,
    and each chunk at DEBUG.

    Args:
      operator: The symmetric matrix A [M, M], as a LinearOperator-like object
        or a callable on [M, R] (see `conjugate_gradient`). A callable needs
        `start`, because the size M comes from it.
      num_iterations: Maximum k, at most M.
      seed: Optional int. The start vector is a standard normal draw from
        `tf.random.stateless_normal` with a seed derived from it, so equal seeds
        give equal results. Ignored when `start` is given.
      start: Optional float Tensor [M], the start vector (normalized here).
      dtype: Float dtype of the basis and of T.
      verbose: 0 (default) prints nothing, 1 shows a Keras progress bar over
        the iterations in eager mode.

    Returns:
      A tuple `(basis, alpha, beta)`: `dtype` Tensors Q [M, k], alpha [k] and
      beta [k−1], with k ≤ `num_iterations`.

    Raises:
      TypeError: If an argument has the wrong kind or dtype.
      ValueError: If `num_iterations` exceeds M, `start` has the wrong shape or
        is zero, `verbose` is not 0 or 1, or the operator returns NaN/Inf.

    Example:
      >>> matrix = tf.linalg.LinearOperatorFullMatrix(tf.eye(4, dtype=tf.float64) * 2.0)
      >>> basis, alpha, beta = lanczos(matrix, 3, seed=0)
      >>> basis.shape, alpha.numpy()
      (TensorShape([4, 1]), array([2.]))
    """
    with tf.name_scope("lanczos"):
        dtype = _operators.check_float_dtype(dtype)
        num_iterations = _checks.check_positive_int("num_iterations", num_iterations)
        verbose = _progress.check_verbose(verbose)
        start = _lanczos_start(operator, start, seed, dtype)
        size = int(start.shape[0])
        if num_iterations > size:
            raise ValueError(
                f"`num_iterations` must be at most M={size}, the operator size; "
                f"received {num_iterations}."
            )

        # Breakdown threshold relative to ‖A‖, above the rounding noise of the matvecs.
        eps = np.finfo(_operators.operator_dtype(operator, dtype).as_numpy_dtype).eps
        breakdown_tol = tf.constant(_BREAKDOWN_FACTOR * np.sqrt(size) * eps, dtype)
        _logger.info("lanczos: start, size M=%d, num_iterations=%d", size, num_iterations)
        basis, alpha, beta, failed = _run_lanczos(operator, start, num_iterations, breakdown_tol, verbose)
        message = "`operator` returned NaN or Inf during Lanczos. Check its parameters and inputs."
        basis = _operators.raise_if(failed, basis, message)
        if tf.executing_eagerly():
            _logger.info("lanczos: stop after %d of %d requested iterations", basis.shape[0], num_iterations)
        return tf.transpose(basis), alpha, beta


@tf.autograph.experimental.do_not_convert
def lanczos_eigh(
    operator, num_iterations, *, num_eigenvalues=None, seed=None, start=None, dtype=tf.float64,
    verbose=0,
):
    """Approximate the largest eigenpairs of a symmetric operator by Ritz pairs from Lanczos.

    With T = S Λ Sᵀ (the eigendecomposition of the k×k tridiagonal matrix from
    `lanczos`), the Ritz values are Λ and the Ritz vectors Q S. The largest Ritz
    values converge first. They are exact when the Krylov space is invariant
    under A.

    Cost: as `lanczos` (k matvecs, O(M·k²)), plus O(k³) for the small eigenproblem.

    Args:
      operator: The symmetric matrix A [M, M] (see `lanczos`).
      num_iterations: Lanczos iterations k, at most M.
      num_eigenvalues: Number E of top pairs to return, all k by default.
      seed: Optional int seed of the start vector (see `lanczos`).
      start: Optional float Tensor [M], the start vector.
      dtype: Float dtype of the results.
      verbose: 0 (default) or 1, a progress bar over the Lanczos iterations
        (see `lanczos`).

    Returns:
      A tuple `(eigenvalues, eigenvectors)`: `dtype` Tensors [E] in descending
      order and [M, E] with orthonormal columns, E = min(num_eigenvalues, k).

    Raises:
      TypeError: If an argument has the wrong kind or dtype.
      ValueError: As `lanczos`.

    Example:
      >>> matrix = tf.linalg.LinearOperatorDiag(tf.constant([3.0, 2.0, 1.0], tf.float64))
      >>> values, vectors = lanczos_eigh(matrix, 3, num_eigenvalues=2, seed=0)
      >>> np.round(values.numpy(), 6), vectors.shape
      (array([3., 2.]), TensorShape([3, 2]))
    """
    with tf.name_scope("lanczos_eigh"):
        num_eigenvalues = _checks.check_positive_int(
            "num_eigenvalues", num_eigenvalues, allow_none=True
        )
        basis, alpha, beta = lanczos(
            operator, num_iterations, seed=seed, start=start, dtype=dtype, verbose=verbose
        )

        # T = S Λ Sᵀ, eigenvalues in descending order.
        eigenvalues, ritz_rotation = tf.linalg.eigh(_tridiagonal(alpha, beta))
        eigenvalues = tf.reverse(eigenvalues, axis=[0])[:num_eigenvalues]  # [E]
        ritz_rotation = tf.reverse(ritz_rotation, axis=[1])[:, :num_eigenvalues]  # [k, E]
        return eigenvalues, tf.matmul(basis, ritz_rotation)  # [M, E]


@tf.autograph.experimental.do_not_convert
def lanczos_inverse_root(operator, rank, *, seed=None, start=None, dtype=tf.float64, verbose=0):
    """Compute R [M, k] with R Rᵀ = Q T⁻¹ Qᵀ ≈ A⁻¹ from a rank-k Lanczos run.

    The construction follows LOVE (Pleiss et al., 2018, "Constant-time
    predictive distributions for Gaussian processes"). With T = L Lᵀ
    (Cholesky) the root is R = Q L⁻ᵀ. The approximation is exact on the
    Krylov space: R Rᵀ b = A⁻¹ b for every b in span(Q) once span(Q) is
    invariant under A, which happens when k reaches the number of distinct
    eigenvalues that the start vector touches, or k = M. Outside span(Q) it is
    zero, so for A = s²K + σ²I with K of low rank the caller adds the
    (1/σ²)(I − Q Qᵀ) part if it needs the whole inverse.

    Cost: k matvecs (as `lanczos`), O(M·k²) flops and an [M, k] result.

    Args:
      operator: The symmetric positive definite matrix A [M, M] (see `lanczos`).
      rank: Lanczos iterations k, at most M.
      seed: Optional int seed of the start vector (see `lanczos`).
      start: Optional float Tensor [M], the start vector. Pass the right-hand
        side whose solves matter most.
      dtype: Float dtype of the result.
      verbose: 0 (default) or 1, a progress bar over the Lanczos iterations
        (see `lanczos`).

    Returns:
      A `dtype` Tensor R [M, k] (k ≤ `rank`, shorter on early breakdown).

    Raises:
      TypeError: If an argument has the wrong kind or dtype.
      ValueError: As `lanczos`, or if T is not positive definite because the
        operator is not.

    Example:
      >>> matrix = tf.linalg.LinearOperatorDiag(tf.constant([4.0, 2.0, 1.0], tf.float64))
      >>> root = lanczos_inverse_root(matrix, 3, seed=0)
      >>> np.round(tf.linalg.diag_part(root @ tf.transpose(root)).numpy(), 6)
      array([0.25, 0.5 , 1.  ])
    """
    with tf.name_scope("lanczos_inverse_root"):
        basis, alpha, beta = lanczos(
            operator, rank, seed=seed, start=start, dtype=dtype, verbose=verbose
        )

        # T = L Lᵀ, then R = Q L⁻ᵀ = (L⁻¹ Qᵀ)ᵀ.
        tridiagonal = _tridiagonal(alpha, beta)
        eigenvalues = tf.linalg.eigvalsh(tridiagonal)
        message = "`operator` must be positive definite, but the Lanczos matrix T has an eigenvalue <= 0."
        tridiagonal = _operators.raise_if(tf.reduce_min(eigenvalues) <= 0, tridiagonal, message)
        lower = tf.linalg.cholesky(tridiagonal)  # [k, k]
        return tf.transpose(tf.linalg.triangular_solve(lower, tf.transpose(basis), lower=True))


# ------------------------------ Lanczos loop


class _LanczosState(NamedTuple):
    step: tf.Tensor  # [] int32, basis vectors stored so far
    basis: tf.Tensor  # [K, M], row j is q_j, zero rows past `step`
    alpha: tf.Tensor  # [K]
    beta: tf.Tensor  # [K]
    vector: tf.Tensor  # [M], the next basis vector
    norm_estimate: tf.Tensor  # [], largest ‖A q_j‖ so far, a lower bound on ‖A‖
    breakdown: tf.Tensor  # [] bool, the Krylov space is invariant
    failed: tf.Tensor  # [] bool, the operator returned NaN or Inf


def _run_lanczos(operator, start, num_iterations, breakdown_tol, verbose):
    """Return (basis [k, M], alpha [k], beta [k−1], failed) from one compiled loop or from chunks."""
    if not _progress.shows_progress(verbose):
        return _operators.run_compiled(
            _lanczos_loop, _lanczos_core, operator, start,
            tf.constant(num_iterations, tf.int32), breakdown_tol,
        )

    def advance(state, limit):
        return _operators.run_compiled(
            _lanczos_advance, _lanczos_advance_core, operator, state, limit, breakdown_tol
        )

    def status(state):
        step = int(state.step)
        norm_estimate = float(state.norm_estimate)
        last_beta = float(state.beta[step - 1]) if step > 0 else 0.0
        relative_beta = last_beta / norm_estimate if norm_estimate > 0 else 0.0
        return bool(state.breakdown) or bool(state.failed), [("relative_beta", relative_beta)]

    state = _initial_lanczos_state(start, num_iterations)
    final = _progress.run_in_chunks(advance, state, num_iterations, status, _logger, "lanczos")
    return _lanczos_outputs(final)


def _lanczos_loop(operator, start, num_iterations, breakdown_tol):
    """Run Lanczos with full reorthogonalization from the unit vector start [M]."""
    state = _initial_lanczos_state(start, num_iterations)
    return _lanczos_outputs(_lanczos_advance(operator, state, num_iterations, breakdown_tol))


def _initial_lanczos_state(start, num_iterations):
    zeros = tf.zeros([num_iterations], start.dtype)
    basis = tf.zeros([num_iterations, tf.size(start)], start.dtype)
    return _LanczosState(
        tf.constant(0), basis, zeros, zeros, start, tf.constant(0, start.dtype),
        tf.constant(False), tf.constant(False),
    )


def _lanczos_advance(operator, state, limit, breakdown_tol):
    """Run Lanczos iterations from `state` until `state.step` reaches `limit`, breakdown or failure."""

    def cond(s):
        return (s.step < limit) & ~s.breakdown & ~s.failed

    def body(s):
        index = [[s.step]]
        basis = tf.tensor_scatter_nd_update(s.basis, index, s.vector[None])  # [K, M]
        product = _operators.apply_operator(operator, s.vector[:, None])[:, 0]  # A q_j, [M]
        alpha = tf.tensor_scatter_nd_update(s.alpha, index, [tf.tensordot(s.vector, product, 1)])
        norm_estimate = tf.maximum(s.norm_estimate, tf.norm(product))

        # Remove the components along all stored vectors, twice for numerical orthogonality.
        residual = product
        for _ in range(2):
            residual -= tf.linalg.matvec(basis, tf.linalg.matvec(basis, residual), transpose_a=True)
        beta_j = tf.norm(residual)
        beta = tf.tensor_scatter_nd_update(s.beta, index, [beta_j])
        breakdown = beta_j <= breakdown_tol * norm_estimate
        vector = tf.math.divide_no_nan(residual, beta_j)
        failed = ~_operators.all_finite(product)
        return (_LanczosState(s.step + 1, basis, alpha, beta, vector, norm_estimate, breakdown, failed),)

    (final,) = tf.while_loop(cond, body, (state,))
    return final


def _lanczos_outputs(final):
    """Return (basis [k, M], alpha [k], beta [k−1], failed) of the final state, k = steps run."""
    k = final.step
    return final.basis[:k], final.alpha[:k], final.beta[: k - 1], final.failed


def _tridiagonal(alpha, beta):
    return tf.linalg.diag(alpha) + tf.linalg.diag(beta, k=1) + tf.linalg.diag(beta, k=-1)  # [k, k]


def _lanczos_start(operator, start, seed, dtype):
    """Return the normalized start vector [M] of `dtype`."""
    size = _operators.system_size(operator)
    if start is None:
        if size is None:
            raise ValueError("`start` is required when `operator` is a callable, because M comes from it.")
        seed_pair = _operators.stateless_seed(seed, _LANCZOS_SALT)
        start = tf.random.stateless_normal([size], seed_pair, dtype=dtype)
    start = tf.convert_to_tensor(start)
    if not start.dtype.is_floating:
        raise TypeError(f"`start` must be a float tensor; received dtype {start.dtype.name}.")
    size_mismatch = size is not None and start.shape.rank == 1 and start.shape[0] != size
    if start.shape.rank != 1 or start.shape[0] is None or size_mismatch:
        raise ValueError(
            f"`start` must have shape [M] with M={size} (the operator size); received shape {start.shape}."
        )
    start = tf.cast(start, dtype)
    norm = tf.norm(start)
    valid = tf.math.is_finite(norm) & (norm > 0)
    start = _operators.raise_if(~valid, start, "`start` must be a finite nonzero vector.")
    return start / norm


_lanczos_core = _operators.compile_loop(_lanczos_loop)
_lanczos_advance_core = _operators.compile_loop(_lanczos_advance)
