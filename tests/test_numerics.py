"""Data far from zero: statistics and outputs stay exact to float32 rounding where the float32
mean alone is already wrong by a visible fraction of the spread."""
import numpy as np
import pytest

import pybn
import reference as ref
from conftest import randn

EPS32 = 2.0 ** -23


def _naive_float32_y(x, axis):
    """What a float32 pipeline that rounds the mean to float32 gets (PyTorch's CPU/CUDA path)."""
    _, mean, invstd, _ = ref.forward_train(x, axis=axis)
    sh = [1] * x.ndim
    sh[axis] = -1
    m32 = mean.astype(np.float32).reshape(sh)
    return ((x - m32) * invstd.astype(np.float32).reshape(sh)).astype(np.float32)


# mean / std = 1e4 and 1e5, a million or more values per channel, NCHW and channels-last
CASES = [
    (1e4, 1.0, (64, 2, 128, 128), 1),
    (1e4, 1.0, (64, 128, 128, 2), -1),
    (1e5, 1.0, (64, 2, 128, 128), 1),
    (1e3, 1e-2, (1 << 20, 2), 1),
]


@pytest.mark.parametrize("loc,scale,shape,axis", CASES, ids=[f"{c[0]:g}/{c[1]:g}-{c[2]}" for c in CASES])
def test_far_from_zero_forward_is_exact_to_float32(rng, loc, scale, shape, axis):
    x = randn(rng, shape, np.float32, loc=loc, scale=scale)
    count, mean, m2 = pybn.batch_stats(x, axis=axis)
    n, emean, evar = ref.stats(x, axis=axis)
    # float64 statistics: the mean to float64 precision, the variance to float32 rounding
    assert np.abs(mean - emean).max() <= 1e-9 * scale
    assert np.abs(m2 / count / evar - 1).max() <= EPS32
    y = pybn.batchnorm(x, axis=axis)
    ey = ref.forward_train(x, axis=axis)[0]
    err = np.abs(y - ey).max()
    # within 2 units in the last place of the largest output (the rounding of y itself)
    bound = 2 * np.spacing(np.float32(np.abs(ey).max()))
    assert err <= bound, f"max |y - ref| = {err:.3g} > {bound:.3g}"
    # the data is hard: rounding the mean to float32 alone costs far more than that
    naive = np.abs(_naive_float32_y(x, axis % x.ndim) - ey).max()
    assert naive > 20 * bound, f"naive float32 error {naive:.3g} is not large on this data"


@pytest.mark.parametrize("loc,scale,shape,axis", CASES[:2], ids=["nchw", "nhwc"])
def test_far_from_zero_backward_is_exact_to_float32(rng, loc, scale, shape, axis):
    x = randn(rng, shape, np.float32, loc=loc, scale=scale)
    dy = randn(rng, shape, np.float32)
    _, mean, invstd = pybn.batchnorm_forward(x, axis=axis)
    dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, axis=axis)
    edx, edgamma, edbeta = ref.backward_train(dy, x, axis=axis)
    # relative to the spread of dx, as for y; the saved float32 mean alone is off by ~5e-4 sigma
    assert np.abs(dx - edx).max() <= 8 * EPS32 * np.abs(edx).max()
    n = dy.size // dy.shape[axis]
    assert np.abs(dgamma - edgamma).max() <= 1e-6 * np.sqrt(n)
    assert np.abs(dbeta - edbeta).max() <= 1e-6 * np.sqrt(n)


def test_float64_far_from_zero(rng):
    x = randn(rng, (32, 3, 64, 64), np.float64, loc=1e5, scale=1.0)
    _, mean, _ = pybn.batch_stats(x)
    emean = ref.stats(x)[1]
    # both means are float64 roundings of the same sum: a few units in the last place apart
    assert np.abs(mean - emean).max() <= 4 * np.spacing(1e5)
    y = pybn.batchnorm(x)
    ey = ref.forward_train(x)[0]
    assert np.abs(y - ey).max() <= 1e-10 * np.abs(ey).max()


def test_constant_channel_has_zero_variance(rng):
    x = np.full((50, 3, 7), 12345.678, np.float32)
    count, mean, m2 = pybn.batch_stats(x)
    np.testing.assert_array_equal(m2, 0.0)
    np.testing.assert_array_equal(mean, np.float64(np.float32(12345.678)))
    y = pybn.batchnorm(x, eps=1e-5)
    np.testing.assert_array_equal(y, 0.0)
