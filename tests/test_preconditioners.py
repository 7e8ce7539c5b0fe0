"""Tests for tf_linntk.preconditioners: low-rank factors and Woodbury inverses against dense references."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk import preconditioners
from tf_linntk import solvers

NOISE = 1e-2
TRUE_RANK = 30
SIZE = 200


def _low_rank_kernel(size=SIZE, rank=TRUE_RANK, seed=0):
    """Return K = J Jᵀ with J [size, rank] of singular values 10² … 10⁻¹ (an NTK-like spectrum)."""
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.standard_normal((size, rank)))
    right, _ = np.linalg.qr(rng.standard_normal((rank, rank)))
    jacobian = (left * np.logspace(2, -1, rank)) @ right
    return jacobian @ jacobian.T


def _operator(matrix):
    return tf.linalg.LinearOperatorFullMatrix(tf.constant(matrix), is_self_adjoint=True)


def _build(kind, kernel, rank, **kwargs):
    kwargs.setdefault("shift", NOISE)
    if kind == "pivoted_cholesky":
        return preconditioners.pivoted_cholesky_preconditioner(_operator(kernel), rank, **kwargs)
    return preconditioners.nystrom_preconditioner(_operator(kernel), rank, seed=1, **kwargs)


def _dense_approximation(inverse):
    """Return the dense P = scale·F Fᵀ + diag(shift) that `inverse` should invert."""
    factor = inverse.factor.numpy()
    return inverse.scale.numpy() * factor @ factor.T + np.diag(inverse.shift.numpy())


KINDS = ["pivoted_cholesky", "nystrom"]


class _RowOnlyKernel:
    """A duck-typed kernel whose matmul returns zeros, so a correct factor proves `row` was used."""

    def __init__(self, matrix):
        self._matrix = tf.constant(matrix)
        self.shape = tf.TensorShape(matrix.shape)
        self.dtype = self._matrix.dtype

    def matmul(self, vectors):
        return tf.zeros_like(vectors)

    def diag_part(self):
        return tf.linalg.diag_part(self._matrix)

    def row(self, index):
        return self._matrix[index]


@pytest.mark.parametrize("shift", [NOISE, "vector"], ids=["scalar_shift", "vector_shift"])
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["unit_scale", "scale_3"])
@pytest.mark.parametrize("kind", KINDS)
def test_preconditioner_inverts_its_approximation(kind, scale, shift):
    """P⁻¹ (P v) = v to the accuracy of a dense solve, with P = scale·F Fᵀ + diag(shift) from the factor."""
    if shift == "vector":
        shift = np.linspace(0.5, 2.0, SIZE) * NOISE
    inverse = _build(kind, _low_rank_kernel(), 20, scale=scale, shift=shift)
    approximation = _dense_approximation(inverse)
    vectors = np.random.default_rng(2).standard_normal((SIZE, 3))

    recovered = inverse.matmul(approximation @ vectors).numpy()

    # Any solve with P (condition 1e6 to 6e6 here) loses about cond(P)·eps, and np.linalg.solve does too.
    atol = 10 * np.linalg.cond(approximation) * np.finfo(np.float64).eps
    np.testing.assert_allclose(recovered, vectors, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_preconditioner_dense_and_diagonal_match_inverse(kind):
    """to_dense() and diag_part() of P⁻¹ equal the dense inverse of P to 1e-10."""
    inverse = _build(kind, _low_rank_kernel(size=60, rank=8), 5)

    expected = np.linalg.inv(_dense_approximation(inverse))

    atol = 1e-10 * np.abs(expected).max()
    np.testing.assert_allclose(inverse.to_dense().numpy(), expected, rtol=1e-10, atol=atol)
    np.testing.assert_allclose(inverse.diag_part().numpy(), np.diag(expected), rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_preconditioner_factor_reproduces_low_rank_kernel(kind):
    """A factor of rank = rank(K) reproduces K to 1e-8·‖K‖."""
    kernel = _low_rank_kernel()

    factor = _build(kind, kernel, TRUE_RANK).factor.numpy()

    assert factor.shape == (SIZE, TRUE_RANK)
    np.testing.assert_allclose(factor @ factor.T, kernel, atol=1e-8 * np.linalg.norm(kernel, 2))


def test_pivoted_cholesky_stops_at_numerical_rank():
    """Asking for more pivots than rank(K) stops at rank(K) with a finite factor."""
    kernel = _low_rank_kernel()

    factor = _build("pivoted_cholesky", kernel, TRUE_RANK + 10).factor.numpy()

    assert factor.shape == (SIZE, TRUE_RANK)
    assert np.all(np.isfinite(factor))


def test_pivoted_cholesky_matches_tfp():
    """The factor equals tfp.math.pivoted_cholesky (same pivoting rule) on the dense matrix to 1e-10."""
    kernel = _low_rank_kernel(size=80, rank=15)

    factor = _build("pivoted_cholesky", kernel, 10).factor.numpy()

    expected = tfp.math.pivoted_cholesky(tf.constant(kernel), max_rank=10, diag_rtol=1e-14).numpy()
    np.testing.assert_allclose(factor, expected, atol=1e-10 * np.abs(expected).max())


def test_pivoted_cholesky_uses_row_when_available():
    """An operator with `row` gives its columns through `row`, not through matmul with unit vectors."""
    kernel = _low_rank_kernel(size=50, rank=6)

    inverse = preconditioners.pivoted_cholesky_preconditioner(_RowOnlyKernel(kernel), 6, shift=NOISE)

    factor = inverse.factor.numpy()
    np.testing.assert_allclose(factor @ factor.T, kernel, atol=1e-8 * np.linalg.norm(kernel, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_preconditioner_float32_kernel_gives_float64(kind):
    """A float32 kernel gives a float64 preconditioner whose factor matches K to float32 rounding."""
    kernel = _low_rank_kernel(size=60, rank=5)

    inverse = _build(kind, kernel.astype(np.float32), 5)

    factor = inverse.factor.numpy()
    assert inverse.dtype == tf.float64
    # Entries of K carry float32 rounding, about eps32·‖K‖, which the factor inherits.
    atol = 100 * np.finfo(np.float32).eps * np.linalg.norm(kernel, 2)
    np.testing.assert_allclose(factor @ factor.T, kernel, atol=atol)


def test_nystrom_seeded_runs_identical():
    """Equal seeds give identical Nyström factors."""
    kernel = _low_rank_kernel(size=60, rank=8)

    first = preconditioners.nystrom_preconditioner(_operator(kernel), 4, shift=NOISE, seed=5)
    second = preconditioners.nystrom_preconditioner(_operator(kernel), 4, shift=NOISE, seed=5)

    np.testing.assert_array_equal(first.factor.numpy(), second.factor.numpy())


def test_preconditioner_new_instances_reuse_cg_trace():
    """Preconditioners of different ranks and sizes do not retrace the CG loop after the first two traces."""
    kernels = [_low_rank_kernel(size=size, rank=8, seed=size) for size in (40, 50, 60, 70, 80)]
    traces = []

    for rank, kernel in zip((3, 4, 5, 6, 7), kernels):
        inverse = _build("pivoted_cholesky", kernel, rank)
        matrix = _operator(kernel + NOISE * np.eye(len(kernel)))
        solvers.conjugate_gradient(matrix, np.ones(len(kernel)), preconditioner=inverse, max_iterations=500)
        traces.append(solvers._cg_core.experimental_get_tracing_count())

    assert traces[-1] - traces[0] <= 1


def test_preconditioner_passes_through_tf_function():
    """The preconditioner is a CompositeTensor, so a tf.function applies it like eager code."""
    inverse = _build("nystrom", _low_rank_kernel(size=40, rank=6), 6)
    vectors = tf.constant(np.random.default_rng(3).standard_normal((40, 2)))

    @tf.function
    def apply(operator, vectors):
        return operator.matmul(vectors)

    np.testing.assert_allclose(apply(inverse, vectors).numpy(), inverse.matmul(vectors).numpy(), rtol=1e-12)


def test_preconditioner_kernel_nan_raises():
    """NaN from the kernel raises an error naming `kernel_operator`, for both constructors."""
    kernel = _low_rank_kernel(size=30, rank=4)
    kernel[:, 5] = np.nan

    for kind in KINDS:
        with pytest.raises(ValueError, match=r"`kernel_operator` returned NaN or Inf"):
            _build(kind, kernel, 4)


@pytest.mark.parametrize(
    "kind, overrides, error, pattern",
    [
        ("pivoted_cholesky", {"rank": 31}, ValueError, r"`rank` must be at most M=30"),
        ("nystrom", {"rank": 0}, ValueError, r"`rank` must be a positive integer"),
        ("pivoted_cholesky", {"shift": -1.0}, ValueError, r"`shift` must be positive and finite"),
        ("nystrom", {"shift": np.ones(29)}, ValueError, r"`shift` must be a scalar or have shape \[M\]"),
        ("pivoted_cholesky", {"scale": 0.0}, ValueError, r"`scale` must be a finite float > 0"),
        ("nystrom", {"oversampling": -1}, ValueError, r"`oversampling` must be an integer >= 0"),
        ("nystrom", {"oversampling": 2.5}, TypeError, r"`oversampling` must be an integer >= 0"),
        ("nystrom", {"seed": "abc"}, TypeError, r"`seed` must be an int or None"),
        ("pivoted_cholesky", {"dtype": tf.int64}, TypeError, r"`dtype` must be a float dtype"),
        ("pivoted_cholesky", {"diag_rtol": 0.0}, ValueError, r"`diag_rtol` must be a finite float > 0"),
        ("pivoted_cholesky", {"kernel": "negative_diagonal"}, ValueError, r"must be positive semi-definite"),
        ("pivoted_cholesky", {"kernel": "no_diag_part"}, TypeError, r"must have a diag_part\(\) method"),
        ("nystrom", {"kernel": "callable"}, TypeError, r"`kernel_operator` must have a static `.shape`"),
    ],
    ids=[
        "rank_too_large", "rank_zero", "shift_negative", "shift_shape", "scale_zero", "oversampling_negative",
        "oversampling_float",
        "seed_string", "dtype_int", "diag_rtol_zero", "negative_diagonal", "no_diag_part", "callable_kernel",
    ],
)
def test_preconditioner_rejects_invalid_input(kind, overrides, error, pattern):
    """Invalid constructor arguments raise with a message naming the argument."""
    kernel = _low_rank_kernel(size=30, rank=4)
    kernels = {
        "dense": _operator(kernel),
        "negative_diagonal": _operator(kernel - np.diag(np.full(30, 10.0))),
        "no_diag_part": _RowOnlyKernel(kernel),
        "callable": lambda vectors: tf.matmul(tf.constant(kernel), vectors),
    }
    arguments = {"kernel": "dense", "rank": 4, "shift": NOISE, **overrides}
    kernel_operator = kernels[arguments.pop("kernel")]
    rank = arguments.pop("rank")
    if kind == "pivoted_cholesky" and isinstance(kernel_operator, _RowOnlyKernel):
        kernel_operator.diag_part = None

    constructor = getattr(preconditioners, f"{kind}_preconditioner")
    with pytest.raises(error, match=pattern):
        constructor(kernel_operator, rank, **arguments)
