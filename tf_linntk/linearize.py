"""`LinearizedModel`: the Keras-facing wrapper that linearizes a trained network.

The wrapper validates input and delegates: products to `autodiff`, kernels to
`kernels`, Fisher operators to `fisher`, posterior inference to `inference`.
"""

import inspect
import json
import logging

import keras
import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import _model_checks
from tf_linntk import _streaming
from tf_linntk import autodiff
from tf_linntk import kernels
from tf_linntk import likelihoods
from tf_linntk.inference import base

__all__ = ["LinearizedModel", "DEFAULT_MAX_DENSE_BYTES"]

MEAN_FUNCTIONS = ("network", "zero")

_logger = logging.getLogger(__name__)

# Default size limit for an explicitly formed dense matrix (Jacobian, dense kernel,
# joint covariance): 1 GiB. Larger requests raise instead of exhausting memory.
DEFAULT_MAX_DENSE_BYTES = 2**30


@keras.saving.register_keras_serializable(package="tf_linntk")
class LinearizedModel(keras.Model):
    """A trained Keras network linearized around its weights θ₀.

    f_lin(x; θ') = m(x) + J(x) (θ' − θ₀), with J(x) = ∂f(x; θ)/∂θ at θ₀ [N·O, P]
    and mean function m(x) = f(x; θ₀) (`mean="network"`) or 0 (`mean="zero"`).
    `adapt(x, y)` puts the prior θ' − θ₀ ~ N(0, s² I) on the weights and computes
    the posterior given target data. Calls then return the posterior predictive
    mean, and before `adapt` they return m(x).

    The wrapped model is evaluated with `training=False` on snapshots of its
    variables taken at construction: its own variables are never assigned and are
    not trainable through the wrapper.

    Outputs of any rank are flattened per example: O is the total number of
    output values per example over all output tensors, concatenated in
    `model.outputs` order (after `output_projection`, when given).

    Args:
        model: a built Keras 3 model (Sequential, Functional or subclassed) on the
            TensorFlow backend, computing in float32 or float64.
        mean: "network" (m(x) = f(x; θ₀), the linearized network) or "zero"
            (m(x) = 0, the finite-NTK GP).
        layers: optional list of layers (objects or names) whose trainable
            variables are linearized; the rest stay fixed at θ₀. Default: all.
        batch_size: examples per chunk in every streamed product (memory grows
            with it, not with N).
        output_projection: optional fixed matrix [O_model, O] applied to the
            flattened network outputs (e.g. a label remap for a target task with
            another number of classes), or an int O for a random Gaussian
            projection with entries N(0, 1/O_model) drawn with seed 0.
        max_dense_bytes: size limit in bytes for explicitly formed dense
            matrices (`jacobian`, `ntk(...).to_dense()`, joint predictives).
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Raises:
        TypeError: if `model` is not a Keras 3 model, or an argument has the
            wrong type.
        ValueError: if the model is not built, uses float16/bfloat16, or an
            argument has an invalid value.

    Example:
        >>> lin = tf_linntk.LinearizedModel(model)            # doctest: +SKIP
        >>> lin.num_parameters, lin.jacobian(x).shape         # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        mean="network",
        layers=None,
        batch_size=256,
        output_projection=None,
        max_dense_bytes=DEFAULT_MAX_DENSE_BYTES,
        **kwargs,
    ):
        _model_checks.check_model(model)
        # Compute in the wrapped model's dtype, so Keras does not cast float64
        # inputs to the global float32 policy before `call`.
        kwargs.setdefault("dtype", _model_checks.model_compute_dtype(model))
        super().__init__(**kwargs)
        self.mean = _checks.check_option("mean", mean, MEAN_FUNCTIONS)
        self.batch_size = _checks.check_positive_int("batch_size", batch_size)
        self.max_dense_bytes = _checks.check_positive_int("max_dense_bytes", max_dense_bytes)
        self._layers_config = _layer_names(layers)
        self._projection_config = output_projection
        functional = autodiff.FunctionalModel(
            model, layers=layers, batch_size=batch_size, output_projection=output_projection
        )
        # Bypass Keras attribute tracking: the wrapped model's variables must not
        # become weights (trainable or not) of the wrapper.
        object.__setattr__(self, "_functional", functional)
        object.__setattr__(self, "_posterior", None)
        self.built = True

    # ------------------------------------------------------------------ properties

    @property
    def wrapped_model(self):
        """The wrapped Keras model, never modified by the wrapper."""
        return self._functional.model

    @property
    def functional(self):
        """The `FunctionalModel` that evaluates f(θ, x) and its products."""
        return self._functional

    @property
    def num_parameters(self):
        """P, the number of linearized parameters."""
        return self._functional.num_parameters

    @property
    def num_outputs(self):
        """O, the number of flattened outputs per example (after any projection)."""
        return self._functional.num_outputs

    @property
    def posterior(self):
        """The posterior from the last `adapt`, or None before adaptation."""
        return self._posterior

    @property
    def is_adapted(self):
        """Whether `adapt` has produced a posterior."""
        return self._posterior is not None

    # ------------------------------------------------------------------ conversion

    def flatten_parameters(self, tensors):
        """Concatenate per-variable tensors into the flat vector [P] (row-major each)."""
        return self._functional.flatten(tensors)

    def unflatten_parameters(self, flat):
        """Split a flat vector [P] into tensors shaped like the linearized variables."""
        flat = self._convert_tangents(flat, "flat")
        return self._functional.unflatten(flat)

    # ------------------------------------------------------------------ products

    def jvp(self, x, tangents):
        """Compute the Jacobian-vector product J(x) v.

        Cost: one forward-mode pass over x, streamed in chunks of `batch_size`.

        Args:
            x: inputs with N examples (array, tensor, or a tuple/list/dict), or a
                finite `tf.data.Dataset` of batches (of x, or of (x, y) pairs), read
                once to validate and count it and once per product.
            tangents: float vector [P] in the flat parameter order.

        Returns:
            Tensor [N, O] in the model's dtype.

        Raises:
            ValueError: if `x` does not match the model's inputs or `tangents` is
                not [P].
        """
        x = self._convert_x(x, allow_dataset=True)
        tangents = self._convert_tangents(tangents)
        n = self._functional.num_examples(x)
        if n == 0:
            return tf.zeros([0, self.num_outputs], self._functional.dtype)
        with _streaming.translate_pass_errors(streamed=_streaming.is_streamed(x)):
            return self._functional.jvp(x, tangents)

    def vjp(self, x, cotangents):
        """Compute the vector-Jacobian product J(x)ᵀ u.

        Cost: one forward and one reverse pass over x, streamed in chunks.

        Args:
            x: inputs with N examples, or a finite `tf.data.Dataset` (see `jvp`).
            cotangents: float tensor [N, O] in output space.

        Returns:
            Tensor [P] in the model's dtype.

        Raises:
            ValueError: if `x` does not match the model's inputs or `cotangents`
                is not [N, O].
        """
        x = self._convert_x(x, allow_dataset=True)
        n = self._functional.num_examples(x)
        cotangents = self._convert_cotangents(cotangents, n)
        if n == 0:
            return tf.zeros([self.num_parameters], self._functional.dtype)
        with _streaming.translate_pass_errors(streamed=_streaming.is_streamed(x)):
            return self._functional.vjp(x, cotangents)

    def jacobian(self, x, max_dense_bytes=None):
        """Form the dense Jacobian J(x) = ∂f(x; θ)/∂θ at θ₀.

        Cost: vectorized reverse mode (`tape.jacobian`), memory N·O·P values.

        Args:
            x: inputs with N examples, or a finite `tf.data.Dataset` (see `jvp`).
            max_dense_bytes: size limit for this call; defaults to the model's.

        Returns:
            Tensor [N, O, P] in the model's dtype.

        Raises:
            ValueError: if `x` is invalid or the result would exceed the limit.
        """
        x = self._convert_x(x, allow_dataset=True)
        n = self._functional.num_examples(x)
        self.check_dense_size(
            (n, self.num_outputs, self.num_parameters), "jacobian", max_dense_bytes,
            "use `jvp`/`vjp` or `ntk(x)` products instead",
        )
        if n == 0:
            return tf.zeros([0, self.num_outputs, self.num_parameters], self._functional.dtype)
        with _streaming.translate_pass_errors(streamed=_streaming.is_streamed(x)):
            return self._functional.jacobian(x)

    def ntk(self, x1, x2=None):
        """Build the finite NTK K(x1, x2) = J(x1) J(x2)ᵀ as an implicit operator.

        Args:
            x1: inputs with N1 examples, or a finite `tf.data.Dataset` (see `jvp`),
                streamed on every product.
            x2: inputs with N2 examples (or a dataset), or None for x2 = x1
                (symmetric).

        Returns:
            `tf_linntk.kernels.NTKOperator` of shape [N1·O, N2·O], example-major.

        Raises:
            ValueError: if an input does not match the model's inputs.
        """
        x1 = self._convert_x(x1, "x1", allow_dataset=True)
        x2 = None if x2 is None else self._convert_x(x2, "x2", allow_dataset=True)
        return kernels.NTKOperator(
            self._functional, x1, x2, check_dense_size=self.check_dense_size
        )

    def fisher(self, x, likelihood="gaussian", method="ggn", epsilon=None, outputs=None):
        """Build the Fisher / GGN operator F = Σᵢ Jᵢᵀ Hᵢ Jᵢ on x as a LinearOperator.

        F is summed over the N examples (not averaged), so the parameter-space
        posterior precision is F + I/s². Hᵢ is the likelihood's output-space
        Hessian at f(xᵢ; θ₀), or at the given `outputs` (e.g. MAP logits).

        Methods: "ggn" (exact, one JVP and one VJP per product), "autodiff"
        (exact, double backpropagation of a KL loss), "finite_difference" (the
        gradient of KL(p(y|θ₀) ‖ p(y|θ₀ + εv)) divided by ε: one extra forward
        and one backward pass, error O(ε)), "central_difference" (two perturbed
        passes, error O(ε²)). `tf_linntk.fisher.FisherOperator` documents the
        costs and the measured errors.

        Args:
            x: inputs with N examples, or a finite `tf.data.Dataset` (see `jvp`),
                streamed on every product.
            likelihood: "gaussian", "categorical", "bernoulli", or a
                `tf_linntk.likelihoods.Likelihood` instance.
            method: one of the methods above.
            epsilon: finite-difference step > 0; None picks one from the dtype.
            outputs: optional float [N, O] outputs or logits for the Hessians.

        Returns:
            A `tf_linntk.fisher.FisherOperator` of shape [P, P].

        Raises:
            TypeError: if `likelihood` or `outputs` has the wrong type.
            ValueError: if an argument has an invalid value or shape.
        """
        from tf_linntk import fisher as fisher_module

        return fisher_module.fisher_operator(
            self, x, likelihood=likelihood, method=method, epsilon=epsilon, outputs=outputs
        )

    # ------------------------------------------------------------------ adaptation

    def adapt(self, x, y=None, likelihood="gaussian", **options):
        """Fit the posterior over the linearized weights to target data, in place.

        Any earlier posterior is replaced. Regression (Gaussian likelihood) is
        solved in closed form; classification (categorical or Bernoulli) fits a
        Bayesian GLM on the Jacobian features. The options depend on the
        likelihood: see `tf_linntk.inference.regression.fit` and
        `tf_linntk.inference.classification.fit` for the full lists.

        Args:
            x: target inputs with N examples (array, tensor, tuple/list/dict), or
                a finite batched `tf.data.Dataset` of (x, y) pairs with `y=None`.
                The dataset is read once to validate it and keep the targets, then
                streamed on every product, so it must yield the same examples in
                the same order on every pass (a change raises ValueError).
            y: targets. Regression takes floats [N] or [N, O], "categorical"
                takes integer class ids [N] or one-hot rows [N, O], and
                "bernoulli" takes 0/1 labels [N] or [N, 1].
            likelihood: "gaussian", "categorical", "bernoulli", or a
                `tf_linntk.likelihoods.Likelihood` instance carrying parameters.
            **options: inference options such as `prior_variance`,
                `noise_variance`, `space`, `tol`, `max_iterations`, `seed`,
                `on_nonconvergence` and `verbose` (regression), or `inference`,
                `link`, `num_samples` (classification).

        Returns:
            This model, adapted.

        Raises:
            ValueError: for invalid data or option values; the message names the
                argument.
            TypeError: for an unknown option or a wrong argument type.
        """
        likelihood_object = likelihoods.get_likelihood(likelihood)
        if likelihood_object.name != "gaussian":
            _check_logit_outputs(self.wrapped_model, likelihood_object.name)
        fit = _fitter(likelihood_object)
        _check_options(fit, options)
        if options.get("seed") is None and self._functional.is_sharded:
            # Workers of a multi-worker strategy must make the same random draws.
            options["seed"] = self._functional.shared_seed()
        with _streaming.translate_pass_errors(streamed=_streaming.is_dataset(x)):
            posterior = fit(self, x, y, likelihood, **options)
        self._set_posterior(posterior)
        return self

    def _set_posterior(self, posterior):
        object.__setattr__(self, "_posterior", posterior)
        # Keras caches the compiled `predict` graph, which contains the previous
        # posterior. Dropping it makes the next `predict` trace the new one.
        self.predict_function = None

    def predictive_distribution(self, x, **options):
        """Return the posterior predictive distribution at x as a TFP distribution.

        Regression: independent `tfd.Normal` marginals with batch shape [N, O], or a
        joint multivariate normal over the N·O outputs with `joint=True`.
        Classification: `tfd.Categorical` (batch [N]) or `tfd.Bernoulli` (batch
        [N, 1]) with probabilities from the chosen link approximation.

        Args:
            x: inputs with N examples.
            **options: predictive options of the posterior (e.g. `joint`,
                `include_noise`, `variance` for regression; `link`,
                `num_samples`, `seed` for classification).

        Returns:
            A `tfp.distributions.Distribution`.

        Raises:
            ValueError: if the model has not been adapted (call `adapt(x, y)`
                first) or `x` is invalid.
        """
        if self._posterior is None:
            raise ValueError(
                "This LinearizedModel is not adapted, so it has no predictive "
                "distribution yet. Call `adapt(x, y)` first."
            )
        x = self._convert_x(x)
        return self._posterior.predictive_distribution(self, x, **options)

    # ------------------------------------------------------------------ prediction

    def prior_mean(self, x):
        """Return m(x) as [N, O]: the network's outputs, or zeros for mean="zero"."""
        x = self._convert_x(x)
        return self._prior_mean_flat(x)

    def call(self, inputs, training=None):
        """Return the predictive mean (class probabilities for classification).

        Before `adapt` this is m(x) in the model's output shape. After it, this is
        the posterior's predictive mean: the same shape for regression, and [N, C]
        probabilities for classification.
        """
        x = self._functional.convert_inputs(inputs)
        if self._posterior is not None:
            return self._posterior.predict_mean(self, x)
        mean = self._prior_mean_flat(x)
        if self._functional.output_projection is not None:
            return mean
        return self._functional.unflatten_outputs(mean)

    def _prior_mean_flat(self, x):
        n = self._functional.num_examples(x)
        if self.mean == "zero":
            return tf.zeros([n, self.num_outputs], self._functional.dtype)
        if isinstance(n, int) and n == 0:
            return tf.zeros([0, self.num_outputs], self._functional.dtype)
        return self._functional.outputs(x)

    # ------------------------------------------------------------------ validation

    def check_dense_size(self, shape, what, max_dense_bytes, alternative):
        """Raise ValueError if a dense tensor of `shape` exceeds the byte limit."""
        limit = self.max_dense_bytes if max_dense_bytes is None else (
            _checks.check_positive_int("max_dense_bytes", max_dense_bytes)
        )
        size = int(np.prod(shape, dtype=np.int64)) * self._functional.dtype.size
        if size > limit:
            raise ValueError(
                f"`{what}` would form a dense tensor of shape {tuple(shape)} "
                f"({size:,} bytes), above `max_dense_bytes`={limit:,}; {alternative}, "
                "or raise `max_dense_bytes`."
            )

    def _convert_x(self, x, name="x", allow_dataset=False):
        return self._functional.convert_inputs(x, name, allow_dataset=allow_dataset)

    def _convert_tangents(self, tangents, name="tangents"):
        tangents = _convert_float(tangents, name, self._functional.dtype)
        if tangents.shape.rank != 1 or tangents.shape[0] != self.num_parameters:
            raise ValueError(
                f"`{name}` must be a flat vector [P] with P={self.num_parameters} "
                f"(linearized parameters); received shape {tuple(tangents.shape)}."
            )
        return _checks.check_finite(name, tangents)

    def _convert_cotangents(self, cotangents, num_examples):
        cotangents = _convert_float(cotangents, "cotangents", self._functional.dtype)
        expected = (num_examples, self.num_outputs)
        if tuple(cotangents.shape) != expected:
            raise ValueError(
                f"`cotangents` must be [N, O] with N={num_examples} (from `x`) and "
                f"O={self.num_outputs} (model outputs); received shape "
                f"{tuple(cotangents.shape)}."
            )
        return _checks.check_finite("cotangents", cotangents)

    # ------------------------------------------------------------------ config

    def get_config(self):
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.wrapped_model),
            mean=self.mean,
            layers=self._layers_config,
            batch_size=self.batch_size,
            output_projection=_projection_config(self._projection_config),
            max_dense_bytes=self.max_dense_bytes,
        )
        if self._posterior is not None:
            config["posterior"] = self._posterior.get_state()[0]
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        projection = config.get("output_projection")
        if isinstance(projection, list):
            config["output_projection"] = np.asarray(projection)
        posterior_config = config.pop("posterior", None)
        instance = cls(**config)
        # The posterior's arrays arrive later, in `load_own_variables`.
        object.__setattr__(instance, "_pending_posterior_config", posterior_config)
        return instance

    def export(self, filepath, format="tf_saved_model", verbose=True, input_signature=None):
        """Export a SavedModel that serves the posterior predictive (for TF Serving).

        The "serving_default" signature returns, for regression, "mean" [N, O],
        "variance" [N, O] (predictive, noise included) and "latent_variance"
        [N, O]; for classification, "probabilities" [N, C]; before `adapt`,
        "mean" only. Loading needs only TensorFlow (`tf.saved_model.load`), not
        tf_linntk or the training data.

        Args:
            filepath: directory to write.
            format: "tf_saved_model", the only supported format.
            verbose: whether to log the path written.
            input_signature: optional `tf.TensorSpec` structure for the inputs;
                by default the wrapped model's inputs with a free batch size.

        Raises:
            ValueError: for another `format`, or when the input shape is unknown
                and no `input_signature` is given.
        """
        _checks.check_option("format", format, ("tf_saved_model",))
        from tf_linntk import _export

        _export.export_saved_model(self, filepath, input_signature)
        if verbose:
            _logger.info("Saved the serving artifact at %s.", filepath)

    def save_own_variables(self, store):
        """Save θ₀, the fixed state and the posterior (Keras saving hook).

        The posterior's configuration goes into the store as JSON bytes too, so
        `save_weights` files restore the posterior without the model config.
        """
        for index, variable in enumerate(self._functional.snapshot_variables):
            store[f"snapshot_{index}"] = variable.numpy()
        if self._posterior is not None:
            config, arrays = self._posterior.get_state()
            for name, array in arrays.items():
                store[f"posterior_{name}"] = np.asarray(array)
            store[_POSTERIOR_CONFIG_KEY] = np.frombuffer(json.dumps(config).encode(), np.uint8)

    def load_own_variables(self, store):
        """Restore what `save_own_variables` saved (Keras loading hook).

        A store without a posterior leaves this model not adapted, as it was saved.
        """
        snapshots = self._functional.snapshot_variables
        for index, variable in enumerate(snapshots):
            variable.assign(store[f"snapshot_{index}"])
        keys = list(store.keys())
        posterior_config = getattr(self, "_pending_posterior_config", None)
        if posterior_config is None and _POSTERIOR_CONFIG_KEY in keys:
            posterior_config = json.loads(np.asarray(store[_POSTERIOR_CONFIG_KEY]).tobytes())
        object.__setattr__(self, "_pending_posterior_config", None)
        if posterior_config is None:
            self._set_posterior(None)
            return
        arrays = {
            key[len("posterior_"):]: np.asarray(store[key])
            for key in keys
            if key.startswith("posterior_")
        }
        self._set_posterior(base.posterior_from_state(posterior_config, arrays))


# Store key of the posterior configuration (JSON bytes) in saved weights.
_POSTERIOR_CONFIG_KEY = "config_of_posterior"


def _fitter(likelihood):
    """Return the fit function of the inference module for `likelihood`."""
    if likelihood.name == "gaussian":
        from tf_linntk.inference import regression

        return regression.fit
    from tf_linntk.inference import classification

    return classification.fit


def _check_logit_outputs(model, likelihood_name):
    """Raise ValueError if the model's last layer squashes its outputs into probabilities."""
    last_layer = model.layers[-1] if model.layers else None
    activation = getattr(last_layer, "activation", None)
    names = {getattr(activation, "__name__", ""), type(last_layer).__name__.lower()}
    squashing = sorted(names & {"softmax", "sigmoid", "log_softmax"})
    if squashing:
        raise ValueError(
            f"`likelihood`={likelihood_name!r} needs a model that outputs logits, but the "
            f"last layer of `model` ({last_layer.name!r}) applies {squashing[0]}. Wrap "
            "the model without its final activation, e.g. a copy whose last Dense layer "
            "has activation=None."
        )


def _check_options(fit, options):
    """Raise TypeError naming `adapt` for options the fit function does not take."""
    parameters = inspect.signature(fit).parameters
    accepted = [name for name, p in parameters.items() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"`adapt` got unknown option(s) {unknown} for this likelihood; valid "
            f"options: {sorted(accepted)}."
        )


def _convert_float(value, name, dtype):
    tensor = tf.convert_to_tensor(value)
    if not tensor.dtype.is_floating:
        raise TypeError(
            f"`{name}` must be a float tensor; received dtype {tensor.dtype.name}."
        )
    return tf.cast(tensor, dtype)


def _layer_names(layers):
    if layers is None:
        return None
    items = layers if isinstance(layers, (list, tuple)) else [layers]
    return [item if isinstance(item, str) else getattr(item, "name", item) for item in items]


def _projection_config(projection):
    if projection is None or isinstance(projection, (int, np.integer)):
        return None if projection is None else int(projection)
    return np.asarray(projection).tolist()
