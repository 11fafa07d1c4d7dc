"""The functional API: batchnorm, batchnorm_forward, batchnorm_backward and the composable
primitives (batch_stats, merge_stats, normalize, backward_reduce, backward_elementwise).

Every function validates all of its arguments before libpybn touches anything, so a call that
raises changes nothing it was given.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Optional, Tuple

import numpy as np

from . import _core
from ._arrays import Canonical, address, backend_of, check_eps, check_momentum, device_context, dtype_name

Array = Any


def _on_device(fn):
    """Adds the keyword `stream` and runs fn with the device of its CUDA arrays current and,
    if given, `stream` as CuPy's current stream (the stream the work is queued on)."""

    @functools.wraps(fn)
    def call(*args, stream=None, **kwargs):
        with device_context((*args, *kwargs.values()), stream):
            return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    call.__signature__ = sig.replace(parameters=[*sig.parameters.values(), inspect.Parameter(
        "stream", inspect.Parameter.KEYWORD_ONLY, default=None)])
    return call


def _prepare(x: Array, axis: int, named: Tuple[Tuple[str, Any], ...]) -> Canonical:
    backend = backend_of((("x", x),) + named)
    return Canonical(backend, x, axis)


def _check_training_count(cx: Canonical, what: str = "training") -> None:
    if cx.channels > 0 and cx.count < 2:
        raise ValueError(
            f"{what} needs at least 2 values per channel, got {cx.count} "
            f"(x of shape {cx.shape} with the channel axis of size {cx.channels})"
        )


def _per_channel_out(cx: Canonical) -> Array:
    return cx.backend.xp.empty((cx.channels,), dtype=cx.pdtype)


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


def _forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, out, save):
    cx = _prepare(x, axis, (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                            ("running_var", running_var), ("out", out)))
    training = _training_flag(training)
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    g = cx.per_channel("gamma", gamma)
    b = cx.per_channel("beta", beta)
    if training:
        _check_training_count(cx)
        running = _RunningStats(cx, running_mean, running_var)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        running = None
        rm = cx.per_channel("running_mean", running_mean)
        rv = cx.per_channel("running_var", running_var)
    y = cx.output(out, (("x", x), ("gamma", gamma), ("beta", beta),
                        ("running_mean", running_mean), ("running_var", running_var)),
                  in_place=(x,))
    be, stream = cx.backend, cx.backend.stream()
    mean = invstd = None
    if training:
        if save:
            mean, invstd = _per_channel_out(cx), _per_channel_out(cx)
        _core.forward_train(cx.view, be.address(cx.data), address(be, g), address(be, b), eps,
                            address(be, running.data[0]), address(be, running.data[1]), momentum,
                            be.address(y.data), address(be, mean), address(be, invstd), stream)
        running.write_back()
    else:
        _core.forward_infer(cx.view, be.address(cx.data), be.address(rm), be.address(rv),
                            address(be, g), address(be, b), eps, be.address(y.data), stream)
        if save:
            mean = rm.copy()
            invstd = 1.0 / cx.backend.xp.sqrt(rv.astype(np.float64) + eps)
            invstd = invstd.astype(cx.pdtype)
    return y.finish(), mean, invstd


@_on_device
def batchnorm(x: Array, gamma: Optional[Array] = None, beta: Optional[Array] = None,
              running_mean: Optional[Array] = None, running_var: Optional[Array] = None, *,
              training: bool = True, momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
              out: Optional[Array] = None) -> Array:
    """Batch normalisation of x over every axis but `axis`; returns y (x's dtype).

    training=True normalises with the batch statistics and, when running_mean / running_var are
    given, updates them in place (running = (1 - momentum) * running + momentum * batch, unbiased
    variance). training=False normalises with running_mean / running_var (both required).
    gamma / beta default to 1 / 0. out (x's shape and dtype) receives y; it may be x itself.
    """
    return _forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis,
                    out, save=False)[0]


@_on_device
def batchnorm_forward(x: Array, gamma: Optional[Array] = None, beta: Optional[Array] = None,
                      running_mean: Optional[Array] = None, running_var: Optional[Array] = None, *,
                      training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                      axis: int = 1, out: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """Like batchnorm, also returning (mean, invstd) for batchnorm_backward: the batch mean and
    1/sqrt(var + eps) in training, running_mean and 1/sqrt(running_var + eps) otherwise."""
    return _forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis,
                    out, save=True)


@_on_device
def batchnorm_backward(dy: Array, x: Array, mean: Array, invstd: Array,
                       gamma: Optional[Array] = None, *, training: bool = True, axis: int = 1,
                       out: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """Gradients (dx, dgamma, dbeta) of batchnorm given dy and what batchnorm_forward returned.

    training=True differentiates through the batch statistics; training=False treats mean and
    invstd as constants (frozen statistics). out receives dx; it may be dy itself.
    """
    cx = _prepare(x, axis, (("dy", dy), ("mean", mean), ("invstd", invstd), ("gamma", gamma),
                            ("out", out)))
    training = _training_flag(training)
    dyd = cx.like_x("dy", dy)
    if mean is None or invstd is None:
        raise ValueError("mean and invstd are required (as returned by batchnorm_forward)")
    m = cx.per_channel("mean", mean)
    r = cx.per_channel("invstd", invstd)
    g = cx.per_channel("gamma", gamma)
    if training:
        _check_training_count(cx, "training-mode backward")
    dx = cx.output(out, (("dy", dy), ("x", x), ("mean", mean), ("invstd", invstd),
                         ("gamma", gamma)), in_place=(dy, x))
    dgamma, dbeta = _per_channel_out(cx), _per_channel_out(cx)
    be = cx.backend
    _core.backward(cx.view, be.address(dyd), be.address(cx.data), be.address(m), be.address(r),
                   address(be, g), training, be.address(dx.data), be.address(dgamma),
                   be.address(dbeta), be.stream())
    return dx.finish(), dgamma, dbeta


# ------------------------------------ composable primitives ------------------------------------

@_on_device
def batch_stats(x: Array, *, axis: int = 1) -> Tuple[Array, Array, Array]:
    """Per-channel (count, mean, M2) of x as float64 arrays; M2 = sum((x - mean)^2)."""
    cx = _prepare(x, axis, ())
    be = cx.backend
    count, mean, m2 = (be.xp.empty((cx.channels,), dtype=np.float64) for _ in range(3))
    _core.batch_stats(cx.view, be.address(cx.data), be.address(count), be.address(mean),
                      be.address(m2), be.stream())
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
    res = [backend.xp.empty((channels,), dtype=np.float64) for _ in range(3)]
    _core.merge_stats(k, channels, *(backend.address(a) for a in parts),
                      *(backend.address(a) for a in res), backend.stream())
    return res[0], res[1], res[2]


def _normalize_call(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out):
    """Checks every argument of normalize except the statistics and allocates the outputs;
    returns run(count, mean, m2) -> (y, mean, invstd). Synchronised BN checks before its
    collective and runs after it."""
    cx = _prepare(x, axis, (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                            ("running_var", running_var), ("out", out)))
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    g = cx.per_channel("gamma", gamma)
    b = cx.per_channel("beta", beta)
    running = _RunningStats(cx, running_mean, running_var)
    y = cx.output(out, (("x", x), ("gamma", gamma), ("beta", beta),
                        ("running_mean", running_mean), ("running_var", running_var)),
                  in_place=(x,))

    def run(count, mean, m2):
        stats = [_stats_array(cx, n, a) for n, a in (("count", count), ("mean", mean), ("m2", m2))]
        smean, sinvstd = _per_channel_out(cx), _per_channel_out(cx)
        be = cx.backend
        _core.normalize(cx.view, be.address(cx.data), *(be.address(s) for s in stats),
                        address(be, g), address(be, b), eps, be.address(y.data),
                        address(be, running.data[0]), address(be, running.data[1]), momentum,
                        be.address(smean), be.address(sinvstd), be.stream())
        running.write_back()
        return y.finish(), smean, sinvstd

    return cx, run


@_on_device
def normalize(x: Array, count: Array, mean: Array, m2: Array, gamma: Optional[Array] = None,
              beta: Optional[Array] = None, running_mean: Optional[Array] = None,
              running_var: Optional[Array] = None, *, momentum: float = 0.1, eps: float = 1e-5,
              axis: int = 1, out: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """Normalise x with given float64 statistics (e.g. merged across devices) and update the
    running statistics; returns (y, mean, invstd) with mean/invstd in the per-channel dtype."""
    backend_of((("x", x), ("count", count), ("mean", mean), ("m2", m2)))  # devices first
    _, run = _normalize_call(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out)
    return run(count, mean, m2)  # checks the statistics before anything is written


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
                          *(be.address(s) for s in sums), be.stream())
    return sums[0], sums[1], sums[2]


def _backward_elementwise_call(dy, x, mean, invstd, gamma, training, axis, out):
    """Checks every argument of backward_elementwise except the sums and allocates the outputs;
    returns run(count, sum_dy, sum_dy_xmu, sum_xmu) -> (dx, dgamma, dbeta)."""
    cx = _prepare(x, axis, (("dy", dy), ("mean", mean), ("invstd", invstd), ("gamma", gamma),
                            ("out", out)))
    training = _training_flag(training)
    dyd = cx.like_x("dy", dy)
    if mean is None or invstd is None:
        raise ValueError("mean and invstd are required")
    m = cx.per_channel("mean", mean)
    r = cx.per_channel("invstd", invstd)
    g = cx.per_channel("gamma", gamma)
    dx = cx.output(out, (("dy", dy), ("x", x), ("mean", mean), ("invstd", invstd),
                         ("gamma", gamma)), in_place=(dy, x))

    def run(count, sum_dy, sum_dy_xmu, sum_xmu):
        stats = [_stats_array(cx, n, a) for n, a in (("count", count), ("sum_dy", sum_dy),
                                                     ("sum_dy_xmu", sum_dy_xmu))]
        sx = None if sum_xmu is None else _stats_array(cx, "sum_xmu", sum_xmu)
        dgamma, dbeta = _per_channel_out(cx), _per_channel_out(cx)
        be = cx.backend
        _core.backward_elementwise(cx.view, be.address(dyd), be.address(cx.data), be.address(m),
                                   be.address(r), address(be, g), training,
                                   *(be.address(s) for s in stats), address(be, sx),
                                   be.address(dx.data), be.address(dgamma), be.address(dbeta),
                                   be.stream())
        return dx.finish(), dgamma, dbeta

    return cx, run


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
