"""Tests of products and adaptation streamed over a tf.data.Dataset.

Every streamed result is compared with the same computation on the arrays in
memory, and the products with the dense float64 references. The zoo models use
batch_size=3 on datasets of batches of 2, so a pass regroups the batches and
splits them into several chunks.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tests import reference

_RTOL = 1e-10
_TIGHT = dict(tol=1e-10, seed=0)
_STREAM_CASES = ["mlp", "cnn_bn_dropout", "two_inputs_list", "two_inputs_dict", "embedding",
                 "two_output_tensors"]


def _input_dataset(x, batch=2):
    """Return a dataset of input batches; tuples of inputs are wrapped as (x,) elements."""
    if isinstance(x, (list, tuple)):
        return tf.data.Dataset.from_tensor_slices((tuple(x),)).batch(batch)
    return tf.data.Dataset.from_tensor_slices(x).batch(batch)


@functools.lru_cache(maxsize=None)
def _regression_setup():
    """Return (model, x [23, 2], y [23, 2], x_test [5, 2]) for a 2-4-2 tanh MLP."""
    model = reference.tanh_mlp(num_outputs=2)
    x, y = reference.regression_data(23, num_outputs=2, seed=1)
    x_test, _ = reference.regression_data(5, seed=2)
    return model, x, y, x_test


def _wrap(model, batch_size=4):
    with reference.keras_float_dtype("float64"):
        return tf_linntk.LinearizedModel(model, batch_size=batch_size)


class _CountingDataset:
    """A dataset read from a Python generator that counts its passes.

    `change_on_pass` makes that pass (1-based) yield one example fewer,
    `permute_on_pass` makes it yield the examples in reverse order, and
    `flip_on_pass` reverses the features within each example.
    """

    def __init__(self, x, y, batch=5, change_on_pass=None, permute_on_pass=None,
                 flip_on_pass=None):
        self.passes = 0
        self._x, self._y, self._batch = x, y, batch
        self._change_on_pass, self._permute_on_pass = change_on_pass, permute_on_pass
        self._flip_on_pass = flip_on_pass
        signature = (
            tf.TensorSpec([None, x.shape[1]], tf.float64),
            tf.TensorSpec([None, y.shape[1]], tf.float64),
        )
        self.dataset = tf.data.Dataset.from_generator(self._generate, output_signature=signature)

    def _generate(self):
        self.passes += 1
        x, y = self._x, self._y
        if self.passes == self._change_on_pass:
            x, y = x[:-1], y[:-1]
        if self.passes == self._permute_on_pass:
            x, y = x[::-1], y[::-1]
        if self.passes == self._flip_on_pass:
            x = x[:, ::-1]
        for start in range(0, len(x), self._batch):
            yield x[start:start + self._batch], y[start:start + self._batch]


# ---------------------------------------------------------------------- products


@pytest.mark.parametrize("name", _STREAM_CASES)
def test_streamed_products_match_dense(zoo, name):
    """JVP, VJP, Jacobian and NTK over a dataset equal the dense Jacobian's products."""
    case = zoo.case(name)
    lin = zoo.lin(name, batch_size=3)
    dataset = _input_dataset(case.x)
    jac = reference.dense_jacobian(case.model, case.x)  # [N, O, P]
    num_examples, num_outputs, num_parameters = jac.shape
    rng = np.random.default_rng(0)
    tangents = rng.normal(size=num_parameters)
    cotangents = rng.normal(size=(num_examples, num_outputs))

    np.testing.assert_allclose(lin.jvp(dataset, tangents), jac @ tangents, rtol=_RTOL, atol=1e-12)
    np.testing.assert_allclose(
        lin.vjp(dataset, cotangents), np.einsum("nop,no->p", jac, cotangents),
        rtol=_RTOL, atol=1e-12,
    )
    np.testing.assert_allclose(lin.jacobian(dataset), jac, rtol=_RTOL, atol=1e-12)
    ntk = lin.ntk(dataset)
    dense = reference.dense_ntk(jac)
    assert ntk.shape == (num_examples * num_outputs,) * 2
    np.testing.assert_allclose(ntk.to_dense(), dense, rtol=_RTOL, atol=1e-12)
    np.testing.assert_allclose(ntk.diag_part(), np.diag(dense), rtol=_RTOL, atol=1e-12)
    columns = rng.normal(size=(num_examples * num_outputs, 2))
    np.testing.assert_allclose(ntk.matmul(columns), dense @ columns, rtol=_RTOL, atol=1e-12)


def test_streamed_ntk_row_and_cross_kernel(zoo):
    """A kernel row and the cross kernel K(dataset, arrays) equal the dense ones."""
    case = zoo.case("mlp")
    lin = zoo.lin("mlp", batch_size=3)
    jac = reference.dense_jacobian(case.model, case.x)
    dense = reference.dense_ntk(jac)
    ntk = lin.ntk(_input_dataset(case.x))

    last = dense.shape[0] - 1
    np.testing.assert_allclose(ntk.row(last), dense[last], rtol=_RTOL, atol=1e-12)
    cross = lin.ntk(_input_dataset(case.x), case.x[:3])
    np.testing.assert_allclose(cross.to_dense(), dense[:, :3 * jac.shape[1]], rtol=_RTOL,
                               atol=1e-12)


@pytest.mark.parametrize("method", ["ggn", "autodiff", "finite_difference", "central_difference"])
@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_streamed_fisher_matches_arrays(zoo, method, likelihood):
    """The Fisher operator on a dataset equals the one on the same arrays."""
    case = zoo.case("multi_output")
    lin = zoo.lin("multi_output", batch_size=3)
    in_memory = lin.fisher(case.x, likelihood, method=method)
    streamed = lin.fisher(_input_dataset(case.x), likelihood, method=method)
    vectors = np.random.default_rng(1).normal(size=(lin.num_parameters, 3))

    np.testing.assert_allclose(streamed.matmul(vectors), in_memory.matmul(vectors),
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(streamed.diag_part(), in_memory.diag_part(), rtol=1e-12,
                               atol=1e-13)


def test_dataset_elements_follow_keras_convention(zoo):
    """Elements x, (x,), (x, y) and (x, y, sample_weight) all stream the inputs x."""
    case = zoo.case("mlp")
    lin = zoo.lin("mlp", batch_size=3)
    x = case.x
    y = np.zeros((len(x), 1))
    tangents = np.random.default_rng(2).normal(size=lin.num_parameters)
    expected = lin.jvp(x, tangents)
    datasets = {
        "x": tf.data.Dataset.from_tensor_slices(x),
        "(x,)": tf.data.Dataset.from_tensor_slices((x,)),
        "(x, y)": tf.data.Dataset.from_tensor_slices((x, y)),
        "(x, y, w)": tf.data.Dataset.from_tensor_slices((x, y, y[:, 0])),
    }
    for label, dataset in datasets.items():
        got = lin.jvp(dataset.batch(3), tangents)
        np.testing.assert_allclose(got, expected, rtol=_RTOL, err_msg=label)


def test_float32_dataset_is_cast_to_model_dtype(zoo):
    """A float32 dataset streams into a float64 model like float64 arrays."""
    case = zoo.case("mlp")
    lin = zoo.lin("mlp", batch_size=3)
    x32 = case.x.astype(np.float32)
    tangents = np.ones(lin.num_parameters)

    got = lin.jvp(tf.data.Dataset.from_tensor_slices(x32).batch(2), tangents)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got, lin.jvp(x32.astype(np.float64), tangents), rtol=_RTOL)


def test_products_reuse_traces_across_datasets(zoo):
    """New datasets with the same element structure reuse the compiled products.

    A second batch count relaxes the trace once (reduce_retracing); later counts reuse it.
    """
    case = zoo.case("mlp")
    lin = zoo.lin("mlp", batch_size=3)
    tangents = np.ones(lin.num_parameters)
    lin.jvp(_input_dataset(case.x), tangents)
    lin.jvp(_input_dataset(np.concatenate([case.x, case.x])), tangents)
    traces = lin.functional._jvp_fn.experimental_get_tracing_count()

    lin.jvp(_input_dataset(case.x[::-1]), tangents)
    lin.jvp(_input_dataset(np.concatenate([case.x] * 3)), tangents)
    assert lin.functional._jvp_fn.experimental_get_tracing_count() == traces


# ---------------------------------------------------------------------- adaptation


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_streamed_regression_matches_dense(space):
    """Regression from a dataset equals the arrays' posterior and the dense GP."""
    model, x, y, x_test = _regression_setup()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    streamed = _wrap(model).adapt(dataset, noise_variance=0.1, prior_variance=2.0, space=space,
                                  variance="exact", **_TIGHT)
    in_memory = _wrap(model).adapt(x, y, noise_variance=0.1, prior_variance=2.0, space=space,
                                   **_TIGHT)
    mean, covariance = reference.dense_gp_predictive(model, x, y, x_test, 0.1, 2.0)

    got = streamed.predictive_distribution(x_test, include_noise=False)
    np.testing.assert_allclose(got.mean().numpy().reshape(-1), mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.variance().numpy().reshape(-1), np.diag(covariance),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(streamed.predict(x_test, verbose=0),
                               in_memory.predict(x_test, verbose=0), rtol=1e-9, atol=1e-12)
    assert streamed.posterior.space == space


def test_streamed_regression_fits_hyperparameters():
    """Marginal-likelihood hyperparameters fitted on a dataset equal the arrays' ones."""
    model, x, y, _ = _regression_setup()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    streamed = _wrap(model).adapt(dataset, seed=0)
    in_memory = _wrap(model).adapt(x, y, seed=0)

    np.testing.assert_allclose(streamed.posterior.prior_variance,
                               in_memory.posterior.prior_variance, rtol=1e-6)
    np.testing.assert_allclose(streamed.posterior.likelihood.noise_variance,
                               in_memory.posterior.likelihood.noise_variance, rtol=1e-6)


def test_streamed_regression_reads_dataset_per_product():
    """Adaptation reads a generator dataset again on every product, never all at once."""
    model, x, y, _ = _regression_setup()
    counting = _CountingDataset(x, y)
    _wrap(model).adapt(counting.dataset, noise_variance=0.1, prior_variance=2.0,
                       space="function", preconditioner="none", variance="none", **_TIGHT)

    # One pass to read and validate, one for m(x), then two per CG iteration.
    assert counting.passes > 4


@pytest.mark.parametrize("inference", ["laplace", "map"])
def test_streamed_classification_matches_arrays(inference):
    """Laplace and MAP classification from a dataset equal the arrays' fit."""
    model = reference.tanh_mlp(num_outputs=3, seed=4)
    x, _ = reference.regression_data(19, seed=5)
    labels = np.random.default_rng(6).integers(0, 3, size=19)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(4)
    options = dict(likelihood="categorical", inference=inference, seed=0)
    streamed = _wrap(model).adapt(dataset, **options)
    in_memory = _wrap(model).adapt(x, labels, **options)

    np.testing.assert_allclose(streamed.posterior.weights, in_memory.posterior.weights,
                               rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(streamed.predict(x, verbose=0), in_memory.predict(x, verbose=0),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("inference, optimizer", [("map", "adam"), ("variational", "newton_cg")])
def test_streamed_minibatch_training_runs(inference, optimizer):
    """Adam and VI take their minibatches from the dataset and keep the data fit."""
    model = reference.tanh_mlp(num_outputs=3, seed=4)
    x, _ = reference.regression_data(19, seed=5)
    labels = np.random.default_rng(6).integers(0, 3, size=19)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(4)
    lin = _wrap(model).adapt(dataset, likelihood="categorical", inference=inference,
                             optimizer=optimizer, epochs=5, batch_size=6, seed=0,
                             on_nonconvergence="ignore")

    probabilities = lin.predict(x, verbose=0)
    assert probabilities.shape == (19, 3)
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-9)
    assert np.all(np.isfinite(lin.posterior.weights))


def test_streamed_adaptation_leaves_model_unchanged():
    """Adapting from a dataset never assigns the wrapped model's variables."""
    model, x, y, _ = _regression_setup()
    before = reference.variable_values(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    _wrap(model).adapt(dataset, noise_variance=0.1, prior_variance=2.0, **_TIGHT)
    reference.assert_variables_unchanged(model, before)


# ---------------------------------------------------------------------- pass checks


def test_changed_example_count_raises():
    """A dataset that yields fewer examples on a later pass fails with ValueError."""
    model, x, y, _ = _regression_setup()
    counting = _CountingDataset(x, y, change_on_pass=3)
    with pytest.raises(ValueError, match="different examples on this pass.*yielded 22 "
                                         "examples, expected 23"):
        _wrap(model).adapt(counting.dataset, noise_variance=0.1, prior_variance=2.0,
                           space="function", **_TIGHT)


def test_reordered_examples_raise():
    """A pass with the same count but another order fails instead of mixing data."""
    model, x, y, _ = _regression_setup()
    counting = _CountingDataset(x, y, permute_on_pass=3)
    with pytest.raises(ValueError, match="reshuffle_each_iteration=False"):
        _wrap(model).adapt(counting.dataset, noise_variance=0.1, prior_variance=2.0,
                           space="function", **_TIGHT)


def test_features_moved_within_examples_raise():
    """A pass that permutes entries inside each example (like a random flip) raises."""
    model, x, y, _ = _regression_setup()
    counting = _CountingDataset(x, y, flip_on_pass=3)
    with pytest.raises(ValueError, match="different examples on this pass"):
        _wrap(model).adapt(counting.dataset, noise_variance=0.1, prior_variance=2.0,
                           space="function", **_TIGHT)


def test_reshuffling_dataset_raises_and_fixed_shuffle_works():
    """shuffle() reshuffles each pass and raises; a fixed shuffle streams normally."""
    model, x, y, _ = _regression_setup()
    options = dict(noise_variance=0.1, prior_variance=2.0, **_TIGHT)
    reshuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(23, seed=0).batch(5)
    with pytest.raises(ValueError, match="different examples on this pass"):
        _wrap(model).adapt(reshuffled, **options)

    fixed = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        23, seed=0, reshuffle_each_iteration=False
    ).batch(5)
    order = np.concatenate([batch_y.numpy() for _, batch_y in fixed])
    permutation = [int(np.flatnonzero(np.all(y == row, axis=1))[0]) for row in order]
    streamed = _wrap(model).adapt(fixed, **options)
    in_memory = _wrap(model).adapt(x[permutation], y[permutation], **options)
    np.testing.assert_allclose(streamed.posterior.weights, in_memory.posterior.weights,
                               rtol=1e-8, atol=1e-12)


def test_operator_product_on_changed_dataset_raises(zoo):
    """A jvp on a dataset whose second pass changes raises ValueError."""
    model, x, y, _ = _regression_setup()
    lin = _wrap(model)
    counting = _CountingDataset(x, y, change_on_pass=2)
    with pytest.raises(ValueError, match="different examples on this pass"):
        lin.jvp(counting.dataset, np.ones(lin.num_parameters))


def test_operators_raise_value_error_on_changed_dataset(zoo):
    """NTK and Fisher operators on a reshuffling dataset raise ValueError, not a TF error."""
    case = zoo.case("mlp")
    lin = zoo.lin("mlp", batch_size=3)
    reshuffled = tf.data.Dataset.from_tensor_slices(case.x).shuffle(4, seed=1).batch(2)
    rows = lin.num_outputs * len(case.x)

    with pytest.raises(ValueError, match="different examples on this pass"):
        for _ in range(5):
            lin.ntk(reshuffled).matmul(np.ones((rows, 2)))
    with pytest.raises(ValueError, match="different examples on this pass"):
        for _ in range(5):
            lin.fisher(reshuffled, "gaussian").matvec(np.ones(lin.num_parameters))


def test_padded_batches_keep_their_batches():
    """Variable-length padded batches stream batch by batch, as each batch in memory."""
    with reference.keras_float_dtype("float64"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(11, 3),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ])
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, 11, size=length) for length in (2, 5, 3, 7, 4, 6, 2)]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(sequences), output_signature=tf.TensorSpec([None], tf.int32)
    ).padded_batch(3)
    lin = _wrap(model, batch_size=256)
    tangents = rng.normal(size=lin.num_parameters)

    expected = np.concatenate([lin.jvp(batch.numpy(), tangents) for batch in dataset])
    np.testing.assert_allclose(lin.jvp(dataset, tangents), expected, rtol=_RTOL, atol=1e-13)
    first_batch = next(iter(dataset)).numpy()
    assert lin.predict(first_batch, verbose=0).shape == (3, 2)


def test_dataset_inside_tf_function_raises():
    """A dataset built inside a tf.function raises a ValueError that explains why."""
    model, x, _, _ = _regression_setup()
    lin = _wrap(model)

    @tf.function
    def jvp(tangents):
        return lin.jvp(tf.data.Dataset.from_tensor_slices(x).batch(4), tangents)

    with pytest.raises(ValueError, match="inside a tf.function"):
        jvp(tf.ones([lin.num_parameters], tf.float64))


# ---------------------------------------------------------------------- invalid datasets


_X = np.zeros((6, 2))
_Y = np.zeros((6, 1))


@pytest.mark.parametrize(
    "dataset, y, error, pattern",
    [
        (tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(2).repeat(), None, ValueError,
         "`x` must be a finite tf.data.Dataset"),
        (tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(2), _Y, ValueError,
         "`y` must be None when `x` is a tf.data.Dataset"),
        (tf.data.Dataset.from_tensor_slices(_X).batch(2), None, ValueError,
         r"`x` must be a batched tf.data.Dataset of \(x, y\) pairs"),
        (tf.data.Dataset.from_tensor_slices((_X, _Y, _Y)).batch(2), None, ValueError,
         "sample weights are not supported"),
        (tf.data.Dataset.from_tensor_slices((_X, _Y)), None, ValueError,
         r"`x` must have shape \[N, 2\].*elements must be batches"),
        (tf.data.Dataset.from_tensor_slices((np.zeros((6, 3)), _Y)).batch(2), None, ValueError,
         r"`x` must have per-example shape \(2,\)"),
        (tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(2).take(0), None, ValueError,
         "`x` must contain at least one example; received an empty dataset"),
        (tf.data.Dataset.from_tensor_slices((np.full((6, 2), np.nan), _Y)).batch(2), None,
         ValueError, "`x` must be finite"),
    ],
    ids=["infinite", "separate_y", "no_targets", "sample_weights", "unbatched",
         "wrong_shape", "empty", "nan"],
)
def test_adapt_rejects_invalid_dataset(dataset, y, error, pattern):
    """Invalid datasets raise before any product, naming the argument."""
    model = reference.tanh_mlp()
    with pytest.raises(error, match=pattern):
        _wrap(model).adapt(dataset, y, noise_variance=0.1)


def test_batch_streams_other_than_datasets_raise():
    """A Python generator as x raises a TypeError that names tf.data.Dataset.from_generator."""
    model, x, y, _ = _regression_setup()
    lin = _wrap(model)
    batches = (x[i:i + 5] for i in range(0, len(x), 5))
    with pytest.raises(TypeError, match="received a generator.*from_generator"):
        lin.jvp(batches, np.ones(lin.num_parameters))


def test_dict_targets_raise():
    """Targets or labels given as a dict raise a TypeError naming `y`."""
    model, x, y, _ = _regression_setup()
    with pytest.raises(TypeError, match="`y` must be a numeric tensor .*dict with keys"):
        _wrap(model).adapt(x, {"t": y}, noise_variance=0.1)
    with pytest.raises(TypeError, match="`y` must be an array or tensor of labels"):
        _wrap(model).adapt(x, {"t": np.zeros(len(x), "int64")}, likelihood="categorical")


def test_iterator_inputs_raise():
    """An iterator of batches as x raises a TypeError that names from_generator."""
    model, x, _, _ = _regression_setup()
    lin = _wrap(model)
    with pytest.raises(TypeError, match="received a list_iterator.*from_generator"):
        lin.jvp(iter([x[:5], x[5:]]), np.ones(lin.num_parameters))


def test_predictive_distribution_rejects_dataset():
    """predictive_distribution takes arrays; a dataset raises a TypeError naming `x`."""
    model, x, y, _ = _regression_setup()
    lin = _wrap(model).adapt(x, y, noise_variance=0.1, prior_variance=2.0, **_TIGHT)
    with pytest.raises(TypeError, match="`x` must be an array, tensor"):
        lin.predictive_distribution(tf.data.Dataset.from_tensor_slices(x).batch(4))
