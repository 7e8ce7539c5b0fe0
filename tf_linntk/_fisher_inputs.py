"""Input checks and reference outputs o [N, O] of a `FisherOperator`."""

import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import likelihoods

__all__ = ["check_likelihood_fits", "reference_outputs"]


def check_likelihood_fits(likelihood, num_outputs):
    """Raise ValueError if `likelihood` cannot model O = `num_outputs` outputs."""
    expected = likelihood.num_outputs
    if expected is not None and expected != num_outputs:
        raise ValueError(
            f"`likelihood` {likelihood!r} needs O={expected} outputs per example, but "
            f"the model has O={num_outputs}. Use a likelihood that fits O={num_outputs} "
            f"(e.g. 'categorical' for {num_outputs} class logits)."
        )
    if isinstance(likelihood, likelihoods.Categorical) and num_outputs < 2:
        raise ValueError(
            f"`likelihood` 'categorical' needs O >= 2 logits per example, but the model "
            f"has O={num_outputs}. For a single logit use 'bernoulli'."
        )


def reference_outputs(functional, products, x, outputs, needs_shift):
    """Return the reference outputs o [N, O] and the shift o − f(x; θ₀) (or None)."""
    num_examples = functional.num_examples(x)
    if not isinstance(num_examples, int):
        raise ValueError(
            "`x` must have a known number of examples to build a Fisher operator; "
            "received inputs with a dynamic first dimension."
        )
    if outputs is None:
        return _network_outputs(functional, products, x, num_examples), None
    reference = _convert_outputs(outputs, num_examples, functional.num_outputs, functional.dtype)
    if not needs_shift:
        return reference, None
    return reference, reference - _network_outputs(functional, products, x, num_examples)


def _network_outputs(functional, products, x, num_examples):
    if num_examples == 0:
        return tf.zeros([0, functional.num_outputs], functional.dtype)
    return products.outputs(x)  # [N, O]


def _convert_outputs(outputs, num_examples, num_outputs, dtype):
    tensor = tf.convert_to_tensor(outputs)
    if not tensor.dtype.is_floating:
        raise TypeError(
            f"`outputs` must be a float tensor [N, O] of outputs or logits; received "
            f"dtype {tensor.dtype.name}."
        )
    if tuple(tensor.shape) != (num_examples, num_outputs):
        raise ValueError(
            f"`outputs` must be [N, O] with N={num_examples} (from `x`) and "
            f"O={num_outputs} (model outputs); received shape {tuple(tensor.shape)}."
        )
    return _checks.check_finite("outputs", tf.cast(tensor, dtype))
