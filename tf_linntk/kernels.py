"""The finite neural tangent kernel as an implicit `tf.linalg.LinearOperator`."""

import tensorflow as tf

from tf_linntk import _streaming

__all__ = ["NTKOperator"]


class NTKOperator(tf.linalg.LinearOperator):
    """Finite NTK K = J(x1) J(x2)ᵀ of shape [N1·O, N2·O], never formed unless asked.

    Row i·O + k is example i, output k (example-major), so `to_dense()` reshapes
    to the canonical layout [N1, O, N2, O] without a transpose. There is no prior
    scale: the GP prior covariance is `prior_variance * K`.

    Cost: `matmul` with R right-hand sides takes one batched VJP over x2 and one
    batched JVP over x1, streamed in chunks of the model's `batch_size`. Memory is
    O(R·P + R·N·O) plus one chunk's activations. When x2 is None and N ≤
    `batch_size`, both products share one forward pass (see
    `FunctionalModel.ntk_product`). `diag_part` forms the Jacobian rows of one
    chunk at a time and sums their squares. `to_dense` forms J(x1) and J(x2).

    K is symmetric positive semi-definite when x2 is None; it is flagged
    self-adjoint but not positive-definite, because K is singular when N·O > P.

    Args:
        functional: the `FunctionalModel` that computes J.
        x1: converted input structure with N1 examples.
        x2: converted input structure with N2 examples, or None for x2 = x1.
        name: operator name.
        check_dense_size: optional callable (shape, what, limit, alternative) that
            raises when `to_dense` would form a matrix above the size limit;
            `LinearizedModel.ntk` passes its `check_dense_size`.

    Example:
        >>> ntk = lin.ntk(x)                      # doctest: +SKIP
        >>> ntk.shape, ntk.matvec(v).shape        # doctest: +SKIP
    """

    def __init__(self, functional, x1, x2=None, name="NTKOperator", check_dense_size=None):
        self._functional = functional
        self._check_dense_size = check_dense_size
        # `tf.Module` attribute tracking would wrap dict and list inputs in
        # `_DictWrapper`/`ListWrapper` objects, which `tf.function` cannot trace.
        object.__setattr__(self, "_x1", x1)
        object.__setattr__(self, "_x2", x1 if x2 is None else x2)
        self._symmetric = x2 is None
        self._num_rows = _static_num_examples(functional, x1) * functional.num_outputs
        self._num_cols = _static_num_examples(functional, self._x2) * functional.num_outputs
        super().__init__(
            dtype=functional.dtype,
            is_self_adjoint=True if self._symmetric else None,
            is_square=True if self._symmetric else None,
            name=name,
        )

    @property
    def functional(self):
        """The `FunctionalModel` whose Jacobian defines the kernel."""
        return self._functional

    @property
    def x1(self):
        """Row inputs of the kernel."""
        return self._x1

    @property
    def x2(self):
        """Column inputs of the kernel (the same object as `x1` when symmetric)."""
        return self._x2

    def _shape(self):
        return tf.TensorShape([self._num_rows, self._num_cols])

    def _shape_tensor(self):
        return tf.constant([self._num_rows, self._num_cols], dtype=tf.int32)

    @_streaming.translates_pass_errors
    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        if adjoint_arg:
            x = tf.linalg.adjoint(x)
        # Real kernel: K(x1, x2)ᵀ = K(x2, x1).
        rows_x, cols_x = (self._x2, self._x1) if adjoint and not self._symmetric else (
            self._x1, self._x2
        )
        return _ntk_matmul(self._functional, rows_x, cols_x, x)

    @_streaming.translates_pass_errors
    def _diag_part(self):
        if not self._symmetric:
            return super()._diag_part()
        return tf.reshape(self._functional.jacobian_sq_norms(self._x1), [-1])  # [N·O]

    @_streaming.translates_pass_errors
    def _to_dense(self):
        if self._check_dense_size is not None:
            rows = max(self._num_rows, self._num_cols)
            alternative = "use `matmul`/`matvec` products instead"
            self._check_dense_size(
                (rows, self._functional.num_parameters), "ntk(...).to_dense()", None, alternative
            )
            self._check_dense_size(
                (self._num_rows, self._num_cols), "ntk(...).to_dense()", None, alternative
            )
        j1 = self._jacobian_rows(self._x1)  # [N1·O, P]
        j2 = j1 if self._symmetric else self._jacobian_rows(self._x2)  # [N2·O, P]
        return tf.matmul(j1, j2, transpose_b=True)  # [N1·O, N2·O]

    @_streaming.translates_pass_errors
    def row(self, index):
        """Return row `index` of K as a vector [N2·O] (one JVP and one VJP)."""
        num_outputs = self._functional.num_outputs
        example, output = index // num_outputs, index % num_outputs
        x_row = _example(self._x1, example)
        cotangent = tf.one_hot([[output]], num_outputs, dtype=self.dtype)  # [1, O]
        tangent = self._functional.vjp(x_row, cotangent)  # [P]
        return tf.reshape(self._functional.jvp(self._x2, tangent), [-1])  # [N2·O]

    def _jacobian_rows(self, x):
        jac = self._functional.jacobian(x)  # [N, O, P]
        return tf.reshape(jac, [-1, self._functional.num_parameters])  # [N·O, P]


def _ntk_matmul(functional, rows_x, cols_x, rhs):
    """Return J(rows_x) J(cols_x)ᵀ rhs for rhs [N2·O, R]."""
    num_outputs = functional.num_outputs
    rhs = tf.cast(rhs, functional.dtype)
    if rhs.shape[-1] == 1:
        cotangents = tf.reshape(rhs, [-1, num_outputs])  # [N2, O]
        if rows_x is cols_x:
            return tf.reshape(functional.ntk_product(rows_x, cotangents), [-1, 1])
        tangents = functional.vjp(cols_x, cotangents)  # [P]
        return tf.reshape(functional.jvp(rows_x, tangents), [-1, 1])  # [N1·O, 1]
    cotangents = tf.reshape(tf.transpose(rhs), [tf.shape(rhs)[1], -1, num_outputs])
    if rows_x is cols_x:
        products = functional.ntk_product_batched(rows_x, cotangents)  # [R, N1, O]
    else:
        tangents = functional.vjp_batched(cols_x, cotangents)  # [R, P]
        products = functional.jvp_batched(rows_x, tangents)  # [R, N1, O]
    return tf.transpose(tf.reshape(products, [tf.shape(products)[0], -1]))  # [N1·O, R]


def _example(x, index):
    """Return example `index` of converted inputs as a batch of one.

    Streamed inputs are read up to that example, without running the model.
    """
    if isinstance(x, _streaming.StreamedInputs):
        dataset = x.dataset.unbatch().skip(tf.cast(index, tf.int64)).take(1).batch(1)
        return dataset.get_single_element()
    return tf.nest.map_structure(lambda t: t[index:index + 1], x)


def _static_num_examples(functional, x):
    n = functional.num_examples(x)
    if not isinstance(n, int):
        shapes = [tuple(t.shape) for t in tf.nest.flatten(x, expand_composites=True)]
        raise ValueError(
            "`x1` and `x2` of an NTK operator must have a statically known number of "
            f"examples N; received inputs of shapes {shapes}. Inside a tf.function, "
            "give the inputs a fixed N (e.g. an `input_signature` with a fixed first "
            "dimension) or build the operator outside the function."
        )
    return n
