"""SavedModel export of an adapted `LinearizedModel` for TF Serving."""

import tensorflow as tf

from tf_linntk import _model_checks

SERVING_SIGNATURE = "serving_default"


def export_saved_model(lin, filepath, input_signature=None):
    """Write a SavedModel whose serving signature returns the posterior predictive.

    The SavedModel needs neither tf_linntk nor the training data to load. Its
    graph contains the pure function of the network, and its variables store θ₀,
    the fixed state and the posterior (w and the covariance root).

    Outputs of the "serving_default" signature (and of the `serve` function):
        regression: "mean" [N, O] in the model's dtype, "variance" [N, O]
            (predictive variance of y, noise included) and "latent_variance"
            [N, O] (of f), both float64;
        classification: "probabilities" [N, C] ([N, 1] for Bernoulli).
    Before `adapt`, only "mean" (the mean function m(x)) is returned.

    Args:
        lin: the `LinearizedModel`.
        filepath: directory to write.
        input_signature: optional `tf.TensorSpec` structure of the inputs; by
            default built from the wrapped model's inputs with a free batch size.

    Raises:
        ValueError: if no input signature is given and the model's input shape is
            unknown.
    """
    signature = input_signature or _default_signature(lin)
    module = tf.Module()
    module.snapshot_variables = list(lin.functional.snapshot_variables)
    module.wrapped_model = lin.wrapped_model
    posterior = lin.posterior
    if posterior is not None:
        module.posterior_variables = list(posterior.variables)

    def serve(x):
        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        if posterior is None:
            return {"mean": lin._prior_mean_flat(x)}
        return posterior.serving_outputs(lin, x)

    module.serve = tf.function(serve, input_signature=[signature])
    tf.saved_model.save(
        module, filepath, signatures={SERVING_SIGNATURE: module.serve.get_concrete_function()}
    )


def _default_signature(lin):
    specs = _model_checks.input_specs(lin.wrapped_model)
    if specs is None:
        raise ValueError(
            "`input_signature` is required to export this model, because its input "
            "shape is unknown; pass e.g. tf.TensorSpec([None, 28, 28, 1], tf.float32)."
        )
    dtype = lin.functional.dtype

    def to_spec(spec, path):
        return tf.TensorSpec([None, *spec.shape], spec.dtype or dtype)

    return _model_checks._map_specs(to_spec, specs)
