"""GPU path: CUDA kernels through CuPy arrays, __cuda_array_interface__ and DLPack producers,
against the float64 reference; determinism; streams. Skipped without a GPU, CuPy or CUDA build."""
import numpy as np
import pytest

import pybn
import reference as ref
from conftest import BFLOAT16, FLOAT_DTYPES, assert_close
from test_forward import LAYOUTS, ids

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu
try:
    _have_gpu = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # no driver
    _have_gpu = False
if not (_have_gpu and pybn.has_cuda()):
    pytest.skip("needs a CUDA GPU and a pybn built with CUDA", allow_module_level=True)


def _cupy_holds(dtype):
    try:
        cp.asarray(np.zeros(1, dtype))
        return True
    except Exception:  # CuPy versions without bfloat16
        return False


GPU_DTYPES = [d for d in FLOAT_DTYPES if _cupy_holds(d)]


def host(a):
    return cp.asnumpy(a)


def randn_dev(rng, shape, dtype, loc=0.0, scale=1.0):
    h = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    return h, cp.asarray(h)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=ids(LAYOUTS))
def test_gpu_forward_and_backward_match_reference(rng, shape, axis, dtype):
    xh, x = randn_dev(rng, shape, dtype, loc=0.5, scale=2.0)
    dyh, dy = randn_dev(rng, shape, dtype)
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    gh, g = randn_dev(rng, c, pd)
    bh, b = randn_dev(rng, c, pd)
    rm, rv = cp.zeros(c, pd), cp.ones(c, pd)
    y, mean, invstd = pybn.batchnorm_forward(x, g, b, rm, rv, momentum=0.3, axis=axis)
    assert isinstance(y, cp.ndarray) and y.dtype == x.dtype
    ey, emean, einvstd, evar_u = ref.forward_train(xh, gh, bh, axis=axis)
    assert_close(host(y), ey, dtype, what="y")
    assert_close(host(mean), emean, pd, what="mean")
    assert_close(host(invstd), einvstd, pd, what="invstd")
    assert_close(host(rm), ref.ema(np.zeros(c), emean, 0.3), pd, what="running_mean")
    assert_close(host(rv), ref.ema(np.ones(c), evar_u, 0.3), pd, what="running_var")
    dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, g, axis=axis)
    edx, edg, edb = ref.backward_train(dyh, xh, gh, axis=axis)
    assert_close(host(dx), edx, dtype, what="dx")
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    scale = np.abs(dyh.astype(np.float64)).sum(axis=red) * (1 + np.abs(xh.astype(np.float64)).max())
    sd = pd if dtype in (np.float32, np.float64) else dtype
    assert_close(host(dgamma), edg, sd, scale=scale, what="dgamma")
    assert_close(host(dbeta), edb, sd, scale=scale, what="dbeta")
    # inference and frozen backward
    y2 = pybn.batchnorm(x, g, b, rm, rv, training=False, axis=axis)
    assert_close(host(y2), ref.forward_infer(xh, host(rm), host(rv), gh, bh, axis=axis), dtype, what="y infer")
    _, m2, r2 = pybn.batchnorm_forward(x, g, b, rm, rv, training=False, axis=axis)
    dx2 = pybn.batchnorm_backward(dy, x, m2, r2, g, training=False, axis=axis)[0]
    assert_close(host(dx2), ref.backward_frozen(dyh, xh, host(m2), host(r2), gh, axis=axis)[0], dtype, what="dx frozen")


def test_gpu_far_from_zero_is_exact_to_float32(rng):
    xh, x = randn_dev(rng, (64, 2, 128, 128), np.float32, loc=1e4)
    y = pybn.batchnorm(x)
    ey = ref.forward_train(xh)[0]
    assert np.abs(host(y) - ey).max() <= 2 * np.spacing(np.float32(np.abs(ey).max()))


def test_gpu_results_are_bitwise_deterministic(rng):
    _, x = randn_dev(rng, (32, 16, 33, 17), np.float32, loc=3)
    _, dy = randn_dev(rng, (32, 16, 33, 17), np.float32)
    first = pybn.batchnorm_forward(x)
    back = pybn.batchnorm_backward(dy, x, first[1], first[2])
    for _ in range(5):
        again = pybn.batchnorm_forward(x)
        for a, b in zip(first, again):
            assert host(a).tobytes() == host(b).tobytes()
        for a, b in zip(back, pybn.batchnorm_backward(dy, x, first[1], first[2])):
            assert host(a).tobytes() == host(b).tobytes()


def test_gpu_work_goes_on_the_given_stream(rng):
    xh, x = randn_dev(rng, (64, 8, 64, 64), np.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        y = pybn.batchnorm(x)
    s.synchronize()
    assert_close(host(y), ref.forward_train(xh)[0], np.float32)
    s2 = cp.cuda.Stream(non_blocking=True)
    y2 = pybn.batchnorm(x, stream=s2)
    s2.synchronize()
    assert host(y2).tobytes() == host(y).tobytes()
    y3 = pybn.batchnorm(x, stream=s2.ptr)  # a raw cudaStream_t
    s2.synchronize()
    assert host(y3).tobytes() == host(y).tobytes()


def test_gpu_cuda_array_interface_producer(rng):
    class Producer:  # a foreign CUDA array exposing only __cuda_array_interface__
        def __init__(self, a):
            self._a = a
            self.__cuda_array_interface__ = a.__cuda_array_interface__

    xh, x = randn_dev(rng, (8, 3, 5, 5), np.float32)
    rm = cp.zeros(3, np.float32)
    y = pybn.batchnorm(Producer(x), None, None, Producer(rm), None, momentum=1.0)
    assert_close(host(y), ref.forward_train(xh)[0], np.float32)
    assert_close(host(rm), ref.stats(xh)[1], np.float32)  # updated in the producer's memory


def test_gpu_dlpack_producer_torch(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    xt = torch.randn(8, 4, 6, 6, device="cuda")
    rm = torch.zeros(4, device="cuda")
    y = pybn.batchnorm(xt, None, None, rm, None, momentum=1.0)
    xh = xt.cpu().numpy()
    assert_close(host(y), ref.forward_train(xh)[0], np.float32)
    assert_close(rm.cpu().numpy(), ref.stats(xh)[1], np.float32)
    # channels-last torch tensor: NHWC memory with NCHW shape, used without a copy
    xcl = xt.contiguous(memory_format=torch.channels_last)
    assert_close(host(pybn.batchnorm(xcl)), ref.forward_train(xh)[0], np.float32)


def test_gpu_empty_batch_inference(rng):
    x = cp.empty((0, 3, 4), cp.float32)
    y = pybn.batchnorm(x, None, None, cp.zeros(3, cp.float32), cp.ones(3, cp.float32), training=False)
    assert y.shape == (0, 3, 4)


@pytest.mark.parametrize("axis", [1, -1])
def test_gpu_non_finite_policy(rng, axis):
    """As on the CPU: NaN stays in its channel and spares that channel's running statistics."""
    x = rng.standard_normal((6, 4, 40)).astype(np.float32)
    x[2, 1, 7] = np.nan
    if axis == -1:
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    rm, rv = cp.full(4, 0.5, cp.float32), cp.full(4, 2.0, cp.float32)
    y = host(pybn.batchnorm(cp.asarray(x), None, None, rm, rv, axis=axis))
    yc = np.moveaxis(y, axis, 0)
    assert np.isfinite(np.delete(yc, 1, axis=0)).all() and not np.isfinite(yc[1]).all()
    rm, rv = host(rm), host(rv)
    assert rm[1] == np.float32(0.5) and rv[1] == np.float32(2.0)
    assert (np.delete(rm, 1) != 0.5).all() and np.isfinite(rv).all()


def test_gpu_zero_size_channel_axis(rng):
    x = cp.zeros((3, 0, 4), cp.float16)
    assert pybn.batch_stats(x)[0].shape == (0,)
    assert pybn.batchnorm(x).shape == (3, 0, 4)


def test_gpu_bfloat16_through_torch(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or BFLOAT16 not in GPU_DTYPES:
        pytest.skip("needs PyTorch with CUDA and a CuPy that holds bfloat16")
    xt = torch.randn(16, 3, 9, 9, device="cuda").to(torch.bfloat16)
    y = pybn.batchnorm(xt)  # a bfloat16 DLPack / CAI producer
    yt = torch.from_dlpack(y) if not isinstance(y, torch.Tensor) else y
    ref_y = ref.forward_train(xt.float().cpu().numpy())[0]
    assert_close(yt.float().cpu().numpy(), ref_y, BFLOAT16)


def test_gpu_mixing_host_and_device_is_a_type_error(rng):
    _, x = randn_dev(rng, (4, 3), np.float32)
    with pytest.raises(TypeError, match="same device"):
        pybn.batchnorm(x, np.ones(3, np.float32))


def test_gpu_primitives_merge_like_cpu(rng):
    xh, x = randn_dev(rng, (30, 4, 7), np.float64, loc=50)
    parts = [x[:0], x[:13], x[13:]]
    stats = [pybn.batch_stats(p) for p in parts]
    count, mean, m2 = pybn.merge_stats(*(cp.stack([s[i] for s in stats]) for i in range(3)))
    n, emean, evar = ref.stats(xh)
    np.testing.assert_allclose(host(mean), emean, rtol=1e-12)
    np.testing.assert_allclose(host(m2) / n, evar, rtol=1e-11)
    y = pybn.normalize(x, count, mean, m2)[0]
    assert_close(host(y), ref.forward_train(xh)[0], np.float64)


def test_gpu_layer(rng):
    bn = pybn.BatchNorm(5, device="cuda")
    xh, x = randn_dev(rng, (16, 5, 8, 8), np.float32, loc=1)
    y = bn(x)
    dx = bn.backward(cp.ones_like(x))
    assert_close(host(y), ref.forward_train(xh)[0], np.float32)
    assert_close(host(dx), ref.backward_train(np.ones_like(xh), xh)[0], np.float32)
    assert isinstance(bn.running_mean, cp.ndarray) and bn.num_batches_tracked == 1


@pytest.mark.slow
def test_gpu_more_than_2_31_elements():
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of free GPU memory")
    x = cp.ones((2 ** 31 + 64,), cp.float16).reshape(-1, 2)
    x[::2, 0] = 3  # channel 0 alternates 3, 1: mean 2, var 1
    y = pybn.batchnorm(x, eps=0.0)
    assert float(y[0, 0]) == 1.0 and float(y[1, 0]) == -1.0 and float(y[-1, 0]) == -1.0


# ---- ABI level 2, conventions and the review's defects (issue 15) ------------------------------

@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("shape,axis", [((6, 5, 40), 1), ((700, 40), 1), ((4, 3, 3, 37), -1)])
def test_gpu_matches_cpu_every_op(rng, shape, axis, correction):
    """Same method on both devices: agreement to a few float32 ulps on every op."""
    xh = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dyh = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    gh, bh = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    outs = {}
    for dev, xp in (("cpu", np), ("gpu", cp)):
        x, dy, g, b = (xp.asarray(a) for a in (xh, dyh, gh, bh))
        rm, rv = xp.zeros(c, np.float32), xp.ones(c, np.float32)
        y, mean, invstd = pybn.batchnorm_forward(x, g, b, rm, rv, axis=axis, running_var_correction=correction)
        dx, dg, db = pybn.batchnorm_backward(dy, x, mean, invstd, g, axis=axis)
        yi = pybn.batchnorm(x, g, b, rm, rv, training=False, axis=axis)
        dxf, _, _ = pybn.batchnorm_backward(dy, x, rm, invstd, g, training=False, axis=axis)
        stats = pybn.batch_stats(x, axis=axis)
        sums = pybn.backward_reduce(dy, x, mean, axis=axis)
        outs[dev] = [host(a) if dev == "gpu" else a for a in (y, mean, invstd, rm, rv, dx, dg, db, yi, dxf, *stats, *sums)]
    for i, (a, b) in enumerate(zip(outs["cpu"], outs["gpu"])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"output {i}")


def test_gpu_work_is_captured_on_a_non_default_stream(rng):
    """A CUDA graph captured on a side stream replays the whole training step: every launch and
    no allocation went to that stream (capture fails otherwise)."""
    x = cp.asarray(rng.standard_normal((8, 4, 50)).astype(np.float32))
    rm, rv = cp.zeros(4, cp.float32), cp.ones(4, cp.float32)
    y = cp.empty_like(x)
    ref_y = pybn.batchnorm(x)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        # warm-up on the capture stream: CuPy's pool then holds a workspace block for it, so the
        # captured call allocates no device memory
        pybn.batchnorm(x, out=y)
        stream.synchronize()
        stream.begin_capture()
        pybn.batchnorm(x, None, None, rm, rv, out=y)
        graph = stream.end_capture()
    y[...] = 0
    graph.launch(stream)
    stream.synchronize()
    cp.testing.assert_array_equal(y, ref_y)
    assert float(rv.sum()) != 4.0


def test_gpu_torch_side_stream_producer_through_dlpack(rng):
    torch = pytest.importorskip("torch")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        t = torch.randn(16, 3, 1000, device="cuda")
        t.mul_(3).add_(1)  # still running on the side stream when pybn is called
    y = pybn.batchnorm(t)  # DLPack stream handshake: CuPy's stream waits for `side`
    np.testing.assert_allclose(host(y), host(pybn.batchnorm(cp.asarray(t.cpu().numpy()))), atol=1e-5)


def test_gpu_requires_grad_tensor_is_a_clear_type_error():
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3, device="cuda", requires_grad=True)
    with pytest.raises(TypeError, match="detach"):
        pybn.batchnorm(t)


def test_gpu_read_only_cuda_array_interface_output_is_refused(rng):
    x = cp.asarray(rng.standard_normal((4, 3)).astype(np.float32))

    class ReadOnly:
        def __init__(self, a):
            self.a = a
            cai = dict(a.__cuda_array_interface__)
            cai["data"] = (cai["data"][0], True)
            self.__cuda_array_interface__ = cai

    out = cp.zeros_like(x)
    with pytest.raises(ValueError, match="out is read-only"):
        pybn.batchnorm(x, out=ReadOnly(out))
    rv = cp.ones(3, cp.float32)
    with pytest.raises(ValueError, match="running_var is read-only"):
        pybn.batchnorm(x, None, None, cp.zeros(3, cp.float32), ReadOnly(rv))


def test_gpu_count_checks_match_the_cpu(rng):
    x = cp.asarray(rng.standard_normal((1, 3, 1)).astype(np.float32))
    count, mean, m2 = pybn.batch_stats(x)
    with pytest.raises(ValueError, match=r"count\[0\] must be >= 2, got 1"):
        pybn.normalize(x, count, mean, m2, running_var=cp.ones(3, cp.float32))
    pybn.normalize(x, count, mean, m2, running_var=cp.ones(3, cp.float32), running_var_correction=0)
    with pytest.raises(ValueError, match=r"counts\[1\]\[2\] must be >= 0"):
        bad = cp.ones((2, 3))
        bad[1, 2] = -1
        pybn.merge_stats(bad, cp.zeros((2, 3)), cp.zeros((2, 3)))


def test_gpu_zero_inner_with_channels_does_not_divide_by_zero():
    x = cp.zeros((4, 3, 0), cp.float32)
    count, mean, m2 = pybn.batch_stats(x)
    assert host(count).tolist() == [0, 0, 0]
    sums = pybn.backward_reduce(x, x, cp.zeros(3, cp.float32))
    assert all(host(s).tolist() == [0, 0, 0] for s in sums)
    dx, dg, db = pybn.batchnorm_backward(x, x, cp.zeros(3, cp.float32), cp.ones(3, cp.float32), training=False)
    assert dx.shape == (4, 3, 0) and host(db).tolist() == [0, 0, 0]


def test_gpu_out_of_memory_is_memory_error_and_changes_nothing():
    pool = cp.get_default_memory_pool()
    free = cp.cuda.runtime.memGetInfo()[0]
    x = cp.ones((2, 1 << 20, 1), cp.float32)  # the workspace grows with C x chunks
    rm, rv = cp.zeros(1 << 20, cp.float32), cp.ones(1 << 20, cp.float32)
    limit = pool.get_limit()
    try:
        pool.set_limit(size=pool.used_bytes() + 1024)
        with pytest.raises(MemoryError):
            pybn.batchnorm(x, None, None, rm, rv, out=x)
    finally:
        pool.set_limit(size=limit)
    assert float(rm.sum()) == 0 and float(rv.sum()) == 1 << 20 and float(x.sum()) == 2 << 20
    assert free > 0


@pytest.mark.parametrize("shape,axis,k", [((12, 5, 40), 1, 4), ((8, 6, 6, 5), -1, 2), ((64, 300), 1, 16),
                                          ((8, 3, 600), 1, 2)])
@pytest.mark.parametrize("relu", [False, True])
def test_gpu_ghost_batches_match_cpu(rng, shape, axis, k, relu):
    """virtual_batch on the GPU: the groups reduced one after another, one step per channel, one
    grouped elementwise sweep; the same as the CPU within float32 rounding."""
    xh, x = randn_dev(rng, shape, np.float32, loc=1.0, scale=2.0)
    dyh, dy = randn_dev(rng, shape, np.float32)
    c = shape[axis]
    act = "relu" if relu else None
    rmh, rvh = np.zeros(c, np.float32), np.ones(c, np.float32)
    rm, rv = cp.asarray(rmh), cp.asarray(rvh)
    yh, mh, ih = pybn.batchnorm_forward(xh, None, None, rmh, rvh, axis=axis, virtual_batch=k, activation=act)
    y, m, i = pybn.batchnorm_forward(x, None, None, rm, rv, axis=axis, virtual_batch=k, activation=act)
    assert m.shape == (shape[0] // k, c)
    for got, want, what in ((y, yh, "y"), (m, mh, "mean"), (i, ih, "invstd"), (rm, rmh, "running_mean"),
                            (rv, rvh, "running_var")):
        assert_close(host(got), want, np.float32, what=what)
    dxh, dgh, dbh = pybn.batchnorm_backward(dyh, xh, mh, ih, axis=axis, activation=act, y=yh if relu else None)
    dx, dg, db = pybn.batchnorm_backward(dy, x, m, i, axis=axis, activation=act, y=y if relu else None)
    red = tuple(j for j in range(len(shape)) if j != axis % len(shape))
    scale = np.abs(dyh).sum(axis=red)
    assert_close(host(dx), dxh, np.float32, what="dx")
    assert_close(host(dg), dgh, np.float32, scale=scale, what="dgamma")
    assert_close(host(db), dbh, np.float32, scale=scale, what="dbeta")


# ---- every branch of the launch plans (cuda/plan.hpp; the branches each shape takes are the
# host simulation's, tests/c/cuda_plan.cpp) ----------------------------------------------------

PLAN_CASES = [
    ((32, 64, 3136), 1, np.float32, 0),    # NCHW, 16-byte units, 25 partials a channel, fused stage 2
    ((8, 16, 49), 1, np.float32, 0),       # NCHW, inner 49: scalar units, one block a channel
    ((1, 4, 224 * 224), 1, np.float32, 0),  # one long row a channel, split over 25 blocks
    ((32, 64, 3136), 1, np.float32, 1),    # misaligned by one value: scalar units
    ((9, 8, 64), 1, np.float16, 0),        # 8-value units
    ((7, 6, 40), 1, np.float64, 0),        # 2-value units
    ((5000, 3), 1, np.float32, 0),         # channels-last C = 3: tx = 4, 64 rows a step
    ((100352, 64), 1, np.float32, 0),      # NHWC 32x56x56x64: tx = 16, fused over 98 chunks
    ((4096, 1024), 1, np.float32, 0),      # BatchNorm1d: 256 chunks, separate finish kernel
    ((4096, 1024), 1, np.float16, 0),      # 16-bit channels-last: 4-channel (8-byte) units
    ((300, 37), 1, np.float32, 0),         # C not a multiple of the unit: scalar units
]


def _misaligned(xp, a, offset):
    """a copy of `a` that starts `offset` values into a fresh buffer (not 16-byte aligned)."""
    if offset == 0:
        return xp.asarray(a)
    buf = xp.zeros(a.size + offset, a.dtype)
    buf[offset:] = xp.asarray(a).ravel()
    return buf[offset:].reshape(a.shape)


@pytest.mark.parametrize("shape,axis,dtype,offset", PLAN_CASES, ids=lambda c: str(c))
def test_gpu_every_plan_branch_matches_cpu(rng, shape, axis, dtype, offset):
    """Forward (training, inference), backward and both reductions on each plan branch: the same
    method as the CPU, so agreement to a few ulps of the dtype's accumulation."""
    xh = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dyh = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    acc = np.float64 if dtype == np.float64 else np.float32
    gh, bh = rng.uniform(0.5, 2, c).astype(acc), rng.standard_normal(c).astype(acc)
    outs = {}
    for dev, xp in (("cpu", np), ("gpu", cp)):
        x = _misaligned(xp, xh, offset) if dev == "gpu" else xh
        dy = _misaligned(xp, dyh, offset) if dev == "gpu" else dyh
        g, b = xp.asarray(gh), xp.asarray(bh)
        rm, rv = xp.zeros(c, acc), xp.ones(c, acc)
        y, mean, invstd = pybn.batchnorm_forward(x, g, b, rm, rv, axis=axis)
        dx, dg, db = pybn.batchnorm_backward(dy, x, mean, invstd, g, axis=axis)
        yr = pybn.batchnorm(x, g, b, axis=axis, activation="relu", residual=dy)
        yi = pybn.batchnorm(x, g, b, rm, rv, training=False, axis=axis)
        stats = pybn.batch_stats(x, axis=axis)
        outs[dev] = [host(a) if dev == "gpu" else a for a in (y, mean, invstd, rm, rv, dx, dg, db, yr, yi, *stats)]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for i, (a, b) in enumerate(zip(outs["cpu"], outs["gpu"])):
        if a.dtype == np.float16:  # one 16-bit rounding apart at most
            np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=2e-3, atol=2e-3,
                                       err_msg=f"output {i}")
        else:
            np.testing.assert_allclose(b, a, rtol=tol, atol=tol, err_msg=f"output {i}")


def test_gpu_reduction_with_a_separate_finish_kernel():
    """One channel of 2^27 values: 8192 partials, more than the last block merges (kFusedMerges),
    so stage 2 is its own kernel; against float64 statistics computed by CuPy."""
    x = cp.random.default_rng(3).standard_normal((1, 1, 1 << 27), dtype=cp.float32) * 2 + 5
    count, mean, m2 = pybn.batch_stats(x, axis=1)
    xd = x.astype(cp.float64)
    assert float(count[0]) == 1 << 27
    np.testing.assert_allclose(float(mean[0]), float(xd.mean()), rtol=1e-12)
    np.testing.assert_allclose(float(m2[0]), float(((xd - xd.mean()) ** 2).sum()), rtol=1e-9)
