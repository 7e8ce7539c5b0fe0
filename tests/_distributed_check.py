"""Compare sharded products under MirroredStrategy with single-device ones.

Run as a script in its own process: logical CPU devices must be configured
before TensorFlow initializes. Prints one line "max_abs_difference NAME VALUE"
per checked quantity.
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


def build_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(6, activation="tanh", dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
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
    for space in ("function", "parameter"):
        lin.adapt(x, y, noise_variance=0.1, space=space, preconditioner="none", tol=1e-12)
        distribution = lin.predictive_distribution(x[:5])
        values[f"adapt_{space}_mean"] = distribution.mean()
        values[f"adapt_{space}_variance"] = distribution.variance()
    return values


def main():
    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3))
    y = rng.normal(size=(9, 2))
    single = tf_linntk.LinearizedModel(model, batch_size=4)
    v = rng.normal(size=single.num_parameters)
    u = rng.normal(size=(9, 2))
    rhs = rng.normal(size=(18, 3))
    expected = products(single, x, y, v, u, rhs)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        sharded = tf_linntk.LinearizedModel(model, batch_size=4)
        got = products(sharded, x, y, v, u, rhs)
    print("replicas", strategy.num_replicas_in_sync, "sharded", sharded.functional.is_sharded)
    for name, value in expected.items():
        difference = np.max(np.abs(np.asarray(got[name]) - np.asarray(value)))
        print("max_abs_difference", name, difference)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
