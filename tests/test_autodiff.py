"""Tests of the linearized products (JVP, VJP, Jacobian) against dense references."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tests import reference

pytestmark = pytest.mark.usefixtures("float64")

# Float64 products against the dense `tape.jacobian` reference: both sides sum the
# same terms in different orders, so they agree to a few ulps of the largest entry.
RTOL = 1e-10


def assert_close(actual, expected, rtol=RTOL):
    """Compare with a relative tolerance and an absolute one scaled by the largest entry."""
    expected = np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * scale)


def random_tangents(num_parameters, seed=0):
    return np.random.default_rng(seed).normal(size=num_parameters)


def random_cotangents(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape)


# ---------------------------------------------------------------------- zoo products


@pytest.mark.parametrize("name", reference.ZOO_NAMES, ids=reference.ZOO_NAMES)
def test_jvp_matches_dense_jacobian(zoo, name):
    """jvp(x, v) equals J v with J from tape.jacobian on the original model."""
    case, lin = zoo.case(name), zoo.lin(name)
    tangents = random_tangents(lin.num_parameters)
    assert_close(lin.jvp(case.x, tangents), case.jacobian @ tangents)


@pytest.mark.parametrize("name", reference.ZOO_NAMES, ids=reference.ZOO_NAMES)
def test_vjp_matches_dense_jacobian(zoo, name):
    """vjp(x, u) equals Jᵀ u with J from tape.jacobian on the original model."""
    case, lin = zoo.case(name), zoo.lin(name)
    cotangents = random_cotangents(case.jacobian.shape[:2])
    expected = np.einsum("nop,no->p", case.jacobian, cotangents)
    assert_close(lin.vjp(case.x, cotangents), expected)


@pytest.mark.parametrize("name", reference.ZOO_NAMES, ids=reference.ZOO_NAMES)
def test_jacobian_matches_tape_jacobian(zoo, name):
    """jacobian(x) has shape [N, O, P] and equals the dense reference."""
    case, lin = zoo.case(name), zoo.lin(name)
    jac = lin.jacobian(case.x)
    assert jac.shape == (reference.NUM_EXAMPLES, lin.num_outputs, lin.num_parameters)
    assert_close(jac, case.jacobian)


@pytest.mark.parametrize("name", reference.ZOO_NAMES, ids=reference.ZOO_NAMES)
def test_jvp_vjp_are_adjoint(zoo, name):
    """⟨u, J v⟩ equals ⟨Jᵀ u, v⟩ for random u and v."""
    case, lin = zoo.case(name), zoo.lin(name)
    tangents = random_tangents(lin.num_parameters, seed=2)
    cotangents = random_cotangents((reference.NUM_EXAMPLES, lin.num_outputs), seed=3)
    left = np.sum(cotangents * lin.jvp(case.x, tangents).numpy())
    right = np.sum(lin.vjp(case.x, cotangents).numpy() * tangents)
    assert_close(left, right)


def test_batched_products_match_dense_jacobian(zoo):
    """jvp_batched and vjp_batched equal J Vᵀ and U J for R = 3 right-hand sides."""
    case, lin = zoo.case("multi_output"), zoo.lin("multi_output")
    functional = lin.functional
    x = functional.convert_inputs(case.x)
    tangents = np.random.default_rng(0).normal(size=(3, lin.num_parameters))
    cotangents = np.random.default_rng(1).normal(size=(3, *case.jacobian.shape[:2]))
    assert_close(
        functional.jvp_batched(x, tf.constant(tangents)),
        np.einsum("nop,rp->rno", case.jacobian, tangents),
    )
    assert_close(
        functional.vjp_batched(x, tf.constant(cotangents)),
        np.einsum("nop,rno->rp", case.jacobian, cotangents),
    )


def test_num_outputs_concatenates_output_tensors(zoo):
    """Two output tensors [N, 2] and [N, 1] give O = 3, in `model.outputs` order."""
    case, lin = zoo.case("two_output_tensors"), zoo.lin("two_output_tensors")
    assert lin.num_outputs == 3
    first, second = case.model(case.x, training=False)
    outputs = lin.functional.outputs(lin.functional.convert_inputs(case.x))
    assert_close(outputs, np.concatenate([first, second], axis=1))


def test_num_outputs_flattens_rank4_outputs(zoo):
    """Outputs [N, 3, 3, 2] are flattened row-major to O = 18."""
    case, lin = zoo.case("rank4_outputs"), zoo.lin("rank4_outputs")
    assert lin.num_outputs == 18
    outputs = lin.functional.outputs(lin.functional.convert_inputs(case.x))
    expected = np.reshape(case.model(case.x, training=False), (reference.NUM_EXAMPLES, 18))
    assert_close(outputs, expected)


# ---------------------------------------------------------------------- flat order


def test_flatten_unflatten_round_trip(zoo):
    """unflatten(flatten(θ)) returns θ, with the variable shapes in model order."""
    case, lin = zoo.case("cnn_bn_dropout"), zoo.lin("cnn_bn_dropout")
    params = [v.numpy() for v in case.model.trainable_variables]
    flat = lin.flatten_parameters(params)
    assert flat.shape == (lin.num_parameters,)
    assert_close(flat, np.concatenate([p.ravel() for p in params]))
    pieces = lin.unflatten_parameters(flat)
    assert [tuple(p.shape) for p in pieces] == [p.shape for p in params]
    for piece, param in zip(pieces, params):
        np.testing.assert_array_equal(piece, param)


def test_jvp_one_hot_tangent_selects_entry(zoo):
    """A one-hot tangent at flat index k gives the derivative w.r.t. that row-major entry."""
    case, lin = zoo.case("cnn_bn_dropout"), zoo.lin("cnn_bn_dropout")
    rng = np.random.default_rng(5)
    offset = 0
    for variable in case.model.trainable_variables:
        jac = reference.dense_jacobian(case.model, case.x, [variable])  # [N, O, size]
        index = tuple(int(rng.integers(0, d)) for d in variable.shape)
        flat_index = int(np.ravel_multi_index(index, variable.shape))
        tangents = np.zeros(lin.num_parameters)
        tangents[offset + flat_index] = 1.0
        assert_close(lin.jvp(case.x, tangents), jac[:, :, flat_index])
        offset += int(np.prod(variable.shape))
    assert offset == lin.num_parameters


# ---------------------------------------------------------------------- layer selection


def _selected_variables(model, layers):
    ids = {id(v) for layer in layers for v in layer.trainable_variables}
    return [v for v in model.trainable_variables if id(v) in ids]


@pytest.mark.parametrize("by", ["name", "object"], ids=["by_name", "by_object"])
def test_layers_selection_follows_model_order(zoo, by):
    """layers= linearizes only the chosen layers, in model.trainable_variables order."""
    case = zoo.case("cnn_bn_dropout")
    chosen = [case.model.get_layer("head"), case.model.get_layer("conv")]  # reversed order
    layers = [layer.name for layer in chosen] if by == "name" else chosen
    lin = tf_linntk.LinearizedModel(case.model, layers=layers)
    variables = _selected_variables(case.model, chosen)
    assert lin.num_parameters == sum(int(np.prod(v.shape)) for v in variables)
    jac = reference.dense_jacobian(case.model, case.x, variables)
    tangents = random_tangents(lin.num_parameters)
    assert_close(lin.jvp(case.x, tangents), jac @ tangents)
    assert_close(lin.jacobian(case.x), jac)


def test_layers_selection_keeps_other_layers_fixed(zoo):
    """Outputs with layers= equal the model's: unselected variables stay at θ₀."""
    case = zoo.case("cnn_bn_dropout")
    lin = tf_linntk.LinearizedModel(case.model, layers=["bn"])
    assert lin.num_parameters == 6  # gamma and beta of 3 channels
    assert_close(lin(case.x), case.model(case.x, training=False))


def test_frozen_layer_is_not_linearized(float64):
    """A layer with trainable=False adds no parameters and keeps its weights."""
    case = reference.build_case("cnn_bn_dropout")
    case.model.get_layer("conv").trainable = False
    lin = tf_linntk.LinearizedModel(case.model)
    variables = case.model.trainable_variables
    assert lin.num_parameters == sum(int(np.prod(v.shape)) for v in variables)
    assert_close(lin.jacobian(case.x), reference.dense_jacobian(case.model, case.x, variables))
    assert_close(lin(case.x), case.model(case.x, training=False))


# ---------------------------------------------------------------------- batching and edges


@pytest.mark.parametrize("batch_size", [1, 3, 1000], ids=["bs1", "bs3", "bs1000"])
def test_products_independent_of_batch_size(zoo, batch_size):
    """jvp, vjp and jacobian agree with the dense reference for any batch_size."""
    case, lin = zoo.case("cnn_bn_dropout"), zoo.lin("cnn_bn_dropout", batch_size)
    tangents = random_tangents(lin.num_parameters)
    cotangents = random_cotangents(case.jacobian.shape[:2])
    assert_close(lin.jvp(case.x, tangents), case.jacobian @ tangents)
    assert_close(lin.vjp(case.x, cotangents), np.einsum("nop,no->p", case.jacobian, cotangents))
    assert_close(lin.jacobian(case.x), case.jacobian)


@pytest.mark.parametrize("name", ["mlp", "two_inputs_dict", "rank4_outputs"])
def test_products_empty_input(zoo, name):
    """N = 0 gives empty jvp [0, O], zero vjp [P], jacobian [0, O, P] and outputs [0, O]."""
    case, lin = zoo.case(name), zoo.lin(name)
    x = reference.take_examples(case.x, 0)
    num_outputs, num_parameters = lin.num_outputs, lin.num_parameters
    assert lin.jvp(x, random_tangents(num_parameters)).shape == (0, num_outputs)
    vjp = lin.vjp(x, np.zeros((0, num_outputs)))
    assert vjp.shape == (num_parameters,)
    np.testing.assert_array_equal(vjp, np.zeros(num_parameters))
    assert lin.jacobian(x).shape == (0, num_outputs, num_parameters)
    converted = lin.functional.convert_inputs(x)
    assert lin.functional.outputs(converted).shape == (0, num_outputs)
    assert lin.functional.jacobian(converted).shape == (0, num_outputs, num_parameters)


def test_vjp_embedding_large_vocabulary(float64):
    """vjp through a 10,000 x 16 Embedding equals the dense reference on a small batch."""
    keras.utils.set_random_seed(0)
    model = reference.embedding(vocabulary=10_000, dim=16)
    x = np.random.default_rng(0).integers(0, 10_000, size=(3, 4)).astype("int32")
    lin = tf_linntk.LinearizedModel(model, batch_size=2)
    cotangents = random_cotangents((3, 2))
    jac = reference.dense_jacobian(model, x)
    assert_close(lin.vjp(x, cotangents), np.einsum("nop,no->p", jac, cotangents))


def test_vjp_embedding_accumulates_sparse_rows(float64):
    """The VJP adds Embedding gradients with tensor_scatter_nd_add, never densified per chunk."""
    keras.utils.set_random_seed(0)
    lin = tf_linntk.LinearizedModel(reference.embedding(vocabulary=10_000, dim=16))
    x = tf.zeros((3, 4), tf.int32)
    cotangents = tf.zeros((3, 2), tf.float64)
    graph_def = lin.functional._vjp_fn.get_concrete_function(x, cotangents).graph.as_graph_def()
    op_types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        op_types.update(node.op for node in function.node_def)
    assert "TensorScatterAdd" in op_types
    # Densifying an IndexedSlices gradient would add a segment sum over the vocabulary.
    assert "UnsortedSegmentSum" not in op_types


# ---------------------------------------------------------------------- compilation


@pytest.fixture
def tensorflow_warnings(caplog):
    """Capture the warnings that TensorFlow logs (e.g. its retracing warning)."""
    caplog.set_level(logging.WARNING, logger="tensorflow")
    return caplog


def test_products_do_not_retrace(float64, tensorflow_warnings):
    """jvp, vjp and outputs for N = 1 … 20 trace at most twice and log no retracing."""
    keras.utils.set_random_seed(0)
    lin = tf_linntk.LinearizedModel(reference.mlp())
    tangents = random_tangents(lin.num_parameters)
    for n in range(1, 21):
        x = np.random.default_rng(n).normal(size=(n, 3))
        lin.jvp(x, tangents)
        lin.vjp(x, np.ones((n, 1)))
        lin(x)
    functional = lin.functional
    for fn in (functional._jvp_fn, functional._vjp_fn, functional._outputs_fn):
        assert fn.experimental_get_tracing_count() <= 2
    assert "retracing" not in tensorflow_warnings.text


def test_wrappers_do_not_share_trace_counts(float64, tensorflow_warnings):
    """Six wrappers of one model, each called once, log no retracing warning."""
    keras.utils.set_random_seed(0)
    model = reference.mlp()
    x = np.ones((2, 3))
    for _ in range(6):
        tf_linntk.LinearizedModel(model).jvp(x, np.ones(21))
    assert "retracing" not in tensorflow_warnings.text


def test_products_inside_tf_function(zoo):
    """jvp, vjp, jacobian and lin(x) run inside a user tf.function (NTK: test_kernels.py)."""
    case, lin = zoo.case("two_inputs_dict"), zoo.lin("two_inputs_dict")
    x = lin.functional.convert_inputs(case.x)
    tangents = tf.constant(random_tangents(lin.num_parameters))
    cotangents = tf.constant(random_cotangents(case.jacobian.shape[:2]))
    expected_jvp = case.jacobian @ tangents.numpy()

    assert_close(tf.function(lambda v: lin.functional.jvp(x, v))(tangents), expected_jvp)
    assert_close(tf.function(lambda v: lin.jvp(case.x, v))(tangents), expected_jvp)
    assert_close(
        tf.function(lambda u: lin.vjp(case.x, u))(cotangents),
        np.einsum("nop,no->p", case.jacobian, cotangents.numpy()),
    )
    assert_close(tf.function(lambda: lin.jacobian(case.x))(), case.jacobian)
    assert_close(tf.function(lambda: lin(case.x))(), reference.flat_outputs(case.model, case.x))


def test_products_leave_model_variables_unchanged(zoo):
    """Every product keeps the wrapped model's variables bit-identical."""
    case, lin = zoo.case("cnn_bn_dropout"), zoo.lin("cnn_bn_dropout", 3)
    before = reference.variable_values(case.model)
    lin.jvp(case.x, random_tangents(lin.num_parameters))
    lin.vjp(case.x, random_cotangents(case.jacobian.shape[:2]))
    lin.jacobian(case.x)
    lin(case.x)
    lin.ntk(case.x).matvec(tf.ones(reference.NUM_EXAMPLES * lin.num_outputs, tf.float64))
    reference.assert_variables_unchanged(case.model, before)


def test_output_projection_matches_projected_jacobian(zoo):
    """output_projection=W gives the Jacobian of f(x) W, i.e. Wᵀ applied to J per example."""
    case = zoo.case("multi_output")
    projection = np.random.default_rng(0).normal(size=(3, 2))
    lin = tf_linntk.LinearizedModel(case.model, output_projection=projection)
    assert lin.num_outputs == 2
    expected = np.einsum("nop,ok->nkp", case.jacobian, projection)
    assert_close(lin.jacobian(case.x), expected)
    tangents = random_tangents(lin.num_parameters)
    assert_close(lin.jvp(case.x, tangents), expected @ tangents)
