"""Tests of the implicit NTK operator against the dense kernel J Jᵀ."""

import numpy as np
import pytest
import tensorflow as tf

import tf_linntk
from tests import reference
from tf_linntk import autodiff

pytestmark = pytest.mark.usefixtures("float64")

# Float64 kernel products against J Jᵀ formed from the dense reference Jacobian:
# both sides sum the same terms in different orders.
RTOL = 1e-10

# Models for the full kernel checks: plain, BatchNorm, dict inputs, several output
# tensors, rank-4 outputs and integer (Embedding) inputs.
KERNEL_ZOO = [
    "mlp",
    "multi_output",
    "cnn_bn_dropout",
    "two_inputs_dict",
    "subclassed_no_training",
    "embedding",
    "two_output_tensors",
    "rank4_outputs",
]


def assert_close(actual, expected, rtol=RTOL):
    """Compare with a relative tolerance and an absolute one scaled by the largest entry."""
    expected = np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * scale)


def random_rhs(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape))


# ---------------------------------------------------------------------- symmetric kernel


@pytest.mark.parametrize("name", KERNEL_ZOO, ids=KERNEL_ZOO)
def test_ntk_matmul_matches_dense(zoo, name):
    """matmul with R = 3 right-hand sides equals J Jᵀ V."""
    case, lin = zoo.case(name), zoo.lin(name)
    ntk = lin.ntk(case.x)
    dense = reference.dense_ntk(case.jacobian)
    rhs = random_rhs((dense.shape[0], 3))
    assert_close(ntk.matmul(rhs), dense @ rhs.numpy())


@pytest.mark.parametrize("name", KERNEL_ZOO, ids=KERNEL_ZOO)
def test_ntk_matmul_many_rhs_matches_dense(zoo, name):
    """matmul with R ≥ JACOBIAN_PRODUCT_MIN_RHS·O (the per-chunk Jacobian path) equals J Jᵀ V."""
    case, lin = zoo.case(name), zoo.lin(name)
    ntk = lin.ntk(case.x)
    dense = reference.dense_ntk(case.jacobian)
    num_rhs = autodiff.JACOBIAN_PRODUCT_MIN_RHS * lin.num_outputs + 1
    rhs = random_rhs((dense.shape[0], num_rhs))
    assert_close(ntk.matmul(rhs), dense @ rhs.numpy())


@pytest.mark.parametrize("name", KERNEL_ZOO, ids=KERNEL_ZOO)
def test_ntk_matvec_matches_dense(zoo, name):
    """matvec equals J Jᵀ v."""
    case, lin = zoo.case(name), zoo.lin(name)
    dense = reference.dense_ntk(case.jacobian)
    rhs = random_rhs((dense.shape[0],))
    assert_close(lin.ntk(case.x).matvec(rhs), dense @ rhs.numpy())


@pytest.mark.parametrize("name", KERNEL_ZOO, ids=KERNEL_ZOO)
def test_ntk_to_dense_and_diag_match_dense(zoo, name):
    """to_dense equals J Jᵀ and diag_part equals its diagonal."""
    case, lin = zoo.case(name), zoo.lin(name)
    ntk = lin.ntk(case.x)
    dense = reference.dense_ntk(case.jacobian)
    assert ntk.shape == dense.shape
    assert_close(ntk.to_dense(), dense)
    assert_close(ntk.diag_part(), np.diag(dense))


def test_ntk_layout_is_example_major(zoo):
    """to_dense reshapes to [N1, O, N2, O] with entry (i, k, j, l) = J[i, k] · J[j, l]."""
    case, lin = zoo.case("multi_output"), zoo.lin("multi_output")
    num_examples, num_outputs = reference.NUM_EXAMPLES, lin.num_outputs
    dense = lin.ntk(case.x).to_dense().numpy()
    blocks = dense.reshape(num_examples, num_outputs, num_examples, num_outputs)
    assert_close(blocks, np.einsum("ikp,jlp->ikjl", case.jacobian, case.jacobian))


def test_ntk_is_symmetric_psd(zoo):
    """The kernel for x2=None is symmetric, PSD to rounding, and flagged self-adjoint."""
    case, lin = zoo.case("cnn_bn_dropout"), zoo.lin("cnn_bn_dropout")
    ntk = lin.ntk(case.x)
    assert ntk.is_self_adjoint is True
    assert ntk.is_positive_definite is None
    dense = ntk.to_dense().numpy()
    np.testing.assert_allclose(dense, dense.T, rtol=0, atol=RTOL * np.abs(dense).max())
    eigenvalues = np.linalg.eigvalsh(dense)
    assert eigenvalues.min() >= -RTOL * eigenvalues.max()


def test_ntk_row_matches_dense(zoo):
    """row(i) equals row i of J Jᵀ."""
    case, lin = zoo.case("multi_output"), zoo.lin("multi_output")
    ntk = lin.ntk(case.x)
    dense = reference.dense_ntk(case.jacobian)
    for index in (0, 5, dense.shape[0] - 1):
        assert_close(ntk.row(index), dense[index])


@pytest.mark.parametrize("batch_size", [1, 3, 1000], ids=["bs1", "bs3", "bs1000"])
def test_ntk_independent_of_batch_size(zoo, batch_size):
    """matvec, matmul and diag_part agree with J Jᵀ for any batch_size."""
    case, lin = zoo.case("cnn_bn_dropout"), zoo.lin("cnn_bn_dropout", batch_size)
    ntk = lin.ntk(case.x)
    dense = reference.dense_ntk(case.jacobian)
    rhs = random_rhs((dense.shape[0], 2))
    assert_close(ntk.matvec(rhs[:, 0]), dense @ rhs.numpy()[:, 0])
    assert_close(ntk.matmul(rhs), dense @ rhs.numpy())
    assert_close(ntk.diag_part(), np.diag(dense))


# ---------------------------------------------------------------------- cross kernel


@pytest.fixture(scope="module")
def cross_case(zoo):
    """multi_output model, x1 with 4 examples and x2 with 2 other examples."""
    case, lin = zoo.case("multi_output"), zoo.lin("multi_output")
    x2 = np.random.default_rng(9).normal(size=(2, 3))
    jac2 = reference.dense_jacobian(case.model, x2)
    return case, lin, x2, reference.dense_ntk(case.jacobian, jac2)


def test_ntk_cross_matmul_and_adjoint(cross_case):
    """K(x1, x2) V and K(x1, x2)ᵀ W equal the dense products, with or without adjoint_arg."""
    case, lin, x2, dense = cross_case
    ntk = lin.ntk(case.x, x2)
    assert ntk.shape == (12, 6)
    assert ntk.is_self_adjoint is None
    rhs = random_rhs((6, 2))
    assert_close(ntk.matmul(rhs), dense @ rhs.numpy())
    assert_close(ntk.matvec(rhs[:, 0]), dense @ rhs.numpy()[:, 0])
    rhs_adjoint = random_rhs((12, 3), seed=1)
    assert_close(ntk.matmul(rhs_adjoint, adjoint=True), dense.T @ rhs_adjoint.numpy())
    assert_close(ntk.matvec(rhs_adjoint[:, 0], adjoint=True), dense.T @ rhs_adjoint.numpy()[:, 0])
    assert_close(
        ntk.matmul(tf.transpose(rhs), adjoint_arg=True), dense @ rhs.numpy()
    )


def test_ntk_cross_to_dense(cross_case):
    """to_dense of K(x1, x2) equals J(x1) J(x2)ᵀ of shape [N1·O, N2·O]."""
    case, lin, x2, dense = cross_case
    assert_close(lin.ntk(case.x, x2).to_dense(), dense)


def test_ntk_cross_diag_part(zoo):
    """diag_part of K(x1, x2) with N1 = N2 equals the dense diagonal."""
    case, lin = zoo.case("multi_output"), zoo.lin("multi_output")
    x2 = case.x[::-1]
    dense = reference.dense_ntk(case.jacobian, reference.dense_jacobian(case.model, x2))
    assert_close(lin.ntk(case.x, x2).diag_part(), np.diag(dense))


# ---------------------------------------------------------------------- edges


def test_ntk_products_inside_tf_function(zoo):
    """An NTK built and applied inside a user tf.function equals the dense kernel."""
    case, lin = zoo.case("two_inputs_dict"), zoo.lin("two_inputs_dict")
    dense = reference.dense_ntk(case.jacobian)
    rhs = random_rhs((dense.shape[0], 2))
    matvec = tf.function(lambda v: lin.ntk(case.x).matvec(v))
    assert_close(matvec(rhs[:, 0]), dense @ rhs.numpy()[:, 0])
    matmul = tf.function(lambda v: lin.ntk(case.x).matmul(v))
    assert_close(matmul(rhs), dense @ rhs.numpy())
    assert_close(tf.function(lambda: lin.ntk(case.x).to_dense())(), dense)
    assert_close(tf.function(lambda: lin.ntk(case.x).diag_part())(), np.diag(dense))


def test_ntk_rejects_unknown_num_examples(zoo):
    """Inputs with an unknown N inside a tf.function raise, naming `x1` and the fix."""
    lin = zoo.lin("mlp")
    build = tf.function(
        lambda x: lin.ntk(x).shape,
        input_signature=[tf.TensorSpec([None, 3], tf.float64)],
    )
    with pytest.raises(ValueError, match="`x1` and `x2` of an NTK operator must have a statically"):
        build.get_concrete_function()


def test_ntk_empty_input(zoo):
    """An NTK on N = 0 examples has shape [0, 0] and returns empty products."""
    case, lin = zoo.case("mlp"), zoo.lin("mlp")
    x = reference.take_examples(case.x, 0)
    ntk = lin.ntk(x)
    assert ntk.shape == (0, 0)
    assert ntk.matvec(tf.zeros([0], tf.float64)).shape == (0,)
    assert ntk.diag_part().shape == (0,)


def test_ntk_float32_matches_float64(zoo):
    """A float32 model's NTK matvec agrees with float64 to float32 rounding."""
    case64 = zoo.case("mlp")
    with reference.keras_float_dtype("float32"):
        model32 = reference.mlp()
    model32.set_weights([w.astype(np.float32) for w in case64.model.get_weights()])
    ntk = tf_linntk.LinearizedModel(model32).ntk(case64.x)
    assert ntk.dtype == tf.float32
    dense = reference.dense_ntk(case64.jacobian)
    rhs = np.random.default_rng(0).normal(size=dense.shape[0])
    # float32 rounding of the weights, inputs and sums: about 1e-7 relative per
    # operation, so 1e-5 leaves room for a few dozen accumulated roundings.
    assert_close(ntk.matvec(rhs.astype(np.float32)), dense @ rhs, rtol=1e-5)
