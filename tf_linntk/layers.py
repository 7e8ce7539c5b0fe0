"""Keras layers that put an adapted `LinearizedModel` inside Keras pipelines.

Keras 3 layers output tensors, not TFP distributions, so these layers return the
predictive's moments or probabilities; `LinearizedModel.predictive_distribution`
returns the distribution object.
"""

import keras
import tensorflow as tf

from tf_linntk import linearize

__all__ = ["LinearizedOutput", "PredictiveHead"]


@keras.saving.register_keras_serializable(package="tf_linntk")
class PredictiveHead(keras.layers.Layer):
    """The posterior predictive of an adapted `LinearizedModel`, as a layer.

    Regression: returns [mean [N, O], variance [N, O]], the predictive variance
    of y (noise included, float64) or of f when `include_noise=False`.
    Classification: returns float64 probabilities [N, C] ([N, 1] for Bernoulli).

    Cost per call: one JVP for the mean; for regression variances, the
    per-example Jacobian norms and one batched JVP with the k covariance-root
    columns.

    Args:
        linearized_model: an adapted `tf_linntk.LinearizedModel`.
        include_noise: add the noise variance to regression variances.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Raises:
        TypeError: if `linearized_model` is not a LinearizedModel.
        ValueError: if it is not adapted.

    Example:
        >>> inputs = keras.Input((1,))                                 # doctest: +SKIP
        >>> mean, variance = PredictiveHead(lin)(inputs)               # doctest: +SKIP
        >>> pipeline = keras.Model(inputs, [mean, variance])           # doctest: +SKIP
    """

    def __init__(self, linearized_model, include_noise=True, **kwargs):
        super().__init__(**kwargs)
        _check_linearized(linearized_model, require_adapted=True)
        if not isinstance(include_noise, bool):
            raise TypeError(f"`include_noise` must be a bool; received {include_noise!r}.")
        self.linearized_model = linearized_model
        self.include_noise = include_noise

    def call(self, inputs):
        lin = self.linearized_model
        x = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        outputs = lin.posterior.serving_outputs(lin, x)
        if "probabilities" in outputs:
            return tf.cast(outputs["probabilities"], tf.float64)
        variance = outputs["variance" if self.include_noise else "latent_variance"]
        return [outputs["mean"], variance]

    def compute_output_spec(self, inputs):
        lin = self.linearized_model
        batch = keras.tree.flatten(inputs)[0].shape[0]
        shape = (batch, lin.num_outputs)
        if not _is_regression(lin):
            return keras.KerasTensor(shape, dtype="float64")
        return [
            keras.KerasTensor(shape, dtype=lin.functional.dtype.name),
            keras.KerasTensor(shape, dtype="float64"),
        ]

    def get_config(self):
        config = super().get_config()
        config.update(
            linearized_model=keras.saving.serialize_keras_object(self.linearized_model),
            include_noise=self.include_noise,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["linearized_model"] = keras.saving.deserialize_keras_object(
            config["linearized_model"]
        )
        return cls(**config)


@keras.saving.register_keras_serializable(package="tf_linntk")
class LinearizedOutput(keras.layers.Layer):
    """The linearized network f_lin(x; δ) = m(x) + J(x) δ with a trainable offset δ [P].

    Training this layer with `model.fit` fits the linearized network by
    first-order optimization (e.g. minibatch SGD on large N) instead of
    posterior inference; only δ trains, and the wrapped model never changes.
    δ starts at zero, so the layer first returns m(x). Returns [N, O] (flattened
    outputs, model dtype).

    Cost per call: one JVP (the backward pass differentiates it once more).

    Args:
        linearized_model: a `tf_linntk.LinearizedModel`, adapted or not.
        **kwargs: passed to `keras.layers.Layer`.

    Raises:
        TypeError: if `linearized_model` is not a LinearizedModel.
    """

    def __init__(self, linearized_model, **kwargs):
        super().__init__(**kwargs)
        _check_linearized(linearized_model, require_adapted=False)
        self.linearized_model = linearized_model

    def build(self, input_shape=None):
        lin = self.linearized_model
        self.delta = self.add_weight(
            shape=(lin.num_parameters,),
            initializer="zeros",
            dtype=lin.functional.dtype.name,
            name="delta",
        )
        self.built = True

    def call(self, inputs):
        lin = self.linearized_model
        x = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        mean = lin._prior_mean_flat(x)
        shift = lin.functional.jvp(x, tf.convert_to_tensor(self.delta))
        return tf.reshape(mean + shift, [-1, lin.num_outputs])  # [N, O]

    def compute_output_spec(self, inputs):
        batch = keras.tree.flatten(inputs)[0].shape[0]
        lin = self.linearized_model
        return keras.KerasTensor((batch, lin.num_outputs), dtype=lin.functional.dtype.name)

    def get_config(self):
        config = super().get_config()
        config["linearized_model"] = keras.saving.serialize_keras_object(self.linearized_model)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["linearized_model"] = keras.saving.deserialize_keras_object(
            config["linearized_model"]
        )
        return cls(**config)


def _is_regression(lin):
    """Return whether the posterior of `lin`, possibly still loading, is a regression one."""
    if lin.posterior is not None:
        return lin.posterior.likelihood.name == "gaussian"
    pending = getattr(lin, "_pending_posterior_config", None) or {}
    return pending.get("class_name") == "RegressionPosterior"


def _check_linearized(lin, require_adapted):
    if not isinstance(lin, linearize.LinearizedModel):
        raise TypeError(
            "`linearized_model` must be a tf_linntk.LinearizedModel; received an object "
            f"of type {type(lin).__name__}."
        )
    # A model being loaded receives its posterior after construction.
    loading = getattr(lin, "_pending_posterior_config", None) is not None
    if require_adapted and not lin.is_adapted and not loading:
        raise ValueError(
            "`linearized_model` is not adapted, so it has no posterior predictive. Call "
            "`linearized_model.adapt(x, y)` first."
        )
