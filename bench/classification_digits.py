"""Time and score few-shot digit classification: tf_linntk adaptation against retraining.

Not a test. Workload (the classification part of examples/digits_transfer.py,
whose functions it imports): a small CNN (9.6k weights) is trained on
scikit-learn's 8×8 digits 0–4. The target task is digits 5–9 with 10
labelled images per class; every other image of 5–9 is the evaluation set.
Methods:

* "map", "laplace", "variational": `LinearizedModel.adapt` with a categorical
  likelihood on the two dense layers (8.4k weights), mean="zero" and centered
  logits, as in the example. "laplace" picks the prior variance s² by the
  Laplace evidence on a half-decade grid (several Laplace fits); "map" and
  "variational" reuse that s².
* "last_layer": a new output layer trained by full-batch Adam (100 steps) on
  the frozen source features.
* "fine_tune": every weight of a copy of the source network, full-batch Adam
  (100 steps).

Each method's time covers adaptation and prediction on the evaluation set.
Per seed, the first call is reported separately ("first", tracing included
for the tf_linntk methods, which share one `LinearizedModel` per seed), and
"warm" is the median of `--repeats` later calls. The baselines build a new
model, optimizer and compiled training loop on every call, as a retrain
does, so they trace on every call. Metrics come from the first call. The
table shows mean ± standard deviation over seeds.

Run from the repository root:

    python bench/classification_digits.py --quick   # 1 seed, 300 evaluation images
    python bench/classification_digits.py           # 3 seeds, all evaluation images
"""

import argparse
import os
import pathlib
import shlex
import statistics
import sys
import time

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "examples")]

import _common  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)
import digits_transfer  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tf_linntk  # noqa: E402
from tf_linntk import metrics  # noqa: E402

METHODS = ("map", "laplace", "variational", "last_layer", "fine_tune")
PER_CLASS = 10

# `steps`: full-batch Adam steps of the baselines on the target images;
# `max_test`: cap on the evaluation images (None: all the rest of digits 5–9).
FULL = dict(num_seeds=3, source_epochs=30, steps=100, repeats=3, max_test=None)
QUICK = dict(num_seeds=1, source_epochs=15, steps=100, repeats=1, max_test=300)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 15 source epochs, 300 evaluation images, 1 warm repeat")
    parser.add_argument("--seed", type=int, default=0, help="first seed; seeds are seed, seed+1, ...")
    parser.add_argument("--repeats", type=int, default=None,
                        help="warm calls timed per method and seed (default 3, or 1 with --quick)")
    args = parser.parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1; received {args.repeats}.")
        config["repeats"] = args.repeats

    print(header_line())
    images, labels = digits_transfer._load_digits()
    start = time.perf_counter()
    runs = {method: [] for method in METHODS}
    details = []
    for offset in range(config["num_seeds"]):
        seed = args.seed + offset
        results, detail = run_seed(images, labels, config, seed)
        for method in METHODS:
            runs[method].append(results[method])
        details.append(detail)

    print()
    print(f"Digits 0–4 → 5–9, {PER_CLASS} labelled images per class, "
          f"{details[0]['num_test']} evaluation images; mean ± std over "
          f"{config['num_seeds']} seed(s) ({', '.join(str(d['seed']) for d in details)}); "
          f"warm = median of {config['repeats']} call(s) after the first.")
    print()
    print(results_table(runs))
    print()
    for detail in details:
        print(f"- seed {detail['seed']}: source network trained in {detail['source_seconds']:.1f} s; "
              f"Laplace evidence chose s² = {detail['prior_variance']:g}.")
    print("- The tf_linntk methods share one LinearizedModel per seed and run in the order "
          "laplace, map, variational, so the first map and variational calls reuse some traces "
          "of the laplace call.")
    print(f"- 1-minute load average at the end: {os.getloadavg()[0]:.1f} (other jobs share the "
          "machine when it exceeds nproc, and the timings then include waiting for a core).")
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s")


def header_line():
    cpu_model = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    command = "python " + shlex.join(sys.argv)
    return (f"machine: nproc={len(os.sched_getaffinity(0))}, CPU {cpu_model}; "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, TFP {tfp.__version__}, "
            f"tf_linntk {tf_linntk.__version__}; 1-minute load average {os.getloadavg()[0]:.1f}; "
            f"command: `{command}`")


def run_seed(images, labels, config, seed):
    """Train the source CNN for one seed, then score and time every method.

    Returns:
        ({method: {"accuracy", "nll", "ece", "first_seconds", "warm_seconds"}},
         {"seed", "num_test", "source_seconds", "prior_variance"}).
    """
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    num_classes = digits_transfer.NUM_CLASSES
    source = labels < num_classes
    network = digits_transfer._build_cnn(num_classes)
    with _common.Stopwatch() as source_clock:
        _common.train(network, images[source], labels[source], digits_transfer._sparse_crossentropy,
                      epochs=config["source_epochs"], learning_rate=3e-3, batch_size=64, seed=seed)

    train, test = digits_transfer._split_target(labels, PER_CLASS, rng, config["max_test"])
    x_train, y_train = images[train], labels[train] - num_classes
    x_test, y_test = images[test], labels[test] - num_classes

    # The same linearization as examples/digits_transfer.py: zero mean, the two
    # dense layers, centered logits (the projection I − 11ᵀ/5) and chunks of 64.
    centering = np.eye(num_classes) - 1.0 / num_classes
    lin = tf_linntk.LinearizedModel(
        network, mean="zero", layers=network.layers[-2:], batch_size=64,
        output_projection=centering,
    )
    chosen = {}

    def laplace():
        chosen["prior_variance"] = digits_transfer._fit_laplace_by_evidence(lin, x_train, y_train, seed)
        return digits_transfer._predict_probabilities(lin, x_test)

    def linearized(inference):
        def fit_and_predict():
            lin.adapt(x_train, y_train, likelihood="categorical", inference=inference,
                      prior_variance=chosen["prior_variance"], seed=seed)
            return digits_transfer._predict_probabilities(lin, x_test)

        return fit_and_predict

    def retrained(fit):
        def fit_and_predict():
            model = fit(network, x_train, y_train, config["steps"], seed,
                        digits_transfer._sparse_crossentropy)
            return tf.nn.softmax(model(x_test)).numpy()

        return fit_and_predict

    methods = {
        "laplace": laplace,
        "map": linearized("map"),
        "variational": linearized("variational"),
        "last_layer": retrained(digits_transfer._retrain_last_layer),
        "fine_tune": retrained(digits_transfer._fine_tune),
    }
    results = {}
    for method, fit_and_predict in methods.items():
        with _common.Stopwatch() as first:
            probabilities = fit_and_predict()
        warm = []
        for _ in range(config["repeats"]):
            with _common.Stopwatch() as clock:
                fit_and_predict()
            warm.append(clock.seconds)
        results[method] = {
            "accuracy": metrics.accuracy(y_test, probabilities),
            "nll": metrics.negative_log_likelihood(y_test, probabilities),
            "ece": metrics.expected_calibration_error(y_test, probabilities),
            "first_seconds": first.seconds,
            "warm_seconds": statistics.median(warm),
        }
    detail = dict(seed=seed, num_test=len(test), source_seconds=source_clock.seconds,
                  prior_variance=chosen["prior_variance"])
    return results, detail


def results_table(runs):
    """Return a markdown table of mean ± std over seeds per method."""
    columns = (("accuracy", "accuracy", "{:.3f}"), ("nll", "NLL", "{:.3f}"), ("ece", "ECE", "{:.3f}"),
               ("first_seconds", "first call (s)", "{:.2f}"), ("warm_seconds", "warm (s)", "{:.2f}"))
    lines = ["| method | " + " | ".join(label for _, label, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in METHODS:
        cells = []
        for key, _, template in columns:
            mean, std = _common.mean_and_std([run[key] for run in runs[method]])
            cells.append(f"{template.format(mean)} ± {template.format(std)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
