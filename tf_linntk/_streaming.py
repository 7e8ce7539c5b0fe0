"""Model inputs streamed from a `tf.data.Dataset`, read again on every pass.

A product over streamed inputs (JVP, VJP, Fisher product, ...) is one pass over
the dataset. A `tf.while_loop` pulls batches from an iterator and runs the
product's chunk body on each. Memory then contains one batch of inputs, so the
number of examples is bounded by the dataset's storage. Every pass recounts the examples and
recomputes a fingerprint of the inputs in order, and a pass that differs from
the first one (another count, reshuffled or randomly augmented examples) fails.

Elements follow the Keras convention for datasets: a tuple `(x, y)`,
`(x, y, sample_weight)` or `(x,)` carries the inputs in its first item, and any
other element is the inputs itself (so a two-input model takes `((a, b), y)`).
"""

import contextlib
import functools

import numpy as np
import tensorflow as tf

__all__ = [
    "StreamedInputs",
    "is_dataset",
    "is_streamed",
    "read_dataset",
    "run_pass",
    "translate_pass_errors",
    "translates_pass_errors",
]

# Start of the message of a pass that does not repeat the first one. Public
# entry points turn the runtime error carrying it into a ValueError.
PASS_MISMATCH = "A tf.data.Dataset yielded different examples on this pass than on its first pass"

PASS_ADVICE = (
    "Each product reads the dataset again, so it must yield the same examples in the "
    "same order on every pass: use `shuffle(..., reshuffle_each_iteration=False)` or "
    "shuffle before `adapt`, keep a deterministic order (no `deterministic=False` in "
    "`map` or `interleave`), and no random augmentation."
)

# Relative tolerance of the input fingerprint between passes. The sums run in
# float64 over the same values, only grouped into batches differently.
_FINGERPRINT_RTOL = 1e-10


class StreamedInputs(tf.experimental.ExtensionType):
    """Model inputs read from a dataset on every pass over the data.

    An extension type, so a `tf.function` traces once per dataset structure and
    not once per dataset.

    The fingerprint of examples i ∈ [a, b) is Σᵢ (i + 1)·Σⱼ wⱼ·xᵢⱼ over their
    flattened input entries xᵢⱼ with fixed weights wⱼ ∈ [0.5, 1.5] that differ
    from entry to entry. It changes when examples move, and when entries move
    within an example (e.g. a flipped image).

    Attributes:
        dataset: `tf.data.Dataset` of converted input structures, the batches
            whose bounds `boundaries` lists.
        num_examples: int32 scalar Tensor, N counted on the first pass.
        boundaries: int32 Tensor [B + 1], the position of each batch's first
            example and N at the end, relative to `first_example`.
        fingerprint_prefix: float64 Tensor [B + 1], the fingerprint of the
            examples before each boundary, from the first pass.
        scale_prefix: float64 Tensor [B + 1], the same sums of absolute values,
            the scale of the check.
        first_example: int32 scalar Tensor, the position of this input's first
            example in the whole dataset (nonzero for a replica's shard).
    """

    dataset: tf.data.Dataset
    num_examples: tf.Tensor
    boundaries: tf.Tensor
    fingerprint_prefix: tf.Tensor
    scale_prefix: tf.Tensor
    first_example: tf.Tensor

    def static_num_examples(self):
        """Return N as a Python int, or None inside a graph where it is not constant."""
        value = tf.get_static_value(self.num_examples)
        return None if value is None else int(value)

    def num_batches(self):
        """Return the number of batches B of one pass as an int32 scalar Tensor."""
        return tf.shape(self.boundaries, out_type=tf.int32)[0] - 1

    def shard(self, first_batch, stop_batch):
        """Return the streamed inputs of batches [first_batch, stop_batch).

        Each pass still reads the batches before the shard. The shard's passes
        are checked against the first pass's fingerprint of the same examples.
        """
        dataset = self.dataset.skip(tf.cast(first_batch, tf.int64))
        dataset = dataset.take(tf.cast(stop_batch - first_batch, tf.int64))
        boundaries = self.boundaries[first_batch:stop_batch + 1]
        return StreamedInputs(
            dataset,
            boundaries[-1] - boundaries[0],
            boundaries - boundaries[0],
            self.fingerprint_prefix[first_batch:stop_batch + 1],
            self.scale_prefix[first_batch:stop_batch + 1],
            self.first_example + boundaries[0],
        )


def is_dataset(x):
    """Return whether `x` is a `tf.data.Dataset`."""
    return isinstance(x, tf.data.Dataset)


def is_streamed(x):
    """Return whether `x` is converted streamed inputs."""
    return isinstance(x, StreamedInputs)


def read_dataset(dataset, convert, batch_size, name="x", with_targets=False):
    """Check `dataset`, read it once and return its streamed inputs (and targets).

    The first pass converts and validates every batch of inputs with `convert`
    (structure, shapes, dtypes, finite values), counts the examples, computes the
    fingerprint and, with `with_targets`, keeps the targets in memory.

    Args:
        dataset: finite `tf.data.Dataset` of batches (see the module docstring).
        convert: function (x_batch, name) → converted input structure.
        batch_size: number of examples per batch in later passes.
        name: argument name for error messages.
        with_targets: whether elements must be (x, y) pairs whose y is returned.

    Returns:
        (StreamedInputs, y) with y the concatenated targets, or None without
        `with_targets`.

    Raises:
        ValueError: if the dataset is infinite or empty, or its elements do not
            match the model's inputs (or carry no targets when needed).
    """
    _check_eager(name)
    _check_finite_cardinality(dataset, name)
    is_tuple = isinstance(dataset.element_spec, tuple)
    _check_element_spec(dataset.element_spec, name, with_targets)

    # One eager pass: validate, count, fingerprint and collect the targets.
    reference, targets, batch_sizes, parts, abs_parts = None, [], [], [], []
    num_examples = 0
    for element in dataset:
        batch_x, batch_y = _split_element(element, is_tuple)
        batch_x = _convert_batch(convert, batch_x, name)
        reference = batch_x if reference is None else reference
        part, abs_part = _example_fingerprints(batch_x, num_examples)
        parts.append(part.numpy())
        abs_parts.append(abs_part.numpy())
        batch_sizes.append(int(_batch_size(batch_x)))
        num_examples += batch_sizes[-1]
        if with_targets:
            targets.append(batch_y)
    if num_examples == 0:
        raise ValueError(f"`{name}` must contain at least one example; received an empty dataset.")

    # Later passes cast like the first one. Batches of fixed-shape inputs are
    # regrouped into `batch_size` examples; variable shapes (e.g. from
    # `padded_batch`) keep the dataset's batches, which rebatching could not merge.
    def select_inputs(*args):
        batch_x, _ = _split_element(args if is_tuple else args[0], is_tuple)
        return _cast_like(batch_x, reference)

    inputs = dataset.map(select_inputs)
    if _has_fixed_example_shapes(inputs.element_spec):
        inputs = inputs.rebatch(batch_size)
        boundaries = list(range(0, num_examples, batch_size)) + [num_examples]
    else:
        boundaries = list(np.cumsum([0] + batch_sizes))
    inputs = inputs.prefetch(tf.data.AUTOTUNE)
    streamed = StreamedInputs(
        inputs,
        tf.constant(num_examples, tf.int32),
        tf.constant(boundaries, tf.int32),
        _prefix_sums(np.concatenate(parts), boundaries),
        _prefix_sums(np.concatenate(abs_parts), boundaries),
        tf.constant(0, tf.int32),
    )
    y = _concat_targets(targets) if with_targets else None
    return streamed, y


def run_pass(inputs, step, state, finalize=None):
    """Run `state = step(batch, offset, state)` over one pass of streamed inputs.

    `offset` is the int32 index of the batch's first example. After the pass
    the example count and the fingerprint are checked against the first pass.
    A mismatch fails the graph with a message that starts with `PASS_MISMATCH`.

    Returns:
        finalize(state) (the state itself without `finalize`), computed after
        the checks.
    """
    iterator = iter(inputs.dataset)
    zero = tf.constant(0.0, tf.float64)

    # The next element is a loop variable, so the loop condition tests it and
    # the body needs no tf.cond around the step.
    def body(element, offset, fingerprint, state):
        batch = element.get_value()
        state = step(batch, offset, state)
        part, _ = _example_fingerprints(batch, inputs.first_example + offset)
        size = _batch_size(batch)
        return iterator.get_next_as_optional(), offset + size, fingerprint + tf.reduce_sum(part), state

    loop_vars = (iterator.get_next_as_optional(), tf.constant(0, tf.int32), zero, state)
    _, count, fingerprint, state = tf.while_loop(
        lambda element, *_: element.has_value(), body, loop_vars
    )

    # The pass must repeat the first one, or the products mix different data.
    expected = inputs.fingerprint_prefix[-1] - inputs.fingerprint_prefix[0]
    scale = inputs.scale_prefix[-1] - inputs.scale_prefix[0]
    same_count = tf.equal(count, inputs.num_examples)
    same_inputs = tf.abs(fingerprint - expected) <= _FINGERPRINT_RTOL * scale
    check = tf.debugging.Assert(
        tf.logical_and(same_count, same_inputs),
        [f"{PASS_MISMATCH}: it yielded", count, "examples, expected", inputs.num_examples,
         "(a count match with other examples means a reshuffled or augmented dataset).",
         PASS_ADVICE],
        summarize=1,
    )
    with tf.control_dependencies([check]):
        result = state if finalize is None else finalize(state)
        return tf.nest.map_structure(tf.identity, result)


def translates_pass_errors(method):
    """Decorate `method` so that a failed pass check raises ValueError (see below).

    The inputs count as streamed when an argument, or an attribute of the first
    argument (the operator), is a `StreamedInputs` or a dataset.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with translate_pass_errors(streamed=_involves_streamed(args, kwargs)):
            return method(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def translate_pass_errors(streamed=True):
    """Re-raise a failed pass check as a ValueError with the same message.

    Under a `tf.distribute` strategy a failed check on one replica cancels the
    collectives of the others, and TensorFlow may report that cancellation
    first. With `streamed` set, a cancelled collective is reported as a pass
    mismatch too, with the original error chained.
    """
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        message = error.message
        if PASS_MISMATCH not in message:
            raise
        line = message[message.index(PASS_MISMATCH):].splitlines()[0]
        # The assert prints each of its data items in brackets.
        text = " ".join(part.strip() for part in line.replace("]", "[").split("[") if part.strip())
        raise ValueError(text) from None
    except tf.errors.CancelledError as error:
        if not (streamed and "Collective" in error.message):
            raise
        raise ValueError(
            f"{PASS_MISMATCH} on some replica, most likely: a collective of the sharded "
            f"product was cancelled because another replica failed. {PASS_ADVICE}"
        ) from error


# ---------------------------------------------------------------------- helpers


def _involves_streamed(args, kwargs):
    values = list(args) + list(kwargs.values())
    if args and hasattr(args[0], "__dict__"):
        values += list(vars(args[0]).values())
    return any(isinstance(value, (StreamedInputs, tf.data.Dataset)) for value in values)


def _check_finite_cardinality(dataset, name):
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"`{name}` must be a finite tf.data.Dataset; received an infinite one (e.g. "
            "from `.repeat()` without a count). Every product passes over all of the "
            "data, so pass a dataset that yields each example once."
        )


def _check_element_spec(spec, name, with_targets):
    if not with_targets:
        return
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(
            f"`{name}` must be a batched tf.data.Dataset of (x, y) pairs; received a "
            f"dataset with element_spec {spec}."
        )
    if len(spec) == 3:
        raise ValueError(
            f"`{name}` must yield (x, y) pairs; received (x, y, sample_weight) "
            "triples, and sample weights are not supported."
        )


def _split_element(element, is_tuple):
    """Return (x, y) of a dataset element by the Keras convention (y may be None)."""
    if is_tuple and 1 <= len(element) <= 3:
        return element[0], (element[1] if len(element) > 1 else None)
    return element, None


def _convert_batch(convert, batch_x, name):
    try:
        return convert(batch_x, name)
    except ValueError as error:
        raise ValueError(
            f"{error} This batch came from the tf.data.Dataset `{name}`, whose elements "
            "must be batches of examples (e.g. from `dataset.batch(32)`)."
        ) from None


def _cast_like(x, reference):
    """Cast the leaves of `x` to the dtypes of `reference`, in its structure."""
    leaves = [
        tf.cast(leaf, ref.dtype) for leaf, ref in zip(tf.nest.flatten(x), tf.nest.flatten(reference))
    ]
    return tf.nest.pack_sequence_as(reference, leaves)


def _batch_size(x):
    return tf.shape(tf.nest.flatten(x)[0], out_type=tf.int32)[0]


def _example_fingerprints(x, offset):
    """Return per-example (fingerprint, scale) terms [n] of a batch, in float64.

    Example i of the batch contributes (offset + i + 1)·Σⱼ wⱼ·xᵢⱼ and
    (offset + i + 1)·Σⱼ wⱼ·|xᵢⱼ|, with wⱼ = 1 + ½·sin(j + ½) over its flattened
    entries j, leaf after leaf.
    """
    weighted, weighted_abs, column = 0.0, 0.0, 0
    for leaf in tf.nest.flatten(x):
        rows = tf.reshape(tf.cast(leaf, tf.float64), [tf.shape(leaf)[0], -1])  # [n, D]
        width = tf.shape(rows)[1]
        weights = 1.0 + 0.5 * tf.sin(tf.cast(column + tf.range(width), tf.float64) + 0.5)  # [D]
        weighted += tf.linalg.matvec(rows, weights)
        weighted_abs += tf.linalg.matvec(tf.abs(rows), weights)
        column += width
    positions = tf.cast(offset + 1 + tf.range(_batch_size(x)), tf.float64)  # [n]
    return positions * weighted, positions * weighted_abs


def _prefix_sums(terms, boundaries):
    """Return the float64 prefix sums [B + 1] of per-example `terms` at batch `boundaries`."""
    cumulative = np.concatenate([[0.0], np.cumsum(terms, dtype=np.float64)])
    return tf.constant(cumulative[np.asarray(boundaries)], tf.float64)


def _has_fixed_example_shapes(spec):
    """Return whether every input's per-example shape is fully known."""
    return all(
        leaf.shape.rank is not None and all(d is not None for d in leaf.shape[1:])
        for leaf in tf.nest.flatten(spec)
    )


def _check_eager(name):
    if not tf.executing_eagerly():
        raise ValueError(
            f"`{name}` is a tf.data.Dataset inside a tf.function, but datasets are read "
            "once eagerly to validate and count them. Build the operator or call "
            "`adapt` outside the tf.function, or pass tensors."
        )


def _concat_targets(targets):
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *targets)
