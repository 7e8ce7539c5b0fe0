"""Tests for tf_linntk.solvers: conjugate gradients and Lanczos against dense references."""

import pickle
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tf_linntk import preconditioners
from tf_linntk import solvers

# Dense float64 references on matrices of condition ≤ 1e6 agree with CG run to
# tol=1e-12 to about 1e-10, so 1e-8 leaves a margin of 100.
SOLVE_RTOL = 1e-8
TIGHT_TOL = 1e-12
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _spd_matrix(size, shift, seed):
    """Return A Aᵀ/‖A Aᵀ‖₂ + shift·I [size, size], with condition number about 1/shift."""
    a = np.random.default_rng(seed).standard_normal((size, size))
    gram = a @ a.T
    return gram / np.linalg.norm(gram, 2) + shift * np.eye(size)


def _low_rank_kernel(size=200, rank=30, seed=0):
    """Return K = J Jᵀ with J [size, rank] of singular values 10² … 10⁻¹ (an NTK-like spectrum)."""
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.standard_normal((size, rank)))
    right, _ = np.linalg.qr(rng.standard_normal((rank, rank)))
    jacobian = (left * np.logspace(2, -1, rank)) @ right
    return jacobian @ jacobian.T


NOISE = 1e-2


def _low_rank_plus_noise(size=200, rank=30, seed=0):
    """Return J Jᵀ + 10⁻²·I, condition number 10⁶."""
    return _low_rank_kernel(size, rank, seed) + NOISE * np.eye(size)


def _numpy_cg(matrix, rhs, steps, inverse_preconditioner=None):
    """Run `steps` iterations of textbook preconditioned CG on one column, from x = 0."""
    inverse = np.eye(len(rhs)) if inverse_preconditioner is None else inverse_preconditioner
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = inverse @ r
    p = z.copy()
    for _ in range(steps):
        ap = matrix @ p
        alpha = (r @ z) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        z_new = inverse @ r_new
        p = z_new + (r_new @ z_new) / (r @ z) * p
        r, z = r_new, z_new
    return x


def _operator(matrix):
    return tf.linalg.LinearOperatorFullMatrix(tf.constant(matrix), is_self_adjoint=True)


def _rhs(size, columns, seed=1):
    return np.random.default_rng(seed).standard_normal((size, columns))


def _preconditioner(kind, kernel, rank):
    kernel_operator = _operator(kernel)
    if kind == "pivoted_cholesky":
        return preconditioners.pivoted_cholesky_preconditioner(kernel_operator, rank, shift=NOISE)
    return preconditioners.nystrom_preconditioner(kernel_operator, rank, shift=NOISE, seed=3)


def _float32_ill_conditioned():
    """Return an RBF kernel matrix of 200 points on [0, 1] plus 1e-8·I, in float32 (condition ≫ 1/eps32)."""
    points = np.linspace(0.0, 1.0, 200)
    kernel = np.exp(-0.5 * (points[:, None] - points[None, :]) ** 2 / 0.2**2)
    return (kernel + 1e-8 * np.eye(200)).astype(np.float32)


class _OpaqueOperator(tf.linalg.LinearOperator):
    """A LinearOperator subclass without a TypeSpec, like a hand-written NTK operator."""

    def __init__(self, matrix):
        self._matrix = tf.constant(matrix)
        self.python_calls = 0  # Python executions of _matmul: one per trace, or per eager call
        super().__init__(dtype=self._matrix.dtype, is_self_adjoint=True, is_square=True)

    def _shape(self):
        return self._matrix.shape

    def _shape_tensor(self):
        return tf.shape(self._matrix)

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        self.python_calls += 1
        return tf.matmul(self._matrix, x)


# --- conjugate_gradient: accuracy -------------------------------------------------------------


@pytest.mark.parametrize("kind", [None, "pivoted_cholesky", "nystrom"], ids=["plain", "pivoted", "nystrom"])
@pytest.mark.parametrize("matrix_name", ["spd", "low_rank_plus_noise"])
def test_conjugate_gradient_matches_dense_solve(matrix_name, kind):
    """CG with several right-hand sides equals the Cholesky solve to 1e-8, with any preconditioner."""
    if matrix_name == "spd":
        kernel = _spd_matrix(120, 0.0, seed=2)
        matrix = kernel + NOISE * np.eye(120)
    else:
        kernel = _low_rank_kernel()
        matrix = kernel + NOISE * np.eye(200)
    rhs = _rhs(matrix.shape[0], 4)
    preconditioner = None if kind is None else _preconditioner(kind, kernel, rank=20)

    solution, record = solvers.conjugate_gradient(
        _operator(matrix), rhs, tol=TIGHT_TOL, max_iterations=2000, preconditioner=preconditioner
    )

    expected = tf.linalg.cholesky_solve(tf.linalg.cholesky(matrix), rhs).numpy()
    assert record.converged_all
    atol = SOLVE_RTOL * np.abs(expected).max()
    np.testing.assert_allclose(solution.numpy(), expected, rtol=SOLVE_RTOL, atol=atol)


@pytest.mark.parametrize("kind", ["pivoted_cholesky", "nystrom"])
def test_conjugate_gradient_preconditioned_few_iterations(kind):
    """A preconditioner of rank ≥ rank(K) cuts CG on J Jᵀ + σ²I from over 30 iterations to at most 5."""
    kernel = _low_rank_kernel()
    operator = _operator(kernel + NOISE * np.eye(200))
    rhs = _rhs(200, 4)

    _, plain = solvers.conjugate_gradient(operator, rhs, tol=TIGHT_TOL, max_iterations=2000)
    _, preconditioned = solvers.conjugate_gradient(
        operator, rhs, tol=TIGHT_TOL, preconditioner=_preconditioner(kind, kernel, rank=30)
    )

    # 31 distinct eigenvalues need 31 iterations even in exact arithmetic.
    assert plain.iterations.min() > 30
    assert preconditioned.iterations.max() <= 5


def test_conjugate_gradient_float32_operator_gives_float64():
    """A float32 operator with float64 CG returns float64 accurate to the float32 rounding of the matvecs."""
    matrix = _spd_matrix(80, 0.1, seed=4)
    rhs = _rhs(80, 3)

    solution, record = solvers.conjugate_gradient(_operator(matrix.astype(np.float32)), rhs, tol=1e-10)

    expected = np.linalg.solve(matrix.astype(np.float32).astype(np.float64), rhs)
    # Each float32 matvec errs by about eps32·‖A‖‖x‖, amplified by the condition number (≈ 11).
    rtol = 10 * np.linalg.cond(matrix) * FLOAT32_EPS
    assert solution.dtype == tf.float64
    assert record.converged_all
    np.testing.assert_allclose(solution.numpy(), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "preconditioned"])
def test_conjugate_gradient_three_steps_match_numpy(preconditioned):
    """Three CG steps equal three steps of a textbook NumPy CG to 1e-10."""
    kernel = _spd_matrix(50, 0.0, seed=5)
    matrix = kernel + NOISE * np.eye(50)
    rhs = _rhs(50, 2)
    preconditioner = _preconditioner("pivoted_cholesky", kernel, rank=5) if preconditioned else None
    dense_inverse = None if preconditioner is None else preconditioner.to_dense().numpy()

    solution, record = solvers.conjugate_gradient(
        _operator(matrix), rhs, tol=TIGHT_TOL, max_iterations=3,
        preconditioner=preconditioner, on_nonconvergence="ignore",
    )

    expected = np.stack([_numpy_cg(matrix, rhs[:, j], 3, dense_inverse) for j in range(2)], axis=1)
    np.testing.assert_array_equal(record.iterations, [3, 3])
    np.testing.assert_allclose(solution.numpy(), expected, rtol=1e-10)


def test_conjugate_gradient_finished_column_stops_changing():
    """A column that converges early returns the same result in a batch as when solved alone."""
    matrix = _spd_matrix(60, 0.05, seed=6)
    eigenvectors = np.linalg.eigh(matrix)[1]
    # Three eigenvectors plus a 1e-6 perturbation: the residual falls below tol=1e-4 after 3 steps,
    # and any further step would change the solution by about 1e-6.
    easy = eigenvectors[:, [0, 30, 59]].sum(axis=1) + 1e-6 * _rhs(60, 1, seed=2)[:, 0]
    rhs = np.stack([easy, _rhs(60, 1)[:, 0]], axis=1)

    batch, batch_record = solvers.conjugate_gradient(_operator(matrix), rhs, tol=1e-4)
    alone, alone_record = solvers.conjugate_gradient(_operator(matrix), easy, tol=1e-4)

    assert batch_record.iterations[0] == alone_record.iterations[0] == 3
    assert batch_record.iterations[1] > 3
    np.testing.assert_allclose(batch.numpy()[:, 0], alone.numpy(), rtol=1e-13)


# --- conjugate_gradient: shapes and edge cases ------------------------------------------------


@pytest.mark.parametrize(
    "rhs_shape", [(40,), (40, 1), (40, 3)], ids=["vector", "one_column", "three_columns"]
)
def test_conjugate_gradient_keeps_rhs_rank(rhs_shape):
    """The solution has the shape of `rhs`, for [M] and [M, R]."""
    matrix = _spd_matrix(40, 0.1, seed=7)
    rhs = np.random.default_rng(0).standard_normal(rhs_shape)

    solution, record = solvers.conjugate_gradient(_operator(matrix), rhs, tol=TIGHT_TOL)

    assert solution.shape == rhs_shape
    assert record.iterations.shape == (1 if len(rhs_shape) == 1 else rhs_shape[1],)
    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix, rhs), rtol=SOLVE_RTOL)


def test_conjugate_gradient_zero_column_gives_zero():
    """A zero column among nonzero ones returns exactly zero with residual 0 and no NaN elsewhere."""
    matrix = _spd_matrix(40, 0.1, seed=8)
    rhs = _rhs(40, 3)
    rhs[:, 1] = 0.0

    solution, record = solvers.conjugate_gradient(_operator(matrix), rhs, tol=TIGHT_TOL, x0=np.ones((40, 3)))

    np.testing.assert_array_equal(solution.numpy()[:, 1], 0.0)
    assert record.relative_residual[1] == 0.0
    assert record.iterations[1] == 0
    np.testing.assert_array_equal(record.converged, [True, True, True])
    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix, rhs), rtol=SOLVE_RTOL, atol=1e-12)


def test_conjugate_gradient_all_zero_rhs():
    """An all-zero right-hand side returns zeros after 0 iterations."""
    solution, record = solvers.conjugate_gradient(_operator(_spd_matrix(30, 0.1, seed=9)), np.zeros((30, 2)))

    np.testing.assert_array_equal(solution.numpy(), 0.0)
    np.testing.assert_array_equal(record.iterations, [0, 0])
    np.testing.assert_array_equal(record.relative_residual, [0.0, 0.0])
    assert record.converged_all


def test_conjugate_gradient_exact_initial_guess():
    """Starting from the exact solution needs no iterations."""
    matrix = _spd_matrix(30, 0.1, seed=10)
    rhs = _rhs(30, 2)

    _, record = solvers.conjugate_gradient(_operator(matrix), rhs, tol=1e-8, x0=np.linalg.solve(matrix, rhs))

    np.testing.assert_array_equal(record.iterations, [0, 0])


def test_conjugate_gradient_callable_operator():
    """A plain callable operator works, with M taken from `rhs`."""
    matrix = tf.constant(_spd_matrix(30, 0.1, seed=11))
    rhs = _rhs(30, 2)

    solution, _ = solvers.conjugate_gradient(lambda v: tf.matmul(matrix, v), rhs, tol=TIGHT_TOL)

    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix.numpy(), rhs), rtol=SOLVE_RTOL)


def test_conjugate_gradient_inside_tf_function():
    """CG called inside a tf.function returns the eager result."""
    operator = _operator(_spd_matrix(30, 0.1, seed=12))
    rhs = tf.constant(_rhs(30, 2))

    @tf.function
    def solve(rhs):
        return solvers.conjugate_gradient(operator, rhs, tol=TIGHT_TOL)[0]

    eager, _ = solvers.conjugate_gradient(operator, rhs, tol=TIGHT_TOL)
    np.testing.assert_allclose(solve(rhs).numpy(), eager.numpy(), rtol=1e-12)


def test_conjugate_gradient_record_pickles():
    """The convergence record contains NumPy values and survives pickling."""
    _, record = solvers.conjugate_gradient(_operator(_spd_matrix(20, 0.1, seed=13)), _rhs(20, 2))

    restored = pickle.loads(pickle.dumps(record))

    assert isinstance(restored.iterations, np.ndarray)
    np.testing.assert_array_equal(restored.iterations, record.iterations)
    assert "converged=2/2 columns" in repr(restored)


# --- conjugate_gradient: tracing --------------------------------------------------------------


def test_conjugate_gradient_no_retracing_across_sizes():
    """Five solves with different M and R trace the compiled loop at most twice."""
    sizes = [(20, 1), (31, 2), (17, 5), (44, 3), (25, 4)]
    before = solvers._cg_core.experimental_get_tracing_count()

    for size, columns in sizes:
        solvers.conjugate_gradient(_operator(_spd_matrix(size, 0.1, seed=size)), _rhs(size, columns))

    # The first new shape traces once, the second traces a shape-relaxed version reused afterwards.
    assert solvers._cg_core.experimental_get_tracing_count() - before <= 2


def test_conjugate_gradient_opaque_operator_traces_once():
    """Repeated solves with one operator that has no TypeSpec trace its matmul only on the first solve."""
    operator = _OpaqueOperator(_spd_matrix(30, 0.1, seed=14))
    solvers.conjugate_gradient(operator, _rhs(30, 2))
    traced_calls = operator.python_calls

    for seed in range(3):
        solution, _ = solvers.conjugate_gradient(operator, _rhs(30, 2, seed=seed), tol=TIGHT_TOL)

    assert operator.python_calls == traced_calls
    expected = np.linalg.solve(operator.to_dense().numpy(), _rhs(30, 2, seed=2))
    np.testing.assert_allclose(solution.numpy(), expected, rtol=SOLVE_RTOL)


def test_conjugate_gradient_fresh_operators_no_retrace_warning(caplog):
    """A fresh operator without a TypeSpec per solve sets off no tf.function retracing warning."""
    matrix = _spd_matrix(30, 0.1, seed=24)

    with caplog.at_level("WARNING", logger="tensorflow"):
        for _ in range(7):
            solvers.conjugate_gradient(_OpaqueOperator(matrix), _rhs(30, 1))

    assert not [record for record in caplog.records if "retracing" in record.getMessage()]


# --- conjugate_gradient: non-convergence ------------------------------------------------------


def _unconverged_solve(**kwargs):
    rhs = _rhs(200, 2)
    rhs[:, 1] = 0.0
    return solvers.conjugate_gradient(
        _operator(_float32_ill_conditioned()), rhs, tol=1e-10, max_iterations=50, **kwargs
    )


def test_conjugate_gradient_nonconvergence_warns():
    """A solve that stops at max_iterations warns with the iterations, residual and tolerance."""
    pattern = r"1 of 2 .*After 50 iterations.*relative residual ‖r‖/‖b‖ is [0-9.e+-]+, above tol=1e-10"
    with pytest.warns(solvers.ConvergenceWarning, match=pattern) as caught:
        _unconverged_solve()

    assert len(caught) == 1
    assert caught[0].filename == __file__


def test_conjugate_gradient_nonconvergence_raises():
    """on_nonconvergence="raise" raises ConvergenceError with the same message."""
    with pytest.raises(solvers.ConvergenceError, match=r"After 50 iterations.*tol=1e-10.*`max_iterations`"):
        _unconverged_solve(on_nonconvergence="raise")


def test_conjugate_gradient_nonconvergence_record():
    """With on_nonconvergence="ignore" nothing is emitted and the record marks the unconverged column."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, record = _unconverged_solve(on_nonconvergence="ignore")

    np.testing.assert_array_equal(record.converged, [False, True])
    np.testing.assert_array_equal(record.iterations, [50, 0])
    assert record.relative_residual[0] > 1e-10
    assert not record.converged_all


def test_conjugate_gradient_nonconvergence_warns_in_graph():
    """Under an outer tf.function the warning is issued when the graph runs."""
    operator = _operator(_float32_ill_conditioned())

    @tf.function
    def solve(rhs):
        return solvers.conjugate_gradient(operator, rhs, tol=1e-10, max_iterations=50)[0]

    with pytest.warns(solvers.ConvergenceWarning, match=r"After 50 iterations"):
        solve(tf.constant(_rhs(200, 1)))


# --- conjugate_gradient: invalid input --------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"on_nonconvergence": "loud"}, ValueError, r"`on_nonconvergence` must be one of 'warn', 'raise'"),
        ({"tol": 0.0}, ValueError, r"`tol` must be a finite float > 0; received 0.0"),
        ({"tol": -1e-6}, ValueError, r"`tol`"),
        ({"max_iterations": 0}, ValueError, r"`max_iterations` must be a positive integer; received 0"),
        ({"max_iterations": 2.5}, TypeError, r"`max_iterations`"),
        ({"rhs": np.ones(9)}, ValueError, r"`rhs` must have M=10 rows .* received rhs.shape=\(9,\)"),
        ({"rhs": np.ones((10, 2, 2))}, ValueError, r"`rhs` must have shape \[M\] or \[M, R\]"),
        ({"rhs": np.ones(10, np.int32)}, TypeError, r"`rhs` must be a float tensor; received dtype int32"),
        ({"rhs": np.full(10, np.nan)}, ValueError, r"`rhs` must be finite"),
        ({"dtype": tf.int32}, TypeError, r"`dtype` must be a float dtype"),
        ({"x0": np.ones(7)}, ValueError, r"`x0` must have the shape of `rhs`"),
        ({"preconditioner": tf.linalg.LinearOperatorIdentity(9)}, ValueError, r"`preconditioner` must be \["),
        ({"preconditioner": "jacobi"}, TypeError, r"`preconditioner` must be a tf.linalg.LinearOperator"),
    ],
    ids=[
        "option", "tol_zero", "tol_negative", "max_iterations_zero", "max_iterations_float", "rhs_length",
        "rhs_rank", "rhs_int", "rhs_nan", "dtype_int", "x0_shape", "preconditioner_shape",
        "preconditioner_kind",
    ],
)
def test_conjugate_gradient_rejects_invalid_input(overrides, error, pattern):
    """Invalid arguments raise with a message naming the argument and the received value."""
    arguments = {"rhs": np.ones(10), **overrides}
    rhs = arguments.pop("rhs")

    with pytest.raises(error, match=pattern):
        solvers.conjugate_gradient(_operator(_spd_matrix(10, 0.1, seed=15)), rhs, **arguments)


def test_conjugate_gradient_operator_nan_raises():
    """NaN from the operator stops the solve with an error naming `operator`."""
    matrix = _spd_matrix(10, 0.1, seed=16)
    matrix[3, 4] = np.nan

    with pytest.raises(ValueError, match=r"`operator` returned NaN or Inf at conjugate gradient iteration 1"):
        solvers.conjugate_gradient(_operator(matrix), np.ones(10))


def test_conjugate_gradient_preconditioner_nan_raises():
    """NaN from the preconditioner stops the solve with an error naming `preconditioner`."""
    def broken(vectors):
        return vectors * np.nan

    with pytest.raises(ValueError, match=r"`preconditioner` returned NaN or Inf"):
        solvers.conjugate_gradient(
            _operator(_spd_matrix(10, 0.1, seed=17)), np.ones(10), preconditioner=broken
        )


# --- Lanczos ----------------------------------------------------------------------------------


def test_lanczos_basis_is_orthonormal():
    """Q from Lanczos with full reorthogonalization satisfies QᵀQ = I to 1e-10."""
    basis, _, _ = solvers.lanczos(_operator(_low_rank_plus_noise()), 25, seed=0)

    np.testing.assert_allclose(basis.numpy().T @ basis.numpy(), np.eye(25), atol=1e-10)


def test_lanczos_projection_equals_tridiagonal():
    """Qᵀ A Q equals the tridiagonal T built from alpha and beta, to 1e-10·‖A‖."""
    matrix = _spd_matrix(60, 1e-3, seed=18)

    basis, alpha, beta = solvers.lanczos(_operator(matrix), 20, seed=1)

    tridiagonal = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    q = basis.numpy()
    np.testing.assert_allclose(q.T @ matrix @ q, tridiagonal, atol=1e-10 * np.linalg.norm(matrix, 2))


def test_lanczos_full_run_reproduces_operator():
    """With k = M, Q T Qᵀ reproduces A to 1e-10·‖A‖."""
    matrix = _spd_matrix(40, 1e-2, seed=19)

    basis, alpha, beta = solvers.lanczos(_operator(matrix), 40, seed=2)

    tridiagonal = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    q = basis.numpy()
    assert q.shape == (40, 40)
    np.testing.assert_allclose(q @ tridiagonal @ q.T, matrix, atol=1e-10 * np.linalg.norm(matrix, 2))


def test_lanczos_stops_at_invariant_subspace():
    """J Jᵀ + σ²I with rank(J) = 30 has 31 distinct eigenvalues, so Lanczos stops after 31 vectors."""
    matrix = _low_rank_plus_noise()

    basis, alpha, beta = solvers.lanczos(_operator(matrix), 60, start=_rhs(200, 1)[:, 0])

    assert basis.shape == (200, 31)
    assert alpha.shape == (31,)
    assert beta.shape == (30,)


def test_lanczos_seeded_runs_identical():
    """Equal seeds give identical results and different seeds different start vectors."""
    operator = _operator(_spd_matrix(30, 0.1, seed=20))

    first = solvers.lanczos(operator, 10, seed=7)
    second = solvers.lanczos(operator, 10, seed=7)
    other = solvers.lanczos(operator, 10, seed=8)

    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(first[0].numpy()[:, 0], other[0].numpy()[:, 0])


def test_lanczos_inside_tf_function():
    """Lanczos inside a tf.function returns the eager result."""
    operator = _operator(_spd_matrix(30, 0.1, seed=21))

    @tf.function
    def tridiagonalize():
        return solvers.lanczos(operator, 10, seed=3)

    for graph, eager in zip(tridiagonalize(), solvers.lanczos(operator, 10, seed=3)):
        np.testing.assert_allclose(graph.numpy(), eager.numpy(), rtol=1e-12, atol=1e-14)


def test_lanczos_eigh_matches_dense_eigenvalues():
    """Ritz pairs from a run that spans an invariant subspace equal the top dense eigenpairs to 1e-8."""
    matrix = _low_rank_plus_noise()

    values, vectors = solvers.lanczos_eigh(_operator(matrix), 40, num_eigenvalues=5, seed=4)

    dense_values, dense_vectors = np.linalg.eigh(matrix)
    np.testing.assert_allclose(values.numpy(), dense_values[::-1][:5], rtol=1e-8)
    overlaps = np.abs(np.sum(vectors.numpy() * dense_vectors[:, ::-1][:, :5], axis=0))
    np.testing.assert_allclose(overlaps, 1.0, rtol=1e-8)


def test_lanczos_inverse_root_full_rank_gives_inverse():
    """With k = M, R Rᵀ equals A⁻¹ to 1e-8."""
    matrix = _spd_matrix(40, 1e-2, seed=22)

    root = solvers.lanczos_inverse_root(_operator(matrix), 40, seed=5).numpy()

    inverse = np.linalg.inv(matrix)
    np.testing.assert_allclose(root @ root.T, inverse, atol=1e-8 * np.abs(inverse).max())


def test_lanczos_inverse_root_solves_on_krylov_space():
    """For J Jᵀ + σ²I and k ≥ rank + 1, R Rᵀ b equals A⁻¹ b for the start vector b, to 1e-8."""
    matrix = _low_rank_plus_noise()
    rhs = _rhs(200, 1)[:, 0]

    root = solvers.lanczos_inverse_root(_operator(matrix), 40, start=rhs).numpy()

    expected = tf.linalg.cholesky_solve(tf.linalg.cholesky(matrix), rhs[:, None]).numpy()[:, 0]
    assert root.shape == (200, 31)
    np.testing.assert_allclose(root @ (root.T @ rhs), expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def test_lanczos_inverse_root_rejects_indefinite_operator():
    """An operator with a negative eigenvalue raises, naming `operator`."""
    matrix = np.diag([3.0, 1.0, -2.0])

    with pytest.raises(ValueError, match=r"`operator` must be positive definite"):
        solvers.lanczos_inverse_root(_operator(matrix), 3, seed=0)


@pytest.mark.parametrize(
    "operator, arguments, error, pattern",
    [
        ("dense", {"num_iterations": 11}, ValueError, r"`num_iterations` must be at most M=10"),
        ("dense", {"num_iterations": 0}, ValueError, r"`num_iterations` must be a positive integer"),
        ("dense", {"start": np.ones(9)}, ValueError, r"`start` must have shape \[M\] with M=10"),
        ("dense", {"start": np.zeros(10)}, ValueError, r"`start` must be a finite nonzero vector"),
        ("dense", {"seed": 1.5}, TypeError, r"`seed` must be an int or None"),
        ("callable", {}, ValueError, r"`start` is required when `operator` is a callable"),
    ],
    ids=[
        "too_many_iterations", "zero_iterations", "start_shape", "start_zero", "seed_float",
        "callable_no_start",
    ],
)
def test_lanczos_rejects_invalid_input(operator, arguments, error, pattern):
    """Invalid Lanczos arguments raise with a message naming the argument."""
    matrix = _spd_matrix(10, 0.1, seed=23)
    operator = _operator(matrix) if operator == "dense" else (lambda v: tf.matmul(tf.constant(matrix), v))
    arguments = {"num_iterations": 5, **arguments}

    with pytest.raises(error, match=pattern):
        solvers.lanczos(operator, **arguments)
