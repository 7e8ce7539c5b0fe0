"""Tests of the LinearizedModel wrapper: outputs before adapt, state, config and input checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tests import reference

pytestmark = pytest.mark.usefixtures("float64")

# Float64 outputs of the wrapper against the model's own call: the same operations
# in the same order, so only a few ulps apart.
RTOL = 1e-12

CALL_ZOO = ["mlp", "cnn_bn_dropout", "two_inputs_dict", "two_output_tensors", "rank4_outputs"]


def assert_structure_close(actual, expected):
    """Assert equal nesting, shapes and values (to RTOL) of two output structures."""
    keras.tree.assert_same_structure(actual, expected)
    for got, want in zip(keras.tree.flatten(actual), keras.tree.flatten(expected)):
        assert tuple(got.shape) == tuple(want.shape)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=RTOL)


# ---------------------------------------------------------------------- outputs before adapt


@pytest.mark.parametrize("name", CALL_ZOO, ids=CALL_ZOO)
def test_call_before_adapt_returns_network_output(zoo, name):
    """lin(x) with mean="network" equals model(x) in the model's output structure."""
    case, lin = zoo.case(name), zoo.lin(name)
    assert_structure_close(lin(case.x), case.model(case.x, training=False))


@pytest.mark.parametrize("name", ["mlp", "two_inputs_dict", "two_output_tensors"])
def test_predict_before_adapt_returns_network_output(zoo, name):
    """lin.predict(x) equals model.predict(x) before adapt."""
    case, lin = zoo.case(name), zoo.lin(name)
    expected = case.model.predict(case.x, verbose=0)
    assert_structure_close(lin.predict(case.x, verbose=0), expected)


def test_call_dict_outputs_keep_structure():
    """A model with dict outputs gives lin(x) as a dict with the same keys and shapes."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    outputs = {"mean": keras.layers.Dense(2)(hidden), "scale": keras.layers.Dense(1)(hidden)}
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(4, 3))
    lin = tf_linntk.LinearizedModel(model)
    assert lin.num_outputs == 3
    assert_structure_close(lin(x), model(x, training=False))


def test_call_zero_mean_returns_zeros(zoo):
    """lin(x) with mean="zero" returns zeros in the model's output structure."""
    case = zoo.case("two_output_tensors")
    lin = tf_linntk.LinearizedModel(case.model, mean="zero")
    expected = [np.zeros((4, 2)), np.zeros((4, 1))]
    assert_structure_close(lin(case.x), expected)


def test_call_empty_input(zoo):
    """lin(x) on N = 0 examples returns [0, *output_shape]."""
    case, lin = zoo.case("rank4_outputs"), zoo.lin("rank4_outputs")
    assert lin(reference.take_examples(case.x, 0)).shape == (0, 3, 3, 2)


def test_call_keeps_float64_under_float32_policy(zoo):
    """A float64 model wrapped under the default float32 policy keeps float64 inputs."""
    case = zoo.case("mlp")
    with reference.keras_float_dtype("float32"):
        lin = tf_linntk.LinearizedModel(case.model)
    assert_structure_close(lin(case.x), case.model(case.x, training=False))


# ---------------------------------------------------------------------- wrapper state


def test_wrapper_exposes_no_model_variables(zoo):
    """The wrapper has no trainable variables and none of the model's variables."""
    case, lin = zoo.case("cnn_bn_dropout"), zoo.lin("cnn_bn_dropout")
    assert lin.trainable_variables == []
    assert lin.trainable_weights == []
    model_ids = {id(v) for v in case.model.variables}
    assert not any(id(v) in model_ids for v in lin.weights)
    assert not any(id(v) in model_ids for v in lin.variables)


def test_failed_calls_leave_model_variables_unchanged(zoo):
    """Calls that raise (bad tangents, NaN x, out-of-range token ids) keep the model's weights."""
    for name in ("cnn_bn_dropout", "embedding"):
        case, lin = zoo.case(name), zoo.lin(name)
        before = reference.variable_values(case.model)
        with pytest.raises(ValueError, match="`tangents`"):
            lin.jvp(case.x, np.ones(lin.num_parameters + 1))
        reference.assert_variables_unchanged(case.model, before)
    case, lin = zoo.case("cnn_bn_dropout"), zoo.lin("cnn_bn_dropout")
    x_nan = np.array(case.x)
    x_nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`x` must be finite"):
        lin.vjp(x_nan, np.ones((4, 2)))
    # An error raised inside the compiled computation: ids beyond the vocabulary of 7.
    case, lin = zoo.case("embedding"), zoo.lin("embedding")
    before = reference.variable_values(case.model)
    with pytest.raises(tf.errors.InvalidArgumentError):
        lin.jvp(np.full((2, 4), 50, dtype="int32"), np.ones(lin.num_parameters))
    reference.assert_variables_unchanged(case.model, before)


def test_get_config_round_trip(zoo):
    """get_config/from_config keeps every constructor argument and the problem size."""
    case = zoo.case("cnn_bn_dropout")
    projection = np.random.default_rng(0).normal(size=(2, 3))
    lin = tf_linntk.LinearizedModel(
        case.model, mean="zero", layers=["conv", case.model.get_layer("head")],
        batch_size=7, output_projection=projection, max_dense_bytes=2**20,
    )
    config = lin.get_config()
    assert config["mean"] == "zero"
    assert config["layers"] == ["conv", "head"]
    assert config["batch_size"] == 7
    assert config["max_dense_bytes"] == 2**20
    np.testing.assert_array_equal(config["output_projection"], projection)

    rebuilt = tf_linntk.LinearizedModel.from_config(config)
    assert rebuilt.num_parameters == lin.num_parameters
    assert rebuilt.num_outputs == lin.num_outputs
    assert rebuilt.get_config()["layers"] == ["conv", "head"]
    np.testing.assert_array_equal(rebuilt.functional.output_projection, projection)


def test_config_arguments_rebuild_same_products(zoo):
    """The config's arguments applied to the same model give the same jvp."""
    case = zoo.case("cnn_bn_dropout")
    lin = tf_linntk.LinearizedModel(case.model, layers=["conv"], batch_size=3)
    config = lin.get_config()
    arguments = {k: config[k] for k in ("mean", "layers", "batch_size", "max_dense_bytes")}
    rebuilt = tf_linntk.LinearizedModel(case.model, **arguments)
    tangents = np.random.default_rng(0).normal(size=lin.num_parameters)
    np.testing.assert_array_equal(rebuilt.jvp(case.x, tangents), lin.jvp(case.x, tangents))


# ---------------------------------------------------------------------- model checks


def test_model_rejects_non_keras_object():
    """A non-Keras object raises TypeError naming `model`."""
    with pytest.raises(TypeError, match="`model` must be a built keras.Model"):
        tf_linntk.LinearizedModel(object())
    with pytest.raises(TypeError, match="`model` must be a built keras.Model"):
        tf_linntk.LinearizedModel(keras.layers.Dense(2))


def test_model_rejects_tf_keras_model():
    """A tf_keras (Keras 2) model raises TypeError naming `model` and Keras 3."""
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(3,))])
    with pytest.raises(TypeError, match="`model` is a tf_keras .* needs a Keras 3 model"):
        tf_linntk.LinearizedModel(model)


def test_model_rejects_unbuilt_model():
    """A model without variables raises ValueError saying how to build it."""
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"`model` .* is not built.*model.build\(input_shape\)"):
        tf_linntk.LinearizedModel(model)
    with pytest.raises(ValueError, match="is not built"):
        tf_linntk.LinearizedModel(reference.SubclassedMLP())


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_model_rejects_global_mixed_precision(policy):
    """A model built under a mixed-precision global policy raises ValueError naming `model`."""
    with reference.keras_float_dtype("float32", policy=policy):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="`model` layer .* computes in b?float16"):
        tf_linntk.LinearizedModel(model)


def test_model_rejects_low_precision_layer():
    """One layer with a bfloat16 dtype policy raises ValueError naming the layer."""
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, name="wide"),
        keras.layers.Dense(2, dtype="mixed_bfloat16", name="low"),
    ])
    with pytest.raises(ValueError, match="`model` layer 'low' computes in bfloat16"):
        tf_linntk.LinearizedModel(model)


def test_model_rejects_frozen_model(zoo):
    """A model with no trainable variables raises ValueError naming `model`."""
    model = reference.mlp()
    model.trainable = False
    with pytest.raises(ValueError, match="`model` .* has no trainable variables"):
        tf_linntk.LinearizedModel(model)


def test_model_rejects_other_keras_backend(monkeypatch):
    """A Keras backend other than TensorFlow raises ValueError naming the backend."""
    model = reference.mlp()
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="needs the TensorFlow Keras backend.*'jax'"):
        tf_linntk.LinearizedModel(model)


# ---------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mean": "prior"}, ValueError, "`mean` must be one of 'network', 'zero'; received 'prior'"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be a positive integer; received 0"),
        ({"batch_size": 2.5}, TypeError, "`batch_size` must be a positive integer"),
        ({"layers": ["nope"]}, ValueError, "`layers` entry 'nope' is not a layer"),
        ({"layers": []}, TypeError, "`layers` must be None or a non-empty list"),
        ({"layers": [3]}, TypeError, "`layers` entries must be keras layers or layer names"),
        ({"layers": ["flatten"]}, ValueError, "`layers` entry 'flatten' has no trainable"),
        ({"output_projection": np.ones((3, 2))}, ValueError,
         r"`output_projection` must be a matrix \[O_model, O\] with O_model=2"),
        ({"output_projection": "random"}, TypeError, "`output_projection` must be an int"),
        ({"output_projection": 0}, ValueError, "`output_projection` must be a positive integer"),
        ({"output_projection": np.full((2, 2), np.nan)}, ValueError,
         "`output_projection` must be finite"),
    ],
    ids=[
        "mean", "batch_size_zero", "batch_size_float", "layers_unknown_name",
        "layers_empty", "layers_int", "layers_without_weights", "projection_shape",
        "projection_string", "projection_zero", "projection_nan",
    ],
)
def test_constructor_rejects_invalid_argument(zoo, kwargs, error, match):
    """Invalid constructor arguments raise an error naming the argument."""
    model = zoo.case("cnn_bn_dropout").model
    with pytest.raises(error, match=match):
        tf_linntk.LinearizedModel(model, **kwargs)


def test_layers_rejects_foreign_layer(zoo):
    """A layer object from another model raises ValueError naming `layers`."""
    other = zoo.case("mlp").model.get_layer("head")
    with pytest.raises(ValueError, match="`layers` entry 'head' is a layer object that does not"):
        tf_linntk.LinearizedModel(zoo.case("cnn_bn_dropout").model, layers=[other])


# ---------------------------------------------------------------------- input checks


def _bad_inputs(case_x, name):
    """Return (x, error, match) cases for the zoo model `name` with inputs `case_x`."""
    if name == "mlp":
        return [
            (np.ones((4, 5)), ValueError, r"`x` must have per-example shape \(3,\)"),
            (np.ones((4,)), ValueError, r"`x` must have shape \[N, 3\]"),
            ([np.ones((4, 3)), np.ones((4, 3))], ValueError, "`x` must be a single array"),
            (np.array([["a", "b", "c"]]), TypeError, "`x` must be numeric"),
            (None, ValueError, "`x` is required"),
            (tf.data.Dataset.from_tensor_slices(np.ones((4, 3))), ValueError,
             r"`x` must have shape \[N, 3\].*elements must be batches"),
        ]
    if name == "two_inputs_dict":
        a, b = case_x["a"], case_x["b"]
        return [
            ([a, b], ValueError, r"`x` must be a dict with keys \['a', 'b'\]"),
            ({"a": a}, ValueError, r"`x` must be a dict with keys \['a', 'b'\].*received \['a'\]"),
            ({"a": a, "b": b[:2]}, ValueError, "same number of examples"),
            ({"a": a, "b": a}, ValueError, r"`x\['b'\]` must have per-example shape \(2,\)"),
        ]
    if name == "two_inputs_list":
        a, b = case_x
        return [
            ([a], ValueError, "`x` must be a list or tuple of 2 inputs"),
            ([a, b, b], ValueError, "`x` must be a list or tuple of 2 inputs"),
            ([a, b[:3]], ValueError, "same number of examples"),
            ({"a": a, "b": b}, ValueError, "`x` must be a list or tuple of 2 inputs"),
        ]
    return [(np.ones((4, 4)), TypeError, "`x` must contain integers")]  # embedding


@pytest.mark.parametrize(
    "name", ["mlp", "two_inputs_dict", "two_inputs_list", "embedding"]
)
def test_inputs_rejects_mismatched_x(zoo, name):
    """x whose structure, shape, dtype or N does not match the model raises, naming `x`."""
    case, lin = zoo.case(name), zoo.lin(name)
    tangents = np.ones(lin.num_parameters)
    for x, error, match in _bad_inputs(case.x, name):
        with pytest.raises(error, match=match):
            lin.jvp(x, tangents)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_inputs_rejects_non_finite_x(zoo, bad):
    """NaN or Inf in x raises ValueError naming `x` and the count."""
    case, lin = zoo.case("two_inputs_list"), zoo.lin("two_inputs_list")
    a, b = np.array(case.x[0]), case.x[1]
    a[1, 2] = bad
    with pytest.raises(ValueError, match=r"`x\[0\]` must be finite; received 1 NaN or Inf"):
        lin.jvp([a, b], np.ones(lin.num_parameters))


def test_ntk_rejects_mismatched_inputs(zoo):
    """ntk(x1, x2) names `x1` or `x2` when one does not match the model."""
    case, lin = zoo.case("mlp"), zoo.lin("mlp")
    with pytest.raises(ValueError, match="`x1` must have per-example shape"):
        lin.ntk(np.ones((2, 4)))
    with pytest.raises(ValueError, match="`x2` must have per-example shape"):
        lin.ntk(case.x, np.ones((2, 4)))


# ---------------------------------------------------------------------- tangent checks


def test_jvp_rejects_wrong_tangents(zoo):
    """Tangents that are not a float vector [P] raise, naming `tangents` and P."""
    case, lin = zoo.case("mlp"), zoo.lin("mlp")
    num_parameters = lin.num_parameters
    with pytest.raises(ValueError, match=rf"`tangents` must be a flat vector \[P\] with P={num_parameters}"):
        lin.jvp(case.x, np.ones(num_parameters - 1))
    with pytest.raises(ValueError, match=r"`tangents` must be a flat vector \[P\].*received shape \(1, 21\)"):
        lin.jvp(case.x, np.ones((1, num_parameters)))
    with pytest.raises(TypeError, match="`tangents` must be a float tensor; received dtype int64"):
        lin.jvp(case.x, np.ones(num_parameters, dtype=np.int64))
    with pytest.raises(ValueError, match="`tangents` must be finite"):
        lin.jvp(case.x, np.full(num_parameters, np.nan))


def test_vjp_rejects_wrong_cotangents(zoo):
    """Cotangents that are not a float [N, O] raise, naming `cotangents`, N and O."""
    case, lin = zoo.case("multi_output"), zoo.lin("multi_output")
    with pytest.raises(ValueError, match=r"`cotangents` must be \[N, O\] with N=4 .* and O=3"):
        lin.vjp(case.x, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"`cotangents` must be \[N, O\].*received shape \(3, 3\)"):
        lin.vjp(case.x, np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"`cotangents` must be \[N, O\].*received shape \(12,\)"):
        lin.vjp(case.x, np.ones(12))
    with pytest.raises(TypeError, match="`cotangents` must be a float tensor"):
        lin.vjp(case.x, np.ones((4, 3), dtype=np.int32))


def test_predict_follows_each_adapt():
    """`predict` uses the latest posterior, even after it was compiled before `adapt`."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    lin = tf_linntk.LinearizedModel(model)
    x = np.random.default_rng(0).normal(size=(20, 2)).astype("float32")
    before = lin.predict(x, verbose=0)

    lin.adapt(x, np.ones((20, 1)), noise_variance=1e-4)
    after_first = lin.predict(x, verbose=0)
    lin.adapt(x, -np.ones((20, 1)), noise_variance=1e-4)
    after_second = lin.predict(x, verbose=0)

    np.testing.assert_allclose(before, model.predict(x, verbose=0), rtol=1e-5)
    np.testing.assert_allclose(after_first, np.ones((20, 1)), atol=0.05)
    np.testing.assert_allclose(after_second, -np.ones((20, 1)), atol=0.05)
