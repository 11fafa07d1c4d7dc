"""The composable primitives (what synchronised BN builds on): statistics of parts merged with
unequal and zero counts equal the statistics of the whole; normalise and backward from merged
statistics/sums equal the fused entry points."""
import numpy as np
import pytest

import pybn
import reference as ref
from conftest import assert_close, randn

SPLITS = [[5, 0, 11, 1, 3], [20], [0, 20], [2, 18]]


@pytest.mark.parametrize("sizes", SPLITS, ids=[str(s) for s in SPLITS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merged_parts_equal_the_whole(rng, sizes, dtype):
    x = randn(rng, (sum(sizes), 4, 6), dtype, loc=100.0, scale=2.0)
    parts = np.split(x, np.cumsum(sizes)[:-1])
    stats = [pybn.batch_stats(p) for p in parts]
    count, mean, m2 = pybn.merge_stats(*(np.stack([s[i] for s in stats]) for i in range(3)))
    n, emean, evar = ref.stats(x)
    np.testing.assert_array_equal(count, n)
    np.testing.assert_allclose(mean, emean, rtol=1e-12)
    np.testing.assert_allclose(m2 / count, evar, rtol=1e-6 if dtype == np.float32 else 1e-11)

    # normalise every part with the merged statistics: together they are the fused forward
    pd = np.dtype(dtype)
    rm, rv = np.zeros(4, pd), np.ones(4, pd)
    ys = [pybn.normalize(p, count, mean, m2, running_mean=rm.copy(), running_var=rv.copy())[0]
          for p in parts]
    y_whole, smean, sinvstd = pybn.batchnorm_forward(x, None, None, rm, rv)
    assert_close(np.concatenate(ys), y_whole, dtype)

    # backward: sums of the parts, all-reduced, give the fused gradients
    dy = randn(rng, x.shape, dtype)
    dys = np.split(dy, np.cumsum(sizes)[:-1])
    sums = [pybn.backward_reduce(g, p, smean) for g, p in zip(dys, parts)]
    total = [np.sum([s[i] for s in sums], axis=0) for i in range(3)]
    dxs = [pybn.backward_elementwise(g, p, smean, sinvstd, None, count, *total)[0]
           for g, p in zip(dys, parts)]
    dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, smean, sinvstd)
    assert_close(np.concatenate(dxs), dx, dtype)
    _, pdg, pdb = pybn.backward_elementwise(dys[0], parts[0], smean, sinvstd, None, count, *total)
    assert_close(pdg, dgamma, dtype, scale=np.abs(dy).sum())
    assert_close(pdb, dbeta, dtype, scale=np.abs(dy).sum())


def test_normalize_updates_running_stats_from_merged_count(rng):
    x = randn(rng, (6, 2), np.float32)
    count, mean, m2 = pybn.batch_stats(x)
    rm, rv = np.zeros(2, np.float32), np.zeros(2, np.float32)
    pybn.normalize(x, count, mean, m2, running_mean=rm, running_var=rv, momentum=1.0)
    _, emean, _, evar_u = ref.forward_train(x)
    assert_close(rm, emean, np.float32)
    assert_close(rv, evar_u, np.float32)


def test_normalize_rejects_too_small_count(rng):
    x = randn(rng, (6, 2), np.float32)
    rv = np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"count\[0\] must be >= 2, got 1"):
        pybn.normalize(x, np.ones(2), np.zeros(2), np.zeros(2), running_var=rv)
    np.testing.assert_array_equal(rv, 1.0)


def test_merge_stats_argument_errors():
    with pytest.raises(TypeError, match="count must have dtype float64, got float32"):
        pybn.merge_stats(np.ones((2, 3), np.float32), np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"mean must have the shape of count \(2, 3\), got \(2, 4\)"):
        pybn.merge_stats(np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"counts\[1\]\[2\] must be >= 0, got -1"):
        c = np.ones((2, 3))
        c[1, 2] = -1
        pybn.merge_stats(c, np.ones((2, 3)), np.ones((2, 3)))


def test_all_empty_parts_merge_to_zero():
    count, mean, m2 = pybn.merge_stats(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((3, 2)))
    np.testing.assert_array_equal(count, 0)
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(m2, 0)
