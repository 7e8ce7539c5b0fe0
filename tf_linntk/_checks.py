"""Validators shared by the public entry points; private helpers trust their inputs."""

import numbers

import numpy as np
import tensorflow as tf


def check_option(name, value, choices):
    """Raise ValueError unless `value` is one of the strings in `choices`."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}; received {value!r}.")
    return value


def check_positive_int(name, value, allow_none=False):
    """Raise unless `value` is a positive Python or NumPy integer (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a positive integer; received {value!r} "
            f"of type {type(value).__name__}."
        )
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive integer; received {value}.")
    return int(value)


def check_iteration_count(name, value, allow_none=False):
    """Raise unless `value` is a positive integer below 2**31 (or None when allowed).

    Iteration counters in the compiled loops are int32.
    """
    value = check_positive_int(name, value, allow_none)
    if value is not None and value >= 2**31:
        raise ValueError(f"`{name}` must be below 2**31; received {value}.")
    return value


def check_positive_float(name, value, allow_none=False):
    """Raise unless `value` is a finite real number > 0 (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a positive float; received {value!r} "
            f"of type {type(value).__name__}."
        )
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite float > 0; received {value}.")
    return float(value)


def check_seed(name, value):
    """Raise unless `value` is None or a non-negative integer below 2**31."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be None or a non-negative integer; received {value!r} "
            f"of type {type(value).__name__}."
        )
    if not 0 <= value < 2**31:
        raise ValueError(f"`{name}` must be in [0, 2**31); received {value}.")
    return int(value)


def check_finite(name, tensor):
    """Raise ValueError if an eager float tensor contains NaN or Inf.

    Graph tensors are passed through unchanged, because their values are unknown
    at trace time.
    """
    if not tensor.dtype.is_floating or not tf.executing_eagerly():
        return tensor
    finite = tf.math.is_finite(tensor)
    if not bool(tf.reduce_all(finite)):
        count = int(tf.size(finite)) - int(tf.reduce_sum(tf.cast(finite, tf.int64)))
        raise ValueError(
            f"`{name}` must be finite; received {count} NaN or Inf value(s) "
            f"in a tensor of shape {tuple(tensor.shape)}."
        )
    return tensor
