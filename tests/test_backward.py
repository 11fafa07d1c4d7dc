"""Backward (training and frozen statistics) against the float64 reference, and a finite-
difference check of the gradient in float64."""
import numpy as np
import pytest

import pybn
import reference as ref
from conftest import FLOAT_DTYPES, assert_close, randn
from test_forward import LAYOUTS, ids


def _sum_scale(dy, x, axis):
    """Size of per-channel sums (tolerance is relative to sum |terms|, not to the result)."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return np.abs(dy.astype(np.float64)).sum(axis=red) * (1 + np.abs(x.astype(np.float64)).max())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=ids(LAYOUTS))
def test_backward_train_matches_reference(rng, shape, axis, dtype):
    x = randn(rng, shape, dtype, loc=0.5, scale=2.0)
    dy = randn(rng, shape, dtype)
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    gamma = randn(rng, c, pd)
    y, mean, invstd = pybn.batchnorm_forward(x, gamma, axis=axis)
    dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, gamma, axis=axis)
    edx, edgamma, edbeta = ref.backward_train(dy, x, gamma, axis=axis)
    assert dx.dtype == x.dtype and dgamma.dtype == pd and dbeta.dtype == pd
    assert_close(dx, edx, dtype, what="dx")
    scale = _sum_scale(dy, x, axis)
    assert_close(dgamma, edgamma, pd if dtype in (np.float32, np.float64) else dtype, scale=scale, what="dgamma")
    assert_close(dbeta, edbeta, pd if dtype in (np.float32, np.float64) else dtype, scale=scale, what="dbeta")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", LAYOUTS[:8], ids=ids(LAYOUTS[:8]))
def test_backward_frozen_matches_reference(rng, shape, axis, dtype):
    x = randn(rng, shape, dtype, loc=1.0)
    dy = randn(rng, shape, dtype)
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    gamma = randn(rng, c, pd)
    rm, rv = randn(rng, c, pd), np.abs(randn(rng, c, pd)) + 0.5
    _, mean, invstd = pybn.batchnorm_forward(x, gamma, None, rm, rv, training=False, axis=axis)
    dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, gamma, training=False, axis=axis)
    edx, edgamma, edbeta = ref.backward_frozen(dy, x, mean, invstd, gamma, axis=axis)
    assert_close(dx, edx, dtype, what="dx")
    scale = _sum_scale(dy, x, axis)
    sd = pd if dtype in (np.float32, np.float64) else dtype
    assert_close(dgamma, edgamma, sd, scale=scale, what="dgamma")
    assert_close(dbeta, edbeta, sd, scale=scale, what="dbeta")


def _loss(x, gamma, beta, w, axis):
    return float((pybn.batchnorm(x, gamma, beta, axis=axis).astype(np.float64) * w).sum())


@pytest.mark.parametrize("shape,axis", [((5, 3, 4), 1), ((6, 4), 1), ((3, 2, 3, 4), -1)])
def test_gradient_matches_finite_differences(rng, shape, axis):
    x = randn(rng, shape, np.float64, loc=0.3)
    c = shape[axis]
    gamma, beta = randn(rng, c, np.float64), randn(rng, c, np.float64)
    w = randn(rng, shape, np.float64)  # loss = sum(w * y), so dy = w
    y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = pybn.batchnorm_backward(w, x, mean, invstd, gamma, axis=axis)
    h = 1e-6

    def central(arr, idx, fn):
        saved = arr[idx]
        arr[idx] = saved + h
        up = fn()
        arr[idx] = saved - h
        down = fn()
        arr[idx] = saved
        return (up - down) / (2 * h)

    loss = lambda: _loss(x, gamma, beta, w, axis)
    for idx in [tuple(int(rng.integers(0, s)) for s in shape) for _ in range(8)]:
        np.testing.assert_allclose(dx[idx], central(x, idx, loss), rtol=1e-6, atol=1e-7)
    for ci in range(c):
        np.testing.assert_allclose(dgamma[ci], central(gamma, ci, loss), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(dbeta[ci], central(beta, ci, loss), rtol=1e-6, atol=1e-7)


def test_backward_out_and_in_place(rng):
    x = randn(rng, (6, 3, 10), np.float32)
    dy = randn(rng, (6, 3, 10), np.float32)
    _, mean, invstd = pybn.batchnorm_forward(x)
    expected = ref.backward_train(dy, x)[0]
    out = np.empty_like(x)
    assert pybn.batchnorm_backward(dy, x, mean, invstd, out=out)[0] is out
    assert_close(out, expected, np.float32)
    dyc = dy.copy()
    assert pybn.batchnorm_backward(dyc, x, mean, invstd, out=dyc)[0] is dyc
    assert_close(dyc, expected, np.float32)


def test_backward_with_dy_in_another_layout(rng):
    x = randn(rng, (4, 5, 6, 3), np.float32)
    dy = np.asfortranarray(randn(rng, (4, 5, 6, 3), np.float32))
    _, mean, invstd = pybn.batchnorm_forward(x, axis=-1)
    dx = pybn.batchnorm_backward(dy, x, mean, invstd, axis=-1)[0]
    assert_close(dx, ref.backward_train(dy, x, axis=-1)[0], np.float32)
