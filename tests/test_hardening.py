"""Hardening at the Python level: primitives' bad inputs, empty tensors, the non-finite data
policy, concurrent calls from many threads, and a tensor of more than 2^31 elements."""
import concurrent.futures as cf
import os

import numpy as np
import pytest

import pybn


# ------------------------------- primitives' bad-input table --------------------------------

def _prim():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    c, m, q = pybn.batch_stats(x)
    return dict(x=x, dy=np.ones_like(x), count=c, mean=m, m2=q,
                mean32=m.astype(np.float32), invstd=np.ones(3, np.float32),
                s0=np.zeros(3), s1=np.zeros(3), rm=np.zeros(3, np.float32), rv=np.ones(3, np.float32))


PRIMITIVE_CASES = [
    ("stats-axis", lambda k: pybn.batch_stats(k["x"], axis=5), ValueError, r"axis must be in \[-3, 3\).*got 5"),
    ("stats-dtype", lambda k: pybn.batch_stats(k["x"].astype(np.int16)), TypeError, r"x must have dtype .*got int16"),
    ("merge-1d", lambda k: pybn.merge_stats(k["count"], k["mean"], k["m2"]), ValueError, r"count must be 2-D"),
    ("merge-dtype", lambda k: pybn.merge_stats(k["count"][None].astype(np.float32), k["mean"][None], k["m2"][None]),
     TypeError, r"count must have dtype float64, got float32"),
    ("merge-shapes", lambda k: pybn.merge_stats(k["count"][None], k["mean"][None, :2], k["m2"][None]),
     ValueError, r"mean must have the shape of count \(1, 3\), got \(1, 2\)"),
    ("merge-empty", lambda k: pybn.merge_stats(*(np.zeros((0, 3)),) * 3), ValueError, r"at least one partial"),
    ("normalize-count-shape", lambda k: pybn.normalize(k["x"], k["count"][:2], k["mean"], k["m2"]),
     ValueError, r"count must have shape \(3,\), got \(2,\)"),
    ("normalize-count-1", lambda k: pybn.normalize(k["x"], np.ones(3), k["mean"], k["m2"], running_mean=k["rm"],
                                                   running_var=k["rv"]), ValueError, r"count\[0\] must be >= 2, got 1"),
    ("normalize-m2-dtype", lambda k: pybn.normalize(k["x"], k["count"], k["mean"], k["m2"].astype(np.float32)),
     TypeError, r"m2 must have dtype float64, got float32"),
    ("normalize-momentum", lambda k: pybn.normalize(k["x"], k["count"], k["mean"], k["m2"], running_mean=k["rm"],
                                                    running_var=k["rv"], momentum=float("nan")),
     ValueError, r"momentum must be in \[0, 1\], got nan"),
    ("reduce-mean-missing", lambda k: pybn.backward_reduce(k["dy"], k["x"], None), ValueError, r"mean is required"),
    ("reduce-mean-dtype", lambda k: pybn.backward_reduce(k["dy"], k["x"], k["mean"]), TypeError,
     r"mean must have dtype float32.*got float64"),
    ("elementwise-count-0", lambda k: pybn.backward_elementwise(k["dy"], k["x"], k["mean32"], k["invstd"], None,
                                                                np.zeros(3), k["s0"], k["s1"]),
     ValueError, r"count\[0\] must be >= 1, got 0"),
    ("elementwise-sum-shape", lambda k: pybn.backward_elementwise(k["dy"], k["x"], k["mean32"], k["invstd"], None,
                                                                  k["count"], k["s0"][:1], k["s1"]),
     ValueError, r"sum_dy must have shape \(3,\), got \(1,\)"),
    ("elementwise-out-overlap", lambda k: pybn.backward_elementwise(k["dy"], k["x"], k["mean32"], k["invstd"], None,
                                                                    k["count"], k["s0"], k["s1"], out=k["x"][::-1]),
     ValueError, r"out overlaps the input x"),
]


@pytest.mark.parametrize("call,exc,msg", [c[1:] for c in PRIMITIVE_CASES], ids=[c[0] for c in PRIMITIVE_CASES])
def test_primitive_errors_change_nothing(call, exc, msg):
    k = _prim()
    snap = {n: a.copy() for n, a in k.items()}
    with pytest.raises(exc, match=msg):
        call(k)
    for n, a in k.items():
        np.testing.assert_array_equal(a, snap[n], err_msg=f"{n} changed by a failed call")


# ----------------------------------------- empty tensors ----------------------------------------

@pytest.mark.parametrize("shape,axis", [((0, 3, 4), 1), ((0, 5), 1), ((0, 4, 4, 3), -1)])
def test_empty_batch_inference_returns_empty_training_refuses(shape, axis):
    C = shape[axis]
    x = np.zeros(shape, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y = pybn.batchnorm(x, None, None, rm, rv, training=False, axis=axis)
    assert y.shape == shape and y.dtype == np.float32
    bn = pybn.BatchNorm(C, axis=axis).eval()
    assert bn(x).shape == shape and bn.backward(x).shape == shape
    with pytest.raises(ValueError, match="at least 2 values per channel, got 0"):
        pybn.batchnorm(x, None, None, rm, rv, axis=axis)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    count, mean, m2 = pybn.batch_stats(x, axis=axis)  # defined: count 0, mean 0, M2 0
    assert (count == 0).all() and (mean == 0).all() and (m2 == 0).all()


# -------------------------------------- non-finite data ----------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_stays_in_its_channel_and_spares_running_stats(layout, bad):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 4, 6, 6)).astype(np.float32)
    x[3, 2, 1, 4] = bad
    axis = 1
    if layout == "nhwc":
        x, axis = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), -1
    rm, rv = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    y, mean, invstd = pybn.batchnorm_forward(x, None, None, rm, rv, axis=axis, momentum=0.25)
    yc = np.moveaxis(y, axis, 0)
    assert np.isfinite(np.delete(yc, 2, axis=0)).all()  # the other channels are untouched by it
    assert not np.isfinite(yc[2]).all()
    assert rm[2] == np.float32(0.5) and rv[2] == np.float32(2.0)  # the safe policy: not poisoned
    ok = [0, 1, 3]
    assert np.isfinite(rm[ok]).all() and (rm[ok] != 0.5).all() and (rv[ok] != 2.0).all()
    dx, dg, db = pybn.batchnorm_backward(np.ones_like(x), x, mean, invstd, axis=axis)
    assert np.isfinite(np.delete(np.moveaxis(dx, axis, 0), 2, axis=0)).all()
    assert np.isfinite(np.delete(dg, 2)).all() and np.isfinite(np.delete(db, 2)).all()


def test_layer_survives_a_bad_batch():
    """One batch with an Inf does not poison the running statistics of later inference."""
    rng = np.random.default_rng(3)
    bn = pybn.BatchNorm(3)
    for step in range(4):
        x = rng.standard_normal((16, 3)).astype(np.float32)
        if step == 1:
            x[0, 1] = np.inf
        bn(x)
    assert np.isfinite(bn.running_mean).all() and np.isfinite(bn.running_var).all()
    assert np.isfinite(bn.eval()(rng.standard_normal((4, 3)).astype(np.float32))).all()


# -------------------------------------------- threads -------------------------------------------

def test_concurrent_calls_equal_sequential_results():
    rng = np.random.default_rng(4)
    jobs = []
    for i in range(24):
        shape, axis = [((8, 6, 40), 1), ((64, 7), 1), ((4, 9, 9, 5), -1)][i % 3]
        dtype = [np.float32, np.float64][i % 2]
        x = (rng.standard_normal(shape) * (i + 1) + 10 * i).astype(dtype)
        jobs.append((x, (rng.standard_normal(shape)).astype(dtype), axis))

    def work(job):
        x, dy, axis = job
        C = x.shape[axis]
        rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
        y, m, r = pybn.batchnorm_forward(x, None, None, rm, rv, axis=axis)
        dx, dg, db = pybn.batchnorm_backward(dy, x, m, r, axis=axis)
        err = None
        try:
            pybn.batchnorm(x, np.ones(C + 1, x.dtype), axis=axis)
        except ValueError as e:
            err = str(e)
        return [a.tobytes() for a in (y, m, r, dx, dg, db, rm, rv)], err

    sequential = [work(j) for j in jobs]
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            concurrent = list(pool.map(work, jobs))
            assert concurrent == sequential  # bitwise, errors included


def test_c_level_errors_are_per_thread():
    """Each thread's failing C call leaves its own pybn_last_error (the Python layer reads it
    right after the call, in the same thread)."""
    import pybn._core as core
    barrier = __import__("threading").Barrier(6)

    def fail(i):
        msg = None
        try:
            pybn.merge_stats(*(np.zeros((i + 1, 2)),) * 3)  # valid: no error
            barrier.wait()
            pybn.batchnorm(np.ones((0, 2 + i), np.float32))  # no value per channel
        except ValueError as e:
            msg = str(e)
        return msg

    with cf.ThreadPoolExecutor(max_workers=6) as pool:
        msgs = list(pool.map(fail, range(6)))
    for i, m in enumerate(msgs):
        assert m is not None and f"channel axis of size {2 + i}" in m
    assert core.version()


# ------------------------------------ more than 2^31 elements -----------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYBN_SKIP_HUGE") == "1", reason="PYBN_SKIP_HUGE=1")
def test_more_than_2_31_elements_cpu():
    """float16 x of 2^31 + 2^20 elements (4.3 GB; 8.6 GB with y): 64-bit indexing end to end.
    The values repeat a pattern whose statistics are known exactly; values past index 2^31 are
    checked. Set PYBN_SKIP_HUGE=1 on machines with less than ~12 GB of free memory."""
    C, inner = 2, 2 ** 30 + 2 ** 19  # each channel has more than 2^30 values
    x = np.empty((1, C, inner), np.float16)
    pattern = np.array([-1.5, 0.5, 2.0, 3.0], np.float16)  # mean 1, biased var 2.875
    x[0, 0] = np.tile(pattern, inner // 4)
    x[0, 1] = np.tile(pattern * 2, inner // 4)  # mean 2, var 11.5
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = pybn.batchnorm_forward(x, None, None, rm, rv, eps=0.0, momentum=1.0)
    np.testing.assert_allclose(mean, [1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(invstd, 1 / np.sqrt([2.875, 11.5]), rtol=1e-6)
    n = C * inner
    np.testing.assert_allclose(rv, np.array([2.875, 11.5]) * (inner / (inner - 1)), rtol=1e-6)
    tail = y.reshape(-1)[n - 8:]  # past 2^31
    expected = ((np.tile(pattern * 2, 2).astype(np.float64) - 2.0) / np.sqrt(11.5)).astype(np.float16)
    np.testing.assert_array_equal(tail, expected)
    del y
    count, m, q = pybn.batch_stats(x)
    assert count[1] == inner and m[1] == 2.0 and abs(q[1] / inner - 11.5) < 1e-9
