"""Compare sharded products under MirroredStrategy with single-device ones.

Run as a script in its own process: logical CPU devices must be configured
before TensorFlow initializes. The argument picks the section, "products" (JVP,
VJP, NTK and regression) or "fisher" (Fisher products), so that the test can
run both at once. Prints one line "max_abs_difference NAME VALUE" per checked
quantity.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _CPUS[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_linntk  # noqa: E402

FISHER_METHODS = ("ggn", "autodiff", "finite_difference", "central_difference")
# Likelihood name -> number of model outputs O (Bernoulli models one logit).
FISHER_LIKELIHOODS = {"gaussian": 2, "categorical": 2, "bernoulli": 1}
# (likelihood, N, given reference outputs). With batch_size=4, N=13 gives each
# replica two chunks, the last one partial (shards of 8 and 5 examples), and
# N=1 leaves the second shard empty. Given outputs make the difference methods
# also slice the shift o − f(x; θ₀). One N=1 case keeps the test fast, because
# every case traces each product twice.
FISHER_CASES = (
    ("gaussian", 13, False),
    ("categorical", 13, True),
    ("bernoulli", 13, True),
    ("categorical", 1, True),
)


def build_model(num_outputs=2):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(6, activation="tanh", dtype="float64"),
            keras.layers.Dense(num_outputs, dtype="float64"),
        ]
    )


def products(lin, x, y, v, u, rhs):
    """Return a dict of every quantity the comparison covers."""
    values = {
        "jvp": lin.jvp(x, v),
        "vjp": lin.vjp(x, u),
        "ntk_matmul": lin.ntk(x).matmul(rhs),
        "ntk_matvec": lin.ntk(x).matvec(rhs[:, 0]),
        "ntk_diag": lin.ntk(x).diag_part(),
        "fisher_ggn": lin.fisher(x, "gaussian", method="ggn").matvec(v),
    }
    # Streamed inputs: batches of 2 regrouped into chunks of batch_size=4, so
    # the 9 examples give shards of 8 and 1 examples.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    values["streamed_jvp"] = lin.jvp(dataset, v)
    values["streamed_vjp"] = lin.vjp(dataset, u)
    values["streamed_fisher_finite_difference"] = lin.fisher(
        dataset, "gaussian", method="finite_difference"
    ).matmul(np.random.default_rng(3).normal(size=(lin.num_parameters, 3)))
    lin.adapt(dataset, noise_variance=0.1, space="function", preconditioner="none", tol=1e-12,
              seed=0)
    values["streamed_adapt_function_mean"] = lin.predictive_distribution(x[:5]).mean()
    # Keras predict runs each replica's share of the batch inside the strategy.
    values["keras_predict"] = lin.predict(x, batch_size=4, verbose=0)
    # A reshuffling dataset must fail on every replica's shard as on one device;
    # the value is 0 when it raised.
    reshuffled = tf.data.Dataset.from_tensor_slices(x).shuffle(9, seed=2).batch(2)
    values["streamed_reshuffle_error"] = _raises_pass_error(lambda: lin.jvp(reshuffled, v))
    # An NTK product may see another replica's failed check as a cancelled collective.
    values["streamed_reshuffle_ntk_error"] = _raises_pass_error(
        lambda: lin.ntk(reshuffled).matvec(np.ones(18))
    )
    for space in ("function", "parameter"):
        lin.adapt(x, y, noise_variance=0.1, space=space, preconditioner="none", tol=1e-12)
        distribution = lin.predictive_distribution(x[:5])
        values[f"adapt_{space}_mean"] = distribution.mean()
        values[f"adapt_{space}_variance"] = distribution.variance()
    lin.adapt(
        x, y, noise_variance=0.1, space="parameter", fisher="finite_difference",
        preconditioner="none", tol=1e-12,
    )
    values["adapt_parameter_finite_difference_mean"] = lin.predictive_distribution(x[:5]).mean()
    return values


def _raises_pass_error(call):
    """Return 0.0 if `call` raises the changed-dataset ValueError within 5 calls, else 1.0."""
    try:
        for _ in range(5):
            call()
    except ValueError as error:
        return 0.0 if "different examples on this pass" in str(error) else 1.0
    return 1.0


def fisher_products(lin, x, likelihood, outputs, rhs):
    """Return matvec, matmul and diag_part of every Fisher method at the given outputs."""
    values = {}
    for method in FISHER_METHODS:
        operator = lin.fisher(x, likelihood, method=method, outputs=outputs)
        values[f"{method}_matvec"] = operator.matvec(rhs[:, 0])
        values[f"{method}_matmul"] = operator.matmul(rhs)
        values[f"{method}_diag"] = operator.diag_part()
    return values


def compare_fisher(strategy):
    """Return {name: max |sharded − single|} of every Fisher product case."""
    rng = np.random.default_rng(1)
    differences = {}
    for likelihood, num_examples, given_outputs in FISHER_CASES:
        num_outputs = FISHER_LIKELIHOODS[likelihood]
        model = build_model(num_outputs)
        single = tf_linntk.LinearizedModel(model, batch_size=4)
        with strategy.scope():
            sharded = tf_linntk.LinearizedModel(model, batch_size=4)
        rhs = rng.normal(size=(single.num_parameters, 3))
        x = rng.normal(size=(num_examples, 3))
        outputs = None
        if given_outputs:
            outputs = single.functional.outputs(x) + rng.normal(size=(num_examples, num_outputs))

        expected = fisher_products(single, x, likelihood, outputs, rhs)
        with strategy.scope():
            got = fisher_products(sharded, x, likelihood, outputs, rhs)
        for key, value in expected.items():
            name = f"fisher_{likelihood}_n{num_examples}_{key}"
            differences[name] = np.max(np.abs(np.asarray(got[key]) - np.asarray(value)))
    return differences, sharded.functional.is_sharded


def compare_products(strategy):
    """Return {name: max |sharded − single|} of the products and regression moments."""
    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3))
    y = rng.normal(size=(9, 2))
    single = tf_linntk.LinearizedModel(model, batch_size=4)
    v = rng.normal(size=single.num_parameters)
    u = rng.normal(size=(9, 2))
    rhs = rng.normal(size=(18, 3))
    expected = products(single, x, y, v, u, rhs)

    with strategy.scope():
        sharded = tf_linntk.LinearizedModel(model, batch_size=4)
        got = products(sharded, x, y, v, u, rhs)
    # An "_error" entry is 0 when the sharded call raised as it should, so it
    # reports the sharded value itself rather than a difference.
    differences = {
        name: got[name] if name.endswith("_error")
        else np.max(np.abs(np.asarray(got[name]) - np.asarray(value)))
        for name, value in expected.items()
    }
    return differences, sharded.functional.is_sharded


def main(section):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    compare = {"products": compare_products, "fisher": compare_fisher}[section]
    differences, is_sharded = compare(strategy)
    print("replicas", strategy.num_replicas_in_sync, "sharded", is_sharded)
    for name, difference in differences.items():
        print("max_abs_difference", name, difference)
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1])
