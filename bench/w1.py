"""Time tf_linntk on the shared W1 regression workload against its exact reference.

W1: a trained tanh MLP 1 → W → W → 1 (10k or 200k parameters), finite-NTK GP
(mean="zero", prior variance 1, noise variance 0.01) on the first n of 8,000
training points, predictive mean and latent variance on 1,000 test points. The
exact float64 reference and the data live in a directory given by `--data`
(default: ../shared/bench-data/w1 next to the repository).

Usage:
    python bench/w1.py [--data DIR] [--repeats 5] [--configs 10k/500,10k/2000]

Prints one markdown table: median wall time of adapt + predictive mean, and of
adapt + mean + variance, with the relative L2 errors of mean and variance. The
`LinearizedModel` is built once per row, and the first adapt (which traces the
compiled functions) is timed separately and left out of the median.
"""

import argparse
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_linntk  # noqa: E402

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "bench-data" / "w1"
CONFIGS = ("10k/500", "10k/2000", "10k/8000", "200k/500", "200k/2000", "200k/8000")
NOISE_VARIANCE = 0.01


def build_mlp(weights_path, dtype):
    """Build the Keras MLP and load the W1 weights (stored [out, in])."""
    weights = np.load(weights_path)
    width = weights["0.weight"].shape[0]
    model = keras.Sequential(
        [
            keras.Input((1,), dtype=dtype),
            keras.layers.Dense(width, activation="tanh", dtype=dtype),
            keras.layers.Dense(width, activation="tanh", dtype=dtype),
            keras.layers.Dense(1, dtype=dtype),
        ]
    )
    for layer, index in zip(model.layers, (0, 2, 4)):
        layer.set_weights([weights[f"{index}.weight"].T, weights[f"{index}.bias"]])
    return model


def relative_error(estimate, reference):
    return float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference))


def run_once(lin, x, y, x_test, with_variance, options):
    """Adapt and predict once; return (seconds, mean [T], variance [T] or None, records)."""
    start = time.perf_counter()
    lin.adapt(
        x, y,
        noise_variance=NOISE_VARIANCE,
        prior_variance=1.0,
        tol=options["tol"],
        variance=options["variance"] if with_variance else "none",
        variance_rank=options["variance_rank"],
        preconditioner_rank=options["preconditioner_rank"],
        seed=0,
    )
    if with_variance:
        distribution = lin.predictive_distribution(x_test, include_noise=False)
        mean = distribution.mean().numpy()[:, 0]
        variance = distribution.variance().numpy()[:, 0]
    else:
        mean = lin(x_test).numpy()[:, 0]
        variance = None
    return time.perf_counter() - start, mean, variance, lin.posterior.convergence


def measure(config, args, dtype):
    name, n = config.split("/")
    data = np.load(args.data / "w1_data.npz")
    reference = np.load(args.data / f"ref_mlp{name}_{n}.npz")
    model = build_mlp(args.data / f"mlp{name}_weights.npz", dtype)
    x, y, x_test = data["x"][: int(n)], data["y"][: int(n)], data["xt"]
    options = dict(
        batch_size=args.batch_size, tol=args.tol, variance=args.variance,
        variance_rank=args.variance_rank, preconditioner_rank=args.preconditioner_rank,
    )
    x_test = tf.constant(x_test, dtype)
    row = {"config": config, "dtype": dtype}
    for with_variance in (False, True):
        lin = tf_linntk.LinearizedModel(model, mean="zero", batch_size=options["batch_size"])
        # The first call includes tf.function tracing; later calls reuse the traces.
        row["first_call_seconds" + ("_var" if with_variance else "")] = run_once(
            lin, x, y, x_test, with_variance, options
        )[0]
        times, result = [], None
        for _ in range(args.repeats):
            seconds, mean, variance, record = run_once(lin, x, y, x_test, with_variance, options)
            times.append(seconds)
            result = (mean, variance, record)
        key = "mean_var" if with_variance else "mean"
        row[f"{key}_seconds"] = statistics.median(times)
        row[f"{key}_mean_error"] = relative_error(result[0], reference["mu"])
        if with_variance:
            row["variance_error"] = relative_error(result[1], reference["var"])
        row[f"{key}_cg_iterations"] = int(np.max(result[2]["solve"].iterations))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8000)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--variance", default="lanczos")
    parser.add_argument("--variance-rank", type=int, default=100)
    parser.add_argument("--preconditioner-rank", type=int, default=100)
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, tf_linntk "
          f"{tf_linntk.__version__}; median of {args.repeats} after a warm-up")
    print(
        "| config | dtype | mean: s [rel. error] (CG its) | mean+var: s | var rel. error "
        "| first call: mean / mean+var s |"
    )
    print("|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        for dtype in args.dtypes.split(","):
            row = measure(config, args, dtype)
            print(
                f"| {row['config']} | {dtype} | {row['mean_seconds']:.3g} "
                f"[{row['mean_mean_error']:.1e}] ({row['mean_cg_iterations']}) | "
                f"{row['mean_var_seconds']:.3g} | {row['variance_error']:.1e} | "
                f"{row['first_call_seconds']:.3g} / {row['first_call_seconds_var']:.3g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
