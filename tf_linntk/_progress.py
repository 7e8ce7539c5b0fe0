"""Keras progress bars for the compiled solver loops, run in chunks of iterations between updates."""

import keras
import numpy as np
import tensorflow as tf

# Largest number of iterations between progress-bar updates. Chunks start at
# one iteration and double up to this size. The schedule does not depend on
# timing, so the workers of a multi-worker strategy run the same sequence of
# compiled calls (and of collectives).
MAX_CHUNK_ITERATIONS = 32


def check_verbose(verbose):
    """Return `verbose` as an int if it is 0 or 1, else raise ValueError (for bools too)."""
    valid = not isinstance(verbose, bool) and isinstance(verbose, (int, np.integer)) and verbose in (0, 1)
    if not valid:
        raise ValueError(
            "`verbose` must be 0 (silent) or 1 (progress bar); received "
            f"{verbose!r} of type {type(verbose).__name__}."
        )
    return int(verbose)


def shows_progress(verbose):
    """Return True when a solver should run in chunks with a progress bar.

    That is verbose=1 in eager mode. Under an outer `tf.function` the solver
    must stay one compiled loop without Python callbacks, so it shows no bar.
    """
    return verbose == 1 and tf.executing_eagerly()


def run_in_chunks(advance, state, max_iterations, status, logger, solver):
    """Run a compiled loop chunk by chunk and update a Keras progress bar after each chunk.

    Each chunk is one call of the compiled `advance`, so the loop graph contains no
    Python callback. The state passes unchanged from one chunk to the next,
    so the result equals that of one call with limit `max_iterations`.

    Args:
        advance: Function `(state, limit) -> state` that runs iterations until
            `state.step` reaches the int32 Tensor `limit` or the loop's own
            stopping rule holds.
        state: Loop state, a NamedTuple with an int32 scalar `step`, the number
            of iterations run so far.
        max_iterations: int, the last limit and the target of the bar.
        status: Function `state -> (finished, values)`. `finished` is True when
            the loop's own stopping rule holds. `values` lists the
            (name, float) pairs shown on the bar, always with the same names.
        logger: The solver's `logging.Logger`, for one DEBUG line per chunk.
        solver: Solver name at the start of each log line.

    Returns:
        The final state.
    """
    finished, values = status(state)
    names = [name for name, _ in values]
    progress = keras.utils.Progbar(max_iterations, unit_name="iteration", stateful_metrics=names)
    step = int(state.step)
    done = finished or step >= max_iterations
    if done:
        progress.update(step, values, finalize=True)

    chunk = 1
    while not done:
        limit = min(step + chunk, max_iterations)
        state = advance(state, tf.constant(limit, tf.int32))
        chunk = min(2 * chunk, MAX_CHUNK_ITERATIONS)
        step = int(state.step)
        finished, values = status(state)
        # A chunk that ends before its limit has met the loop's own stopping rule.
        done = finished or step < limit or step >= max_iterations
        progress.update(step, values, finalize=done)
        logger.debug(
            "%s: iteration %d of %d, %s", solver, step, max_iterations,
            ", ".join(f"{name}={value:.3g}" for name, value in values),
        )
    return state
