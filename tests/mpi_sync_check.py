"""Synchronised BN on several ranks against one process over the concatenated batch.

    mpiexec -n 3 python -m mpi4py tests/mpi_sync_check.py 5,0,2 [cpu|cuda]

The first argument gives each rank's batch size (0 allowed). Every rank builds the same global
batches from the same seeds, keeps its slice, and checks, over several training steps (SGD on
gamma / beta between them) and an eval step: outputs, input gradients, parameter gradients and
running statistics against a single-process pybn.BatchNorm on the whole batch (to float32 /
float64 rounding), and that the running statistics are bitwise identical on every rank. Then
the error rules: a global count of 1 fails on every rank, and an argument error on one rank
fails there and, naming it, on the others, changing nothing. Run under `python -m mpi4py` so
that a failed assertion on any rank aborts the job (exit code != 0) instead of hanging it.
"""
import sys

import numpy as np
from mpi4py import MPI

import pybn
from pybn.distributed import SyncBatchNorm, sync_batchnorm_backward, sync_batchnorm_forward

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
sizes = [int(s) for s in sys.argv[1].split(",")]
device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
assert len(sizes) == size, f"{len(sizes)} batch sizes for {size} ranks"
offsets = np.concatenate([[0], np.cumsum(sizes)])
lo, hi = int(offsets[rank]), int(offsets[rank + 1])
N = int(offsets[-1])

if device == "cuda":
    import cupy as cp

    to_dev, to_host = cp.asarray, cp.asnumpy
else:
    to_dev = to_host = np.asarray

checks = 0


def close(actual, expected, dtype, what):
    """|actual - expected| <= k * eps(dtype) * max|expected| (rounding of a different but exact
    summation order; k = 16 for float32 as both sides round ~N terms, 64 for float64, 4 for
    float16: its rounding of the output dominates)."""
    global checks
    a = np.asarray(to_host(actual), np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"rank {rank} {what}: shape {a.shape} != {e.shape}"
    if a.size == 0:
        return
    k = {"float16": 4, "float32": 16, "float64": 64}[np.dtype(dtype).name]
    bound = k * np.finfo(dtype).eps * max(1.0, float(np.abs(e).max()))
    err = float(np.abs(a - e).max())
    assert err <= bound, f"rank {rank} {what}: max error {err:.3g} > {bound:.3g}"
    checks += 1


def same_on_every_rank(a, what):
    global checks
    mine = np.ascontiguousarray(to_host(a)).tobytes()
    every = comm.allgather(mine)
    assert all(b == every[0] for b in every), f"rank {rank} {what}: differs between ranks"
    checks += 1


def global_batch(shape_rest, dtype, seed, loc=0.0):
    rng = np.random.default_rng(seed)
    x = (loc + rng.standard_normal((N,) + shape_rest) * 2.0).astype(dtype)
    dy = rng.standard_normal((N,) + shape_rest).astype(dtype)
    return x, dy


def run_case(shape_rest, axis, dtype, momentum, affine, loc, seed):
    C = shape_rest[axis - 1] if axis > 0 else shape_rest[axis]
    opts = dict(axis=axis, momentum=momentum, affine=affine, dtype=dtype)
    ref = pybn.BatchNorm(C, **opts)
    sync = SyncBatchNorm(C, comm=comm, device=device, **opts)
    for step in range(3):
        x, dy = global_batch(shape_rest, dtype, seed + step, loc)
        y_ref = ref(x)
        dx_ref = ref.backward(dy)
        y = sync(to_dev(x[lo:hi]))
        dx = sync.backward(to_dev(dy[lo:hi]))
        what = f"{shape_rest} axis={axis} {np.dtype(dtype).name} momentum={momentum} step {step}"
        close(y, y_ref[lo:hi], dtype, "y " + what)
        close(dx, dx_ref[lo:hi], dtype, "dx " + what)
        close(sync.running_mean, ref.running_mean, dtype, "running_mean " + what)
        close(sync.running_var, ref.running_var, dtype, "running_var " + what)
        same_on_every_rank(sync.running_mean, "running_mean " + what)
        same_on_every_rank(sync.running_var, "running_var " + what)
        assert sync.num_batches_tracked == ref.num_batches_tracked == step + 1
        if affine:
            close(sync.grad_gamma, ref.grad_gamma, dtype, "grad_gamma " + what)
            close(sync.grad_beta, ref.grad_beta, dtype, "grad_beta " + what)
            same_on_every_rank(sync.grad_gamma, "grad_gamma " + what)
            for layer, gg, gb in ((ref, ref.grad_gamma, ref.grad_beta),
                                  (sync, sync.grad_gamma, sync.grad_beta)):
                layer.gamma -= 0.01 * gg.astype(layer.gamma.dtype)
                layer.beta -= 0.01 * gb.astype(layer.beta.dtype)
    # eval: running statistics, nothing exchanged in the forward
    x, dy = global_batch(shape_rest, dtype, seed + 99, loc)
    ref.eval()
    sync.eval()
    close(sync(to_dev(x[lo:hi])), ref(x)[lo:hi], dtype, f"eval y {shape_rest}")
    close(sync.backward(to_dev(dy[lo:hi])), ref.backward(dy)[lo:hi], dtype, f"eval dx {shape_rest}")
    if affine:
        close(sync.grad_gamma, ref.grad_gamma, dtype, f"eval grad_gamma {shape_rest}")
    state = sync.state_dict()
    for k, v in ref.state_dict().items():
        if k != "num_batches_tracked":
            close(state[k], v, dtype, f"state_dict {k}")


cases = [
    ((4, 3, 5), 1, np.float32, 0.1, True, 0.0),       # NCHW
    ((3, 5, 4), -1, np.float32, 0.1, True, 0.0),      # NHWC (channels last)
    ((6,), 1, np.float64, None, True, 0.0),           # BN1d, cumulative average
    ((2, 4, 4), 1, np.float32, 0.3, False, 1.0e3),    # far from zero, no affine
    ((5, 3), -1, np.float64, 0.1, True, -50.0),
]
for i, case in enumerate(cases):
    run_case(*case, seed=100 * i)

# functional form with float16 input (float32 statistics and parameters)
x, dy = global_batch((3, 8), np.float16, 7)
g = np.linspace(0.5, 1.5, 3).astype(np.float32)
y_ref, m_ref, r_ref = pybn.batchnorm_forward(x, g, None)
dx_ref, dg_ref, db_ref = pybn.batchnorm_backward(dy, x, m_ref, r_ref, g)
y, m, r = sync_batchnorm_forward(to_dev(x[lo:hi]), to_dev(g), None, comm=comm)
dx, dg, db = sync_batchnorm_backward(to_dev(dy[lo:hi]), to_dev(x[lo:hi]), m, r, to_dev(g), comm=comm)
close(y, y_ref[lo:hi], np.float16, "float16 y")
close(dx, dx_ref[lo:hi], np.float16, "float16 dx")
close(m, m_ref, np.float32, "float16 mean")
close(dg, dg_ref, np.float32, "float16 dgamma")
close(db, db_ref, np.float32, "float16 dbeta")

# a global count of 1 with an unbiased running_var update is an error on every rank, even the
# empty ones; with the biased convention (or no running_var) it is valid and y = beta
one = np.ones((1 if rank == 0 else 0, 4), np.float32)
rm1, rv1 = to_dev(np.zeros(4, np.float32)), to_dev(np.ones(4, np.float32))
try:
    sync_batchnorm_forward(to_dev(one), None, None, rm1, rv1, comm=comm)
    raise AssertionError(f"rank {rank}: a global count of 1 was accepted")
except ValueError as e:
    assert "over all ranks" in str(e), str(e)
    checks += 1
assert (to_host(rv1) == 1).all()
y1, _, _ = sync_batchnorm_forward(to_dev(one), None, to_dev(np.full(4, 2.0, np.float32)), rm1, rv1, comm=comm,
                                  momentum=1.0, running_var_correction=0)
assert (to_host(y1) == 2).all() and (to_host(rv1) == 0).all() and (to_host(rm1) == 1).all()
checks += 1

# an argument error on the last rank: raised there, reported on the others, nothing changed
bn = SyncBatchNorm(4, comm=comm, device=device)
before = to_host(bn.running_mean).copy(), to_host(bn.running_var).copy()
xb = np.random.default_rng(3).standard_normal((2, 4 if rank < size - 1 else 5), dtype=np.float32)
try:
    bn(to_dev(xb))
    raise AssertionError(f"rank {rank}: the bad call did not fail")
except ValueError as e:
    if rank == size - 1:
        assert "rank" not in str(e), str(e)  # the local error itself
    else:
        assert f"rank(s) [{size - 1}]" in str(e), str(e)
    checks += 1
assert np.array_equal(to_host(bn.running_mean), before[0]) and np.array_equal(to_host(bn.running_var), before[1])
assert bn.num_batches_tracked == 0

total = comm.reduce(checks, op=MPI.SUM, root=0)
if rank == 0:
    print(f"OK {size} ranks, batch sizes {sizes}, {device}: {total} checks")
