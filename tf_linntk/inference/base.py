"""Base class of posteriors over the linearized weights, kept in parameter space."""

import abc
import dataclasses

import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import solvers

__all__ = ["Posterior", "posterior_from_state", "register_posterior", "stateless_seed"]

# Posterior classes by name, so a saved model can rebuild its posterior.
_POSTERIOR_CLASSES = {}


def register_posterior(cls):
    """Register a Posterior subclass so `posterior_from_state` can rebuild it."""
    _POSTERIOR_CLASSES[cls.__name__] = cls
    return cls


def posterior_from_state(config, arrays):
    """Rebuild a posterior from `Posterior.get_state()` output.

    Args:
        config: the JSON-compatible dict, with the class name under "class_name".
        arrays: dict from array name to NumPy array.

    Returns:
        The posterior.

    Raises:
        ValueError: if the class name is not a registered posterior.
    """
    name = config.get("class_name")
    if name not in _POSTERIOR_CLASSES:
        raise ValueError(
            f"Cannot restore a posterior of class {name!r}; known classes: "
            f"{sorted(_POSTERIOR_CLASSES)}. Was the file saved by a newer tf_linntk?"
        )
    return _POSTERIOR_CLASSES[name].from_state(config, arrays)


def convergence_to_config(convergence):
    """Convert a dict of convergence records (dataclasses or dicts) to JSON-compatible dicts."""
    converted = {}
    for step, record in convergence.items():
        if isinstance(record, solvers.ConvergenceRecord):
            fields = {k: _to_json(v) for k, v in dataclasses.asdict(record).items()}
            converted[step] = {"record_type": "ConvergenceRecord", **fields}
        else:
            converted[step] = _to_json(record)
    return converted


def convergence_from_config(config):
    """Invert `convergence_to_config`."""
    restored = {}
    for step, record in config.items():
        if isinstance(record, dict) and record.get("record_type") == "ConvergenceRecord":
            fields = {k: v for k, v in record.items() if k != "record_type"}
            for key, dtype in (("iterations", np.int64), ("relative_residual", np.float64),
                               ("converged", bool)):
                fields[key] = np.asarray(fields[key], dtype)
            restored[step] = solvers.ConvergenceRecord(**fields)
        else:
            restored[step] = record
    return restored


def _to_json(value):
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, (tf.Tensor, tf.Variable)):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class Posterior(abc.ABC):
    """Gaussian (or Gaussian-approximated) posterior over δ = θ' − θ₀.

    The posterior is stored in parameter space, so a saved model predicts without
    its training data: the mean `weights` w [P] and the covariance Σ [P, P] as a
    `tf.linalg.LinearOperator` (usually s² I minus a low-rank term).

    Attributes:
        likelihood: the `tf_linntk.likelihoods.Likelihood` the posterior was fit with.
        weights: float64 Tensor [P], the posterior mean of δ.
        covariance: `tf.linalg.LinearOperator` [P, P], the posterior covariance of δ.
        prior_variance: float s², the prior variance of each weight.
        convergence: dict from step name ("solve", "lanczos", "map", ...) to the
            `ConvergenceRecord` of that step.
    """

    def __init__(self, likelihood, weights, covariance, prior_variance, convergence):
        self.likelihood = likelihood
        self.weights = weights
        self.covariance = covariance
        self.prior_variance = prior_variance
        self.convergence = dict(convergence)

    def sample(self, num_samples, seed=None):
        """Draw δ ~ N(w, Σ).

        Args:
            num_samples: positive int S.
            seed: int or None; equal seeds give equal samples.

        Returns:
            float64 Tensor [S, P].
        """
        num_samples = _checks.check_positive_int("num_samples", num_samples)
        seed = stateless_seed(seed)
        return self._sample(num_samples, seed)

    @abc.abstractmethod
    def _sample(self, num_samples, seed):
        """Return [S, P] samples with a stateless seed pair."""

    def get_state(self):
        """Return (config, arrays): a JSON-compatible dict and a dict of NumPy arrays.

        `config` contains "class_name" and every scalar setting, and `arrays`
        contains the tensors (w, covariance root, ...). `posterior_from_state` inverts it.
        Subclasses that can be saved override this and `from_state`.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.get_state: this posterior cannot be saved."
        )

    @classmethod
    def from_state(cls, config, arrays):
        """Rebuild the posterior from `get_state()` output."""
        raise NotImplementedError(f"{cls.__name__}.from_state: this posterior cannot be loaded.")

    @abc.abstractmethod
    def predict_mean(self, lin, x):
        """Return the predictive mean for converted inputs x (model output shape)."""

    @abc.abstractmethod
    def predictive_distribution(self, lin, x, **kwargs):
        """Return a TFP distribution over the outputs at converted inputs x."""


def stateless_seed(seed):
    """Turn an int or None into a stateless seed pair [2]."""
    seed = _checks.check_seed("seed", seed)
    if seed is None:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    return tf.constant([seed, 0], dtype=tf.int32)
