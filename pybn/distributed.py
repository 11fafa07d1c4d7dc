"""Synchronised batch normalisation: the batch is split across processes (and GPUs) and BN uses
the statistics of the whole batch, over MPI (mpi4py) or NCCL (CuPy). pybn adds no transport of
its own: one collective per direction carries the per-channel statistics.

    from mpi4py import MPI
    bn = pybn.distributed.SyncBatchNorm(64, comm=MPI.COMM_WORLD)
    y = bn(x_local)                 # statistics of every rank's batch
    dx = bn.backward(dy_local)      # bn.grad_gamma / grad_beta: gradients of the summed loss

    mpiexec -n 4 python -m mpi4py train.py

Exactness: each rank sends its (count, mean, M2) per channel; every rank merges all of them in
rank order with pybn's exact merge (unequal counts and empty ranks included, no averaging of
means, no trip through invstd), so every rank gets bitwise the same statistics and running
statistics. The backward sends (sum dy, sum dy (x - mean), sum (x - mean), count) and adds them
in rank order. Both directions use an all-gather, not an all-reduce: the sum's order is then
pybn's, not the MPI library's, and identical on every rank.

Parameter gradients (grad_gamma, grad_beta) are already summed over all ranks (the gradient of
the sum of the ranks' losses): do not all-reduce them again.

GPU arrays: with an NCCL communicator (cupy.cuda.nccl.NcclCommunicator, see nccl_comm) the
collective runs on the current CuPy stream; with an MPI communicator the statistics are staged
through host memory, or, with cuda_aware=True (or None and MPI reporting CUDA support), passed
as device buffers after the current stream is synchronised (MPI does not know CUDA streams).
Either way the host reads P x 2 numbers (the ranks' error flags and counts) after the
collective, to apply the "more than 1 value per channel" rule to the global count and to raise
the same error on every rank.

Errors: an argument error on one rank is raised there and, as a ValueError naming that rank, on
every other rank, instead of leaving them waiting in the collective. When the channel count
itself cannot be read (x is not an array) the error is raised on that rank alone: run under
`python -m mpi4py` so that an uncaught exception aborts the job.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import _api
from ._arrays import backend_of, check_axis, device_context
from .layer import BatchNorm

Array = Any

__all__ = ["SyncBatchNorm", "sync_batchnorm", "sync_batchnorm_forward", "sync_batchnorm_backward",
           "nccl_comm"]


# ------------------------------------------ collectives ------------------------------------------

class _MPI:
    """An mpi4py communicator: Allgather of float64 arrays."""

    def __init__(self, comm: Any, cuda_aware: Optional[bool]):
        self.comm = comm
        self.size = int(comm.Get_size())
        self.rank = int(comm.Get_rank())
        if cuda_aware is None:
            try:
                from mpi4py import MPI
                cuda_aware = bool(MPI.Query_cuda_support())
            except Exception:  # older MPI / mpi4py: no way to ask, so stage through the host
                cuda_aware = False
        self.cuda_aware = bool(cuda_aware)

    def allgather(self, local: Array, xp: Any) -> Array:
        if xp is np:
            out = np.empty((self.size,) + local.shape, np.float64)
            self.comm.Allgather(local, out)
            return out
        if self.cuda_aware:
            xp.cuda.get_current_stream().synchronize()  # MPI reads the buffer outside any stream
            out = xp.empty((self.size,) + local.shape, np.float64)
            self.comm.Allgather(local, out)
            return out
        host = xp.asnumpy(local)  # waits for the current stream
        out = np.empty((self.size,) + local.shape, np.float64)
        self.comm.Allgather(host, out)
        return xp.asarray(out)


class _NCCL:
    """A cupy.cuda.nccl.NcclCommunicator: ncclAllGather on the current CuPy stream."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.size = int(comm.size())
        self.rank = int(comm.rank_id())

    def allgather(self, local: Array, xp: Any) -> Array:
        if xp is np:
            raise TypeError("an NCCL communicator needs CUDA arrays; use an mpi4py communicator "
                            "for NumPy arrays")
        from cupy.cuda import nccl
        local = xp.ascontiguousarray(local)
        out = xp.empty((self.size,) + local.shape, np.float64)
        self.comm.allGather(local.data.ptr, out.data.ptr, local.size, nccl.NCCL_FLOAT64,
                            xp.cuda.get_current_stream().ptr)
        return out


def _collective(comm: Any, cuda_aware: Optional[bool]) -> Any:
    if type(comm).__name__ == "NcclCommunicator":
        return _NCCL(comm)
    if all(hasattr(comm, a) for a in ("Allgather", "Get_size", "Get_rank")):
        return _MPI(comm, cuda_aware)
    raise TypeError(f"comm must be an mpi4py communicator or a cupy.cuda.nccl.NcclCommunicator, "
                    f"got {type(comm).__module__}.{type(comm).__name__}")


def nccl_comm(mpi_comm: Any) -> Any:
    """An NCCL communicator over the ranks of an mpi4py communicator (rank 0 makes the unique
    id, MPI broadcasts it). Select each rank's GPU (cupy.cuda.Device(i).use()) first."""
    from cupy.cuda import nccl
    uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
    uid = mpi_comm.bcast(uid, root=0)
    return nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank())


# --------------------------------------- exchange helpers ---------------------------------------

def _channels(x: Any, axis: Any) -> int:
    """The channel count that sizes the exchanged buffer (the same on every rank)."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    return int(shape[check_axis(axis, len(shape))])


def _check_channels(x: Any, axis: Any, channels: int) -> None:
    got = _channels(x, axis)
    if got != channels:
        raise ValueError(f"x must have {channels} channels (axis {axis}), got shape {tuple(x.shape)}")


def _exchange(coll: Any, rows: Optional[list], k: int, count_row: int, channels: int, xp: Any,
              error: Optional[BaseException], what: str) -> Tuple[Array, np.ndarray]:
    """All-gathers this rank's k rows (per-channel float64 arrays; None after a local error)
    plus an error-flag row; raises the local error here and a ValueError on the other ranks.
    Returns the gathered rows (P, k, C) and each rank's count (rows[count_row], channel 0) on
    the host."""
    local = xp.zeros((k + 1, max(channels, 1)), np.float64)
    if error is None:
        for i, r in enumerate(rows):
            local[i, :channels] = r
    else:
        local[k] = 1.0
    gathered = coll.allgather(local, xp)
    head = gathered[:, :, 0]  # (P, k + 1): channel 0 of every row, enough for flags and counts
    if xp is not np:
        head = xp.asnumpy(head)
    if error is not None:
        raise error
    failed = [r for r in range(coll.size) if head[r, k] != 0]
    if failed:
        raise ValueError(f"{what}: the call failed on rank(s) {failed} (see the error there); "
                         "nothing was changed")
    return gathered[:, :k, :channels], np.asarray(head[:, count_row])


def _in_rank_order(gathered: Array) -> Array:
    """Sum over ranks, in rank order (the same order on every rank)."""
    total = gathered[0].copy()
    for r in range(1, gathered.shape[0]):
        total += gathered[r]
    return total


# ---------------------------------------- functional API ----------------------------------------

def sync_batchnorm_forward(x: Array, gamma: Optional[Array] = None, beta: Optional[Array] = None,
                           running_mean: Optional[Array] = None,
                           running_var: Optional[Array] = None, *, comm: Any,
                           training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                           axis: int = 1, out: Optional[Array] = None,
                           cuda_aware: Optional[bool] = None,
                           num_features: Optional[int] = None,
                           running_var_correction: int = 1, activation: Optional[str] = None,
                           residual: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """batchnorm_forward over the union of every rank's x (same arguments, plus comm): returns
    (y, mean, invstd) with the global batch statistics. Every rank of comm must call it, with
    the same channel count, training flag and momentum; a rank may hold zero samples.
    training=False uses the running statistics and exchanges nothing. num_features (the channel
    count every rank expects) lets a rank whose x has the wrong channel count fail without
    stalling the others. running_var_correction: as in pybn.batchnorm (1 unbiased, 0 biased)."""
    coll = _collective(comm, cuda_aware)
    training = _api._training_flag(training)
    correction = _api.check_correction(running_var_correction)
    if not training:
        return _api.batchnorm_forward(x, gamma, beta, running_mean, running_var, training=False,
                                      momentum=momentum, eps=eps, axis=axis, out=out,
                                      activation=activation, residual=residual)
    minimum = _api._train_minimum(running_var, correction)
    channels = _channels(x, axis) if num_features is None else int(num_features)
    xp, error, rows, run = np, None, None, None
    try:
        xp = backend_of((("x", x),)).xp
        _check_channels(x, axis, channels)
        with device_context((x,)):
            _, run = _api._normalize_call(x, gamma, beta, running_mean, running_var, momentum,
                                           eps, axis, out, correction, activation, residual)
            rows = list(_api.batch_stats(x, axis=axis))  # count, mean, M2
    except (TypeError, ValueError) as e:
        error = e
    with device_context((x,)):
        gathered, counts = _exchange(coll, rows, 3, 0, channels, xp, error,
                                     "sync_batchnorm_forward")
        total = float(counts.sum())
        if channels > 0 and total < minimum:
            raise ValueError(f"training needs at least {minimum} value{'s' if minimum > 1 else ''} per "
                             f"channel over all ranks, got {total:g} (per rank: "
                             f"{[float(c) for c in counts]})")
        count, mean, m2 = _api.merge_stats(*(xp.ascontiguousarray(gathered[:, i]) for i in range(3)))
        return run(count, mean, m2)


def sync_batchnorm(x: Array, gamma: Optional[Array] = None, beta: Optional[Array] = None,
                   running_mean: Optional[Array] = None, running_var: Optional[Array] = None, *,
                   comm: Any, training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                   axis: int = 1, out: Optional[Array] = None,
                   cuda_aware: Optional[bool] = None, num_features: Optional[int] = None,
                   running_var_correction: int = 1, activation: Optional[str] = None,
                   residual: Optional[Array] = None) -> Array:
    """batchnorm over the union of every rank's x; see sync_batchnorm_forward."""
    return sync_batchnorm_forward(x, gamma, beta, running_mean, running_var, comm=comm,
                                  training=training, momentum=momentum, eps=eps, axis=axis,
                                  out=out, cuda_aware=cuda_aware, num_features=num_features,
                                  running_var_correction=running_var_correction,
                                  activation=activation, residual=residual)[0]


def sync_batchnorm_backward(dy: Array, x: Array, mean: Array, invstd: Array,
                            gamma: Optional[Array] = None, *, comm: Any, training: bool = True,
                            axis: int = 1, out: Optional[Array] = None,
                            cuda_aware: Optional[bool] = None,
                            num_features: Optional[int] = None, activation: Optional[str] = None,
                            y: Optional[Array] = None,
                            dresidual: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """batchnorm_backward over the union of every rank's batch: dx for this rank's x, and
    dgamma / dbeta summed over all ranks (identical on every rank). training=False treats
    mean/invstd as constants (dx is local) but still sums dgamma / dbeta over the ranks.
    num_features: as in sync_batchnorm_forward. activation="relu" with y, and dresidual: as in
    pybn.batchnorm_backward (here the masked gradient is formed first, one extra pass)."""
    coll = _collective(comm, cuda_aware)
    channels = _channels(x, axis) if num_features is None else int(num_features)
    xp, error, rows, run = np, None, None, None
    try:
        training = _api._training_flag(training)
        be = backend_of((("x", x), ("dy", dy), ("y", y), ("dresidual", dresidual)))
        xp = be.xp
        _check_channels(x, axis, channels)
        if _api.check_activation(activation) != 0:
            if y is None:
                raise ValueError(f"activation={activation!r} needs y, the forward's output (the mask is y > 0)")
            dy = xp.where(be.adopt(y) > 0, be.adopt(dy), 0).astype(dy.dtype)
        elif dresidual is not None and out is dy:  # dx overwrites dy: keep the residual's gradient
            dy = be.adopt(dy).copy()
        with device_context((x,)):
            cx, run = _api._backward_elementwise_call(dy, x, mean, invstd, gamma, training, axis,
                                                      out)
            rows = [*_api.backward_reduce(dy, x, mean, axis=axis), xp.full(channels, float(cx.count))]
    except (TypeError, ValueError) as e:
        error = e
    with device_context((x,)):
        gathered, counts = _exchange(coll, rows, 4, 3, channels, xp, error,
                                     "sync_batchnorm_backward")
        total = float(counts.sum())
        if training and channels > 0 and total < 1:
            raise ValueError(f"training-mode backward needs at least 1 value per channel over "
                             f"all ranks, got {total:g}")
        sums = _in_rank_order(gathered)
        count = xp.ascontiguousarray(sums[3])
        result = run(count, xp.ascontiguousarray(sums[0]), xp.ascontiguousarray(sums[1]),
                     xp.ascontiguousarray(sums[2]))
        if dresidual is not None:  # the residual's gradient: the (masked) dy
            be.adopt(dresidual)[...] = dy
        return result


# --------------------------------------------- layer ---------------------------------------------

class SyncBatchNorm(BatchNorm):
    """pybn.BatchNorm whose training-mode statistics are those of the whole batch across the
    ranks of `comm` (an mpi4py communicator, or an NCCL communicator for CUDA arrays). Same
    interface as BatchNorm; every rank must call forward/backward in step. grad_gamma and
    grad_beta are summed over the ranks. See the module documentation."""

    def __init__(self, num_features: int, *, comm: Any, cuda_aware: Optional[bool] = None,
                 **options: Any):
        if options.get("renorm") is not None:
            raise ValueError("SyncBatchNorm does not support renorm yet; use pybn.BatchNorm")
        if options.get("virtual_batch") is not None:  # ghost batches are per device: nothing to sync
            raise ValueError("SyncBatchNorm does not take virtual_batch (ghost batches are local); use "
                             "pybn.BatchNorm(virtual_batch=k)")
        super().__init__(num_features, **options)
        self._coll = _collective(comm, cuda_aware)  # checks comm now, not at the first call
        self.comm = comm
        self.cuda_aware = cuda_aware

    def _check_input(self, x: Array) -> None:
        """No early check here: an error on one rank must travel through the collective (the
        functional forward exchanges it), or the other ranks would wait for this one forever."""

    def _forward_call(self, x, running_mean, running_var, training, momentum):
        return sync_batchnorm_forward(x, self.gamma, self.beta, running_mean, running_var,
                                      comm=self.comm, training=training, momentum=momentum,
                                      eps=self.eps, axis=self.axis, cuda_aware=self.cuda_aware,
                                      num_features=self.num_features,
                                      running_var_correction=self.running_var_correction,
                                      activation=self.activation)

    def _backward_call(self, dy, x, mean, invstd, training, y=None, rd=None):
        return sync_batchnorm_backward(dy, x, mean, invstd, self.gamma, comm=self.comm,
                                       training=training, axis=self.axis,
                                       cuda_aware=self.cuda_aware, num_features=self.num_features,
                                       activation=self.activation, y=y)

    def __repr__(self) -> str:
        return "Sync" + super().__repr__() + f" over {self._coll.size} ranks"
