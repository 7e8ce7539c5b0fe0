"""Few-shot regression on sinusoids: the finite-NTK GP against an RBF GP and Bayesian last-layer regression.

Each task is y = A sin(ω x + φ) + ε on x ∈ [−5, 5], with A ~ U(0.1, 5),
ω ~ U(0.8, 1.2), φ ~ U(0, π) drawn per task and noise ε ~ N(0, 0.1²). A tanh
MLP is trained on one source task. On each new task, three models see the same
5 to 20 context points and predict a grid of 100 noisy test targets:

- "ntk_gp": tf_linntk's finite-NTK GP (mean="zero"): the kernel is
  s² J(x) J(x')ᵀ of the source network; s² maximizes the marginal likelihood
  of the context points, and σ² is the source network's training residual
  variance.
- "rbf_gp": a GP with an exponentiated-quadratic kernel whose amplitude,
  length scale and noise were fitted by marginal likelihood on the source task.
- "ablr": Bayesian linear regression on the source network's last hidden layer
  (adaptive Bayesian linear regression), closed form, with the same noise
  variance and its prior precision fitted to the context points by the evidence.

Run:  python examples/sinusoid_transfer.py [--quick] [--output DIR] [--seed S]
"""

import sys

import _common
import keras
import numpy as np
import scipy.optimize
import tensorflow as tf
import tensorflow_probability as tfp

import tf_linntk
from tf_linntk import metrics

tfd = tfp.distributions
psd_kernels = tfp.math.psd_kernels

AMPLITUDE_RANGE = (0.1, 5.0)
FREQUENCY_RANGE = (0.8, 1.2)
PHASE_RANGE = (0.0, np.pi)
INPUT_RANGE = (-5.0, 5.0)
NOISE_STD = 0.1
METHODS = ("ntk_gp", "rbf_gp", "ablr")

# Full and quick run sizes: number of test tasks and context sizes.
FULL = dict(num_tasks=20, context_sizes=(5, 10, 20), source_points=200, epochs=300)
QUICK = dict(num_tasks=3, context_sizes=(5, 20), source_points=200, epochs=150)


def main(argv=None):
    """Run the example; return {method: {context size: {"mse", "nll"}}} averaged over tasks."""
    args = _common.build_parser(__doc__.splitlines()[0]).parse_args(argv)
    output = _common.prepare_run(args, "sinusoid_transfer")
    config = QUICK if args.quick else FULL
    rng = np.random.default_rng(args.seed)

    source = _sample_task(rng)
    x_source, y_source = _observe(source, rng.uniform(*INPUT_RANGE, config["source_points"]), rng)
    network = _train_source_network(x_source, y_source, config["epochs"], args.seed)
    rbf = _fit_rbf_hyperparameters(x_source, y_source)
    features = keras.Model(network.inputs[0], network.layers[-2].output)
    lin = tf_linntk.LinearizedModel(network, mean="zero")
    # The noise variance of the NTK GP and of ABLR is the source network's mean
    # squared training residual. Fitting σ² and s² together on 5 context points
    # drove σ² toward zero and the test NLL above 10⁴ in a quick run.
    noise_variance = float(np.mean(np.square(network(x_source).numpy() - y_source)))

    x_test = np.linspace(*INPUT_RANGE, 100)
    results = {m: {n: [] for n in config["context_sizes"]} for m in METHODS}
    examples = {}
    for task_index in range(config["num_tasks"]):
        task = _sample_task(rng)
        _, y_test = _observe(task, x_test, rng)
        for size in config["context_sizes"]:
            x_context, y_context = _observe(task, rng.uniform(*INPUT_RANGE, size), rng)
            predictions = {
                "ntk_gp": _predict_ntk_gp(lin, x_context, y_context, x_test, noise_variance,
                                          args.seed),
                "rbf_gp": _predict_rbf_gp(rbf, x_context, y_context, x_test),
                "ablr": _predict_ablr(features, x_context, y_context, x_test, noise_variance),
            }
            for method, (mean, variance) in predictions.items():
                results[method][size].append(_score(y_test, mean, variance))
            if task_index == 0:
                examples[size] = (task, x_context, y_context, predictions)

    summary = _summarize(results)
    _write_outputs(output, summary, results, examples, x_test, config)
    return summary


def _sample_task(rng):
    """Draw (A, ω, φ) of one sinusoid task."""
    return (rng.uniform(*AMPLITUDE_RANGE), rng.uniform(*FREQUENCY_RANGE), rng.uniform(*PHASE_RANGE))


def _observe(task, x, rng):
    """Return x [N, 1] and noisy targets y [N, 1] of a task, both float32."""
    amplitude, frequency, phase = task
    y = amplitude * np.sin(frequency * x + phase) + NOISE_STD * rng.standard_normal(x.shape)
    return x[:, None].astype("float32"), y[:, None].astype("float32")


def _train_source_network(x, y, epochs, seed):
    """Train a 1-40-40-1 tanh MLP on the source task by mean squared error."""
    network = keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(40, activation="tanh"),
        keras.layers.Dense(40, activation="tanh"),
        keras.layers.Dense(1),
    ])
    _common.train(network, x, y, keras.losses.mean_squared_error, epochs=epochs,
                  learning_rate=3e-3, batch_size=32, seed=seed)
    return network


def _predict_ntk_gp(lin, x_context, y_context, x_test, noise_variance, seed):
    """Return the predictive mean and variance [M] of the finite-NTK GP (s² by marginal likelihood)."""
    lin.adapt(x_context, y_context, noise_variance=noise_variance, prior_variance=None, seed=seed)
    predictive = lin.predictive_distribution(x_test[:, None].astype("float32"))
    return predictive.mean().numpy()[:, 0], predictive.variance().numpy()[:, 0]


def _fit_rbf_hyperparameters(x, y, steps=300):
    """Fit an RBF GP's amplitude, length scale and noise variance on source data.

    The log marginal likelihood of `tfd.GaussianProcess` is maximized by Adam on
    the log-parameters.

    Returns:
        dict with "amplitude", "length_scale" and "noise_variance" (floats).
    """
    x = tf.constant(x, tf.float64)
    y = tf.constant(y[:, 0], tf.float64)
    log_params = tf.Variable(np.log([np.std(y.numpy()), 1.0, 0.1]), dtype=tf.float64)
    optimizer = keras.optimizers.Adam(0.05)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            amplitude, length_scale, noise = tf.unstack(tf.exp(log_params))
            kernel = psd_kernels.ExponentiatedQuadratic(amplitude, length_scale)
            gp = tfd.GaussianProcess(kernel, index_points=x, observation_noise_variance=noise)
            loss = -gp.log_prob(y)
        optimizer.apply_gradients([(tape.gradient(loss, log_params), log_params)])

    for _ in range(steps):
        step()
    amplitude, length_scale, noise = np.exp(log_params.numpy())
    return dict(amplitude=amplitude, length_scale=length_scale, noise_variance=noise)


def _predict_rbf_gp(rbf, x_context, y_context, x_test):
    """Return the predictive mean and variance [M] (noise included) of the RBF GP."""
    kernel = psd_kernels.ExponentiatedQuadratic(
        np.float64(rbf["amplitude"]), np.float64(rbf["length_scale"])
    )
    posterior = tfd.GaussianProcessRegressionModel(
        kernel,
        index_points=x_test[:, None],
        observation_index_points=x_context.astype(np.float64),
        observations=y_context[:, 0].astype(np.float64),
        observation_noise_variance=np.float64(rbf["noise_variance"]),
        predictive_noise_variance=np.float64(rbf["noise_variance"]),
    )
    return posterior.mean().numpy(), posterior.variance().numpy()


def _predict_ablr(features, x_context, y_context, x_test, noise_variance):
    """Return the predictive mean and variance [M] of Bayesian linear regression on features.

    With features Φ [N, D] (last hidden layer plus a constant), prior w ~ N(0, α⁻¹ I)
    and noise precision β = 1 / `noise_variance`: A = α I + β ΦᵀΦ, mean
    β A⁻¹ Φᵀ y, variance 1/β + φ*ᵀ A⁻¹ φ*. α maximizes the log evidence on the
    context points.
    """
    phi = _with_bias(features(x_context).numpy())
    phi_test = _with_bias(features(x_test[:, None].astype("float32")).numpy())
    y = y_context[:, 0].astype(np.float64)
    beta = 1.0 / noise_variance
    result = scipy.optimize.minimize_scalar(
        lambda log_alpha: -_ablr_log_evidence(phi, y, np.exp(log_alpha), beta),
        bounds=(-10.0, 10.0), method="bounded",
    )
    alpha = np.exp(result.x)
    precision = alpha * np.eye(phi.shape[1]) + beta * phi.T @ phi  # A, [D, D]
    mean_weights = beta * np.linalg.solve(precision, phi.T @ y)  # [D]
    variance = 1.0 / beta + np.einsum("md,dm->m", phi_test, np.linalg.solve(precision, phi_test.T))
    return phi_test @ mean_weights, variance


def _ablr_log_evidence(phi, y, alpha, beta):
    """Return log p(y | α, β) of Bayesian linear regression with D features and N points.

    log p = (D/2) log α + (N/2) log β − (β/2)‖y − Φm‖² − (α/2)‖m‖² − ½ log|A|
    − (N/2) log 2π, with A and the posterior mean m as in `_predict_ablr`.
    """
    num_examples, dim = phi.shape
    precision = alpha * np.eye(dim) + beta * phi.T @ phi
    mean_weights = beta * np.linalg.solve(precision, phi.T @ y)
    misfit = 0.5 * beta * np.sum(np.square(y - phi @ mean_weights))
    misfit += 0.5 * alpha * np.sum(np.square(mean_weights))
    _, log_det = np.linalg.slogdet(precision)
    return (0.5 * dim * np.log(alpha) + 0.5 * num_examples * np.log(beta) - misfit
            - 0.5 * log_det - 0.5 * num_examples * np.log(2.0 * np.pi))


def _with_bias(phi):
    return np.concatenate([phi.astype(np.float64), np.ones([len(phi), 1])], axis=1)


def _score(y_test, mean, variance):
    y_test = y_test[:, 0].astype(np.float64)
    return {
        "mse": metrics.mean_squared_error(y_test, mean),
        "nll": metrics.gaussian_negative_log_likelihood(y_test, mean, variance),
    }


def _summarize(results):
    """Average each metric over tasks: {method: {size: {"mse", "mse_std", "nll", "nll_std"}}}."""
    summary = {}
    for method, by_size in results.items():
        summary[method] = {}
        for size, runs in by_size.items():
            entry = {}
            for metric in ("mse", "nll"):
                entry[metric], entry[metric + "_std"] = _common.mean_and_std([r[metric] for r in runs])
            summary[method][size] = entry
    return summary


def _write_outputs(output, summary, results, examples, x_test, config):
    header = ["method", "context points", "test MSE", "test NLL"]
    rows = []
    for method in METHODS:
        for size in config["context_sizes"]:
            entry = summary[method][size]
            rows.append([method, size, f"{entry['mse']:.3f} ± {entry['mse_std']:.3f}",
                         f"{entry['nll']:.3f} ± {entry['nll_std']:.3f}"])
    table = _common.write_markdown_table(output / "results.md", header, rows)
    print(f"Sinusoid transfer, mean ± std over {config['num_tasks']} test tasks:\n{table}")
    for metric in ("mse", "nll"):
        _common.plot_metric_against(
            output / f"{metric}.png", list(config["context_sizes"]), results, metric,
            "context points", f"Sinusoid tasks: test {metric.upper()}", METHODS,
        )
    _plot_posteriors(output / "posteriors.png", examples, x_test)


def _plot_posteriors(path, examples, x_test):
    """Plot the predictive mean and ±2σ band of each method on the first test task."""
    plt = _common.plt
    sizes = sorted(examples)
    figure, axes = plt.subplots(len(sizes), len(METHODS), figsize=(11, 2.8 * len(sizes)),
                                squeeze=False, sharex=True)
    for row, size in enumerate(sizes):
        (amplitude, frequency, phase), x_context, y_context, predictions = examples[size]
        for column, method in enumerate(METHODS):
            axis = axes[row, column]
            mean, variance = predictions[method]
            band = 2.0 * np.sqrt(variance)
            axis.plot(x_test, amplitude * np.sin(frequency * x_test + phase), "k--", lw=1,
                      label="true function")
            axis.plot(x_test, mean, color="C0", label="predictive mean")
            axis.fill_between(x_test, mean - band, mean + band, color="C0", alpha=0.25,
                              label="±2σ")
            axis.scatter(x_context[:, 0], y_context[:, 0], color="C3", s=14, zorder=3,
                         label="context")
            axis.set_title(f"{method}, {size} context points", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main(sys.argv[1:])
