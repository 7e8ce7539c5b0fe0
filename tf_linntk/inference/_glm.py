"""The MAP problem of a Bayesian GLM on the Jacobian features of a linearized network.

Logits f(δ) = m(x) + J(x) δ [N, O], prior δ ~ N(0, s² I_P), and a categorical or
Bernoulli likelihood. The negative log posterior (up to a constant)

    L(δ) = −Σᵢ log p(yᵢ | fᵢ(δ)) + ‖δ‖² / (2s²)

is convex with gradient ∇L = −Jᵀ g(f) + δ/s², g = ∇_f log p(y | f), and Hessian
G(f) + I/s² with the GGN G(f) = Σᵢ Jᵢᵀ H(fᵢ) Jᵢ, which is the exact Hessian
because f is linear in δ. J is never formed: a gradient costs one VJP, a GGN
product one JVP and one VJP. All returned vectors are float64; products run in
the model's dtype.
"""

import weakref

import tensorflow as tf

from tf_linntk import _operators
from tf_linntk import _streaming
from tf_linntk import solvers

# Ritz values at or below this fraction of the largest one are rounding noise of a
# rank-deficient GGN and are dropped from the Laplace covariance.
RITZ_RELATIVE_CUTOFF = 1e-12


class GLMProblem:
    """Training data of one classification fit and the products L(δ) needs.

    Args:
        lin: the `LinearizedModel`.
        x: converted inputs with N examples.
        labels: int64 Tensor [N], class ids (categorical) or 0/1 labels (Bernoulli).
        likelihood: a `Categorical` or `Bernoulli` likelihood.
        prior_mean: float64 Tensor [N, O], m(x).
    """

    def __init__(self, lin, x, labels, likelihood, prior_mean):
        self.model = lin
        self.functional = lin.functional
        self.x = x
        self.labels = labels
        self.likelihood = likelihood
        self.prior_mean = prior_mean
        self.num_examples = int(prior_mean.shape[0])
        self.num_outputs = int(prior_mean.shape[1])
        self.num_parameters = lin.num_parameters
        self.state = FitState.for_data(self.functional, likelihood, x, labels, prior_mean)
        self._gradient_scale = None

    # ------------------------------------------------------------------ products

    def jvp(self, tangents):
        """Return J(x) v as float64 [N, O] for float64 tangents [P]."""
        return _jvp(self.functional, self.x, tangents)

    def vjp(self, cotangents):
        """Return J(x)ᵀ u as float64 [P] for float64 cotangents [N, O]."""
        return _vjp(self.functional, self.x, cotangents)

    def jvp_batched(self, tangents):
        """Return J(x) V as float64 [R, N, O] for float64 tangents [R, P]."""
        dtype = self.functional.dtype
        return tf.cast(self.functional.jvp_batched(self.x, tf.cast(tangents, dtype)), tf.float64)

    # ------------------------------------------------------------------ objective

    def logits(self, weights):
        """Return f(δ) = m(x) + J(x) δ as float64 [N, O] (one JVP)."""
        return self.prior_mean + self.jvp(weights)

    def negative_log_likelihood(self, logits):
        """Return −Σᵢ log p(yᵢ | fᵢ) for float64 logits [N, O]."""
        return -tf.reduce_sum(self.likelihood.log_prob(self.labels, logits))

    def loss(self, weights, logits, prior_variance):
        """Return L(δ) given δ [P] and its logits [N, O]."""
        penalty = tf.reduce_sum(tf.square(weights)) / (2.0 * prior_variance)
        return self.negative_log_likelihood(logits) + penalty

    def gradient(self, weights, logits, prior_variance):
        """Return ∇L(δ) = −Jᵀ g(f) + δ/s² as float64 [P] (one VJP)."""
        score = self.likelihood.grad_log_prob(self.labels, logits)  # [N, O]
        return -self.vjp(score) + weights / prior_variance

    def gradient_scale(self):
        """Return max(1, ‖∇L(0)‖), the scale of the gradient stopping rule.

        ∇L(0) = −Jᵀ g(m(x)) does not depend on s², so it is computed once.
        """
        if self._gradient_scale is None:
            score = self.likelihood.grad_log_prob(self.labels, self.prior_mean)
            self._gradient_scale = max(1.0, float(tf.norm(self.vjp(score))))
        return self._gradient_scale

    # ------------------------------------------------------------------ curvature

    @property
    def ggn_operator(self):
        """G(f) [P, P] at the logits of the last `set_curvature`."""
        return self.state.ggn

    @property
    def precision_operator(self):
        """G(f) + I/s² [P, P] at the logits and s² of the last `set_curvature`."""
        return self.state.precision

    def set_curvature(self, logits, prior_variance=None):
        """Evaluate H at `logits` [N, O] in the operators; shift by 1/s² if given."""
        self.state.set_curvature(logits, 0.0 if prior_variance is None else 1.0 / prior_variance)

    def release(self):
        """Free the stored copy of the data (the compiled loops stay cached)."""
        self.state.release()


class FitState:
    """Variables holding one fit's data, and the operators and compiled steps reading them.

    The solvers compile their loops once per operator object, and a
    `tf.function` traces once per Python function, so both would be traced
    again for every fit if each fit made new ones. One `FitState` is kept per
    model, likelihood and input structure instead: its inputs, labels, prior
    mean, curvature logits and shift are variables whose first dimension may
    change, reassigned by each fit. Only one fit per model may use it at a time.

    Attributes:
        ggn: `LinearOperator` [P, P], G(f) at the stored curvature logits f.
        precision: `LinearOperator` [P, P], G(f) + c·I with the stored shift c.
        steps: dict of compiled training steps kept across fits, by a key that
            their builder chooses.
    """

    _CACHE = weakref.WeakKeyDictionary()

    @classmethod
    def for_data(cls, functional, likelihood, x, labels, prior_mean):
        """Return the cached state of (functional, likelihood, structure of x), loaded.

        Streamed inputs get a new state each time, because the compiled products
        capture their dataset.
        """
        if isinstance(x, _streaming.StreamedInputs):
            return cls(functional, likelihood, x, labels, prior_mean)
        per_model = cls._CACHE.setdefault(functional, {})
        key = (likelihood.name, _structure_key(x))
        if key not in per_model:
            per_model[key] = cls(functional, likelihood, x, labels, prior_mean)
        state = per_model[key]
        state.load(x, labels, prior_mean)
        return state

    def __init__(self, functional, likelihood, x, labels, prior_mean):
        # A weak reference, because the cache keyed by `functional` holds this object.
        self._functional = weakref.ref(functional)
        self.likelihood = likelihood
        self.num_outputs = int(prior_mean.shape[1])
        self._streamed = isinstance(x, _streaming.StreamedInputs)
        self._inputs = x if self._streamed else tf.nest.map_structure(_flexible_variable, x)
        self._labels = _flexible_variable(labels)
        self._prior_mean = _flexible_variable(prior_mean)
        self._curvature_logits = _flexible_variable(prior_mean)
        self._shift = tf.Variable(tf.constant(0.0, tf.float64), trainable=False)
        size = functional.num_parameters
        self.ggn = _operators.CallableOperator(self._ggn_matmul, size)
        self.precision = _operators.CallableOperator(
            lambda vectors: self._ggn_matmul(vectors) + self._shift * vectors, size
        )
        self.steps = {}

    @property
    def functional(self):
        return self._functional()

    def load(self, x, labels, prior_mean):
        """Store a fit's inputs, labels [N] and prior mean [N, O] (also the curvature logits)."""
        if not self._streamed:
            tf.nest.map_structure(lambda variable, value: variable.assign(value), self._inputs, x)
        self._labels.assign(labels)
        self._prior_mean.assign(prior_mean)
        self._curvature_logits.assign(prior_mean)

    def set_curvature(self, logits, shift):
        """Store the logits [N, O] where H is evaluated and the shift c."""
        self._curvature_logits.assign(logits)
        self._shift.assign(shift)

    def release(self):
        """Replace the stored data by empty tensors."""
        variables = [] if self._streamed else tf.nest.flatten(self._inputs)
        variables += [self._labels, self._prior_mean, self._curvature_logits]
        for variable in variables:
            variable.assign(variable[:0])

    def num_examples(self):
        """Return N of the stored data as a float64 scalar Tensor."""
        return tf.cast(tf.shape(self._labels)[0], tf.float64)

    def subset(self, indices):
        """Return (x, labels [n], prior_mean [n, O]) of the stored examples at `indices` [n].

        Only for inputs in memory: streamed inputs cannot be indexed.
        """
        x = tf.nest.map_structure(lambda variable: tf.gather(variable, indices), self._inputs)
        return x, tf.gather(self._labels, indices), tf.gather(self._prior_mean, indices)

    def minibatches(self, batch_size, seed, epoch):
        """Yield the (x, labels [n], prior_mean [n, O]) minibatches of one epoch.

        Inputs in memory come in a stateless permutation seeded by (seed, epoch).
        Streamed inputs come in the dataset's own order, the same in every epoch.
        """
        num_examples = int(tf.shape(self._labels)[0])
        batch_size = min(batch_size, num_examples)
        if self._streamed:
            yield from self._streamed_minibatches(batch_size, num_examples)
            return
        order = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), tf.constant([seed, epoch], tf.int64)
        )
        for start in range(0, num_examples, batch_size):
            yield self.subset(order[start:start + batch_size])

    def _streamed_minibatches(self, batch_size, num_examples):
        start = 0
        for x in self._inputs.dataset.rebatch(batch_size):
            stop = start + int(tf.shape(tf.nest.flatten(x)[0])[0])
            if stop > num_examples:
                break
            yield x, self._labels[start:stop], self._prior_mean[start:stop]
            start = stop
        if start != num_examples:
            raise ValueError(
                f"{_streaming.PASS_MISMATCH}: an epoch of minibatches did not yield exactly "
                f"the {num_examples} examples of the first pass. {_streaming.PASS_ADVICE}"
            )

    def _ggn_matmul(self, vectors):
        # V [P, R] -> J V -> H J V -> Jᵀ H J V [P, R]
        functional = self.functional
        x = self._inputs if self._streamed else tf.nest.map_structure(
            tf.convert_to_tensor, self._inputs
        )
        logits = tf.convert_to_tensor(self._curvature_logits)  # [N, O]
        if vectors.shape[1] == 1:
            curvature = self.likelihood.hessian_matmul(logits, _jvp(functional, x, vectors[:, 0]))
            return _vjp(functional, x, curvature)[:, None]
        dtype = functional.dtype
        tangents = tf.cast(tf.transpose(vectors), dtype)  # [R, P]
        outputs = tf.cast(functional.jvp_batched(x, tangents), tf.float64)  # [R, N, O]
        curvature = self.likelihood.hessian_matmul(logits, outputs)  # [R, N, O]
        products = functional.vjp_batched(x, tf.cast(curvature, dtype))  # [R, P]
        return tf.transpose(tf.cast(products, tf.float64))  # [P, R]


def top_eigenpairs(operator, rank, seed, verbose=0):
    """Return the top Ritz pairs (θ [k], U [P, k], record) of a PSD operator by Lanczos.

    Runs `rank` Lanczos steps (fewer when the Krylov space becomes invariant) and
    drops Ritz values ≤ 1e-12 · max as rounding noise. The record states the
    Lanczos steps run and the number of pairs kept. `verbose=1` shows a
    progress bar over the Lanczos steps.
    """
    values, vectors = solvers.lanczos_eigh(operator, rank, seed=seed, verbose=verbose)
    num_iterations = int(values.shape[0])
    keep = values > RITZ_RELATIVE_CUTOFF * tf.reduce_max(values)
    values = tf.boolean_mask(values, keep)
    vectors = tf.boolean_mask(vectors, keep, axis=1)
    return values, vectors, {"iterations": num_iterations, "rank": int(values.shape[0])}


def minibatch_jvp(functional, x, tangents):
    """Return J(x) v as float64 [n, O] for float64 tangents [P] (a variable is fine)."""
    return _jvp(functional, x, tangents)


def minibatch_vjp(functional, x, cotangents):
    """Return J(x)ᵀ u as float64 [P] for float64 cotangents [n, O]."""
    return _vjp(functional, x, cotangents)


# ---------------------------------------------------------------------- helpers


def _jvp(functional, x, tangents):
    # A variable passed on into the compiled JVP would be captured by its trace.
    tangents = tf.cast(tf.convert_to_tensor(tangents), functional.dtype)
    return tf.cast(functional.jvp(x, tangents), tf.float64)


def _vjp(functional, x, cotangents):
    cotangents = tf.cast(cotangents, functional.dtype)
    return tf.cast(functional.vjp(x, cotangents), tf.float64)


def _flexible_variable(value):
    """Return a non-trainable variable holding `value` whose first dimension may change."""
    value = tf.convert_to_tensor(value)
    shape = tf.TensorShape([None]).concatenate(value.shape[1:])
    return tf.Variable(value, shape=shape, trainable=False)


def _structure_key(x):
    """Return a hashable key of the structure, dtypes and trailing shapes of x."""
    leaves = tf.nest.flatten(x)
    return (str(tf.nest.map_structure(lambda _: 0, x)),
            tuple((leaf.dtype.name, tuple(leaf.shape[1:])) for leaf in leaves))
