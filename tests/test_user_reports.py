"""Problems found by trying the library as a new user, each with its fix checked."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tf_linntk import layers


def _classifier(final_activation=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(3, activation=final_activation),
        ]
    )


def _classification_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype("float32")
    labels = rng.integers(0, 3, size=30)
    return x, labels


def test_classification_predictive_head_returns_probabilities():
    """PredictiveHead on an adapted classifier returns probabilities equal to predict()."""
    x, labels = _classification_data()
    lin = tf_linntk.LinearizedModel(_classifier())
    lin.adapt(x, labels, likelihood="categorical", inference="laplace")
    inputs = keras.Input((4,))
    pipeline = keras.Model(inputs, layers.PredictiveHead(lin)(inputs))

    probabilities = pipeline.predict(x[:5], verbose=0)

    np.testing.assert_allclose(probabilities, lin(x[:5]).numpy(), rtol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), np.ones(5), rtol=1e-6)


_SERVE_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
served = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
outputs = served(tf.constant(np.load(sys.argv[2])))
np.save(sys.argv[3], outputs["probabilities"].numpy())
"""


def test_classification_export_serves_probabilities(tmp_path):
    """An exported classifier serves its class probabilities without tf_linntk."""
    x, labels = _classification_data()
    lin = tf_linntk.LinearizedModel(_classifier())
    lin.adapt(x, labels, likelihood="categorical", inference="map")
    lin.export(str(tmp_path / "served"), verbose=False)
    np.save(tmp_path / "x.npy", x[:5])

    subprocess.run(
        [sys.executable, "-c", _SERVE_SCRIPT, str(tmp_path / "served"),
         str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
        check=True, capture_output=True,
    )

    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), lin(x[:5]).numpy(), rtol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_classification_rejects_probability_outputs(activation):
    """A model whose last layer applies softmax or sigmoid is rejected for classification."""
    x, labels = _classification_data()
    lin = tf_linntk.LinearizedModel(_classifier(activation))

    with pytest.raises(ValueError, match=f"outputs logits.*applies {activation}"):
        lin.adapt(x, labels, likelihood="categorical")


def test_max_iterations_above_int32_raises():
    """max_iterations ≥ 2**31 raises instead of wrapping around to zero iterations."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    lin = tf_linntk.LinearizedModel(model)
    x = np.ones((4, 2), "float32")

    with pytest.raises(ValueError, match=r"`max_iterations` must be below 2\*\*31"):
        lin.adapt(x, np.ones(4), noise_variance=0.1, max_iterations=2**31)


def test_ntk_to_dense_respects_max_dense_bytes():
    """ntk(x).to_dense() raises above max_dense_bytes, naming its size."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    lin = tf_linntk.LinearizedModel(model, max_dense_bytes=64)

    with pytest.raises(ValueError, match=r"`ntk\(...\).to_dense\(\)` would form .* bytes"):
        lin.ntk(np.ones((50, 2), "float32")).to_dense()


def test_adapt_rejects_infinite_dataset():
    """An infinite tf.data.Dataset is rejected before any pass over it."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    lin = tf_linntk.LinearizedModel(model)
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.ones((10, 2), "float32"), np.ones((10, 1)))
    ).batch(5).repeat()

    with pytest.raises(ValueError, match="`x` must be a finite tf.data.Dataset"):
        lin.adapt(dataset, noise_variance=0.1)
