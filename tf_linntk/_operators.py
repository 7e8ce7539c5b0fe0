"""Operator plumbing shared by the solvers and preconditioners: compiled loops, casts, checks."""

import functools
import weakref

import numpy as np
import tensorflow as tf


def compile_loop(loop):
    return tf.function(loop, reduce_retracing=True, autograph=False)


def run_compiled(loop, shared, operator, *args):
    """Run `loop(operator, *args)` compiled, reusing traces across calls.

    An operator that tf.function can take as an argument (None, or a
    LinearOperator with a TypeSpec) goes to `shared`, the module-level compiled
    `loop`, which traces by shape and dtype only. Any other operator gets its
    own compiled function, kept as long as the operator lives: one trace per
    operator object, and its graph is freed with it.
    """
    if operator is None or has_type_spec(operator):
        return shared(operator, *args)
    try:
        compiled = _PER_OPERATOR.setdefault(operator, {})
    except TypeError:  # not weakly referenceable, so nothing can be kept
        compiled = {}
    if loop.__name__ not in compiled:
        # A partial has no code object of its own, so TF's retracing warning counts it apart.
        compiled[loop.__name__] = compile_loop(functools.partial(loop, OperatorHandle(operator)))
    return compiled[loop.__name__](*args)


def apply_operator(operator, vectors):
    """Apply `operator` to vectors [M, R], casting to its dtype and the product back."""
    if operator is None:
        return vectors
    matmul = getattr(operator, "matmul", None)
    if callable(matmul):
        product = matmul(tf.cast(vectors, getattr(operator, "dtype", vectors.dtype)))
    else:
        product = operator(vectors)
    return tf.cast(product, vectors.dtype)


def raise_if(condition, value, message):
    """Raise ValueError(message) if `condition` is true, or in a graph attach an assert op to `value`."""
    if tf.executing_eagerly():
        if bool(condition):
            raise ValueError(message)
        return value
    with tf.control_dependencies([tf.debugging.Assert(~condition, [message])]):
        return tf.identity(value)


class OperatorHandle:
    """Weak stand-in for an operator that tf.function cannot take as an argument.

    Compiled functions keep handles, not operators, so an operator can be freed
    while a cache still contains its compiled function. Only public attributes and
    calls are forwarded, so TF's tracing protocols do not see the operator's own.
    """

    def __init__(self, operator):
        self._operator_ref = weakref.ref(operator)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._operator_ref(), name)

    def __call__(self, *args):
        return self._operator_ref()(*args)


# Compiled loops per operator without a TypeSpec, dropped when the operator is freed.
_PER_OPERATOR = weakref.WeakKeyDictionary()
# One handle per such preconditioner, so repeated solves reuse a trace.
_HANDLES = weakref.WeakKeyDictionary()


def has_type_spec(operator):
    if not isinstance(operator, tf.linalg.LinearOperator):
        return False
    try:
        tf.type_spec_from_value(operator)
    except TypeError:
        return False
    return True


def traceable(operator):
    """Return `operator`, or a handle if it is a LinearOperator that tf.function rejects as an argument."""
    if not isinstance(operator, tf.linalg.LinearOperator) or has_type_spec(operator):
        return operator
    if operator not in _HANDLES:
        _HANDLES[operator] = OperatorHandle(operator)
    return _HANDLES[operator]


def check_float_dtype(dtype):
    try:
        converted = tf.as_dtype(dtype)
    except TypeError:
        converted = None
    if converted is None or not converted.is_floating:
        raise TypeError(f"`dtype` must be a float dtype such as tf.float64; received {dtype!r}.")
    return converted


def operator_dtype(operator, default):
    dtype = getattr(operator, "dtype", None)
    return tf.as_dtype(dtype) if dtype is not None else default


def system_size(operator, name="operator"):
    """Return M of a square operator [M, M], or None for a callable without `.shape`."""
    has_matmul = callable(getattr(operator, "matmul", None))
    if not has_matmul and not callable(operator):
        raise TypeError(
            f"`{name}` must be a tf.linalg.LinearOperator or a callable on [M, R] tensors; "
            f"received an object of type {type(operator).__name__}."
        )
    shape = getattr(operator, "shape", None) if has_matmul else None
    if shape is None:
        return None
    shape = tuple(tf.TensorShape(shape).as_list())
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"`{name}` must be a square [M, M] operator; received shape {shape}.")
    return shape[0]


def stateless_seed(seed, salt):
    """Return an int32 Tensor [2] for tf.random.stateless_* from an int seed or None (random)."""
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"`seed` must be an int or None; received {seed!r} of type {type(seed).__name__}."
        )
    return tf.constant([int(seed) % (2**31 - 1), salt], tf.int32)

def all_finite(tensor):
    return tf.reduce_all(tf.math.is_finite(tensor))


class CallableOperator(tf.linalg.LinearOperator):
    """Self-adjoint float64 LinearOperator defined by a matmul callable."""

    def __init__(self, matmul, size, name="CallableOperator"):
        self._matmul_fn = matmul
        self._size = int(size)
        super().__init__(
            dtype=tf.float64, is_self_adjoint=True, is_square=True, name=name
        )

    def _shape(self):
        return tf.TensorShape([self._size, self._size])

    def _shape_tensor(self):
        return tf.constant([self._size, self._size], tf.int32)

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        if adjoint_arg:
            x = tf.linalg.adjoint(x)
        return self._matmul_fn(x)
