"""Data-sharded JVP and VJP products under a `tf.distribute` strategy.

A `LinearizedModel` built inside `strategy.scope()` computes every product with
`ShardedProducts`: replica i takes the i-th contiguous shard of the examples,
computes its JVP or VJP (still streamed in chunks of `batch_size`), and the
results are combined with the replica context's collectives:

- parameter-space results (VJP, [P] or [R, P]) are summed with `all_reduce`;
- output-space results (JVP and outputs, [N, O] or [R, N, O]) are concatenated
  with `all_gather`, each shard padded to the same length first.

MirroredStrategy (several GPUs or logical CPU devices on one machine) and
MultiWorkerMirroredStrategy (several machines) share this code path, because
both provide `strategy.run` and the replica-context collectives used here.
"""

import tensorflow as tf

__all__ = ["ShardedProducts", "active_strategy"]


def active_strategy():
    """Return the strategy of the enclosing `strategy.scope()` if it has > 1 replica."""
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    return strategy if strategy.num_replicas_in_sync > 1 else None


class ShardedProducts:
    """Products of a `FunctionalModel` sharded over the replicas of `strategy`.

    Every method takes the full inputs, as the single-device methods of
    `FunctionalModel` do, and returns the full result on each replica's host.
    Results equal the single-device ones up to the order of floating-point
    sums across replicas.

    Args:
        functional: the `tf_linntk.autodiff.FunctionalModel`.
        strategy: a `tf.distribute.Strategy` with more than one replica.
    """

    def __init__(self, functional, strategy):
        self.functional = functional
        self.strategy = strategy
        self._outputs_fn = tf.function(self._outputs_impl, reduce_retracing=True)
        self._jvp_fn = tf.function(self._jvp_impl, reduce_retracing=True)
        self._jvp_batched_fn = tf.function(self._jvp_batched_impl, reduce_retracing=True)
        self._vjp_fn = tf.function(self._vjp_impl, reduce_retracing=True)
        self._vjp_batched_fn = tf.function(self._vjp_batched_impl, reduce_retracing=True)
        self._sq_norms_fn = tf.function(self._sq_norms_impl, reduce_retracing=True)

    def outputs(self, x):
        """Return f(θ₀, x) → [N, O]."""
        return self._outputs_fn(x)

    def jvp(self, x, tangents):
        """Return J(x) v → [N, O] for tangents [P]."""
        return self._jvp_fn(x, tangents)

    def jvp_batched(self, x, tangents):
        """Return J(x) V → [R, N, O] for tangents [R, P]."""
        return self._jvp_batched_fn(x, tangents)

    def vjp(self, x, cotangents):
        """Return J(x)ᵀ u → [P] for cotangents [N, O]."""
        return self._vjp_fn(x, cotangents)

    def vjp_batched(self, x, cotangents):
        """Return J(x)ᵀ U → [R, P] for cotangents [R, N, O]."""
        return self._vjp_batched_fn(x, cotangents)

    def jacobian_sq_norms(self, x):
        """Return ‖J(x)[n, o, :]‖² → [N, O]."""
        return self._sq_norms_fn(x)

    # ------------------------------------------------------------------ bodies

    def _outputs_impl(self, x):
        return self._gather(
            x, lambda xs, start, stop: self.functional.local.outputs(xs), axis=0, rank=2
        )

    def _jvp_impl(self, x, tangents):
        return self._gather(
            x, lambda xs, start, stop: self.functional.local.jvp(xs, tangents), axis=0, rank=2
        )

    def _jvp_batched_impl(self, x, tangents):
        return self._gather(
            x,
            lambda xs, start, stop: self.functional.local.jvp_batched(xs, tangents),
            axis=1,
            rank=3,
        )

    def _sq_norms_impl(self, x):
        return self._gather(
            x,
            lambda xs, start, stop: self.functional.local.jacobian_sq_norms(xs),
            axis=0,
            rank=2,
        )

    def _vjp_impl(self, x, cotangents):
        return self._reduce(
            x, lambda xs, start, stop: self.functional.local.vjp(xs, cotangents[start:stop])
        )

    def _vjp_batched_impl(self, x, cotangents):
        return self._reduce(
            x,
            lambda xs, start, stop: self.functional.local.vjp_batched(
                xs, cotangents[:, start:stop]
            ),
        )

    # ------------------------------------------------------------------ collectives

    def _gather(self, x, shard_fn, axis, rank):
        """Concatenate shard_fn's rank-`rank` results over the shards along `axis`."""
        n = tf.shape(tf.nest.flatten(x)[0])[0]

        def replica_fn():
            context = tf.distribute.get_replica_context()
            start, stop, shard_size = _shard_bounds(context, n)
            x_shard = tf.nest.map_structure(lambda t: t[start:stop], x)
            result = shard_fn(x_shard, start, stop)
            # Pad every shard to the same length so all_gather can stack them;
            # padding only ever follows the last real example.
            padding = [[0, 0]] * rank
            padding[axis] = [0, shard_size - (stop - start)]
            result = tf.pad(result, padding)
            return context.all_gather(result, axis=axis)

        gathered = self.strategy.run(replica_fn)
        result = self.strategy.experimental_local_results(gathered)[0]
        return tf.gather(result, tf.range(n), axis=axis)

    def _reduce(self, x, shard_fn):
        """Sum shard_fn over the replicas' shards."""
        n = tf.shape(tf.nest.flatten(x)[0])[0]

        def replica_fn():
            context = tf.distribute.get_replica_context()
            start, stop, _ = _shard_bounds(context, n)
            x_shard = tf.nest.map_structure(lambda t: t[start:stop], x)
            return context.all_reduce(tf.distribute.ReduceOp.SUM, shard_fn(x_shard, start, stop))

        reduced = self.strategy.run(replica_fn)
        return self.strategy.experimental_local_results(reduced)[0]


def _shard_bounds(context, n):
    """Return (start, stop, shard_size) of this replica's contiguous shard of n examples."""
    num_replicas = context.num_replicas_in_sync
    shard_size = (n + num_replicas - 1) // num_replicas
    replica = tf.cast(context.replica_id_in_sync_group, n.dtype)
    start = tf.minimum(replica * shard_size, n)
    stop = tf.minimum(start + shard_size, n)
    return start, stop, shard_size
