"""Model inputs streamed from a `tf.data.Dataset`, read again on every pass.

A product over streamed inputs (JVP, VJP, Fisher product, ...) is one pass over
the dataset. A `tf.while_loop` pulls batches from an iterator and runs the
product's chunk body on each. Memory then holds one batch of inputs, so the
number of examples is bounded by the dataset's storage. Every pass recounts the examples and
recomputes a fingerprint of the inputs in order, and a pass that differs from
the first one (another count, reshuffled or randomly augmented examples) fails.

Elements follow the Keras convention for datasets: a tuple `(x, y)`,
`(x, y, sample_weight)` or `(x,)` carries the inputs in its first item, and any
other element is the inputs itself (so a two-input model takes `((a, b), y)`).
"""

import contextlib

import tensorflow as tf

__all__ = [
    "StreamedInputs",
    "is_dataset",
    "read_dataset",
    "run_pass",
    "translate_pass_errors",
]

# Start of the message of a pass that does not repeat the first one. Public
# entry points turn the runtime error carrying it into a ValueError.
PASS_MISMATCH = "A tf.data.Dataset yielded different examples on this pass than on its first pass"

PASS_ADVICE = (
    "Each product reads the dataset again, so it must yield the same examples in the "
    "same order on every pass: use `shuffle(..., reshuffle_each_iteration=False)` or "
    "shuffle before `adapt`, and no random augmentation."
)

# Relative tolerance of the input fingerprint between passes. The sums run in
# float64 over the same values, only grouped into batches differently.
_FINGERPRINT_RTOL = 1e-9


class StreamedInputs(tf.experimental.ExtensionType):
    """Model inputs read from a dataset on every pass over the data.

    An extension type, so a `tf.function` traces once per dataset structure and
    not once per dataset.

    Attributes:
        dataset: `tf.data.Dataset` of converted input structures, in batches of
            at most the model's `batch_size` examples.
        num_examples: int32 scalar Tensor, N counted on the first pass.
        fingerprint: float64 scalar Tensor, Σᵢ (i + 1)·Σ xᵢ over the examples in
            order (all input entries of example i summed).
        fingerprint_scale: float64 scalar Tensor, Σᵢ (i + 1)·Σ |xᵢ|, the scale of
            the fingerprint check; a negative value turns the check off.
    """

    dataset: tf.data.Dataset
    num_examples: tf.Tensor
    fingerprint: tf.Tensor
    fingerprint_scale: tf.Tensor

    def static_num_examples(self):
        """Return N as a Python int, or None inside a graph where it is not constant."""
        value = tf.get_static_value(self.num_examples)
        return None if value is None else int(value)

    def shard(self, first_batch, num_batches, num_examples):
        """Return the streamed inputs of `num_batches` batches from batch `first_batch` on.

        Each pass still reads the batches before the shard. Only the example count
        of a shard is checked on each pass, not the fingerprint.
        """
        dataset = self.dataset.skip(tf.cast(first_batch, tf.int64))
        dataset = dataset.take(tf.cast(num_batches, tf.int64))
        zero = tf.constant(0.0, tf.float64)
        return StreamedInputs(dataset, tf.cast(num_examples, tf.int32), zero, zero - 1.0)


def is_dataset(x):
    """Return whether `x` is a `tf.data.Dataset`."""
    return isinstance(x, tf.data.Dataset)


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
    _check_finite_cardinality(dataset, name)
    is_tuple = isinstance(dataset.element_spec, tuple)
    _check_element_spec(dataset.element_spec, name, with_targets)

    # One eager pass: validate, count, fingerprint and collect the targets.
    reference, targets = None, []
    num_examples, fingerprint, scale = 0, 0.0, 0.0
    for element in dataset:
        batch_x, batch_y = _split_element(element, is_tuple)
        batch_x = _convert_batch(convert, batch_x, name)
        reference = batch_x if reference is None else reference
        part, part_scale = _fingerprint(batch_x, num_examples)
        fingerprint += float(part)
        scale += float(part_scale)
        num_examples += int(_batch_size(batch_x))
        if with_targets:
            targets.append(batch_y)
    if num_examples == 0:
        raise ValueError(f"`{name}` must contain at least one example; received an empty dataset.")

    # Later passes cast like the first one and regroup into batches of `batch_size`.
    def select_inputs(*args):
        batch_x, _ = _split_element(args if is_tuple else args[0], is_tuple)
        return _cast_like(batch_x, reference)

    inputs = dataset.map(select_inputs).rebatch(batch_size).prefetch(tf.data.AUTOTUNE)
    streamed = StreamedInputs(
        inputs,
        tf.constant(num_examples, tf.int32),
        tf.constant(fingerprint, tf.float64),
        tf.constant(scale, tf.float64),
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
        part, _ = _fingerprint(batch, offset)
        return iterator.get_next_as_optional(), offset + _batch_size(batch), fingerprint + part, state

    loop_vars = (iterator.get_next_as_optional(), tf.constant(0, tf.int32), zero, state)
    _, count, fingerprint, state = tf.while_loop(
        lambda element, *_: element.has_value(), body, loop_vars
    )

    # The pass must repeat the first one, or the products mix different data.
    same_count = tf.equal(count, inputs.num_examples)
    difference = tf.abs(fingerprint - inputs.fingerprint)
    same_inputs = tf.logical_or(
        inputs.fingerprint_scale < 0.0,
        difference <= _FINGERPRINT_RTOL * inputs.fingerprint_scale,
    )
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


@contextlib.contextmanager
def translate_pass_errors():
    """Re-raise a failed pass check as a ValueError with the same message."""
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


# ---------------------------------------------------------------------- helpers


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


def _fingerprint(x, offset):
    """Return (Σ (offset + i + 1)·Σ xᵢ, Σ (offset + i + 1)·Σ |xᵢ|) over a batch, float64."""
    row_sums, row_abs_sums = 0.0, 0.0
    for leaf in tf.nest.flatten(x):
        rows = tf.reshape(tf.cast(leaf, tf.float64), [tf.shape(leaf)[0], -1])
        row_sums += tf.reduce_sum(rows, axis=1)
        row_abs_sums += tf.reduce_sum(tf.abs(rows), axis=1)
    positions = tf.cast(offset + 1 + tf.range(_batch_size(x)), tf.float64)
    return tf.reduce_sum(positions * row_sums), tf.reduce_sum(positions * row_abs_sums)


def _concat_targets(targets):
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *targets)
