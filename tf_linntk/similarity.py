"""Similarity of two networks' Jacobians on the same inputs, from implicit products."""

import keras
import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import linearize

__all__ = ["SPACES", "jacobian_similarity"]

SPACES = ("auto", "function", "parameter")

# Identity columns go through each batched product in blocks of this many
# right-hand sides, so memory is O(block · max(N·O, P)) and never (N·O)² or P².
_COLUMNS_PER_PRODUCT = 64


def jacobian_similarity(model_a, model_b, x, *, x_b=None, space="auto"):
    """Compute the alignment of two models' Jacobians (their finite NTKs) on x.

    With A = J_a(x) [N·O, Pa] and B = J_b(x) [N·O, Pb] (the parameter counts may
    differ),

        sim(A, B) = tr(AᵀB BᵀA) / (‖AAᵀ‖_F ‖BBᵀ‖_F) = ⟨K_a, K_b⟩_F / (‖K_a‖_F ‖K_b‖_F),

    the uncentered alignment of the kernels K = J Jᵀ. It lies in [0, 1], is 1 for
    a model with itself, is symmetric, and does not change when either model's
    outputs are multiplied by a constant.

    Neither Jacobian is formed. "function" space multiplies K_a and K_b with
    identity columns (N·O columns, one batched VJP and one batched JVP per
    block of columns and model) and sums ⟨K_a eⱼ, K_b eⱼ⟩, ‖K_a eⱼ‖² and
    ‖K_b eⱼ‖². "parameter" space uses ‖AAᵀ‖_F = ‖AᵀA‖_F and ‖AᵀB‖_F from the
    columns AᵀA eⱼ, BᵀB eⱼ and AᵀB eⱼ (Pa + Pb batched JVP columns and
    Pa + 2·Pb batched VJP columns). "auto" takes the fewer products: function
    space costs 4·N·O columns, parameter space 2·Pa + 3·Pb.

    Args:
        model_a: a built Keras model or a `tf_linntk.LinearizedModel`.
        model_b: a built Keras model or a `LinearizedModel` with the same
            number of outputs O per example.
        x: inputs with N examples (array, tensor, tuple/list/dict).
        x_b: optional inputs of `model_b` with the same N, when the two models
            take the examples in different forms; defaults to `x`.
        space: "auto", "function" or "parameter".

    Returns:
        float, sim(A, B) in [0, 1].

    Raises:
        TypeError: if a model is neither a Keras model nor a `LinearizedModel`.
        ValueError: if O or N differ, `space` is invalid, or a Jacobian is zero
            on x.

    Example:
        >>> jacobian_similarity(model, model, x)  # doctest: +SKIP
        1.0
    """
    space = _checks.check_option("space", space, SPACES)
    lin_a = _as_linearized(model_a, "model_a")
    lin_b = _as_linearized(model_b, "model_b")
    if lin_b.num_outputs != lin_a.num_outputs:
        raise ValueError(
            f"`model_b` must have the same number of outputs per example as `model_a` "
            f"(O={lin_a.num_outputs}); received O={lin_b.num_outputs}."
        )
    inputs_a = lin_a._convert_x(x, "x")
    inputs_b = lin_b._convert_x(x if x_b is None else x_b, "x" if x_b is None else "x_b")
    num_examples = _num_examples(lin_a, inputs_a, "x")
    if _num_examples(lin_b, inputs_b, "x_b") != num_examples:
        raise ValueError(
            f"`x_b` must contain N={num_examples} examples (from `x`); received "
            f"N={_num_examples(lin_b, inputs_b, 'x_b')}."
        )

    size = num_examples * lin_a.num_outputs
    if space == "auto":
        parameter_cost = 2 * lin_a.num_parameters + 3 * lin_b.num_parameters
        space = "function" if 4 * size <= parameter_cost else "parameter"
    if space == "function":
        cross, norm_a, norm_b = _function_space_terms(lin_a, inputs_a, lin_b, inputs_b, size)
    else:
        cross, norm_a, norm_b = _parameter_space_terms(lin_a, inputs_a, lin_b, inputs_b)
    for name, norm in (("model_a", norm_a), ("model_b", norm_b)):
        if not norm > 0.0:
            raise ValueError(f"The Jacobian of `{name}` is zero on `x`, so the similarity is undefined.")
    return float(cross / (np.sqrt(norm_a) * np.sqrt(norm_b)))


def _function_space_terms(lin_a, x_a, lin_b, x_b, size):
    """Return (⟨K_a, K_b⟩_F, ‖K_a‖²_F, ‖K_b‖²_F) from K eⱼ products in blocks."""
    ntk_a, ntk_b = lin_a.ntk(x_a), lin_b.ntk(x_b)
    cross = norm_a = norm_b = 0.0
    for start in range(0, size, _COLUMNS_PER_PRODUCT):
        stop = min(start + _COLUMNS_PER_PRODUCT, size)
        columns = tf.transpose(tf.one_hot(tf.range(start, stop), size, dtype=tf.float64))  # [M, R]
        product_a = _matmul_float64(ntk_a, columns)  # K_a E, [M, R]
        product_b = _matmul_float64(ntk_b, columns)  # K_b E, [M, R]
        cross += float(tf.reduce_sum(product_a * product_b))
        norm_a += float(tf.reduce_sum(tf.square(product_a)))
        norm_b += float(tf.reduce_sum(tf.square(product_b)))
    return cross, norm_a, norm_b


def _parameter_space_terms(lin_a, x_a, lin_b, x_b):
    """Return (‖AᵀB‖²_F, ‖AᵀA‖²_F, ‖BᵀB‖²_F) from column blocks of A and B."""
    functional_a, functional_b = lin_a.functional, lin_b.functional
    norm_a = 0.0
    for tangents in _identity_blocks(lin_a.num_parameters, functional_a.dtype):
        columns = functional_a.jvp_batched(x_a, tangents)  # A E, [R, N, O]
        gram = functional_a.vjp_batched(x_a, columns)  # (AᵀA E)ᵀ, [R, Pa]
        norm_a += _sum_squares(gram)
    cross = norm_b = 0.0
    for tangents in _identity_blocks(lin_b.num_parameters, functional_b.dtype):
        columns = functional_b.jvp_batched(x_b, tangents)  # B E, [R, N, O]
        norm_b += _sum_squares(functional_b.vjp_batched(x_b, columns))  # BᵀB E
        cotangents = tf.cast(columns, functional_a.dtype)
        cross += _sum_squares(functional_a.vjp_batched(x_a, cotangents))  # AᵀB E
    return cross, norm_a, norm_b


def _identity_blocks(size, dtype):
    """Yield the rows of the identity [size, size] in blocks [R, size]."""
    for start in range(0, size, _COLUMNS_PER_PRODUCT):
        stop = min(start + _COLUMNS_PER_PRODUCT, size)
        yield tf.one_hot(tf.range(start, stop), size, dtype=dtype)


def _matmul_float64(operator, columns):
    return tf.cast(operator.matmul(tf.cast(columns, operator.dtype)), tf.float64)


def _sum_squares(tensor):
    return float(tf.reduce_sum(tf.square(tf.cast(tensor, tf.float64))))


def _as_linearized(model, name):
    """Return `model` as a LinearizedModel, wrapping a Keras model."""
    if isinstance(model, linearize.LinearizedModel):
        return model
    if isinstance(model, keras.Model):
        return linearize.LinearizedModel(model)
    raise TypeError(
        f"`{name}` must be a Keras model or a tf_linntk.LinearizedModel; received an "
        f"object of type {type(model).__name__}."
    )


def _num_examples(lin, x, name):
    num_examples = lin.functional.num_examples(x)
    if not isinstance(num_examples, int) or num_examples == 0:
        raise ValueError(f"`{name}` must contain at least one example; received N={num_examples}.")
    return num_examples
