"""Low-rank preconditioners for A = scale·K + diag(shift) with a positive semi-definite K.

Both constructors approximate K ≈ F Fᵀ with a factor F [M, k] and return
P⁻¹ for P = scale·F Fᵀ + diag(shift), applied with the Woodbury identity in
O(M·k) per column. P equals A exactly when K has rank ≤ k and the factor
captures it, and conjugate gradients then converges in a few iterations.

When each pays, given a kernel whose spectrum is a few large eigenvalues above
a flat floor (as for the finite NTK):

- `pivoted_cholesky_preconditioner` costs k matvecs with one column each
  (or k calls of `row`), so it pays when those are cheap compared to one CG
  iteration, or when k is small. It stops early when K has rank below k.
- `nystrom_preconditioner` costs one batched matmul K Ω with k + oversampling
  columns, which for the NTK is one VJP and one JVP pass over the data. It
  pays whenever a batched matmul costs far less than k single matvecs, the
  usual case for autodiff operators.

Either pays once unpreconditioned CG would need more iterations than the
preconditioner costs in matvecs. CG needs at least one iteration per
eigenvalue of scale·K well above the shift, so expect that from a few dozen
such eigenvalues on. On K + 10⁻²·I with K = J Jᵀ of rank 30 (J [200, 30],
singular values 10² … 10⁻¹, condition 10⁶, the matrix of tests/test_solvers.py)
and four random right-hand sides, CG to tol=1e-6 takes 118 to 121 iterations
alone, 37 to 40 with either preconditioner of rank 10, 11 to 12 with rank 20
and 1 with rank 30.

NOTE: outside the factor's range P has eigenvalue `shift`, so eigenvalues of
K that a low rank leaves out stay for CG to resolve. Frangella, Tropp and
Udell (2021) scale that part by the smallest kept eigenvalue instead.
"""

import logging

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk import _checks
from tf_linntk import _operators

__all__ = [
    "LowRankPreconditioner",
    "nystrom_preconditioner",
    "pivoted_cholesky_preconditioner",
]

_logger = logging.getLogger(__name__)

# Keeps the Nyström draws apart from Lanczos draws made with the same `seed`.
_NYSTROM_SALT = 2


@tfp.experimental.auto_composite_tensor(omit_kwargs=("name",))
class LowRankPreconditioner(tf.linalg.LinearOperator):
    """The inverse P⁻¹ of P = scale·F Fᵀ + diag(shift), a preconditioner for scale·K + diag(shift).

    With D = diag(shift) and C Cᵀ = I/scale + Fᵀ D⁻¹ F (Cholesky of the k×k
    capacitance matrix), the Woodbury identity gives

        P⁻¹ = D⁻¹ − G Gᵀ,   G = D⁻¹ F C⁻ᵀ   [M, k],

    so one application to V [M, R] costs O(M·k·R). G is computed once when the
    operator is built, in O(M·k² + k³).

    The class is a `CompositeTensor` (through
    `tfp.experimental.auto_composite_tensor`), so `tf.function` traces it by
    shape and dtype and not per instance.

    Args:
      factor: float Tensor [M, k], F with K ≈ F Fᵀ.
      scale: float scalar > 0, the kernel scale s².
      shift: float Tensor [M] > 0, the diagonal σ² (broadcast a scalar first).
      correction: Optional float Tensor [M, k], G when already known (used when
        tf.function rebuilds the operator). Computed from the others if None.
      name: Name of the operator.
    """

    def __init__(self, factor, scale, shift, correction=None, name="LowRankPreconditioner"):
        parameters = dict(factor=factor, scale=scale, shift=shift, correction=correction, name=name)
        with tf.name_scope(name):
            self._factor = tf.convert_to_tensor(factor, name="factor")
            dtype = self._factor.dtype
            self._scale = tf.convert_to_tensor(scale, dtype=dtype, name="scale")
            self._shift = tf.convert_to_tensor(shift, dtype=dtype, name="shift")
            if self._factor.shape.rank != 2 or self._shift.shape.rank != 1:
                raise ValueError(
                    f"`factor` must be [M, k] and `shift` [M]; received shapes "
                    f"{self._factor.shape} and {self._shift.shape}."
                )
            if correction is None:
                correction = _woodbury_correction(self._factor, self._scale, self._shift)
            self._correction = tf.convert_to_tensor(correction, dtype=dtype, name="correction")
        super().__init__(
            dtype=dtype,
            is_non_singular=True,
            is_self_adjoint=True,
            is_positive_definite=True,
            is_square=True,
            parameters=parameters,
            name=name,
        )

    @property
    def factor(self):
        """float Tensor [M, k], the low-rank factor F with K ≈ F Fᵀ."""
        return self._factor

    @property
    def scale(self):
        """float scalar Tensor, the kernel scale s² in P = s²·F Fᵀ + diag(shift)."""
        return self._scale

    @property
    def shift(self):
        """float Tensor [M], the diagonal of diag(shift) in P."""
        return self._shift

    @property
    def rank(self):
        """Number k of columns of `factor` (static when known)."""
        return self._factor.shape[1]

    def _shape(self):
        size = self._factor.shape[0]
        return tf.TensorShape([size, size])

    def _shape_tensor(self):
        size = tf.shape(self._factor)[0]
        return tf.stack([size, size])

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        # P⁻¹ is symmetric, so `adjoint` changes nothing.
        x = tf.linalg.adjoint(x) if adjoint_arg else x
        correction = tf.matmul(self._correction, tf.matmul(self._correction, x, transpose_a=True))
        return x / self._shift[:, None] - correction  # [M, R]

    def _diag_part(self):
        return 1.0 / self._shift - tf.reduce_sum(tf.square(self._correction), axis=1)  # [M]


@tf.autograph.experimental.do_not_convert
def pivoted_cholesky_preconditioner(
    kernel_operator, rank, *, scale=1.0, shift, diag_rtol=None, dtype=tf.float64
):
    """Build P⁻¹ for A = scale·K + diag(shift) from a partial pivoted Cholesky factor of K.

    The factor F [M, k] is the partial Cholesky factor with greedy diagonal
    pivoting (Harbrecht, Peters and Schneider, 2012): each step picks the index
    with the largest diagonal of K − F Fᵀ, so trace(K − F Fᵀ) falls fastest.
    It stops after `rank` columns, or earlier once every diagonal entry of
    K − F Fᵀ is at most diag_rtol·max(diag K). A K of rank r is then
    reproduced to rounding error with k = r.

    This does not call `tfp.math.pivoted_cholesky`, because in TFP 0.25 that
    allocates an [M, M] zero buffer and fails on a LinearOperator without a
    `row` method (LinearOperatorFullMatrix, for one). This version needs only
    `diag_part()` and one column of K per step.

    Cost: one `diag_part()`, k matvecs with a unit vector (or k calls of
    `kernel_operator.row(i)` when the operator has it), and O(M·k²) flops.

    Args:
      kernel_operator: The positive semi-definite K [M, M], a
        `tf.linalg.LinearOperator` or an object with `.matmul`, `.shape`,
        `.dtype` and `.diag_part()`. Its `.row(i)` [M] is used when present.
      rank: Maximum number k of pivots, at most M.
      scale: The kernel scale s² > 0 in A = s²K + diag(shift).
      shift: float > 0 or float Tensor [M] > 0, the diagonal σ² of A.
      diag_rtol: Early-stop tolerance on the remaining diagonal, relative to
        max(diag K). Defaults to 100·eps of the kernel's dtype, the rounding
        level of its entries.
      dtype: Float dtype of the factor and of the returned operator.

    Returns:
      A `LowRankPreconditioner` applying P⁻¹ [M, M], whose `factor` is F.

    Raises:
      TypeError: If an argument has the wrong kind or dtype.
      ValueError: If `rank` exceeds M, `shift` has the wrong shape or is not
        positive, diag(K) is negative, or K returns NaN/Inf.

    Example:
      >>> kernel = tf.linalg.LinearOperatorFullMatrix(tf.ones([3, 3], tf.float64))
      >>> inverse = pivoted_cholesky_preconditioner(kernel, 2, shift=0.1)
      >>> inverse.factor.shape
      TensorShape([3, 1])
    """
    with tf.name_scope("pivoted_cholesky_preconditioner"):
        scale, shift, size, dtype = _check_common(kernel_operator, rank, scale, shift, dtype)
        if not callable(getattr(kernel_operator, "diag_part", None)):
            raise TypeError(
                "`kernel_operator` must have a diag_part() method; received an object of type "
                f"{type(kernel_operator).__name__}."
            )
        kernel_eps = np.finfo(_operators.operator_dtype(kernel_operator, dtype).as_numpy_dtype).eps
        diag_rtol = 100.0 * kernel_eps if diag_rtol is None else diag_rtol
        diag_rtol = _checks.check_positive_float("diag_rtol", diag_rtol)

        diag = tf.cast(kernel_operator.diag_part(), dtype)  # [M]
        message = "`kernel_operator` returned NaN or Inf in diag_part()."
        diag = _operators.raise_if(~tf.reduce_all(tf.math.is_finite(diag)), diag, message)
        message = "`kernel_operator` must be positive semi-definite, but diag_part() has negative entries."
        negative = tf.reduce_min(diag) < -diag_rtol * tf.reduce_max(tf.abs(diag))
        diag = _operators.raise_if(negative, diag, message)
        diag = tf.maximum(diag, 0)
        threshold = diag_rtol * tf.reduce_max(diag)

        factor, failed = _operators.run_compiled(
            _pivoted_cholesky_loop, _pivoted_cholesky_core, kernel_operator, diag,
            tf.constant(rank, tf.int32), threshold,
        )
        message = "`kernel_operator` returned NaN or Inf during pivoted Cholesky."
        factor = _operators.raise_if(failed, factor, message)
        _logger.debug("pivoted_cholesky_preconditioner: rank %s of %d requested", factor.shape[1], rank)
        return LowRankPreconditioner(factor, scale, shift)


@tf.autograph.experimental.do_not_convert
def nystrom_preconditioner(
    kernel_operator, rank, *, scale=1.0, shift, seed=None, oversampling=10, dtype=tf.float64
):
    """Build P⁻¹ for A = scale·K + diag(shift) from a randomized Nyström approximation of K.

    With an orthonormal Gaussian test matrix Ω [M, l], l = rank + oversampling
    (at most M), and the sketch Y = K Ω, the stabilized Nyström approximation
    (Tropp, Yurtsever, Udell and Cevher, 2017) is

        K ≈ Y_ν (Ωᵀ Y_ν)⁻¹ Y_νᵀ − ν I,   Y_ν = Y + ν Ω,

    with the small shift ν = √M·eps·‖Y‖_F (eps of the kernel's dtype) that
    keeps Ωᵀ Y_ν numerically positive definite. Its top `rank` eigenpairs
    U Λ Uᵀ give F = U Λ^½. It is exact when K has rank ≤ l.

    Cost: one batched matmul of K with l columns (one VJP and one JVP pass for
    the NTK), plus O(M·l²) flops for a QR, a Cholesky solve and a thin SVD.

    Args:
      kernel_operator: The positive semi-definite K [M, M], a
        `tf.linalg.LinearOperator` or an object with `.matmul`, `.shape` and
        `.dtype`.
      rank: Number k of eigenpairs kept, at most M.
      scale: The kernel scale s² > 0 in A = s²K + diag(shift).
      shift: float > 0 or float Tensor [M] > 0, the diagonal σ² of A.
      seed: Optional int. Ω is drawn with `tf.random.stateless_normal` from a
        seed derived from it, so equal seeds give equal factors.
      oversampling: Extra sketch columns ≥ 0 that sharpen the top `rank`
        eigenpairs at the cost of a wider matmul.
      dtype: Float dtype of the factor and of the returned operator.

    Returns:
      A `LowRankPreconditioner` applying P⁻¹ [M, M], whose `factor` is F.

    Raises:
      TypeError: If an argument has the wrong kind or dtype.
      ValueError: If `rank` exceeds M, `shift` has the wrong shape or is not
        positive, or K is not positive semi-definite or returns NaN/Inf.

    Example:
      >>> kernel = tf.linalg.LinearOperatorFullMatrix(tf.ones([3, 3], tf.float64))
      >>> inverse = nystrom_preconditioner(kernel, 1, shift=0.1, seed=0, oversampling=1)
      >>> inverse.factor.shape
      TensorShape([3, 1])
    """
    with tf.name_scope("nystrom_preconditioner"):
        scale, shift, size, dtype = _check_common(kernel_operator, rank, scale, shift, dtype)
        _check_oversampling(oversampling)
        sketch_size = min(rank + int(oversampling), size)

        # Orthonormal test matrix Ω, then the sketch Y = K Ω in one batched matmul.
        seed = _operators.stateless_seed(seed, _NYSTROM_SALT)
        gaussian = tf.random.stateless_normal([size, sketch_size], seed, dtype=dtype)  # [M, l]
        test_matrix, _ = tf.linalg.qr(gaussian)  # [M, l]
        sketch = _operators.apply_operator(kernel_operator, test_matrix)  # [M, l]
        message = "`kernel_operator` returned NaN or Inf in K Ω."
        sketch = _operators.raise_if(~tf.reduce_all(tf.math.is_finite(sketch)), sketch, message)

        kernel_eps = np.finfo(_operators.operator_dtype(kernel_operator, dtype).as_numpy_dtype).eps
        factor = _nystrom_factor(test_matrix, sketch, rank, np.sqrt(size) * kernel_eps)
        _logger.debug("nystrom_preconditioner: rank %d from %d sketch columns", rank, sketch_size)
        return LowRankPreconditioner(factor, scale, shift)


def _nystrom_factor(test_matrix, sketch, rank, relative_shift):
    """Return F [M, rank] with F Fᵀ the stabilized Nyström approximation from Ω and Y = K Ω."""
    nu = relative_shift * tf.norm(sketch)
    shifted = sketch + nu * test_matrix  # Y_ν, [M, l]
    core = tf.matmul(test_matrix, shifted, transpose_a=True)  # Ωᵀ Y_ν, [l, l]
    core = 0.5 * (core + tf.transpose(core))

    # B = Y_ν C⁻ᵀ with C Cᵀ = Ωᵀ Y_ν, so B Bᵀ = Y_ν (Ωᵀ Y_ν)⁻¹ Y_νᵀ.
    message = (
        "`kernel_operator` must be positive semi-definite, but Ωᵀ K Ω has an eigenvalue <= 0 "
        "even after the stabilizing shift."
    )
    core = _operators.raise_if(tf.reduce_min(tf.linalg.eigvalsh(core)) <= 0, core, message)
    lower = tf.linalg.cholesky(core)
    root = tf.transpose(tf.linalg.triangular_solve(lower, tf.transpose(shifted), lower=True))  # [M, l]
    singular_values, left_vectors, _ = tf.linalg.svd(root)
    eigenvalues = tf.maximum(tf.square(singular_values[:rank]) - nu, 0)  # [rank]
    return left_vectors[:, :rank] * tf.sqrt(eigenvalues)  # [M, rank]


def _pivoted_cholesky_loop(operator, diag, rank, threshold):
    """Run greedy pivoted Cholesky on K given diag(K) [M], and return F [M, k] and a NaN/Inf flag."""
    size = tf.size(diag)
    rows = tf.zeros([rank, size], diag.dtype)  # row j is column j of F

    def cond(step, rows, remaining, failed):
        return (step < rank) & (tf.reduce_max(remaining) > threshold) & ~failed

    def body(step, rows, remaining, failed):
        pivot = tf.argmax(remaining, output_type=tf.int32)
        column = _kernel_column(operator, pivot, size, diag.dtype)  # K[:, pivot], [M]

        # Subtract what earlier columns explain, then divide by √(remaining diagonal at the pivot).
        column -= tf.linalg.matvec(rows, rows[:, pivot], transpose_a=True)
        column = tf.where(remaining > 0, column / tf.sqrt(remaining[pivot]), 0)
        rows = tf.tensor_scatter_nd_update(rows, [[step]], column[None])
        remaining = tf.maximum(remaining - tf.square(column), 0)
        remaining = tf.tensor_scatter_nd_update(remaining, [[pivot]], tf.zeros([1], diag.dtype))
        return step + 1, rows, remaining, ~tf.reduce_all(tf.math.is_finite(column))

    step, rows, _, failed = tf.while_loop(cond, body, (tf.constant(0), rows, diag, tf.constant(False)))
    return tf.transpose(rows[:step]), failed


# Compiled loop shared by all kernel operators that tf.function takes as arguments.
_pivoted_cholesky_core = _operators.compile_loop(_pivoted_cholesky_loop)


def _kernel_column(operator, index, size, dtype):
    """Return column `index` of the symmetric K as a `dtype` vector [M]."""
    # NOTE: one matvec per pivot. A block variant taking several pivots per batched matmul would
    # need fewer passes over the data for an NTK, but it changes the pivot order.
    row = getattr(operator, "row", None)
    if callable(row):
        return tf.cast(row(index), dtype)
    unit = tf.one_hot(index, size, dtype=dtype)[:, None]  # [M, 1]
    return _operators.apply_operator(operator, unit)[:, 0]


def _check_common(kernel_operator, rank, scale, shift, dtype):
    """Validate the arguments both constructors share, and return scale, shift [M], M and dtype."""
    dtype = _operators.check_float_dtype(dtype)
    size = _operators.system_size(kernel_operator, name="kernel_operator")
    if size is None:
        raise TypeError(
            "`kernel_operator` must have a static `.shape` [M, M], e.g. a tf.linalg.LinearOperator; "
            f"received {type(kernel_operator).__name__}."
        )
    rank = _checks.check_positive_int("rank", rank)
    if rank > size:
        raise ValueError(f"`rank` must be at most M={size} (the operator size); received {rank}.")
    scale = _checks.check_positive_float("scale", scale)
    return tf.constant(scale, dtype), _convert_shift(shift, size, dtype), size, dtype


def _convert_shift(shift, size, dtype):
    shift = tf.convert_to_tensor(shift)
    if not (shift.dtype.is_floating or shift.dtype.is_integer):
        raise TypeError(
            f"`shift` must be a float or a float tensor [M]; received dtype {shift.dtype.name}."
        )
    shift = tf.cast(shift, dtype)
    if shift.shape.rank == 0:
        shift = tf.fill([size], shift)
    if shift.shape.rank != 1 or shift.shape[0] != size:
        raise ValueError(
            f"`shift` must be a scalar or have shape [M] with M={size}; received shape {shift.shape}."
        )
    message = "`shift` must be positive and finite, because P = scale·F Fᵀ + diag(shift) is inverted."
    return _operators.raise_if(~tf.reduce_all((shift > 0) & tf.math.is_finite(shift)), shift, message)


def _check_oversampling(oversampling):
    if isinstance(oversampling, bool) or not isinstance(oversampling, (int, np.integer)):
        raise TypeError(
            f"`oversampling` must be an integer >= 0; received {oversampling!r} "
            f"of type {type(oversampling).__name__}."
        )
    if oversampling < 0:
        raise ValueError(f"`oversampling` must be an integer >= 0; received {oversampling}.")


def _woodbury_correction(factor, scale, shift):
    """Return G = D⁻¹ F C⁻ᵀ [M, k] with C Cᵀ = I/scale + Fᵀ D⁻¹ F, so P⁻¹ = D⁻¹ − G Gᵀ."""
    scaled = factor / shift[:, None]  # D⁻¹ F, [M, k]
    capacitance = tf.matmul(factor, scaled, transpose_a=True)  # Fᵀ D⁻¹ F, [k, k]
    capacitance += tf.eye(tf.shape(factor)[1], dtype=factor.dtype) / scale
    lower = tf.linalg.cholesky(capacitance)
    return tf.transpose(tf.linalg.triangular_solve(lower, tf.transpose(scaled), lower=True))  # [M, k]
