"""Tests for tf_linntk.likelihoods against TFP distributions and autodiff references."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk.likelihoods import LIKELIHOOD_NAMES
from tf_linntk.likelihoods import Bernoulli
from tf_linntk.likelihoods import Categorical
from tf_linntk.likelihoods import Gaussian
from tf_linntk.likelihoods import Likelihood
from tf_linntk.likelihoods import get_likelihood

tfd = tfp.distributions

NUM_EXAMPLES = 5
NOISE_VARIANCES = [0.1, 0.5, 2.0]

# (likelihood factory, number of outputs O) for every likelihood variant.
CASES = {
    "gaussian_scalar": (lambda: Gaussian(0.3), 3),
    "gaussian_per_output": (lambda: Gaussian(NOISE_VARIANCES), 3),
    "categorical": (Categorical, 4),
    "bernoulli": (Bernoulli, 1),
}
CASE_IDS = list(CASES)

# Methods that take only `f` and return a tensor of f's dtype.
OUTPUT_METHODS = ["hessian_diag", "hessian_dense", "hessian_sqrt"]


def _make_case(case_id, seed, num_examples=NUM_EXAMPLES, dtype=np.float64):
    """Return (likelihood, f [N, O], valid labels y) for one case."""
    factory, num_outputs = CASES[case_id]
    likelihood = factory()
    rng = np.random.default_rng(seed)
    f = (2.0 * rng.standard_normal((num_examples, num_outputs))).astype(dtype)
    if isinstance(likelihood, Gaussian):
        y = rng.standard_normal((num_examples, num_outputs)).astype(dtype)
    elif isinstance(likelihood, Categorical):
        y = rng.integers(0, num_outputs, size=num_examples)
    else:
        y = rng.integers(0, 2, size=num_examples)
    return likelihood, f, y


def _reference_log_prob(likelihood, y, f):
    """Return log p(y | f) [N] from a TFP distribution."""
    if isinstance(likelihood, Gaussian):
        scale = np.sqrt(np.broadcast_to(likelihood.noise_variance, f.shape))
        return tf.reduce_sum(tfd.Normal(loc=f, scale=scale).log_prob(y), axis=-1)
    if isinstance(likelihood, Categorical):
        return tfd.Categorical(logits=f).log_prob(y)
    # A tensor keeps TFP in float64, because TFP 0.25 casts NumPy float64 logits to float32.
    return tfd.Bernoulli(logits=tf.constant(f[:, 0])).log_prob(y.astype(f.dtype))


def _class_probabilities(likelihood, f):
    """Return the class probabilities [N, C] of logits f (Bernoulli as [1 - p, p])."""
    if isinstance(likelihood, Categorical):
        shifted = np.exp(f - f.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    p = 1.0 / (1.0 + np.exp(-f[:, 0]))
    return np.stack([1.0 - p, p], axis=1)


def _reference_kl(likelihood, f_p, f_q):
    """Return KL(p ‖ q) [N] as an explicit sum p log(p / q), or TFP's Normal KL."""
    if isinstance(likelihood, Gaussian):
        scale = np.sqrt(np.broadcast_to(likelihood.noise_variance, f_p.shape))
        kl = tfd.kl_divergence(tfd.Normal(f_p, scale), tfd.Normal(f_q, scale))
        return tf.reduce_sum(kl, axis=-1).numpy()
    p = _class_probabilities(likelihood, f_p)
    q = _class_probabilities(likelihood, f_q)
    return np.sum(p * np.log(p / q), axis=1)


def _autodiff_hessian_blocks(function, f):
    """Return the per-example Hessian blocks [N, O, O] of sum_n function(f)[n]."""
    f = tf.constant(f)
    with tf.GradientTape() as outer:
        outer.watch(f)
        with tf.GradientTape() as inner:
            inner.watch(f)
            total = tf.reduce_sum(function(f))
        gradient = inner.gradient(total, f)  # [N, O]
    return outer.batch_jacobian(gradient, f).numpy()  # [N, O, O]


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_log_prob_matches_tfp(case_id):
    """log_prob equals the log_prob of the matching TFP distribution."""
    likelihood, f, y = _make_case(case_id, seed=0)
    result = likelihood.log_prob(y, f)
    assert result.shape == (NUM_EXAMPLES,)
    np.testing.assert_allclose(result, _reference_log_prob(likelihood, y, f), rtol=1e-12)


def test_gaussian_per_output_noise_sums_columns():
    """A per-output Gaussian equals the sum of scalar Gaussians on each column."""
    likelihood, f, y = _make_case("gaussian_per_output", seed=1)
    expected = sum(
        Gaussian(variance).log_prob(y[:, [o]], f[:, [o]])
        for o, variance in enumerate(NOISE_VARIANCES)
    )
    np.testing.assert_allclose(likelihood.log_prob(y, f), expected, rtol=1e-12)


def test_gaussian_per_output_noise_kl_and_hessian():
    """Per-output noise divides output o by σ²_o in the KL and the Hessian."""
    likelihood, f, _ = _make_case("gaussian_per_output", seed=2)
    f_q = f + 1.0
    expected_kl = np.sum(1.0 / (2.0 * np.array(NOISE_VARIANCES)))
    np.testing.assert_allclose(likelihood.kl(f, f_q), np.full(NUM_EXAMPLES, expected_kl))
    np.testing.assert_allclose(
        likelihood.hessian_diag(f), np.tile(1.0 / np.array(NOISE_VARIANCES), (NUM_EXAMPLES, 1))
    )


@pytest.mark.parametrize(
    "convert",
    [lambda y: np.eye(4)[y], lambda y: y[:, None], lambda y: y.astype(np.float64)],
    ids=["one_hot", "ids_column", "float_ids"],
)
def test_categorical_log_prob_label_layouts(convert):
    """One-hot rows, an id column and float ids give the same log_prob as int ids."""
    likelihood, f, y = _make_case("categorical", seed=3)
    np.testing.assert_array_equal(likelihood.log_prob(convert(y), f), likelihood.log_prob(y, f))


def test_bernoulli_log_prob_label_column():
    """Bernoulli labels [N, 1] give the same log_prob as labels [N]."""
    likelihood, f, y = _make_case("bernoulli", seed=4)
    np.testing.assert_array_equal(likelihood.log_prob(y[:, None], f), likelihood.log_prob(y, f))


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_kl_matches_dense_reference(case_id):
    """The KL equals the explicit sum p log(p / q) (TFP's Normal KL for Gaussians)."""
    likelihood, f_p, _ = _make_case(case_id, seed=5)
    _, f_q, _ = _make_case(case_id, seed=6)
    result = likelihood.kl(f_p, f_q)
    assert result.shape == (NUM_EXAMPLES,)
    np.testing.assert_allclose(result, _reference_kl(likelihood, f_p, f_q), rtol=1e-10)


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_kl_zero_at_equal_outputs(case_id):
    """KL(f, f) = 0 for every example."""
    likelihood, f, _ = _make_case(case_id, seed=7)
    np.testing.assert_allclose(likelihood.kl(f, f), np.zeros(NUM_EXAMPLES), atol=1e-15)


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_kl_nonnegative(case_id):
    """KL(f_p, f_q) >= 0 on 200 random pairs of outputs."""
    likelihood, f_p, _ = _make_case(case_id, seed=8, num_examples=200)
    _, f_q, _ = _make_case(case_id, seed=9, num_examples=200)
    assert np.all(likelihood.kl(f_p, f_q).numpy() >= 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "likelihood, f_p, f_q, expected",
    [
        # p ≈ e_0 and log q_0 ≈ -1000, so KL ≈ 1000.
        (Categorical(), [[500.0, -500.0, 0.0]], [[-500.0, 500.0, 0.0]], [1000.0]),
        # p ≈ 1 and log q ≈ -500, so KL ≈ 500.
        (Bernoulli(), [[500.0]], [[-500.0]], [500.0]),
        (Bernoulli(), [[-500.0]], [[500.0]], [500.0]),
    ],
    ids=["categorical", "bernoulli_positive", "bernoulli_negative"],
)
def test_kl_stable_at_large_logits(likelihood, f_p, f_q, expected, dtype):
    """KL, log_prob and Hessians stay finite and accurate at logits of magnitude 500."""
    f_p = np.array(f_p, dtype=dtype)
    f_q = np.array(f_q, dtype=dtype)
    np.testing.assert_allclose(likelihood.kl(f_p, f_q), expected, rtol=1e-6)
    assert np.all(np.isfinite(likelihood.log_prob([0], f_q)))
    assert np.all(np.isfinite(likelihood.hessian_dense(f_q)))
    assert np.all(np.isfinite(likelihood.hessian_sqrt(f_q)))


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_hessian_dense_matches_autodiff(case_id):
    """hessian_dense equals the autodiff Hessian of -log p(y | f) w.r.t. f."""
    likelihood, f, y = _make_case(case_id, seed=10)
    expected = _autodiff_hessian_blocks(lambda f: -likelihood.log_prob(y, f), f)
    np.testing.assert_allclose(likelihood.hessian_dense(f), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_hessian_dense_matches_kl_second_derivative(case_id):
    """hessian_dense equals d²/df_q² KL(f_p, f_q) at f_q = f_p."""
    likelihood, f, _ = _make_case(case_id, seed=11)
    expected = _autodiff_hessian_blocks(lambda f_q: likelihood.kl(tf.constant(f), f_q), f)
    np.testing.assert_allclose(likelihood.hessian_dense(f), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_hessian_matmul_matches_dense(case_id):
    """hessian_matmul(f, v) equals the autodiff Hessian blocks times v."""
    likelihood, f, y = _make_case(case_id, seed=12)
    blocks = _autodiff_hessian_blocks(lambda f: -likelihood.log_prob(y, f), f)
    v = np.random.default_rng(13).standard_normal(f.shape)
    expected = np.einsum("nij,nj->ni", blocks, v)
    np.testing.assert_allclose(likelihood.hessian_matmul(f, v), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_hessian_matmul_broadcasts_leading_dims(case_id):
    """hessian_matmul with v [R, N, O] equals R separate products."""
    likelihood, f, _ = _make_case(case_id, seed=14)
    v = np.random.default_rng(15).standard_normal((3, *f.shape))
    result = likelihood.hessian_matmul(f, v)
    assert result.shape == v.shape
    for r in range(v.shape[0]):
        np.testing.assert_allclose(result[r], likelihood.hessian_matmul(f, v[r]), rtol=1e-14)


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_hessian_diag_matches_dense(case_id):
    """hessian_diag equals the diagonal of hessian_dense."""
    likelihood, f, _ = _make_case(case_id, seed=16)
    dense = likelihood.hessian_dense(f).numpy()
    np.testing.assert_allclose(likelihood.hessian_diag(f), np.diagonal(dense, axis1=1, axis2=2))


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_hessian_sqrt_squares_to_dense(case_id):
    """hessian_sqrt S satisfies S Sᵀ = hessian_dense for every example."""
    likelihood, f, _ = _make_case(case_id, seed=17)
    factor = likelihood.hessian_sqrt(f).numpy()
    product = np.einsum("nij,nkj->nik", factor, factor)
    np.testing.assert_allclose(product, likelihood.hessian_dense(f), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_grad_log_prob_matches_autodiff(case_id):
    """grad_log_prob equals the autodiff gradient of log p(y | f) w.r.t. f."""
    likelihood, f, y = _make_case(case_id, seed=18)
    f_tensor = tf.constant(f)
    with tf.GradientTape() as tape:
        tape.watch(f_tensor)
        total = tf.reduce_sum(likelihood.log_prob(y, f_tensor))
    expected = tape.gradient(total, f_tensor)
    np.testing.assert_allclose(likelihood.grad_log_prob(y, f), expected, rtol=1e-12, atol=1e-15)


def _call_all_methods(likelihood, y, f):
    """Return every method's result at (y, f) in a dict keyed by method name."""
    results = {name: getattr(likelihood, name)(f) for name in OUTPUT_METHODS}
    results["log_prob"] = likelihood.log_prob(y, f)
    results["grad_log_prob"] = likelihood.grad_log_prob(y, f)
    results["kl"] = likelihood.kl(f, f + 1.0)
    results["hessian_matmul"] = likelihood.hessian_matmul(f, tf.ones_like(f))
    return results


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_methods_keep_input_dtype(case_id, dtype):
    """Every method returns the dtype of f (float32 stays float32, float64 stays float64)."""
    likelihood, f, y = _make_case(case_id, seed=19, dtype=dtype.as_numpy_dtype)
    for name, result in _call_all_methods(likelihood, y, tf.constant(f)).items():
        assert result.dtype == dtype, name


def test_mixed_float_dtypes_use_wider_dtype():
    """Float32 and float64 inputs together compute in float64."""
    likelihood, f, y = _make_case("gaussian_scalar", seed=20, dtype=np.float32)
    assert likelihood.log_prob(y.astype(np.float64), f).dtype == tf.float64
    assert likelihood.kl(f, f.astype(np.float64)).dtype == tf.float64
    assert likelihood.hessian_matmul(f, f.astype(np.float64)).dtype == tf.float64


@pytest.mark.parametrize("case_id", CASE_IDS, ids=CASE_IDS)
def test_methods_match_inside_tf_function(case_id):
    """Every method gives the same result inside tf.function as eagerly."""
    likelihood, f, y = _make_case(case_id, seed=21)
    f = tf.constant(f)
    y = tf.constant(y)
    eager = _call_all_methods(likelihood, y, f)
    traced = tf.function(lambda y, f: _call_all_methods(likelihood, y, f))(y, f)
    for name, result in eager.items():
        np.testing.assert_allclose(traced[name], result, rtol=1e-14, err_msg=name)


@pytest.mark.parametrize(
    "noise_variance, error, match",
    [
        (0.0, ValueError, r"`noise_variance` must be finite and > 0; received \[?0\.0"),
        (-1.0, ValueError, r"`noise_variance` must be finite and > 0; received -1\.0"),
        (np.nan, ValueError, "`noise_variance` must be finite and > 0; received nan"),
        (np.inf, ValueError, "`noise_variance` must be finite and > 0; received inf"),
        ([1.0, 0.0], ValueError, r"`noise_variance` must be finite and > 0; received \[1"),
        ([[1.0]], ValueError, r"`noise_variance` must be a scalar .* shape \(1, 1\)"),
        ([], ValueError, r"`noise_variance` must be a scalar .* shape \(0,\)"),
        ("0.1", TypeError, "`noise_variance` must be a float .* type str"),
        (True, TypeError, "`noise_variance` must be a float .* type bool"),
        (None, TypeError, "`noise_variance` must be a float .* type NoneType"),
    ],
    ids=["zero", "negative", "nan", "inf", "vector_zero", "matrix", "empty", "string",
         "bool", "none"],
)
def test_gaussian_rejects_invalid_noise_variance(noise_variance, error, match):
    """Gaussian raises, naming `noise_variance`, for values that are not finite and > 0."""
    with pytest.raises(error, match=match):
        Gaussian(noise_variance)


def test_gaussian_rejects_noise_length_mismatch():
    """A per-output noise vector of the wrong length raises for f and for labels."""
    likelihood = Gaussian([0.1, 0.2])
    with pytest.raises(ValueError, match=r"`noise_variance` has 2 .* `f` has O=3"):
        likelihood.log_prob(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"`noise_variance` has 2 .* num_outputs=3"):
        likelihood.validate_labels(np.zeros((2, 3)), num_outputs=3)


@pytest.mark.parametrize(
    "likelihood, method, arguments, error, match",
    [
        (Categorical(), "hessian_diag", [np.zeros((2, 3), np.int32)], TypeError,
         "`f` must be a float tensor; received dtype int32"),
        (Categorical(), "hessian_diag", [np.zeros(3)], ValueError,
         r"`f` must be \[N, O\] .* f.shape=\(3,\)"),
        (Bernoulli(), "hessian_diag", [np.zeros((2, 2))], ValueError,
         r"`f` must be \[N, 1\] .* O=2 outputs"),
        (Categorical(), "kl", [np.zeros((2, 3)), np.zeros((2, 4))], ValueError,
         r"`f_q` must have the shape of `f_p`, \(2, 3\); received f_q.shape=\(2, 4\)"),
        (Categorical(), "hessian_matmul", [np.zeros((2, 3)), np.zeros((2, 4))], ValueError,
         r"`v` must be \[..., N, O\] .* v.shape=\(2, 4\)"),
        (Categorical(), "hessian_matmul", [np.zeros((2, 3)), np.zeros(3)], ValueError,
         r"`v` must be \[..., N, O\] .* v.shape=\(3,\)"),
        (Gaussian(), "log_prob", [np.zeros((2, 3), np.int64), np.zeros((2, 3))], TypeError,
         "`y` must be a float tensor; received dtype int64"),
        (Gaussian(), "log_prob", [np.zeros((2, 1)), np.zeros((2, 3))], ValueError,
         r"`y` must have the shape of `f`, \(2, 3\); received y.shape=\(2, 1\)"),
    ],
    ids=["int_f", "rank1_f", "bernoulli_two_logits", "kl_shapes", "v_shape", "v_rank",
         "gaussian_int_y", "gaussian_y_shape"],
)
def test_methods_reject_invalid_inputs(likelihood, method, arguments, error, match):
    """Methods raise, naming the argument, for wrong dtypes and static shapes."""
    with pytest.raises(error, match=match):
        getattr(likelihood, method)(*arguments)


@pytest.mark.parametrize(
    "likelihood, y, num_outputs, expected",
    [
        (Categorical(), np.array([0, 2, 1]), 3, [0, 2, 1]),
        (Categorical(), np.array([0.0, 2.0, 1.0]), 3, [0, 2, 1]),
        (Categorical(), np.array([[0], [2], [1]]), 3, [0, 2, 1]),
        (Categorical(), np.eye(3)[[0, 2, 1]], 3, [0, 2, 1]),
        (Categorical(), tf.constant([0, 2, 1]), 3, [0, 2, 1]),
        (Bernoulli(), np.array([[1], [0], [1]]), 1, [1, 0, 1]),
        (Bernoulli(), np.array([True, False, True]), 1, [1, 0, 1]),
        (Bernoulli(), np.array([1.0, 0.0, 1.0]), 1, [1, 0, 1]),
    ],
    ids=["ids", "float_ids", "ids_column", "one_hot", "tensor", "bernoulli_column",
         "bernoulli_bool", "bernoulli_float"],
)
def test_validate_labels_returns_int_ids(likelihood, y, num_outputs, expected):
    """validate_labels returns int64 class ids [N] for every accepted layout."""
    result = likelihood.validate_labels(y, num_outputs, num_examples=3)
    assert result.dtype == np.int64
    np.testing.assert_array_equal(result, expected)


def test_validate_labels_keeps_gaussian_targets():
    """validate_labels returns Gaussian targets [N, O] unchanged."""
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    result = Gaussian([1.0, 2.0]).validate_labels(y, num_outputs=2, num_examples=3)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, y)


@pytest.mark.parametrize(
    "likelihood, y, num_outputs, error, match",
    [
        (Categorical(), [0.0, 1.5, 2.0], 3, ValueError,
         "`y` must contain integer class ids; received the non-integer value 1.5 at index 1"),
        (Categorical(), [0.0, np.nan], 3, ValueError,
         "`y` must contain integer class ids; received the non-integer value nan"),
        (Categorical(), [0, 3, 1], 3, ValueError,
         r"`y` must contain class ids in \[0, 3\) .* 1 id\(s\) outside, e.g. 3 at index 1"),
        (Categorical(), [-1, 0, 1], 3, ValueError,
         r"`y` must contain class ids in \[0, 3\) .* e.g. -1 at index 0"),
        (Categorical(), [[1, 1, 0], [0, 0, 1]], 3, ValueError,
         r"`y` of shape \[N, O\] must contain one-hot rows .* row 0 = \[1, 1, 0\]"),
        (Categorical(), [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], 3, ValueError,
         r"`y` of shape \[N, O\] must contain one-hot rows .* row 1 = \[0.5, 0.5, 0.0\]"),
        (Categorical(), np.zeros((2, 2)), 3, ValueError,
         r"`y` must be class ids \[N\] or one-hot rows .* O=3; received y.shape=\(2, 2\)"),
        (Categorical(), [0, 1], 1, ValueError,
         r"`num_outputs` >= 2 .* num_outputs=1\. For binary labels .* 'bernoulli'"),
        (Categorical(), [True, False], 3, TypeError,
         "`y` must contain integer class ids or one-hot rows; received dtype bool"),
        (Categorical(), ["a", "b"], 3, TypeError,
         "`y` must contain integer class ids or one-hot rows; received dtype <U1"),
        (Bernoulli(), [0, 2, 1], 1, ValueError,
         r"`y` must contain only 0 and 1 .* 1 other value\(s\), e.g. 2 at index 1"),
        (Bernoulli(), [0.0, 0.5], 1, ValueError,
         r"`y` must contain only 0 and 1 .* e.g. 0.5 at index 1"),
        (Bernoulli(), [0, 1], 3, ValueError,
         r"one logit per example, but the model has num_outputs=3\. For 3 classes use"),
        (Bernoulli(), np.zeros((2, 2)), 1, ValueError,
         r"`y` must be \[N\] or \[N, 1\] .* y.shape=\(2, 2\)"),
        (Gaussian(), np.zeros((2, 1), np.int64), 1, TypeError,
         r"`y` must contain float regression targets; received dtype int64\. Cast it"),
        (Gaussian(), np.zeros(2), 1, ValueError,
         r"`y` must be \[N, O\] with O=1 .* y.shape=\(2,\)\. Pass y\[:, None\]"),
        (Gaussian(), [[0.0], [np.inf]], 1, ValueError,
         r"`y` must be finite; received 1 NaN or Inf value\(s\)"),
        (Gaussian(), np.zeros((0, 1)), 1, ValueError,
         r"`y` must contain at least one example .* y.shape=\(0, 1\)"),
    ],
    ids=["non_integer", "nan_id", "id_too_large", "negative_id", "two_ones",
         "fractional_row", "wrong_width", "one_class", "bool_ids", "string_ids",
         "bernoulli_two", "bernoulli_fraction", "bernoulli_three_outputs",
         "bernoulli_matrix", "gaussian_int", "gaussian_rank1", "gaussian_inf",
         "empty"],
)
def test_validate_labels_rejects_invalid(likelihood, y, num_outputs, error, match):
    """validate_labels raises, naming `y` or `num_outputs`, for invalid labels."""
    with pytest.raises(error, match=match):
        likelihood.validate_labels(np.asarray(y), num_outputs)


def test_validate_labels_checks_num_examples():
    """validate_labels raises, naming the argument, when N differs from num_examples."""
    match = r"`labels` must contain num_examples=4 examples; received labels.shape=\(3,\)"
    with pytest.raises(ValueError, match=match):
        Categorical().validate_labels([0, 1, 2], 3, num_examples=4, arg_name="labels")


@pytest.mark.parametrize("name", LIKELIHOOD_NAMES, ids=LIKELIHOOD_NAMES)
def test_get_likelihood_from_name(name):
    """get_likelihood turns each name into an instance with that name."""
    likelihood = get_likelihood(name)
    assert isinstance(likelihood, Likelihood)
    assert likelihood.name == name


def test_get_likelihood_returns_instance_unchanged():
    """get_likelihood returns a Likelihood instance as it is."""
    likelihood = Gaussian([0.1, 0.2])
    assert get_likelihood(likelihood) is likelihood


@pytest.mark.parametrize(
    "likelihood, error, match",
    [
        ("poisson", ValueError,
         "`likelihood` must be one of 'gaussian', 'categorical', 'bernoulli'; received 'poisson'"),
        ("Gaussian", ValueError, "`likelihood` must be one of .* received 'Gaussian'"),
        (3, TypeError, "`likelihood` must be one of .* received 3 of type int"),
        (Gaussian, TypeError, r"received the class Gaussian\. Pass an instance, e.g. Gaussian\(\)"),
    ],
    ids=["unknown_name", "capitalised_name", "int", "class"],
)
def test_get_likelihood_rejects_invalid(likelihood, error, match):
    """get_likelihood raises, naming `likelihood` and the valid names, for other values."""
    with pytest.raises(error, match=match):
        get_likelihood(likelihood)


@pytest.mark.parametrize(
    "likelihood",
    [Gaussian(0.5), Gaussian(NOISE_VARIANCES), Categorical(), Bernoulli()],
    ids=["gaussian_scalar", "gaussian_per_output", "categorical", "bernoulli"],
)
def test_likelihood_config_round_trip(likelihood):
    """from_config(get_config()) rebuilds an equal likelihood, also through Keras."""
    import keras

    rebuilt = type(likelihood).from_config(likelihood.get_config())
    assert repr(rebuilt) == repr(likelihood)
    deserialized = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(likelihood)
    )
    assert repr(deserialized) == repr(likelihood)


def test_gaussian_noise_variance_property():
    """noise_variance returns a float for scalar noise and a copy of a vector."""
    assert Gaussian(0.5).noise_variance == 0.5
    assert Gaussian(0.5).num_outputs is None
    likelihood = Gaussian(NOISE_VARIANCES)
    likelihood.noise_variance[0] = 100.0
    np.testing.assert_array_equal(likelihood.noise_variance, NOISE_VARIANCES)
    assert likelihood.num_outputs == 3
