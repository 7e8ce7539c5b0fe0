"""Shared helpers of the examples: command line, seeding, training loops, tables and plots.

Every example accepts `--output DIR` (tables and PNG plots), `--seed` and
`--quick` (a CI-sized run), and its `main(argv=None)` returns a dict of metrics.
"""

import argparse
import functools
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported for the examples)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = [
    "Stopwatch",
    "build_parser",
    "gaussian_interval_coverage",
    "mean_and_std",
    "plot_metric_against",
    "prepare_run",
    "train",
    "write_markdown_table",
]


def build_parser(description):
    """Return an argument parser with the options every example shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--output", default="outputs/", help="directory for the result table and PNG plots"
    )
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized run: fewer seeds, sizes and test points"
    )
    return parser


def prepare_run(args, name):
    """Seed Python, NumPy and TensorFlow from `args.seed`; return the output directory.

    Args:
        args: parsed arguments with `seed` and `output`.
        name: example name; files go to `args.output/name/`.

    Returns:
        pathlib.Path of the (created) output directory.
    """
    keras.utils.set_random_seed(args.seed)
    directory = pathlib.Path(args.output) / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class Stopwatch:
    """Context manager that stores the elapsed wall time in seconds as `seconds`."""

    def __enter__(self):
        self._start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc_info):
        self.seconds = time.perf_counter() - self._start
        return False


def train(model, x, y, loss_fn, *, epochs, learning_rate, batch_size=None, seed=0,
          variables=None):
    """Train `model` with Adam in a compiled loop (faster than `fit` for tiny data).

    Args:
        model: a built Keras model.
        x: float array [N, ...], the inputs.
        y: array [N, ...], the targets.
        loss_fn: callable (y_true, y_pred) -> per-example losses [B] (or a scalar);
            their mean is minimized.
        epochs: passes over the data.
        learning_rate: Adam step size.
        batch_size: minibatch size; None trains full batch (one step per epoch).
        seed: seed of the minibatch order.
        variables: variables to update; defaults to `model.trainable_variables`.

    Returns:
        float, the loss of the last step.
    """
    variables = model.trainable_variables if variables is None else variables
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(variables)

    def step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(y_batch, model(x_batch, training=True)))
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    def run_all(x_all, y_all):
        loss = tf.constant(np.nan, tf.float32)
        for _ in tf.range(epochs):
            loss = step(x_all, y_all)
        return loss

    # TensorFlow counts traces per Python code object and warns about retracing
    # when many models are trained; a `functools.partial` gets its own count.
    num_examples = len(x)
    if batch_size is None or batch_size >= num_examples:
        # Full batch: every step runs inside one graph loop, without Python overhead.
        return float(tf.function(functools.partial(run_all))(tf.constant(x), tf.constant(y)))

    compiled_step = tf.function(functools.partial(step))
    rng = np.random.default_rng(seed)
    loss = np.nan
    for _ in range(epochs):
        order = rng.permutation(num_examples)
        # Drop the last partial batch so every step has the same shape (one trace).
        for start in range(0, num_examples - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            loss = compiled_step(tf.constant(x[batch]), tf.constant(y[batch]))
    return float(loss)


def mean_and_std(values):
    """Return (mean, standard deviation) of a list of floats; std is 0 for one value."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values)), float(np.std(values))


def gaussian_interval_coverage(y, mean, std, level=0.9):
    """Return the fraction of y inside the central `level` interval of N(mean, std²)."""
    from scipy import stats

    half_width = stats.norm.ppf(0.5 + level / 2.0) * np.asarray(std)
    return float(np.mean(np.abs(np.asarray(y) - np.asarray(mean)) <= half_width))


def write_markdown_table(path, header, rows):
    """Write a markdown table and return its text.

    Args:
        path: file path of the table.
        header: list of column names.
        rows: list of rows, each a list of cells (str or float; floats get 3 decimals).

    Returns:
        str, the table.
    """
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    pathlib.Path(path).write_text(text)
    return text


def plot_metric_against(path, sizes, results, metric, xlabel, title, methods=None):
    """Plot metric against training size with ±1 std bands, one line per method.

    Args:
        path: PNG file path.
        sizes: list of training sizes (x axis).
        results: dict method -> size -> list of metric dicts (one per seed).
        metric: key of the metric to plot.
        xlabel: label of the x axis.
        title: plot title.
        methods: methods to draw, in legend order; defaults to all.
    """
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for method in methods or list(results):
        values = [[run[metric] for run in results[method][size]] for size in sizes]
        means = np.array([np.mean(v) for v in values])
        stds = np.array([np.std(v) for v in values])
        axis.plot(sizes, means, marker="o", label=method)
        axis.fill_between(sizes, means - stds, means + stds, alpha=0.2)
    axis.set_xscale("log")
    axis.set_xticks(sizes)
    axis.set_xticklabels([str(s) for s in sizes])
    axis.set_xlabel(xlabel)
    axis.set_ylabel(metric)
    axis.set_title(title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
