"""The functional API: batchnorm, batchnorm_forward, batchnorm_backward and the composable
primitives (batch_stats, merge_stats, normalize, backward_reduce, backward_elementwise).

Every function validates all of its arguments before libpybn touches anything, so a call that
raises changes nothing it was given.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional, Tuple, TypeVar, cast

import numpy as np

from . import _core
from ._arrays import (Canonical, address, backend_of, check_eps, check_momentum, check_real, device_context,
                      dtype_name)

Array = Any


_F = TypeVar("_F", bound=Callable[..., Any])


def _on_device(fn: _F) -> _F:
    """Adds the keyword `stream` and runs fn with the device of its CUDA arrays current and,
    if given, `stream` as CuPy's current stream (the stream the work is queued on). Typed as the
    identity so that type checkers see each function's own signature."""

    @functools.wraps(fn)
    def call(*args, stream=None, **kwargs):
        with device_context((*args, *kwargs.values()), stream):
            return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    call.__signature__ = sig.replace(parameters=[*sig.parameters.values(), inspect.Parameter(  # type: ignore[attr-defined]
        "stream", inspect.Parameter.KEYWORD_ONLY, default=None)])
    return cast(_F, call)


def _prepare(x: Array, axis: int, named: Tuple[Tuple[str, Any], ...], batch_outer: bool = False) -> Canonical:
    backend = backend_of((("x", x),) + named)
    return Canonical(backend, x, axis, batch_outer=batch_outer)


def _check_virtual_batch(virtual_batch: Any) -> Optional[int]:
    if virtual_batch is None:
        return None
    if isinstance(virtual_batch, bool) or not isinstance(virtual_batch, (int, np.integer)):
        raise TypeError(f"virtual_batch must be None or an int (samples per ghost batch), got "
                        f"{type(virtual_batch).__name__}")
    if virtual_batch < 1:
        raise ValueError(f"virtual_batch must be >= 1, got {virtual_batch}")
    return int(virtual_batch)


def _ghost_groups(cx: Canonical, samples: Optional[int] = None, groups: Optional[int] = None) -> int:
    """The number of ghost batches G of x (its batch axis 0 split into G equal, consecutive
    groups), from the samples per group or a given G; 1 when neither is given."""
    if samples is None and groups is None:
        return 1
    if cx.axis == 0:
        raise ValueError("ghost batches (virtual_batch) split the batch axis, axis 0, so the channel axis "
                         "cannot be 0")
    n = int(cx.shape[0])
    if samples is not None:
        if n % samples:
            raise ValueError(f"virtual_batch={samples} must divide the batch size {n} (x of shape {cx.shape})")
        return n // samples
    assert groups is not None
    if groups < 1 or n % groups:
        raise ValueError(f"mean / invstd hold {groups} ghost batches (rows), which do not split the batch size {n} "
                         f"(x of shape {cx.shape}) into equal groups")
    return groups


def _check_training_count(cx: Canonical, minimum: int, what: str = "training", groups: int = 1) -> None:
    count = cx.count // groups
    if cx.channels > 0 and count < minimum:
        why = (" when running_var is updated with the unbiased variance (running_var_correction=1;"
               " 0 uses the biased variance and allows one value)" if minimum == 2 else "")
        where = f" in each of {groups} ghost batches" if groups > 1 else ""
        raise ValueError(
            f"{what} needs at least {minimum} value{'s' if minimum != 1 else ''} per channel{where}, got "
            f"{count} (x of shape {cx.shape} with the channel axis of size {cx.channels}){why}"
        )


def check_correction(correction: Any) -> int:
    """running_var_correction: 1 (unbiased, PyTorch) or 0 (biased, ONNX / Keras / Flax / Paddle)."""
    if isinstance(correction, bool) or not isinstance(correction, (int, np.integer)):
        raise TypeError(f"running_var_correction must be the int 0 or 1, got {type(correction).__name__}")
    if correction not in (0, 1):
        raise ValueError(f"running_var_correction must be 0 (biased) or 1 (unbiased), got {correction}")
    return int(correction)


_ACTIVATIONS = {None: _core.ACTIVATION_NONE, "relu": _core.ACTIVATION_RELU}


def check_activation(activation: Any) -> int:
    """activation=None or "relu" as the library's code."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or 'relu', got {type(activation).__name__}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return _ACTIVATIONS[activation]


def check_renorm(renorm: Any) -> Tuple[float, float]:
    """renorm=(r_max, d_max) of batch renormalisation, or None (0, 0: off)."""
    if renorm is None:
        return 0.0, 0.0
    if not isinstance(renorm, (tuple, list)) or len(renorm) != 2:
        raise TypeError(f"renorm must be None or a pair (r_max, d_max), got {renorm!r}")
    r_max, d_max = check_real("renorm r_max", renorm[0]), check_real("renorm d_max", renorm[1])
    if not (1.0 <= r_max < float("inf")) or not (0.0 <= d_max < float("inf")):
        raise ValueError(f"renorm needs r_max >= 1 and d_max >= 0 (finite), got {renorm!r}")
    return r_max, d_max


def _train_minimum(running_var: Any, correction: int) -> int:
    return 2 if running_var is not None and correction == 1 else 1


def _check_device_counts(backend: Any, name: str, count: Array, minimum: float) -> None:
    """The CPU library reads the counts of given statistics and refuses count < minimum itself;
    on a GPU it cannot read them without a synchronisation, so the Python layer checks device
    arrays here (one small copy to the host) and both devices give the same ValueError."""
    if backend.name != "cuda" or count.size == 0:
        return
    bad = backend.xp.flatnonzero(~(count >= minimum))
    if bad.size:
        c = int(bad[0])
        where = f"[{c}]" if count.ndim == 1 else "".join(f"[{i}]" for i in np.unravel_index(c, count.shape))
        raise ValueError(f"{name}{where} must be >= {minimum:g}, got {float(count.reshape(-1)[c]):g}")


def _per_channel_out(cx: Canonical, rows: int = 0) -> Array:
    return cx.backend.xp.empty((rows, cx.channels) if rows else (cx.channels,), dtype=cx.pdtype)


def _stats_array(cx: Canonical, name: str, a: Array) -> Array:
    """A float64 per-channel statistics array (count / mean / M2 / sums)."""
    if a is None:
        raise ValueError(f"{name} is required")
    a = cx.backend.adopt(a)
    if np.dtype(a.dtype) != np.float64:
        raise TypeError(f"{name} must have dtype float64, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != (cx.channels,):
        raise ValueError(f"{name} must have shape ({cx.channels},), got {tuple(a.shape)}")
    return cx.backend.contiguous(a)


def _training_flag(training: Any) -> bool:
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return bool(training)


class _RunningStats:
    """Running statistics updated in place; strided arrays are updated through a copy."""

    def __init__(self, cx: Canonical, running_mean: Array, running_var: Array):
        self.given = (cx.backend.adopt(running_mean), cx.backend.adopt(running_var))
        self.data = (
            cx.per_channel("running_mean", running_mean, writable=True),
            cx.per_channel("running_var", running_var, writable=True),
        )

    def write_back(self) -> None:
        for given, data in zip(self.given, self.data):
            if given is not None and data is not given:
                given[...] = data


# The one path of each direction: every forward (batchnorm, batchnorm_forward, normalize, the
# layer, SyncBatchNorm) ends in _run_forward with a _core.ForwardParams, every backward in
# _run_backward with a _core.BackwardParams (the C parameter blocks); a new option is one
# keyword there. On a GPU the workspace the library asks for comes from CuPy's pool.

def _run_forward(cx: Canonical, y: Array, params: Any) -> None:
    be = cx.backend
    stream = be.stream()
    if stream is None:
        _core.forward(cx.view, be.address(cx.data), be.address(y), params)
    else:
        ws = be.workspace(_core.forward_workspace_size(cx.view, params))
        _core.forward(cx.view, be.address(cx.data), be.address(y), params, stream, be.address(ws), ws.nbytes)


def _run_backward(cx: Canonical, dy: Array, dx: Array, params: Any) -> None:
    be = cx.backend
    stream = be.stream()
    dxa = 0 if dx is None else be.address(dx)
    if stream is None:
        _core.backward(cx.view, be.address(dy), be.address(cx.data), dxa, params)
    else:
        ws = be.workspace(_core.backward_workspace_size(cx.view, params))
        _core.backward(cx.view, be.address(dy), be.address(cx.data), dxa, params, stream, be.address(ws),
                       ws.nbytes)


class _ForwardCall:
    """A checked forward: every argument but given statistics validated and the outputs
    allocated; run(count, mean, m2) (statistics for normalize / SyncBatchNorm, else None)
    returns (y, mean, invstd) with nothing written before the library call succeeds."""

    def __init__(self, x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, out,
                 correction, save, given_stats=False, activation=None, residual=None, renorm=None,
                 virtual_batch=None):
        vb = _check_virtual_batch(virtual_batch)
        self.cx = cx = _prepare(x, axis, (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                                          ("running_var", running_var), ("out", out), ("residual", residual)),
                                batch_outer=vb is not None)
        self.activation = check_activation(activation)
        self.z = None if residual is None else cx.like_x("residual", residual)
        self.training = _training_flag(training)
        # ghost batches: training with batch statistics only (in inference the running statistics
        # serve every sample); rows of the saved statistics (0: one batch, (C,) arrays)
        self.groups = _ghost_groups(cx, samples=vb) if self.training and not given_stats else 1
        self.rows = self.groups if vb is not None and self.training and not given_stats else 0
        if renorm is not None and self.rows:
            raise ValueError("renorm (batch renormalisation) and virtual_batch (ghost batches) cannot be combined")
        self.renorm = check_renorm(renorm)
        if renorm is not None and (not self.training or running_mean is None or running_var is None):
            raise ValueError("renorm (batch renormalisation) needs training=True and both running statistics")
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.correction = check_correction(correction)
        self.g = cx.per_channel("gamma", gamma)
        self.b = cx.per_channel("beta", beta)
        self.given_stats = given_stats
        if self.training:
            if not given_stats:
                _check_training_count(cx, _train_minimum(running_var, self.correction), groups=self.groups)
            self.running = _RunningStats(cx, running_mean, running_var)
            self.rm, self.rv = self.running.data
        else:
            if running_mean is None or running_var is None:
                raise ValueError("running_mean and running_var are required when training=False")
            self.running = None
            self.rm = cx.per_channel("running_mean", running_mean)
            self.rv = cx.per_channel("running_var", running_var)
        self.y = cx.output(out, (("x", x), ("gamma", gamma), ("beta", beta),
                                 ("running_mean", running_mean), ("running_var", running_var),
                                 ("residual", residual)),
                           in_place=(x, residual))
        self.save = save

    def run(self, count=None, mean=None, m2=None):
        cx, be = self.cx, self.cx.backend
        stats = ()
        if self.given_stats:  # the CPU library checks the counts (channel and value in its message)
            stats = [_stats_array(cx, n, a) for n, a in (("count", count), ("mean", mean), ("m2", m2))]
            _check_device_counts(be, "count", stats[0], _train_minimum(self.rv, self.correction))
        smean = sinvstd = r = d = None
        if self.save:
            smean, sinvstd = _per_channel_out(cx, self.rows), _per_channel_out(cx, self.rows)
        if self.renorm[0] and self.save:  # r and d are returned for the backward (else not kept)
            r, d = _per_channel_out(cx), _per_channel_out(cx)
        a = be.address
        params = _core.ForwardParams(
            training=self.training, running_var_correction=self.correction,
            gamma=0 if self.g is None else a(self.g), beta=0 if self.b is None else a(self.b),
            eps=self.eps, running_mean=0 if self.rm is None else a(self.rm),
            running_var=0 if self.rv is None else a(self.rv), momentum=self.momentum,
            save_mean=0 if smean is None else a(smean), save_invstd=0 if sinvstd is None else a(sinvstd),
            activation=self.activation, residual=0 if self.z is None else a(self.z),
            renorm_r_max=self.renorm[0], renorm_d_max=self.renorm[1], save_renorm_r=0 if r is None else a(r),
            save_renorm_d=0 if d is None else a(d), virtual_batches=self.groups)
        if stats:
            params.given_statistics(a(stats[0]), a(stats[1]), a(stats[2]))
        _run_forward(cx, self.y.data, params)
        if self.running is not None:
            self.running.write_back()
        if r is not None:
            return self.y.finish(), smean, sinvstd, r, d
        return self.y.finish(), smean, sinvstd


@_on_device
def batchnorm(x: Array, gamma: Optional[Array] = None, beta: Optional[Array] = None,
              running_mean: Optional[Array] = None, running_var: Optional[Array] = None, *,
              training: bool = True, momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
              out: Optional[Array] = None, running_var_correction: int = 1,
              activation: Optional[str] = None, residual: Optional[Array] = None,
              renorm: Optional[Tuple[float, float]] = None, virtual_batch: Optional[int] = None) -> Array:
    """Batch normalisation of x over every axis but `axis`; returns y (x's dtype).

    training=True normalises with the batch statistics and, when running_mean / running_var are
    given, updates them in place: running = (1 - momentum) * running + momentum * batch, with
    the unbiased batch variance M2 / (n - 1) for running_var when running_var_correction=1
    (PyTorch, the default) or the biased M2 / n when 0 (ONNX, Keras/TF, Flax, PaddlePaddle,
    whose momentum m is 1 - m here). training=False normalises with running_mean / running_var
    (both required). gamma / beta default to 1 / 0. out (x's shape and dtype) receives y; it may
    be x itself (or the residual).

    Fused epilogue, in the same sweep (no extra pass): residual (x's shape and dtype) is added
    after the affine step and activation="relu" applies max(0, .) last:
    y = relu(gamma * x_hat + beta + residual). NaN stays NaN.

    renorm=(r_max, d_max): batch renormalisation (Ioffe 2017; training with both running
    statistics): y = gamma * (r * x_hat + d) + beta with r = clip(sigma_batch / sigma_running,
    1/r_max, r_max), d = clip((mean_batch - running_mean) / sigma_running, -d_max, d_max), from the
    running statistics before this step's update (sigma = sqrt(var + eps)).

    virtual_batch=k: ghost batches (Hoffer et al. 2017; Keras's virtual_batch_size) in training:
    the batch axis (axis 0; the channel axis must be another) is split into N / k groups of k
    consecutive samples, each normalised with its own statistics, in one call. The running
    statistics are updated once, from the average of the group means and the average of the
    group variances (each with running_var_correction), as Keras does. k must divide N. Ignored
    when training=False. (Keras 2 groups samples i, i + N/k, i + 2N/k, ... instead: reorder x with
    x.reshape(k, N // k, ...).swapaxes(0, 1).reshape(x.shape) to match it exactly.)
    """
    return _ForwardCall(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, out,
                        running_var_correction, save=False, activation=activation,
                        residual=residual, renorm=renorm, virtual_batch=virtual_batch).run()[0]


@_on_device
def batchnorm_forward(x: Array, gamma: Optional[Array] = None, beta: Optional[Array] = None,
                      running_mean: Optional[Array] = None, running_var: Optional[Array] = None, *,
                      training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                      axis: int = 1, out: Optional[Array] = None,
                      running_var_correction: int = 1, activation: Optional[str] = None,
                      residual: Optional[Array] = None,
                      renorm: Optional[Tuple[float, float]] = None,
                      virtual_batch: Optional[int] = None) -> Tuple[Array, ...]:
    """Like batchnorm, also returning (mean, invstd) for batchnorm_backward: the batch mean and
    1/sqrt(var + eps) in training, running_mean and 1/sqrt(running_var + eps) otherwise.
    With renorm, returns (y, mean, invstd, r, d): pass renorm=(r, d) to batchnorm_backward.
    With virtual_batch in training, mean and invstd have shape (N / k, C), one row per ghost
    batch; batchnorm_backward takes them as they are."""
    return _ForwardCall(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, out,
                        running_var_correction, save=True, activation=activation, residual=residual,
                        renorm=renorm, virtual_batch=virtual_batch).run()


class _BackwardCall:
    """A checked backward: every argument but given sums validated and dx allocated;
    run(count, sum_dy, sum_dy_xmu, sum_xmu) (all None: the fused backward) -> (dx, dgamma, dbeta)."""

    def __init__(self, dy, x, mean, invstd, gamma, training, axis, out, given_sums=False, activation=None,
                 y=None, dresidual=None, renorm=None):
        # 2-D mean / invstd: the (G, C) statistics of a ghost-batch forward
        ghost = not given_sums and getattr(mean, "ndim", 1) == 2
        self.cx = cx = _prepare(x, axis, (("dy", dy), ("mean", mean), ("invstd", invstd), ("gamma", gamma),
                                          ("out", out), ("y", y), ("dresidual", dresidual)), batch_outer=ghost)
        self.rows = int(mean.shape[0]) if ghost else 0
        self.groups = _ghost_groups(cx, groups=self.rows) if ghost else 1
        self.activation = check_activation(activation)
        if self.activation != _core.ACTIVATION_NONE and y is None:
            raise ValueError(f"activation={activation!r} needs y, the forward's output (the mask is y > 0)")
        self.ymask = None if self.activation == _core.ACTIVATION_NONE else cx.like_x("y", y)
        self.rd = None
        if renorm is not None:
            if not isinstance(renorm, (tuple, list)) or len(renorm) != 2:
                raise TypeError("renorm must be the pair (r, d) that batchnorm_forward(..., renorm=...) returned")
            if not _training_flag(training):
                raise ValueError("renorm (r, d) is for the training-mode backward")
            self.rd = (cx.per_channel("renorm r", renorm[0]), cx.per_channel("renorm d", renorm[1]))
        self.training = _training_flag(training)
        if ghost and (not self.training or renorm is not None):
            raise ValueError("mean / invstd of ghost batches (2-D, from virtual_batch) are for the training-mode "
                             "backward without renorm")
        self.dy = cx.like_x("dy", dy)
        if mean is None or invstd is None:
            raise ValueError("mean and invstd are required (as returned by batchnorm_forward)")
        self.m = cx.per_channel("mean", mean, rows=self.rows)
        self.r = cx.per_channel("invstd", invstd, rows=self.rows)
        self.g = cx.per_channel("gamma", gamma)
        self.given_sums = given_sums
        if self.training and not given_sums:
            _check_training_count(cx, 1, "training-mode backward", groups=self.groups)
        self.dx = cx.output(out, (("dy", dy), ("x", x), ("mean", mean), ("invstd", invstd),
                                  ("gamma", gamma), ("y", y), ("dresidual", dresidual)), in_place=(dy, x))
        # dresidual: its own output (may be dy itself, unless dx is written there too)
        self.dres = None if dresidual is None else cx.output(
            dresidual, (("dy", dy if out is not dy else None), ("x", x), ("y", y), ("out", out),
                        ("mean", mean), ("invstd", invstd), ("gamma", gamma)), in_place=(dy,), name="dresidual")

    def run(self, count=None, sum_dy=None, sum_dy_xmu=None, sum_xmu=None):
        cx, be = self.cx, self.cx.backend
        sums = {}
        if self.given_sums:
            arrays = {n: _stats_array(cx, n, a) for n, a in
                      (("count", count), ("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu))}
            if self.training:
                _check_device_counts(be, "count", arrays["count"], 1)
            sums = {n: be.address(a) for n, a in arrays.items()}
            sums["sum_xmu"] = 0 if sum_xmu is None else be.address(_stats_array(cx, "sum_xmu", sum_xmu))
        dgamma, dbeta = _per_channel_out(cx), _per_channel_out(cx)
        params = _core.BackwardParams(training=self.training, mean=be.address(self.m), invstd=be.address(self.r),
                                      gamma=address(be, self.g), dgamma=be.address(dgamma),
                                      dbeta=be.address(dbeta), activation=self.activation,
                                      y=address(be, self.ymask),
                                      dresidual=0 if self.dres is None else be.address(self.dres.data),
                                      renorm_r=0 if self.rd is None else be.address(self.rd[0]),
                                      renorm_d=0 if self.rd is None else be.address(self.rd[1]),
                                      virtual_batches=self.groups, **sums)
        _run_backward(cx, self.dy, self.dx.data, params)
        if self.dres is not None:
            self.dres.finish()
        return self.dx.finish(), dgamma, dbeta


@_on_device
def batchnorm_backward(dy: Array, x: Array, mean: Array, invstd: Array,
                       gamma: Optional[Array] = None, *, training: bool = True, axis: int = 1,
                       out: Optional[Array] = None, activation: Optional[str] = None,
                       y: Optional[Array] = None, dresidual: Optional[Array] = None,
                       renorm: Optional[Tuple[Array, Array]] = None) -> Tuple[Array, Array, Array]:
    """Gradients (dx, dgamma, dbeta) of batchnorm given dy and what batchnorm_forward returned.

    training=True differentiates through the batch statistics; training=False treats mean and
    invstd as constants (frozen statistics). out receives dx; it may be dy itself.

    Behind a fused epilogue: activation="relu" takes y, the forward's output, and uses
    dy * (y > 0) (0 where y == 0, as PyTorch's ReLU), in the same sweeps; dresidual (x's shape
    and dtype; may be dy when out is not) receives the residual's gradient, that masked dy.
    renorm=(r, d) (from batchnorm_forward(..., renorm=...)): the renormalised forward's r and d,
    constants here: dx uses gamma * r, dgamma = r * sum(dy * x_hat) + d * sum(dy).
    Ghost batches: mean / invstd of shape (G, C) (batchnorm_forward with virtual_batch) make
    each group of N / G consecutive samples differentiate through its own statistics; dgamma
    and dbeta sum over the groups.
    """
    return _BackwardCall(dy, x, mean, invstd, gamma, training, axis, out, activation=activation, y=y,
                         dresidual=dresidual, renorm=renorm).run()


# ------------------------------------ composable primitives ------------------------------------

def _reduce_workspace(cx: Canonical) -> Tuple[Any, ...]:
    """(stream, workspace address, bytes) for the CUDA reductions; () on the host."""
    be = cx.backend
    stream = be.stream()
    if stream is None:
        return ()
    ws = be.workspace(_core.reduce_workspace_size(cx.view))
    return stream, be.address(ws), ws.nbytes


@_on_device
def batch_stats(x: Array, *, axis: int = 1) -> Tuple[Array, Array, Array]:
    """Per-channel (count, mean, M2) of x as float64 arrays; M2 = sum((x - mean)^2)."""
    cx = _prepare(x, axis, ())
    be = cx.backend
    count, mean, m2 = (be.xp.empty((cx.channels,), dtype=np.float64) for _ in range(3))
    _core.batch_stats(cx.view, be.address(cx.data), be.address(count), be.address(mean),
                      be.address(m2), *_reduce_workspace(cx))
    return count, mean, m2


@_on_device
def merge_stats(count: Array, mean: Array, m2: Array) -> Tuple[Array, Array, Array]:
    """Merge K partial statistics, given as (K, C) float64 arrays, into (C,) statistics of the
    union (exact for unequal counts; partials with count 0 contribute nothing)."""
    backend = backend_of((("count", count), ("mean", mean), ("m2", m2)))
    parts = []
    count, mean, m2 = (backend.adopt(a) for a in (count, mean, m2))
    for name, a in (("count", count), ("mean", mean), ("m2", m2)):
        if np.dtype(a.dtype) != np.float64:
            raise TypeError(f"{name} must have dtype float64, got {dtype_name(a.dtype)}")
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D (partials, channels), got shape {tuple(a.shape)}")
        if tuple(a.shape) != tuple(count.shape):
            raise ValueError(f"{name} must have the shape of count {tuple(count.shape)}, got {tuple(a.shape)}")
        parts.append(backend.contiguous(a))
    k, channels = (int(s) for s in count.shape)
    if k < 1:
        raise ValueError("merge_stats needs at least one partial (count.shape[0] >= 1)")
    _check_device_counts(backend, "counts", parts[0], 0)
    res = [backend.xp.empty((channels,), dtype=np.float64) for _ in range(3)]
    _core.merge_stats(k, channels, *(backend.address(a) for a in parts),
                      *(backend.address(a) for a in res), backend.stream())
    return res[0], res[1], res[2]


def _normalize_call(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out,
                    running_var_correction=1, activation=None, residual=None):
    """Checks every argument of normalize except the statistics and allocates the outputs;
    returns (cx, run(count, mean, m2) -> (y, mean, invstd)). Synchronised BN checks before its
    collective and runs after it."""
    call = _ForwardCall(x, gamma, beta, running_mean, running_var, True, momentum, eps, axis, out,
                        running_var_correction, save=True, given_stats=True, activation=activation,
                        residual=residual)
    return call.cx, call.run


@_on_device
def normalize(x: Array, count: Array, mean: Array, m2: Array, gamma: Optional[Array] = None,
              beta: Optional[Array] = None, running_mean: Optional[Array] = None,
              running_var: Optional[Array] = None, *, momentum: float = 0.1, eps: float = 1e-5,
              axis: int = 1, out: Optional[Array] = None,
              running_var_correction: int = 1) -> Tuple[Array, Array, Array]:
    """Normalise x with given float64 statistics (e.g. merged across devices) and update the
    running statistics (running_var_correction as in batchnorm); returns (y, mean, invstd)
    with mean/invstd in the per-channel dtype."""
    backend_of((("x", x), ("count", count), ("mean", mean), ("m2", m2)))  # devices first
    _, run = _normalize_call(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out,
                             running_var_correction)
    return run(count, mean, m2)  # the statistics are checked before anything is written


@_on_device
def backward_reduce(dy: Array, x: Array, mean: Array, *, axis: int = 1) -> Tuple[Array, Array, Array]:
    """Per-channel float64 (sum(dy), sum(dy * (x - mean)), sum(x - mean)) in one sweep."""
    cx = _prepare(x, axis, (("dy", dy), ("mean", mean)))
    dyd = cx.like_x("dy", dy)
    if mean is None:
        raise ValueError("mean is required")
    m = cx.per_channel("mean", mean)
    be = cx.backend
    sums = [be.xp.empty((cx.channels,), dtype=np.float64) for _ in range(3)]
    _core.backward_reduce(cx.view, be.address(dyd), be.address(cx.data), be.address(m),
                          *(be.address(s) for s in sums), *_reduce_workspace(cx))
    return sums[0], sums[1], sums[2]


def _backward_elementwise_call(dy, x, mean, invstd, gamma, training, axis, out):
    """Checks every argument of backward_elementwise except the sums and allocates the outputs;
    returns (cx, run(count, sum_dy, sum_dy_xmu, sum_xmu) -> (dx, dgamma, dbeta))."""
    call = _BackwardCall(dy, x, mean, invstd, gamma, training, axis, out, given_sums=True)
    return call.cx, call.run


@_on_device
def backward_elementwise(dy: Array, x: Array, mean: Array, invstd: Array, gamma: Optional[Array],
                         count: Array, sum_dy: Array, sum_dy_xmu: Array,
                         sum_xmu: Optional[Array] = None, *, training: bool = True,
                         axis: int = 1, out: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """(dx, dgamma, dbeta) from per-channel sums (possibly all-reduced across devices) over a
    batch of `count` values per channel; see batchnorm_backward."""
    sums = (("count", count), ("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu), ("sum_xmu", sum_xmu))
    backend_of((("x", x),) + sums)  # devices first
    _, run = _backward_elementwise_call(dy, x, mean, invstd, gamma, training, axis, out)
    return run(count, sum_dy, sum_dy_xmu, sum_xmu)  # checks the sums before anything is written


# ----------------------------------------- folding -----------------------------------------

def fold(weight: Array, bias: Optional[Array], gamma: Optional[Array], beta: Optional[Array],
         running_mean: Array, running_var: Array, *, eps: float = 1e-5,
         axis: int = 0) -> Tuple[Array, Array]:
    """Inference-mode BN folded into the preceding layer: returns (weight2, bias2) such that
    layer(x, weight2) + bias2 == batchnorm(layer(x, weight) + bias, training=False).

    axis is the output-channel axis of weight: 0 for conv OIHW and linear (out, in), 1 for
    transposed conv IOHW, -1 for HWIO / (in, out). bias may be None (0); gamma / beta may be
    None (1 / 0). Computed in float64, returned in weight's dtype; NumPy or CuPy arrays (all on
    one device). With s = gamma / sqrt(running_var + eps): weight2 = weight * s along axis,
    bias2 = (bias - running_mean) * s + beta.
    """
    named = (("weight", weight), ("bias", bias), ("gamma", gamma), ("beta", beta),
             ("running_mean", running_mean), ("running_var", running_var))
    be = backend_of(tuple((n, a) for n, a in named if a is not None))
    xp = be.xp
    w = be.adopt(weight)
    if w is None:
        raise ValueError("weight is required")
    if np.dtype(w.dtype).kind != "f" and dtype_name(w.dtype) != "bfloat16":
        raise TypeError(f"weight must be a floating-point array, got {dtype_name(w.dtype)}")
    if w.ndim < 1:
        raise ValueError("weight must have at least 1 dimension")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis must be in [{-w.ndim}, {w.ndim}) for a {w.ndim}-D weight, got {axis}")
    ax = int(axis) % w.ndim
    c = int(w.shape[ax])
    eps = check_eps(eps)

    def vec(name, a, default):
        if a is None:
            if default is None:
                raise ValueError(f"{name} is required")
            return xp.full(c, default, dtype=np.float64)
        a = be.adopt(a)
        if tuple(a.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},) (the size of weight's axis {axis}), got {tuple(a.shape)}")
        if np.dtype(a.dtype).kind != "f" and dtype_name(a.dtype) != "bfloat16":
            raise TypeError(f"{name} must be a floating-point array, got {dtype_name(a.dtype)}")
        return a.astype(np.float64)

    g, b = vec("gamma", gamma, 1.0), vec("beta", beta, 0.0)
    rm, rv = vec("running_mean", running_mean, None), vec("running_var", running_var, None)
    bias64 = vec("bias", bias, 0.0)
    if not bool((rv + eps > 0).all()):
        raise ValueError("running_var + eps must be > 0 in every channel")
    s = g / xp.sqrt(rv + eps)
    shape = [1] * w.ndim
    shape[ax] = c
    w2 = (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype)
    b2 = ((bias64 - rm) * s + b).astype(w.dtype)
    return w2, b2
