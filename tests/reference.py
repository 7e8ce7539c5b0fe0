"""Dense references and a small zoo of float64 Keras models for the core tests.

The references are written for clarity, not speed: they differentiate the
original Keras model with its own variables through `tf.GradientTape`, never
through `tf_linntk`, so they check the snapshots and the stateless evaluation too.
"""

import contextlib
import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state

# Number of examples in every zoo input.
NUM_EXAMPLES = 4


# ---------------------------------------------------------------------- references


def flat_outputs(model, x):
    """Return the model's outputs at its weights, flattened per example: [N, O].

    Output tensors are flattened row-major and concatenated in `model.outputs`
    order (the order of `keras.tree.flatten`).
    """
    outputs = model(x, training=False)
    pieces = [tf.reshape(t, [t.shape[0], -1]) for t in keras.tree.flatten(outputs)]
    return tf.concat(pieces, axis=1)


def dense_jacobian(model, x, variables=None):
    """Return the Jacobian of `flat_outputs` w.r.t. `variables`: float64 array [N, O, P].

    Args:
        model: a built Keras model.
        x: inputs with N examples.
        variables: Keras variables in the flat order; defaults to
            `model.trainable_variables`. Each contributes its row-major entries.
    """
    variables = list(model.trainable_variables if variables is None else variables)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([v.value for v in variables])
        out = flat_outputs(model, x)  # [N, O]
    # The while-loop Jacobian keeps pfor's retracing warnings out of the test logs.
    blocks = tape.jacobian(
        out, [v.value for v in variables],
        unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=False,
    )
    n, o = out.shape
    return np.concatenate([np.reshape(b, (n, o, -1)) for b in blocks], axis=2)


def dense_ntk(jac1, jac2=None):
    """Return J1 J2ᵀ as [N1·O, N2·O] from Jacobians [N1, O, P] and [N2, O, P]."""
    jac2 = jac1 if jac2 is None else jac2
    rows1 = jac1.reshape(-1, jac1.shape[-1])
    rows2 = jac2.reshape(-1, jac2.shape[-1])
    return rows1 @ rows2.T


def variable_values(model):
    """Return a copy of every variable of `model` as NumPy arrays, in `model.variables` order."""
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def assert_variables_unchanged(model, before):
    """Assert that every variable of `model` is bit-identical to `before`."""
    after = variable_values(model)
    assert len(after) == len(before)
    for variable, old, new in zip(model.variables, before, after):
        np.testing.assert_array_equal(new, old, err_msg=f"variable {variable.path} changed")


@contextlib.contextmanager
def keras_float_dtype(dtype, policy=None):
    """Build new Keras layers in `dtype` inside the block; restore the settings after.

    `policy` overrides the dtype policy (e.g. "mixed_float16"); it defaults to `dtype`.

    Keras caches its global dtype policy from floatx when a layer first reads it,
    so floatx alone does not change the dtype of later layers. The block sets both
    and then restores the exact previous state, including "no policy cached yet",
    so that code after it which only sets floatx still works.
    """
    previous_floatx = keras.config.floatx()
    # NOTE: private Keras state (Keras 3.15): the public `keras.config.dtype_policy()`
    # would cache a policy instead of reporting that none is set.
    previous_policy = global_state.get_global_attribute("dtype_policy", None)
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(policy or dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous_floatx)
        global_state.set_global_attribute("dtype_policy", previous_policy)


# ---------------------------------------------------------------------- model zoo


@dataclasses.dataclass
class ZooCase:
    """A built model, NUM_EXAMPLES inputs for it and its dense Jacobian at those inputs."""

    name: str
    model: keras.Model
    x: object
    jacobian: np.ndarray = None

    def __post_init__(self):
        if self.jacobian is None:
            self.jacobian = dense_jacobian(self.model, self.x)


def _rng(seed):
    return np.random.default_rng(seed)


def mlp():
    """Sequential tanh MLP 3 -> 4 -> 1 (O = 1)."""
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", name="hidden"),
        keras.layers.Dense(1, name="head"),
    ], name="mlp")


def multi_output():
    """Sequential tanh MLP 3 -> 4 -> 3 (O = 3)."""
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(3),
    ], name="multi_output")


def cnn_bn_dropout():
    """Conv -> BatchNorm -> ReLU -> Dropout -> Dense on 5x5x2 inputs (O = 2).

    The BatchNorm moving statistics and affine weights are moved away from their
    initial values, so inference mode differs from an identity normalisation.
    """
    model = keras.Sequential([
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(3, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.Dropout(0.5),
        keras.layers.Flatten(),
        keras.layers.Dense(2, name="head"),
    ], name="cnn_bn_dropout")
    bn = model.get_layer("bn")
    bn.moving_mean.assign([0.3, -0.2, 0.1])
    bn.moving_variance.assign([2.0, 0.5, 1.5])
    bn.gamma.assign([1.5, 0.7, 1.1])
    bn.beta.assign([0.2, -0.1, 0.3])
    return model


def two_inputs_list():
    """Functional model with the list inputs [a: [3], b: [2]] (O = 2)."""
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    hidden = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], keras.layers.Dense(2)(hidden), name="two_inputs_list")


def two_inputs_dict():
    """Functional model with the dict inputs {"a": [3], "b": [2]} (O = 2)."""
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    hidden = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(hidden), name="two_inputs_dict")


class SubclassedMLP(keras.Model):
    """Subclassed tanh MLP 3 -> 4 -> 2 whose call() takes `training` (used by Dropout)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.dropout = keras.layers.Dropout(0.5)
        self.head = keras.layers.Dense(2)

    def call(self, inputs, training=None):
        return self.head(self.dropout(self.hidden(inputs), training=training))


class SubclassedNoTraining(keras.Model):
    """Subclassed tanh MLP 3 -> 4 -> 2 whose call() takes no `training` argument."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.head = keras.layers.Dense(2)

    def call(self, inputs):
        return self.head(self.hidden(inputs))


def subclassed():
    """SubclassedMLP built on a batch of shape [1, 3]."""
    model = SubclassedMLP(name="subclassed")
    model(np.zeros((1, 3)))
    return model


def subclassed_no_training():
    """SubclassedNoTraining built on a batch of shape [1, 3]."""
    model = SubclassedNoTraining(name="subclassed_no_training")
    model(np.zeros((1, 3)))
    return model


def embedding(vocabulary=7, dim=3):
    """Integer token ids [4] -> Embedding -> Flatten -> Dense(2)."""
    return keras.Sequential([
        keras.Input((4,), dtype="int32"),
        keras.layers.Embedding(vocabulary, dim, name="embedding"),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ], name="embedding")


def two_output_tensors():
    """Functional model with outputs [Dense(2), Dense(1)] (O = 3)."""
    x = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh")(x)
    outputs = [keras.layers.Dense(2)(hidden), keras.layers.Dense(1)(hidden)]
    return keras.Model(x, outputs, name="two_output_tensors")


def rank4_outputs():
    """Conv2D with outputs [N, 3, 3, 2], flattened to O = 18."""
    return keras.Sequential([
        keras.Input((4, 4, 1)),
        keras.layers.Conv2D(2, 2, activation="tanh"),
    ], name="rank4_outputs")


def _float_inputs(shape, seed):
    return _rng(seed).normal(size=(NUM_EXAMPLES, *shape))


def _zoo_inputs():
    a = _float_inputs((3,), 1)
    b = _float_inputs((2,), 2)
    return {
        "mlp": a,
        "multi_output": a,
        "cnn_bn_dropout": _float_inputs((5, 5, 2), 3),
        "two_inputs_list": [a, b],
        "two_inputs_dict": {"a": a, "b": b},
        "subclassed": a,
        "subclassed_no_training": a,
        "embedding": _rng(4).integers(0, 7, size=(NUM_EXAMPLES, 4)).astype("int32"),
        "two_output_tensors": a,
        "rank4_outputs": _float_inputs((4, 4, 1), 5),
    }


ZOO_BUILDERS = {
    "mlp": mlp,
    "multi_output": multi_output,
    "cnn_bn_dropout": cnn_bn_dropout,
    "two_inputs_list": two_inputs_list,
    "two_inputs_dict": two_inputs_dict,
    "subclassed": subclassed,
    "subclassed_no_training": subclassed_no_training,
    "embedding": embedding,
    "two_output_tensors": two_output_tensors,
    "rank4_outputs": rank4_outputs,
}

ZOO_NAMES = list(ZOO_BUILDERS)


def build_case(name, seed=0):
    """Build the zoo model `name` (under the current floatx) with inputs and Jacobian."""
    keras.utils.set_random_seed(seed)
    model = ZOO_BUILDERS[name]()
    return ZooCase(name, model, _zoo_inputs()[name])


def take_examples(x, count):
    """Return the first `count` examples of an input structure."""
    return keras.tree.map_structure(lambda t: t[:count], x)


# ---------------------------------------------------------------------- GP regression references


def tanh_mlp(num_inputs=2, hidden=4, num_outputs=1, dtype="float64", seed=0):
    """Build a tanh MLP num_inputs -> hidden -> num_outputs computing in `dtype`.

    P = (num_inputs + 1)·hidden + (hidden + 1)·num_outputs.
    """
    keras.utils.set_random_seed(seed)
    with keras_float_dtype(dtype):
        return keras.Sequential([
            keras.Input((num_inputs,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(num_outputs),
        ])


def regression_data(num_examples, num_inputs=2, num_outputs=1, seed=0):
    """Return float64 inputs [N, num_inputs] and targets [N, O], both from N(0, 1)."""
    rng = _rng(seed)
    return rng.normal(size=(num_examples, num_inputs)), rng.normal(size=(num_examples, num_outputs))


def flat_noise(noise_variance, num_examples, num_outputs):
    """Return the diagonal [N·O] of D from a scalar or [O] noise variance, example-major."""
    return np.tile(np.broadcast_to(noise_variance, [num_outputs]), num_examples)


def dense_gp_predictive(model, x, y, x_test, noise_variance, prior_variance, mean="network"):
    """Return the GP predictive mean [N*·O] and latent covariance [N*·O, N*·O].

    With J the dense Jacobian, K(a, b) = J(a) J(b)ᵀ, A = s² K(X, X) + D and
    m the network (mean="network") or zero:
    mean m(x*) + s² K(x*, X) A⁻¹ (y − m(X)),
    covariance s² K(x*, x*) − s⁴ K(x*, X) A⁻¹ K(X, x*).
    """
    jac = dense_jacobian(model, x)
    jac_test = dense_jacobian(model, x_test)
    kernel, cross = dense_ntk(jac), dense_ntk(jac, jac_test)  # K(X, X), K(X, x*)
    prior_mean = np.zeros(kernel.shape[0])
    prior_mean_test = np.zeros(cross.shape[1])
    if mean == "network":
        prior_mean = flat_outputs(model, x).numpy().reshape(-1)
        prior_mean_test = flat_outputs(model, x_test).numpy().reshape(-1)
    s2 = prior_variance
    system = s2 * kernel + np.diag(flat_noise(noise_variance, len(x), y.shape[1]))
    alpha = np.linalg.solve(system, np.reshape(y, [-1]) - prior_mean)
    predictive_mean = prior_mean_test + s2 * cross.T @ alpha
    covariance = s2 * dense_ntk(jac_test) - s2**2 * cross.T @ np.linalg.solve(system, cross)
    return predictive_mean, covariance


def dense_weight_posterior(model, x, y, noise_variance, prior_variance):
    """Return the posterior of δ = θ' − θ₀ under the network mean: w [P] and Σ [P, P].

    Σ = (Jᵀ D⁻¹ J + I/s²)⁻¹ and w = Σ Jᵀ D⁻¹ (y − f(x; θ₀)).
    """
    jac = dense_jacobian(model, x)
    jac = jac.reshape(-1, jac.shape[-1])  # [N·O, P]
    noise = flat_noise(noise_variance, len(x), y.shape[1])
    precision = jac.T @ (jac / noise[:, None]) + np.eye(jac.shape[1]) / prior_variance
    covariance = np.linalg.inv(precision)
    residual = np.reshape(y, [-1]) - flat_outputs(model, x).numpy().reshape(-1)
    return covariance @ (jac.T @ (residual / noise)), covariance


def prior_latent_variance(model, x, prior_variance):
    """Return the prior variance s² diag K(x, x) of the linearized outputs as [N, O]."""
    return prior_variance * np.sum(dense_jacobian(model, x) ** 2, axis=-1)
