"""Loops that apply a function to consecutive chunks of examples and join the results.

A chunk function fn(xc, start, stop) receives the inputs of examples
[start, stop) and returns one tensor (concatenated along axis 0) or a list of
tensors (added into running totals). Streamed inputs are read in one pass, and
each batch is split into chunks by the in-memory loops, with `start` and `stop`
shifted to positions in the whole dataset.
"""

import tensorflow as tf

from tf_linntk import _streaming

__all__ = ["concat_chunks", "sum_chunks"]


def concat_chunks(fn, x, chunk_size, trailing_shape, dtype):
    """Concatenate fn(x[start:stop], start, stop) along axis 0 over all chunks.

    `trailing_shape` is the shape of one result row; N = 0 gives zeros
    [0, *trailing_shape], since an empty TensorArray cannot infer it.
    """
    if isinstance(x, _streaming.StreamedInputs):
        return _concat_streamed(fn, x, chunk_size, trailing_shape, dtype)
    n = tf.shape(tf.nest.flatten(x)[0])[0]
    num_chunks = (n + chunk_size - 1) // chunk_size

    def body(i, array):
        start = i * chunk_size
        stop = tf.minimum(start + chunk_size, n)
        xc = tf.nest.map_structure(lambda t: t[start:stop], x)
        return i + 1, array.write(i, fn(xc, start, stop))

    array = tf.TensorArray(dtype, size=num_chunks, infer_shape=False)
    _, array = tf.while_loop(lambda i, _: i < num_chunks, body, (0, array))
    empty_shape = tf.concat([[0], trailing_shape], axis=0)
    return tf.cond(n > 0, array.concat, lambda: tf.zeros(empty_shape, dtype))


def sum_chunks(fn, x, zeros, add, chunk_size):
    """Sum fn(x[start:stop], start, stop) (a list of tensors) over all chunks."""
    if isinstance(x, _streaming.StreamedInputs):
        return _sum_streamed(fn, x, zeros, add, chunk_size)
    n = tf.shape(tf.nest.flatten(x)[0])[0]
    num_chunks = (n + chunk_size - 1) // chunk_size

    def body(i, totals):
        start = i * chunk_size
        stop = tf.minimum(start + chunk_size, n)
        xc = tf.nest.map_structure(lambda t: t[start:stop], x)
        parts = fn(xc, start, stop)
        return i + 1, [add(a, g) for a, g in zip(totals, parts)]

    _, totals = tf.while_loop(lambda i, _: i < num_chunks, body, (0, zeros))
    return totals


def _concat_streamed(fn, x, chunk_size, trailing_shape, dtype):
    """Concatenate over one pass of streamed inputs, each batch split into chunks."""

    def step(batch, offset, array):
        part = concat_chunks(_offset_chunks(fn, offset), batch, chunk_size, trailing_shape, dtype)
        return array.write(array.size(), part)

    def concat(array):
        # A replica's shard of streamed inputs may hold no batch at all.
        empty_shape = tf.concat([[0], trailing_shape], axis=0)
        return tf.cond(array.size() > 0, array.concat, lambda: tf.zeros(empty_shape, dtype))

    array = tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False)
    return _streaming.run_pass(x, step, array, finalize=concat)


def _sum_streamed(fn, x, zeros, add, chunk_size):
    """Sum over one pass of streamed inputs, each batch split into chunks."""

    def step(batch, offset, totals):
        parts = sum_chunks(_offset_chunks(fn, offset), batch, zeros, add, chunk_size)
        return [total + part for total, part in zip(totals, parts)]

    return _streaming.run_pass(x, step, list(zeros))


def _offset_chunks(fn, offset):
    """Return fn with chunk bounds shifted from batch positions to dataset positions."""
    return lambda xc, start, stop: fn(xc, start + offset, stop + offset)
