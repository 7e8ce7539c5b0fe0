"""Validation and conversion of targets and labels for the likelihoods (NumPy, eager)."""

import collections.abc

import numpy as np
import tensorflow as tf


def check_noise_variance(noise_variance):
    """Return `noise_variance` as a float64 array of rank 0 or 1 with values > 0."""
    if noise_variance is None or isinstance(noise_variance, (bool, np.bool_, str, bytes)):
        raise TypeError(
            f"`noise_variance` must be a float or a vector of floats; received "
            f"{noise_variance!r} of type {type(noise_variance).__name__}."
        )
    try:
        variance = np.array(noise_variance, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`noise_variance` must be a float or a vector of floats; received "
            f"{noise_variance!r} of type {type(noise_variance).__name__}."
        ) from error
    if variance.ndim > 1 or variance.size == 0:
        raise ValueError(
            f"`noise_variance` must be a scalar or a non-empty vector [O] of "
            f"per-output variances; received shape {variance.shape}."
        )
    if not np.all(np.isfinite(variance) & (variance > 0)):
        raise ValueError(
            f"`noise_variance` must be finite and > 0; received {variance.tolist()}."
        )
    return variance


# NumPy label checks behind `Likelihood.validate_labels`, all private below here.


def check_float_targets(arg_name, labels, num_outputs):
    """Return float regression targets [N, O], raising on other dtypes, shapes or values."""
    if labels.dtype.kind != "f":
        raise TypeError(
            f"`{arg_name}` must contain float regression targets; received dtype "
            f"{labels.dtype}. Cast it, e.g. {arg_name}.astype('float32')."
        )
    if labels.ndim != 2 or labels.shape[1] != num_outputs:
        hint = f" Pass {arg_name}[:, None]." if labels.ndim == 1 and num_outputs == 1 else ""
        raise ValueError(
            f"`{arg_name}` must be [N, O] with O={num_outputs} (model outputs); "
            f"received {arg_name}.shape={labels.shape}.{hint}"
        )
    if not np.all(np.isfinite(labels)):
        raise ValueError(
            f"`{arg_name}` must be finite; received "
            f"{np.count_nonzero(~np.isfinite(labels))} NaN or Inf value(s)."
        )
    return labels


def check_class_labels(arg_name, labels, num_outputs):
    """Return int64 class ids [N] from ids [N], [N, 1] or one-hot rows [N, O]."""
    if labels.dtype.kind not in "iuf":
        raise TypeError(
            f"`{arg_name}` must contain integer class ids or one-hot rows; "
            f"received dtype {labels.dtype}."
        )
    if labels.ndim == 2 and labels.shape[1] == num_outputs:
        return _one_hot_to_ids(arg_name, labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"`{arg_name}` must be class ids [N] or one-hot rows [N, O] with "
            f"O={num_outputs}; received {arg_name}.shape={labels.shape}."
        )
    return _check_class_ids(arg_name, labels, num_outputs)


def check_binary_labels(arg_name, labels):
    """Return int64 labels [N] in {0, 1} from labels [N] or [N, 1]."""
    if labels.dtype.kind not in "biuf":
        raise TypeError(
            f"`{arg_name}` must contain 0/1 labels; received dtype {labels.dtype}."
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"`{arg_name}` must be [N] or [N, 1] for the Bernoulli likelihood; "
            f"received {arg_name}.shape={labels.shape}."
        )
    invalid = (labels != 0) & (labels != 1)
    if np.any(invalid):
        raise ValueError(
            f"`{arg_name}` must contain only 0 and 1 for the Bernoulli likelihood; "
            f"received {np.count_nonzero(invalid)} other value(s), e.g. "
            f"{labels[invalid][0].item()!r} at index {np.flatnonzero(invalid)[0]}."
        )
    return labels.astype(np.int64)


def labels_to_numpy(arg_name, y):
    """Convert labels to a NumPy array of rank >= 1 with at least one example."""
    if isinstance(y, (dict, tf.data.Dataset, collections.abc.Iterator)):
        raise TypeError(
            f"`{arg_name}` must be an array or tensor of labels; received a "
            f"{type(y).__name__}. Pass one label array [N] or [N, O], or a "
            "tf.data.Dataset of (x, y) pairs as `x`."
        )
    labels = np.asarray(y)
    if labels.ndim == 0 or labels.shape[0] == 0:
        raise ValueError(
            f"`{arg_name}` must contain at least one example along its first axis; "
            f"received {arg_name}.shape={labels.shape}."
        )
    return labels


def _one_hot_to_ids(arg_name, labels):
    """Return the class ids [N] of one-hot rows [N, O], raising on other rows."""
    is_binary = np.all((labels == 0) | (labels == 1), axis=1)
    bad_rows = np.flatnonzero(~is_binary | (np.sum(labels, axis=1) != 1))
    if bad_rows.size:
        row = bad_rows[0]
        raise ValueError(
            f"`{arg_name}` of shape [N, O] must contain one-hot rows (a single 1, "
            f"zeros elsewhere); received {bad_rows.size} other row(s), e.g. row {row} "
            f"= {labels[row].tolist()}."
        )
    return np.argmax(labels, axis=1).astype(np.int64)


def _check_class_ids(arg_name, labels, num_outputs):
    """Return integer class ids [N] in [0, num_outputs), raising on other values."""
    if labels.dtype.kind == "f":
        invalid = ~np.isfinite(labels) | (labels != np.round(labels))
        if np.any(invalid):
            index = np.flatnonzero(invalid)[0]
            raise ValueError(
                f"`{arg_name}` must contain integer class ids; received the "
                f"non-integer value {labels[index].item()!r} at index {index}."
            )
    outside = (labels < 0) | (labels >= num_outputs)
    if np.any(outside):
        raise ValueError(
            f"`{arg_name}` must contain class ids in [0, {num_outputs}) for a model "
            f"with {num_outputs} outputs; received {np.count_nonzero(outside)} id(s) "
            f"outside, e.g. {labels[outside][0].item()!r} at index {np.flatnonzero(outside)[0]}."
        )
    return labels.astype(np.int64)
