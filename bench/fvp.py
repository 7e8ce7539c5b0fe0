"""Time one Fisher-vector product per method of `tf_linntk.fisher` on two CNNs.

Not a test. The script builds a plain tanh CNN with max pooling and a deeper
ReLU residual CNN for random 28×28×1 inputs and 10 classes. Weights and data are
random, so it measures speed and agreement, not accuracy. Each `FisherOperator`
method computes F v compiled, after warm-up calls, and the table reports the
median of `--repeats` calls in the same process. Wall time and process CPU time
are both reported, because CPU time is less sensitive to other load on a shared
machine. The error column is ‖F v − F_ggn v‖ / ‖F_ggn v‖, and the speed-ups are
time ratios.

Run from the repository root:

    python bench/fvp.py                      # both models, 256 inputs
    python bench/fvp.py --models cnn --repeats 7 --num-rhs 4
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_linntk  # noqa: E402
from tf_linntk import fisher  # noqa: E402

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)


def build_cnn():
    """Return a tanh CNN with max pooling (158,858 parameters)."""
    return keras.Sequential([
        keras.Input(IMAGE_SHAPE),
        keras.layers.Conv2D(32, 3, activation="tanh"),
        keras.layers.Conv2D(64, 3, activation="tanh"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="tanh"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="tanh"),
        keras.layers.Dense(NUM_CLASSES),
    ], name="cnn")


def build_residual_cnn(width=32, blocks_per_stage=2):
    """Return a ReLU residual CNN: a stem and three stages of residual blocks (869,002
    parameters with the defaults)."""
    inputs = keras.Input(IMAGE_SHAPE)
    features = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    for stage in range(3):
        channels = width * 2**stage
        if stage > 0:
            features = keras.layers.Conv2D(
                channels, 3, strides=2, padding="same", activation="relu"
            )(features)
        for _ in range(blocks_per_stage):
            branch = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(features)
            branch = keras.layers.Conv2D(channels, 3, padding="same")(branch)
            features = keras.layers.Activation("relu")(keras.layers.Add()([features, branch]))
    features = keras.layers.GlobalAveragePooling2D()(features)
    outputs = keras.layers.Dense(NUM_CLASSES)(features)
    return keras.Model(inputs, outputs, name="residual_cnn")


MODELS = {"cnn": build_cnn, "residual_cnn": build_residual_cnn}


def time_call(fn, repeats, warmup):
    """Return the median wall and CPU seconds of fn() over `repeats` calls, and its result."""
    for _ in range(warmup):
        result = fn().numpy()
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result = fn().numpy()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu), result


def benchmark_model(name, args):
    """Return the table rows of one model: one per method."""
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.num_examples, *IMAGE_SHAPE)).astype("float32")
    lin = tf_linntk.LinearizedModel(model, batch_size=args.batch_size)
    v = rng.standard_normal((lin.num_parameters, args.num_rhs)).astype("float32")

    results = {}
    for method in args.methods:
        operator = lin_fisher(lin, x, method)
        product = (lambda op=operator: op.matvec(v[:, 0])) if args.num_rhs == 1 else (
            lambda op=operator: op.matmul(v)
        )
        results[method] = (*time_call(product, args.repeats, args.warmup), operator.epsilon)

    reference = results["ggn"][2] if "ggn" in results else None
    rows = []
    for method, (wall, cpu, value, epsilon) in results.items():
        error = float("nan") if reference is None else (
            np.linalg.norm(value - reference) / np.linalg.norm(reference)
        )
        rows.append((name, lin.num_parameters, method, epsilon, wall, cpu, error))
    return rows


def lin_fisher(lin, x, method):
    """Return the Fisher operator of `method` (via `lin.fisher` when it exists)."""
    if hasattr(lin, "fisher"):
        return lin.fisher(x, likelihood="categorical", method=method)
    return fisher.fisher_operator(lin, x, "categorical", method, None)


def print_table(rows, args):
    """Print the machine, versions and one markdown table of all rows."""
    print(f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), {platform.system()}; "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python "
          f"{platform.python_version()}")
    print(f"N={args.num_examples} inputs of 28x28x1, {NUM_CLASSES} classes (categorical), "
          f"batch_size={args.batch_size}, R={args.num_rhs} right-hand side(s), "
          f"median of {args.repeats} calls after {args.warmup} warm-up call(s), float32")
    print()
    print("| model | P | method | ε | wall ms | CPU ms | rel. error vs ggn | "
          "speed-up vs autodiff (wall / CPU) | speed-up vs ggn (wall / CPU) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, size, method, epsilon, wall, cpu, error in rows:
        times = {row[2]: (row[4], row[5]) for row in rows if row[0] == name}
        versus = [
            f"{times[other][0] / wall:.2f} / {times[other][1] / cpu:.2f}"
            if other in times else "n/a"
            for other in ("autodiff", "ggn")
        ]
        step = "–" if epsilon is None else f"{epsilon:.1e}"
        print(f"| {name} | {size:,} | {method} | {step} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | "
              f"{error:.1e} | {versus[0]} | {versus[1]} |")


def _cpu_model():
    """Return the CPU model name from /proc/cpuinfo, or the platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_args():
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(fisher.METHODS),
                        choices=list(fisher.METHODS))
    parser.add_argument("--num-examples", type=int, default=256, help="inputs N")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per chunk")
    parser.add_argument("--num-rhs", type=int, default=1, help="right-hand sides R")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per method")
    return parser.parse_args()


def main():
    """Benchmark the chosen models and print the table."""
    args = parse_args()
    rows = []
    for name in args.models:
        rows.extend(benchmark_model(name, args))
    print_table(rows, args)


if __name__ == "__main__":
    main()
