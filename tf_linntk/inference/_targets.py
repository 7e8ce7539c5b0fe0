"""Validation of regression targets and noise variances, shared by the inference modules."""

import collections.abc

import numpy as np
import tensorflow as tf

from tf_linntk import _checks


def check_no_separate_targets(y):
    """Raise ValueError if `y` is given next to a dataset `x`, which yields the targets."""
    if y is not None:
        raise ValueError(
            "`y` must be None when `x` is a tf.data.Dataset, because the dataset "
            f"yields the targets; received y of type {type(y).__name__}."
        )


def convert_targets(y, num_examples, num_outputs, name="y"):
    """Convert regression targets to float64 [N, O] and validate them."""
    if y is None:
        raise ValueError(
            f"`{name}` is required for regression; received None. Pass targets [N, O] "
            "or a tf.data.Dataset of (x, y) pairs as `x`."
        )
    if isinstance(y, dict):
        raise TypeError(
            f"`{name}` must be a numeric tensor [N, O]; received a dict with keys "
            f"{sorted(y)}. Concatenate the targets of several outputs into [N, O]."
        )
    if isinstance(y, (tf.data.Dataset, collections.abc.Iterator)):
        raise TypeError(
            f"`{name}` must be a numeric tensor [N, O]; received a {type(y).__name__}. "
            "Pass a tf.data.Dataset of (x, y) pairs as `x` instead."
        )
    y = tf.convert_to_tensor(y)
    if not (y.dtype.is_floating or y.dtype.is_integer):
        raise TypeError(
            f"`{name}` must be a numeric tensor [N, O]; received dtype {y.dtype.name}."
        )
    y = tf.cast(y, tf.float64)
    if y.shape.rank == 1 and num_outputs == 1:
        y = y[:, None]  # [N, 1]
    if y.shape.rank != 2 or y.shape[0] != num_examples or y.shape[1] != num_outputs:
        hint = " For single-output models pass y of shape [N] or [N, 1]." if num_outputs == 1 else ""
        raise ValueError(
            f"`{name}` must be [N, O] with N={num_examples} (from `x`) and "
            f"O={num_outputs} (model outputs); received {name}.shape="
            f"{tuple(y.shape)}.{hint}"
        )
    return _checks.check_finite(name, y)


def convert_noise_variance(noise_variance, num_outputs):
    """Return σ² as a float64 vector [O] after checking its kind, shape and values."""
    value = np.asarray(noise_variance, dtype=object if noise_variance is None else None)
    if value.dtype.kind not in "fiu":
        raise TypeError(
            "`noise_variance` must be a float or a vector of length O; received "
            f"{noise_variance!r}."
        )
    value = value.astype(np.float64)
    if value.ndim == 0:
        value = np.full([num_outputs], float(value))
    if value.shape != (num_outputs,):
        raise ValueError(
            f"`noise_variance` must be a scalar or a vector of length O={num_outputs}; "
            f"received shape {value.shape}."
        )
    if not np.all(np.isfinite(value)) or np.any(value <= 0):
        raise ValueError(
            f"`noise_variance` must be finite and > 0; received {value.tolist()}."
        )
    return tf.constant(value, tf.float64)
