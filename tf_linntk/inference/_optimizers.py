"""MAP optimizers of the linearized classifier and the shared minibatch Adam machinery.

All three optimizers of L(δ) (see `_glm`) stop on, or report, the gradient rule
‖∇L(δ)‖ ≤ tol · max(1, ‖∇L(0)‖): Newton–CG (`newton_cg`), L-BFGS (`lbfgs`) and
minibatch Adam (`adam`).
"""

import logging
import math
import warnings

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_linntk import solvers
from tf_linntk.inference import _glm

_logger = logging.getLogger(__name__)

# Armijo constant and step shrink factor of the Newton–CG backtracking line search.
_ARMIJO_SLOPE = 1e-4
_BACKTRACK_FACTOR = 0.5
_MAX_BACKTRACKS = 40
# Newton–CG solves each Newton system to the relative residual
# min(_MAX_FORCING, sqrt(‖∇L‖ / scale)), which shrinks near the optimum so that
# Newton keeps its superlinear rate (the Eisenstat–Walker forcing idea).
_MAX_FORCING = 0.5
_MIN_FORCING = 1e-12
# Adam's float learning rate decays by a cosine to this fraction of itself over training.
FINAL_LEARNING_RATE_FRACTION = 0.01
# Memory of L-BFGS (number of stored correction pairs).
_LBFGS_CORRECTION_PAIRS = 10


# ---------------------------------------------------------------------- Newton–CG


def newton_cg(problem, prior_variance, initial, *, tol, max_iterations, verbose=0):
    """Minimize L(δ) by Newton's method with conjugate-gradient steps.

    Each iteration solves (G(f) + I/s²) Δ = −∇L by CG on GGN products at the
    current logits f, to the relative residual min(0.5, sqrt(‖∇L‖/scale)), then
    takes the Armijo backtracking step δ + tΔ. Because f is linear in δ, the
    new logits are f + t·JΔ from one JVP and the line search needs no further
    network passes. Stops when ‖∇L‖ ≤ tol·scale, scale = max(1, ‖∇L(0)‖).

    Args:
        problem: the `_glm.GLMProblem`.
        prior_variance: float s².
        initial: float64 Tensor [P], the starting point.
        tol: float, gradient tolerance of the stopping rule.
        max_iterations: int, maximum number of Newton steps.
        verbose: 0 or 1 (a Keras progress bar over the Newton steps with the
            current loss and ‖∇L‖). The CG solve inside each step stays
            silent, so only one bar shows at a time.

    Returns:
        (weights [P], logits [N, O], record, trace): the record is a
        `solvers.ConvergenceRecord` and the trace a dict of per-step losses,
        gradient norms and CG iterations.
    """
    scale = problem.gradient_scale()
    weights = tf.convert_to_tensor(initial, tf.float64)
    logits = problem.logits(weights)
    loss = problem.loss(weights, logits, prior_variance)
    gradient = problem.gradient(weights, logits, prior_variance)
    trace = {"loss": [float(loss)], "gradient_norm": [float(tf.norm(gradient))],
             "cg_iterations": [], "stalled": False}
    progress = keras.utils.Progbar(max_iterations, verbose=verbose, unit_name="step",
                                   stateful_metrics=["loss", "gradient_norm"])
    step_count = 0

    while step_count < max_iterations and trace["gradient_norm"][-1] > tol * scale:
        # Solve (G + I/s²) Δ = −∇L inexactly.
        forcing = min(_MAX_FORCING, math.sqrt(trace["gradient_norm"][-1] / scale))
        problem.set_curvature(logits, prior_variance)
        direction, cg_record = solvers.conjugate_gradient(
            problem.precision_operator, -gradient, tol=max(forcing, _MIN_FORCING),
            on_nonconvergence="ignore",
        )
        direction_logits = problem.jvp(direction)  # J Δ, [N, O]
        step = _backtrack(problem, prior_variance, weights, logits, loss, gradient,
                          direction, direction_logits)
        if step is None:
            trace["stalled"] = True
            break

        weights = weights + step * direction
        logits = logits + step * direction_logits
        loss = problem.loss(weights, logits, prior_variance)
        gradient = problem.gradient(weights, logits, prior_variance)
        step_count += 1
        trace["loss"].append(float(loss))
        trace["gradient_norm"].append(float(tf.norm(gradient)))
        trace["cg_iterations"].append(int(cg_record.iterations[0]))
        progress.update(step_count, [("loss", float(loss)),
                                     ("gradient_norm", trace["gradient_norm"][-1])])
        _logger.info("Newton-CG step %d: loss=%.10g, |grad|=%.3g, CG iterations=%d.",
                     step_count, float(loss), trace["gradient_norm"][-1], trace["cg_iterations"][-1])

    if step_count < max_iterations:
        # The loop stopped before max_iterations, so no update() ended the bar's line yet.
        progress.update(step_count, finalize=True)
    record = _gradient_record("newton_cg", step_count, trace["gradient_norm"][-1], scale, tol,
                              max_iterations)
    _logger.info("Newton-CG: stop, %r", record)
    return weights, logits, record, trace


def _backtrack(problem, prior_variance, weights, logits, loss, gradient, direction,
               direction_logits):
    """Return the first step t ∈ {1, ½, ¼, …} meeting the Armijo condition, or None."""
    slope = float(tf.reduce_sum(gradient * direction))
    if not slope < 0.0:
        return None
    step = 1.0
    for _ in range(_MAX_BACKTRACKS):
        trial = problem.loss(weights + step * direction, logits + step * direction_logits,
                             prior_variance)
        if float(trial) <= float(loss) + _ARMIJO_SLOPE * step * slope:
            return step
        step *= _BACKTRACK_FACTOR
    return None


# ---------------------------------------------------------------------- L-BFGS


def lbfgs(problem, prior_variance, initial, *, tol, max_iterations, verbose=0):
    """Minimize L(δ) with `tfp.optimizer.lbfgs_minimize`.

    Each objective evaluation costs one JVP and one VJP. TFP stops on the
    largest gradient entry, so it runs to ‖∇L‖_∞ ≤ tol·scale/√P, which implies
    the stated rule ‖∇L‖₂ ≤ tol·scale.

    Args and Returns: as `newton_cg`. `verbose` is accepted and unused, because
    TFP runs the iterations in one loop.
    """
    del verbose
    scale = problem.gradient_scale()

    def value_and_gradient(weights):
        logits = problem.logits(weights)
        return (problem.loss(weights, logits, prior_variance),
                problem.gradient(weights, logits, prior_variance))

    results = tfp.optimizer.lbfgs_minimize(
        value_and_gradient,
        initial_position=tf.convert_to_tensor(initial, tf.float64),
        tolerance=tol * scale / math.sqrt(problem.num_parameters),
        x_tolerance=0.0,
        f_relative_tolerance=0.0,
        max_iterations=max_iterations,
        num_correction_pairs=_LBFGS_CORRECTION_PAIRS,
    )
    weights = results.position
    logits = problem.logits(weights)
    gradient_norm = float(tf.norm(problem.gradient(weights, logits, prior_variance)))
    iterations = int(results.num_iterations)
    trace = {
        "loss": [float(results.objective_value)],
        "gradient_norm": [gradient_norm],
        "objective_evaluations": int(results.num_objective_evaluations),
        "stalled": bool(results.failed),
    }
    _logger.info("L-BFGS: %d iterations, loss=%.10g, |grad|=%.3g.", iterations,
                 float(results.objective_value), gradient_norm)
    record = _gradient_record("lbfgs", iterations, gradient_norm, scale, tol, max_iterations)
    return weights, logits, record, trace


# ---------------------------------------------------------------------- Adam


def adam(problem, prior_variance, initial, *, tol, epochs, batch_size, learning_rate, seed,
         verbose=0, callbacks=None):
    """Minimize L(δ) by minibatch Adam on a `tf.Variable` δ (the model stays untouched).

    A step on the minibatch B uses the unbiased gradient estimate
    −(N/|B|) J_Bᵀ g(f_B) + δ/s²: one JVP and one VJP over B. The gradient rule is
    checked once, on all data, after the last epoch.

    Args:
        problem: the `_glm.GLMProblem`.
        prior_variance: float s².
        initial: float64 Tensor [P], the starting point.
        tol: float, gradient tolerance checked after training.
        epochs: int, passes over the data.
        batch_size: int, minibatch size.
        learning_rate: float or a `keras.optimizers.schedules.LearningRateSchedule`.
        seed: int seed of the minibatch order.
        verbose: 0 or 1 (a Keras progress bar over the epochs).
        callbacks: list of `keras.callbacks.Callback` called at each epoch (see
            `run_epochs`), or None.

    Returns:
        As `newton_cg`; the trace contains the mean minibatch loss of each epoch
        run (fewer than `epochs` when a callback stopped the training).
    """
    trainer = cached_trainer(problem.state, ("adam_map",), learning_rate,
                             lambda schedule: _MapTrainer(problem.state, schedule))
    trainer.reset(learning_rate, epochs * steps_per_epoch(problem.num_examples, batch_size))
    trainer.weights.assign(initial)
    prior_variance_tensor = tf.constant(prior_variance, tf.float64)

    epoch_losses = run_epochs(
        lambda batch: trainer.step(batch, prior_variance_tensor),
        lambda epoch: problem.state.minibatches(batch_size, seed, epoch),
        epochs, verbose, metric="loss", callbacks=callbacks, model=problem.model,
    )
    weights = tf.convert_to_tensor(trainer.weights)
    logits = problem.logits(weights)
    gradient_norm = float(tf.norm(problem.gradient(weights, logits, prior_variance)))
    trace = {"loss": epoch_losses, "gradient_norm": [gradient_norm], "stalled": False}
    record = _gradient_record(
        "adam", len(epoch_losses), gradient_norm, problem.gradient_scale(), tol, epochs
    )
    return weights, logits, record, trace


class AdamTrainer:
    """Keras Adam on fixed variables with a compiled step, reusable across fits.

    Subclasses set `variables` and `_step`; `step` is the compiled `_step`.
    """

    def __init__(self, variables, schedule):
        self.variables = variables
        self.schedule = schedule
        self.optimizer = keras.optimizers.Adam(learning_rate=schedule)
        self.optimizer.build(variables)
        self.step = tf.function(self._step, reduce_retracing=True, autograph=False)

    def reset(self, learning_rate, total_steps):
        """Zero Adam's moments and step count and set the cosine schedule, if any."""
        for variable in self.optimizer.variables:
            variable.assign(tf.zeros_like(variable))
        if isinstance(self.schedule, CosineDecay):
            self.schedule.set(learning_rate, total_steps)

    def _step(self, *args):
        raise NotImplementedError


class _MapTrainer(AdamTrainer):
    """Adam on δ [P] for the MAP, with minibatch gradient −(N/|B|) J_Bᵀ g + δ/s²."""

    def __init__(self, state, schedule):
        self.state = state
        self.weights = tf.Variable(tf.zeros([state.functional.num_parameters], tf.float64),
                                   trainable=False, name="map_weights")
        super().__init__([self.weights], schedule)

    def _step(self, batch, prior_variance):
        state = self.state
        x, labels, prior_mean = batch
        logits = prior_mean + _glm.minibatch_jvp(state.functional, x, self.weights)  # [n, O]
        ratio = state.num_examples() / tf.cast(tf.shape(labels)[0], tf.float64)
        score = state.likelihood.grad_log_prob(labels, logits)  # [n, O]
        gradient = (-ratio * _glm.minibatch_vjp(state.functional, x, score)
                    + self.weights / prior_variance)
        self.optimizer.apply_gradients([(gradient, self.weights)])
        penalty = tf.reduce_sum(tf.square(self.weights)) / (2.0 * prior_variance)
        return -ratio * tf.reduce_sum(state.likelihood.log_prob(labels, logits)) + penalty


class CosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay from η₀ to 1% of η₀ over T steps, with η₀ and T in variables.

    η(t) = η₀ · (0.01 + 0.99 · ½ (1 + cos(π · min(t, T) / T))). Keeping η₀ and
    T in variables lets one compiled training step serve fits with other
    learning rates and lengths.
    """

    def __init__(self):
        self.initial_learning_rate = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.decay_steps = tf.Variable(1.0, dtype=tf.float64, trainable=False)

    def set(self, initial_learning_rate, decay_steps):
        """Set η₀ and T for the next fit."""
        self.initial_learning_rate.assign(initial_learning_rate)
        self.decay_steps.assign(max(float(decay_steps), 1.0))

    def __call__(self, step):
        fraction = tf.minimum(tf.cast(step, tf.float64) / self.decay_steps, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * fraction))
        alpha = FINAL_LEARNING_RATE_FRACTION
        return self.initial_learning_rate * (alpha + (1.0 - alpha) * cosine)

    def get_config(self):
        return {
            "initial_learning_rate": float(self.initial_learning_rate.numpy()),
            "decay_steps": float(self.decay_steps.numpy()),
        }


def cached_trainer(state, key, learning_rate, build):
    """Return the trainer kept in `state.steps` for `key` and the schedule kind, built once.

    A float `learning_rate` shares one trainer with a `CosineDecay` schedule; a
    user schedule gets a trainer of its own.
    """
    user_schedule = isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule)
    full_key = key + (("schedule", id(learning_rate)) if user_schedule else ("cosine",))
    if full_key not in state.steps:
        state.steps[full_key] = build(learning_rate if user_schedule else CosineDecay())
    return state.steps[full_key]


def steps_per_epoch(num_examples, batch_size):
    """Return the number of minibatches per epoch."""
    return math.ceil(num_examples / min(batch_size, num_examples))


def run_epochs(train_step, minibatches, epochs, verbose, metric, callbacks=None, model=None):
    """Run `train_step(batch)` over `minibatches(epoch)` each epoch; return the epoch means.

    Progress goes to the logger at INFO level, and to a Keras progress bar at
    verbose=1. Keras `callbacks` get `on_train_begin`, `on_epoch_begin`,
    `on_epoch_end` with logs {metric: epoch mean} (plus "loss" = −ELBO when the
    metric is "elbo", so that e.g. `EarlyStopping(monitor="loss")` works) and
    `on_train_end`. A callback that sets `model.stop_training` ends the training
    after that epoch.
    """
    callback_list = keras.callbacks.CallbackList(callbacks or [], model=model)
    if model is not None:
        model.stop_training = False
    # The bar shows each epoch's mean as it is, not averaged with earlier epochs.
    progress = keras.utils.Progbar(epochs, verbose=verbose, unit_name="epoch",
                                   stateful_metrics=[metric])
    epoch_means, logs = [], {}
    callback_list.on_train_begin()
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        values = [float(train_step(batch)) for batch in minibatches(epoch)]
        epoch_means.append(float(np.mean(values)))
        progress.update(epoch + 1, [(metric, epoch_means[-1])])
        _logger.info("Epoch %d/%d: %s=%.6g.", epoch + 1, epochs, metric, epoch_means[-1])
        logs = {metric: epoch_means[-1]}
        if metric == "elbo":
            logs["loss"] = -epoch_means[-1]
        callback_list.on_epoch_end(epoch, logs)
        if model is not None and model.stop_training:
            _logger.info("Training stopped by a callback after epoch %d.", epoch + 1)
            break
    callback_list.on_train_end(logs)
    return epoch_means


# ---------------------------------------------------------------------- records


def _gradient_record(solver, iterations, gradient_norm, scale, tol, max_iterations):
    """Return a ConvergenceRecord with relative_residual = ‖∇L‖ / max(1, ‖∇L(0)‖)."""
    relative = gradient_norm / scale
    return solvers.ConvergenceRecord(
        solver=solver,
        iterations=np.array([iterations], np.int64),
        relative_residual=np.array([relative], np.float64),
        tolerance=float(tol),
        max_iterations=int(max_iterations),
        converged=np.array([relative <= tol]),
    )


def report_convergence(record, trace, on_nonconvergence, stacklevel):
    """Warn or raise, as `on_nonconvergence` requests, when the MAP rule was not met.

    `stacklevel` counts from the caller of this function, as in `warnings.warn`.
    """
    if record.converged_all or on_nonconvergence == "ignore":
        return
    message = (
        f"The MAP optimizer {record.solver!r} stopped after {int(record.iterations[0])} "
        f"iteration(s) with ‖∇L‖/max(1, ‖∇L(0)‖) = {float(record.relative_residual[0]):.3g}, "
        f"above tol={record.tolerance:g}."
    )
    if trace.get("stalled"):
        message += (
            " The line search found no decrease, so the tolerance is below what the "
            "model's dtype resolves. Loosen `tol` or use a float64 model."
        )
    else:
        message += " Increase `max_iterations` (or `epochs` for 'adam') or loosen `tol`."
    _logger.warning("%s", message)
    if on_nonconvergence == "raise":
        raise solvers.ConvergenceError(message)
    warnings.warn(message, solvers.ConvergenceWarning, stacklevel=stacklevel + 1)
