"""Tests for tf_linntk.fisher against a dense Σ Jᵢᵀ Hᵢ Jᵢ built with `tape.jacobian`."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tests import reference
from tf_linntk import autodiff
from tf_linntk import fisher
from tf_linntk.likelihoods import Bernoulli
from tf_linntk.likelihoods import Categorical
from tf_linntk.likelihoods import Gaussian

NUM_EXAMPLES = 7
BATCH_SIZE = 3  # Smaller than NUM_EXAMPLES, so products stream over 3 chunks.

# (likelihood factory, number of outputs O) per likelihood case.
LIKELIHOODS = {
    "gaussian": (lambda: Gaussian(0.5), 3),
    "gaussian_per_output": (lambda: Gaussian([0.5, 1.0, 2.0]), 3),
    "categorical": (Categorical, 3),
    "bernoulli": (Bernoulli, 1),
}
EXACT_METHODS = ["ggn", "autodiff"]
DIFFERENCE_METHODS = ["finite_difference", "central_difference"]

# Float32 bounds on ‖F v − F_ggn v‖/‖F_ggn v‖ with the default ε on the tanh
# networks below (measured: at most 1.2e-3 forward and 1.5e-4 central).
FLOAT32_TOLERANCE = {"finite_difference": 2e-3, "central_difference": 2e-4}
# ReLU kinks crossed by the step add O(ε) error to both variants. This MLP
# measured 4.6e-4 forward and 6e-5 central, but larger ReLU MLPs reach 1.5e-3
# and 3.9e-3 (see `FisherOperator`), hence the looser documented bounds.
RELU_TOLERANCE = {"finite_difference": 5e-3, "central_difference": 1e-2}


@functools.cache
def _setup(kind="mlp", dtype="float64", num_outputs=3, activation="tanh"):
    """Return (Keras model, LinearizedModel, inputs x) for one small network."""
    keras.utils.set_random_seed(0)
    with reference.keras_float_dtype(dtype):
        if kind == "mlp":
            model = keras.Sequential([
                keras.Input((4,)),
                keras.layers.Dense(6, activation=activation),
                keras.layers.Dense(5, activation=activation),
                keras.layers.Dense(num_outputs),
            ])
            x = np.random.default_rng(1).standard_normal((NUM_EXAMPLES, 4))
        else:
            model = keras.Sequential([
                keras.Input((6, 6, 1)),
                keras.layers.Conv2D(3, 3, activation=activation),
                keras.layers.Conv2D(2, 3, activation=activation),
                keras.layers.Flatten(),
                keras.layers.Dense(num_outputs),
            ])
            x = np.random.default_rng(1).standard_normal((NUM_EXAMPLES, 6, 6, 1))
    lin = tf_linntk.LinearizedModel(model, batch_size=BATCH_SIZE)
    return model, lin, x.astype(dtype)


def _case(likelihood_id, kind="mlp", dtype="float64", activation="tanh"):
    """Return (model, lin, x, likelihood) for a likelihood case."""
    factory, num_outputs = LIKELIHOODS[likelihood_id]
    model, lin, x = _setup(kind, dtype, num_outputs, activation)
    return model, lin, x, factory()


def _dense_fisher(model, x, likelihood, outputs=None):
    """Return Σᵢ Jᵢᵀ Hᵢ Jᵢ [P, P] from the Keras model's own Jacobian."""
    network_outputs, jacobian = _jacobian(model, x)  # [N, O], [N, O, P]
    hessians = likelihood.hessian_dense(network_outputs if outputs is None else outputs)
    return np.einsum("nop,noq,nqr->pr", jacobian, hessians, jacobian)


_JACOBIANS = {}


def _jacobian(model, x):
    """Return the outputs [N, O] and `reference.dense_jacobian` [N, O, P], cached per model."""
    if id(model) not in _JACOBIANS:
        outputs = reference.flat_outputs(model, x).numpy()
        # The model is kept in the entry so that its id is not reused.
        _JACOBIANS[id(model)] = (model, outputs, reference.dense_jacobian(model, x))
    return _JACOBIANS[id(model)][1:]


def _vectors(lin, num_columns, dtype="float64", seed=2):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((lin.num_parameters, num_columns)).astype(dtype)


def _relative_error(actual, expected):
    """Return the largest column-wise ‖actual − expected‖ / ‖expected‖."""
    actual = np.reshape(actual, (np.shape(actual)[0], -1))
    expected = np.reshape(expected, (np.shape(expected)[0], -1))
    errors = np.linalg.norm(actual - expected, axis=0) / np.linalg.norm(expected, axis=0)
    return float(np.max(errors))


# ---------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("likelihood_id", list(LIKELIHOODS), ids=list(LIKELIHOODS))
@pytest.mark.parametrize("method", EXACT_METHODS, ids=EXACT_METHODS)
def test_fisher_exact_methods_match_dense(method, likelihood_id):
    """In float64, "ggn" and "autodiff" products equal the dense Σ Jᵀ H J to 1e-8."""
    model, lin, x, likelihood = _case(likelihood_id)
    dense = _dense_fisher(model, x, likelihood)
    vectors = _vectors(lin, 2)
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)

    np.testing.assert_allclose(operator.matmul(vectors), dense @ vectors, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", fisher.METHODS, ids=list(fisher.METHODS))
def test_fisher_matvec_matches_dense(method):
    """The single-vector path (matvec) matches the dense F v."""
    model, lin, x, likelihood = _case("categorical")
    dense = _dense_fisher(model, x, likelihood)
    vector = _vectors(lin, 1)
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)

    assert _relative_error(operator.matvec(vector[:, 0])[:, None], dense @ vector) < 1e-6


@pytest.mark.parametrize("likelihood_id", list(LIKELIHOODS), ids=list(LIKELIHOODS))
@pytest.mark.parametrize("method", DIFFERENCE_METHODS, ids=DIFFERENCE_METHODS)
def test_fisher_differences_match_dense_float64(method, likelihood_id):
    """In float64, finite-difference products are within 1e-6 (relative) of the dense F v."""
    model, lin, x, likelihood = _case(likelihood_id)
    dense = _dense_fisher(model, x, likelihood)
    vectors = _vectors(lin, 2)
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)

    assert _relative_error(operator.matmul(vectors), dense @ vectors) < 1e-6


@pytest.mark.parametrize("likelihood_id", ["gaussian", "categorical", "bernoulli"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", DIFFERENCE_METHODS, ids=DIFFERENCE_METHODS)
def test_fisher_differences_accuracy_float32(method, kind, likelihood_id):
    """In float32 on tanh networks, F v is within 2e-3 (forward) or 2e-4 (central) of the GGN."""
    model, lin, x, likelihood = _case(likelihood_id, kind, "float32")
    exact = _dense_fisher(model, x, likelihood)
    vectors = _vectors(lin, 2, "float32")
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)

    error = _relative_error(operator.matmul(vectors), exact @ vectors)
    assert error < FLOAT32_TOLERANCE[method]


@pytest.mark.parametrize("method", DIFFERENCE_METHODS, ids=DIFFERENCE_METHODS)
def test_fisher_differences_accuracy_relu_float32(method):
    """On a ReLU MLP in float32, F v stays within the looser documented bound."""
    model, lin, x, likelihood = _case("categorical", "mlp", "float32", "relu")
    exact = _dense_fisher(model, x, likelihood)
    vectors = _vectors(lin, 2, "float32")
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)

    assert _relative_error(operator.matmul(vectors), exact @ vectors) < RELU_TOLERANCE[method]


@pytest.mark.parametrize("method", fisher.METHODS, ids=list(fisher.METHODS))
def test_fisher_given_outputs_set_hessians(method):
    """With `outputs`, the Hessians are taken there: F = Σ Jᵀ H(outputs) J."""
    model, lin, x, likelihood = _case("categorical")
    outputs = np.random.default_rng(3).standard_normal((NUM_EXAMPLES, 3))
    dense = _dense_fisher(model, x, likelihood, outputs)
    vectors = _vectors(lin, 2)
    operator = fisher.fisher_operator(lin, x, likelihood, method, None, outputs=outputs)

    assert _relative_error(operator.matmul(vectors), dense @ vectors) < 1e-6


@pytest.mark.parametrize("method", DIFFERENCE_METHODS, ids=DIFFERENCE_METHODS)
def test_fisher_epsilon_sets_step(method):
    """A given `epsilon` is used: a step of 0.3 gives a visibly larger error than the default."""
    model, lin, x, likelihood = _case("gaussian")
    dense = _dense_fisher(model, x, likelihood)
    vectors = _vectors(lin, 2)
    operator = fisher.fisher_operator(lin, x, likelihood, method, 0.3)

    assert operator.epsilon == 0.3
    assert _relative_error(operator.matmul(vectors), dense @ vectors) > 1e-5


# ---------------------------------------------------------------------- operator properties


@pytest.mark.parametrize("method", fisher.METHODS, ids=list(fisher.METHODS))
def test_fisher_operator_is_symmetric(method):
    """⟨u, F v⟩ = ⟨F u, v⟩ on random vectors (to the method's accuracy)."""
    _, lin, x, likelihood = _case("categorical")
    vectors = _vectors(lin, 2)
    products = fisher.fisher_operator(lin, x, likelihood, method, None).matmul(vectors).numpy()

    left = vectors[:, 0] @ products[:, 1]
    right = products[:, 0] @ vectors[:, 1]
    np.testing.assert_allclose(left, right, rtol=1e-6)


@pytest.mark.parametrize("method", fisher.METHODS, ids=list(fisher.METHODS))
def test_fisher_operator_is_positive_semidefinite(method):
    """⟨v, F v⟩ >= 0 on random vectors."""
    _, lin, x, likelihood = _case("bernoulli")
    vectors = _vectors(lin, 2, seed=5)
    products = fisher.fisher_operator(lin, x, likelihood, method, None).matmul(vectors).numpy()

    quadratic_forms = np.sum(vectors * products, axis=0)
    assert np.all(quadratic_forms >= 0.0), quadratic_forms


@pytest.mark.parametrize("method", fisher.METHODS, ids=list(fisher.METHODS))
def test_fisher_matvec_scales_linearly(method):
    """F (c v) = c F v, also for the normalized finite-difference step."""
    _, lin, x, likelihood = _case("categorical")
    vector = _vectors(lin, 1)[:, 0]
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)

    scaled = operator.matvec(-250.0 * vector).numpy()[:, None]
    expected = -250.0 * operator.matvec(vector).numpy()[:, None]
    # The unit step v/‖v‖ can differ in its last bit for c·v, which moves a
    # finite-difference product by about its own error (3e-8 here).
    tolerance = 1e-12 if method in EXACT_METHODS else 1e-7
    assert _relative_error(scaled, expected) < tolerance


@pytest.mark.parametrize("method", fisher.METHODS, ids=list(fisher.METHODS))
def test_fisher_zero_vector_gives_zero(method):
    """F 0 is exactly zero, never NaN."""
    _, lin, x, likelihood = _case("categorical")
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)

    product = operator.matvec(tf.zeros([lin.num_parameters], tf.float64)).numpy()

    np.testing.assert_array_equal(product, np.zeros(lin.num_parameters))


@pytest.mark.parametrize("method", fisher.METHODS, ids=list(fisher.METHODS))
def test_fisher_matmul_zero_column_gives_zero_column(method):
    """A zero column in a batched matmul gives an exact zero column; the others match matvec."""
    _, lin, x, likelihood = _case("categorical")
    vectors = _vectors(lin, 2)
    vectors[:, 1] = 0.0
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)

    products = operator.matmul(vectors).numpy()

    np.testing.assert_array_equal(products[:, 1], np.zeros(lin.num_parameters))
    np.testing.assert_allclose(
        products[:, 0], operator.matvec(vectors[:, 0]), rtol=1e-7, atol=1e-12
    )


def test_fisher_matmul_tiny_vector_not_flushed_to_zero():
    """A vector of norm 1e-200 (its squares underflow) still gives F v, not zero."""
    model, lin, x, likelihood = _case("categorical")
    dense = _dense_fisher(model, x, likelihood)
    vector = 1e-200 * _vectors(lin, 1)[:, 0]
    operator = fisher.fisher_operator(lin, x, likelihood, "finite_difference", None)

    # Rescale before comparing, because NumPy's norm of 1e-200 values underflows too.
    product = 1e200 * operator.matvec(vector).numpy()
    assert _relative_error(product[:, None], 1e200 * (dense @ vector)[:, None]) < 1e-6


def test_fisher_matmul_batch_dimensions_and_adjoint_arg():
    """Leading batch dimensions [B, P, R] and `adjoint_arg` work in matmul."""
    model, lin, x, likelihood = _case("gaussian")
    dense = _dense_fisher(model, x, likelihood)
    batch = np.stack([_vectors(lin, 1, seed=6), _vectors(lin, 1, seed=7)])  # [2, P, 1]
    columns = batch[:, :, 0].T  # [P, 2]
    operator = fisher.fisher_operator(lin, x, likelihood, "ggn", None)

    np.testing.assert_allclose(operator.matmul(batch), dense @ batch, rtol=1e-8)
    np.testing.assert_allclose(
        operator.matmul(columns.T, adjoint_arg=True), dense @ columns, rtol=1e-8
    )


@pytest.mark.parametrize("likelihood_id", ["gaussian_per_output", "categorical", "bernoulli"])
def test_fisher_diag_part_matches_dense(likelihood_id):
    """diag_part() equals the diagonal of the dense Σ Jᵀ H J."""
    model, lin, x, likelihood = _case(likelihood_id)
    dense = _dense_fisher(model, x, likelihood)
    operator = fisher.fisher_operator(lin, x, likelihood, "finite_difference", None)

    np.testing.assert_allclose(operator.diag_part(), np.diag(dense), rtol=1e-10, atol=1e-14)


def test_fisher_to_dense_matches_dense():
    """to_dense() equals the dense Σ Jᵀ H J at the given outputs."""
    model, lin, x, likelihood = _case("categorical")
    outputs = np.random.default_rng(4).standard_normal((NUM_EXAMPLES, 3))
    dense = _dense_fisher(model, x, likelihood, outputs)
    operator = fisher.fisher_operator(lin, x, likelihood, "ggn", None, outputs=outputs)

    np.testing.assert_allclose(operator.to_dense(), dense, rtol=1e-10, atol=1e-14)


def test_fisher_diag_small_jacobian_chunks(monkeypatch):
    """diag_part() and to_dense() are exact with Jacobian chunks of 2 rows, below `batch_size`."""
    model, _, x = _setup()
    likelihood = Categorical()
    lin = tf_linntk.LinearizedModel(model, batch_size=BATCH_SIZE)
    row_bytes = lin.functional.num_outputs * lin.num_parameters * 8  # float64
    # A fresh model traces its products under the patched budget of 2 rows per chunk.
    monkeypatch.setattr(autodiff, "JACOBIAN_CHUNK_BYTES", 2 * row_bytes)
    dense = _dense_fisher(model, x, likelihood)
    operator = fisher.fisher_operator(lin, x, likelihood, "ggn", None)

    assert lin.functional._jacobian_rows() == 2
    np.testing.assert_allclose(operator.diag_part(), np.diag(dense), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(operator.to_dense(), dense, rtol=1e-10, atol=1e-14)


def test_fisher_to_dense_rejects_large():
    """to_dense() raises above the model's `max_dense_bytes`."""
    model, _, x = _setup()
    lin = tf_linntk.LinearizedModel(model, batch_size=BATCH_SIZE, max_dense_bytes=64)
    operator = fisher.fisher_operator(lin, x, "gaussian", "ggn", None)

    with pytest.raises(ValueError, match="`to_dense`.*max_dense_bytes"):
        operator.to_dense()


def test_fisher_matmul_rejects_wrong_rows():
    """A right-hand side without P rows raises, naming `x` and both shapes."""
    _, lin, x, likelihood = _case("gaussian")
    operator = fisher.fisher_operator(lin, x, likelihood, "ggn", None)

    size = lin.num_parameters
    with pytest.raises(ValueError, match=rf"`x` must be \[\.\.\., P, R\] with P={size}.*\({size - 1}, 2\)"):
        operator.matmul(np.ones((size - 1, 2)))


def test_fisher_operator_shape_and_flags():
    """The operator is [P, P] in the model's dtype, square and self-adjoint."""
    _, lin, x, _ = _case("gaussian")
    operator = fisher.fisher_operator(lin, x, "gaussian", "ggn", None)

    assert operator.shape == (lin.num_parameters, lin.num_parameters)
    assert operator.dtype == tf.float64
    assert operator.is_self_adjoint
    assert operator.is_square
    assert operator.is_positive_definite is None
    assert operator.method == "ggn"
    assert operator.epsilon is None


def test_fisher_matvec_inside_tf_function():
    """A matvec inside a user's `tf.function` matches the eager result."""
    _, lin, x, likelihood = _case("categorical")
    vector = _vectors(lin, 1)[:, 0]
    operator = fisher.fisher_operator(lin, x, likelihood, "finite_difference", None)

    compiled = tf.function(operator.matvec)

    np.testing.assert_allclose(compiled(tf.constant(vector)), operator.matvec(vector), rtol=1e-12)


def test_fisher_products_do_not_retrace():
    """Repeated products, and a new operator with other outputs, reuse one trace."""
    _, lin, x, likelihood = _case("bernoulli")
    vectors = _vectors(lin, 3)
    first = fisher.fisher_operator(lin, x, likelihood, "central_difference", None)
    for column in range(3):
        first.matvec(vectors[:, column])
    outputs = np.random.default_rng(8).standard_normal((NUM_EXAMPLES, 1))
    second = fisher.fisher_operator(lin, x, likelihood, "central_difference", None, outputs)
    second.matvec(vectors[:, 0])
    second.matvec(vectors[:, 1])

    assert first._products is second._products
    # One trace without the output shift and one with it.
    assert first._products.single.experimental_get_tracing_count() == 2


def test_fisher_one_example_matches_dense():
    """With N = 1 the operator is J₁ᵀ H₁ J₁."""
    model, lin, x, likelihood = _case("categorical")
    x = x[:1]
    jacobian = reference.dense_jacobian(model, x)  # [1, O, P]
    hessian = likelihood.hessian_dense(reference.flat_outputs(model, x))  # [1, O, O]
    vectors = _vectors(lin, 2)
    operator = fisher.fisher_operator(lin, x, likelihood, "finite_difference", None)

    expected = np.einsum("nop,noq,nqr->pr", jacobian, hessian, jacobian) @ vectors
    assert _relative_error(operator.matmul(vectors), expected) < 1e-6


def test_fisher_no_examples_gives_zero():
    """With N = 0 the operator is zero."""
    _, lin, x, likelihood = _case("categorical")
    vectors = _vectors(lin, 2)
    operator = fisher.fisher_operator(lin, x[:0], likelihood, "finite_difference", None)

    np.testing.assert_array_equal(operator.matmul(vectors), np.zeros_like(vectors))


def test_fisher_dict_inputs_match_dense():
    """A two-input functional model with dict inputs gives the dense GGN product."""
    keras.utils.set_random_seed(0)
    with reference.keras_float_dtype("float64"):
        left, right = keras.Input((2,), name="left"), keras.Input((3,), name="right")
        hidden = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([left, right]))
        model = keras.Model({"left": left, "right": right}, keras.layers.Dense(2)(hidden))
    rng = np.random.default_rng(9)
    x = {"left": rng.standard_normal((5, 2)), "right": rng.standard_normal((5, 3))}
    lin = tf_linntk.LinearizedModel(model, batch_size=2)
    dense = _dense_fisher(model, x, Gaussian(1.0))
    vectors = _vectors(lin, 2)

    operator = fisher.fisher_operator(lin, x, "gaussian", "finite_difference", None)

    assert _relative_error(operator.matmul(vectors), dense @ vectors) < 1e-6


# ---------------------------------------------------------------------- the wrapped model


@pytest.mark.parametrize("method", fisher.METHODS, ids=list(fisher.METHODS))
def test_fisher_products_leave_weights_unchanged(method):
    """The wrapped model's weights are bit-identical after products and after a failing one."""
    model, lin, x, likelihood = _case("categorical")
    before = reference.variable_values(model)
    operator = fisher.fisher_operator(lin, x, likelihood, method, None)
    operator.matmul(_vectors(lin, 2))
    operator.diag_part()

    with pytest.raises(ValueError, match=rf"`x` must be \[\.\.\., P\] with P={lin.num_parameters}"):
        operator.matvec(np.ones(lin.num_parameters + 1))

    reference.assert_variables_unchanged(model, before)


# ---------------------------------------------------------------------- defaults and validation


@pytest.mark.parametrize(
    "method, dtype, expected",
    [
        ("finite_difference", tf.float32, 0.75 * np.finfo(np.float32).eps ** 0.5 * 3.0),
        ("central_difference", tf.float32, 0.2 * np.finfo(np.float32).eps ** (1 / 3) * 3.0),
        ("finite_difference", tf.float64, 0.75 * np.finfo(np.float64).eps ** 0.5 * 3.0),
        ("central_difference", tf.float64, 0.2 * np.finfo(np.float64).eps ** (1 / 3) * 3.0),
    ],
    ids=["forward_float32", "central_float32", "forward_float64", "central_float64"],
)
def test_default_epsilon_follows_rule(method, dtype, expected):
    """default_epsilon is scale·eps^power·(1 + ‖θ₀‖)."""
    np.testing.assert_allclose(fisher.default_epsilon(method, dtype, 2.0), expected, rtol=1e-12)


def test_fisher_default_epsilon_uses_parameter_norm():
    """The operator's default ε uses ‖θ₀‖ of the linearized parameters."""
    _, lin, x, _ = _case("gaussian")
    norm = float(tf.norm(lin.functional.flatten(lin.functional.params0)))
    operator = fisher.fisher_operator(lin, x, "gaussian", "finite_difference", None)

    assert operator.epsilon == fisher.default_epsilon("finite_difference", tf.float64, norm)


def test_default_epsilon_rejects_exact_method():
    """default_epsilon raises for a method without a step."""
    with pytest.raises(ValueError, match="`method` must be one of"):
        fisher.default_epsilon("ggn", tf.float32)


def test_fisher_rejects_unknown_method():
    """An unknown method raises, listing the options."""
    _, lin, x, _ = _case("gaussian")
    with pytest.raises(ValueError, match="`method` must be one of 'finite_difference', "
                                         "'central_difference', 'autodiff', 'ggn'"):
        fisher.fisher_operator(lin, x, "gaussian", "hessian", None)


@pytest.mark.parametrize("epsilon", [0.0, -1e-3, float("nan"), float("inf")],
                         ids=["zero", "negative", "nan", "inf"])
def test_fisher_rejects_invalid_epsilon(epsilon):
    """An epsilon <= 0 or non-finite raises, naming `epsilon`."""
    _, lin, x, _ = _case("gaussian")
    with pytest.raises(ValueError, match="`epsilon` must be a finite float > 0"):
        fisher.fisher_operator(lin, x, "gaussian", "finite_difference", epsilon)


def test_fisher_rejects_epsilon_of_wrong_type():
    """A non-numeric epsilon raises TypeError."""
    _, lin, x, _ = _case("gaussian")
    with pytest.raises(TypeError, match="`epsilon` must be a positive float"):
        fisher.fisher_operator(lin, x, "gaussian", "central_difference", "1e-3")


def test_fisher_rejects_epsilon_for_exact_method():
    """An epsilon with "ggn" raises instead of being ignored."""
    _, lin, x, _ = _case("gaussian")
    with pytest.raises(ValueError, match="`epsilon` applies only to"):
        fisher.fisher_operator(lin, x, "gaussian", "ggn", 1e-3)


def test_fisher_rejects_outputs_of_wrong_shape():
    """Outputs that are not [N, O] raise, naming both shapes."""
    _, lin, x, _ = _case("gaussian")
    with pytest.raises(ValueError, match=r"`outputs` must be \[N, O\] with N=7.*O=3.*\(7, 2\)"):
        fisher.fisher_operator(lin, x, "gaussian", "ggn", None, outputs=np.zeros((7, 2)))


def test_fisher_rejects_integer_outputs():
    """Integer outputs raise TypeError."""
    _, lin, x, _ = _case("gaussian")
    with pytest.raises(TypeError, match="`outputs` must be a float tensor"):
        fisher.fisher_operator(lin, x, "gaussian", "ggn", None, outputs=np.zeros((7, 3), int))


def test_fisher_rejects_non_finite_outputs():
    """Outputs with NaN raise, naming `outputs`."""
    _, lin, x, _ = _case("gaussian")
    outputs = np.zeros((7, 3))
    outputs[2, 1] = np.nan
    with pytest.raises(ValueError, match="`outputs` must be finite"):
        fisher.fisher_operator(lin, x, "gaussian", "ggn", None, outputs=outputs)


@pytest.mark.parametrize(
    "likelihood, num_outputs, message",
    [
        (Bernoulli(), 3, "`likelihood` Bernoulli.* needs O=1"),
        ("bernoulli", 3, "`likelihood` Bernoulli.* needs O=1"),
        (Categorical(), 1, "`likelihood` 'categorical' needs O >= 2"),
        (Gaussian([1.0, 2.0]), 3, "`likelihood` Gaussian.* needs O=2"),
    ],
    ids=["bernoulli_instance", "bernoulli_name", "categorical_one_logit", "gaussian_noise_length"],
)
def test_fisher_rejects_likelihood_not_fitting_outputs(likelihood, num_outputs, message):
    """A likelihood that does not fit the model's O raises, naming `likelihood`."""
    _, lin, x = _setup(num_outputs=num_outputs)
    with pytest.raises(ValueError, match=message):
        fisher.fisher_operator(lin, x, likelihood, "ggn", None)


def test_fisher_rejects_unknown_likelihood():
    """An unknown likelihood name raises, naming `likelihood`."""
    _, lin, x, _ = _case("gaussian")
    with pytest.raises(ValueError, match="`likelihood` must be one of"):
        fisher.fisher_operator(lin, x, "poisson", "ggn", None)


def test_fisher_rejects_inputs_of_wrong_shape():
    """Inputs that do not fit the model raise before any product."""
    _, lin, _, _ = _case("gaussian")
    with pytest.raises(ValueError, match="`x`"):
        fisher.fisher_operator(lin, np.zeros((7, 5)), "gaussian", "ggn", None)
