"""Conjugate gradients and Lanczos for symmetric positive definite operators.

The Lanczos functions live in `tf_linntk._lanczos` and are public from here.
"""

import dataclasses
import logging
import sys
import warnings
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import _operators
from tf_linntk import _progress
from tf_linntk._lanczos import lanczos
from tf_linntk._lanczos import lanczos_eigh
from tf_linntk._lanczos import lanczos_inverse_root

__all__ = [
    "ConvergenceError",
    "ConvergenceRecord",
    "ConvergenceWarning",
    "conjugate_gradient",
    "lanczos",
    "lanczos_eigh",
    "lanczos_inverse_root",
]

_logger = logging.getLogger(__name__)

_ON_NONCONVERGENCE = ("warn", "raise", "ignore")
# Packages whose frames a ConvergenceWarning skips to reach the caller's line.
_INTERNAL_MODULES = ("tf_linntk", "tensorflow")
# Cap on the default iteration count: each matvec of an NTK is a pass over the data.
_MAX_ITERATIONS_CAP = 1000
# Failure codes of the CG loop, checked after it stops.
_NO_FAILURE, _OPERATOR_FAILED, _PRECONDITIONER_FAILED = 0, 1, 2


class ConvergenceWarning(UserWarning):
    """Warning issued when an iterative solver stops before reaching its tolerance."""


class ConvergenceError(RuntimeError):
    """Error raised instead of `ConvergenceWarning` when the caller passes `on_nonconvergence="raise"`."""


@dataclasses.dataclass(frozen=True, eq=False)
class ConvergenceRecord:
    """Outcome of an iterative solve, one entry per right-hand-side column.

    Eager calls store NumPy values, so a record pickles and saves. Under an outer
    `tf.function` the array fields hold symbolic tensors.

    Attributes:
      solver: Name of the solver, e.g. "conjugate_gradient".
      iterations: int64 array [R], iterations each column ran before it stopped.
      relative_residual: float64 array [R], ‖r‖/‖b‖ of the recursively updated
        residual r when the column stopped, and 0 for a zero column of b.
      tolerance: The requested `tol`.
      max_iterations: The iteration limit the solve ran under.
      converged: bool array [R], True where ‖r‖ ≤ tolerance·‖b‖.
    """

    solver: str
    iterations: np.ndarray
    relative_residual: np.ndarray
    tolerance: float
    max_iterations: int
    converged: np.ndarray

    @property
    def converged_all(self):
        """True when every column reached the tolerance (eager records only)."""
        return bool(np.all(self.converged))

    def __repr__(self):
        if not isinstance(self.converged, np.ndarray):
            return f"ConvergenceRecord(solver={self.solver!r}, symbolic tensors)"
        columns = self.converged.size
        worst = float(np.max(self.relative_residual, initial=0.0))
        max_run = int(np.max(self.iterations, initial=0))
        return (
            f"ConvergenceRecord(solver={self.solver!r}, "
            f"converged={int(np.sum(self.converged))}/{columns} columns, "
            f"max iterations run={max_run}, worst relative_residual={worst:.3g}, "
            f"tolerance={self.tolerance:g}, max_iterations={self.max_iterations})"
        )


@tf.autograph.experimental.do_not_convert
def conjugate_gradient(
    operator,
    rhs,
    *,
    tol=1e-6,
    max_iterations=None,
    preconditioner=None,
    dtype=tf.float64,
    on_nonconvergence="warn",
    x0=None,
    verbose=0,
):
    """Solve A X = B for a symmetric positive definite A with preconditioned conjugate gradients.

    All columns of B run in one batched loop, one matmul of A with [M, R] per
    iteration. Each column stops on its own: once column j meets the stopping
    rule its step sizes are zero, so its solution no longer changes.

    Stopping rule: column j stops when ‖r_j‖₂ ≤ tol·‖b_j‖₂, where r_j is the
    recursively updated residual b_j − A x_j (no extra matvec to recompute it).
    A zero column of B returns exactly zero with relative residual 0. A column
    whose search direction p meets pᵀAp ≤ 0 (A is not positive definite at its
    working precision) also stops there and is reported as not converged.

    Vectors and reductions use `dtype` (float64 by default) even when the
    operator computes in float32: each matmul casts its input to the
    operator's dtype and the product back to `dtype`.

    Cost: one matmul with A and one with the preconditioner per iteration, plus
    O(M·R) memory for five [M, R] work arrays. The loop is compiled with
    `tf.function(reduce_retracing=True)`, so after the first two sizes new M
    and R reuse a trace.

    Progress and logging: at `verbose=1` the loop runs in compiled chunks of
    iterations, and after each chunk a `keras.utils.Progbar` over
    `max_iterations` shows the iterations run and the worst relative residual
    of the columns not yet converged. The chunks carry the whole CG state, so
    the solution and record are bit-identical to a `verbose=0` solve. Chunks
    run 1, 2, 4, ... iterations, at most 32. The logger `tf_linntk.solvers`
    records the start and the stop (the record) at INFO, each chunk at DEBUG,
    and non-convergence at WARNING, or at INFO with `on_nonconvergence="ignore"`.

    Note:
      The solve has no custom gradient yet: a tape differentiates through
      every iteration. NOTE: an implicit gradient (a second solve with the
      incoming cotangents) is not implemented.

      Under an outer `tf.function`, `verbose=1` shows no progress bar and runs
      the single compiled loop, so the graph contains no Python callback for
      progress. The start is then logged once per trace.

    Args:
      operator: The matrix A [M, M]. Either a `tf.linalg.LinearOperator` (or an
        object with `.matmul`, `.shape` and `.dtype`), or a callable mapping a
        `dtype` tensor [M, R] to A times it [M, R]. For a callable, M is taken
        from `rhs`. An operator without a `TypeSpec` (a callable, or a custom
        LinearOperator subclass) is traced once per object, so reuse the object
        to reuse the trace. The same applies to `preconditioner`.
      rhs: float Tensor [M] or [M, R], the right-hand sides B.
      tol: Relative residual tolerance of the stopping rule, > 0.
      max_iterations: Iteration limit. Defaults to min(10·M, 1000): exact
        arithmetic needs at most M iterations, rounding can delay a small
        system, and for a large system each matvec is a full pass over the data.
      preconditioner: Optional `tf.linalg.LinearOperator` or callable applying
        a symmetric positive definite P⁻¹ ≈ A⁻¹ to [M, R], for example from
        `tf_linntk.preconditioners.pivoted_cholesky_preconditioner`.
      dtype: Float dtype of the iteration vectors and reductions.
      on_nonconvergence: "warn" issues a `ConvergenceWarning`, "raise" raises a
        `ConvergenceError`, "ignore" only fills the record.
      x0: Optional float Tensor shaped like `rhs`, the initial guess. Zeros by
        default, and a given guess costs one extra matvec.
      verbose: 0 (default) prints nothing, 1 shows a Keras progress bar over
        the iterations in eager mode.

    Returns:
      A tuple `(solution, record)`: `solution` is a `dtype` Tensor shaped like
      `rhs` ([M] or [M, R]) and `record` a `ConvergenceRecord`.

    Raises:
      TypeError: If `rhs`, `x0` or `dtype` is not a float, or an argument has
        the wrong kind.
      ValueError: If an option (including `verbose`) or tolerance is invalid,
        a shape does not match, `rhs` is not finite, or the operator or
        preconditioner returns NaN/Inf
        (under an outer `tf.function` this surfaces as InvalidArgumentError).
      ConvergenceError: If a column does not converge and
        `on_nonconvergence="raise"`.

    Example:
      >>> matrix = tf.linalg.LinearOperatorFullMatrix(
      ...     tf.constant([[4.0, 1.0], [1.0, 3.0]], tf.float64))
      >>> solution, record = conjugate_gradient(matrix, tf.ones([2, 3], tf.float64))
      >>> solution.shape, record.converged_all
      (TensorShape([2, 3]), True)
    """
    with tf.name_scope("conjugate_gradient"):
        dtype = _operators.check_float_dtype(dtype)
        _checks.check_option("on_nonconvergence", on_nonconvergence, _ON_NONCONVERGENCE)
        verbose = _progress.check_verbose(verbose)
        tol = _checks.check_positive_float("tol", tol)
        rhs, was_vector = _convert_rhs(rhs, operator, dtype)
        size = int(rhs.shape[0]) if rhs.shape[0] is not None else None
        max_iterations = _default_max_iterations(max_iterations, size)
        x0 = _convert_initial_guess(x0, rhs, was_vector, dtype)
        _check_preconditioner(preconditioner, size)

        # Zero columns of B have solution 0, so they start converged.
        if x0 is not None:
            x0 = tf.where(tf.reduce_any(tf.not_equal(rhs, 0), axis=0), x0, 0)  # [M, R]
        _logger.info(
            "conjugate_gradient: start, size M=%s, %s column(s), tol=%g, max_iterations=%d, "
            "preconditioner=%s", rhs.shape[0], rhs.shape[1], tol, max_iterations,
            type(preconditioner).__name__,
        )
        final = _run_cg(
            operator, _operators.traceable(preconditioner), rhs, x0, tf.constant(tol, dtype),
            max_iterations, verbose,
        )
        solution, record = _finish_cg(rhs, final, tol, max_iterations, on_nonconvergence)
        return (solution[:, 0] if was_vector else solution), record


# ------------------------------ conjugate gradient loop


class _CGState(NamedTuple):
    step: tf.Tensor  # [] int32, iterations run so far
    solution: tf.Tensor  # [M, R]
    residual: tf.Tensor  # [M, R]
    direction: tf.Tensor  # [M, R]
    residual_dot: tf.Tensor  # [R], rᵀ P⁻¹ r
    residual_norm: tf.Tensor  # [R]
    iterations: tf.Tensor  # [R] int32
    active: tf.Tensor  # [R] bool
    failure: tf.Tensor  # [] int32, one of the _*_FAILED codes
    threshold: tf.Tensor  # [R], tol·‖b‖ of the stopping rule


def _run_cg(operator, preconditioner, rhs, x0, tol, max_iterations, verbose):
    """Run CG to the final `_CGState`: one compiled loop, or chunks with a progress bar."""
    if not _progress.shows_progress(verbose):
        return _operators.run_compiled(
            _cg_loop, _cg_core, operator, preconditioner, rhs, x0, tol,
            tf.constant(max_iterations, tf.int32),
        )

    state = _operators.run_compiled(_cg_start, _cg_start_core, operator, preconditioner, rhs, x0, tol)
    rhs_norm = tf.norm(rhs, axis=0).numpy()  # [R]

    def advance(state, limit):
        return _operators.run_compiled(
            _cg_advance, _cg_advance_core, operator, preconditioner, state, limit
        )

    def status(state):
        residual_norm = state.residual_norm.numpy()
        relative = np.divide(residual_norm, rhs_norm, out=np.zeros_like(rhs_norm), where=rhs_norm > 0)
        unconverged = residual_norm > state.threshold.numpy()
        worst = np.max(relative[unconverged] if np.any(unconverged) else relative, initial=0.0)
        finished = not np.any(state.active.numpy()) or int(state.failure) != _NO_FAILURE
        return finished, [("relative_residual", float(worst))]

    return _progress.run_in_chunks(advance, state, max_iterations, status, _logger, "conjugate_gradient")


def _cg_loop(operator, preconditioner, rhs, x0, tol, max_iterations):
    """Run batched preconditioned CG on rhs [M, R], stopping each column on its own."""
    state = _cg_start(operator, preconditioner, rhs, x0, tol)
    return _cg_advance(operator, preconditioner, state, max_iterations)


def _cg_start(operator, preconditioner, rhs, x0, tol):
    """Return the `_CGState` before the first iteration."""
    threshold = tol * tf.norm(rhs, axis=0)  # [R]
    solution = tf.zeros_like(rhs) if x0 is None else x0
    residual = rhs if x0 is None else rhs - _operators.apply_operator(operator, x0)
    preconditioned = _operators.apply_operator(preconditioner, residual)
    residual_norm = tf.norm(residual, axis=0)
    iterations = tf.zeros(tf.shape(threshold), tf.int32)
    return _CGState(
        tf.constant(0), solution, residual, preconditioned, _column_dot(residual, preconditioned),
        residual_norm, iterations, residual_norm > threshold, _failure_code(residual, preconditioned),
        threshold,
    )


def _cg_advance(operator, preconditioner, state, limit):
    """Run CG iterations from `state` until `state.step` reaches `limit` or no column is active."""

    def cond(s):
        return (s.step < limit) & tf.reduce_any(s.active) & tf.equal(s.failure, _NO_FAILURE)

    def body(s):
        product = _operators.apply_operator(operator, s.direction)  # A p, [M, R]
        curvature = _column_dot(s.direction, product)  # pᵀ A p, [R]
        active = s.active & (curvature > 0)
        alpha = tf.where(active, tf.math.divide_no_nan(s.residual_dot, curvature), 0)  # [R]
        solution = s.solution + alpha * s.direction
        residual = s.residual - alpha * product
        preconditioned = _operators.apply_operator(preconditioner, residual)  # P⁻¹ r, [M, R]
        residual_dot = _column_dot(residual, preconditioned)
        beta = tf.math.divide_no_nan(residual_dot, s.residual_dot)
        direction = tf.where(active, preconditioned + beta * s.direction, s.direction)
        residual_norm = tf.norm(residual, axis=0)
        iterations = s.iterations + tf.cast(active, tf.int32)
        active = active & (residual_norm > s.threshold)
        failure = _failure_code(product, preconditioned)
        return (_CGState(
            s.step + 1, solution, residual, direction, residual_dot, residual_norm,
            iterations, active, failure, s.threshold,
        ),)

    (final,) = tf.while_loop(cond, body, (state,))
    return final


def _finish_cg(rhs, final, tol, max_iterations, on_nonconvergence):
    """Build the record from the final `_CGState`, raise on NaN/Inf, and warn or raise on non-convergence."""
    solution, iterations, residual_norm = final.solution, final.iterations, final.residual_norm
    failure, step = final.failure, final.step
    rhs_norm = tf.norm(rhs, axis=0)  # [R]
    relative = tf.math.divide_no_nan(residual_norm, rhs_norm)
    converged = residual_norm <= tol * rhs_norm

    def report(iterations, relative, converged, failure, step):
        record = ConvergenceRecord(
            "conjugate_gradient", np.asarray(iterations, np.int64), np.asarray(relative, np.float64),
            tol, max_iterations, np.asarray(converged, bool),
        )
        _raise_on_failure(int(failure), int(step))
        _report_convergence(record, on_nonconvergence)
        return record

    if tf.executing_eagerly():
        return solution, report(iterations.numpy(), relative.numpy(), converged.numpy(), failure, step)

    # Under an outer tf.function the same checks run when the graph executes.
    def graph_report(*values):
        report(*(value.numpy() for value in values))
        return True

    values = [iterations, relative, converged, failure, step]
    done = tf.py_function(graph_report, values, Tout=tf.bool)
    with tf.control_dependencies([done]):
        solution = tf.identity(solution)
    record = ConvergenceRecord("conjugate_gradient", iterations, relative, tol, max_iterations, converged)
    return solution, record


def _raise_on_failure(failure, step):
    if failure == _OPERATOR_FAILED:
        raise ValueError(
            f"`operator` returned NaN or Inf at conjugate gradient iteration {step}. "
            "Check its parameters and inputs for NaN, and its dtype for overflow."
        )
    if failure == _PRECONDITIONER_FAILED:
        raise ValueError(
            f"`preconditioner` returned NaN or Inf at conjugate gradient iteration {step}. "
            "Check that it is finite and positive definite."
        )


def _report_convergence(record, on_nonconvergence):
    """Log the outcome, and warn or raise for unconverged columns as requested."""
    _logger.info("conjugate_gradient: stop, %r", record)
    if record.converged_all:
        return
    message = _nonconvergence_message(record)
    # With "ignore" the caller expects unconverged solves, e.g. the inexact inner solves of Newton–CG.
    level = logging.INFO if on_nonconvergence == "ignore" else logging.WARNING
    _logger.log(level, "conjugate_gradient: %s", message)
    if on_nonconvergence == "raise":
        raise ConvergenceError(message)
    if on_nonconvergence == "warn":
        warnings.warn(message, ConvergenceWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel():
    """Return the `stacklevel` of the caller's frame, the first outside tf_linntk and TensorFlow.

    Counting frames keeps the warning at the user's line whatever wrappers
    (e.g. AutoGraph's do_not_convert) sit between it and the solver.
    """
    frame = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL_MODULES:
        frame = frame.f_back
        level += 1
    return level


def _nonconvergence_message(record):
    failed = ~record.converged
    stalled = failed & (record.iterations < record.max_iterations)
    message = (
        f"Conjugate gradients did not converge for {int(np.sum(failed))} of {record.converged.size} "
        f"right-hand-side column(s). After {int(np.max(record.iterations[failed]))} iterations "
        f"(max_iterations={record.max_iterations}) the worst relative residual ‖r‖/‖b‖ is "
        f"{float(np.max(record.relative_residual[failed])):.3g}, above tol={record.tolerance:g}. "
        "Increase `max_iterations`, loosen `tol`, or pass a `preconditioner`."
    )
    if np.any(stalled):
        message += (
            f" {int(np.sum(stalled))} column(s) stopped early because pᵀAp <= 0, so the operator "
            "is not positive definite at its working precision (a float64 operator may help)."
        )
    return message


def _column_dot(a, b):
    return tf.reduce_sum(a * b, axis=0)  # [R]


def _failure_code(product, preconditioned):
    code = tf.where(_operators.all_finite(preconditioned), _NO_FAILURE, _PRECONDITIONER_FAILED)
    return tf.where(_operators.all_finite(product), code, _OPERATOR_FAILED)




def _convert_rhs(rhs, operator, dtype):
    """Convert rhs to a `dtype` Tensor [M, R] and check it against the operator's size."""
    rhs = tf.convert_to_tensor(rhs)
    if not rhs.dtype.is_floating:
        raise TypeError(f"`rhs` must be a float tensor; received dtype {rhs.dtype.name}.")
    if rhs.shape.rank not in (1, 2):
        raise ValueError(f"`rhs` must have shape [M] or [M, R]; received shape {rhs.shape}.")
    size = _operators.system_size(operator)
    if size is not None and rhs.shape[0] is not None and rhs.shape[0] != size:
        raise ValueError(
            f"`rhs` must have M={size} rows to match `operator` of shape {tuple(operator.shape)}, "
            f"but received rhs.shape={tuple(rhs.shape)}."
        )
    was_vector = rhs.shape.rank == 1
    rhs = tf.cast(rhs, dtype)
    rhs = rhs[:, None] if was_vector else rhs  # [M, R]
    return _checks.check_finite("rhs", rhs), was_vector


def _convert_initial_guess(x0, rhs, was_vector, dtype):
    if x0 is None:
        return None
    x0 = tf.convert_to_tensor(x0)
    if not x0.dtype.is_floating:
        raise TypeError(f"`x0` must be a float tensor; received dtype {x0.dtype.name}.")
    x0 = tf.cast(x0, dtype)
    x0 = x0[:, None] if was_vector and x0.shape.rank == 1 else x0
    if not x0.shape.is_compatible_with(rhs.shape):
        expected = rhs.shape[:1] if was_vector else rhs.shape
        raise ValueError(f"`x0` must have the shape of `rhs`, {expected}; received shape {x0.shape}.")
    return _checks.check_finite("x0", x0)


def _default_max_iterations(max_iterations, size):
    if max_iterations is not None:
        return _checks.check_iteration_count("max_iterations", max_iterations)
    if size is None:
        return _MAX_ITERATIONS_CAP
    return max(1, min(10 * size, _MAX_ITERATIONS_CAP))


def _check_preconditioner(preconditioner, size):
    if preconditioner is None:
        return
    preconditioner_size = _operators.system_size(preconditioner, name="preconditioner")
    if None not in (size, preconditioner_size) and preconditioner_size != size:
        raise ValueError(
            f"`preconditioner` must be [M, M] with M={size} (from `rhs`); "
            f"received shape {tuple(preconditioner.shape)}."
        )


# Compiled loops shared by all operators that tf.function takes as arguments.
_cg_core = _operators.compile_loop(_cg_loop)
_cg_start_core = _operators.compile_loop(_cg_start)
_cg_advance_core = _operators.compile_loop(_cg_advance)
