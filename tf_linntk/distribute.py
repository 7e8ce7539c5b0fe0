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

import functools

import numpy as np
import tensorflow as tf

from tf_linntk import _streaming

__all__ = ["ShardedProducts", "active_strategy", "in_replica_context"]


def active_strategy():
    """Return the strategy of the enclosing `strategy.scope()` if it has > 1 replica."""
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    return strategy if strategy.num_replicas_in_sync > 1 else None


def in_replica_context():
    """Return whether the caller runs inside one replica of a `tf.distribute` strategy."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


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
        # A partial has no code object, so each instance gets its own retracing count.
        compile_fn = lambda fn: tf.function(functools.partial(fn), reduce_retracing=True)  # noqa: E731
        self._outputs_fn = compile_fn(self._outputs_impl)
        self._jvp_fn = compile_fn(self._jvp_impl)
        self._jvp_batched_fn = compile_fn(self._jvp_batched_impl)
        self._vjp_fn = compile_fn(self._vjp_impl)
        self._vjp_batched_fn = compile_fn(self._vjp_batched_impl)
        self._sq_norms_fn = compile_fn(self._sq_norms_impl)
        self._shared_seed_fn = compile_fn(self._shared_seed_impl)

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

    def shared_seed(self):
        """Return a random int seed in [0, 2**31 - 1) drawn on replica 0 and equal on all.

        Under MultiWorkerMirroredStrategy each worker is its own process, and
        random draws that differ between workers would give them different
        solver runs (e.g. Lanczos ranks), whose collectives then mismatch.
        """
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        return int(self._shared_seed_fn(tf.constant(seed, tf.int64)))

    def reduce_shards(self, x, shard_fn, chunk_size=None):
        """Sum shard_fn(x_shard, start, stop) over the replicas with an all-reduce.

        Replica i passes its contiguous shard x[start:stop] (possibly empty) and
        the shard's bounds, so that shard_fn can slice other per-example tensors
        to match. shard_fn returns a tensor of the same shape on every replica,
        e.g. a parameter-space sum [P] or [R, P]. Call it inside a `tf.function`.

        With `chunk_size`, the shards consist of whole chunks of that many
        examples, and streamed inputs always split into whole batches. Without
        it, inputs in memory split into ⌈N/R⌉ examples each. Whole chunks let a
        shard_fn that streams in chunks of `chunk_size` compute exactly the
        single-device chunks. Finite differences need this, because they divide
        the rounding error of each chunk's forward pass by a step ε ≪ 1, and that
        error depends on which rows share a chunk. The cost is balance, because
        replicas differ by up to one chunk, and with fewer chunks than replicas
        some replicas get none.
        """

        def replica_fn():
            context = tf.distribute.get_replica_context()
            if chunk_size is None or isinstance(x, _streaming.StreamedInputs):
                # Streamed shards are whole batches, which the single-device pass
                # splits into the same chunks.
                x_shard, start, stop = _shard(x, context)
            else:
                start, stop = _chunk_aligned_bounds(context, _num_examples(x), chunk_size)
                x_shard = tf.nest.map_structure(lambda t: t[start:stop], x)
            return context.all_reduce(tf.distribute.ReduceOp.SUM, shard_fn(x_shard, start, stop))

        reduced = self.strategy.run(replica_fn)
        return self.strategy.experimental_local_results(reduced)[0]

    # ------------------------------------------------------------------ bodies

    def _shared_seed_impl(self, seed):
        def replica_fn():
            context = tf.distribute.get_replica_context()
            first = tf.equal(context.replica_id_in_sync_group, 0)
            return context.all_reduce(
                tf.distribute.ReduceOp.SUM, tf.where(first, seed, tf.zeros_like(seed))
            )

        return self.strategy.experimental_local_results(self.strategy.run(replica_fn))[0]

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
        return self.reduce_shards(
            x, lambda xs, start, stop: self.functional.local.vjp(xs, cotangents[start:stop])
        )

    def _vjp_batched_impl(self, x, cotangents):
        return self.reduce_shards(
            x,
            lambda xs, start, stop: self.functional.local.vjp_batched(
                xs, cotangents[:, start:stop]
            ),
        )

    # ------------------------------------------------------------------ collectives

    def _gather(self, x, shard_fn, axis, rank):
        """Concatenate shard_fn's rank-`rank` results over the shards along `axis`."""
        n = _num_examples(x)
        num_replicas = self.strategy.num_replicas_in_sync
        starts, stops = _shard_plan(x, num_replicas)[:2]
        shard_size = tf.reduce_max(stops - starts)

        def replica_fn():
            context = tf.distribute.get_replica_context()
            x_shard, start, stop = _shard(x, context)
            result = shard_fn(x_shard, start, stop)
            # Pad every shard to the same length so all_gather can stack them;
            # padding only ever follows a shard's last real example.
            padding = [[0, 0]] * rank
            padding[axis] = [0, shard_size - (stop - start)]
            result = tf.pad(result, padding)
            return context.all_gather(result, axis=axis)

        gathered = self.strategy.run(replica_fn)
        result = self.strategy.experimental_local_results(gathered)[0]
        # Example e sits in the first shard whose stop exceeds e, after its padded predecessors.
        examples = tf.range(n)
        replica = tf.searchsorted(stops, examples, side="right")
        rows = replica * shard_size + examples - tf.gather(starts, replica)
        return tf.gather(result, rows, axis=axis)


def _num_examples(x):
    if isinstance(x, _streaming.StreamedInputs):
        return x.num_examples
    return tf.shape(tf.nest.flatten(x)[0], out_type=tf.int32)[0]


def _shard_plan(x, num_replicas):
    """Return int32 (starts [R], stops [R], first_batches [R], stop_batches [R]) of all shards.

    Inputs in memory split into R contiguous shards of ⌈N/R⌉ examples (the
    batch entries are None). Streamed inputs split into R contiguous runs of
    ⌈B/R⌉ whole batches, so each replica reads its own batches (and skips over
    the ones before them).
    """
    replicas = tf.range(num_replicas, dtype=tf.int32)
    if not isinstance(x, _streaming.StreamedInputs):
        n = _num_examples(x)
        shard_size = (n + num_replicas - 1) // num_replicas
        starts = tf.minimum(replicas * shard_size, n)
        return starts, tf.minimum(starts + shard_size, n), None, None
    num_batches = x.num_batches()
    batches_per_shard = (num_batches + num_replicas - 1) // num_replicas
    first_batches = tf.minimum(replicas * batches_per_shard, num_batches)
    stop_batches = tf.minimum(first_batches + batches_per_shard, num_batches)
    starts = tf.gather(x.boundaries, first_batches)
    stops = tf.gather(x.boundaries, stop_batches)
    return starts, stops, first_batches, stop_batches


def _shard(x, context):
    """Return (x_shard, start, stop) of this replica's contiguous shard of x."""
    starts, stops, first_batches, stop_batches = _shard_plan(x, context.num_replicas_in_sync)
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    start, stop = starts[replica], stops[replica]
    if first_batches is None:
        return tf.nest.map_structure(lambda t: t[start:stop], x), start, stop
    return x.shard(first_batches[replica], stop_batches[replica]), start, stop


def _shard_bounds(context, n):
    """Return (start, stop, shard_size) of this replica's contiguous shard of n examples."""
    num_replicas = context.num_replicas_in_sync
    shard_size = (n + num_replicas - 1) // num_replicas
    replica = tf.cast(context.replica_id_in_sync_group, n.dtype)
    start = tf.minimum(replica * shard_size, n)
    stop = tf.minimum(start + shard_size, n)
    return start, stop, shard_size


def _chunk_aligned_bounds(context, n, chunk_size):
    """Return (start, stop) of this replica's shard of n examples, in whole chunks."""
    num_chunks = (n + chunk_size - 1) // chunk_size
    first_chunk, stop_chunk, _ = _shard_bounds(context, num_chunks)
    return tf.minimum(first_chunk * chunk_size, n), tf.minimum(stop_chunk * chunk_size, n)
