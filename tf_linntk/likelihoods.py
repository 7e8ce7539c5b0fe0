"""Likelihoods p(y | f) in output space: log-probabilities, KL divergences and Fisher products."""

import abc
import math

import keras
import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import _labels

__all__ = [
    "LIKELIHOOD_NAMES",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "get_likelihood",
]

LIKELIHOOD_NAMES = ("gaussian", "categorical", "bernoulli")


class Likelihood(abc.ABC):
    """Base class of the likelihoods p(y | f) of network outputs f [N, O].

    f contains one row of O outputs (regression) or logits (classification) per
    example. The N examples are independent, so every method returns one value or
    one [O] or [O, O] block per example.

    All Hessians are the Fisher information of p(y | f) in output space,
    H(f) = E_y[∇_f log p(y|f) ∇_f log p(y|f)ᵀ]. For these canonical-link
    likelihoods it equals the Hessian of −log p(y | f) w.r.t. f, which does not
    depend on y, and the Hessian of KL(p(y|f_p) ‖ p(y|f_q)) w.r.t. f_q at f_q = f_p.

    Every method computes in the float dtype of its inputs (float64 end to end
    for float64 inputs, float32 in gives float32 out). Inputs of two float dtypes
    are both cast to the wider one. Methods only check static shapes, so they run
    inside `tf.function`. Labels are not range-checked here: call
    `validate_labels` once at the public boundary.
    """

    name = None

    @property
    def num_outputs(self):
        """The number of outputs O this likelihood requires, or None for any O."""
        return None

    def log_prob(self, y, f):
        """Compute the log-likelihood log p(y_n | f_n) of each example.

        Args:
            y: Labels. Gaussian: float Tensor [N, O]. Categorical: integer class
                ids [N] or [N, 1], or one-hot rows [N, O] (converted to ids by
                argmax). Bernoulli: 0/1 labels [N] or [N, 1], integer or float.
            f: float Tensor [N, O], outputs or logits.

        Returns:
            float Tensor [N], the log-likelihood of each example.

        Raises:
            TypeError: If `f` (or a Gaussian `y`) is not a float tensor.
            ValueError: If the static shapes of `y` and `f` are invalid.
        """
        with tf.name_scope(f"{self.name}_log_prob"):
            f = self._convert_outputs("f", f)
            y, f = self._convert_labels(y, f)
            return self._log_prob(y, f)

    def grad_log_prob(self, y, f):
        """Compute the gradient ∇_f log p(y_n | f_n) of each example.

        Args:
            y: Labels, as in `log_prob`.
            f: float Tensor [N, O], outputs or logits.

        Returns:
            float Tensor [N, O], the gradient of each example's log-likelihood.

        Raises:
            TypeError: If `f` (or a Gaussian `y`) is not a float tensor.
            ValueError: If the static shapes of `y` and `f` are invalid.
        """
        with tf.name_scope(f"{self.name}_grad_log_prob"):
            f = self._convert_outputs("f", f)
            y, f = self._convert_labels(y, f)
            return self._grad_log_prob(y, f)

    def kl(self, f_p, f_q):
        """Compute KL(p(y | f_p) ‖ p(y | f_q)) for each example.

        The classification KLs use `log_softmax` and `softplus`, never an
        exponential of raw logits, so they stay finite at logits of magnitude 500
        (tested in float32 and float64), where exp(f) overflows.

        Args:
            f_p: float Tensor [N, O], outputs or logits of the first argument.
            f_q: float Tensor [N, O], outputs or logits of the second argument.

        Returns:
            float Tensor [N], the KL divergence of each example, >= 0 up to
            rounding.

        Raises:
            TypeError: If `f_p` or `f_q` is not a float tensor.
            ValueError: If the static shapes of `f_p` and `f_q` differ or are invalid.
        """
        with tf.name_scope(f"{self.name}_kl"):
            f_p = self._convert_outputs("f_p", f_p)
            f_q = self._convert_outputs("f_q", f_q, dtype_hint=f_p.dtype)
            if not f_p.shape.is_compatible_with(f_q.shape):
                raise ValueError(
                    f"`f_q` must have the shape of `f_p`, {tuple(f_p.shape)}; "
                    f"received f_q.shape={tuple(f_q.shape)}."
                )
            f_p, f_q = _match_float_dtypes(f_p, f_q)
            return self._kl(f_p, f_q)

    def hessian_matmul(self, f, v):
        """Multiply each example's vectors by its output-space Hessian H(f_n).

        The product broadcasts over leading dimensions of `v`, so R right-hand
        sides go in one call as v [R, N, O]. Nothing of size [N, O, O] is formed.

        Args:
            f: float Tensor [N, O], outputs or logits where H is evaluated.
            v: float Tensor [..., N, O], vectors in output space.

        Returns:
            float Tensor [..., N, O], H(f_n) v[..., n, :] for each example n.

        Raises:
            TypeError: If `f` or `v` is not a float tensor.
            ValueError: If the static shape of `v` does not end in the shape of `f`.
        """
        with tf.name_scope(f"{self.name}_hessian_matmul"):
            f = self._convert_outputs("f", f)
            v = _convert_float("v", v, dtype_hint=f.dtype)
            if v.shape.rank is not None and (
                v.shape.rank < 2 or not v.shape[-2:].is_compatible_with(f.shape)
            ):
                raise ValueError(
                    f"`v` must be [..., N, O] ending in the shape of `f`, "
                    f"{tuple(f.shape)}; received v.shape={tuple(v.shape)}."
                )
            f, v = _match_float_dtypes(f, v)
            return self._hessian_matmul(f, v)

    def hessian_diag(self, f):
        """Compute the diagonal of each example's output-space Hessian H(f_n).

        Args:
            f: float Tensor [N, O], outputs or logits.

        Returns:
            float Tensor [N, O], the diagonal of H(f_n) in row n.

        Raises:
            TypeError: If `f` is not a float tensor.
            ValueError: If the static shape of `f` is invalid.
        """
        with tf.name_scope(f"{self.name}_hessian_diag"):
            return self._hessian_diag(self._convert_outputs("f", f))

    def hessian_dense(self, f):
        """Form each example's output-space Hessian H(f_n) as a dense [O, O] block.

        Memory is N·O² numbers, meant for references and small O.

        Args:
            f: float Tensor [N, O], outputs or logits.

        Returns:
            float Tensor [N, O, O], the symmetric positive semi-definite H(f_n).

        Raises:
            TypeError: If `f` is not a float tensor.
            ValueError: If the static shape of `f` is invalid.
        """
        with tf.name_scope(f"{self.name}_hessian_dense"):
            return self._hessian_dense(self._convert_outputs("f", f))

    def hessian_sqrt(self, f):
        """Form a square root S_n of each example's Hessian, with H(f_n) = S_n S_nᵀ.

        S_n is dense [O, O] and in general not symmetric (see the subclasses).

        Args:
            f: float Tensor [N, O], outputs or logits.

        Returns:
            float Tensor [N, O, O], a factor S_n per example.

        Raises:
            TypeError: If `f` is not a float tensor.
            ValueError: If the static shape of `f` is invalid.
        """
        with tf.name_scope(f"{self.name}_hessian_sqrt"):
            return self._hessian_sqrt(self._convert_outputs("f", f))

    def validate_labels(self, y, num_outputs, num_examples=None, *, arg_name="y"):
        """Check labels against this likelihood and return them in canonical form.

        Runs NumPy code on the values, so call it eagerly at the public boundary,
        not inside `tf.function`.

        Args:
            y: Labels as an array or eager tensor, in a layout `log_prob` accepts.
            num_outputs: int, the model's number of outputs O per example.
            num_examples: int or None, the number of examples N that `y` must
                have. None skips this check.
            arg_name: str, the argument name that error messages use for `y`.

        Returns:
            np.ndarray. Gaussian: float [N, O] in the dtype of `y`. Categorical:
            int64 class ids [N]. Bernoulli: int64 labels [N] in {0, 1}.

        Raises:
            TypeError: If `y` has a wrong dtype (see the subclasses).
            ValueError: If `y` has a wrong shape or invalid values, or if
                `num_outputs` does not fit this likelihood.
        """
        num_outputs = _checks.check_positive_int("num_outputs", num_outputs)
        num_examples = _checks.check_positive_int(
            "num_examples", num_examples, allow_none=True
        )
        labels = _labels.labels_to_numpy(arg_name, y)
        labels = self._validate_labels(arg_name, labels, num_outputs)
        if num_examples is not None and labels.shape[0] != num_examples:
            raise ValueError(
                f"`{arg_name}` must contain num_examples={num_examples} examples; "
                f"received {arg_name}.shape={np.shape(y)}."
            )
        return labels

    def get_config(self):
        """Return the constructor arguments as a dict of Python values."""
        return {}

    @classmethod
    def from_config(cls, config):
        """Create an instance from the output of `get_config`."""
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"

    def _convert_outputs(self, name, f, dtype_hint=tf.float32):
        """Convert `f` to a float tensor and check its static shape [N, O]."""
        f = _convert_float(name, f, dtype_hint)
        if f.shape.rank is not None and f.shape.rank != 2:
            raise ValueError(
                f"`{name}` must be [N, O] (outputs or logits per example); "
                f"received {name}.shape={tuple(f.shape)}."
            )
        num_outputs = f.shape[-1] if f.shape.rank == 2 else None
        self._check_num_outputs(name, num_outputs)
        return f

    def _check_num_outputs(self, name, num_outputs):  # noqa: B027 (optional hook)
        """Raise ValueError if a known output count does not fit this likelihood."""
        return None

    @abc.abstractmethod
    def _convert_labels(self, y, f):
        """Return labels as tensors for the private methods, and `f` in their dtype."""

    @abc.abstractmethod
    def _validate_labels(self, arg_name, labels, num_outputs):
        """Check NumPy labels (rank >= 1, not empty) and return the canonical form."""

    @abc.abstractmethod
    def _log_prob(self, y, f):
        pass

    @abc.abstractmethod
    def _grad_log_prob(self, y, f):
        pass

    @abc.abstractmethod
    def _kl(self, f_p, f_q):
        pass

    @abc.abstractmethod
    def _hessian_matmul(self, f, v):
        pass

    @abc.abstractmethod
    def _hessian_diag(self, f):
        pass

    @abc.abstractmethod
    def _hessian_dense(self, f):
        pass

    @abc.abstractmethod
    def _hessian_sqrt(self, f):
        pass


@keras.saving.register_keras_serializable(package="tf_linntk")
class Gaussian(Likelihood):
    """Gaussian likelihood y_n ~ N(f_n, diag(σ²)) with one noise variance per output.

    log p(y_n | f_n) = −½ Σ_o [log(2π σ²_o) + (y_no − f_no)² / σ²_o], where σ²_o
    is `noise_variance`, either one value shared by all O outputs or one per
    output. Then KL(f_p ‖ f_q) = Σ_o (f_p,o − f_q,o)² / (2σ²_o),
    H = diag(1/σ²) and S = diag(1/σ).

    Args:
        noise_variance: float > 0, or a vector [O] of per-output variances > 0.

    Raises:
        TypeError: If `noise_variance` is not a real number or vector of them.
        ValueError: If `noise_variance` has rank > 1, is empty, or has a value
            that is not finite and > 0.

    Example:
        >>> likelihood = Gaussian(noise_variance=[0.1, 0.5])
        >>> likelihood.log_prob(tf.zeros([4, 2]), tf.ones([4, 2])).shape
        TensorShape([4])
    """

    name = "gaussian"

    def __init__(self, noise_variance=1.0):
        self._noise_variance = _labels.check_noise_variance(noise_variance)

    @property
    def noise_variance(self):
        """The noise variance σ²: a float, or a float64 NumPy vector [O]."""
        if self._noise_variance.ndim == 0:
            return float(self._noise_variance)
        return self._noise_variance.copy()

    @property
    def num_outputs(self):
        """The number of outputs O fixed by a vector `noise_variance`, else None."""
        if self._noise_variance.ndim == 0:
            return None
        return self._noise_variance.shape[0]

    def get_config(self):
        """Return {"noise_variance": float or list of floats}."""
        return {"noise_variance": self._noise_variance.tolist()}

    def _variance(self, dtype):
        # NOTE: σ² is stored as a NumPy constant, so no gradient flows to it. Fitting
        # σ² by maximising the marginal likelihood would need a tf.Variable here.
        return tf.constant(self._noise_variance, dtype=dtype)  # [] or [O]

    def _check_num_outputs(self, name, num_outputs):
        expected = self.num_outputs
        if expected is not None and num_outputs is not None and num_outputs != expected:
            raise ValueError(
                f"`noise_variance` has {expected} per-output values but `{name}` has "
                f"O={num_outputs} outputs per example. Pass one variance per output "
                f"or a scalar."
            )

    def _convert_labels(self, y, f):
        y = _convert_float("y", y, dtype_hint=f.dtype)
        if not y.shape.is_compatible_with(f.shape):
            raise ValueError(
                f"`y` must have the shape of `f`, {tuple(f.shape)}; "
                f"received y.shape={tuple(y.shape)}."
            )
        return _match_float_dtypes(y, f)

    def _validate_labels(self, arg_name, labels, num_outputs):
        expected = self.num_outputs
        if expected is not None and num_outputs != expected:
            raise ValueError(
                f"`noise_variance` has {expected} per-output values but the model has "
                f"num_outputs={num_outputs}. Pass one variance per output or a scalar."
            )
        return _labels.check_float_targets(arg_name, labels, num_outputs)

    def _log_prob(self, y, f):
        variance = self._variance(f.dtype)
        log_density = -0.5 * (
            tf.math.log(2.0 * math.pi * variance) + tf.square(y - f) / variance
        )  # [N, O]
        return tf.reduce_sum(log_density, axis=-1)

    def _grad_log_prob(self, y, f):
        return (y - f) / self._variance(f.dtype)

    def _kl(self, f_p, f_q):
        variance = self._variance(f_p.dtype)
        return tf.reduce_sum(tf.square(f_p - f_q) / (2.0 * variance), axis=-1)

    def _hessian_matmul(self, f, v):
        return v / self._variance(f.dtype)  # [..., N, O]

    def _hessian_diag(self, f):
        return tf.ones_like(f) / self._variance(f.dtype)

    def _hessian_dense(self, f):
        return tf.linalg.diag(self._hessian_diag(f))

    def _hessian_sqrt(self, f):
        return tf.linalg.diag(tf.sqrt(self._hessian_diag(f)))


@keras.saving.register_keras_serializable(package="tf_linntk")
class Categorical(Likelihood):
    """Categorical likelihood over O ≥ 2 classes with logits f, p = softmax(f).

    log p(y_n | f_n) = log_softmax(f_n)[y_n],
    KL(f_p ‖ f_q) = Σ_o p_o (log_softmax(f_p)_o − log_softmax(f_q)_o),
    H = diag(p) − p pᵀ, so H v = p ⊙ v − p (pᵀ v), and
    S = diag(√p) − p √pᵀ, for which S Sᵀ = H because Σ_o p_o = 1.

    Example:
        >>> Categorical().log_prob([0, 2], tf.zeros([2, 3])).shape
        TensorShape([2])
    """

    name = "categorical"

    def _convert_labels(self, y, f):
        y = tf.convert_to_tensor(y)
        if y.shape.rank == 2 and y.shape[-1] != 1:
            # One-hot rows [N, O] -> class ids [N].
            y = tf.argmax(y, axis=-1)
        elif y.shape.rank == 2:
            y = tf.squeeze(y, axis=-1)
        if y.dtype.is_floating:
            y = tf.round(y)
        return tf.cast(y, tf.int64), f  # [N]

    def _validate_labels(self, arg_name, labels, num_outputs):
        if num_outputs < 2:
            raise ValueError(
                f"The categorical likelihood needs `num_outputs` >= 2 logits per "
                f"example; the model has num_outputs={num_outputs}. For binary labels "
                f"with a single logit use the 'bernoulli' likelihood."
            )
        return _labels.check_class_labels(arg_name, labels, num_outputs)

    def _log_prob(self, y, f):
        log_probs = tf.nn.log_softmax(f, axis=-1)  # [N, O]
        # NOTE: an id outside [0, O) raises InvalidArgumentError on CPU, but on GPU
        # tf.gather returns 0 for it (as its docs state), so bad labels pass silently.
        return tf.gather(log_probs, y, axis=1, batch_dims=1)  # [N]

    def _grad_log_prob(self, y, f):
        one_hot = tf.one_hot(y, depth=tf.shape(f)[-1], dtype=f.dtype)  # [N, O]
        return one_hot - tf.nn.softmax(f, axis=-1)

    def _kl(self, f_p, f_q):
        log_p = tf.nn.log_softmax(f_p, axis=-1)  # [N, O]
        log_q = tf.nn.log_softmax(f_q, axis=-1)  # [N, O]
        return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)

    def _hessian_matmul(self, f, v):
        p = tf.nn.softmax(f, axis=-1)  # [N, O]
        p_times_v = p * v  # [..., N, O]
        return p_times_v - p * tf.reduce_sum(p_times_v, axis=-1, keepdims=True)

    def _hessian_diag(self, f):
        p = tf.nn.softmax(f, axis=-1)
        return p * (1.0 - p)

    def _hessian_dense(self, f):
        p = tf.nn.softmax(f, axis=-1)
        return tf.linalg.diag(p) - p[:, :, None] * p[:, None, :]  # [N, O, O]

    def _hessian_sqrt(self, f):
        p = tf.nn.softmax(f, axis=-1)
        sqrt_p = tf.sqrt(p)
        return tf.linalg.diag(sqrt_p) - p[:, :, None] * sqrt_p[:, None, :]  # [N, O, O]


@keras.saving.register_keras_serializable(package="tf_linntk")
class Bernoulli(Likelihood):
    """Bernoulli likelihood with a single logit per example (O = 1), p = sigmoid(f).

    With a = f_p and b = f_q, and softplus(x) = log(1 + eˣ):
    log p(y | a) = y a − softplus(a),
    KL(a ‖ b) = softplus(b) − softplus(a) − sigmoid(a) (b − a),
    H = p (1 − p), computed as sigmoid(f) sigmoid(−f), and S = √H.

    Example:
        >>> Bernoulli().log_prob([0, 1, 1], tf.zeros([3, 1])).shape
        TensorShape([3])
    """

    name = "bernoulli"

    @property
    def num_outputs(self):
        """The number of outputs O = 1 (one logit per example)."""
        return 1

    def _check_num_outputs(self, name, num_outputs):
        if num_outputs is not None and num_outputs != 1:
            raise ValueError(
                f"`{name}` must be [N, 1] (one logit per example) for the Bernoulli "
                f"likelihood; received O={num_outputs} outputs. For {num_outputs} "
                f"classes use the 'categorical' likelihood."
            )

    def _convert_labels(self, y, f):
        y = tf.convert_to_tensor(y)
        if y.shape.rank == 2:
            y = tf.squeeze(y, axis=-1)
        return tf.cast(y, f.dtype), f  # [N]

    def _validate_labels(self, arg_name, labels, num_outputs):
        if num_outputs != 1:
            raise ValueError(
                f"The Bernoulli likelihood needs one logit per example, but the model "
                f"has num_outputs={num_outputs}. For {num_outputs} classes use the "
                f"'categorical' likelihood."
            )
        return _labels.check_binary_labels(arg_name, labels)

    def _log_prob(self, y, f):
        logits = f[:, 0]  # [N]
        return y * logits - tf.math.softplus(logits)

    def _grad_log_prob(self, y, f):
        return y[:, None] - tf.sigmoid(f)  # [N, 1]

    def _kl(self, f_p, f_q):
        a = f_p[:, 0]  # [N]
        b = f_q[:, 0]  # [N]
        return tf.math.softplus(b) - tf.math.softplus(a) - tf.sigmoid(a) * (b - a)

    def _hessian_matmul(self, f, v):
        return self._hessian_diag(f) * v  # [..., N, 1]

    def _hessian_diag(self, f):
        return tf.sigmoid(f) * tf.sigmoid(-f)  # [N, 1]

    def _hessian_dense(self, f):
        return self._hessian_diag(f)[:, :, None]  # [N, 1, 1]

    def _hessian_sqrt(self, f):
        return tf.sqrt(self._hessian_dense(f))


def get_likelihood(likelihood):
    """Return a likelihood instance from a name or an instance.

    Args:
        likelihood: One of the names in `LIKELIHOOD_NAMES` ("gaussian",
            "categorical", "bernoulli"), which gives that class with default
            parameters, or a `Likelihood` instance, which is returned unchanged.

    Returns:
        A `Likelihood` instance.

    Raises:
        TypeError: If `likelihood` is neither a string nor a `Likelihood` instance.
        ValueError: If `likelihood` is an unknown name.

    Example:
        >>> get_likelihood("gaussian")
        Gaussian(noise_variance=1.0)
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, type) and issubclass(likelihood, Likelihood):
        raise TypeError(
            f"`likelihood` must be a name or a `Likelihood` instance; received the "
            f"class {likelihood.__name__}. Pass an instance, e.g. {likelihood.__name__}()."
        )
    if not isinstance(likelihood, str):
        raise TypeError(
            f"`likelihood` must be one of {LIKELIHOOD_NAMES} or a `Likelihood` "
            f"instance; received {likelihood!r} of type {type(likelihood).__name__}."
        )
    _checks.check_option("likelihood", likelihood, LIKELIHOOD_NAMES)
    classes = {"gaussian": Gaussian, "categorical": Categorical, "bernoulli": Bernoulli}
    return classes[likelihood]()


def _convert_float(name, value, dtype_hint=tf.float32):
    """Convert `value` to a tensor and raise TypeError unless its dtype is float.

    Tensors and NumPy arrays keep their dtype. Only Python numbers and lists take
    `dtype_hint`, because `tf.convert_to_tensor` would also apply the hint to a
    NumPy array and silently cast float64 to float32 or integers to float (seen
    with TensorFlow 2.21).
    """
    if hasattr(value, "dtype"):
        tensor = tf.convert_to_tensor(value)
    else:
        tensor = tf.convert_to_tensor(value, dtype_hint=dtype_hint)
    if not tensor.dtype.is_floating:
        raise TypeError(
            f"`{name}` must be a float tensor; received dtype {tensor.dtype.name}. "
            f"Cast it with tf.cast({name}, tf.float32) or to float64."
        )
    return tensor


def _match_float_dtypes(a, b):
    """Cast two float tensors to the wider of their dtypes (float32 for a 16-bit mix)."""
    if a.dtype == b.dtype:
        return a, b
    if a.dtype.size == b.dtype.size:
        dtype = tf.float32
    else:
        dtype = a.dtype if a.dtype.size > b.dtype.size else b.dtype
    return tf.cast(a, dtype), tf.cast(b, dtype)
