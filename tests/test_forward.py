"""Forward (training and inference) and running statistics against the float64 reference, for
every layout, rank 2..5, odd sizes and every dtype."""
import numpy as np
import pytest

import pybn
import reference as ref
from conftest import FLOAT_DTYPES, assert_close, randn

# (shape, axis): NC, NCL, NCHW, NHWC, NCDHW, middle axes, axis 0, C=1, one spatial element,
# sizes that are no multiple of any vector width, inner just below/above the row-walk threshold.
LAYOUTS = [
    ((16, 5), 1), ((7, 3), 0), ((9, 4, 33), 1), ((4, 6, 5, 7), 1), ((4, 5, 7, 6), -1),
    ((2, 3, 4, 5, 6), 1), ((3, 4, 5, 6), 2), ((2, 3, 4, 5, 6), 3), ((13, 1, 9), 1),
    ((37, 6, 1, 1), 1), ((3, 5, 63), 1), ((3, 5, 65), 1), ((2, 3, 257), 1), ((300, 17), 1),
    ((2, 130, 3), 1), ((5, 3, 2, 2, 3), -1),
]


def ids(layouts):
    return [f"{s}-ax{a}" for s, a in layouts]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=ids(LAYOUTS))
def test_forward_train_matches_reference(rng, shape, axis, dtype):
    x = randn(rng, shape, dtype, loc=0.5, scale=2.0)
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    gamma, beta = randn(rng, c, pd), randn(rng, c, pd)
    rm, rv = randn(rng, c, pd), np.abs(randn(rng, c, pd)) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta, rm, rv, momentum=0.3, axis=axis)
    ey, emean, einvstd, evar_unbiased = ref.forward_train(x, gamma, beta, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.dtype == pd and invstd.dtype == pd and mean.shape == (c,)
    assert_close(y, ey, dtype, what="y")
    # per-channel outputs are float32 / float64: held to the accuracy of that type
    assert_close(mean, emean, pd, what="mean")
    assert_close(invstd, einvstd, pd, what="invstd")
    assert_close(rm, ref.ema(rm0, emean, 0.3), pd, what="running_mean")
    assert_close(rv, ref.ema(rv0, evar_unbiased, 0.3), pd, what="running_var")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", LAYOUTS[:8], ids=ids(LAYOUTS[:8]))
def test_forward_infer_matches_reference(rng, shape, axis, dtype):
    x = randn(rng, shape, dtype, loc=-1.0, scale=3.0)
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    gamma, beta = randn(rng, c, pd), randn(rng, c, pd)
    rm, rv = randn(rng, c, pd), np.abs(randn(rng, c, pd)) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta, rm, rv, training=False, axis=axis)
    assert_close(y, ref.forward_infer(x, rm, rv, gamma, beta, axis=axis), dtype, what="y")
    np.testing.assert_array_equal(rm, rm0)  # inference leaves running statistics alone
    np.testing.assert_array_equal(rv, rv0)
    np.testing.assert_array_equal(mean, rm0)
    assert_close(invstd, 1 / np.sqrt(rv0.astype(np.float64) + 1e-5), pd, what="invstd")


def test_defaults_without_gamma_beta_and_running_stats(rng):
    x = randn(rng, (8, 3, 4, 4), np.float32)
    y = pybn.batchnorm(x)
    assert_close(y, ref.forward_train(x)[0], np.float32)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.1])
def test_momentum_edges(rng, momentum):
    x = randn(rng, (10, 4, 3), np.float64, loc=2.0)
    rm, rv = np.full(4, 7.0), np.full(4, 3.0)
    pybn.batchnorm(x, None, None, rm, rv, momentum=momentum)
    _, mean, _, var_u = ref.forward_train(x)
    if momentum == 0.0:  # running statistics unchanged, exactly
        np.testing.assert_array_equal(rm, 7.0)
        np.testing.assert_array_equal(rv, 3.0)
    if momentum == 1.0:  # the batch statistics, with the unbiased variance
        np.testing.assert_allclose(rm, mean, rtol=1e-12)
        np.testing.assert_allclose(rv, var_u, rtol=1e-12)
    np.testing.assert_allclose(rm, ref.ema(np.full(4, 7.0), mean, momentum), rtol=1e-12)
    np.testing.assert_allclose(rv, ref.ema(np.full(4, 3.0), var_u, momentum), rtol=1e-12)


def test_only_one_running_stat(rng):
    x = randn(rng, (10, 4), np.float32)
    rm = np.zeros(4, np.float32)
    pybn.batchnorm(x, running_mean=rm, momentum=1.0)
    assert_close(rm, ref.stats(x)[1], np.float32)


@pytest.mark.parametrize("make", [
    lambda a: a[:, :, ::2, :],                       # strided slice
    lambda a: a.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2),  # channels-last memory, NCHW shape
    lambda a: np.asfortranarray(a),                  # Fortran order
    lambda a: a[::-1],                               # negative stride
], ids=["slice", "channels_last", "fortran", "reversed"])
def test_non_contiguous_inputs(rng, make):
    base = randn(rng, (6, 5, 8, 7), np.float32, loc=3.0)
    x = make(base)
    y = pybn.batchnorm(x)
    assert y.shape == x.shape
    assert_close(y, ref.forward_train(x)[0], np.float32)


def test_host_addresses_are_numpys(rng):
    """The binding reads host addresses through the buffer protocol without a format string:
    the address NumPy reports, for any dtype, strides, read-only or empty array."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    base = randn(rng, (6, 5), np.float32)
    frozen = base.copy()
    frozen.flags.writeable = False
    for a in (base, base[::-1, 1::2], base.T, frozen, np.zeros((0, 3), np.float32),
              base.astype(np.float16), base.astype(ml_dtypes.bfloat16)):
        assert pybn._core.host_address(a) == a.__array_interface__["data"][0]
    g = np.ones(5, np.float32)
    g.flags.writeable = False
    assert_close(pybn.batchnorm(frozen, g), ref.forward_train(frozen)[0], np.float32)


def test_channels_last_memory_is_used_in_place_and_kept(rng):
    nhwc = randn(rng, (4, 6, 5, 3), np.float32)
    x = nhwc.transpose(0, 3, 1, 2)  # NCHW shape over NHWC memory: no copy needed
    y = pybn.batchnorm(x, axis=1)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous  # output keeps the input's memory layout
    assert_close(y, ref.forward_train(x)[0], np.float32)


def test_out_argument(rng):
    x = randn(rng, (6, 3, 10), np.float32)
    expected = ref.forward_train(x)[0]
    out = np.empty_like(x)
    assert pybn.batchnorm(x, out=out) is out
    assert_close(out, expected, np.float32)
    strided = np.empty((6, 3, 20), np.float32)[:, :, ::2]
    assert pybn.batchnorm(x, out=strided) is strided
    assert_close(strided, expected, np.float32)
    xc = x.copy()
    assert pybn.batchnorm(xc, out=xc) is xc  # exact in place
    assert_close(xc, expected, np.float32)


def test_strided_running_stats_are_updated(rng):
    x = randn(rng, (12, 3, 5), np.float32)
    buf = np.zeros((3, 2), np.float32)
    rm = buf[:, 0]
    pybn.batchnorm(x, running_mean=rm, momentum=1.0)
    assert_close(buf[:, 0], ref.stats(x)[1], np.float32)
    np.testing.assert_array_equal(buf[:, 1], 0)


def test_results_are_bitwise_deterministic(rng):
    x = randn(rng, (16, 8, 33, 17), np.float32, loc=5)
    first = pybn.batchnorm_forward(x)
    for _ in range(3):
        again = pybn.batchnorm_forward(x)
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()


def test_nan_stays_in_its_channel(rng):
    x = randn(rng, (8, 4, 6), np.float32)
    x[3, 2, 1] = np.nan
    y, mean, invstd = pybn.batchnorm_forward(x)
    assert np.isnan(y[:, 2]).all()
    keep = [0, 1, 3]
    assert np.isfinite(y[:, keep]).all() and np.isfinite(mean[keep]).all()
    assert_close(y[:, keep], ref.forward_train(x[:, keep])[0], np.float32)


def test_empty_batch_in_inference_returns_empty():
    x = np.empty((0, 3, 4), np.float32)
    y = pybn.batchnorm(x, None, None, np.zeros(3, np.float32), np.ones(3, np.float32), training=False)
    assert y.shape == (0, 3, 4)


def test_concurrent_calls_from_threads_match_sequential(rng):
    from concurrent.futures import ThreadPoolExecutor

    xs = [randn(rng, (8, 6, 40, 40), np.float32, loc=i) for i in range(8)]
    expected = [pybn.batchnorm_forward(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:  # the GIL is released inside every call
        got = list(pool.map(pybn.batchnorm_forward, xs))
    for e, g in zip(expected, got):
        for a, b in zip(e, g):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
def test_fast_path_takes_every_dtype_and_matches_the_general_path(rng, dtype, monkeypatch):
    """The Cython fast path (plain NumPy calls, default options and the fused epilogues) serves
    float16, bfloat16, float32 and float64 alike, fresh, with out= and in place, and gives the
    general path's results bit for bit."""
    from pybn import _core

    shape = (6, 5, 7, 3)
    x = randn(rng, shape, dtype, loc=1.0)
    dy = randn(rng, shape, dtype)
    z = randn(rng, shape, dtype)
    pd = np.float64 if dtype == np.float64 else np.float32
    g, b = randn(rng, 5, pd), randn(rng, 5, pd)
    rm0, rv0 = randn(rng, 5, pd), np.abs(randn(rng, 5, pd)) + 0.5

    def calls():
        rm, rv = rm0.copy(), rv0.copy()
        y, mean, invstd = pybn.batchnorm_forward(x, g, b, rm, rv)
        out = np.empty_like(x)
        y_out = pybn.batchnorm(x, g, b, rm, rv, training=True, out=out)
        assert y_out is out
        yi = pybn.batchnorm(x, g, b, rm, rv, training=False)
        dx, dg, db = pybn.batchnorm_backward(dy, x, mean, invstd, g)
        dx_out = np.empty_like(x)
        assert pybn.batchnorm_backward(dy, x, mean, invstd, g, out=dx_out)[0] is dx_out
        # the fused epilogues: ReLU, + residual (fresh, into out=, in place on the residual)
        yr = pybn.batchnorm(x, g, b, rm, rv, activation="relu")
        yz, zm, zs = pybn.batchnorm_forward(x, g, b, residual=z, activation="relu")
        zi = z.copy()
        assert pybn.batchnorm(x, g, b, rm, rv, training=False, residual=zi, out=zi) is zi
        dxr, dgr, dbr = pybn.batchnorm_backward(dy, x, zm, zs, g, activation="relu", y=yz)
        dres = np.empty_like(x)
        dxz = pybn.batchnorm_backward(dy, x, zm, zs, g, activation="relu", y=yz, dresidual=dres)[0]
        return [y, mean, invstd, y_out, yi, rm, rv, dx, dg, db, dx_out, yr, yz, zm, zs, zi, dxr, dgr, dbr, dres, dxz]

    taken = []
    fast_f, fast_b = _core.fast_forward, _core.fast_backward

    def count(fn, name):
        def wrapped(*a):
            r = fn(*a)
            taken.append((name, r is not None))
            return r
        return wrapped

    monkeypatch.setattr(_core, "fast_forward", count(fast_f, "forward"))
    monkeypatch.setattr(_core, "fast_backward", count(fast_b, "backward"))
    fast = calls()
    assert taken and all(ok for _, ok in taken), f"the fast path refused {dtype}: {taken}"
    monkeypatch.setattr(_core, "fast_forward", lambda *a: None)
    monkeypatch.setattr(_core, "fast_backward", lambda *a: None)
    general = calls()
    for i, (a, e) in enumerate(zip(fast, general)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes(), f"result {i} differs between the fast and general paths"
