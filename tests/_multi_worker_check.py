"""Compare products under MultiWorkerMirroredStrategy with single-device ones.

Run as a script once per worker, each in its own process with `TF_CONFIG` set
for a cluster of workers on this machine's loopback address. Every worker
prints one line "max_abs_difference NAME VALUE" per checked quantity.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

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


def products(lin, x, y, v, u):
    """Return a dict of every quantity the comparison covers."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    values = {
        "jvp": lin.jvp(x, v),
        "vjp": lin.vjp(x, u),
        "ntk_matvec": lin.ntk(x).matvec(np.reshape(u, [-1])),
        "fisher_ggn": lin.fisher(x, "gaussian", method="ggn").matvec(v),
        "streamed_jvp": lin.jvp(dataset, v),
        "streamed_vjp": lin.vjp(dataset, u),
    }
    for space in ("function", "parameter"):
        lin.adapt(x, y, noise_variance=0.1, space=space, preconditioner="none", tol=1e-12)
        distribution = lin.predictive_distribution(x[:5])
        values[f"adapt_{space}_mean"] = distribution.mean()
        values[f"adapt_{space}_variance"] = distribution.variance()
    return values


def main():
    # The strategy must exist before any other TensorFlow op runs in the process.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3))
    y = rng.normal(size=(9, 2))
    single = tf_linntk.LinearizedModel(model, batch_size=4)
    v = rng.normal(size=single.num_parameters)
    u = rng.normal(size=(9, 2))
    expected = products(single, x, y, v, u)

    with strategy.scope():
        sharded = tf_linntk.LinearizedModel(model, batch_size=4)
        got = products(sharded, x, y, v, u)
    print("replicas", strategy.num_replicas_in_sync, "sharded", sharded.functional.is_sharded)
    for name, value in expected.items():
        difference = np.max(np.abs(np.asarray(got[name]) - np.asarray(value)))
        print("max_abs_difference", name, difference)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
