"""Keras layers for pipelines: PredictiveHead and LinearizedOutput."""

import keras
import numpy as np
import pytest

import tf_linntk
from tf_linntk import layers


def _setup(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 2)).astype("float32")
    y = np.sin(x[:, :1]) + 0.1 * rng.normal(size=(30, 1))
    x_test = rng.normal(size=(7, 2)).astype("float32")
    return model, x, y, x_test


def test_predictive_head_matches_distribution():
    """PredictiveHead in a Functional model returns the predictive mean and variance."""
    model, x, y, x_test = _setup()
    lin = tf_linntk.LinearizedModel(model).adapt(x, y, noise_variance=0.1)
    inputs = keras.Input((2,))
    pipeline = keras.Model(inputs, layers.PredictiveHead(lin)(inputs))
    pipeline.compile()

    mean, variance = pipeline.predict(x_test, verbose=0)

    expected = lin.predictive_distribution(x_test)
    np.testing.assert_allclose(mean, expected.mean().numpy(), rtol=1e-6)
    np.testing.assert_allclose(variance, expected.variance().numpy(), rtol=1e-10)


def test_predictive_head_latent_variance():
    """include_noise=False returns the variance of f, σ² below that of y."""
    model, x, y, x_test = _setup()
    lin = tf_linntk.LinearizedModel(model).adapt(x, y, noise_variance=0.1)
    head = layers.PredictiveHead(lin, include_noise=False)

    _, variance = head(x_test)

    expected = lin.predictive_distribution(x_test, include_noise=False).variance()
    np.testing.assert_allclose(variance.numpy(), expected.numpy(), rtol=1e-10)


def test_predictive_head_save_reload(tmp_path):
    """A compiled pipeline with a PredictiveHead saves and reloads with equal outputs."""
    model, x, y, x_test = _setup()
    lin = tf_linntk.LinearizedModel(model).adapt(x, y, noise_variance=0.1)
    inputs = keras.Input((2,))
    pipeline = keras.Model(inputs, layers.PredictiveHead(lin)(inputs))
    pipeline.compile()
    expected = pipeline.predict(x_test, verbose=0)
    pipeline.save(tmp_path / "pipeline.keras")

    reloaded = keras.models.load_model(tmp_path / "pipeline.keras")

    for got, want in zip(reloaded.predict(x_test, verbose=0), expected):
        np.testing.assert_array_equal(got, want)


def test_predictive_head_rejects_unadapted_model():
    """PredictiveHead needs an adapted LinearizedModel."""
    model, _, _, _ = _setup()

    with pytest.raises(ValueError, match="`linearized_model` is not adapted"):
        layers.PredictiveHead(tf_linntk.LinearizedModel(model))


def test_layers_reject_non_linearized_model():
    """Both layers name `linearized_model` when given a plain Keras model."""
    model, _, _, _ = _setup()

    with pytest.raises(TypeError, match="`linearized_model` must be a tf_linntk"):
        layers.PredictiveHead(model)
    with pytest.raises(TypeError, match="`linearized_model` must be a tf_linntk"):
        layers.LinearizedOutput(model)


def test_linearized_output_trains_only_delta(tmp_path):
    """Fitting LinearizedOutput lowers the loss, trains δ only and keeps the model intact."""
    model, x, y, x_test = _setup()
    before = [v.numpy().copy() for v in model.variables]
    lin = tf_linntk.LinearizedModel(model)
    inputs = keras.Input((2,))
    trainable = keras.Model(inputs, layers.LinearizedOutput(lin)(inputs))
    trainable.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    np.testing.assert_allclose(
        trainable.predict(x_test, verbose=0), model.predict(x_test, verbose=0), rtol=1e-6
    )

    history = trainable.fit(x, y, epochs=20, verbose=0)

    assert history.history["loss"][-1] < history.history["loss"][0]
    assert [v.name for v in trainable.trainable_variables] == ["delta"]
    for value, variable in zip(before, model.variables):
        np.testing.assert_array_equal(variable.numpy(), value)
    trainable.save(tmp_path / "trained.keras")
    reloaded = keras.models.load_model(tmp_path / "trained.keras")
    np.testing.assert_array_equal(
        reloaded.predict(x_test, verbose=0), trainable.predict(x_test, verbose=0)
    )
