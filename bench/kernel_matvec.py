"""Time one NTK matvec against one forward+backward pass of the same network.

For each model the script times, in one process and on the same data:

* `lin.ntk(x).matvec(v)` inside a `tf.function` (one batched VJP, then one JVP);
* the gradient of a mean squared error loss w.r.t. `model.trainable_variables`,
  also inside a `tf.function` (the cost of one training step without the update);

and prints the median time of each over `--repeats` alternating calls after two
warm-up calls, and their ratio. It also times `lin.jacobian(x)` on the MLP. Models:

* (a) an MLP 1 -> 316 -> 316 -> 1 (tanh, about 100k parameters) on N = 2,000;
* (b) a small CNN (two 3x3 convolutions with max pooling, 10 outputs) on 256
  random inputs of 28x28x1.

Everything runs in float32 on random data. Run from the repository root:

    python bench/kernel_matvec.py [--repeats 15] [--threads 0]
"""

import argparse
import os
import platform
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tf_linntk  # noqa: E402


def build_mlp():
    """Return the MLP 1 -> 316 -> 316 -> 1 with tanh activations."""
    return keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(316, activation="tanh"),
        keras.layers.Dense(316, activation="tanh"),
        keras.layers.Dense(1),
    ])


def build_cnn():
    """Return a small CNN for 28x28x1 inputs with 10 outputs."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def median_seconds(fns, repeats):
    """Return the median wall time of each function over `repeats` calls.

    Each function is called twice first (tracing and warm-up). The timed calls
    alternate between the functions, so that a change in machine load during the
    run affects all of them alike.
    """
    for fn in fns:
        for _ in range(2):
            _block(fn())
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            _block(fn())
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def time_case(name, model, x, repeats, batch_size):
    """Return a table row: NTK matvec time, forward+backward time and their ratio."""
    y = tf.random.stateless_normal(
        (x.shape[0], *model.output_shape[1:]), seed=[1, 2], dtype=x.dtype
    )
    lin = tf_linntk.LinearizedModel(model, batch_size=batch_size)
    ntk = lin.ntk(x)
    v = tf.random.stateless_normal((ntk.shape[0],), seed=[3, 4], dtype=x.dtype)

    matvec = tf.function(lambda v: ntk.matvec(v))

    @tf.function
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=False) - y))
        return tape.gradient(loss, model.trainable_variables)

    t_ntk, t_step = median_seconds([lambda: matvec(v), lambda: forward_backward(x, y)], repeats)
    return (
        f"| {name} | {x.shape[0]} | {lin.num_parameters:,} | {batch_size} | "
        f"{1e3 * t_ntk:.2f} | {1e3 * t_step:.2f} | {t_ntk / t_step:.2f} |"
    )


def time_jacobian(model, x, repeats):
    """Return the median time in ms of `lin.jacobian(x)` (compiled, eager call)."""
    lin = tf_linntk.LinearizedModel(model)
    return 1e3 * median_seconds([lambda: lin.jacobian(x)], repeats)[0]


def machine_info():
    """Return a markdown list of CPU count, CPU model and library versions."""
    model_name = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    return "\n".join([
        f"- nproc (usable CPUs): {len(os.sched_getaffinity(0))}",
        f"- CPU model: {model_name}",
        f"- Python {platform.python_version()}, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, tf_linntk {tf_linntk.__version__}",
        "- load average (1, 5, 15 min) at the end of the run: "
        + ", ".join(f"{load:.1f}" for load in os.getloadavg()),
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per case")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="intra-op threads for TensorFlow (0: TensorFlow's default)",
    )
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)

    mlp = build_mlp()
    cnn = build_cnn()
    x_mlp = tf.random.stateless_normal((2000, 1), seed=[5, 6])
    x_cnn = tf.random.stateless_normal((256, 28, 28, 1), seed=[7, 8])

    rows = [
        time_case("(a) MLP 1-316-316-1", mlp, x_mlp, args.repeats, 256),
        time_case("(a) MLP 1-316-316-1", mlp, x_mlp, args.repeats, 2000),
        time_case("(b) CNN 28x28x1 -> 10", cnn, x_cnn, args.repeats, 256),
    ]
    t_jac = time_jacobian(mlp, x_mlp[:200], args.repeats)

    print(machine_info())
    print(f"- float32, median of {args.repeats} timed calls after 2 warm-up calls\n")
    print("| model | N | P | batch_size | NTK matvec (ms) | forward+backward (ms) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\n`jacobian` on (a), N = 200 ([200, 1, P]): {t_jac:.1f} ms")


def _block(result):
    """Wait for every tensor in `result` (so that timings include the computation)."""
    for tensor in tf.nest.flatten(result):
        np.asarray(tensor)


if __name__ == "__main__":
    main()
