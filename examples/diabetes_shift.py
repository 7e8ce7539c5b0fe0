"""Tabular domain shift: adapt a diabetes-progression regressor from one sex to the other.

scikit-learn's bundled diabetes data (442 patients, 10 standardized features,
one of them sex with two values) is split by sex. A tanh MLP is trained on the
patients of one sex (the source). It is then adapted to the other sex from a
few labelled patients and tested on the remaining ones. Targets are
standardized with the source mean and standard deviation.

Methods, all on the same few target points:

- "linearized_gp": tf_linntk's GP on the linearized source network
  (mean="network"), with σ² the residual variance on held-out source patients
  and s² maximizing the marginal likelihood of the target points.
- "source_only": the source network unchanged, with the same σ².
- "last_layer": a new output layer trained on the frozen hidden features.
- "fine_tune": the whole source network trained further.
- "bayesian_ridge": scikit-learn's BayesianRidge (a linear model) on the target
  points only.

The trained baselines ("last_layer", "fine_tune") predict with a Gaussian whose
variance is their mean squared training residual. Reported: test MSE, Gaussian
NLL and the coverage of the central 90% predictive interval, mean ± std over
repeated draws of the target points.

Run:  python examples/diabetes_shift.py [--quick] [--output DIR] [--seed S]
"""

import sys

import _common
import keras
import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.linear_model import BayesianRidge

import tf_linntk
from tf_linntk import metrics

METHODS = ("linearized_gp", "source_only", "last_layer", "fine_tune", "bayesian_ridge")
SEX_FEATURE = 1

FULL = dict(target_sizes=(10, 20, 40), repeats=5, source_epochs=100, adapt_epochs=200)
QUICK = dict(target_sizes=(20,), repeats=2, source_epochs=100, adapt_epochs=100)

# Variance floor of the residual-variance Gaussians, so a perfect training fit
# still gives a finite NLL.
_MIN_VARIANCE = 1e-6


def main(argv=None):
    """Run the example; return {method: {target size: {"mse", "nll", "coverage_90", *_std}}}."""
    args = _common.build_parser(__doc__.splitlines()[0]).parse_args(argv)
    output = _common.prepare_run(args, "diabetes_shift")
    config = QUICK if args.quick else FULL
    rng = np.random.default_rng(args.seed)

    source, target = _split_by_sex()
    network, noise_variance = _train_source_network(source, config["source_epochs"], rng,
                                                    args.seed)
    lin = tf_linntk.LinearizedModel(network, mean="network")

    results = {m: {n: [] for n in config["target_sizes"]} for m in METHODS}
    for repeat in range(config["repeats"]):
        for size in config["target_sizes"]:
            order = rng.permutation(len(target[0]))
            train = tuple(a[order[:size]] for a in target)
            test = tuple(a[order[size:]] for a in target)
            predictions = _predict_all(lin, network, noise_variance, train, test, config,
                                       args.seed + repeat)
            for method, (mean, variance) in predictions.items():
                results[method][size].append(_score(test[1], mean, variance))

    summary = _summarize(results)
    _write_outputs(output, summary, results, config)
    return summary


def _split_by_sex():
    """Return (x, y) of the source sex and of the target sex; y standardized by the source."""
    x, y = load_diabetes(return_X_y=True)
    sexes = np.unique(x[:, SEX_FEATURE])
    is_source = x[:, SEX_FEATURE] == sexes[0]
    mean, std = y[is_source].mean(), y[is_source].std()
    y = ((y - mean) / std)[:, None]
    x = x.astype("float32")
    y = y.astype("float32")
    return (x[is_source], y[is_source]), (x[~is_source], y[~is_source])


def _build_network():
    return keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(32, activation="tanh"),
        keras.layers.Dense(32, activation="tanh"),
        keras.layers.Dense(1),
    ])


def _train_source_network(source, epochs, rng, seed):
    """Train on 80% of the source patients; return it and the residual variance on the rest."""
    x, y = source
    order = rng.permutation(len(x))
    split = int(0.8 * len(x))
    fit_part, held_out = order[:split], order[split:]
    network = _build_network()
    # Each feature column has unit norm over the 442 patients (entries near ±0.05),
    # so the first layer needs large weights; Adam's step is raised to 1e-2 for them.
    _common.train(network, x[fit_part], y[fit_part], keras.losses.mean_squared_error,
                  epochs=epochs, learning_rate=1e-2, batch_size=32, seed=seed)
    residual = network(x[held_out]).numpy() - y[held_out]
    return network, float(np.mean(np.square(residual)))


def _predict_all(lin, network, noise_variance, train, test, config, seed):
    """Return {method: (mean [M], variance [M])} on the test patients."""
    x_train, y_train = train
    x_test = test[0]
    lin.adapt(x_train, y_train, noise_variance=noise_variance, prior_variance=None, seed=seed)
    predictive = lin.predictive_distribution(x_test)
    predictions = {
        "linearized_gp": (predictive.mean().numpy()[:, 0], predictive.variance().numpy()[:, 0]),
        "source_only": (network(x_test).numpy()[:, 0], np.full(len(x_test), noise_variance)),
        "last_layer": _last_layer(network, x_train, y_train, x_test, config, seed),
        "fine_tune": _fine_tune(network, x_train, y_train, x_test, config, seed),
    }
    ridge = BayesianRidge().fit(x_train, y_train[:, 0])
    mean, std = ridge.predict(x_test, return_std=True)
    predictions["bayesian_ridge"] = (mean, np.square(std))
    return predictions


def _last_layer(network, x_train, y_train, x_test, config, seed):
    """Train a new output layer on the frozen hidden features; return mean and variance."""
    features = keras.Model(network.inputs[0], network.layers[-2].output)
    head = keras.Sequential([keras.Input((32,)), keras.layers.Dense(1)])
    features_train = features(x_train).numpy()
    _common.train(head, features_train, y_train, keras.losses.mean_squared_error,
                  epochs=config["adapt_epochs"], learning_rate=1e-2, seed=seed)
    return _with_residual_variance(head, features_train, y_train, features(x_test).numpy())


def _fine_tune(network, x_train, y_train, x_test, config, seed):
    """Train a copy of the whole source network on the target points; return mean and variance."""
    model = keras.models.clone_model(network)
    model.set_weights(network.get_weights())
    _common.train(model, x_train, y_train, keras.losses.mean_squared_error,
                  epochs=config["adapt_epochs"], learning_rate=1e-3, seed=seed)
    return _with_residual_variance(model, x_train, y_train, x_test)


def _with_residual_variance(model, x_train, y_train, x_test):
    residual_variance = float(np.mean(np.square(model(x_train).numpy() - y_train)))
    variance = np.full(len(x_test), max(residual_variance, _MIN_VARIANCE))
    return model(x_test).numpy()[:, 0], variance


def _score(y_test, mean, variance):
    y_test = y_test[:, 0].astype(np.float64)
    return {
        "mse": metrics.mean_squared_error(y_test, mean),
        "nll": metrics.gaussian_negative_log_likelihood(y_test, mean, variance),
        "coverage_90": _common.gaussian_interval_coverage(y_test, mean, np.sqrt(variance), 0.9),
    }


def _summarize(results):
    summary = {}
    for method, by_size in results.items():
        summary[method] = {}
        for size, runs in by_size.items():
            entry = {}
            for metric in ("mse", "nll", "coverage_90"):
                entry[metric], entry[metric + "_std"] = _common.mean_and_std(
                    [run[metric] for run in runs]
                )
            summary[method][size] = entry
    return summary


def _write_outputs(output, summary, results, config):
    header = ["method", "target points", "test MSE", "test NLL", "90% coverage"]
    rows = []
    for method in METHODS:
        for size in config["target_sizes"]:
            entry = summary[method][size]
            rows.append([method, size] + [
                f"{entry[m]:.3f} ± {entry[m + '_std']:.3f}" for m in ("mse", "nll", "coverage_90")
            ])
    table = _common.write_markdown_table(output / "results.md", header, rows)
    print(f"Diabetes, source sex -> target sex, mean ± std over {config['repeats']} draws:\n{table}")
    for metric in ("mse", "nll", "coverage_90"):
        _common.plot_metric_against(
            output / f"{metric}.png", list(config["target_sizes"]), results, metric,
            "labelled target patients", f"Diabetes sex shift: {metric}", METHODS,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
