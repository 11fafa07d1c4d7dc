"""Synchronised batch normalisation: BN with the statistics of a batch split across processes.

The batch is split across processes (and GPUs) and BN uses the statistics of the whole batch,
over MPI (mpi4py) or NCCL (CuPy). pybn adds no transport of its own: one collective per
direction carries the per-channel statistics. The layer is `SyncBatchNorm`; the functional forms
are `sync_batchnorm`, `sync_batchnorm_forward` and `sync_batchnorm_backward`; `nccl_comm` makes
an NCCL communicator.

Notes
-----
Exactness: each rank sends its (count, mean, M2) per channel; every rank merges all of them in
rank order with pybn's exact merge (unequal counts and empty ranks included, no averaging of
means, no trip through invstd), so every rank gets bitwise the same statistics and running
statistics. The backward sends (sum dy, sum dy (x - mean), sum (x - mean), count) and adds them
in rank order. Both directions use an all-gather, not an all-reduce: the sum's order is then
pybn's, not the MPI library's, and identical on every rank.

Parameter gradients (grad_gamma, grad_beta) are already summed over all ranks (the gradient of
the sum of the ranks' losses): do not all-reduce them again.

GPU arrays: with an NCCL communicator (``cupy.cuda.nccl.NcclCommunicator``, see `nccl_comm`) the
collective runs on the current CuPy stream; with an MPI communicator the statistics are staged
through host memory, or, with ``cuda_aware=True`` (or None and MPI reporting CUDA support),
passed as device buffers after the current stream is synchronised (MPI does not know CUDA
streams). Either way the host reads P x 2 numbers (the ranks' error flags and counts) after the
collective, to apply the "more than 1 value per channel" rule to the global count and to raise
the same error on every rank.

Errors: an argument error on one rank is raised there and, as a ValueError naming that rank, on
every other rank, instead of leaving them waiting in the collective. When the channel count
itself cannot be read (x is not an array) the error is raised on that rank alone: run under
``python -m mpi4py`` so that an uncaught exception aborts the job. `sync_batchnorm_forward` and
`sync_batchnorm_backward` list the other errors raised before the exchange.

Examples
--------
A training step on every rank of a job started with ``mpiexec -n 4 python -m mpi4py train.py``::

    from mpi4py import MPI
    bn = pybn.distributed.SyncBatchNorm(64, comm=MPI.COMM_WORLD)
    y = bn(x_local)                 # statistics of every rank's batch
    dx = bn.backward(dy_local)      # bn.grad_gamma / grad_beta: gradients of the summed loss

With one process (``COMM_SELF``) it computes what `pybn.BatchNorm` does:

>>> from mpi4py import MPI
>>> x = np.random.default_rng(0).standard_normal((8, 3, 5)).astype(np.float32)
>>> sbn = pybn.distributed.SyncBatchNorm(3, comm=MPI.COMM_SELF)
>>> np.allclose(sbn(x), pybn.BatchNorm(3)(x), atol=1e-5)
True
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
    """An NCCL communicator over the ranks of an mpi4py communicator.

    Rank 0 makes the unique id and MPI broadcasts it; every rank of mpi_comm must call it. Select each
    rank's GPU (``cupy.cuda.Device(i).use()``) first.

    Parameters
    ----------
    mpi_comm : mpi4py communicator
        The ranks of the new communicator (same size and ranks).

    Returns
    -------
    cupy.cuda.nccl.NcclCommunicator
        For `SyncBatchNorm` and the functional forms with CUDA arrays: the collectives then run on
        CuPy's current stream.

    Raises
    ------
    ImportError
        CuPy (with NCCL) is not installed.

    See Also
    --------
    SyncBatchNorm : The layer that takes it as comm.

    Examples
    --------
    On a GPU machine, in a job of one process per GPU:

    >>> from mpi4py import MPI  # doctest: +SKIP
    >>> import cupy  # doctest: +SKIP
    >>> cupy.cuda.Device(MPI.COMM_WORLD.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()  # doctest: +SKIP
    >>> comm = pybn.distributed.nccl_comm(MPI.COMM_WORLD)  # doctest: +SKIP
    >>> bn = pybn.distributed.SyncBatchNorm(64, comm=comm, device="cuda")  # doctest: +SKIP
    """
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
    """`batchnorm_forward` over the union of every rank's x: returns (y, mean, invstd) with the global statistics.

    Every rank of comm must call it, with the same channel count, training flag and momentum; a rank
    may hold zero samples. ``training=False`` uses the running statistics and exchanges nothing.

    Parameters
    ----------
    x : array (float16, bfloat16, float32 or float64)
        This rank's part of the batch, at least 2-D, channels on `axis` (NumPy, or CUDA arrays).
    gamma, beta, running_mean, running_var : array of shape (C,), optional
        As in `batchnorm` (per-channel dtype: float32 for 16- and 32-bit x, float64 for float64 x);
        the running statistics are updated in place with the global statistics, bitwise the same on
        every rank.
    comm : mpi4py communicator or cupy.cuda.nccl.NcclCommunicator
        Keyword-only, required: the ranks that share the batch (NCCL: CUDA arrays only).
    training : bool, default True
        True: the batch statistics; False: the running statistics (frozen), as in `batchnorm`.
    momentum : float, default 0.1
        Weight of the batch in the running-statistics update, in [0, 1].
    eps : float, default 1e-5
        Added to the variance; finite and >= 0.
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    out : array, optional
        Receives y: x's shape and dtype, writable; it may be x itself (or `residual`).
    cuda_aware : bool or None, default None
        MPI communicators with CUDA arrays: True passes device buffers to MPI (after synchronising the
        current stream), False stages them through host memory, None asks MPI
        (``MPI.Query_cuda_support()``; False when it cannot tell). Ignored otherwise.
    num_features : int, optional
        The channel count every rank expects: lets a rank whose x has another channel count fail
        without stalling the others. None: x's channel count.
    running_var_correction : {1, 0}, default 1
        The variance that updates running_var: 1 the unbiased one, 0 the biased one.
    activation : {None, "relu"}, default None
        A fused ReLU, applied last, as in `batchnorm`.
    residual : array, optional
        A fused residual of x's shape and dtype, added before the activation, as in `batchnorm`.

    Returns
    -------
    y : array
        The normalised x: x's shape and dtype (`out` when given).
    mean, invstd : array of shape (C,)
        The global batch mean and ``1 / sqrt(var + eps)``, in the per-channel dtype, identical on
        every rank (the running statistics' with ``training=False``); for `sync_batchnorm_backward`.

    Raises
    ------
    TypeError
        comm is neither an mpi4py communicator nor an NCCL communicator; x is not an array; the
        TypeErrors of `batchnorm_forward`.
    ValueError
        x does not have num_features channels; fewer than 2 values per channel over all ranks when
        running_var is updated with ``running_var_correction=1`` (else fewer than 1); on the other
        ranks, when the call failed on one ("the call failed on rank(s) [...]"); the ValueErrors of
        `batchnorm_forward`.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    sync_batchnorm_backward : The backward over all ranks.
    SyncBatchNorm : The layer.

    Notes
    -----
    Argument errors found before the exchange travel through it: the rank that failed raises its
    own error, the others a ValueError naming it, and nothing is changed on any rank. Raised on this
    rank alone, before any exchange: an invalid comm, x that is not an array, an invalid axis when
    num_features is None, a training flag that is not a bool and an invalid running_var_correction.
    There is no `renorm`, `virtual_batch` or `stream` argument: the work runs on CuPy's current
    stream.

    Examples
    --------
    >>> from mpi4py import MPI
    >>> x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    >>> y, mean, invstd = pybn.distributed.sync_batchnorm_forward(x, comm=MPI.COMM_SELF)
    >>> np.allclose(mean, pybn.batchnorm_forward(x)[1], atol=1e-6)
    True
    """
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
    """`batchnorm` over the union of every rank's x; see `sync_batchnorm_forward`.

    Parameters
    ----------
    x : array (float16, bfloat16, float32 or float64)
        This rank's part of the batch, at least 2-D, channels on `axis`.
    gamma, beta, running_mean, running_var : array of shape (C,), optional
        As in `sync_batchnorm_forward` (per-channel dtype; the running statistics are updated with
        the global statistics).
    comm : mpi4py communicator or cupy.cuda.nccl.NcclCommunicator
        Required: the ranks that share the batch.
    training : bool, default True
        True: the batch statistics; False: the running statistics (frozen), as in `batchnorm`.
    momentum : float, default 0.1
        Weight of the batch in the running-statistics update, in [0, 1].
    eps : float, default 1e-5
        Added to the variance; finite and >= 0.
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    out : array, optional
        Receives y: x's shape and dtype, writable; it may be x itself (or `residual`).
    cuda_aware : bool or None, default None
        As in `sync_batchnorm_forward`.
    num_features : int, optional
        The channel count every rank expects, as in `sync_batchnorm_forward`.
    running_var_correction : {1, 0}, default 1
        The variance that updates running_var: 1 the unbiased one, 0 the biased one.
    activation : {None, "relu"}, default None
        A fused ReLU, applied last, as in `batchnorm`.
    residual : array, optional
        A fused residual of x's shape and dtype, added before the activation, as in `batchnorm`.

    Returns
    -------
    y : array
        The normalised x (x's shape and dtype), with the global statistics.

    Raises
    ------
    TypeError, ValueError, MemoryError, RuntimeError
        As `sync_batchnorm_forward`.

    See Also
    --------
    sync_batchnorm_forward : The same, also returning mean and invstd.

    Examples
    --------
    >>> from mpi4py import MPI
    >>> x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    >>> np.allclose(pybn.distributed.sync_batchnorm(x, comm=MPI.COMM_SELF), pybn.batchnorm(x), atol=1e-5)
    True
    """
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
    """`batchnorm_backward` over the union of every rank's batch.

    dx for this rank's x, and dgamma / dbeta summed over all ranks (identical on every rank). Every
    rank of comm must call it.

    Parameters
    ----------
    dy : array
        Gradient of this rank's loss with respect to its y: x's shape and dtype.
    x : array (float16, bfloat16, float32 or float64)
        This rank's part of the batch, as passed to `sync_batchnorm_forward`.
    mean, invstd : array of shape (C,)
        As returned by `sync_batchnorm_forward` (per-channel dtype).
    gamma : array of shape (C,), optional
        The scale (per-channel dtype); None: 1.
    comm : mpi4py communicator or cupy.cuda.nccl.NcclCommunicator
        Keyword-only, required: as in `sync_batchnorm_forward`.
    training : bool, default True
        True differentiates through the global batch statistics; False treats mean and invstd as
        constants (dx is local) but still sums dgamma / dbeta over the ranks.
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    out : array, optional
        Receives dx: x's shape and dtype, writable; it may be dy or x itself.
    cuda_aware : bool or None, default None
        As in `sync_batchnorm_forward`.
    num_features : int, optional
        The channel count every rank expects, as in `sync_batchnorm_forward`.
    activation : {None, "relu"}, default None
        With `y`, as in `batchnorm_backward` (here the masked gradient is formed first, one extra
        pass).
    y : array, optional
        The forward's output, the mask of ``activation="relu"``.
    dresidual : array, optional
        Receives the residual's gradient, the (masked) dy, as in `batchnorm_backward`.

    Returns
    -------
    dx : array
        The gradient with respect to this rank's x: its shape and dtype (`out` when given).
    dgamma, dbeta : array of shape (C,)
        In the per-channel dtype, summed over all ranks: the gradients of the sum of the ranks'
        losses (do not all-reduce them again).

    Raises
    ------
    TypeError
        As `sync_batchnorm_forward` and `batchnorm_backward`.
    ValueError
        ``activation="relu"`` without y; no value per channel over all ranks in training; on the
        other ranks, when the call failed on one; the ValueErrors of `batchnorm_backward`.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    sync_batchnorm_forward : The forward whose mean and invstd this takes.
    batchnorm_backward : The same for one process.

    Notes
    -----
    Errors travel through the exchange as in `sync_batchnorm_forward` (raised on this rank alone: an
    invalid comm, x that is not an array, an invalid axis when num_features is None). dresidual is
    written after the exchange, with the (masked) dy.

    Examples
    --------
    >>> from mpi4py import MPI
    >>> x = np.random.default_rng(0).standard_normal((8, 3))
    >>> dy = np.ones_like(x)
    >>> y, mean, invstd = pybn.distributed.sync_batchnorm_forward(x, comm=MPI.COMM_SELF)
    >>> dx, dgamma, dbeta = pybn.distributed.sync_batchnorm_backward(dy, x, mean, invstd, comm=MPI.COMM_SELF)
    >>> print(dbeta)
    [8. 8. 8.]
    """
    coll = _collective(comm, cuda_aware)
    channels = _channels(x, axis) if num_features is None else int(num_features)
    xp, error, rows, run = np, None, None, None
    try:
        training = _api._training_flag(training)
        be = backend_of((("x", x), ("dy", dy), ("y", y), ("dresidual", dresidual)))
        xp = be.xp
        _check_channels(x, axis, channels)
        # y and dresidual checked here, before the exchange and before dy is masked (as the
        # one-process backward does): dtype and shape of x, dresidual writable and overlapping
        # nothing but (possibly) dy
        cx0 = _api._prepare(x, axis, ())
        if y is not None:
            cx0.like_x("y", y)
        if dresidual is not None:
            cx0.output(dresidual, (("dy", dy if out is not dy else None), ("x", x), ("y", y), ("out", out),
                                   ("mean", mean), ("invstd", invstd), ("gamma", gamma)), in_place=(dy,),
                       name="dresidual")
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
    """`pybn.BatchNorm` whose training-mode statistics are those of the whole batch across ranks.

    The ranks of `comm` (an mpi4py communicator, or an NCCL communicator for CUDA arrays) each hold a
    part of the batch. Same interface as `BatchNorm` (forward / ``__call__``, backward, train, eval,
    fold_into, state_dict, load_state_dict); every rank must call forward / backward in step.
    grad_gamma and grad_beta are summed over the ranks. See the module documentation, `pybn.distributed`.

    Parameters
    ----------
    num_features : int
        C, the number of channels, the same on every rank (>= 1).
    comm : mpi4py communicator or cupy.cuda.nccl.NcclCommunicator
        Keyword-only, required: checked now, not at the first call.
    cuda_aware : bool or None, default None
        As in `sync_batchnorm_forward`.
    **options
        The keyword arguments of `BatchNorm` (eps, momentum, affine, track_running_stats, axis,
        dtype, device, running_var_correction, activation), except renorm and virtual_batch.

    Attributes
    ----------
    comm, cuda_aware
        The constructor's arguments; and the attributes of `BatchNorm`.

    Raises
    ------
    TypeError
        comm is neither an mpi4py communicator nor an NCCL communicator; the TypeErrors of
        `BatchNorm`.
    ValueError
        renorm (not supported yet) or virtual_batch (ghost batches are local to a device: use
        ``pybn.BatchNorm(virtual_batch=k)``) given; the ValueErrors of `BatchNorm`.

    See Also
    --------
    sync_batchnorm_forward, sync_batchnorm_backward : The functional forms it runs.

    Notes
    -----
    forward does not check x before the exchange, so that an error on one rank reaches every rank
    through the collective (the other ranks raise a ValueError naming it) instead of leaving them
    waiting. In eval (with track_running_stats) forward uses the running statistics and exchanges
    nothing; backward still sums grad_gamma / grad_beta over the ranks. The ranks' running
    statistics stay bitwise identical.

    Examples
    --------
    >>> from mpi4py import MPI
    >>> x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    >>> sbn = pybn.distributed.SyncBatchNorm(3, comm=MPI.COMM_SELF, momentum=0.1)
    >>> y = sbn(x)
    >>> dx = sbn.backward(np.ones_like(y))
    >>> print(sbn.grad_beta)
    [8. 8. 8.]
    >>> sbn
    SyncBatchNorm(3, eps=1e-05, ...) over 1 ranks
    """

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
