"""The functional API: `batchnorm`, `batchnorm_forward` and `batchnorm_backward`, the composable
primitives they are made of (`batch_stats`, `merge_stats`, `normalize`, `backward_reduce`,
`backward_elementwise`), and `fold`.

Every function validates all of its arguments before libpybn touches anything, so a call that
raises changes nothing it was given. Every function but `fold` also takes the keyword-only
argument ``stream`` (a CuPy stream, a ``torch.cuda.Stream`` or a ``cudaStream_t`` as int) for
CUDA arrays: their work is queued on it (default: CuPy's current stream), with the device of the
first CUDA array current; host arrays ignore it.
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


def _on_device(fn: _F, fast: Optional[Callable[..., Any]] = None) -> _F:
    """Adds the keyword `stream` and runs fn with the device of its CUDA arrays current and,
    if given, `stream` as CuPy's current stream (the stream the work is queued on). Typed as the
    identity so that type checkers see each function's own signature. `fast(*args, **kwargs)`,
    when given, is tried first for calls without a stream: its result unless it is None."""

    @functools.wraps(fn)
    def call(*args, stream=None, **kwargs):
        if fast is not None and stream is None:
            try:
                r = fast(*args, **kwargs)
            except TypeError:  # arguments fn does not take: fn reports them in its own name
                r = None
            if r is not None:
                return r
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


def _fast(save: bool) -> Callable[..., Any]:
    """The Cython fast path of batchnorm / batchnorm_forward (_core.fast_forward): host NumPy
    arrays with the default options or the fused epilogue (ReLU, residual); None sends the call
    down the general path."""
    def fast(x, gamma=None, beta=None, running_mean=None, running_var=None, *, training=True, momentum=0.1,
             eps=1e-5, axis=1, out=None, running_var_correction=1, activation=None, residual=None, renorm=None,
             virtual_batch=None):
        relu = type(activation) is str and activation == "relu"
        if renorm is None and virtual_batch is None and (activation is None or relu):
            return _core.fast_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, out,
                                      running_var_correction, save, 0 if activation is None else 1, residual)
        return None
    return fast


@functools.partial(_on_device, fast=_fast(False))
def batchnorm(x: Array, gamma: Optional[Array] = None, beta: Optional[Array] = None,
              running_mean: Optional[Array] = None, running_var: Optional[Array] = None, *,
              training: bool = True, momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
              out: Optional[Array] = None, running_var_correction: int = 1,
              activation: Optional[str] = None, residual: Optional[Array] = None,
              renorm: Optional[Tuple[float, float]] = None, virtual_batch: Optional[int] = None) -> Array:
    """Batch normalisation of `x` over every axis but `axis`.

    Per channel, ``y = gamma * (x - mean) / sqrt(var + eps) + beta``: with the batch mean and the
    biased batch variance in training (``training=True``, updating `running_mean` / `running_var` in
    place when they are given), with `running_mean` / `running_var` otherwise. A residual and a ReLU
    can be fused into the same sweep, and the batch can be renormalised (`renorm`) or split into
    ghost batches (`virtual_batch`).

    Parameters
    ----------
    x : array (float16, bfloat16, float32 or float64)
        The data, at least 2-D, channels on `axis` (NCHW with ``axis=1``, NHWC with ``axis=-1``), in
        native byte order. A NumPy array, a CPU DLPack array (a PyTorch CPU tensor, a JAX CPU array;
        zero-copy) or a CUDA array (CuPy, or any ``__cuda_array_interface__`` / CUDA DLPack object);
        every array of one call lives on one device. A C-contiguous x or a permutation of one (a
        channels-last tensor) is read in place; any other x is copied once.
    gamma, beta : array of shape (C,), optional
        Scale and shift, in the per-channel dtype: float32 for float16, bfloat16 and float32 x,
        float64 for float64 x. None (the default): 1 and 0.
    running_mean, running_var : array of shape (C,), optional
        Running statistics, in the per-channel dtype. With ``training=True`` each one given (either
        may be None) is updated in place, so it must be writable (a strided one is updated through a
        copy): ``running = (1 - momentum) * running + momentum * batch``. Both are required with
        ``training=False``.
    training : bool, default True
        True: normalise with the batch statistics; False: with the running statistics (frozen).
    momentum : float, default 0.1
        Weight of the batch in the running-statistics update, in [0, 1] (PyTorch's convention; the
        momentum ``m`` of Keras/TF, Flax, PaddlePaddle and ONNX is ``1 - m`` here).
    eps : float, default 1e-5
        Added to the variance; finite and >= 0.
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    out : array, optional
        Receives y: x's shape and dtype, writable, overlapping no input except by being exactly x or
        `residual` (in place). None (the default): a new array.
    running_var_correction : {1, 0}, default 1
        The variance that updates `running_var`: 1 the unbiased ``M2 / (n - 1)`` (PyTorch, cuDNN), 0
        the biased ``M2 / n`` (ONNX, Keras/TF, Flax, PaddlePaddle). The normalisation itself always
        uses the biased variance.
    activation : {None, "relu"}, default None
        "relu" applies ``max(0, .)`` last, in the same sweep (fused epilogue).
    residual : array, optional
        Added after the affine step, before the activation (fused epilogue): x's shape and dtype.
    renorm : (float, float), optional
        ``(r_max, d_max)``: batch renormalisation, with ``r_max >= 1`` and ``d_max >= 0`` (finite);
        needs ``training=True`` and both running statistics. See Notes.
    virtual_batch : int, optional
        ``k >= 1``: ghost batches of k consecutive samples, in training (ignored when
        ``training=False``); k must divide the batch size ``N = x.shape[0]`` and the channel axis must
        not be 0. See Notes.
    stream : CuPy stream, torch.cuda.Stream or int, optional
        Keyword-only, for CUDA arrays: the stream the work is queued on (an int is a
        ``cudaStream_t``). None (the default): CuPy's current stream. Ignored for host arrays.

    Returns
    -------
    y : array
        The normalised x: x's shape and dtype, on x's device (a NumPy array for host input, a CuPy array for CUDA
        input), laid out like x (the same memory order for C-contiguous and channels-last x); `out`
        itself when it is given.

    Raises
    ------
    TypeError
        An argument of the wrong type: `training` not a bool; `eps`, `momentum` or a `renorm` value
        not a real number; `axis`, `virtual_batch` or `running_var_correction` not an int;
        `renorm` not a pair; `activation` not a str; x of another dtype (or not in native byte
        order), per-channel arrays not of the per-channel dtype, `out` / `residual` not of x's dtype;
        something that is not an array, or arrays on different devices; CUDA arrays with a pybn built
        without CUDA, or without CuPy; a `stream` of another type (CUDA arrays).
    ValueError
        A bad shape or value: x with fewer than 2 dimensions; per-channel arrays not of shape (C,);
        `out` / `residual` not of x's shape; `axis`, `eps`, `momentum`, `running_var_correction`,
        `activation`, `renorm` or `virtual_batch` out of range; a read-only `out` or running
        statistic that would be written; `out` overlapping an input other than exactly in place;
        running statistics missing with ``training=False``; `renorm` without ``training=True`` and
        both running statistics, or together with `virtual_batch`; `virtual_batch` not dividing N,
        or with ``axis=0``; too few values per channel in training (per ghost batch): fewer than 2
        when `running_var` is updated with ``running_var_correction=1``, else fewer than 1.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError`` (a RuntimeError): a library error that is not a bad argument (a
        CUDA error, a path not compiled into this build, an internal error).

    See Also
    --------
    batchnorm_forward : The same, also returning what `batchnorm_backward` needs.
    BatchNorm : The layer, with its own parameters and running statistics.

    Notes
    -----
    Every argument is checked before anything is written: a call that raises changes nothing it was
    given, not even ``out=x`` or the running statistics.

    Running statistics: the batch mean updates `running_mean` and ``M2 / (n - running_var_correction)``
    updates `running_var`, where n is the number of values per channel and ``M2 = sum((x - mean)^2)``.
    One value per channel (n = 1) is valid in training unless `running_var` is updated with
    ``running_var_correction=1`` (PyTorch refuses it too); y is then beta. A channel whose batch
    statistics are not finite does not update its running statistics, nor does an update that would
    overflow them; NaN / Inf in a channel stay in that channel.

    Fused epilogue, in the same sweep (no extra pass): ``y = relu(gamma * x_hat + beta + residual)``
    with ``x_hat = (x - mean) / sqrt(var + eps)``. NaN stays NaN.

    ``renorm=(r_max, d_max)``: batch renormalisation (Ioffe 2017):
    ``y = gamma * (r * x_hat + d) + beta`` with ``r = clip(sigma_batch / sigma_running, 1/r_max, r_max)``
    and ``d = clip((mean_batch - running_mean) / sigma_running, -d_max, d_max)``, from the running
    statistics before this step's update (``sigma = sqrt(var + eps)``).

    ``virtual_batch=k``: ghost batches (Hoffer et al. 2017; Keras's ``virtual_batch_size``) in
    training: the batch axis (axis 0; the channel axis must be another) is split into N / k groups of
    k consecutive samples, each normalised with its own statistics, in one call. The running
    statistics are updated once, from the average of the group means and the average of the group
    variances (each with `running_var_correction`), as Keras does. Keras 2 groups samples
    ``i, i + N/k, i + 2N/k, ...`` instead: reorder x with
    ``x.reshape(k, N // k, ...).swapaxes(0, 1).reshape(x.shape)`` to match it exactly.

    Frameworks: PyTorch's defaults are pybn's; a Keras ``BatchNormalization()`` is
    ``batchnorm(x, g, b, rm, rv, momentum=0.01, eps=1e-3, axis=-1, running_var_correction=0)``
    (docs/conventions.md maps every framework's settings).

    CUDA arrays: the work is queued on the stream without synchronising the host; the result is a
    CuPy array on the input's device. Results are bitwise identical from run to run and for every
    thread count.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> y = pybn.batchnorm(x)
    >>> y.shape, y.dtype
    ((8, 3, 4, 4), dtype('float32'))
    >>> np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5), np.allclose(y.std(axis=(0, 2, 3)), 1, atol=1e-3)
    (True, True)

    Training with running statistics (updated in place), then inference with them:

    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y = pybn.batchnorm(x, None, None, rm, rv, momentum=0.1)
    >>> np.allclose(rm, 0.1 * x.mean(axis=(0, 2, 3)), atol=1e-6)
    True
    >>> np.allclose(rv, 0.9 + 0.1 * x.var(axis=(0, 2, 3), ddof=1), atol=1e-6)
    True
    >>> y_eval = pybn.batchnorm(x, None, None, rm, rv, training=False)

    A channels-last view is read in place; the fused epilogue; ghost batches:

    >>> np.allclose(pybn.batchnorm(x.transpose(0, 2, 3, 1), axis=-1), y.transpose(0, 2, 3, 1), atol=1e-5)
    True
    >>> z = np.ones_like(x)
    >>> np.allclose(pybn.batchnorm(x, residual=z, activation="relu"), np.maximum(y + z, 0), atol=1e-5)
    True
    >>> np.allclose(pybn.batchnorm(x, virtual_batch=4)[:4], pybn.batchnorm(x[:4]), atol=1e-5)
    True
    """
    return _ForwardCall(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, out,
                        running_var_correction, save=False, activation=activation,
                        residual=residual, renorm=renorm, virtual_batch=virtual_batch).run()[0]


@functools.partial(_on_device, fast=_fast(True))
def batchnorm_forward(x: Array, gamma: Optional[Array] = None, beta: Optional[Array] = None,
                      running_mean: Optional[Array] = None, running_var: Optional[Array] = None, *,
                      training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                      axis: int = 1, out: Optional[Array] = None,
                      running_var_correction: int = 1, activation: Optional[str] = None,
                      residual: Optional[Array] = None,
                      renorm: Optional[Tuple[float, float]] = None,
                      virtual_batch: Optional[int] = None) -> Tuple[Array, ...]:
    """Batch normalisation as `batchnorm`, also returning the statistics `batchnorm_backward` needs.

    Parameters
    ----------
    x : array (float16, bfloat16, float32 or float64)
        The data, at least 2-D, channels on `axis`, as in `batchnorm`.
    gamma, beta : array of shape (C,), optional
        Scale and shift in the per-channel dtype (float32 for 16- and 32-bit x, float64 for float64
        x). None: 1 and 0.
    running_mean, running_var : array of shape (C,), optional
        Running statistics in the per-channel dtype: updated in place in training, required with
        ``training=False``, as in `batchnorm`.
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
    running_var_correction : {1, 0}, default 1
        The variance that updates running_var: 1 the unbiased one, 0 the biased one.
    activation : {None, "relu"}, default None
        A fused ReLU, applied last, as in `batchnorm`.
    residual : array, optional
        A fused residual of x's shape and dtype, added before the activation, as in `batchnorm`.
    renorm : (float, float), optional
        ``(r_max, d_max)``, as in `batchnorm`; r and d are then returned as well.
    virtual_batch : int, optional
        The number k of samples per ghost batch, as in `batchnorm`; in training, mean and invstd then
        have one row per ghost batch.
    stream : CuPy stream, torch.cuda.Stream or int, optional
        For CUDA arrays: the stream the work is queued on (None: CuPy's current stream); ignored for
        host arrays.

    Returns
    -------
    y : array
        As `batchnorm` returns it: x's shape and dtype (`out` when given).
    mean : array of shape (C,), or (N / k, C) with virtual_batch in training
        In the per-channel dtype: the batch mean in training, `running_mean` otherwise.
    invstd : array of the shape of mean
        In the per-channel dtype: ``1 / sqrt(var + eps)`` with the biased batch variance in training,
        ``1 / sqrt(running_var + eps)`` otherwise.
    r, d : array of shape (C,)
        Only with `renorm` (then the result is ``(y, mean, invstd, r, d)``): the renormalisation
        coefficients, in the per-channel dtype; pass ``renorm=(r, d)`` to `batchnorm_backward`.

    Raises
    ------
    TypeError
        As `batchnorm`: argument types, dtypes and devices.
    ValueError
        As `batchnorm`: shapes, values out of range, read-only or overlapping outputs, too few values
        per channel in training.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    batchnorm_backward : Takes dy, x and the mean and invstd returned here.

    Notes
    -----
    With `virtual_batch` in training, mean and invstd have shape ``(N / k, C)``, one row per ghost
    batch (row g: samples ``g*k ... g*k + k - 1``); `batchnorm_backward` takes them as they are. In
    inference (``training=False``) they are (C,) arrays.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 5)).astype(np.float32)
    >>> y, mean, invstd = pybn.batchnorm_forward(x)
    >>> mean.shape, mean.dtype, invstd.dtype
    ((3,), dtype('float32'), dtype('float32'))
    >>> np.allclose(mean, x.mean(axis=(0, 2)), atol=1e-6)
    True
    >>> np.allclose(invstd, 1 / np.sqrt(x.var(axis=(0, 2)) + 1e-5), rtol=1e-5)
    True

    Ghost batches of 4 samples give one row of statistics per group; renorm also returns r and d:

    >>> pybn.batchnorm_forward(x, virtual_batch=4)[1].shape
    (2, 3)
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y, mean, invstd, r, d = pybn.batchnorm_forward(x, None, None, rm, rv, renorm=(3.0, 5.0))
    >>> r.shape, d.shape
    ((3,), (3,))
    """
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


def _fast_backward(dy, x, mean, invstd, gamma=None, *, training=True, axis=1, out=None, activation=None, y=None,
                   dresidual=None, renorm=None):
    """The Cython fast path of batchnorm_backward (_core.fast_backward), fused options included
    but renorm."""
    relu = type(activation) is str and activation == "relu"
    if renorm is None and (activation is None or relu):
        return _core.fast_backward(dy, x, mean, invstd, gamma, training, axis, out, 0 if activation is None else 1,
                                   y, dresidual)
    return None


@functools.partial(_on_device, fast=_fast_backward)
def batchnorm_backward(dy: Array, x: Array, mean: Array, invstd: Array,
                       gamma: Optional[Array] = None, *, training: bool = True, axis: int = 1,
                       out: Optional[Array] = None, activation: Optional[str] = None,
                       y: Optional[Array] = None, dresidual: Optional[Array] = None,
                       renorm: Optional[Tuple[Array, Array]] = None) -> Tuple[Array, Array, Array]:
    """Compute the gradients (dx, dgamma, dbeta) of batch normalisation from dy and `batchnorm_forward`'s results.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to y: x's shape and dtype.
    x : array (float16, bfloat16, float32 or float64)
        The forward's input, at least 2-D, channels on `axis`.
    mean, invstd : array of shape (C,), or (G, C) for ghost batches
        As returned by `batchnorm_forward`, in the per-channel dtype (float32 for 16- and 32-bit x,
        float64 for float64 x); required. ``(G, C)`` arrays (from ``virtual_batch``) make each group of
        N / G consecutive samples differentiate through its own statistics: training only, without
        `renorm`, and G must split the batch size N into equal groups (channel axis not 0).
    gamma : array of shape (C,), optional
        The forward's scale, in the per-channel dtype. None (the default): 1.
    training : bool, default True
        True differentiates through the batch statistics; False treats mean and invstd as constants
        (frozen statistics, e.g. the running ones of an inference-mode forward).
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    out : array, optional
        Receives dx: x's shape and dtype, writable; it may be dy or x itself (exactly in place), and
        overlaps no other input. None (the default): a new array.
    activation : {None, "relu"}, default None
        The forward's fused activation: "relu" uses ``dy * (y > 0)`` (0 where ``y == 0``, as
        PyTorch's ReLU), in the same sweeps; it needs `y`.
    y : array, optional
        The forward's output (x's shape and dtype), the mask of ``activation="relu"``; not read
        otherwise.
    dresidual : array, optional
        Output for the gradient of the forward's `residual`: x's shape and dtype, writable; it
        receives the (masked) dy. It may be dy itself when `out` is not.
    renorm : (array, array), optional
        ``(r, d)``, what ``batchnorm_forward(..., renorm=...)`` returned, (C,) arrays in the
        per-channel dtype: constants here (training only).
    stream : CuPy stream, torch.cuda.Stream or int, optional
        Keyword-only, for CUDA arrays: the stream the work is queued on; None: CuPy's current
        stream. Ignored for host arrays.

    Returns
    -------
    dx : array
        The gradient with respect to x: x's shape and dtype, laid out like x; `out` itself when given.
    dgamma : array of shape (C,)
        ``sum(dy * x_hat)`` per channel, in the per-channel dtype (also when gamma is None).
    dbeta : array of shape (C,)
        ``sum(dy)`` per channel, in the per-channel dtype.

    Raises
    ------
    TypeError
        `training` not a bool, `activation` not a str, `renorm` not a pair; dy, y, out or dresidual
        not of x's dtype, x of an unsupported dtype, mean, invstd, gamma, r or d not of the
        per-channel dtype; something that is not an array, or arrays on different devices (and the
        CUDA cases of `batchnorm`).
    ValueError
        dy, y, out or dresidual not of x's shape; mean, invstd, gamma, r or d of the wrong shape;
        mean or invstd missing; ``activation="relu"`` without y; `renorm` or 2-D mean / invstd with
        ``training=False``, or both together; ghost-batch rows that do not split N, or ``axis=0``
        with them; read-only or overlapping outputs; `axis` out of range; no value per channel (per
        ghost batch) in training.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    batchnorm_forward : The forward whose mean and invstd this takes.
    backward_reduce, backward_elementwise : The same backward in two steps, for sums across devices.

    Notes
    -----
    With ``x_hat = (x - mean) * invstd`` and means over the n values of each channel (of each ghost
    batch), ``training=True`` gives
    ``dx = gamma * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))``, and ``training=False``
    ``dx = gamma * invstd * dy``; dgamma and dbeta are the same in both.

    Behind a fused epilogue: with ``activation="relu"``, dy is replaced by ``dy * (y > 0)`` in the
    same sweeps; `dresidual` receives that masked dy, the residual's gradient. With
    ``renorm=(r, d)``, dx uses ``gamma * r`` and ``dgamma = r * sum(dy * x_hat) + d * sum(dy)``.
    Ghost batches: mean / invstd of shape (G, C) make each group of N / G consecutive samples
    differentiate through its own statistics; dgamma and dbeta sum over the groups.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((16, 3))
    >>> gamma = np.array([1.0, 2.0, 0.5])
    >>> y, mean, invstd = pybn.batchnorm_forward(x, gamma)
    >>> dy = rng.standard_normal(x.shape)
    >>> dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, gamma)
    >>> dx.shape, dgamma.shape, dgamma.dtype
    ((16, 3), (3,), dtype('float64'))
    >>> np.allclose(dbeta, dy.sum(axis=0)), np.allclose(dgamma, (dy * (x - mean) * invstd).sum(axis=0))
    (True, True)
    >>> np.allclose(dx.sum(axis=0), 0)  # the batch mean's gradient cancels
    True

    The fused ReLU and residual: pass the forward's y; dresidual receives the masked dy.

    >>> y, mean, invstd = pybn.batchnorm_forward(x, gamma, residual=np.ones_like(x), activation="relu")
    >>> dz = np.empty_like(x)
    >>> dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, gamma, activation="relu", y=y,
    ...                                             dresidual=dz)
    >>> np.allclose(dz, dy * (y > 0)), np.allclose(dbeta, dz.sum(axis=0))
    (True, True)
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
    """Per-channel batch statistics (count, mean, M2) of x, in float64.

    Parameters
    ----------
    x : array (float16, bfloat16, float32 or float64)
        The data, at least 2-D, channels on `axis` (host or CUDA array, as in `batchnorm`).
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    stream : CuPy stream, torch.cuda.Stream or int, optional
        Keyword-only, for CUDA arrays: the stream the work is queued on; None: CuPy's current
        stream. Ignored for host arrays.

    Returns
    -------
    count : array of shape (C,), float64
        The number of values per channel (every axis but `axis`).
    mean : array of shape (C,), float64
        The mean per channel.
    m2 : array of shape (C,), float64
        ``M2 = sum((x - mean)^2)`` per channel: the biased variance is ``M2 / count``, the unbiased
        one ``M2 / (count - 1)``.

    Raises
    ------
    TypeError
        x of an unsupported dtype or not an array (and the CUDA cases of `batchnorm`).
    ValueError
        x with fewer than 2 dimensions, or `axis` out of range.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    merge_stats : Merges the statistics of several parts of a batch.
    normalize : Normalises with given statistics.

    Notes
    -----
    The statistics are accumulated relative to a shift inside the data (in float32 runs merged in
    float64 for 16- and 32-bit x, in float64 for float64 x), so they stay exact to rounding when the
    mean is far from zero. An empty batch gives count 0, mean 0 and M2 0; NaN / Inf stay in their
    own channel. On a CUDA device the arrays are CuPy arrays on that device.

    Examples
    --------
    >>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> count, mean, m2 = pybn.batch_stats(x)
    >>> print(count, mean, m2)
    [4. 4. 4.] [4.5 5.5 6.5] [45. 45. 45.]
    >>> m2.dtype
    dtype('float64')
    """
    cx = _prepare(x, axis, ())
    be = cx.backend
    count, mean, m2 = (be.xp.empty((cx.channels,), dtype=np.float64) for _ in range(3))
    _core.batch_stats(cx.view, be.address(cx.data), be.address(count), be.address(mean),
                      be.address(m2), *_reduce_workspace(cx))
    return count, mean, m2


@_on_device
def merge_stats(count: Array, mean: Array, m2: Array) -> Tuple[Array, Array, Array]:
    """Merge K partial statistics into the statistics of their union.

    Exactly as if computed over the concatenated data: counts may differ per partial, and a partial
    with count 0 contributes nothing. This is what combines the statistics of the ranks or devices
    of synchronised batch normalisation.

    Parameters
    ----------
    count, mean, m2 : array of shape (K, C), float64
        The partials, one row each (e.g. ``np.stack`` of the results of K `batch_stats` calls): counts
        (>= 0), means and M2 (``sum((x - mean)^2)``), all of one shape, K >= 1.
    stream : CuPy stream, torch.cuda.Stream or int, optional
        Keyword-only, for CUDA arrays: the stream the work is queued on; None: CuPy's current
        stream. Ignored for host arrays.

    Returns
    -------
    count, mean, m2 : array of shape (C,), float64
        The statistics of the union. A channel whose total count is 0 gets count 0, mean 0 and M2 0.

    Raises
    ------
    TypeError
        An array not of dtype float64, or not an array, or arrays on different devices (and the CUDA
        cases of `batchnorm`).
    ValueError
        An array that is not 2-D or not of count's shape; no partial (K = 0); a negative count.
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    batch_stats : The statistics of one part.

    Examples
    --------
    >>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> parts = [pybn.batch_stats(x[:1]), pybn.batch_stats(x[1:]), pybn.batch_stats(x[:0])]  # the last is empty
    >>> count, mean, m2 = pybn.merge_stats(*(np.stack(column) for column in zip(*parts)))
    >>> print(count, mean, m2)
    [4. 4. 4.] [4.5 5.5 6.5] [45. 45. 45.]
    """
    for name, a in (("count", count), ("mean", mean), ("m2", m2)):
        if a is None:
            raise TypeError(f"{name} is required: a (K, C) float64 array")
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
    """Normalise x with given float64 statistics and update the running statistics (training mode).

    ``y = gamma * (x - mean) / sqrt(M2 / count + eps) + beta``, with statistics computed elsewhere,
    e.g. merged across devices with `merge_stats`: `batchnorm` in training, in two steps.

    Parameters
    ----------
    x : array (float16, bfloat16, float32 or float64)
        The data, at least 2-D, channels on `axis`.
    count, mean, m2 : array of shape (C,), float64
        The statistics to normalise with (from `batch_stats` / `merge_stats`): count >= 1 per channel,
        >= 2 when `running_var` is updated with ``running_var_correction=1``.
    gamma, beta : array of shape (C,), optional
        Scale and shift in the per-channel dtype (float32 for 16- and 32-bit x, float64 for float64
        x). None: 1 and 0.
    running_mean, running_var : array of shape (C,), optional
        Running statistics in the per-channel dtype, each updated in place when given (writable):
        ``running = (1 - momentum) * running + momentum * batch``, with mean and
        ``M2 / (count - running_var_correction)``.
    momentum : float, default 0.1
        Weight of the batch in the running-statistics update, in [0, 1].
    eps : float, default 1e-5
        Added to the variance; finite and >= 0.
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    out : array, optional
        Receives y: x's shape and dtype, writable; it may be x itself.
    running_var_correction : {1, 0}, default 1
        The variance that updates running_var: 1 the unbiased one, 0 the biased one.
    stream : CuPy stream, torch.cuda.Stream or int, optional
        For CUDA arrays: the stream the work is queued on (None: CuPy's current stream); ignored for
        host arrays.

    Returns
    -------
    y : array
        The normalised x: x's shape and dtype (`out` when given).
    mean : array of shape (C,)
        The given mean, rounded to the per-channel dtype.
    invstd : array of shape (C,)
        ``1 / sqrt(M2 / count + eps)`` in the per-channel dtype: with mean, what
        `batchnorm_backward` / `backward_elementwise` take.

    Raises
    ------
    TypeError
        count, mean or m2 not of dtype float64; the argument types, dtypes and devices of `batchnorm`.
    ValueError
        count, mean or m2 missing or not of shape (C,); a count below the minimum above; the shapes and
        values of `batchnorm`.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    batch_stats, merge_stats : Where the statistics come from.

    Notes
    -----
    Every argument, the statistics included, is checked before anything is written. On the CPU the
    library checks the counts; for CUDA arrays the Python layer checks them (one small copy to the
    host), so both raise the same ValueError.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    >>> count, mean, m2 = pybn.batch_stats(x)
    >>> y, m, invstd = pybn.normalize(x, count, mean, m2)
    >>> np.allclose(y, pybn.batchnorm(x), atol=1e-5), m.dtype, invstd.shape
    (True, dtype('float32'), (3,))
    """
    backend_of((("x", x), ("count", count), ("mean", mean), ("m2", m2)))  # devices first
    _, run = _normalize_call(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out,
                             running_var_correction)
    return run(count, mean, m2)  # the statistics are checked before anything is written


@_on_device
def backward_reduce(dy: Array, x: Array, mean: Array, *, axis: int = 1) -> Tuple[Array, Array, Array]:
    """Per-channel float64 sums of the backward, in one sweep over (dy, x).

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to y: x's shape and dtype.
    x : array (float16, bfloat16, float32 or float64)
        The forward's input, at least 2-D, channels on `axis`.
    mean : array of shape (C,)
        The saved mean (or `running_mean` when the statistics are frozen), in the per-channel dtype
        (float32 for 16- and 32-bit x, float64 for float64 x); required.
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    stream : CuPy stream, torch.cuda.Stream or int, optional
        Keyword-only, for CUDA arrays: the stream the work is queued on; None: CuPy's current
        stream. Ignored for host arrays.

    Returns
    -------
    sum_dy : array of shape (C,), float64
        ``sum(dy)`` per channel.
    sum_dy_xmu : array of shape (C,), float64
        ``sum(dy * (x - mean))`` per channel.
    sum_xmu : array of shape (C,), float64
        ``sum(x - mean)`` per channel: in training, the part of the batch mean that rounding mean to
        the per-channel dtype lost, which keeps the gradients exact when the mean is far from zero.

    Raises
    ------
    TypeError
        dy not of x's dtype, x of an unsupported dtype, mean not of the per-channel dtype; not an
        array, or arrays on different devices (and the CUDA cases of `batchnorm`).
    ValueError
        dy not of x's shape, mean missing or not of shape (C,), x with fewer than 2 dimensions,
        `axis` out of range.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    backward_elementwise : Turns the (possibly all-reduced) sums into dx, dgamma and dbeta.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    >>> mean = x.mean(axis=0)
    >>> sum_dy, sum_dy_xmu, sum_xmu = pybn.backward_reduce(dy, x, mean)
    >>> np.allclose(sum_dy, dy.sum(axis=0)), np.allclose(sum_dy_xmu, (dy * (x - mean)).sum(axis=0))
    (True, True)
    >>> np.allclose(sum_xmu, 0)
    True
    """
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
    """Compute the gradients (dx, dgamma, dbeta) from per-channel sums over a batch of `count` values per channel.

    The second step of `batchnorm_backward` after `backward_reduce`: the sums may have been
    all-reduced across devices, so that each part of a batch gets the gradient of the whole.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to y: x's shape and dtype.
    x : array (float16, bfloat16, float32 or float64)
        The forward's input, at least 2-D, channels on `axis`.
    mean, invstd : array of shape (C,)
        The statistics of the forward (`batchnorm_forward` or `normalize`), in the per-channel dtype
        (float32 for 16- and 32-bit x, float64 for float64 x); required.
    gamma : array of shape (C,) or None
        The forward's scale in the per-channel dtype; None: 1.
    count : array of shape (C,), float64
        Total number of values per channel of the batch the sums cover (>= 1 in training); required.
    sum_dy, sum_dy_xmu : array of shape (C,), float64
        From `backward_reduce`, summed over every part of the batch.
    sum_xmu : array of shape (C,), float64, optional
        From `backward_reduce` (summed likewise): corrects for the rounding of mean. None: no
        correction.
    training : bool, default True
        True: mean and invstd are the batch statistics of the whole batch; False: constants.
    axis : int, default 1
        The channel axis, in ``[-x.ndim, x.ndim)``.
    out : array, optional
        Receives dx: x's shape and dtype, writable; may be dy or x itself. None: a new array.
    stream : CuPy stream, torch.cuda.Stream or int, optional
        Keyword-only, for CUDA arrays: the stream the work is queued on; None: CuPy's current
        stream. Ignored for host arrays.

    Returns
    -------
    dx : array
        The gradient with respect to x: x's shape and dtype (`out` when given).
    dgamma, dbeta : array of shape (C,)
        In the per-channel dtype, from the sums (of the whole batch when the sums are).

    Raises
    ------
    TypeError
        count or a sum not of dtype float64; the argument types, dtypes and devices of
        `batchnorm_backward`.
    ValueError
        count, sum_dy or sum_dy_xmu missing; a sum or count not of shape (C,); a count below 1 in
        training; the shapes and values of `batchnorm_backward`.
    MemoryError
        Out of memory for an output or the library's temporaries (nothing was written).
    RuntimeError
        ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

    See Also
    --------
    batchnorm_backward : The same in one call, for one batch.

    Notes
    -----
    With ``d = sum_xmu / count`` (0 without sum_xmu) and ``S = sum_dy_xmu - d * sum_dy``, training
    gives ``dx = gamma * invstd * (dy - sum_dy / count - (x - mean - d) * invstd^2 * S / count)``,
    ``dgamma = invstd * S`` and ``dbeta = sum_dy``; ``training=False`` gives
    ``dx = gamma * invstd * dy``, ``dgamma = invstd * sum_dy_xmu`` and ``dbeta = sum_dy``. Every
    argument, the sums included, is checked before anything is written.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    >>> y, mean, invstd = pybn.batchnorm_forward(x)
    >>> count = pybn.batch_stats(x)[0]
    >>> sums = pybn.backward_reduce(dy, x, mean)
    >>> grads = pybn.backward_elementwise(dy, x, mean, invstd, None, count, *sums)
    >>> all(np.allclose(a, b) for a, b in zip(grads, pybn.batchnorm_backward(dy, x, mean, invstd)))
    True
    """
    sums = (("count", count), ("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu), ("sum_xmu", sum_xmu))
    backend_of((("x", x),) + sums)  # devices first
    _, run = _backward_elementwise_call(dy, x, mean, invstd, gamma, training, axis, out)
    return run(count, sum_dy, sum_dy_xmu, sum_xmu)  # checks the sums before anything is written


# ----------------------------------------- folding -----------------------------------------

def fold(weight: Array, bias: Optional[Array], gamma: Optional[Array], beta: Optional[Array],
         running_mean: Array, running_var: Array, *, eps: float = 1e-5,
         axis: int = 0) -> Tuple[Array, Array]:
    """Fold inference-mode batch normalisation into the preceding layer's weight and bias.

    Returns ``(weight2, bias2)`` such that ``layer(x, weight2) + bias2`` equals
    ``batchnorm(layer(x, weight) + bias, gamma, beta, running_mean, running_var, training=False)``
    for a linear layer or convolution ``layer``.

    Parameters
    ----------
    weight : array (any floating dtype: float16, bfloat16, float32, float64)
        The preceding layer's weight, at least 1-D, with its output channels (C of them) on `axis`.
    bias : array of shape (C,) or None
        Its bias (any floating dtype); None: 0.
    gamma, beta : array of shape (C,) or None
        The BN scale and shift (any floating dtype); None: 1 and 0.
    running_mean, running_var : array of shape (C,)
        The running statistics (any floating dtype); required.
    eps : float, default 1e-5
        Added to the variance; finite and >= 0 (the BN layer's eps).
    axis : int, default 0
        The output-channel axis of weight, in ``[-weight.ndim, weight.ndim)``: 0 for conv OIHW and
        linear (out, in), 1 for transposed conv IOHW, -1 for HWIO / (in, out).

    Returns
    -------
    weight2 : array
        The folded weight, of weight's shape and dtype: ``weight * s`` along `axis`, with
        ``s = gamma / sqrt(running_var + eps)``.
    bias2 : array of shape (C,)
        The folded bias, in weight's dtype: ``(bias - running_mean) * s + beta``.

    Raises
    ------
    TypeError
        weight or a per-channel array not of a floating-point dtype; `axis` not an int; `eps` not a
        real number; something that is not an array, or arrays on different devices.
    ValueError
        weight missing or 0-D; `axis` out of range; a per-channel array not of shape (C,);
        running_mean or running_var missing; `eps` negative or not finite; ``running_var + eps`` not
        > 0 in every channel.

    See Also
    --------
    BatchNorm.fold_into : The same for a layer's own parameters and statistics.

    Notes
    -----
    Computed in float64 and returned in weight's dtype, with the array module of the inputs: NumPy,
    or CuPy for CUDA arrays (all on one device). No library call is made, so fold takes no `stream`
    keyword (CuPy's current stream is used).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> w, b = rng.standard_normal((4, 3)), rng.standard_normal(4)  # a linear layer: (out, in)
    >>> gamma, beta = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    >>> rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    >>> w2, b2 = pybn.fold(w, b, gamma, beta, rm, rv)
    >>> x = rng.standard_normal((5, 3))
    >>> np.allclose(x @ w2.T + b2, pybn.batchnorm(x @ w.T + b, gamma, beta, rm, rv, training=False))
    True
    >>> w2.shape, b2.shape
    ((4, 3), (4,))
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
