"""Bayesian classification on the linearized network: MAP, Laplace and variational fits.

Model: logits f(x; δ) = m(x) + J(x) δ [N, O] with δ = θ' − θ₀ ~ N(0, s² I_P) and
a categorical (O ≥ 2 classes, p = softmax(f)) or Bernoulli (O = 1, p = sigmoid(f))
likelihood. This is a Bayesian generalized linear model on the Jacobian
features, so the negative log posterior is convex and its Hessian is the GGN
G(f) = Σᵢ Jᵢᵀ H(fᵢ) Jᵢ plus I/s².

- "map": w = argmin L(δ), with L(δ) = −Σᵢ log p(yᵢ | fᵢ(δ)) + ‖δ‖²/(2s²).
- "laplace": δ ~ N(w, Σ) with Σ = (G(f_MAP) + I/s²)⁻¹ kept as
  s² I − U diag(d) Uᵀ, where U [P, k] and θ [k] are the top Ritz pairs of
  G(f_MAP) from Lanczos and d = s⁴θ/(1 + s²θ).
- "variational": a Gaussian q(δ) from TFP trained by maximizing the ELBO with
  minibatches (see `tf_linntk.inference.variational`).

J is never formed during fitting. Predictions need per-example Jacobians for
the logit covariances (see `ClassificationPosterior`).
"""

import logging
import math

import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import _progress
from tf_linntk import _streaming
from tf_linntk import likelihoods
from tf_linntk.inference import _glm
from tf_linntk.inference import _optimizers
from tf_linntk.inference import _targets
from tf_linntk.inference import classification_posterior
from tf_linntk.inference import variational

__all__ = [
    "INFERENCE_METHODS",
    "LINKS",
    "OPTIMIZERS",
    "PRIOR_VARIANCE_SEARCH_BOUNDS",
    "ClassificationPosterior",
    "fit",
    "laplace_log_evidence",
]

ClassificationPosterior = classification_posterior.ClassificationPosterior
LINKS = classification_posterior.LINKS

INFERENCE_METHODS = ("laplace", "map", "variational")
OPTIMIZERS = ("newton_cg", "lbfgs", "adam")
ON_NONCONVERGENCE = ("warn", "raise", "ignore")

# Range of s² searched when `prior_variance=None`: a grid of one point per decade,
# then a golden-section refinement around the best grid point down to a bracket
# of width _LOG_PRIOR_VARIANCE_TOL in log s².
PRIOR_VARIANCE_SEARCH_BOUNDS = (1e-4, 1e4)
_LOG_PRIOR_VARIANCE_TOL = 0.05
_GOLDEN_RATIO = (math.sqrt(5.0) - 1.0) / 2.0

# Default gradient tolerance by model dtype: about the relative precision a
# gradient −Jᵀg + δ/s² that cancels at the optimum keeps in that dtype.
_DEFAULT_TOL = {tf.float32: 1e-5, tf.float64: 1e-8}
_DEFAULT_MAX_ITERATIONS = {"newton_cg": 50, "lbfgs": 1000}

_logger = logging.getLogger(__name__)


def fit(
    lin,
    x,
    y,
    likelihood,
    *,
    inference="laplace",
    prior_variance=1.0,
    optimizer="newton_cg",
    tol=None,
    max_iterations=None,
    link="probit",
    num_samples=1000,
    variance_rank=100,
    seed=None,
    on_nonconvergence="warn",
    verbose=0,
    variational_family="mean_field",
    rank=10,
    epochs=100,
    batch_size=32,
    learning_rate=1e-2,
    num_elbo_samples=4,
    initialization="map",
    callbacks=None,
):
    """Fit the posterior of a linearized classifier to labelled data.

    Cost: one forward pass for m(x). MAP by Newton–CG: per Newton step, CG
    iterations of one JVP and one VJP each, plus one JVP and one VJP. Laplace
    adds `variance_rank` Lanczos steps (one JVP and one VJP each). Nothing of
    size N·O·P or P² is formed; memory is O(batch · activations + k·P + N·O).

    Args:
        lin: the `LinearizedModel` (O logits per example).
        x: inputs with N examples, or a finite batched `tf.data.Dataset` of
            (x, y) pairs (then `y` is None), read again on every product; its
            minibatches for "adam" and "variational" come in the dataset's order.
        y: labels. Categorical: integer class ids [N] or [N, 1] in [0, O), or
            one-hot rows [N, O]; float arrays are accepted when every value is
            an integer. Bernoulli: 0/1 labels [N] or [N, 1] for a single-logit
            model (O = 1).
        likelihood: "categorical", "bernoulli", or a `Categorical` or
            `Bernoulli` instance.
        inference: "laplace" (default), "map" or "variational".
        prior_variance: s² > 0 (default 1.0), or None to maximize the Laplace log
            evidence over s² ∈ [1e-4, 1e4] (a grid of one point per decade, then
            golden-section search in log s² to a bracket of width 0.05, each
            point refitting the MAP from the previous one and running Lanczos).
        optimizer: MAP optimizer: "newton_cg" (default), "lbfgs"
            (`tfp.optimizer.lbfgs_minimize`) or "adam" (minibatch Keras Adam on
            δ, for large N).
        tol: MAP gradient tolerance: stop when ‖∇L(δ)‖ ≤ tol·max(1, ‖∇L(0)‖).
            None (default) gives 1e-8 for float64 models and 1e-5 for float32.
        max_iterations: Newton steps (default 50) or L-BFGS iterations (default
            1000); "adam" runs `epochs` instead.
        link: predictive approximation used by `lin(x)`: "probit" (default) or
            "monte_carlo"; see `ClassificationPosterior.class_probabilities`.
        num_samples: default Monte Carlo sample count of the predictive (1000).
        variance_rank: Lanczos steps k for the Laplace covariance (default 100,
            capped at P). Directions outside the k Ritz vectors keep the prior
            variance s², so with k below the rank of G the variances err high.
        seed: int seed of Lanczos, minibatch order, ELBO samples and the
            predictive's default Monte Carlo draws; None draws one at random.
        on_nonconvergence: "warn" (default), "raise" or "ignore" when the MAP
            optimizer stops above `tol`.
        verbose: 0 (default, silent) or 1: Keras progress bars over the
            Newton steps or Adam epochs of the MAP, the Lanczos steps of the
            final Laplace covariance, and the variational epochs. The CG solve
            inside each Newton step and the Lanczos runs of the prior-variance
            search show no bar, so one bar shows at a time.
        variational_family: "mean_field" (default) or "low_rank" (inference
            "variational" only).
        rank: rank r of the "low_rank" family (default 10).
        epochs: passes over the data of Adam ("adam" MAP and variational;
            default 100).
        batch_size: minibatch size of Adam (default 32).
        learning_rate: Adam's initial step size (default 1e-2), annealed to 1% of
            it by cosine decay over all steps; or a
            `keras.optimizers.schedules.LearningRateSchedule`, used as given.
        num_elbo_samples: reparameterized draws of δ per ELBO step (default 4).
        initialization: start of the variational mean: "map" (default, the MAP
            from `optimizer`, at the cost of one MAP fit) or "prior" (δ = 0, no
            MAP fit when `prior_variance` is given). The initial variances are
            1/(diag G + 1/s²) at the starting point (see
            `tf_linntk.inference.variational`).
        callbacks: list of `keras.callbacks.Callback` for the epochs of "adam"
            MAP and variational training (ignored otherwise). Each epoch ends
            with logs {"loss": mean minibatch loss} ("adam") or {"elbo": mean
            ELBO estimate, "loss": −elbo} (variational). A callback that sets
            `model.stop_training`, such as `keras.callbacks.EarlyStopping`,
            ends the training after that epoch; `model` is the
            `LinearizedModel`.

    Returns:
        A `ClassificationPosterior`.

    Raises:
        TypeError: for an option or label of the wrong type.
        ValueError: for invalid labels (ids outside [0, O), non-integer class
            ids, a label count other than N, Bernoulli with O > 1) or option
            values (e.g. `prior_variance` ≤ 0).
        tf_linntk.ConvergenceError: if the MAP optimizer stops above `tol` and
            `on_nonconvergence="raise"`.

    Example:
        >>> lin.adapt(x, labels, likelihood="categorical")          # doctest: +SKIP
        >>> lin(x_test).shape, lin.posterior.covariance.shape       # doctest: +SKIP
        (TensorShape([N, O]), TensorShape([P, P]))
    """
    options = _validate_options(lin, dict(
        inference=inference, prior_variance=prior_variance, optimizer=optimizer, tol=tol,
        max_iterations=max_iterations, link=link, num_samples=num_samples,
        variance_rank=variance_rank, seed=seed, on_nonconvergence=on_nonconvergence,
        verbose=verbose, variational_family=variational_family, rank=rank, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, num_elbo_samples=num_elbo_samples,
        initialization=initialization, callbacks=callbacks,
    ))
    likelihood = _check_likelihood(likelihood, lin.num_outputs)
    problem = _build_problem(lin, x, y, likelihood)
    _logger.info(
        "Classification fit: N=%d, O=%d, P=%d, inference=%s, optimizer=%s.",
        problem.num_examples, problem.num_outputs, problem.num_parameters,
        options["inference"], options["optimizer"],
    )

    try:
        return _fit_posterior(problem, options)
    finally:
        problem.release()


def laplace_log_evidence(problem, weights, logits, prior_variance, eigenvalues):
    """Return the Laplace approximation of log p(y | s²).

    log p(y) ≈ log p(y | w) − ‖w‖²/(2s²) − ½ log|I + s² G(f_MAP)|, with the log
    determinant Σⱼ log(1 + s² θⱼ) over the Ritz values θ of G. With fewer Ritz
    pairs than the rank of G the determinant is underestimated.

    Args:
        problem: the `_glm.GLMProblem`.
        weights: float64 Tensor [P], the MAP w.
        logits: float64 Tensor [N, O], m(x) + J(x) w.
        prior_variance: float s².
        eigenvalues: float64 Tensor [k], Ritz values of G at the MAP logits.

    Returns:
        float, the approximate log evidence in nats.
    """
    log_likelihood = -float(problem.negative_log_likelihood(logits))
    penalty = float(tf.reduce_sum(tf.square(weights))) / (2.0 * prior_variance)
    log_det = float(tf.reduce_sum(tf.math.log1p(prior_variance * eigenvalues)))
    return log_likelihood - penalty - 0.5 * log_det


# ---------------------------------------------------------------------- steps


def _fit_posterior(problem, options):
    """Fit s² and the MAP, then the posterior that `inference` names."""
    prior_variance, weights, logits, records = _fit_prior_variance(problem, options)
    if options["inference"] == "map":
        return classification_posterior.map_posterior(problem.likelihood, weights,
                                                      prior_variance, records, options)
    if options["inference"] == "laplace":
        return _laplace_posterior(problem, weights, logits, prior_variance, records, options)
    if logits is None:
        logits = problem.prior_mean
    return variational.fit_variational(problem, prior_variance, weights, logits, records,
                                       options)


def _build_problem(lin, x, y, likelihood):
    """Convert and validate x and y; return the GLMProblem with m(x) computed."""
    if _streaming.is_dataset(x):
        _targets.check_no_separate_targets(y)
        x, y = lin.functional.read_dataset(x)
    x = lin._convert_x(x)
    num_examples = lin.functional.num_examples(x)
    if not isinstance(num_examples, int):
        raise ValueError("`x` must have a known number of examples; received a symbolic batch.")
    if num_examples == 0:
        raise ValueError("`x` must contain at least one example; received N=0.")
    if y is None:
        raise ValueError(
            "`y` is required for classification; received None. Pass labels with "
            f"N={num_examples} entries (from `x`)."
        )
    labels = likelihood.validate_labels(y, lin.num_outputs, num_examples, arg_name="y")
    prior_mean = tf.cast(lin._prior_mean_flat(x), tf.float64)  # [N, O]
    non_finite = int(tf.reduce_sum(tf.cast(~tf.math.is_finite(prior_mean), tf.int32)))
    if non_finite:
        raise ValueError(
            f"The network's logits m(x) on `x` must be finite; received {non_finite} NaN "
            "or Inf value(s). Check `x` and the wrapped model's weights."
        )
    return _glm.GLMProblem(lin, x, tf.constant(labels, tf.int64), likelihood, prior_mean)


def _fit_prior_variance(problem, options):
    """Return (s², w, logits, records) for the fixed s² or the evidence maximizer."""
    records = {}
    s2 = options["prior_variance"]
    if s2 is not None and options["inference"] == "variational" and (
        options["initialization"] == "prior"
    ):
        return s2, tf.zeros([problem.num_parameters], tf.float64), None, records
    if s2 is not None:
        weights, logits = _fit_map(problem, s2, None, options, records)
        return s2, weights, logits, records

    search = _EvidenceSearch(problem, options)
    s2 = search.run()
    records["prior_variance"] = search.record()
    _logger.info("Laplace evidence maximized at prior_variance=%.4g.", s2)
    weights, logits = _fit_map(problem, s2, search.best_weights, options, records)
    return s2, weights, logits, records


def _fit_map(problem, prior_variance, initial, options, records):
    """Run the chosen MAP optimizer, store its record and trace, and report."""
    if initial is None:
        initial = tf.zeros([problem.num_parameters], tf.float64)
    optimizer = options["optimizer"]
    if optimizer == "adam":
        weights, logits, record, trace = _optimizers.adam(
            problem, prior_variance, initial, tol=options["tol"], epochs=options["epochs"],
            batch_size=options["batch_size"], learning_rate=options["learning_rate"],
            seed=options["seed"], verbose=options["verbose"], callbacks=options["callbacks"],
        )
    else:
        method = _optimizers.newton_cg if optimizer == "newton_cg" else _optimizers.lbfgs
        weights, logits, record, trace = method(
            problem, prior_variance, initial, tol=options["tol"],
            max_iterations=options["max_iterations"], verbose=options["verbose"],
        )
    records["map"] = record
    records["map_trace"] = trace
    # Stack: report_convergence <- _fit_map <- _fit_prior_variance <- _fit_posterior <- fit
    # <- adapt <- user.
    _optimizers.report_convergence(record, trace, options["on_nonconvergence"], stacklevel=6)
    return weights, logits


def _ggn_eigenpairs(problem, logits, options, verbose=0):
    """Return the top Ritz pairs (θ [k], U [P, k], record) of G at `logits`."""
    problem.set_curvature(logits)
    rank = min(options["variance_rank"], problem.num_parameters)
    return _glm.top_eigenpairs(problem.ggn_operator, rank, options["seed"], verbose=verbose)


def _laplace_posterior(problem, weights, logits, prior_variance, records, options):
    eigenvalues, root, lanczos_record = _ggn_eigenpairs(
        problem, logits, options, verbose=options["verbose"]
    )
    records["lanczos"] = lanczos_record
    evidence = laplace_log_evidence(problem, weights, logits, prior_variance, eigenvalues)
    _logger.info("Laplace: %d Ritz pairs, log evidence %.6g.", int(eigenvalues.shape[0]), evidence)
    return classification_posterior.laplace_posterior(
        problem.likelihood, weights, root, eigenvalues, prior_variance, records, options,
        log_evidence=evidence,
    )


class _EvidenceSearch:
    """Maximize the Laplace log evidence over log s², refitting the MAP per point."""

    def __init__(self, problem, options):
        self.problem = problem
        # MAP fits inside the search stay silent (no warnings, no progress bars);
        # the final fit at the chosen s² reports.
        self.options = {**options, "on_nonconvergence": "ignore", "verbose": 0}
        self.evaluations = {}
        self.best_weights = None
        self._weights = None

    def evaluate(self, log_s2):
        """Return the log evidence at s² = exp(log_s2), warm-starting the MAP."""
        if log_s2 in self.evaluations:
            return self.evaluations[log_s2]
        s2 = math.exp(log_s2)
        scratch = {}
        weights, logits = _fit_map(self.problem, s2, self._weights, self.options, scratch)
        eigenvalues, _, _ = _ggn_eigenpairs(self.problem, logits, self.options)
        value = laplace_log_evidence(self.problem, weights, logits, s2, eigenvalues)
        self._weights = weights
        if not self.evaluations or value > max(self.evaluations.values()):
            self.best_weights = weights
        self.evaluations[log_s2] = value
        _logger.info("Evidence search: prior_variance=%.4g, log evidence=%.6g.", s2, value)
        return value

    def run(self):
        """Return the s² of the largest log evidence found."""
        low, high = (math.log(b) for b in PRIOR_VARIANCE_SEARCH_BOUNDS)
        grid = np.linspace(low, high, int(round((high - low) / math.log(10.0))) + 1)
        values = [self.evaluate(float(point)) for point in grid]
        best = int(np.argmax(values))
        left = float(grid[max(best - 1, 0)])
        right = float(grid[min(best + 1, len(grid) - 1)])
        return math.exp(self._golden_section(left, right))

    def _golden_section(self, left, right):
        inner_left = right - _GOLDEN_RATIO * (right - left)
        inner_right = left + _GOLDEN_RATIO * (right - left)
        while right - left > _LOG_PRIOR_VARIANCE_TOL:
            if self.evaluate(inner_left) >= self.evaluate(inner_right):
                right, inner_right = inner_right, inner_left
                inner_left = right - _GOLDEN_RATIO * (right - left)
            else:
                left, inner_left = inner_left, inner_right
                inner_right = left + _GOLDEN_RATIO * (right - left)
        return max(self.evaluations, key=self.evaluations.get)

    def record(self):
        """Return the evaluated prior variances and log evidences, by increasing s²."""
        points = sorted(self.evaluations)
        return {
            "prior_variance": np.exp(np.array(points)),
            "log_evidence": np.array([self.evaluations[p] for p in points]),
        }


# ---------------------------------------------------------------------- validation


def _validate_options(lin, merged):
    """Validate every option of `fit`; return them with None defaults resolved."""
    optimizer = _checks.check_option("optimizer", merged["optimizer"], OPTIMIZERS)
    checked = {
        "inference": _checks.check_option("inference", merged["inference"], INFERENCE_METHODS),
        "prior_variance": _checks.check_positive_float(
            "prior_variance", merged["prior_variance"], allow_none=True
        ),
        "optimizer": optimizer,
        "tol": _checks.check_positive_float("tol", merged["tol"], allow_none=True)
        or _DEFAULT_TOL[lin.functional.dtype],
        "max_iterations": _checks.check_iteration_count(
            "max_iterations", merged["max_iterations"], allow_none=True
        ) or _DEFAULT_MAX_ITERATIONS.get(optimizer),
        "variance_rank": _checks.check_positive_int("variance_rank", merged["variance_rank"]),
        "seed": _resolve_seed(merged["seed"]),
        "on_nonconvergence": _checks.check_option(
            "on_nonconvergence", merged["on_nonconvergence"], ON_NONCONVERGENCE
        ),
        "verbose": _progress.check_verbose(merged["verbose"]),
        "initialization": _checks.check_option(
            "initialization", merged["initialization"], ("map", "prior")
        ),
    }
    predictive = classification_posterior.validate_predictive_options(
        merged["link"], merged["num_samples"], None
    )
    checked.update(link=predictive["link"], num_samples=predictive["num_samples"])
    checked.update(variational.validate_options(merged))
    return checked


def _check_likelihood(likelihood, num_outputs):
    """Return the likelihood instance after checking that it fits O."""
    likelihood = likelihoods.get_likelihood(likelihood)
    if isinstance(likelihood, likelihoods.Bernoulli) and num_outputs != 1:
        raise ValueError(
            f"`likelihood`='bernoulli' needs a single-logit model (O = 1); the model "
            f"has O={num_outputs} outputs. Use likelihood='categorical' for "
            f"{num_outputs} classes."
        )
    if isinstance(likelihood, likelihoods.Categorical) and num_outputs < 2:
        raise ValueError(
            f"`likelihood`='categorical' needs O ≥ 2 logits per example; the model has "
            f"O={num_outputs}. Use likelihood='bernoulli' for one logit."
        )
    if not isinstance(likelihood, (likelihoods.Categorical, likelihoods.Bernoulli)):
        raise ValueError(
            f"`likelihood` must be 'categorical' or 'bernoulli' for classification; "
            f"received {likelihood!r}."
        )
    return likelihood


def _resolve_seed(seed):
    """Return the int seed, drawing one when `seed` is None."""
    seed = _checks.check_seed("seed", seed)
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))
    return seed

