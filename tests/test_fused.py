"""Fused epilogues: y = relu(bn(x) + residual) forward, and the masked backward with the residual's
gradient, against the unfused composition (float64 reference) for every dtype and layout, in
training and inference; finite-difference gradient checks in float64; errors."""
import numpy as np
import pytest

import pybn
import reference as ref
from conftest import FLOAT_DTYPES, assert_close, randn
from test_forward import ids

LAYOUTS = [((16, 5), 1), ((9, 4, 33), 1), ((4, 5, 7, 6), -1), ((3, 5, 65), 1), ((300, 17), 1),
           ((2, 130, 3), 1), ((2, 3, 4000), 1), ((5, 3, 2, 2, 3), -1)]


def relu(a):
    return np.where(a > 0, a, 0.0)


def bcast(p, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=ids(LAYOUTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("residual,activation", [(False, "relu"), (True, None), (True, "relu")],
                         ids=["relu", "add", "add-relu"])
def test_fused_forward_and_backward_match_the_composition(rng, dtype, shape, axis, training, residual, activation):
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    x = randn(rng, shape, dtype, loc=0.5, scale=2.0)
    z = randn(rng, shape, dtype, scale=0.7) if residual else None
    dy = randn(rng, shape, dtype)
    g, b = rng.uniform(0.5, 2, c).astype(pd), rng.standard_normal(c).astype(pd)
    rm, rv = rng.standard_normal(c).astype(pd), rng.uniform(0.5, 2, c).astype(pd)
    rm1, rv1 = rm.copy(), rv.copy()
    y, mean, invstd = pybn.batchnorm_forward(x, g, b, rm1, rv1, training=training, axis=axis,
                                             activation=activation, residual=z)
    if training:
        e_pre, _, _, _ = ref.forward_train(x, g, b, axis=axis)
    else:
        e_pre = ref.forward_infer(x, rm, rv, g, b, axis=axis)
    e_pre = e_pre + (z.astype(np.float64) if residual else 0.0)
    e_y = relu(e_pre) if activation else e_pre
    assert y.dtype == x.dtype
    assert_close(y, e_y, dtype, what="fused y")
    # the statistics and running statistics are those of plain BN
    rm2, rv2 = rm.copy(), rv.copy()
    _, mean2, invstd2 = pybn.batchnorm_forward(x, g, b, rm2, rv2, training=training, axis=axis)
    np.testing.assert_array_equal(mean, mean2)
    np.testing.assert_array_equal(invstd, invstd2)
    np.testing.assert_array_equal(rm1, rm2)
    np.testing.assert_array_equal(rv1, rv2)

    # backward: the gradient reaching BN is dy * (y > 0); dresidual receives it
    dres = np.full(shape, 7, dtype)
    dx, dg, db = pybn.batchnorm_backward(dy, x, mean, invstd, g, training=training, axis=axis,
                                         activation=activation, y=y if activation else None,
                                         dresidual=dres)
    gmask = np.where(y.astype(np.float64) > 0, dy.astype(np.float64), 0.0) if activation else dy.astype(np.float64)
    np.testing.assert_array_equal(dres.astype(np.float64), gmask)  # exact: dy or 0
    if training:
        e_dx, e_dg, e_db = ref.backward_train(gmask, x, g, axis=axis)
    else:
        e_dx, e_dg, e_db = ref.backward_frozen(gmask, x, mean, invstd, g, axis=axis)
    scale = np.abs(gmask).sum(axis=tuple(i for i in range(len(shape)) if i != axis % len(shape)))
    assert_close(dx, e_dx, dtype, what="fused dx")
    assert_close(dg, e_dg, pd, scale=scale, what="dgamma")
    assert_close(db, e_db, pd, scale=scale, what="dbeta")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_equals_pybn_then_numpy_for_float32_and_float64(rng, dtype):
    """For 32/64-bit data the fused result is the unfused one rounded the same way."""
    x = randn(rng, (8, 6, 50), dtype, loc=1, scale=3)
    z = randn(rng, (8, 6, 50), dtype)
    y_plain = pybn.batchnorm(x)
    np.testing.assert_array_equal(pybn.batchnorm(x, activation="relu"), np.maximum(y_plain, 0))
    np.testing.assert_array_equal(pybn.batchnorm(x, residual=z), y_plain + z)
    np.testing.assert_array_equal(pybn.batchnorm(x, residual=z, activation="relu"), np.maximum(y_plain + z, 0))


def test_relu_keeps_nan_and_its_gradient_is_zero_at_the_tie():
    x = np.array([[0.0, np.nan], [2.0, 1.0], [4.0, 3.0]], np.float32)  # channel 1 holds a NaN
    y = pybn.batchnorm(x, activation="relu")
    assert np.isnan(y[:, 1]).all() and y[0, 0] == 0
    # y == 0 (ties, here the whole of channel 0's negative half): no gradient passes
    x = np.array([[1.0], [1.0], [2.0], [2.0]], np.float64)
    y, mean, invstd = pybn.batchnorm_forward(x, None, np.array([-1.0]), activation="relu")
    assert (y[:2] == 0).all() and (y[2:] == 0).all()  # x_hat = +-1, beta = -1: 0 and ... 0 at the tie
    dres = np.empty_like(x)
    pybn.batchnorm_backward(np.ones_like(x), x, mean, invstd, activation="relu", y=y, dresidual=dres)
    np.testing.assert_array_equal(dres, 0)


def test_finite_difference_gradients_float64(rng):
    """d/dx, d/dgamma, d/dbeta and d/dresidual of sum(w * relu(bn(x) + z)) against central
    differences, with the data kept away from the ReLU's kink."""
    shape, axis = (5, 3, 4), 1
    for _ in range(20):
        x = rng.standard_normal(shape)
        z = rng.standard_normal(shape)
        g, b = rng.uniform(0.5, 2, 3), rng.standard_normal(3) * 0.3
        pre = pybn.batchnorm(x, g, b) + z
        if np.abs(pre).min() > 0.05:
            break
    w = rng.standard_normal(shape)

    def loss(x, g, b, z):
        return float((w * pybn.batchnorm(x, g, b, residual=z, activation="relu")).sum())

    y, mean, invstd = pybn.batchnorm_forward(x, g, b, residual=z, activation="relu")
    dres = np.empty_like(x)
    dx, dg, db = pybn.batchnorm_backward(w, x, mean, invstd, g, activation="relu", y=y, dresidual=dres)
    h = 1e-6
    for name, arr, grad in (("x", x, dx), ("gamma", g, dg), ("beta", b, db), ("residual", z, dres)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            keep = arr[i]
            arr[i] = keep + h
            up = loss(x, g, b, z)
            arr[i] = keep - h
            down = loss(x, g, b, z)
            arr[i] = keep
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7, err_msg=name)


def test_layer_and_sync_layer_with_relu(rng):
    x = randn(rng, (6, 4, 5), np.float32, loc=1)
    dy = randn(rng, (6, 4, 5), np.float32)
    bn = pybn.BatchNorm(4, activation="relu")
    y = bn(x)
    np.testing.assert_array_equal(y, pybn.batchnorm(x, activation="relu"))
    dx = bn.backward(dy)
    y2, m, r = pybn.batchnorm_forward(x, activation="relu")
    dx2, dg2, db2 = pybn.batchnorm_backward(dy, x, m, r, np.ones(4, np.float32), activation="relu", y=y2)
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_array_equal(bn.grad_gamma, dg2)
    assert "activation='relu'" in repr(bn)
    mpi = pytest.importorskip("mpi4py.MPI")
    from pybn.distributed import SyncBatchNorm
    sbn = SyncBatchNorm(4, comm=mpi.COMM_SELF, activation="relu")
    np.testing.assert_allclose(sbn(x), y, atol=1e-6)
    np.testing.assert_allclose(sbn.backward(dy), dx, atol=1e-6)
    np.testing.assert_allclose(sbn.grad_gamma, bn.grad_gamma, rtol=1e-5, atol=1e-6)


def test_in_place_forms(rng):
    x = randn(rng, (4, 3, 40), np.float32)
    z = randn(rng, (4, 3, 40), np.float32)
    expect = pybn.batchnorm(x, residual=z, activation="relu")
    zz = z.copy()
    assert pybn.batchnorm(x, residual=zz, activation="relu", out=zz) is zz  # y over the residual
    np.testing.assert_array_equal(zz, expect)
    xx = x.copy()
    pybn.batchnorm(xx, residual=z, activation="relu", out=xx)  # y over x
    np.testing.assert_array_equal(xx, expect)
    y, m, r = pybn.batchnorm_forward(x, activation="relu")
    dy = randn(rng, x.shape, np.float32)
    dx_ref, _, _ = pybn.batchnorm_backward(dy, x, m, r, activation="relu", y=y)
    dres = dy.copy()
    dx, _, _ = pybn.batchnorm_backward(dres, x, m, r, activation="relu", y=y, dresidual=dres)  # dres over dy
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(dres, np.where(y > 0, dy, 0))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda x: pybn.batchnorm(x, activation="gelu"), ValueError, "activation must be None or 'relu', got 'gelu'"),
    (lambda x: pybn.batchnorm(x, activation=1), TypeError, "activation must be None or 'relu', got int"),
    (lambda x: pybn.batchnorm(x, residual=np.ones((4, 3, 6), np.float32)), ValueError,
     r"residual must have the shape of x \(4, 3, 5\)"),
    (lambda x: pybn.batchnorm(x, residual=np.ones((4, 3, 5), np.float64)), TypeError, "residual must have the dtype"),
    (lambda x: pybn.batchnorm(x, residual=x[::-1].copy(), out=x[::-1]), ValueError, "out overlaps the input x"),
    (lambda x: pybn.batchnorm_backward(x, x, np.zeros(3, np.float32), np.ones(3, np.float32), activation="relu"),
     ValueError, "needs y"),
    (lambda x: pybn.batchnorm_backward(x, x, np.zeros(3, np.float32), np.ones(3, np.float32),
                                       dresidual=np.empty((4, 3, 5), np.float64)), TypeError,
     "dresidual must have the dtype of x"),
])
def test_errors_change_nothing(call, exc, msg):
    x = np.arange(60, dtype=np.float32).reshape(4, 3, 5)
    before = x.copy()
    with pytest.raises(exc, match=msg):
        call(x)
    np.testing.assert_array_equal(x, before)


def test_c_abi_fused_equals_python(rng):
    """The C parameter-block fields (activation, residual, y, dresidual) are the same operation."""
    x = randn(rng, (3, 4, 70), np.float32)
    z = randn(rng, (3, 4, 70), np.float32)
    y_py = pybn.batchnorm(x, residual=z, activation="relu")
    from pybn import _core
    y = np.empty_like(x)
    p = _core.ForwardParams(activation=_core.ACTIVATION_RELU, residual=_core.host_address(z))
    _core.forward((3, 4, 70, _core.FLOAT32), _core.host_address(x), _core.host_address(y), p)
    np.testing.assert_array_equal(y, y_py)
