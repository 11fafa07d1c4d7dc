"""Ghost (virtual) batches, virtual_batch=k: against float64 references written from the
definition (Hoffer et al. 2017: each group of k consecutive samples normalised with its own
statistics) and from Keras 2's BatchNormalization(virtual_batch_size=k) algorithm (its reshape
to (k, N / k, ...), per-group moments, running statistics from the group averages); the backward
against the composition of per-group backwards and against finite differences; the layer;
errors and the C ABI's checks."""
import ctypes

import numpy as np
import pytest

import pybn
from conftest import FLOAT_DTYPES, assert_close, randn
from reference import backward_train


def groups_last(a, k, axis):
    """a (N, ...) -> (G, k, ..., C): the channel axis last, ghost batches first."""
    a = np.moveaxis(a.astype(np.float64), axis, -1)
    return a.reshape((a.shape[0] // k, k) + a.shape[1:])


def reference(x, gamma, beta, rm, rv, k, eps, momentum, correction, axis):
    """The definition in float64: y, per-group mean / invstd (G, C), new running statistics
    (the average of the group means and of the group variances M2_g / (n_g - correction))."""
    xg = groups_last(x, k, axis)
    red = tuple(range(1, xg.ndim - 1))
    n = xg[0].size // xg.shape[-1]
    mu = xg.mean(axis=red, keepdims=True)
    var = xg.var(axis=red, keepdims=True)
    y = (xg - mu) / np.sqrt(var + eps) * gamma + beta
    y = np.moveaxis(y.reshape((x.shape[0],) + y.shape[2:]), -1, axis)
    mu2, var2 = mu.reshape(len(xg), -1), var.reshape(len(xg), -1)
    new_rm = (1 - momentum) * rm + momentum * mu2.mean(axis=0)
    new_rv = (1 - momentum) * rv + momentum * (var2 * n / (n - correction)).mean(axis=0)
    return y, mu2, 1 / np.sqrt(var2 + eps), new_rm, new_rv


SHAPES = [((8, 5), 1, 2), ((12, 3, 40), 1, 4), ((6, 4, 4, 5), -1, 3), ((16, 7, 3, 3), 1, 8), ((64, 6), 1, 16)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis,k", SHAPES)
@pytest.mark.parametrize("correction", [1, 0])
def test_forward_matches_the_definition(rng, dtype, shape, axis, k, correction):
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    x = randn(rng, shape, dtype, loc=3.0, scale=2.0)
    g, b = rng.uniform(0.5, 2, c).astype(pd), rng.standard_normal(c).astype(pd)
    rm, rv = rng.standard_normal(c).astype(pd), rng.uniform(0.5, 2, c).astype(pd)
    rm1, rv1 = rm.copy(), rv.copy()
    y, mean, invstd = pybn.batchnorm_forward(x, g, b, rm1, rv1, momentum=0.3, axis=axis, virtual_batch=k,
                                             running_var_correction=correction)
    ey, emu, einv, erm, erv = reference(x, g.astype(np.float64), b.astype(np.float64), rm.astype(np.float64),
                                        rv.astype(np.float64), k, 1e-5, 0.3, correction, axis)
    assert y.dtype == x.dtype and mean.shape == invstd.shape == (shape[0] // k, c)
    assert_close(y, ey, dtype, what="y")
    assert_close(mean, emu, pd, what="mean")
    assert_close(invstd, einv, pd, what="invstd")
    assert_close(rm1, erm, pd, what="running_mean")
    assert_close(rv1, erv, pd, what="running_var")
    # one group is plain BN, bit for bit
    if k == shape[0]:
        np.testing.assert_array_equal(y, pybn.batchnorm(x, g, b, axis=axis))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "batch_inner"])
def test_layouts_give_the_same_result(rng, layout):
    """Channels-last (NCHW shape, NHWC memory) is used in place; an x whose batch axis is not
    outermost in memory is copied so that groups stay consecutive samples."""
    x = randn(rng, (12, 5, 6, 7), np.float32, loc=1.0)
    dy = randn(rng, x.shape, np.float32)
    y0, m0, i0 = pybn.batchnorm_forward(x, virtual_batch=3)
    dx0, dg0, db0 = pybn.batchnorm_backward(dy, x, m0, i0)
    if layout == "channels_last":
        xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dyl = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "batch_inner":
        xl, dyl = np.asfortranarray(x), np.asfortranarray(dy)
    else:
        xl, dyl = x, dy
    y, m, i = pybn.batchnorm_forward(xl, virtual_batch=3)
    dx, dg, db = pybn.batchnorm_backward(dyl, xl, m, i)
    assert_close(y, y0, np.float32, what="y")
    assert_close(m, m0, np.float32, what="mean")
    assert_close(dx, dx0, np.float32, what="dx")
    assert_close(dg, dg0, np.float32, scale=np.abs(dy).sum(axis=(0, 2, 3)), what="dgamma")
    assert_close(db, db0, np.float32, scale=np.abs(dy).sum(axis=(0, 2, 3)), what="dbeta")


def keras_reference(x, gamma, beta, moving_mean, moving_var, k, eps, keras_momentum):
    """Keras 2 (tf.keras.layers.BatchNormalization(virtual_batch_size=k), channels last) in
    float64: x reshaped to (k, N / k, ...), moments over axis 0 and the spatial axes (keepdims),
    normalised, reshaped back; moving statistics from the means over the virtual-batch axis of
    the group means and the (biased) group variances, with Keras's momentum."""
    n = x.shape[0]
    xr = x.astype(np.float64).reshape((k, n // k) + x.shape[1:])
    red = (0,) + tuple(range(2, xr.ndim - 1))
    mean = xr.mean(axis=red, keepdims=True)
    var = xr.var(axis=red, keepdims=True)
    y = ((xr - mean) / np.sqrt(var + eps) * gamma + beta).reshape(x.shape)
    new_mean = mean.mean(axis=1).reshape(-1)
    new_var = var.mean(axis=1).reshape(-1)
    mm = moving_mean * keras_momentum + new_mean * (1 - keras_momentum)
    mv = moving_var * keras_momentum + new_var * (1 - keras_momentum)
    return y, mm, mv


@pytest.mark.parametrize("shape", [(12, 5), (8, 3, 3, 4)])
def test_keras_virtual_batch_size_is_expressible_exactly(rng, shape):
    """Keras 2 groups samples i, i + N/k, ... (its reshape to (k, N/k, ...)); pybn groups
    consecutive samples. Reordering the batch as the docstring says gives Keras's result."""
    k = 4
    n, c = shape[0], shape[-1]
    x = randn(rng, shape, np.float64, loc=2.0)
    g, b = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    mm, mv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    ey, emm, emv = keras_reference(x, g, b, mm, mv, k, 1e-3, 0.99)
    order = x.reshape((k, n // k) + shape[1:]).swapaxes(0, 1).reshape(shape)  # Keras's groups, consecutive
    rm, rv = mm.copy(), mv.copy()
    y = pybn.batchnorm(order, g, b, rm, rv, axis=-1, virtual_batch=k, eps=1e-3, momentum=1 - 0.99,
                       running_var_correction=0)
    y = y.reshape((n // k, k) + shape[1:]).swapaxes(0, 1).reshape(shape)  # back to x's order
    assert_close(y, ey, np.float64, what="y")
    assert_close(rm, emm, np.float64, what="moving_mean")
    assert_close(rv, emv, np.float64, what="moving_variance")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis,k", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_backward_is_the_per_group_backward(rng, dtype, shape, axis, k, relu):
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    x = randn(rng, shape, dtype, loc=0.5, scale=1.5)
    dy = randn(rng, shape, dtype)
    g, b = rng.uniform(0.5, 2, c).astype(pd), rng.standard_normal(c).astype(pd)
    act = "relu" if relu else None
    y, mean, invstd = pybn.batchnorm_forward(x, g, b, axis=axis, virtual_batch=k, activation=act)
    dx, dg, db = pybn.batchnorm_backward(dy, x, mean, invstd, g, axis=axis, activation=act, y=y if relu else None)
    # float64 reference: each group's own training backward, on the masked gradient
    edx, edg, edb = [], 0.0, 0.0
    y64 = y.astype(np.float64)
    for i in range(shape[0] // k):
        s = slice(i * k, (i + 1) * k)
        gi = dy[s].astype(np.float64) * ((y64[s] > 0) if relu else 1.0)
        a, bb, cc = backward_train(gi, x[s].astype(np.float64), g.astype(np.float64), axis=axis)
        edx.append(a)
        edg, edb = edg + bb, edb + cc
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    scale = np.abs(dy.astype(np.float64)).sum(axis=red)
    assert_close(dx, np.concatenate(edx), dtype, what="dx")
    assert_close(dg, edg, pd, scale=scale, what="dgamma")
    assert_close(db, edb, pd, scale=scale, what="dbeta")


def test_gradients_by_finite_differences(rng):
    """float64: dx, dgamma, dbeta of L = sum(w * y) with ghost batches, by central differences."""
    shape, k = (6, 3, 4), 2
    x = rng.standard_normal(shape) * 2 + 1
    g, b = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    w = rng.standard_normal(shape)

    def loss(x_, g_, b_):
        return float((w * pybn.batchnorm(x_, g_, b_, virtual_batch=k)).sum())

    y, mean, invstd = pybn.batchnorm_forward(x, g, b, virtual_batch=k)
    dx, dg, db = pybn.batchnorm_backward(w, x, mean, invstd, g)
    h = 1e-6
    for arr, grad in ((x, dx), (g, dg), (b, db)):
        num = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            up = loss(x, g, b)
            arr[idx] = old - h
            down = loss(x, g, b)
            arr[idx] = old
            num[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


def test_residual_and_dresidual(rng):
    x, z, dy = (randn(rng, (8, 4, 10), np.float32) for _ in range(3))
    y, m, i = pybn.batchnorm_forward(x, virtual_batch=4, residual=z, activation="relu")
    y0, _, _ = pybn.batchnorm_forward(x, virtual_batch=4)
    assert_close(y, np.maximum(y0.astype(np.float64) + z, 0), np.float32, what="y")
    dres = np.empty_like(dy)
    dx, dg, db = pybn.batchnorm_backward(dy, x, m, i, activation="relu", y=y, dresidual=dres)
    np.testing.assert_array_equal(dres, dy * (y > 0))
    dx2, dg2, db2 = pybn.batchnorm_backward(dy * (y > 0), x, m, i)
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_array_equal(dg, dg2)


def test_inference_ignores_virtual_batch(rng):
    x = randn(rng, (8, 3, 5), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    a = pybn.batchnorm(x, None, None, rm, rv, training=False, virtual_batch=3)  # 3 does not divide 8: unused
    np.testing.assert_array_equal(a, pybn.batchnorm(x, None, None, rm, rv, training=False))


def test_layer_trains_with_ghost_batches(rng):
    layer = pybn.BatchNorm(4, virtual_batch=2, activation="relu")
    x = randn(rng, (8, 4, 3), np.float32, loc=2.0)
    y = layer(x)
    ey, _, _, erm, erv = reference(x, 1.0, 0.0, np.zeros(4), np.ones(4), 2, 1e-5, 0.1, 1, 1)
    assert_close(y, np.maximum(ey, 0), np.float32, what="y")
    assert_close(layer.running_mean, erm, np.float32, what="running_mean")
    assert_close(layer.running_var, erv, np.float32, what="running_var")
    dx = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape and layer.grad_gamma.shape == (4,)
    layer.eval()
    np.testing.assert_array_equal(layer(x), pybn.batchnorm(x, layer.gamma, layer.beta, layer.running_mean,
                                                           layer.running_var, training=False, activation="relu"))
    assert "virtual_batch=2" in repr(layer)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(virtual_batch=3), ValueError, "must divide the batch size 8"),
    (dict(virtual_batch=0), ValueError, "virtual_batch must be >= 1"),
    (dict(virtual_batch=2.0), TypeError, "virtual_batch must be None or an int"),
    (dict(virtual_batch=True), TypeError, "virtual_batch must be None or an int"),
    (dict(virtual_batch=2, axis=0), ValueError, "channel axis cannot be 0"),
    (dict(virtual_batch=2, renorm=(2.0, 1.0)), ValueError, "cannot be combined"),
    (dict(virtual_batch=8, running_var_correction=1), ValueError, "in each of 8 ghost batches"),
])
def test_errors_change_nothing(rng, kwargs, err, match):
    x = randn(rng, (8, 3), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full_like(x, 7)
    if kwargs.get("running_var_correction") == 1:
        kwargs = dict(kwargs, virtual_batch=1)  # one sample per group: no unbiased variance
        match = "in each of 8 ghost batches"
    with pytest.raises(err, match=match):
        pybn.batchnorm(x, None, None, rm, rv, out=out, **kwargs)
    assert (out == 7).all() and (rm == 0).all() and (rv == 1).all()


def test_backward_errors(rng):
    x = randn(rng, (8, 3), np.float32)
    y, m, i = pybn.batchnorm_forward(x, virtual_batch=2)
    with pytest.raises(ValueError, match="do not split the batch size 8"):
        pybn.batchnorm_backward(x, x, m[:3], i[:3])
    with pytest.raises(ValueError, match="training-mode backward"):
        pybn.batchnorm_backward(x, x, m, i, training=False)
    with pytest.raises(ValueError, match=r"must have shape \(4, 3\)"):
        pybn.batchnorm_backward(x, x, m, i[:, :2])
    with pytest.raises(TypeError, match="must have dtype float32"):
        pybn.batchnorm_backward(x, x, m.astype(np.float64), i)


def test_c_abi_checks(rng):
    """virtual_batches through the C block: not a divisor, given statistics, renorm, inference."""
    from test_abi_v2 import LIB as lib, ForwardParams, View, last_error
    x = np.ones((6, 2, 3), np.float32)
    y = np.zeros_like(x)
    view = View(6, 2, 3, 0)

    def call(**fields):
        p = ForwardParams(size=ctypes.sizeof(ForwardParams), training=1, running_var_correction=1, eps=1e-5,
                          momentum=0.1, **fields)
        return lib.pybn_forward_v2(view, x.ctypes.data, y.ctypes.data, ctypes.byref(p))

    assert call(virtual_batches=4) == 1 and "must divide the view's outer size 6" in last_error()
    assert call(virtual_batches=-1) == 1 and "virtual_batches must be >= 0" in last_error()
    cmean = np.zeros(2)
    assert call(virtual_batches=2, count=cmean.ctypes.data, mean=cmean.ctypes.data, m2=cmean.ctypes.data) == 1
    assert "for training with batch statistics" in last_error()
    assert (y == 0).all()
    sm, si = np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32)
    assert call(virtual_batches=3, save_mean=sm.ctypes.data, save_invstd=si.ctypes.data) == 0
    np.testing.assert_array_equal(sm, 1.0)
