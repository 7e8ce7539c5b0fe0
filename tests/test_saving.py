"""Saving, loading and SavedModel export of LinearizedModel."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tf_linntk.inference import regression_posterior


def _regression_setup(seed=0, num_outputs=2):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(num_outputs),
        ]
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(25, 3)).astype("float32")
    y = rng.normal(size=(25, num_outputs))
    x_test = rng.normal(size=(6, 3)).astype("float32")
    return model, x, y, x_test


def test_save_load_regression_identical_predictive(tmp_path):
    """A saved and reloaded adapted model predicts the same mean and variance."""
    model, x, y, x_test = _regression_setup()
    lin = tf_linntk.LinearizedModel(model)
    lin.adapt(x, y, noise_variance=[0.1, 0.3], prior_variance=0.5, seed=1)
    path = tmp_path / "lin.keras"
    lin.save(path)

    loaded = keras.models.load_model(path)

    assert isinstance(loaded, tf_linntk.LinearizedModel)
    expected = lin.predictive_distribution(x_test)
    restored = loaded.predictive_distribution(x_test)
    np.testing.assert_array_equal(restored.mean().numpy(), expected.mean().numpy())
    np.testing.assert_array_equal(restored.variance().numpy(), expected.variance().numpy())
    np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), lin.predict(x_test, verbose=0))


def test_save_load_restores_record_and_hyperparameters(tmp_path):
    """Loading restores the prior variance, noise variances and convergence records."""
    model, x, y, _ = _regression_setup()
    lin = tf_linntk.LinearizedModel(model)
    lin.adapt(x, y, noise_variance=[0.1, 0.3], prior_variance=0.5)
    lin.save(tmp_path / "lin.keras")

    loaded = keras.models.load_model(tmp_path / "lin.keras").posterior

    assert loaded.prior_variance == 0.5
    np.testing.assert_array_equal(loaded.noise_variance.numpy(), [0.1, 0.3])
    original = lin.posterior.convergence["solve"]
    record = loaded.convergence["solve"]
    np.testing.assert_array_equal(record.iterations, original.iterations)
    np.testing.assert_array_equal(record.relative_residual, original.relative_residual)
    assert record.tolerance == original.tolerance


def test_save_load_keeps_theta0_after_model_changes(tmp_path):
    """The saved θ₀ is the snapshot, even if the wrapped model's weights change later."""
    model, x, y, x_test = _regression_setup()
    lin = tf_linntk.LinearizedModel(model)
    expected = lin.predict(x_test, verbose=0)
    model.layers[0].kernel.assign(tf.zeros_like(model.layers[0].kernel))
    lin.save(tmp_path / "lin.keras")

    loaded = keras.models.load_model(tmp_path / "lin.keras")

    np.testing.assert_allclose(loaded.predict(x_test, verbose=0), expected, rtol=1e-6)


def test_save_load_unadapted_model(tmp_path):
    """An unadapted model round-trips and still raises before `adapt`."""
    model, _, _, x_test = _regression_setup()
    lin = tf_linntk.LinearizedModel(model, mean="zero")
    lin.save(tmp_path / "lin.keras")

    loaded = keras.models.load_model(tmp_path / "lin.keras")

    assert loaded.mean == "zero"
    assert not loaded.is_adapted
    with pytest.raises(ValueError, match="adapt"):
        loaded.predictive_distribution(x_test)


def test_loaded_exact_posterior_needs_explicit_lanczos(tmp_path):
    """A reloaded variance='exact' posterior gives variances from its root only on request."""
    model, x, y, x_test = _regression_setup()
    lin = tf_linntk.LinearizedModel(model)
    lin.adapt(x, y, noise_variance=[0.1, 0.3], prior_variance=0.5, variance="exact", seed=1)
    lin.save(tmp_path / "exact.keras")

    loaded = keras.models.load_model(tmp_path / "exact.keras")

    exact = lin.predictive_distribution(x_test).variance().numpy()
    restored = loaded.predictive_distribution(x_test, variance="lanczos").variance().numpy()
    np.testing.assert_allclose(restored, exact, rtol=1e-4)
    with pytest.raises(ValueError, match="adapted with variance='exact'.*variance='lanczos'"):
        loaded.predictive_distribution(x_test)
    with pytest.raises(ValueError, match="`variance`='exact' needs the training data"):
        loaded.predictive_distribution(x_test, variance="exact")


def test_save_weights_restores_posterior(tmp_path):
    """save_weights/load_weights carry the posterior, and a file without one clears it."""
    model, x, y, x_test = _regression_setup()
    lin = tf_linntk.LinearizedModel(model)
    lin.adapt(x, y, noise_variance=[0.1, 0.3], prior_variance=0.5, seed=1)
    adapted_path = tmp_path / "adapted.weights.h5"
    lin.save_weights(adapted_path)

    other = tf_linntk.LinearizedModel(model)
    other.load_weights(adapted_path)

    assert other.posterior is not None
    expected = lin.predictive_distribution(x_test)
    restored = other.predictive_distribution(x_test)
    np.testing.assert_array_equal(restored.mean().numpy(), expected.mean().numpy())
    np.testing.assert_array_equal(restored.variance().numpy(), expected.variance().numpy())

    plain_path = tmp_path / "plain.weights.h5"
    tf_linntk.LinearizedModel(model).save_weights(plain_path)
    other.load_weights(plain_path)
    assert other.posterior is None
    np.testing.assert_allclose(other.predict(x_test, verbose=0), model.predict(x_test, verbose=0),
                               rtol=1e-6)


def test_save_weights_restores_classification_posterior(tmp_path):
    """A Laplace classifier's posterior survives save_weights/load_weights."""
    model, x, _, x_test = _regression_setup(num_outputs=3)
    labels = np.random.default_rng(2).integers(0, 3, size=len(x))
    lin = tf_linntk.LinearizedModel(model)
    lin.adapt(x, labels, likelihood="categorical", seed=0)
    path = tmp_path / "classifier.weights.h5"
    lin.save_weights(path)

    other = tf_linntk.LinearizedModel(model)
    other.load_weights(path)

    np.testing.assert_array_equal(other.predict(x_test, verbose=0), lin.predict(x_test, verbose=0))


def test_state_round_trip_is_json_compatible():
    """Posterior state config serializes to JSON and rebuilds an equal posterior."""
    model, x, y, _ = _regression_setup()
    lin = tf_linntk.LinearizedModel(model)
    lin.adapt(x, y, noise_variance=0.2)
    config, arrays = lin.posterior.get_state()

    rebuilt = regression_posterior.RegressionPosterior.from_state(
        json.loads(json.dumps(config)), arrays
    )

    np.testing.assert_array_equal(rebuilt.weights.numpy(), lin.posterior.weights.numpy())
    np.testing.assert_array_equal(rebuilt.root.numpy(), lin.posterior.root.numpy())


_SERVE_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
served = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
outputs = served(tf.constant(np.load(sys.argv[2])))
np.savez(sys.argv[3], **{name: value.numpy() for name, value in outputs.items()})
print("tf_linntk" in sys.modules)
"""


def test_export_serves_in_fresh_process(tmp_path):
    """The SavedModel serves mean and variance in a process without tf_linntk."""
    model, x, y, x_test = _regression_setup()
    lin = tf_linntk.LinearizedModel(model)
    lin.adapt(x, y, noise_variance=[0.1, 0.3], prior_variance=0.5)
    lin.export(str(tmp_path / "served"), verbose=False)
    np.save(tmp_path / "x.npy", x_test)

    completed = subprocess.run(
        [sys.executable, "-c", _SERVE_SCRIPT, str(tmp_path / "served"),
         str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, check=True,
    )

    assert completed.stdout.strip().endswith("False")
    served = np.load(tmp_path / "out.npz")
    assert sorted(served.files) == ["latent_variance", "mean", "variance"]
    expected = lin.predictive_distribution(x_test)
    np.testing.assert_allclose(served["mean"], expected.mean().numpy(), rtol=1e-6)
    np.testing.assert_allclose(served["variance"], expected.variance().numpy(), rtol=1e-10)


def test_export_rejects_unknown_format(tmp_path):
    """Only the SavedModel format is exported."""
    model, _, _, _ = _regression_setup()
    lin = tf_linntk.LinearizedModel(model)

    with pytest.raises(ValueError, match="`format`"):
        lin.export(str(tmp_path / "served"), format="onnx")
