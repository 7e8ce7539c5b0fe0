"""Fisher / generalized Gauss–Newton operators F = Σᵢ Jᵢᵀ Hᵢ Jᵢ in parameter space."""

import functools
import weakref

import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import _fisher_inputs
from tf_linntk import _streaming
from tf_linntk import likelihoods

__all__ = ["METHODS", "FisherOperator", "default_epsilon", "fisher_operator"]

METHODS = ("finite_difference", "central_difference", "autodiff", "ggn")

_FINITE_DIFFERENCE_METHODS = ("finite_difference", "central_difference")

# Default step ε = scale · eps**power · (1 + ‖θ₀‖) for the dtype's machine epsilon
# eps: the power balances truncation error, O(ε) forward or O(ε²) central, against
# rounding error O(eps/ε). In sweeps over ε on tanh and ReLU MLPs and CNNs (‖θ₀‖
# from 3 to 32, float32 and float64) the best step grew with ‖θ₀‖, and 0.75 was
# near the best forward scale. For central differences 0.4 was best on tanh
# networks, but 0.2 keeps their error below 1e-4 and cuts ReLU kink errors 2-8×.
_EPSILON_RULES = {"finite_difference": (0.5, 0.75), "central_difference": (1.0 / 3.0, 0.2)}

_ZERO = tf.UnconnectedGradients.ZERO

# Compiled product bodies per FunctionalModel, keyed by (method, likelihood), so
# that operators differing only in x or in the reference outputs share a trace.
_PRODUCTS_CACHE = weakref.WeakKeyDictionary()


def default_epsilon(method, dtype, parameter_norm=0.0):
    """Return the default finite-difference step ε for `method`, `dtype` and ‖θ₀‖.

    ε = 0.75·eps^½·(1 + ‖θ₀‖) for forward and 0.2·eps^⅓·(1 + ‖θ₀‖) for central
    differences, with eps the machine epsilon: 2.6e-4 and 9.8e-4 times
    (1 + ‖θ₀‖) in float32, 1.1e-8 and 1.2e-6 times (1 + ‖θ₀‖) in float64.

    Args:
        method: "finite_difference" or "central_difference".
        dtype: the operator's float dtype (`tf.float32` or `tf.float64`).
        parameter_norm: ‖θ₀‖, the Euclidean norm of the linearized parameters.

    Returns:
        The step as a Python float.

    Raises:
        ValueError: if `method` is not a finite-difference method or
            `parameter_norm` is negative or not finite.

    Example:
        >>> round(default_epsilon("finite_difference", tf.float32, 3.0), 6)
        0.001036
    """
    _checks.check_option("method", method, _FINITE_DIFFERENCE_METHODS)
    if not np.isfinite(parameter_norm) or parameter_norm < 0:
        raise ValueError(
            f"`parameter_norm` must be a finite float >= 0; received {parameter_norm!r}."
        )
    power, scale = _EPSILON_RULES[method]
    machine_epsilon = np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps
    return float(scale * machine_epsilon**power * (1.0 + parameter_norm))


def fisher_operator(lin, x, likelihood="gaussian", method="ggn", epsilon=None, outputs=None):
    """Build the Fisher / GGN operator F = Σᵢ Jᵢᵀ Hᵢ Jᵢ of a linearized model on x.

    This implements `LinearizedModel.fisher`; `FisherOperator` describes the
    methods, where each is exact, and their cost.

    Args:
        lin: a `tf_linntk.LinearizedModel`.
        x: inputs with N examples (array, tensor, or a tuple/list/dict).
        likelihood: "gaussian", "categorical", "bernoulli", or a
            `tf_linntk.likelihoods.Likelihood` instance.
        method: "finite_difference", "central_difference", "autodiff" or "ggn".
        epsilon: finite-difference step > 0, or None for `default_epsilon`.
        outputs: optional float Tensor [N, O] of outputs or logits at which the
            Hessians Hᵢ are evaluated, e.g. MAP logits; defaults to f(x; θ₀).

    Returns:
        A `FisherOperator` of shape [P, P] in the model's dtype.

    Raises:
        TypeError: if `likelihood` or `outputs` has the wrong type.
        ValueError: if an argument has an invalid value or shape.

    Example:
        >>> import keras, tf_linntk
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> lin = tf_linntk.LinearizedModel(model)
        >>> fisher = fisher_operator(lin, np.ones((5, 3), "float32"), "categorical")
        >>> fisher.shape, fisher.matvec(tf.ones([8])).shape
        (TensorShape([8, 8]), TensorShape([8]))
    """
    return FisherOperator(
        lin, x, likelihood=likelihood, method=method, epsilon=epsilon, outputs=outputs
    )


class FisherOperator(tf.linalg.LinearOperator):
    """Fisher / generalized Gauss–Newton matrix F of shape [P, P], never formed.

    F = Σᵢ Jᵢᵀ Hᵢ Jᵢ, summed (not averaged) over the N examples, where Jᵢ [O, P]
    is the Jacobian of example i's outputs at θ₀ and Hᵢ [O, O] the likelihood's
    output-space Hessian at the reference outputs oᵢ: f(xᵢ; θ₀), or the given
    `outputs`. The parameter-space posterior precision is F + I/s². F is PSD
    and flagged self-adjoint only, because F is singular when N·O < P.

    Methods of `matmul`, streamed over chunks of the model's `batch_size` inside
    one `tf.function`. They use L(θ) = Σᵢ KL(p(y|oᵢ) ‖ p(y|f(xᵢ; θ) + oᵢ − f(xᵢ; θ₀))),
    whose gradient vanishes at θ₀ and whose Hessian there is exactly F. Costs
    are per chunk and right-hand side:

    - "ggn": exact Jᵀ H J v. One forward pass carrying forward-mode tangents
      gives J v, the likelihood applies H, and one reverse pass gives Jᵀ H J v.
    - "autodiff": exact, by double backpropagation: the gradient of ⟨∇L, v⟩ at
      θ₀. One forward, one reverse and one reverse-over-reverse pass.
    - "finite_difference": ∇L(θ₀ + ε u)·‖v‖/ε with u = v/‖v‖. One forward and
      one reverse pass at the perturbed parameters, because f(x; θ₀) is
      computed once, when the operator is built. Error O(ε) + O(eps·‖θ₀‖/ε).
    - "central_difference": [∇L(θ₀ + ε u) − ∇L(θ₀ − ε u)]·‖v‖/(2ε). Two
      forward and two reverse passes. Error O(ε²) + O(eps·‖θ₀‖/ε).

    The exact methods vectorize R right-hand sides with TensorFlow's pfor
    (`tf.vectorized_map`, `tape.jacobian`). The finite-difference methods need
    one perturbed network per column and loop over the columns in the graph.
    Zero columns give exact zero columns. Perturbed parameters are tensors
    passed to `FunctionalModel.apply`, so the model's variables are never
    assigned.

    Errors ‖F v − F_ggn v‖/‖F_ggn v‖ with the default ε were measured on tanh
    MLPs and CNNs with 70–450 parameters and Gaussian, categorical and Bernoulli
    likelihoods. Forward differences gave 4e-4 to 1.2e-3 in float32 and 2e-8 to
    4e-8 in float64, central differences 3e-5 to 1.5e-4 and 1e-10. A step that
    crosses a kink (ReLU, max pooling) adds O(ε) error to both. With ReLU on the
    same networks, float32 errors are 5e-4 to 1.5e-3 forward and 6e-5 to 1.3e-2
    central. A tiny ReLU CNN (113 parameters, 7 examples) with a unit 2e-4 from
    its kink gave 0.12–0.17 forward and 0.08–0.13 central, so prefer "ggn" for
    small ReLU networks. On the float32 CNNs of `bench/fvp.py` (256 inputs, 10
    classes), a tanh CNN with max pooling (159k parameters) gives 2.5e-3
    forward and 3.4e-3 central, and a ReLU residual CNN (869k) 9.8e-4 and
    6.2e-4. "ggn" and "autodiff" agree with a dense Σ Jᵢᵀ Hᵢ Jᵢ to about 1e-15
    in float64. On those CNNs (2-core AMD EPYC, TF 2.21), a forward-difference
    product took 0.58–0.63× the CPU time of "ggn" and 0.38–0.42× that of
    "autodiff", and a central-difference product about 1.2× that of "ggn".

    `diag_part()` and `to_dense()` are exact for every method. With the
    likelihood's square root Hᵢ = Sᵢ Sᵢᵀ, diag(F) = Σᵢ Σₖ ((Jᵢᵀ Sᵢ)[:, k])² from
    per-chunk Jacobians of Sᵢᵀ f(xᵢ; θ) (`tape.jacobian`: O reverse passes per
    example, memory chunk·O·P, with chunks capped by
    `autodiff.JACOBIAN_CHUNK_BYTES`). `to_dense()` sums (SᵀJ)ᵀ(SᵀJ) over the same
    chunks in P² memory and raises above the model's `max_dense_bytes`.

    For a model built inside a multi-replica `tf.distribute` strategy scope,
    `matmul`, `diag_part()` and `to_dense()` are sharded over the examples.
    Each replica runs the product above on a contiguous shard of whole
    `batch_size` chunks, with the matching rows of the reference outputs, and
    the [P], [R, P] or [P, P] results are summed with one all-reduce per call.
    The reference outputs f(x; θ₀) come from the same shards. `matmul` thus
    computes exactly the single-device chunks on every replica, with the same
    ε, which depends only on θ₀. The sharded products then equal the
    single-device ones up to the order in which chunk sums are added. This
    holds for the finite-difference methods too, whose 1/ε would amplify any
    rounding difference between chunks. With fewer chunks than replicas, some
    replicas get no examples.

    Args:
        lin: a `tf_linntk.LinearizedModel`.
        x: inputs with N examples (array, tensor, or a tuple/list/dict).
        likelihood: "gaussian", "categorical", "bernoulli", or a
            `tf_linntk.likelihoods.Likelihood` instance.
        method: one of `METHODS`.
        epsilon: step ε > 0 of the finite-difference methods, or None for
            `default_epsilon(method, dtype, ‖θ₀‖)`. Must be None for "ggn" and
            "autodiff".
        outputs: optional float Tensor [N, O] where the Hessians are evaluated
            (e.g. MAP logits of a Laplace fit), cast to the model's dtype.
            Defaults to the network outputs f(x; θ₀).
        name: operator name.

    Raises:
        TypeError: if `likelihood` is neither a name nor an instance, or
            `outputs` is not a float tensor.
        ValueError: if `method` is unknown, `epsilon` is not a finite float > 0
            or is given for an exact method, `outputs` is not a finite [N, O]
            tensor, the likelihood does not fit O, or N is not static.
    """

    @_streaming.translates_pass_errors
    def __init__(
        self, lin, x, likelihood="gaussian", method="ggn", epsilon=None, outputs=None,
        name="FisherOperator",
    ):
        functional = lin.functional
        method = _checks.check_option("method", method, METHODS)
        likelihood = likelihoods.get_likelihood(likelihood)
        _fisher_inputs.check_likelihood_fits(likelihood, functional.num_outputs)
        epsilon = _check_epsilon(epsilon, method, functional)
        x = functional.convert_inputs(x, allow_dataset=True)
        products = _products_for(functional, likelihood, method)
        reference, shift = _fisher_inputs.reference_outputs(
            functional, products, x, outputs, needs_shift=method != "ggn"
        )

        # `tf.Module` attribute tracking would wrap dict and list inputs, which
        # `tf.function` cannot trace, and would track the wrapper's Keras model.
        object.__setattr__(self, "_x", x)
        object.__setattr__(self, "_check_dense_size", lin.check_dense_size)
        self._functional = functional
        self._method = method
        self._likelihood = likelihood
        self._epsilon = epsilon
        self._reference = reference
        self._shift = shift
        self._products = products
        super().__init__(dtype=functional.dtype, is_self_adjoint=True, is_square=True, name=name)

    @property
    def method(self):
        """The product method, one of `METHODS`."""
        return self._method

    @property
    def likelihood(self):
        """The `Likelihood` whose output-space Hessians define F."""
        return self._likelihood

    @property
    def epsilon(self):
        """The finite-difference step ε, or None for "ggn" and "autodiff"."""
        return self._epsilon

    def matmul(self, x, adjoint=False, adjoint_arg=False, name="matmul"):
        """Return F x for x [..., P, R] ([..., R, P] with `adjoint_arg`), as in the base class."""
        if not isinstance(x, tf.linalg.LinearOperator):
            self._check_parameter_axis(x, -1 if adjoint_arg else -2, "[..., P, R]")
        return super().matmul(x, adjoint=adjoint, adjoint_arg=adjoint_arg, name=name)

    def matvec(self, x, adjoint=False, name="matvec"):
        """Return F x for x [..., P], as in the base class."""
        self._check_parameter_axis(x, -1, "[..., P]")
        return super().matvec(x, adjoint=adjoint, name=name)

    def _check_parameter_axis(self, x, axis, layout):
        shape = tuple(getattr(x, "shape", np.shape(x)))
        size = self._functional.num_parameters
        if len(shape) < -axis or shape[axis] not in (None, size):
            raise ValueError(
                f"`x` must be {layout} with P={size} (linearized parameters); "
                f"received shape {shape}."
            )

    def _shape(self):
        return tf.TensorShape([self._functional.num_parameters] * 2)

    def _shape_tensor(self):
        return tf.constant([self._functional.num_parameters] * 2, dtype=tf.int32)

    @_streaming.translates_pass_errors
    def _matvec(self, x, adjoint=False):
        del adjoint  # F is symmetric.
        if x.shape.rank != 1:
            return self._matmul(x[..., tf.newaxis])[..., 0]
        _checks.check_finite("x", x)
        return self._products.single(*self._arguments(), x)  # [P]

    @_streaming.translates_pass_errors
    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        del adjoint  # F is symmetric.
        if adjoint_arg:
            x = tf.linalg.adjoint(x)
        _checks.check_finite("x", x)
        rows, restore = _columns_to_rows(x)  # [R, P]
        if rows.shape[0] == 1:
            products = self._products.single(*self._arguments(), rows[0])[tf.newaxis]
        else:
            products = self._products.batched(*self._arguments(), rows)  # [R, P]
        return restore(products)  # [..., P, R]

    @_streaming.translates_pass_errors
    def _diag_part(self):
        return self._products.diag(*self._arguments())  # [P]

    @_streaming.translates_pass_errors
    def _to_dense(self):
        size = self._functional.num_parameters
        self._check_dense_size(
            (size, size), "to_dense", None, "use `matmul` products or `diag_part()` instead"
        )
        return self._products.dense(*self._arguments())  # [P, P]

    def _arguments(self):
        epsilon = None if self._epsilon is None else tf.constant(self._epsilon, self.dtype)
        return self._x, self._reference, self._shift, epsilon


class _FisherProducts:
    """Compiled product bodies of one model, likelihood and method.

    x, the reference outputs, the shift o − f(x; θ₀) and ε are tensor arguments,
    so operators that differ only in them (e.g. Laplace iterations with new MAP
    logits) reuse one trace. A weak reference to the model lets it be freed.
    """

    def __init__(self, functional, likelihood, method):
        self._functional_ref = weakref.ref(functional)
        self._likelihood, self._method, self.dtype = likelihood, method, functional.dtype
        single, batched = {
            "finite_difference": (self._difference_single, self._difference_batched),
            "central_difference": (self._difference_single, self._difference_batched),
            "autodiff": (self._autodiff, self._autodiff),
            "ggn": (self._ggn, self._ggn),
        }[method]
        # TF counts traces per code object, so many instances that each trace once
        # would trigger its retracing warning. A partial has no code object.
        compile_fn = lambda fn: tf.function(  # noqa: E731
            functools.partial(fn), reduce_retracing=True, autograph=False
        )
        if functional.is_sharded:
            single, batched, diag, dense = (
                self._sum_over_shards(fn) for fn in (single, batched, self._diag, self._dense)
            )
        else:
            diag, dense = self._diag, self._dense
        self.single = compile_fn(single)
        self.batched = compile_fn(batched)
        self.diag = compile_fn(diag)
        self.dense = compile_fn(dense)
        if functional.is_sharded:
            self._sharded_outputs_fn = compile_fn(self._sharded_outputs)

    @property
    def _functional(self):
        return self._functional_ref()

    def outputs(self, x):
        """Return f(x; θ₀) [N, O], computed in the same chunks as the products."""
        if self._functional.is_sharded:
            return self._sharded_outputs_fn(x)
        return self._functional.outputs(x)

    def _sum_over_shards(self, product):
        """Wrap product(x, reference, shift, epsilon, ...) to sum it over the replicas.

        Each replica runs the single-device product on its contiguous shard of
        whole `batch_size` chunks of x, with the matching rows of the reference
        outputs and the shift. The [P], [R, P] or [P, P] results are
        all-reduced with SUM.
        """

        def sharded(x, reference, shift, *arguments):
            def shard(x_shard, start, stop):
                rows = reference[start:stop], _rows(shift, start, stop)
                return product(x_shard, *rows, *arguments)

            # The model is looked up at trace time, because a strong reference
            # here would keep it alive through `_PRODUCTS_CACHE`.
            functional = self._functional
            return functional._sharded.reduce_shards(x, shard, functional.batch_size)

        return sharded

    def _sharded_outputs(self, x):
        """Return f(x; θ₀) [N, O] from the chunk-aligned shards of `_sum_over_shards`.

        `FunctionalModel.outputs` shards differently, and a row's forward pass can
        round differently in another chunk. The difference methods would divide
        that change of one ulp in f(x; θ₀) by ε.
        """
        functional = self._functional
        num_examples = functional.num_examples(x)

        def shard(x_shard, start, stop):
            # Zero rows outside the shard make the SUM all-reduce an exact gather.
            rows = functional.local.outputs(x_shard)  # [stop - start, O]
            return tf.pad(rows, [[start, num_examples - stop], [0, 0]])  # [N, O]

        return functional._sharded.reduce_shards(x, shard, functional.batch_size)

    # ------------------------------------------------------------------ finite differences

    def _difference_single(self, x, reference, shift, epsilon, v):
        unit, norm = _unit_rows(v[tf.newaxis])  # [1, P], [1, 1]
        step = epsilon * unit[0]  # [P]

        def chunk(xc, start, stop):
            shift_chunk = _rows(shift, start, stop)
            return [self._kl_difference(xc, reference[start:stop], shift_chunk, step)]

        (total,) = self._sum_chunks(chunk, x, [tf.zeros_like(v)])
        divisor = 2.0 * epsilon if self._method == "central_difference" else epsilon
        return total * (norm[0] / divisor)  # [P]

    def _difference_batched(self, x, reference, shift, epsilon, rows):
        # Each column needs its own perturbed network. On a 2-core AMD EPYC,
        # `tf.vectorized_map` over the columns took 15% more CPU time than this
        # loop (CNN of `bench/fvp.py`, 4 columns, Conv2D falling back to a while
        # loop) and 50% more on a 784-256-256-10 MLP with 16 columns.
        return tf.map_fn(
            lambda row: self._difference_single(x, reference, shift, epsilon, row),
            rows, parallel_iterations=1,
        )  # [R, P]

    def _kl_difference(self, xc, reference, shift, step):
        """Return ∇L(θ₀ + step) (forward) or ∇L(θ₀ + step) − ∇L(θ₀ − step), flat [P]."""
        forward = self._kl_gradient(xc, reference, shift, step)
        if self._method == "finite_difference":
            return forward
        return forward - self._kl_gradient(xc, reference, shift, -step)

    def _kl_gradient(self, xc, reference, shift, step):
        """Return the gradient of one chunk's L at θ₀ + step, flat [P]."""
        functional = self._functional
        params = [p + d for p, d in zip(functional.params0, functional.unflatten(step))]
        with tf.GradientTape() as tape:
            tape.watch(params)
            out = functional.apply(params, xc)  # [n, O]
            out = out if shift is None else out + shift
            loss = tf.reduce_sum(self._likelihood.kl(reference, out))
        gradients = tape.gradient(loss, params, unconnected_gradients=_ZERO)
        return _flatten_dense(functional, gradients)  # [P]

    # ------------------------------------------------------------------ exact products

    def _ggn(self, x, reference, shift, epsilon, tangents):
        """Return Σ over chunks of Jᵀ H J v, for tangents [P] or rows [R, P]."""
        del shift, epsilon  # The GGN needs only the Hessians at the reference outputs.

        def chunk(xc, start, stop):
            product = lambda v: self._ggn_chunk(xc, reference[start:stop], v)  # noqa: E731
            if tangents.shape.rank == 1:
                return [product(tangents)]  # [P]
            # The forward pass at θ₀ does not depend on the row, so pfor runs it once.
            return [tf.vectorized_map(product, tangents)]  # [R, P]

        (total,) = self._sum_chunks(chunk, x, [tf.zeros_like(tangents)])
        return total

    def _ggn_chunk(self, xc, reference, v):
        functional = self._functional
        primals = self._primals()
        with tf.GradientTape() as tape:
            tape.watch(primals)
            with tf.autodiff.ForwardAccumulator(primals, functional.unflatten(v)) as accumulator:
                out = functional.apply(primals, xc)  # [n, O]
            # v -> J v
            jvp = accumulator.jvp(out, unconnected_gradients=_ZERO)  # [n, O]
        # J v -> H J v -> Jᵀ H J v
        hjvp = tf.stop_gradient(self._likelihood.hessian_matmul(reference, jvp))
        gradients = tape.gradient(out, primals, output_gradients=hjvp, unconnected_gradients=_ZERO)
        return _flatten_dense(functional, gradients)  # [P]

    def _autodiff(self, x, reference, shift, epsilon, tangents):
        """Return Σ over chunks of ∇⟨∇L, v⟩ at θ₀, for tangents [P] or rows [R, P]."""
        del epsilon
        batched = tangents.shape.rank == 2

        def chunk(xc, start, stop):
            primals = self._primals()
            with tf.GradientTape() as outer:
                outer.watch(primals)
                gradient = self._loss_gradient(
                    primals, xc, reference[start:stop], _rows(shift, start, stop)
                )  # [P]
                # ⟨∇L, v⟩ for each right-hand side: [R] or a scalar.
                projections = tf.linalg.matvec(tangents, gradient) if batched else (
                    tf.reduce_sum(tangents * gradient)
                )
            if not batched:
                hvp = outer.gradient(projections, primals, unconnected_gradients=_ZERO)
                return [_flatten_dense(self._functional, hvp)]  # [P]
            hvps = outer.jacobian(projections, primals, unconnected_gradients=_ZERO)
            num_rows = tf.shape(tangents)[0]
            return [tf.concat([tf.reshape(h, [num_rows, -1]) for h in hvps], axis=1)]

        (total,) = self._sum_chunks(chunk, x, [tf.zeros_like(tangents)])
        return total  # [P] or [R, P]

    def _loss_gradient(self, primals, xc, reference, shift):
        """Return the gradient of one chunk's L at `primals`, flat [P], differentiably."""
        with tf.GradientTape() as inner:
            inner.watch(primals)
            out = self._functional.apply(primals, xc)  # [n, O]
            out = out if shift is None else out + shift
            loss = tf.reduce_sum(self._likelihood.kl(reference, out))
        gradients = inner.gradient(loss, primals, unconnected_gradients=_ZERO)
        return _flatten_dense(self._functional, gradients)

    def _diag(self, x, reference, shift, epsilon):
        # Exact for every method, because only J at θ₀ and the Hessians enter.
        del shift, epsilon
        size = self._functional.num_parameters
        square_sums = lambda rows: tf.reduce_sum(tf.square(rows), axis=0)  # noqa: E731
        return self._sum_jacobian_chunks(x, reference, square_sums, [size])  # [P]

    def _dense(self, x, reference, shift, epsilon):
        del shift, epsilon  # Exact for every method, as `_diag`.
        size = self._functional.num_parameters
        gram = lambda rows: tf.matmul(rows, rows, transpose_a=True)  # noqa: E731
        return self._sum_jacobian_chunks(x, reference, gram, [size, size])  # [P, P]

    def _scaled_jacobian(self, xc, reference):
        """Return the rows Sᵢᵀ Jᵢ of one chunk, [n·O, P], where Hᵢ = Sᵢ Sᵢᵀ."""
        root = tf.stop_gradient(self._likelihood.hessian_sqrt(reference))  # [n, O, O]
        primals = self._primals()
        with tf.GradientTape() as tape:
            tape.watch(primals)
            out = self._functional.apply(primals, xc)  # [n, O]
            scaled = tf.einsum("no,nok->nk", out, root)  # [n, O]
        jacobians = tape.jacobian(scaled, primals, unconnected_gradients=_ZERO)
        num_rows = tf.shape(scaled)[0] * tf.shape(scaled)[1]
        return tf.concat([tf.reshape(j, [num_rows, -1]) for j in jacobians], axis=1)

    def _primals(self):
        return [tf.convert_to_tensor(p) for p in self._functional.params0]

    def _sum_chunks(self, fn, x, zeros, chunk_size=None):
        """Sum fn(x[start:stop], start, stop) over chunks, by default of the model's `batch_size`."""
        add = lambda total, part: total + part  # noqa: E731
        return self._functional._sum_chunks(fn, x, zeros, add, chunk_size)

    def _sum_jacobian_chunks(self, x, reference, reduce_rows, shape):
        """Sum reduce_rows(Sᵀ J) over chunks small enough for a dense [chunk·O, P] Jacobian."""

        def chunk(xc, start, stop):
            return [reduce_rows(self._scaled_jacobian(xc, reference[start:stop]))]

        # The FunctionalModel's Jacobian chunk: at most `batch_size` examples and
        # `autodiff.JACOBIAN_CHUNK_BYTES` of Jacobian rows.
        chunk_size = self._functional._jacobian_rows()
        (total,) = self._sum_chunks(chunk, x, [tf.zeros(shape, self.dtype)], chunk_size)
        return total


def _products_for(functional, likelihood, method):
    """Return the cached `_FisherProducts` for this model, likelihood and method."""
    per_model = _PRODUCTS_CACHE.setdefault(functional, {})
    key = (method, _likelihood_key(likelihood))
    if key not in per_model:
        per_model[key] = _FisherProducts(functional, likelihood, method)
    return per_model[key]


def _likelihood_key(likelihood):
    """Return a cache key: the configuration for built-in likelihoods, else the identity.

    A subclass may hold parameters that its `get_config` does not list, so only
    the built-in classes are compared by configuration. NOTE: the cache keeps
    every subclass instance (and its traces) alive as long as the model.
    """
    if type(likelihood) in (likelihoods.Gaussian, likelihoods.Categorical, likelihoods.Bernoulli):
        return type(likelihood).__name__, repr(likelihood)
    return "instance", id(likelihood)


def _unit_rows(rows):
    """Return unit rows [R, P] and the norms [R, 1], with zero rows left at zero.

    The norm is taken after division by the largest magnitude so that tiny or
    huge rows neither underflow nor overflow.
    """
    peak = tf.reduce_max(tf.abs(rows), axis=-1, keepdims=True)  # [R, 1]
    scaled = rows / tf.where(peak > 0, peak, tf.ones_like(peak))  # [R, P]
    length = tf.norm(scaled, axis=-1, keepdims=True)  # [R, 1]
    unit = scaled / tf.where(length > 0, length, tf.ones_like(length))
    return unit, peak * length


def _rows(tensor, start, stop):
    return None if tensor is None else tensor[start:stop]


def _flatten_dense(functional, gradients):
    """Flatten per-variable gradients (dense or IndexedSlices) into [P]."""
    return functional.flatten([tf.convert_to_tensor(g) for g in gradients])


def _columns_to_rows(x):
    """Return the columns of x [..., P, R] as rows [B·R, P] and the inverse map."""
    rows = tf.linalg.matrix_transpose(x)  # [..., R, P]
    if x.shape.rank == 2:
        return rows, tf.linalg.matrix_transpose
    shape = tf.shape(rows)
    flat = tf.reshape(rows, [-1, shape[-1]])  # [B·R, P]
    return flat, lambda products: tf.linalg.matrix_transpose(tf.reshape(products, shape))


def _check_epsilon(epsilon, method, functional):
    """Return ε for finite-difference methods (default or checked) and None otherwise."""
    if method not in _FINITE_DIFFERENCE_METHODS:
        if epsilon is not None:
            raise ValueError(
                f"`epsilon` applies only to method='finite_difference' or "
                f"'central_difference'; received epsilon={epsilon!r} with "
                f"method={method!r}. Pass epsilon=None."
            )
        return None
    if epsilon is None:
        parameter_norm = float(tf.norm(functional.flatten(functional.params0)))
        return default_epsilon(method, functional.dtype, parameter_norm)
    return _checks.check_positive_float("epsilon", epsilon)
