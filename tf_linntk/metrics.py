"""Metrics of predictive distributions: accuracy, NLL, calibration error and squared error.

Every metric takes NumPy arrays or eager tensors and returns a Python float. The
functions run NumPy code in float64, so call them eagerly, not inside
`tf.function`.

Classification metrics take `probs`, predictive probabilities (not logits), in
one of two layouts:

- categorical: [N, C] with C >= 2 classes, rows summing to 1 (within 1e-3), and
  `labels` as integer class ids [N] (or [N, 1]) or one-hot rows [N, C];
- Bernoulli: [N] or [N, 1] holding p(y = 1), and `labels` in {0, 1} as [N] or
  [N, 1]. These are treated as the two classes [1 − p, p].

The predicted class is the argmax of the class probabilities, the first class on
ties (so a Bernoulli p = 0.5 predicts 0).
"""

import numpy as np

from tf_linntk import _checks
from tf_linntk.likelihoods import Bernoulli
from tf_linntk.likelihoods import Categorical
from tf_linntk.similarity import jacobian_similarity

__all__ = [
    "accuracy",
    "expected_calibration_error",
    "gaussian_negative_log_likelihood",
    "jacobian_similarity",
    "mean_squared_error",
    "negative_log_likelihood",
]

# Probabilities are clipped to at least this value before the log in
# `negative_log_likelihood`, so a zero probability costs -log(1e-12) ≈ 27.6 nats.
_MIN_PROBABILITY = 1e-12

# Tolerance on |Σ_c probs[n, c] − 1|. The worst-case float32 rounding error of a
# softmax row sum is roughly C · 6e-8 (an estimate), so rows of up to about 10⁴
# classes pass.
_SUM_TOLERANCE = 1e-3


def accuracy(labels, probs):
    """Compute the fraction of examples whose predicted class equals the label.

    Args:
        labels: int class ids [N] or one-hot [N, C] (categorical), or 0/1 labels
            [N] (Bernoulli), as described in the module docstring.
        probs: float array [N, C] of class probabilities, or [N] / [N, 1] of
            p(y = 1).

    Returns:
        float in [0, 1], the mean of argmax_c probs[n, c] == labels[n].

    Raises:
        TypeError: If `labels` or `probs` has a non-numeric dtype.
        ValueError: If the shapes disagree or `probs` contains invalid probabilities.
    """
    labels, probs = _prepare_classification(labels, probs)
    predictions = np.argmax(probs, axis=1)  # [N]
    return float(np.mean(predictions == labels))


def negative_log_likelihood(labels, probs):
    """Compute the mean negative log-likelihood −(1/N) Σ_n log probs[n, labels[n]].

    Probabilities are clipped to at least 1e-12 before the log, so a label that
    was given probability 0 adds about 27.6 nats instead of infinity.

    Args:
        labels: int class ids [N] or one-hot [N, C] (categorical), or 0/1 labels
            [N] (Bernoulli), as described in the module docstring.
        probs: float array [N, C] of class probabilities, or [N] / [N, 1] of
            p(y = 1).

    Returns:
        float >= 0, the mean NLL in nats per example.

    Raises:
        TypeError: If `labels` or `probs` has a non-numeric dtype.
        ValueError: If the shapes disagree or `probs` contains invalid probabilities.
    """
    labels, probs = _prepare_classification(labels, probs)
    label_probs = probs[np.arange(probs.shape[0]), labels]  # [N]
    return float(-np.mean(np.log(np.maximum(label_probs, _MIN_PROBABILITY))))


def expected_calibration_error(labels, probs, num_bins=15):
    """Compute the expected calibration error of the top-label confidence.

    ECE = Σ_b (n_b / N) |acc_b − conf_b|, where the confidence of example n is
    max_c probs[n, c], bin b = 0, …, B−1 contains the n_b examples with confidence in
    [b/B, (b+1)/B) (the last bin also contains confidence 1), acc_b is the fraction
    of them predicted correctly and conf_b their mean confidence. Empty bins add
    nothing. The bins match `tfp.stats.expected_calibration_error` of TFP 0.25,
    which takes logits and computes in float32.

    Args:
        labels: int class ids [N] or one-hot [N, C] (categorical), or 0/1 labels
            [N] (Bernoulli), as described in the module docstring.
        probs: float array [N, C] of class probabilities, or [N] / [N, 1] of
            p(y = 1).
        num_bins: int > 0, the number B of equal-width confidence bins on [0, 1].

    Returns:
        float in [0, 1].

    Raises:
        TypeError: If `num_bins` is not an int, or `labels` or `probs` has a
            non-numeric dtype.
        ValueError: If `num_bins` <= 0, the shapes disagree, or `probs` contains
            invalid probabilities.
    """
    num_bins = _checks.check_positive_int("num_bins", num_bins)
    labels, probs = _prepare_classification(labels, probs)

    # Top-label prediction and confidence of each example.
    predictions = np.argmax(probs, axis=1)  # [N]
    confidences = probs[np.arange(probs.shape[0]), predictions]  # [N]
    correct = (predictions == labels).astype(np.float64)  # [N]

    # Bin b covers [b/B, (b+1)/B), and confidence 1 goes to the last bin.
    bins = np.minimum(np.floor(confidences * num_bins).astype(np.int64), num_bins - 1)
    confidence_sums = np.bincount(bins, weights=confidences, minlength=num_bins)  # [B]
    correct_sums = np.bincount(bins, weights=correct, minlength=num_bins)  # [B]

    # (n_b / N) |acc_b − conf_b| = |Σ_b correct − Σ_b confidence| / N.
    return float(np.sum(np.abs(correct_sums - confidence_sums)) / probs.shape[0])


def gaussian_negative_log_likelihood(y, mean, variance):
    """Compute the mean Gaussian NLL over all examples and outputs.

    NLL = (1/(N·O)) Σ_{n,o} ½ [log(2π v_no) + (y_no − μ_no)² / v_no], with μ =
    `mean` and v = `variance`. For noisy targets, `variance` should include the
    observation noise.

    Args:
        y: float array [N, O] (or [N]), the targets.
        mean: float array of the shape of `y`, the predictive means.
        variance: float array broadcastable to the shape of `y` (e.g. [N, O], [O]
            or a scalar), the predictive variances, finite and > 0.

    Returns:
        float, the mean NLL in nats per target value.

    Raises:
        TypeError: If an argument has a non-numeric dtype.
        ValueError: If the shapes disagree, an argument is empty or not finite,
            or `variance` has a value <= 0.
    """
    y, mean = _prepare_regression(y, mean)
    variance = _as_float64_array("variance", variance)
    try:
        np.broadcast_to(variance, y.shape)
    except ValueError as error:
        raise ValueError(
            f"`variance` must be broadcastable to the shape of `y`, {y.shape}; "
            f"received variance.shape={variance.shape}."
        ) from error
    if np.any(variance <= 0):
        raise ValueError(
            f"`variance` must be > 0; received min(variance)={variance.min():.6g}."
        )
    log_density = -0.5 * (np.log(2.0 * np.pi * variance) + np.square(y - mean) / variance)
    return float(-np.mean(log_density))


def mean_squared_error(y, mean):
    """Compute the mean squared error (1/(N·O)) Σ_{n,o} (y_no − μ_no)².

    Args:
        y: float array [N, O] (or [N]), the targets.
        mean: float array of the shape of `y`, the predictions.

    Returns:
        float >= 0.

    Raises:
        TypeError: If an argument has a non-numeric dtype.
        ValueError: If the shapes disagree, or an argument is empty or not finite.
    """
    y, mean = _prepare_regression(y, mean)
    return float(np.mean(np.square(y - mean)))


def _as_float64_array(name, value):
    """Convert to a finite, non-empty float64 array, raising on other dtypes."""
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise TypeError(
            f"`{name}` must contain real numbers; received dtype {array.dtype}."
        )
    array = array.astype(np.float64)
    if array.size == 0:
        raise ValueError(f"`{name}` must not be empty; received shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"`{name}` must be finite; received {np.count_nonzero(~np.isfinite(array))} "
            f"NaN or Inf value(s)."
        )
    return array


def _prepare_regression(y, mean):
    """Convert targets and predictions to float64 arrays of one shape."""
    y = _as_float64_array("y", y)
    mean = _as_float64_array("mean", mean)
    if mean.shape != y.shape:
        raise ValueError(
            f"`mean` must have the shape of `y`, {y.shape}; received "
            f"mean.shape={mean.shape}."
        )
    return y, mean


def _prepare_classification(labels, probs):
    """Return class ids [N] (int64) and class probabilities [N, C] (float64, C >= 2)."""
    probs = _as_float64_array("probs", probs)
    if probs.ndim not in (1, 2):
        raise ValueError(
            f"`probs` must be [N, C] class probabilities or [N] / [N, 1] Bernoulli "
            f"probabilities; received probs.shape={probs.shape}."
        )
    if probs.min() < 0 or probs.max() > 1:
        raise ValueError(
            f"`probs` must contain probabilities in [0, 1]; received values in "
            f"[{probs.min():.6g}, {probs.max():.6g}]. If these are logits, apply softmax "
            f"or sigmoid first."
        )
    num_examples = probs.shape[0]

    # Bernoulli p(y = 1) [N] or [N, 1] -> two classes [N, 2].
    if probs.ndim == 1 or probs.shape[1] == 1:
        labels = Bernoulli().validate_labels(labels, 1, num_examples, arg_name="labels")
        p = probs.reshape(-1)
        return labels, np.stack([1.0 - p, p], axis=1)

    row_errors = np.abs(np.sum(probs, axis=1) - 1.0)  # [N]
    if np.any(row_errors > _SUM_TOLERANCE):
        row = int(np.argmax(row_errors))
        raise ValueError(
            f"Each row of `probs` must sum to 1 (within {_SUM_TOLERANCE}); received "
            f"row {row} summing to {np.sum(probs[row]):.6g}."
        )
    labels = Categorical().validate_labels(
        labels, probs.shape[1], num_examples, arg_name="labels"
    )
    return labels, probs
