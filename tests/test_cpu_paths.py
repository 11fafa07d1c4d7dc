"""CPU paths: every compiled instruction-set path against the reference, bitwise determinism
across thread counts and repeated runs, the channel-group and streaming-store paths, and the
thread / ISA controls."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pybn
import reference as ref
from conftest import FLOAT_DTYPES, assert_close, randn

ISAS = pybn.cpu_isas()

# NCHW rows (row path), channels-last (column path), small C, inner below/above the row threshold;
# big enough to run on several threads.
# row path: long rows read in memory order (inner 1155, 1105), short rows channel by channel
# (inner 63), rows longer than a segment with parts that end inside a row (inner 17030);
# column path: the rest. C = 8 and 12 (the first and the last): the fused kernels take per-core
# channel blocks on up to 2 and 3 threads, channel groups on more.
SHAPES = [((16, 8, 33, 35), 1), ((64, 15, 15, 12), -1), ((2000, 3, 20), 1), ((300, 5, 31), 1), ((40, 2, 65, 17), 1),
          ((50, 6, 7, 9), 1), ((20, 2, 130, 131), 1), ((40, 12, 45), 1)]


@pytest.fixture
def isa(request):
    pybn.set_cpu_isa(request.param)
    assert pybn.cpu_isa() == request.param
    yield request.param
    pybn.set_cpu_isa("")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=[f"{s}-ax{a}" for s, a in SHAPES])
def test_every_isa_path_matches_reference(isa, rng, shape, axis, dtype):
    x = randn(rng, shape, dtype, loc=3.0, scale=2.0)
    dy = randn(rng, shape, dtype)
    c = shape[axis]
    pd = np.float64 if dtype == np.float64 else np.float32
    gamma, beta = randn(rng, c, pd), randn(rng, c, pd)
    rm, rv = np.zeros(c, pd), np.ones(c, pd)
    y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta, rm, rv, axis=axis)
    assert_close(y, ref.forward_train(x, gamma, beta, axis=axis)[0], dtype, what=f"{isa} y")
    yi = pybn.batchnorm(x, gamma, beta, rm, rv, training=False, axis=axis)
    assert_close(yi, ref.forward_infer(x, rm, rv, gamma, beta, axis=axis), dtype, what=f"{isa} y infer")
    dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, gamma, axis=axis)
    edx, edg, edb = ref.backward_train(dy, x, gamma, axis=axis)
    assert_close(dx, edx, dtype, what=f"{isa} dx")
    scale = np.abs(dy.astype(np.float64)).sum() / c * (1 + np.abs(x.astype(np.float64)).max())
    sd = pd if dtype in (np.float32, np.float64) else dtype
    assert_close(dgamma, edg, sd, scale=scale, what=f"{isa} dgamma")
    assert_close(dbeta, edb, sd, scale=scale, what=f"{isa} dbeta")


HALF_DTYPES = [d for d in FLOAT_DTYPES if d.itemsize == 2]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(4, 3, 1000), (700, 5), (300, 5, 3)], ids=str)
def test_16bit_outputs_round_like_numpy(isa, rng, shape, dtype):
    """y = x * gamma + 0 in float32 (inference with mean 0, variance 1, eps 0, beta 0), rounded to
    x's dtype: every value, ties, overflow to inf, subnormals, inf and NaN in the vector paths
    and the tails, bit for bit what NumPy / ml_dtypes round to."""
    info = np.finfo(dtype) if dtype == np.float16 else pytest.importorskip("ml_dtypes").finfo(dtype)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, float(info.max), -float(info.max),
                        float(info.tiny), float(info.tiny) / 4, float(info.eps), 1.0, -1.0], np.float32)
    x = (rng.standard_normal(shape) * 100).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 4 * special.size)] = np.tile(special, 4)
    x = x.astype(dtype)
    c = shape[1]
    gamma = (1 + rng.standard_normal(c) * 0.01).astype(np.float32)
    gamma[0] = 1.0 + 2.0 ** -8  # pushes max to overflow, ties between neighbours
    y = pybn.batchnorm(x, gamma, np.zeros(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32),
                       training=False, eps=0.0)
    cshape = (1, c) + (1,) * (len(shape) - 2)
    with np.errstate(over="ignore", invalid="ignore"):
        expect = (x.astype(np.float32) * gamma.reshape(cshape) + np.float32(0)).astype(dtype)  # + beta: -0 -> +0
    nan = np.isnan(expect.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(y.astype(np.float32)), nan)
    np.testing.assert_array_equal(y.view(np.uint16)[~nan], expect.view(np.uint16)[~nan])


def _all_outputs(x, dy, axis):
    y, mean, invstd = pybn.batchnorm_forward(x, axis=axis)
    cnt, m, m2 = pybn.batch_stats(x, axis=axis)
    back = pybn.batchnorm_backward(dy, x, mean, invstd, axis=axis)
    frozen = pybn.batchnorm_backward(dy, x, mean, invstd, axis=axis, training=False)
    sums = pybn.backward_reduce(dy, x, mean, axis=axis)
    return [a.tobytes() for a in (y, mean, invstd, m, m2, *back, *frozen, *sums)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=[f"{s}-ax{a}" for s, a in SHAPES])
def test_bitwise_identical_for_every_thread_count(rng, shape, axis, dtype):
    x = randn(rng, shape, dtype, loc=1e3)
    dy = randn(rng, shape, dtype)
    try:
        pybn.set_num_threads(1)
        expected = _all_outputs(x, dy, axis)
        for n in range(1, 9):
            pybn.set_num_threads(n)
            assert pybn.get_num_threads() == n
            for _ in range(2):
                assert _all_outputs(x, dy, axis) == expected, f"{n} threads differ"
    finally:
        pybn.set_num_threads(0)  # back to the default


_CHILD = r"""
import json, sys, numpy as np, pybn
sys.path.insert(0, {tests!r})
from test_cpu_paths import SHAPES, _all_outputs
rng = np.random.default_rng(7)
dtypes = [np.float32, np.float16]
try:
    import ml_dtypes
    dtypes.append(ml_dtypes.bfloat16)
except ImportError:
    pass
out = {{}}
for dtype in dtypes:  # 16-bit outputs have their own streaming stores
    for i, (shape, axis) in enumerate(SHAPES):
        x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        out[f"{{np.dtype(dtype).name}}-{{i}}"] = [b.hex() for b in _all_outputs(x, dy, axis)]
print(json.dumps({{"isa": pybn.cpu_isa(), "threads": pybn.get_num_threads(), "out": out}}))
"""


def _child(env_extra, stderr=None):
    env = dict(os.environ, **env_extra)
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    if stderr is not None:
        stderr.append(run.stderr)
    return json.loads(run.stdout)


def test_channel_groups_and_streaming_stores_change_no_bit():
    # on 2 threads the fused kernels take per-core channel blocks where C >= 8 (SHAPES); without
    # them (PYBN_CORE_BUDGET=0) they work by channel groups, and a tiny cache budget makes those
    # groups one channel each and the writes non-temporal: every result must be bitwise the same
    default = _child({"OMP_NUM_THREADS": "2"})
    groups = _child({"OMP_NUM_THREADS": "2", "PYBN_CORE_BUDGET": "0"})
    blocked = _child({"OMP_NUM_THREADS": "2", "PYBN_CORE_BUDGET": "0", "PYBN_CACHE_BUDGET": "4096"})
    assert groups["out"] == default["out"]
    assert blocked["out"] == default["out"]


def test_environment_controls_isa_and_threads():
    lowest = ISAS[-1]
    child = _child({"PYBN_CPU_ISA": lowest, "OMP_NUM_THREADS": "3"})
    assert child["isa"] == lowest and child["threads"] == 3
    err = []
    ignored = _child({"PYBN_CPU_ISA": "no-such-isa"}, err)  # unknown: the best path, said once
    assert ignored["isa"] == ISAS[0]
    warning = f"pybn: warning: PYBN_CPU_ISA=no-such-isa is not a CPU path this machine supports ({','.join(ISAS)}); using {ISAS[0]}"
    assert err[0].count(warning) == 1, err[0]


def test_thread_and_isa_argument_errors():
    with pytest.raises(ValueError, match="n must be >= 0"):
        pybn.set_num_threads(-1)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        pybn.set_num_threads(2.0)
    with pytest.raises(ValueError, match=r"name must be one of the compiled paths .* got 'sse9'"):
        pybn.set_cpu_isa("sse9")
    if "avx512" not in ISAS and pybn.cpu_isa() != "neon":
        with pytest.raises(ValueError, match="does not support 'avx512'|got 'avx512'"):
            pybn.set_cpu_isa("avx512")
    assert pybn.cpu_isa() == ISAS[0]
