"""Few-shot transfer on scikit-learn's 8×8 digits: tf_linntk against retraining and fine-tuning.

Classification: a small CNN is trained on digits 0–4 (the source task). The
target task is digits 5–9 with k labelled images per class (k = 1, 5, 20),
tested on all other images of 5–9. tf_linntk adapts the linearized CNN by
Laplace, variational and MAP inference. The baselines retrain the last layer,
fine-tune the whole CNN (the same step budget and 6× that budget) or train the
CNN from scratch. Reported: accuracy, NLL, ECE and wall time per method, mean
and standard deviation over seeds.

Regression, a small pose-prediction task: each image is rotated by an angle
drawn from U(−45°, 45°) and a CNN regressor predicts the standardized angle.
It is trained on digits 0–4 and adapted to digits 5–9 from a few images.
tf_linntk's GP (σ² from held-out source residuals, s² by marginal likelihood)
is compared by MSE and Gaussian NLL with the same baselines, whose predictive
variance is their mean squared training residual.

Run:  python examples/digits_transfer.py [--quick] [--output DIR] [--seed S]
"""

import sys

import _common
import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage
from sklearn.datasets import load_digits

import tf_linntk
from tf_linntk import metrics

NUM_CLASSES = 5
MAX_ANGLE = 45.0

CLASSIFIERS = ("laplace", "variational", "map", "last_layer", "fine_tune", "fine_tune_6x",
               "scratch")
REGRESSORS = ("linearized_gp", "last_layer", "fine_tune", "fine_tune_6x", "scratch")

# Prior variances s² tried for the Laplace posterior, half a decade apart.
PRIOR_VARIANCE_GRID = tuple(10.0 ** np.arange(-2.0, 1.01, 0.5))

# Run sizes. `steps` is the full-batch Adam step budget of the baselines on the
# target data, and fine_tune_6x and scratch get 6 times as many. `max_test` caps
# the number of test images (None: all the rest of digits 5–9).
FULL = dict(num_seeds=3, shots=(1, 5, 20), regression_sizes=(10, 50, 200), source_epochs=30,
            steps=100, max_test=None)
QUICK = dict(num_seeds=1, shots=(5,), regression_sizes=(50,), source_epochs=15, steps=100,
             max_test=300)


def main(argv=None):
    """Run the example; return {"classification": ..., "regression": ..., "seconds": float}.

    Classification entries are {method: {k: {"accuracy", "nll", "ece", "seconds"} and their
    "*_std"}}; regression entries {method: {n: {"mse", "nll", "seconds"} and "*_std"}}.
    """
    args = _common.build_parser(__doc__.splitlines()[0]).parse_args(argv)
    output = _common.prepare_run(args, "digits_transfer")
    config = QUICK if args.quick else FULL
    images, labels = _load_digits()

    with _common.Stopwatch() as total:
        classification = {m: {k: [] for k in config["shots"]} for m in CLASSIFIERS}
        regression = {m: {n: [] for n in config["regression_sizes"]} for m in REGRESSORS}
        for offset in range(config["num_seeds"]):
            seed = args.seed + offset
            keras.utils.set_random_seed(seed)
            _run_classification(images, labels, config, seed, classification)
            _run_regression(images, labels, config, seed, regression)

    summary = {
        "classification": _summarize(classification),
        "regression": _summarize(regression),
        "seconds": total.seconds,
    }
    _write_outputs(output, summary, classification, regression, config)
    return summary


# ---------------------------------------------------------------------- data and models


def _load_digits():
    """Return images [1797, 8, 8, 1] float32 in [0, 1] and labels [1797] int."""
    digits = load_digits()
    return (digits.images / 16.0)[..., None].astype("float32"), digits.target


def _build_cnn(num_outputs):
    """Return the small CNN used for both tasks (about 9.6k weights for 5 outputs)."""
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(num_outputs),
    ])


def _split_target(labels, per_class, rng, max_test):
    """Return (train, test) indices of digits 5–9: `per_class` train images per digit."""
    pool = np.where(labels >= NUM_CLASSES)[0]
    train = np.concatenate([
        rng.choice(pool[labels[pool] == digit], per_class, replace=False)
        for digit in range(NUM_CLASSES, 2 * NUM_CLASSES)
    ])
    test = np.setdiff1d(pool, train)
    if max_test is not None and len(test) > max_test:
        test = np.sort(rng.choice(test, max_test, replace=False))
    return train, test


def _sparse_crossentropy(labels, logits):
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


# ---------------------------------------------------------------------- classification


def _run_classification(images, labels, config, seed, results):
    """Train the source classifier, then adapt every method at every k; append to `results`."""
    rng = np.random.default_rng(seed)
    source = labels < NUM_CLASSES
    network = _build_cnn(NUM_CLASSES)
    _common.train(network, images[source], labels[source], _sparse_crossentropy,
                  epochs=config["source_epochs"], learning_rate=3e-3, batch_size=64, seed=seed)

    # The 5 target classes take the 5 source logits in order (an identity remap),
    # so the source head's weights stay part of J. The mean function is zero:
    # the source logits score digits 0–4, so as a prior mean for 5–9 they only add
    # a bias. The projection also centers the logits (I − 11ᵀ/5). Softmax ignores
    # their common shift and the likelihood never constrains it, so its prior
    # variance would only flatten the probit predictive. Only the two dense layers
    # (8.4k of the 9.6k weights) are linearized: adding the convolutions raised the
    # Laplace NLL at k = 5 by 0.01 to 0.08 (3 seeds) and slowed predictions ~1.3×.
    # batch_size=64 because per-chunk Jacobians for the predictive grow with the
    # square of the chunk size.
    centering = np.eye(NUM_CLASSES) - 1.0 / NUM_CLASSES
    lin = tf_linntk.LinearizedModel(
        network, mean="zero", layers=network.layers[-2:], batch_size=64,
        output_projection=centering,
    )
    for per_class in config["shots"]:
        train, test = _split_target(labels, per_class, rng, config["max_test"])
        x_train, y_train = images[train], labels[train] - NUM_CLASSES
        x_test, y_test = images[test], labels[test] - NUM_CLASSES
        probabilities = _adapt_classifiers(lin, network, x_train, y_train, x_test, config, seed)
        for method, (probs, seconds) in probabilities.items():
            results[method][per_class].append({
                "accuracy": metrics.accuracy(y_test, probs),
                "nll": metrics.negative_log_likelihood(y_test, probs),
                "ece": metrics.expected_calibration_error(y_test, probs),
                "seconds": seconds,
            })


def _adapt_classifiers(lin, network, x_train, y_train, x_test, config, seed):
    """Return {method: (test probabilities [M, 5], wall seconds of adaptation + prediction)}."""
    outputs = {}
    with _common.Stopwatch() as clock:
        prior_variance = _fit_laplace_by_evidence(lin, x_train, y_train, seed)
        probs = _predict_probabilities(lin, x_test)
    outputs["laplace"] = (probs, clock.seconds)
    # Variational inference and MAP reuse the s² that Laplace chose.
    for inference in ("variational", "map"):
        with _common.Stopwatch() as clock:
            lin.adapt(x_train, y_train, likelihood="categorical", inference=inference,
                      prior_variance=prior_variance, seed=seed)
            probs = _predict_probabilities(lin, x_test)
        outputs[inference] = (probs, clock.seconds)

    steps = config["steps"]
    trainers = {
        "last_layer": lambda: _retrain_last_layer(network, x_train, y_train, steps, seed,
                                                  _sparse_crossentropy),
        "fine_tune": lambda: _fine_tune(network, x_train, y_train, steps, seed,
                                        _sparse_crossentropy),
        "fine_tune_6x": lambda: _fine_tune(network, x_train, y_train, 6 * steps, seed,
                                           _sparse_crossentropy),
        "scratch": lambda: _from_scratch(NUM_CLASSES, x_train, y_train, 6 * steps, seed,
                                         _sparse_crossentropy),
    }
    for method, fit in trainers.items():
        with _common.Stopwatch() as clock:
            model = fit()
            probs = tf.nn.softmax(model(x_test)).numpy()
        outputs[method] = (probs, clock.seconds)
    return outputs


def _fit_laplace_by_evidence(lin, x, y, seed):
    """Fit the Laplace posterior with the s² of the largest Laplace evidence on a grid.

    s² runs up the grid `PRIOR_VARIANCE_GRID` until the log evidence falls (it was
    unimodal in log s² in every run checked). `adapt(..., prior_variance=None)`
    finds the maximum more precisely by golden-section search, but with about 20
    Laplace fits instead of at most 8.

    Returns:
        float, the chosen s². `lin.posterior` is the Laplace posterior at it.
    """
    best_evidence, best_variance = -np.inf, None
    for prior_variance in PRIOR_VARIANCE_GRID:
        lin.adapt(x, y, likelihood="categorical", inference="laplace",
                  prior_variance=prior_variance, seed=seed)
        if lin.posterior.log_evidence < best_evidence:
            break
        best_evidence, best_variance = lin.posterior.log_evidence, prior_variance
    if lin.posterior.prior_variance != best_variance:
        lin.adapt(x, y, likelihood="categorical", inference="laplace",
                  prior_variance=best_variance, seed=seed)
    return best_variance


def _predict_probabilities(lin, x):
    """Return the predictive class probabilities [M, 5] (probit link) as a NumPy array."""
    # NOTE: `lin.predict` is not used: Keras compiles `predict` once per model, so
    # after a second `adapt` it kept returning the first posterior's predictions
    # (tf_linntk 0.1.0, Keras 3.15).
    return lin.predictive_distribution(x).probs_parameter().numpy()


# ---------------------------------------------------------------------- baselines


def _retrain_last_layer(network, x, y, steps, seed, loss_fn):
    """Return the network with a new, freshly initialized output layer trained on x, y."""
    body = keras.Model(network.inputs[0], network.layers[-2].output)
    head = keras.layers.Dense(network.output_shape[-1])
    model = keras.Sequential([body, head])
    model.build(network.input_shape)
    # Only the head trains: `body` shares (and must not change) the source weights.
    _common.train(model, x, y, loss_fn, epochs=steps, learning_rate=1e-2, seed=seed,
                  variables=head.trainable_variables)
    return model


def _fine_tune(network, x, y, steps, seed, loss_fn):
    """Return a copy of the source network with all weights trained on x, y."""
    model = keras.models.clone_model(network)
    model.set_weights(network.get_weights())
    _common.train(model, x, y, loss_fn, epochs=steps, learning_rate=1e-3, seed=seed)
    return model


def _from_scratch(num_outputs, x, y, steps, seed, loss_fn):
    """Return a freshly initialized CNN trained on x, y only."""
    model = _build_cnn(num_outputs)
    _common.train(model, x, y, loss_fn, epochs=steps, learning_rate=3e-3, seed=seed)
    return model


# ---------------------------------------------------------------------- regression


def _rotated_digits(images, rng):
    """Rotate each image by an angle from U(−45°, 45°); return images and angles [N] in degrees."""
    angles = rng.uniform(-MAX_ANGLE, MAX_ANGLE, len(images))
    rotated = np.stack([
        ndimage.rotate(image[..., 0], angle, reshape=False, order=1)
        for image, angle in zip(images, angles)
    ])
    return rotated[..., None].astype("float32"), angles


def _run_regression(images, labels, config, seed, results):
    """Train the angle regressor on digits 0–4, adapt every method to 5–9; append to `results`."""
    rng = np.random.default_rng(seed + 1000)
    rotated, angles = _rotated_digits(images, rng)
    source = np.where(labels < NUM_CLASSES)[0]
    scale = angles[source].std()
    targets = (angles / scale)[:, None].astype("float32")  # standardized angle, [N, 1]

    # Hold out 20% of the source images to measure the noise variance σ² of the GP.
    order = rng.permutation(source)
    fit_part, held_out = order[: int(0.8 * len(order))], order[int(0.8 * len(order)):]
    network = _build_cnn(1)
    _common.train(network, rotated[fit_part], targets[fit_part], keras.losses.mean_squared_error,
                  epochs=2 * config["source_epochs"], learning_rate=3e-3, batch_size=64,
                  seed=seed)
    noise_variance = float(np.mean(np.square(network(rotated[held_out]).numpy()
                                             - targets[held_out])))
    # As for classification, only the two dense layers are linearized.
    lin = tf_linntk.LinearizedModel(network, layers=network.layers[-2:], batch_size=64)

    pool = np.where(labels >= NUM_CLASSES)[0]
    for size in config["regression_sizes"]:
        shuffled = rng.permutation(pool)
        train, test = shuffled[:size], shuffled[size:]
        if config["max_test"] is not None:
            test = test[: config["max_test"]]
        predictions = _adapt_regressors(lin, network, noise_variance, rotated[train],
                                        targets[train], rotated[test], config, seed)
        y_test = targets[test][:, 0].astype(np.float64)
        for method, (mean, variance, seconds) in predictions.items():
            results[method][size].append({
                "mse": metrics.mean_squared_error(y_test, mean),
                "nll": metrics.gaussian_negative_log_likelihood(y_test, mean, variance),
                "seconds": seconds,
            })


def _adapt_regressors(lin, network, noise_variance, x_train, y_train, x_test, config, seed):
    """Return {method: (mean [M], variance [M], wall seconds)} on the test images."""
    outputs = {}
    with _common.Stopwatch() as clock:
        lin.adapt(x_train, y_train, noise_variance=noise_variance, prior_variance=None, seed=seed)
        predictive = lin.predictive_distribution(x_test)
        mean, variance = predictive.mean().numpy()[:, 0], predictive.variance().numpy()[:, 0]
    outputs["linearized_gp"] = (mean, variance, clock.seconds)

    steps = config["steps"]
    mse = keras.losses.mean_squared_error
    trainers = {
        "last_layer": lambda: _retrain_last_layer(network, x_train, y_train, steps, seed, mse),
        "fine_tune": lambda: _fine_tune(network, x_train, y_train, steps, seed, mse),
        "fine_tune_6x": lambda: _fine_tune(network, x_train, y_train, 6 * steps, seed, mse),
        "scratch": lambda: _from_scratch(1, x_train, y_train, 6 * steps, seed, mse),
    }
    for method, fit in trainers.items():
        with _common.Stopwatch() as clock:
            model = fit()
            residual_variance = float(np.mean(np.square(model(x_train).numpy() - y_train)))
            mean = model(x_test).numpy()[:, 0]
        # A perfect training fit gets a variance floor of 1e-6 so the NLL stays finite.
        variance = np.full(len(mean), max(residual_variance, 1e-6))
        outputs[method] = (mean, variance, clock.seconds)
    return outputs


# ---------------------------------------------------------------------- reporting


def _summarize(results):
    """Return {method: {size: {metric: mean, metric + "_std": std}}} over seeds."""
    summary = {}
    for method, by_size in results.items():
        summary[method] = {}
        for size, runs in by_size.items():
            entry = {}
            for metric in runs[0]:
                entry[metric], entry[metric + "_std"] = _common.mean_and_std(
                    [run[metric] for run in runs]
                )
            summary[method][size] = entry
    return summary


def _table_rows(summary, methods, sizes, metric_names):
    rows = []
    for size in sizes:
        for method in methods:
            entry = summary[method][size]
            rows.append([size, method] + [
                f"{entry[m]:.3f} ± {entry[m + '_std']:.3f}" for m in metric_names
            ])
    return rows


def _write_outputs(output, summary, classification, regression, config):
    seeds = config["num_seeds"]
    class_rows = _table_rows(summary["classification"], CLASSIFIERS, config["shots"],
                             ("accuracy", "nll", "ece", "seconds"))
    text = f"## Digits 0–4 → 5–9 classification (mean ± std over {seeds} seed(s))\n\n"
    text += _common.write_markdown_table(
        output / "classification.md", ["k per class", "method", "accuracy", "NLL", "ECE",
                                       "seconds"], class_rows)
    reg_rows = _table_rows(summary["regression"], REGRESSORS, config["regression_sizes"],
                           ("mse", "nll", "seconds"))
    text += f"\n## Rotation-angle regression, 0–4 → 5–9 (mean ± std over {seeds} seed(s))\n\n"
    text += _common.write_markdown_table(
        output / "regression.md", ["target images", "method", "MSE", "NLL", "seconds"], reg_rows)
    text += f"\nTotal wall time: {summary['seconds']:.0f} s\n"
    (output / "results.md").write_text(text)
    print(text)

    for metric in ("accuracy", "nll", "ece"):
        _common.plot_metric_against(
            output / f"classification_{metric}.png", list(config["shots"]), classification,
            metric, "labelled images per class (k)", f"Digits 5–9: {metric}", CLASSIFIERS,
        )
    for metric in ("mse", "nll"):
        _common.plot_metric_against(
            output / f"regression_{metric}.png", list(config["regression_sizes"]), regression,
            metric, "labelled target images", f"Rotation angle, digits 5–9: {metric}",
            REGRESSORS,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
