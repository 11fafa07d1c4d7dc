"""Data-parallel training with synchronised batch normalisation over MPI ranks.

    pip install "pybn-kernels[mpi]"
    mpiexec -n 3 python -m mpi4py examples/sync_bn_mpi.py [steps]

A two-layer network (linear -> SyncBatchNorm -> ReLU -> linear) fits a synthetic regression
target. Each rank holds a different, unequal slice of every batch (rank r gets 8 + 4 r rows);
the BN layer normalises with the statistics of the whole batch, and the linear layers' gradients
are summed over the ranks with one Allreduce, so every rank keeps identical weights. With
`python -m mpi4py`, an exception on one rank aborts the job instead of hanging it.
"""
import sys

import numpy as np
from mpi4py import MPI

from pybn.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
features, hidden = 16, 32

rng = np.random.default_rng(0)  # same seed: the same initial weights and data on every rank
true_w = rng.standard_normal((features, 1)).astype(np.float32)
w1 = (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32)
w2 = (rng.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(np.float32)
bn = SyncBatchNorm(hidden, comm=comm)  # axis=1: (batch, channels)

sizes = [8 + 4 * r for r in range(size)]
start = sum(sizes[:rank])
total = sum(sizes)
lr = 0.05
for step in range(steps):
    batch = rng.standard_normal((total, features)).astype(np.float32) * 3 + 5  # far from zero
    target = np.tanh(batch @ true_w / 10)
    x, t = batch[start:start + sizes[rank]], target[start:start + sizes[rank]]

    h = x @ w1
    a = bn(h)
    r = np.maximum(a, 0)
    pred = r @ w2
    err = pred - t
    loss = comm.allreduce(float((err ** 2).sum()), op=MPI.SUM) / total

    # backward of the mean squared error over the global batch
    dpred = 2 * err / total
    dw2 = r.T @ dpred
    da = (dpred @ w2.T) * (a > 0)
    dh = bn.backward(da)          # uses the whole batch; bn.grad_gamma/beta already summed
    dw1 = x.T @ dh
    for g in (dw1, dw2):          # the linear layers' gradients: summed over the ranks
        comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
    w1 -= lr * dw1
    w2 -= lr * dw2
    bn.gamma -= lr * bn.grad_gamma
    bn.beta -= lr * bn.grad_beta
    if rank == 0 and (step % 50 == 0 or step == steps - 1):
        print(f"step {step:4d}  loss {loss:.5f}", flush=True)

# pybn's running statistics are bitwise identical on every rank; the weights agree up to the
# MPI library's summation order in Allreduce
stats = comm.allgather((bn.running_mean.tobytes(), bn.running_var.tobytes()))
assert all(s == stats[0] for s in stats), "running statistics differ between ranks"
w1_all = comm.allgather(w1)
assert all(np.allclose(w, w1_all[0], rtol=1e-5, atol=1e-6) for w in w1_all), "ranks diverged"
if rank == 0:
    print(f"{size} ranks (batch slices {sizes}): identical running statistics, weights in step")
