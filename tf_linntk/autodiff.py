"""Pure function f(θ, x) of a Keras model and its batched JVP, VJP and Jacobian.

`FunctionalModel` snapshots the trainable weights θ₀ and the non-trainable state
of a built Keras 3 model and evaluates the network as a pure function of the
linearized parameters. Variables are read through `keras.StatelessScope`, so no
computation here ever assigns a variable of the wrapped model, also when it
raises. Every product streams over the examples in chunks of `batch_size`.

Shapes: N examples, O flattened outputs per example (all output tensors flattened
per example and concatenated in `model.outputs` order), P linearized parameters
(the selected trainable variables in `model.trainable_variables` order, each
flattened row-major), R right-hand sides.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

from tf_linntk import _checks
from tf_linntk import _chunks
from tf_linntk import _model_checks
from tf_linntk import _streaming
from tf_linntk import distribute

__all__ = ["FunctionalModel"]

# Chunks of dense Jacobian rows are sized so that one chunk stays below this many
# bytes. The size is a memory bound, not a tuning result.
JACOBIAN_CHUNK_BYTES = 256 * 2**20

# Batched products form per-chunk Jacobians when the number of right-hand sides
# is at least this multiple of O. Measured on a 10k-parameter tanh MLP with
# N = 2,000 (2-core CPU): 110 right-hand sides took 1.05 s as vectorized JVPs and
# 0.6 s as vectorized VJPs, against 0.02 s to form the Jacobian.
JACOBIAN_PRODUCT_MIN_RHS = 4


class FunctionalModel:
    """Pure view f(θ, x) → [N, O] of a built Keras model, linearized at θ₀.

    Args:
        model: a built Keras 3 model (Sequential, Functional or subclassed).
        layers: optional layers (objects or names) whose trainable variables are
            linearized; the other variables stay fixed at their snapshot values.
            Defaults to all trainable variables.
        batch_size: number of examples per chunk in every streamed product.
        output_projection: optional float matrix [O_model, O] applied to the
            flattened network outputs before any product, or an int O for a
            random Gaussian projection with entries N(0, 1/O_model), seed 0.

    Raises:
        TypeError: if `model` is not a Keras 3 model or `layers` is malformed.
        ValueError: if the model is not built, uses a mixed-precision policy, has no
            trainable variables, or `layers` names an unknown layer.
    """

    def __init__(self, model, *, layers=None, batch_size=256, output_projection=None):
        _model_checks.check_model(model)
        self._model = model
        self.batch_size = _checks.check_positive_int("batch_size", batch_size)
        self.dtype = tf.as_dtype(_model_checks.model_compute_dtype(model))

        # Split the model's variables into the linearized ones and the fixed rest.
        selected = _model_checks.select_variables(model, layers)
        selected_ids = {id(v) for v in selected}
        self._linearized_vars = selected
        self._fixed_vars = [v for v in model.variables if id(v) not in selected_ids]
        self.variable_shapes = [tuple(v.shape) for v in selected]
        self._sizes = [int(np.prod(s, dtype=np.int64)) for s in self.variable_shapes]
        self.num_parameters = int(sum(self._sizes))

        # Snapshot θ₀ and the fixed state; the model's own variables are never read again.
        self.params0 = [_snapshot(v) for v in selected]
        self.fixed_values = [_snapshot(v) for v in self._fixed_vars]

        self._input_specs = _model_checks.input_specs(model)
        self._output_structure, self._output_shapes = self._infer_output_shapes()
        self._output_sizes = [int(np.prod(s, dtype=np.int64)) for s in self._output_shapes]
        self.num_model_outputs = int(sum(self._output_sizes))
        self.output_projection = _projection_matrix(output_projection, self.num_model_outputs)
        self.num_outputs = (
            self.num_model_outputs if self.output_projection is None
            else int(self.output_projection.shape[-1])
        )
        self._compile()
        strategy = distribute.active_strategy()
        self._sharded = None if strategy is None else distribute.ShardedProducts(self, strategy)

    # ------------------------------------------------------------------ structure

    @property
    def model(self):
        """The wrapped Keras model (read only: its variables are never assigned)."""
        return self._model

    @property
    def output_shapes(self):
        """Per-example shapes of the model's output tensors, in `model.outputs` order."""
        return self._output_shapes

    @property
    def snapshot_variables(self):
        """All snapshot variables: θ₀ followed by the fixed state."""
        return list(self.params0) + list(self.fixed_values)

    def flatten(self, tensors):
        """Concatenate per-variable tensors (shapes of the linearized variables) into [P]."""
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def unflatten(self, flat):
        """Split a flat vector [P] into tensors shaped like the linearized variables."""
        pieces = tf.split(flat, self._sizes, axis=0)
        return [tf.reshape(p, s) for p, s in zip(pieces, self.variable_shapes)]

    def num_examples(self, x):
        """Return the number of examples N of a converted input structure (static if known)."""
        if isinstance(x, _streaming.StreamedInputs):
            static = x.static_num_examples()
            return static if static is not None else x.num_examples
        first = tf.nest.flatten(x)[0]
        static = first.shape[0]
        return static if static is not None else tf.shape(first)[0]

    def convert_inputs(self, x, name="x", allow_dataset=False):
        """Convert and validate `x` against the model's inputs.

        Returns a tensor structure, or `StreamedInputs` for a `tf.data.Dataset`
        when `allow_dataset` is set (then the dataset is read once to validate
        and count it).
        """
        if isinstance(x, _streaming.StreamedInputs):
            return x
        if allow_dataset and _streaming.is_dataset(x):
            streamed, _ = _streaming.read_dataset(x, self._convert_batch, self.batch_size, name)
            return streamed
        return _model_checks.convert_inputs(x, self._input_specs, self.dtype, name)

    def read_dataset(self, dataset, name="x"):
        """Read a dataset of (x, y) batches once; return (StreamedInputs, y in memory)."""
        return _streaming.read_dataset(
            dataset, self._convert_batch, self.batch_size, name, with_targets=True
        )

    def _convert_batch(self, x, name):
        return _model_checks.convert_inputs(x, self._input_specs, self.dtype, name)

    # ------------------------------------------------------------------ pure function

    def apply(self, params, x):
        """Evaluate f(params, x) → [n, O] in inference mode without touching variables.

        Args:
            params: list of tensors shaped like the linearized variables.
            x: input structure with n examples.

        Returns:
            Tensor [n, O] in the model's compute dtype.
        """
        mapping = list(zip(self._linearized_vars, params))
        mapping += list(zip(self._fixed_vars, self.fixed_values))
        with keras.StatelessScope(state_mapping=mapping):
            outputs = self._model(x, training=False)
        # Static per-example sizes, because reshape cannot infer -1 for N = 0.
        flat = [
            tf.reshape(tf.cast(t, self.dtype), [-1, size])
            for t, size in zip(keras.tree.flatten(outputs), self._output_sizes)
        ]
        out = tf.concat(flat, axis=1) if len(flat) > 1 else flat[0]  # [n, O_model]
        if self.output_projection is not None:
            out = tf.matmul(out, tf.cast(self.output_projection, self.dtype))  # [n, O]
        return out

    def unflatten_outputs(self, flat):
        """Reshape [N, O_model] back to the model's output structure (list, dict, ...)."""
        pieces = tf.split(flat, self._output_sizes, axis=1)
        shaped = [tf.reshape(p, [-1, *s]) for p, s in zip(pieces, self._output_shapes)]
        return keras.tree.pack_sequence_as(self._output_structure, shaped)

    # ------------------------------------------------------------------ products

    # Each product runs on this device, or sharded over the replicas when the
    # FunctionalModel was built inside a multi-replica `tf.distribute` scope.

    def outputs(self, x):
        """Return f(θ₀, x) → [N, O], streamed over chunks."""
        if self._shards_now():
            return self._sharded.outputs(x)
        return self._single_device_outputs(x)

    def jvp(self, x, tangents):
        """Return J(x) v → [N, O] for a flat tangent vector v [P] (one forward-mode pass)."""
        # A tf.Variable argument would stay captured in the trace; pass its value.
        tangents = tf.convert_to_tensor(tangents)
        if self._shards_now():
            return self._sharded.jvp(x, tangents)
        return self._single_device_jvp(x, tangents)

    def jvp_batched(self, x, tangents):
        """Return J(x) V → [R, N, O] for tangents [R, P].

        With many right-hand sides (R ≥ `JACOBIAN_PRODUCT_MIN_RHS`·O) each chunk's
        Jacobian [n, O, P] is formed (about O reverse passes) and multiplied with
        V in one matrix product; otherwise the R forward-mode passes are
        vectorized with `tf.vectorized_map`.
        """
        # A tf.Variable argument would stay captured in the trace; pass its value.
        tangents = tf.convert_to_tensor(tangents)
        if self._shards_now():
            return self._sharded.jvp_batched(x, tangents)
        return self._single_device_jvp_batched(x, tangents)

    def vjp(self, x, cotangents):
        """Return J(x)ᵀ u → [P] for cotangents u [N, O] (one reverse-mode pass)."""
        # A tf.Variable argument would stay captured in the trace; pass its value.
        cotangents = tf.convert_to_tensor(cotangents)
        if self._shards_now():
            return self._sharded.vjp(x, cotangents)
        return self._single_device_vjp(x, cotangents)

    def vjp_batched(self, x, cotangents):
        """Return J(x)ᵀ U → [R, P] for cotangents [R, N, O] (see `jvp_batched` for the method)."""
        # A tf.Variable argument would stay captured in the trace; pass its value.
        cotangents = tf.convert_to_tensor(cotangents)
        if self._shards_now():
            return self._sharded.vjp_batched(x, cotangents)
        return self._single_device_vjp_batched(x, cotangents)

    def jacobian_sq_norms(self, x):
        """Return ‖J(x)[n, o, :]‖² → [N, O], the exact diagonal of J Jᵀ."""
        if self._shards_now():
            return self._sharded.jacobian_sq_norms(x)
        return self._single_device_jacobian_sq_norms(x)

    @property
    def is_sharded(self):
        """Whether products are sharded over the replicas of a tf.distribute strategy."""
        return self._sharded is not None

    def _shards_now(self):
        # Inside a replica of the strategy (e.g. Keras `predict` under MirroredStrategy)
        # the caller has already split the batch, so each replica runs its products alone.
        return self._sharded is not None and not distribute.in_replica_context()

    def shared_seed(self):
        """Return a random int seed equal on all replicas when sharded, else None."""
        return None if self._sharded is None else self._sharded.shared_seed()

    @property
    def local(self):
        """This model's single-device products, as used by each replica's shard."""
        return _SingleDeviceProducts(self)

    def _single_device_outputs(self, x):
        return self._outputs_fn(x)

    def _single_device_jvp(self, x, tangents):
        return self._jvp_fn(x, tangents)

    def _single_device_jvp_batched(self, x, tangents):
        if self._use_jacobian_products(tangents):
            return self._jvp_jacobian_fn(x, tangents)
        return self._jvp_batched_fn(x, tangents)

    def _single_device_vjp(self, x, cotangents):
        return self._vjp_fn(x, cotangents)

    def _single_device_vjp_batched(self, x, cotangents):
        if self._use_jacobian_products(cotangents):
            return self._vjp_jacobian_fn(x, cotangents)
        return self._vjp_batched_fn(x, cotangents)

    def ntk_product(self, x, cotangents):
        """Return J(x) J(x)ᵀ u → [N, O] for cotangents u [N, O].

        When N is known and at most `batch_size`, one forward pass serves both
        products. The reverse pass u ↦ Jᵀ u is linear in u, so its gradient with
        respect to u, taken with output gradient w = Jᵀ u, is J w. The cost is one
        forward, one reverse and one second-order reverse pass. With several chunks,
        Jᵀ u needs every chunk before J w can start, so the product is a VJP
        followed by a forward-mode JVP, each with its own forward pass.
        """
        if self._shards_now():
            return self.jvp(x, self.vjp(x, cotangents))
        if self._fits_one_chunk(x):
            return self._ntk_fused_fn(x, cotangents)
        return self._jvp_fn(x, self._vjp_fn(x, cotangents))

    def ntk_product_batched(self, x, cotangents):
        """Return J(x) J(x)ᵀ U → [R, N, O] for cotangents U [R, N, O] (see `ntk_product`).

        With many right-hand sides (see `jvp_batched`) the product goes through
        per-chunk Jacobians, formed once when all N examples fit in one Jacobian
        chunk and twice otherwise.
        """
        if self._shards_now():
            return self.jvp_batched(x, self.vjp_batched(x, cotangents))
        if self._use_jacobian_products(cotangents):
            n = self.num_examples(x)
            streamed = isinstance(x, _streaming.StreamedInputs)
            if not streamed and isinstance(n, int) and 0 < n <= self._jacobian_rows():
                return self._ntk_jacobian_fn(x, cotangents)
            return self._jvp_jacobian_fn(x, self._vjp_jacobian_fn(x, cotangents))
        if self._fits_one_chunk(x):
            return self._ntk_fused_batched_fn(x, cotangents)
        return self._jvp_batched_fn(x, self._vjp_batched_fn(x, cotangents))

    def jacobian(self, x):
        """Return the dense Jacobian [N, O, P], vectorized per chunk with `tape.jacobian`."""
        return self._jacobian_fn(x)

    def _single_device_jacobian_sq_norms(self, x):
        return self._jacobian_sq_norms_fn(x)

    # ------------------------------------------------------------------ compiled bodies

    def _compile(self):
        # TensorFlow counts traces per Python code object, so the bound methods of
        # several FunctionalModel instances would share one count and set off its
        # retracing warning. A `functools.partial` has no code object and gets its own.
        compile_fn = lambda fn: tf.function(functools.partial(fn), reduce_retracing=True)  # noqa: E731
        self._outputs_fn = compile_fn(self._outputs_impl)
        self._jvp_fn = compile_fn(self._jvp_impl)
        self._jvp_batched_fn = compile_fn(self._jvp_batched_impl)
        self._vjp_fn = compile_fn(self._vjp_impl)
        self._vjp_batched_fn = compile_fn(self._vjp_batched_impl)
        self._jacobian_fn = compile_fn(self._jacobian_impl)
        self._jacobian_sq_norms_fn = compile_fn(self._jacobian_sq_norms_impl)
        self._jvp_jacobian_fn = compile_fn(self._jvp_jacobian_impl)
        self._ntk_jacobian_fn = compile_fn(self._ntk_jacobian_impl)
        self._vjp_jacobian_fn = compile_fn(self._vjp_jacobian_impl)
        self._ntk_fused_fn = compile_fn(self._ntk_fused_impl)
        self._ntk_fused_batched_fn = compile_fn(self._ntk_fused_batched_impl)

    def _outputs_impl(self, x):
        return self._concat_chunks(
            lambda xc, start, stop: self.apply(self.params0, xc), x, self.batch_size,
            [self.num_outputs],
        )

    def _jvp_chunk(self, xc, tangents):
        primals = [tf.convert_to_tensor(p) for p in self.params0]
        with tf.autodiff.ForwardAccumulator(primals, self.unflatten(tangents)) as acc:
            out = self.apply(primals, xc)
        jvp = acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return jvp  # [n, O]

    def _jvp_impl(self, x, tangents):
        tangents = tf.cast(tangents, self.dtype)
        return self._concat_chunks(
            lambda xc, start, stop: self._jvp_chunk(xc, tangents), x, self.batch_size,
            [self.num_outputs],
        )

    def _jvp_batched_impl(self, x, tangents):
        tangents = tf.cast(tangents, self.dtype)

        def chunk(xc, start, stop):
            jvps = tf.vectorized_map(lambda t: self._jvp_chunk(xc, t), tangents)
            return tf.transpose(jvps, [1, 0, 2])  # [n, R, O]

        trailing_shape = [tf.shape(tangents)[0], self.num_outputs]
        out = self._concat_chunks(chunk, x, self.batch_size, trailing_shape)  # [N, R, O]
        return tf.transpose(out, [1, 0, 2])  # [R, N, O]

    def _vjp_impl(self, x, cotangents):
        cotangents = tf.cast(cotangents, self.dtype)

        def chunk(xc, start, stop):
            primals = [tf.convert_to_tensor(p) for p in self.params0]
            with tf.GradientTape() as tape:
                tape.watch(primals)
                out = self.apply(primals, xc)
            grads = tape.gradient(
                out, primals, output_gradients=cotangents[start:stop],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            return grads

        zeros = [tf.zeros(s, self.dtype) for s in self.variable_shapes]
        total = self._sum_chunks(chunk, x, zeros, _add_gradient)
        return self.flatten(total)  # [P]

    def _vjp_batched_impl(self, x, cotangents):
        cotangents = tf.cast(cotangents, self.dtype)
        num_rhs = tf.shape(cotangents)[0]

        def chunk(xc, start, stop):
            primals = [tf.convert_to_tensor(p) for p in self.params0]
            with tf.GradientTape() as tape:
                tape.watch(primals)
                out = self.apply(primals, xc)  # [n, O]
                # One scalar per right-hand side: Σ_{n,o} f[n, o] U[r, n, o].
                targets = tf.einsum("no,rno->r", out, cotangents[:, start:stop])
            jac = tape.jacobian(
                targets, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            return [tf.reshape(j, [num_rhs, size]) for j, size in zip(jac, self._sizes)]

        zeros = [tf.zeros([num_rhs, s], self.dtype) for s in self._sizes]
        total = self._sum_chunks(chunk, x, zeros, lambda acc, g: acc + g)
        return tf.concat(total, axis=1)  # [R, P]

    def _ntk_fused_impl(self, x, cotangents):
        cotangents = tf.cast(cotangents, self.dtype)  # [N, O]
        primals = [tf.convert_to_tensor(p) for p in self.params0]
        with tf.GradientTape() as outer:
            outer.watch(cotangents)
            with tf.GradientTape() as inner:
                inner.watch(primals)
                out = self.apply(primals, x)  # [N, O]
            # u -> Jᵀ u, recorded by the outer tape (densified: the result is [P] anyway).
            grads = inner.gradient(
                out, primals, output_gradients=cotangents,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            grads = [tf.convert_to_tensor(g) for g in grads]
        # Jᵀ u -> J Jᵀ u, the transpose of the linear map u -> Jᵀ u applied to Jᵀ u.
        return outer.gradient(
            grads, cotangents, output_gradients=[tf.stop_gradient(g) for g in grads],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    def _ntk_fused_batched_impl(self, x, cotangents):
        cotangents = tf.cast(cotangents, self.dtype)  # [R, N, O]
        primals = [tf.convert_to_tensor(p) for p in self.params0]
        with tf.GradientTape() as outer:
            outer.watch(cotangents)
            with tf.GradientTape() as inner:
                inner.watch(primals)
                out = self.apply(primals, x)  # [N, O]
                targets = tf.einsum("no,rno->r", out, cotangents)  # [R]
            # U -> Jᵀ U, one row of per-variable gradients for each right-hand side.
            grads = inner.jacobian(
                targets, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
        # Jᵀ U -> J Jᵀ U; row r of the result only depends on row r of U.
        return outer.gradient(
            grads, cotangents, output_gradients=[tf.stop_gradient(g) for g in grads],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )  # [R, N, O]

    def _fits_one_chunk(self, x):
        if isinstance(x, _streaming.StreamedInputs):
            return False
        n = self.num_examples(x)
        return isinstance(n, int) and 0 < n <= self.batch_size

    def _jacobian_chunk(self, xc):
        """Return the per-example Jacobians [n, O, P] of one chunk.

        Each example is differentiated on its own inside `tf.vectorized_map`, so
        the cost is about O reverse passes over the chunk. Differentiating the
        whole chunk's outputs [n, O] at once would instead carry n·O cotangents
        through every example.
        """
        primals = [tf.convert_to_tensor(p) for p in self.params0]

        def example_jacobian(example):
            batch = tf.nest.map_structure(lambda t: t[None], example)
            with tf.GradientTape() as tape:
                tape.watch(primals)
                out = self.apply(primals, batch)[0]  # [O]
            jac = tape.jacobian(
                out, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            blocks = [tf.reshape(j, [self.num_outputs, size]) for j, size in zip(jac, self._sizes)]
            return tf.concat(blocks, axis=1)  # [O, P]

        return tf.vectorized_map(example_jacobian, xc)  # [n, O, P]

    def _jvp_jacobian_impl(self, x, tangents):
        tangents = tf.cast(tangents, self.dtype)  # [R, P]

        def chunk(xc, start, stop):
            return tf.einsum("nop,rp->nro", self._jacobian_chunk(xc), tangents)  # [n, R, O]

        trailing_shape = [tf.shape(tangents)[0], self.num_outputs]
        out = self._concat_chunks(chunk, x, self._jacobian_rows(), trailing_shape)  # [N, R, O]
        return tf.transpose(out, [1, 0, 2])  # [R, N, O]

    def _vjp_jacobian_impl(self, x, cotangents):
        cotangents = tf.cast(cotangents, self.dtype)  # [R, N, O]

        def chunk(xc, start, stop):
            jac = self._jacobian_chunk(xc)  # [n, O, P]
            return [tf.einsum("rno,nop->rp", cotangents[:, start:stop], jac)]

        zeros = [tf.zeros([tf.shape(cotangents)[0], self.num_parameters], self.dtype)]
        total = self._sum_chunks(chunk, x, zeros, lambda acc, g: acc + g, self._jacobian_rows())
        return total[0]  # [R, P]

    def _ntk_jacobian_impl(self, x, cotangents):
        jac = self._jacobian_chunk(x)  # [N, O, P]
        tangents = tf.einsum("rno,nop->rp", tf.cast(cotangents, self.dtype), jac)  # [R, P]
        return tf.einsum("nop,rp->rno", jac, tangents)  # [R, N, O]

    def _use_jacobian_products(self, vectors):
        num_rhs = vectors.shape[0]
        return num_rhs is not None and num_rhs >= JACOBIAN_PRODUCT_MIN_RHS * self.num_outputs

    def _jacobian_impl(self, x):
        return self._concat_chunks(
            lambda xc, start, stop: self._jacobian_chunk(xc), x, self._jacobian_rows(),
            [self.num_outputs, self.num_parameters],
        )

    def _jacobian_sq_norms_impl(self, x):
        return self._concat_chunks(
            lambda xc, start, stop: tf.reduce_sum(tf.square(self._jacobian_chunk(xc)), -1),
            x,
            self._jacobian_rows(),
            [self.num_outputs],
        )

    def _jacobian_rows(self):
        row_bytes = self.num_outputs * self.num_parameters * self.dtype.size
        return int(max(1, min(self.batch_size, JACOBIAN_CHUNK_BYTES // max(row_bytes, 1))))

    # ------------------------------------------------------------------ chunk loops

    def _concat_chunks(self, fn, x, chunk_size, trailing_shape):
        """Concatenate fn(x[start:stop], start, stop) over all chunks (see `_chunks.concat_chunks`)."""
        return _chunks.concat_chunks(fn, x, chunk_size, trailing_shape, self.dtype)

    def _sum_chunks(self, fn, x, zeros, add, chunk_size=None):
        """Sum fn(x[start:stop], start, stop) over chunks, by default of `batch_size` examples."""
        chunk_size = chunk_size or self.batch_size
        return _chunks.sum_chunks(fn, x, zeros, add, chunk_size)

    def _infer_output_shapes(self):
        """Return the output structure and per-example output shapes.

        One example of zeros goes through the model when the input shape is fully
        known; otherwise a Functional model's symbolic outputs are used.
        """
        example = _model_checks.example_inputs(self._input_specs, self.dtype)
        if example is None:
            outputs = _model_checks.symbolic_outputs(self._model)
        else:
            mapping = list(zip(self._linearized_vars, self.params0))
            mapping += list(zip(self._fixed_vars, self.fixed_values))
            with keras.StatelessScope(state_mapping=mapping):
                outputs = self._model(example, training=False)
        shapes = [tuple(t.shape[1:]) for t in keras.tree.flatten(outputs)]
        return outputs, shapes


class _SingleDeviceProducts:
    """Single-device products of a FunctionalModel, bypassing any sharding."""

    def __init__(self, functional):
        self.outputs = functional._single_device_outputs
        self.jvp = functional._single_device_jvp
        self.jvp_batched = functional._single_device_jvp_batched
        self.vjp = functional._single_device_vjp
        self.vjp_batched = functional._single_device_vjp_batched
        self.jacobian_sq_norms = functional._single_device_jacobian_sq_norms


def _snapshot(variable):
    """Copy a Keras variable's value into a new non-trainable tf.Variable."""
    value = tf.identity(tf.convert_to_tensor(variable.value))
    return tf.Variable(value, trainable=False, name=variable.name.replace("/", "_") + "_snapshot")


def _add_gradient(total, gradient):
    """Add a dense or IndexedSlices gradient to a dense total without densifying slices."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.tensor_scatter_nd_add(
            total, tf.expand_dims(gradient.indices, -1), gradient.values
        )
    return total + gradient


def _projection_matrix(projection, num_model_outputs):
    """Return the projection as a float matrix [O_model, O] or None."""
    if projection is None:
        return None
    if isinstance(projection, (int, np.integer)) and not isinstance(projection, bool):
        num_targets = _checks.check_positive_int("output_projection", projection)
        generator = np.random.default_rng(0)
        return generator.normal(
            0.0, 1.0 / np.sqrt(num_model_outputs), (num_model_outputs, num_targets)
        )
    matrix = np.asarray(projection)
    if matrix.dtype.kind not in "fiu":
        raise TypeError(
            "`output_projection` must be an int or a float matrix [O_model, O]; "
            f"received {type(projection).__name__} of dtype {matrix.dtype}."
        )
    if matrix.ndim != 2 or matrix.shape[0] != num_model_outputs:
        raise ValueError(
            f"`output_projection` must be a matrix [O_model, O] with O_model="
            f"{num_model_outputs} (flattened model outputs); received shape {matrix.shape}."
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("`output_projection` must be finite; received NaN or Inf entries.")
    return matrix.astype(np.float64)
