"""Tests for tf_linntk.similarity.jacobian_similarity against explicit Jacobians."""

import keras
import numpy as np
import pytest

import tf_linntk
from tests import reference
from tf_linntk.similarity import jacobian_similarity

NUM_INPUTS = 2
NUM_OUTPUTS = 2
SPACES = ["function", "parameter"]


def mlp(hidden, seed, num_outputs=NUM_OUTPUTS):
    """Return a float64 tanh MLP with one hidden layer."""
    initializer = keras.initializers.RandomNormal(stddev=0.7, seed=seed)
    with reference.keras_float_dtype("float64"):
        return keras.Sequential([
            keras.Input((NUM_INPUTS,)),
            keras.layers.Dense(hidden, activation="tanh", kernel_initializer=initializer,
                               bias_initializer=initializer),
            keras.layers.Dense(num_outputs, kernel_initializer=initializer),
        ])


def scaled(model, factor):
    """Return `model` followed by a fixed output scale (the same weights, P unchanged)."""
    with reference.keras_float_dtype("float64"):
        return keras.Sequential([keras.Input((NUM_INPUTS,)), model,
                                 keras.layers.Rescaling(factor)])


def dense_similarity(model_a, model_b, x):
    """Return ‖AᵀB‖²_F / (‖AAᵀ‖_F ‖BBᵀ‖_F) from the explicit Jacobians."""
    a = reference.dense_jacobian(model_a, x)
    b = reference.dense_jacobian(model_b, x)
    a = a.reshape(-1, a.shape[-1])  # [N·O, Pa]
    b = b.reshape(-1, b.shape[-1])  # [N·O, Pb]
    cross = np.linalg.norm(a.T @ b) ** 2
    return cross / (np.linalg.norm(a @ a.T) * np.linalg.norm(b @ b.T))


@pytest.fixture(scope="module")
def models():
    """Two MLPs of different widths (P = 20 and 32), wrapped once."""
    model_a, model_b = mlp(4, seed=1), mlp(6, seed=2)
    return {
        "a": model_a,
        "b": model_b,
        "lin_a": tf_linntk.LinearizedModel(model_a),
        "lin_b": tf_linntk.LinearizedModel(model_b),
    }


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((5, NUM_INPUTS))


@pytest.mark.parametrize("space", SPACES)
def test_similarity_matches_dense_reference(models, x, space):
    """Both spaces match the formula on explicit Jacobians to 1e-10."""
    expected = dense_similarity(models["a"], models["b"], x)

    actual = jacobian_similarity(models["lin_a"], models["lin_b"], x, space=space)
    np.testing.assert_allclose(actual, expected, rtol=1e-10)
    assert 0.0 < actual < 1.0


def test_similarity_auto_many_examples(models):
    """With N·O = 80 > P, "auto" takes parameter space and matches the dense value."""
    many = np.random.default_rng(1).standard_normal((40, NUM_INPUTS))
    expected = dense_similarity(models["a"], models["b"], many)

    np.testing.assert_allclose(jacobian_similarity(models["lin_a"], models["lin_b"], many),
                               expected, rtol=1e-10)


def test_similarity_spaces_agree(models, x):
    """Function space and parameter space give the same value."""
    function = jacobian_similarity(models["lin_a"], models["lin_b"], x, space="function")
    parameter = jacobian_similarity(models["lin_a"], models["lin_b"], x, space="parameter")

    np.testing.assert_allclose(function, parameter, rtol=1e-10)


@pytest.mark.parametrize("space", SPACES)
def test_similarity_with_itself_is_one(models, x, space):
    """A model has similarity 1 with itself."""
    value = jacobian_similarity(models["lin_a"], models["lin_a"], x, space=space)

    np.testing.assert_allclose(value, 1.0, rtol=1e-12)


def test_similarity_is_symmetric(models, x):
    """sim(A, B) = sim(B, A)."""
    forward = jacobian_similarity(models["lin_a"], models["lin_b"], x)
    backward = jacobian_similarity(models["lin_b"], models["lin_a"], x)

    np.testing.assert_allclose(forward, backward, rtol=1e-12)


def test_similarity_invariant_to_output_scale(models, x):
    """Multiplying a model's outputs by a fixed factor leaves the similarity unchanged."""
    expected = jacobian_similarity(models["lin_a"], models["lin_b"], x)
    scaled_b = tf_linntk.LinearizedModel(scaled(models["b"], 3.5))

    assert scaled_b.num_parameters == models["lin_b"].num_parameters
    np.testing.assert_allclose(jacobian_similarity(models["lin_a"], scaled_b, x), expected,
                               rtol=1e-10)


def test_similarity_accepts_keras_models(models, x):
    """Keras models give the same value as their LinearizedModel wrappers."""
    expected = jacobian_similarity(models["lin_a"], models["lin_b"], x)

    np.testing.assert_allclose(jacobian_similarity(models["a"], models["b"], x), expected,
                               rtol=1e-12)


def test_similarity_separate_inputs_for_model_b(models, x):
    """`x_b` passes model_b its own inputs; x_b = x gives the default value."""
    expected = jacobian_similarity(models["lin_a"], models["lin_b"], x)

    np.testing.assert_allclose(
        jacobian_similarity(models["lin_a"], models["lin_b"], x, x_b=x.copy()), expected,
        rtol=1e-12,
    )


def test_similarity_rejects_different_outputs(models, x):
    """Models with different O raise naming `model_b`."""
    other = tf_linntk.LinearizedModel(mlp(3, seed=3, num_outputs=3))

    with pytest.raises(ValueError, match=r"`model_b` must have the same number of outputs"):
        jacobian_similarity(models["lin_a"], other, x)


def test_similarity_rejects_different_example_counts(models, x):
    """An `x_b` with another N raises naming `x_b`."""
    with pytest.raises(ValueError, match=r"`x_b` must contain N=5 examples"):
        jacobian_similarity(models["lin_a"], models["lin_b"], x, x_b=x[:3])


def test_similarity_rejects_invalid_arguments(models, x):
    """A non-model or an unknown space raises naming the argument."""
    with pytest.raises(TypeError, match=r"`model_a` must be a Keras model"):
        jacobian_similarity("model", models["lin_b"], x)
    with pytest.raises(ValueError, match=r"`space` must be one of"):
        jacobian_similarity(models["lin_a"], models["lin_b"], x, space="kernel")
