"""Batch renormalisation (Ioffe 2017) against a float64 reference written from the paper's
formulas: forward output, r and d (clipped), the running-statistics update, and the backward
with r and d treated as constants; the layer over several steps; errors."""
import numpy as np
import pytest

import pybn
from conftest import FLOAT_DTYPES, assert_close, randn


def reference(x, gamma, beta, rm, rv, r_max, d_max, eps, momentum, axis=1):
    """Ioffe (2017), Algorithm 1, in float64: returns y, r, d, new running mean / var."""
    x64 = np.moveaxis(x.astype(np.float64), axis, -1)
    red = tuple(range(x64.ndim - 1))
    n = x64.size // x64.shape[-1]
    mu = x64.mean(axis=red)
    var = x64.var(axis=red)
    sigma = np.sqrt(var + eps)
    sigma_run = np.sqrt(rv.astype(np.float64) + eps)
    r = np.clip(sigma / sigma_run, 1 / r_max, r_max)
    d = np.clip((mu - rm.astype(np.float64)) / sigma_run, -d_max, d_max)
    xhat = (x64 - mu) / sigma
    y = gamma.astype(np.float64) * (r * xhat + d) + beta.astype(np.float64)
    new_rm = (1 - momentum) * rm.astype(np.float64) + momentum * mu
    new_rv = (1 - momentum) * rv.astype(np.float64) + momentum * var * n / (n - 1)
    return np.moveaxis(y, -1, axis), r, d, new_rm, new_rv, xhat, sigma


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((4, 3, 50), 1), ((6, 4, 4, 5), -1), ((300, 7), 1)])
@pytest.mark.parametrize("limits", [(3.0, 5.0), (1.0, 0.0), (1.2, 0.1)], ids=["wide", "plain-bn", "clipped"])
def test_renorm_forward_and_backward_match_the_paper(rng, dtype, shape, axis, limits):
    r_max, d_max = limits
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    x = randn(rng, shape, dtype, loc=0.7, scale=1.7)
    dy = randn(rng, shape, dtype)
    g, b = rng.uniform(0.5, 2, c).astype(pd), rng.standard_normal(c).astype(pd)
    rm, rv = (rng.standard_normal(c) * 0.5).astype(pd), rng.uniform(0.3, 4, c).astype(pd)
    rm1, rv1 = rm.copy(), rv.copy()
    y, mean, invstd, r, d = pybn.batchnorm_forward(x, g, b, rm1, rv1, momentum=0.2, axis=axis, renorm=limits)
    ey, er, ed, erm, erv, xhat, sigma = reference(x, g, b, rm, rv, r_max, d_max, 1e-5, 0.2, axis)
    assert_close(y, ey, dtype, what="y")
    assert_close(r, er, pd, what="r")
    assert_close(d, ed, pd, what="d")
    assert_close(rm1, erm, pd, what="running_mean")
    assert_close(rv1, erv, pd, what="running_var")
    if limits == (1.0, 0.0):  # r = 1, d = 0: plain BN, bit for bit
        np.testing.assert_array_equal(y, pybn.batchnorm(x, g, b, rm.copy(), rv.copy(), momentum=0.2, axis=axis))
    # backward with r, d constants: gamma' = gamma * r, dgamma = r sum(dy xhat) + d sum(dy)
    dx, dg, db = pybn.batchnorm_backward(dy, x, mean, invstd, g, axis=axis, renorm=(r, d))
    dy64 = np.moveaxis(dy.astype(np.float64), axis, -1)
    red = tuple(range(dy64.ndim - 1))
    n = dy64.size // c
    ga = g.astype(np.float64) * er / sigma
    edx = ga * (dy64 - dy64.mean(axis=red) - xhat * (dy64 * xhat).mean(axis=red))
    edg = er * (dy64 * xhat).sum(axis=red) + ed * dy64.sum(axis=red)
    scale = np.abs(dy64).sum(axis=red)
    assert_close(dx, np.moveaxis(edx, -1, axis), dtype, what="dx")
    assert_close(dg, edg, pd, scale=scale * (1 + np.abs(ed)), what="dgamma")
    assert_close(db, dy64.sum(axis=red), pd, scale=scale, what="dbeta")
    assert n > 1


def test_renorm_layer_over_steps_and_eval(rng):
    bn = pybn.BatchNorm(3, renorm=(1.5, 0.5), momentum=0.3)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(4):
        x = (rng.standard_normal((10, 3, 4)) * (1 + step) + step).astype(np.float32)
        y = bn(x)
        ey, er, ed, rm, rv, _, _ = reference(x, bn.gamma, bn.beta, rm.astype(np.float32), rv.astype(np.float32),
                                            1.5, 0.5, 1e-5, 0.3)
        assert_close(y, ey, np.float32, what=f"step {step} y")
        dx = bn.backward(np.ones_like(x))
        assert dx.shape == x.shape and np.isfinite(dx).all()
    assert_close(bn.running_mean, rm, np.float32)
    bn.eval()
    xe = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(bn(xe), pybn.batchnorm(xe, bn.gamma, bn.beta, bn.running_mean, bn.running_var,
                                                         training=False))


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"renorm": (0.5, 1.0)}, ValueError, "r_max >= 1"),
    ({"renorm": (2.0, -1.0)}, ValueError, "d_max >= 0"),
    ({"renorm": 2.0}, TypeError, "pair"),
    ({"renorm": (2.0, 1.0), "running_var": None}, ValueError, "both running statistics"),
    ({"renorm": (2.0, 1.0), "training": False}, ValueError, "training=True"),
])
def test_renorm_errors_change_nothing(kwargs, exc, msg):
    x = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    args = dict(running_mean=rm, running_var=rv)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        pybn.batchnorm(x, **args)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    with pytest.raises(ValueError, match="training-mode"):
        pybn.batchnorm_backward(x, x, rm, rv, renorm=(rv, rm), training=False)
