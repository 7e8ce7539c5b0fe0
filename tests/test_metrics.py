"""Tests for tf_linntk.metrics on hand-computed examples and TFP references."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk.metrics import accuracy
from tf_linntk.metrics import expected_calibration_error
from tf_linntk.metrics import gaussian_negative_log_likelihood
from tf_linntk.metrics import mean_squared_error
from tf_linntk.metrics import negative_log_likelihood

# Six examples over three classes. Prediction, confidence and correctness:
#   0: predicts 0 with 0.5,  label 0 -> correct
#   1: predicts 1 with 0.6,  label 2 -> wrong
#   2: predicts 2 with 0.7,  label 2 -> correct
#   3: predicts 0 with 0.8,  label 0 -> correct
#   4: predicts 1 with 0.9,  label 0 -> wrong
#   5: predicts 0 with 0.4,  label 1 -> wrong
PROBS = np.array(
    [
        [0.5, 0.3, 0.2],
        [0.2, 0.6, 0.2],
        [0.1, 0.2, 0.7],
        [0.8, 0.1, 0.1],
        [0.05, 0.9, 0.05],
        [0.4, 0.35, 0.25],
    ]
)
LABELS = np.array([0, 2, 2, 0, 0, 1])


def test_accuracy_fixed_example():
    """Accuracy counts the examples whose argmax equals the label (3 of 6)."""
    assert accuracy(LABELS, PROBS) == pytest.approx(0.5, abs=1e-15)


def test_negative_log_likelihood_fixed_example():
    """NLL is the mean of -log of each label's probability."""
    # Probabilities of the labels: 0.5, 0.2, 0.7, 0.8, 0.05, 0.35.
    expected = -np.mean(np.log([0.5, 0.2, 0.7, 0.8, 0.05, 0.35]))
    assert negative_log_likelihood(LABELS, PROBS) == pytest.approx(expected, rel=1e-14)


def test_expected_calibration_error_fixed_example():
    """ECE with 3 bins equals the hand-computed weighted gap 0.15."""
    # Bins of width 1/3: [0, 1/3) is empty, because top-label confidences are >= 1/3.
    # Bin [1/3, 2/3) contains examples 0, 1, 5 with confidences 0.5, 0.6, 0.4:
    #   accuracy 1/3, mean confidence 0.5, weight 3/6 -> 0.5 * |1/3 - 0.5| = 1/12.
    # Bin [2/3, 1] contains examples 2, 3, 4 with confidences 0.7, 0.8, 0.9:
    #   accuracy 2/3, mean confidence 0.8, weight 3/6 -> 0.5 * |2/3 - 0.8| = 1/15.
    # ECE = 1/12 + 1/15 = 9/60 = 0.15.
    ece = expected_calibration_error(LABELS, PROBS, num_bins=3)
    assert ece == pytest.approx(0.15, abs=1e-14)


def test_expected_calibration_error_bernoulli_fixed_example():
    """ECE of Bernoulli p(y=1) uses the confidence max(p, 1 - p)."""
    probs = np.array([0.9, 0.2, 0.6, 0.3])
    labels = np.array([1, 1, 0, 0])
    # Predictions 1, 0, 1, 0 with confidences 0.9, 0.8, 0.6, 0.7, correct: 1, 0, 0, 1.
    # Two bins: [0, 0.5) is empty. [0.5, 1] contains all four examples:
    #   accuracy 2/4, mean confidence 3.0/4 -> |0.5 - 0.75| = 0.25.
    ece = expected_calibration_error(labels, probs, num_bins=2)
    assert ece == pytest.approx(0.25, abs=1e-14)


def test_expected_calibration_error_zero_when_calibrated():
    """ECE is 0 when every example is predicted correctly with confidence 1."""
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error([0, 1, 2, 1], probs) == 0.0


@pytest.mark.parametrize("num_bins", [1, 5, 15], ids=["bins1", "bins5", "bins15"])
def test_expected_calibration_error_matches_tfp(num_bins):
    """ECE equals tfp.stats.expected_calibration_error on random float32 logits."""
    rng = np.random.default_rng(0)
    logits = (2.0 * rng.standard_normal((200, 4))).astype(np.float32)
    labels = rng.integers(0, 4, size=200)
    probs = tf.nn.softmax(logits).numpy()
    expected = tfp.stats.expected_calibration_error(
        num_bins, logits=logits, labels_true=labels.astype(np.int32)
    )
    # Float32 on the TFP side limits the agreement to about 1e-6.
    assert expected_calibration_error(labels, probs, num_bins) == pytest.approx(
        float(expected), abs=1e-6
    )


@pytest.mark.parametrize(
    "metric",
    [accuracy, negative_log_likelihood, expected_calibration_error],
    ids=["accuracy", "nll", "ece"],
)
def test_bernoulli_layouts_match_two_classes(metric):
    """Bernoulli probs [N] and [N, 1] give the metric of the classes [1 - p, p]."""
    p = np.array([0.9, 0.2, 0.6, 0.3, 0.05])
    labels = np.array([1, 1, 0, 0, 0])
    expected = metric(labels, np.stack([1.0 - p, p], axis=1))
    assert metric(labels, p) == pytest.approx(expected, rel=1e-14)
    assert metric(labels[:, None], p[:, None]) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize(
    "metric",
    [accuracy, negative_log_likelihood, expected_calibration_error],
    ids=["accuracy", "nll", "ece"],
)
def test_classification_metrics_accept_one_hot_and_tensors(metric):
    """One-hot labels and eager tensors give the same value as NumPy class ids."""
    expected = metric(LABELS, PROBS)
    assert metric(np.eye(3)[LABELS], PROBS) == expected
    assert metric(tf.constant(LABELS), tf.constant(PROBS, tf.float32)) == pytest.approx(
        expected, rel=1e-6
    )


def test_negative_log_likelihood_clips_zero_probability():
    """A label with probability 0 costs -log(1e-12) instead of infinity."""
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    expected = (-np.log(1e-12) - np.log(0.5)) / 2
    assert negative_log_likelihood([1, 0], probs) == pytest.approx(expected, rel=1e-14)


def test_gaussian_negative_log_likelihood_matches_tfp():
    """Gaussian NLL equals the mean of -tfd.Normal.log_prob over examples and outputs."""
    rng = np.random.default_rng(1)
    y = rng.standard_normal((6, 2))
    mean = rng.standard_normal((6, 2))
    variance = rng.uniform(0.1, 2.0, size=(6, 2))
    normal = tfp.distributions.Normal(tf.constant(mean), tf.constant(np.sqrt(variance)))
    expected = -np.mean(normal.log_prob(y).numpy())
    assert gaussian_negative_log_likelihood(y, mean, variance) == pytest.approx(
        expected, rel=1e-13
    )


@pytest.mark.parametrize(
    "variance",
    [0.5, np.array([0.5, 0.5]), np.full((6, 2), 0.5)],
    ids=["scalar", "per_output", "per_value"],
)
def test_gaussian_negative_log_likelihood_broadcasts_variance(variance):
    """A scalar, a per-output [O] and a full [N, O] variance give the same NLL."""
    y = np.arange(12.0).reshape(6, 2)
    mean = y + 1.0
    # Every term is ½ [log(2π · 0.5) + 1 / 0.5].
    expected = 0.5 * (np.log(np.pi) + 2.0)
    assert gaussian_negative_log_likelihood(y, mean, variance) == pytest.approx(
        expected, rel=1e-14
    )


def test_mean_squared_error_fixed_example():
    """MSE is the mean of the squared differences over examples and outputs."""
    y = np.array([[1.0, 2.0], [3.0, 4.0]])
    mean = np.array([[1.0, 0.0], [4.0, 4.0]])
    # Squared differences 0, 4, 1, 0 -> mean 5/4.
    assert mean_squared_error(y, mean) == pytest.approx(1.25, abs=1e-15)


@pytest.mark.parametrize(
    "labels, probs, error, match",
    [
        ([0, 1], PROBS, ValueError,
         r"`labels` must contain num_examples=6 examples; received labels.shape=\(2,\)"),
        (LABELS, np.ones((6, 3, 1)), ValueError,
         r"`probs` must be \[N, C\] .* probs.shape=\(6, 3, 1\)"),
        (LABELS, PROBS - 0.2, ValueError,
         (r"`probs` must contain probabilities in \[0, 1\]; received values in .* "
          r"If these are logits, apply softmax")),
        ([0, 1], [[0.5, 0.7], [0.5, 0.5]], ValueError,
         r"Each row of `probs` must sum to 1 \(within 0.001\); received row 0 summing to 1.2"),
        ([0, 1], [1.2, 0.5], ValueError, r"`probs` must contain probabilities in \[0, 1\]"),
        ([0, 1], [np.nan, 0.5], ValueError, r"`probs` must be finite; received 1 NaN"),
        ([0, 1], ["a", "b"], TypeError, "`probs` must contain real numbers; received dtype <U1"),
        ([], np.zeros((0, 3)), ValueError, r"`probs` must not be empty; received shape \(0, 3\)"),
        ([0, 3, 1, 0, 0, 0], PROBS, ValueError,
         r"`labels` must contain class ids in \[0, 3\)"),
        ([0, 2], [0.3, 0.5], ValueError, "`labels` must contain only 0 and 1"),
    ],
    ids=["length_mismatch", "rank3", "negative", "row_sum", "bernoulli_above_one", "nan",
         "strings", "empty", "label_out_of_range", "bernoulli_label"],
)
def test_classification_metrics_reject_invalid(labels, probs, error, match):
    """Classification metrics raise, naming the argument, for invalid inputs."""
    for metric in (accuracy, negative_log_likelihood, expected_calibration_error):
        with pytest.raises(error, match=match):
            metric(np.asarray(labels), np.asarray(probs))


@pytest.mark.parametrize(
    "num_bins, error, match",
    [
        (0, ValueError, "`num_bins` must be a positive integer; received 0"),
        (-3, ValueError, "`num_bins` must be a positive integer; received -3"),
        (2.5, TypeError, "`num_bins` must be a positive integer; received 2.5"),
    ],
    ids=["zero", "negative", "float"],
)
def test_expected_calibration_error_rejects_num_bins(num_bins, error, match):
    """ECE raises, naming `num_bins`, unless it is a positive integer."""
    with pytest.raises(error, match=match):
        expected_calibration_error(LABELS, PROBS, num_bins=num_bins)


@pytest.mark.parametrize(
    "y, mean, variance, error, match",
    [
        (np.zeros((4, 2)), np.zeros((4,)), 1.0, ValueError,
         r"`mean` must have the shape of `y`, \(4, 2\); received mean.shape=\(4,\)"),
        (np.zeros((4, 2)), np.zeros((4, 2)), np.ones(3), ValueError,
         (r"`variance` must be broadcastable to the shape of `y`, \(4, 2\); "
          r"received variance.shape=\(3,\)")),
        (np.zeros((4, 2)), np.zeros((4, 2)), 0.0, ValueError,
         r"`variance` must be > 0; received min\(variance\)=0\."),
        (np.zeros((4, 2)), np.zeros((4, 2)), -1.0, ValueError, "`variance` must be > 0"),
        (np.zeros((4, 2)), np.zeros((4, 2)), np.inf, ValueError, "`variance` must be finite"),
        ([[np.nan]], [[0.0]], 1.0, ValueError, "`y` must be finite"),
        ([[True]], [[0.0]], 1.0, TypeError, "`y` must contain real numbers; received dtype bool"),
    ],
    ids=["shape_mismatch", "variance_shape", "zero_variance", "negative_variance",
         "infinite_variance", "nan_y", "bool_y"],
)
def test_gaussian_negative_log_likelihood_rejects_invalid(y, mean, variance, error, match):
    """Gaussian NLL raises, naming the argument, for invalid inputs."""
    with pytest.raises(error, match=match):
        gaussian_negative_log_likelihood(y, mean, variance)


def test_mean_squared_error_rejects_shape_mismatch():
    """MSE raises, naming `mean`, when its shape differs from the shape of `y`."""
    with pytest.raises(ValueError, match=r"`mean` must have the shape of `y`, \(3,\)"):
        mean_squared_error(np.zeros(3), np.zeros((3, 1)))
