"""pybn.BatchNorm: a batch-normalisation layer with its own parameters and running statistics."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from ._api import (_check_virtual_batch, batchnorm_backward, batchnorm_forward, check_activation, check_correction,
                   check_renorm, fold)
from ._arrays import _cupy, check_eps, check_momentum, dtype_name
from ._core import has_cuda

Array = Any


class BatchNorm:
    """Batch normalisation layer with learnable gamma / beta and running statistics.

    Normalises over every axis but `axis`, like ``torch.nn.BatchNorm{1,2,3}d``: with the batch
    statistics in training (the initial mode, `train`), updating the running statistics, and with the
    running statistics in inference (`eval`). `forward` (or calling the layer) computes y, `backward`
    dx and the parameter gradients `grad_gamma` / `grad_beta`.

    Parameters
    ----------
    num_features : int
        C, the number of channels (>= 1).
    eps : float, default 1e-5
        Added to the variance; finite and >= 0.
    momentum : float or None, default 0.1
        Weight of the batch in the running-statistics update, in [0, 1] (PyTorch's convention; the
        momentum ``m`` of Keras/TF, Flax, PaddlePaddle and ONNX is ``1 - m`` here). None: a
        cumulative moving average, the weight of a batch being ``1 / num_batches_tracked`` (counting
        this batch), so the running statistics are the average over all batches.
    affine : bool, default True
        True: learnable gamma (ones) and beta (zeros); False: none (1 and 0).
    track_running_stats : bool, default True
        True: keep running_mean (zeros), running_var (ones) and num_batches_tracked. False: normalise
        with the batch statistics in training and in eval.
    axis : int, default 1
        The channel axis of the inputs (checked against each x by `forward`).
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        The dtype of the parameters and running statistics: float32 for float16, bfloat16 and
        float32 x, float64 for float64 x.
    device : {"cpu", "cuda"}, default "cpu"
        "cuda" keeps the parameters and statistics as CuPy arrays on the current device (needs a
        pybn built with CUDA, and CuPy); forward then takes CUDA arrays.
    running_var_correction : {1, 0}, default 1
        1 updates running_var with the unbiased batch variance (PyTorch), 0 with the biased one
        (Keras/TF, Flax, PaddlePaddle, ONNX).
    activation : {None, "relu"}, default None
        "relu" fuses a ReLU into the layer (forward and backward, no extra pass).
    renorm : (float, float), optional
        ``(r_max, d_max)``: batch renormalisation in training (needs track_running_stats; see
        `batchnorm`); r and d are kept for backward, as constants.
    virtual_batch : int, optional
        The number k of samples per ghost batch in training: each group of k consecutive samples is
        normalised with its own statistics (see `batchnorm`; Keras's ``virtual_batch_size``); not combined with renorm.

    Attributes
    ----------
    gamma, beta : array of shape (C,) or None
        The learnable scale and shift (None when ``affine=False``), of `dtype`.
    running_mean, running_var : array of shape (C,) or None
        The running statistics (None when ``track_running_stats=False``), updated in place.
    num_batches_tracked : int
        The number of training batches that updated the running statistics.
    grad_gamma, grad_beta : array of shape (C,) or None
        The parameter gradients of the last `backward` (None before it, and when ``affine=False``).
    training : bool
        True in training mode (see `train` / `eval`).
    num_features, eps, momentum, affine, track_running_stats, axis, dtype, device
        The checked constructor arguments (dtype as a ``numpy.dtype``).
    running_var_correction, activation, renorm, virtual_batch
        Likewise (renorm as a pair of floats).

    Raises
    ------
    TypeError
        num_features or axis not an int; dtype not float32 or float64; eps or momentum not a real
        number; running_var_correction or virtual_batch not an int; activation not a str; renorm not
        a pair of real numbers; ``device="cuda"`` without CuPy.
    ValueError
        num_features < 1; eps, momentum, running_var_correction, activation, renorm or virtual_batch
        out of range; renorm without track_running_stats, or with virtual_batch; device neither
        "cpu" nor "cuda"; ``device="cuda"`` with a pybn built without CUDA.

    See Also
    --------
    batchnorm : The functional form, whose options the layer takes.
    pybn.distributed.SyncBatchNorm : The layer with statistics across processes.

    Notes
    -----
    The layer pickles (`forward`'s saved state for `backward` is not part of it); `state_dict` /
    `load_state_dict` save and restore it, also from a PyTorch ``BatchNorm*d`` state dict. The work
    runs on CuPy's current stream for a CUDA layer (the layer takes no ``stream`` argument).

    Examples
    --------
    >>> bn = pybn.BatchNorm(3)
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> y = bn(x)  # training: batch statistics; running statistics updated
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.grad_gamma.shape, bn.num_batches_tracked
    ((3,), 1)
    >>> y_eval = bn.eval()(x)  # inference: running statistics
    >>> bn
    BatchNorm(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, axis=1, dtype=float32, ...)

    A Keras-style layer (channels last, Keras momentum 0.99, biased running variance):

    >>> keras_bn = pybn.BatchNorm(3, momentum=0.01, eps=1e-3, axis=-1, running_var_correction=0)
    >>> keras_bn(x.transpose(0, 2, 3, 1)).shape
    (8, 4, 4, 3)
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, axis: int = 1,
                 dtype: Any = np.float32, device: str = "cpu", running_var_correction: int = 1,
                 activation: Optional[str] = None, renorm: Optional[tuple] = None,
                 virtual_batch: Optional[int] = None):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.eps = check_eps(eps)
        self.running_var_correction = check_correction(running_var_correction)
        check_activation(activation)
        self.activation = activation
        check_renorm(renorm)
        if renorm is not None and not track_running_stats:
            raise ValueError("renorm needs running statistics (track_running_stats=True)")
        self.renorm = None if renorm is None else (float(renorm[0]), float(renorm[1]))
        self.virtual_batch = _check_virtual_batch(virtual_batch)
        if self.virtual_batch is not None and renorm is not None:
            raise ValueError("renorm and virtual_batch (ghost batches) cannot be combined")
        self.momentum = None if momentum is None else check_momentum(momentum)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype (of parameters and running statistics) must be float32 or float64, got {dtype_name(dtype)}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not has_cuda():
            raise ValueError("device='cuda' needs a pybn built with CUDA (pybn.has_cuda() is False)")
        self.num_features = int(num_features)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dtype
        self.device = device
        xp = self._xp
        self.gamma: Optional[Array] = xp.ones(num_features, dtype) if affine else None
        self.beta: Optional[Array] = xp.zeros(num_features, dtype) if affine else None
        self.running_mean: Optional[Array] = xp.zeros(num_features, dtype) if track_running_stats else None
        self.running_var: Optional[Array] = xp.ones(num_features, dtype) if track_running_stats else None
        self.num_batches_tracked = 0
        self.grad_gamma: Optional[Array] = None
        self.grad_beta: Optional[Array] = None
        self.training = True
        self._saved: Optional[tuple] = None

    @property
    def _xp(self) -> Any:
        """The array module of the parameters (a property, not an attribute: the layer pickles)."""
        return _cupy() if self.device == "cuda" else np

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_saved"] = None  # what the last forward kept for backward is not part of the layer
        return state

    def train(self, mode: bool = True) -> "BatchNorm":
        """Set training mode (mode=True, batch statistics) or inference mode (False); returns the layer.

        Parameters
        ----------
        mode : bool, default True
            True for training, False for inference (the same as `eval`); converted with ``bool``.

        Returns
        -------
        BatchNorm
            The layer itself, so that calls chain: ``bn.train()(x)``.

        See Also
        --------
        eval : ``train(False)``.

        Examples
        --------
        >>> bn = pybn.BatchNorm(3)
        >>> bn.train(False).training, bn.train().training
        (False, True)
        """
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Set inference mode (the running statistics normalise); returns the layer.

        Returns
        -------
        BatchNorm
            The layer itself: ``bn.eval()(x)``.

        See Also
        --------
        train : ``eval()`` is ``train(False)``.

        Examples
        --------
        >>> bn = pybn.BatchNorm(3).eval()
        >>> bn.training
        False
        >>> y = bn(np.ones((1, 3), np.float32))  # running statistics: one sample is fine
        """
        return self.train(False)

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def __call__(self, x: Array) -> Array:
        """``bn(x)`` is ``bn.forward(x)``: normalise a batch (see `forward`).

        Parameters
        ----------
        x : array (float16, bfloat16, float32 or float64)
            As in `forward`.

        Returns
        -------
        y : array
            The normalised x, of its shape and dtype.

        Raises
        ------
        TypeError, ValueError, MemoryError, RuntimeError
            As `forward`.

        See Also
        --------
        forward : What it calls.

        Examples
        --------
        >>> bn = pybn.BatchNorm(4)
        >>> bn(np.ones((2, 4, 3), np.float32)).shape
        (2, 4, 3)
        """
        return self.forward(x)

    def _check_input(self, x: Array) -> None:
        """Errors about x in the layer's own terms (not about the gamma / beta it passes on)."""
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
        if shape is None or dtype is None:
            return  # the functional call reports what x is
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(f"{self!r} needs x with at least 2 dimensions (batch, channels, ...), got shape "
                             f"{tuple(shape)}")
        if not -ndim <= self.axis < ndim:
            return
        if shape[self.axis] != self.num_features:
            raise ValueError(f"x has {shape[self.axis]} channels on axis {self.axis} (shape {tuple(shape)}); this "
                             f"BatchNorm expects {self.num_features} channels (num_features={self.num_features})")
        try:
            wide = np.dtype(dtype) == np.float64
        except TypeError:
            return
        if wide != (self.dtype == np.float64):
            raise TypeError(f"x has dtype {dtype_name(dtype)} but this BatchNorm holds {self.dtype.name} parameters: "
                            f"create it with dtype=np.float64 for float64 x, float32 (the default) for float16, "
                            f"bfloat16 and float32 x")

    def forward(self, x: Array) -> Array:
        """Normalise a batch; in training, also update the running statistics.

        Parameters
        ----------
        x : array (float16, bfloat16, float32 or float64)
            At least 2-D, with num_features channels on the layer's axis: float64 x for a layer of dtype
            float64, float16, bfloat16 or float32 x for float32 (the default). Host arrays, or CUDA arrays
            for ``device="cuda"``.

        Returns
        -------
        y : array
            The normalised x, of its shape and dtype.

        Raises
        ------
        TypeError
            x of a dtype that does not match the layer's dtype (or unsupported), or not an array, or on
            another device than the parameters.
        ValueError
            x with fewer than 2 dimensions, or not num_features channels on the layer's axis, or the
            axis out of range for x; too few values per channel in training (fewer than 2, per ghost
            batch, when running_var is updated with ``running_var_correction=1``, else fewer than 1);
            virtual_batch not dividing the batch size.
        MemoryError
            Out of memory for an output or the library's temporaries (nothing was written).
        RuntimeError
            ``pybn._core.PybnError``: a CUDA, not-compiled or internal library error.

        See Also
        --------
        backward : The gradients of this forward.

        Notes
        -----
        In training with ``track_running_stats=True`` the batch statistics normalise x and update the
        running statistics (with momentum, or the cumulative average for ``momentum=None``), and
        num_batches_tracked grows by one; renorm and virtual_batch apply in training only. In eval the
        running statistics normalise x; with ``track_running_stats=False`` the batch statistics always
        do and nothing is updated. A failed call changes nothing.

        The layer keeps x, mean and invstd (and y with an activation, r and d with renorm) for
        `backward`: do not modify them in place before calling it.

        Examples
        --------
        >>> bn = pybn.BatchNorm(2, momentum=None)  # cumulative moving average
        >>> x1, x2 = np.zeros((4, 2), np.float32), np.full((4, 2), 2.0, np.float32)
        >>> _ = bn.forward(x1); _ = bn.forward(x2)
        >>> print(bn.running_mean, bn.num_batches_tracked)
        [1. 1.] 2
        """
        self._check_input(x)
        batch = self._uses_batch_stats()
        momentum = self.momentum
        update = self.training and self.track_running_stats
        if update and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        out = self._forward_call(
            x, self.running_mean if (update or not batch) else None,
            self.running_var if (update or not batch) else None, batch,
            0.0 if momentum is None else momentum)
        y, mean, invstd = out[:3]
        if update:
            self.num_batches_tracked += 1
        self._saved = (x, mean, invstd, batch, y if self.activation else None, out[3:] or None)
        return y

    def backward(self, dy: Array) -> Array:
        """Compute dx for the last forward; set grad_gamma and grad_beta (None when affine=False).

        Parameters
        ----------
        dy : array
            Gradient of the loss with respect to the last forward's y: its shape and dtype.

        Returns
        -------
        dx : array
            Gradient with respect to the last forward's x: its shape and dtype.

        Raises
        ------
        RuntimeError
            No forward has been run yet; or ``pybn._core.PybnError`` (a CUDA, not-compiled or internal
            library error).
        TypeError
            dy not of x's dtype, not an array, or on another device.
        ValueError
            dy not of x's shape.
        MemoryError
            Out of memory for an output or the library's temporaries (nothing was written).

        See Also
        --------
        batchnorm_backward : The functional form.

        Notes
        -----
        The backward of the statistics the forward used: through the batch statistics when it used them
        (training, or ``track_running_stats=False``), with the running statistics as constants otherwise.
        grad_gamma and grad_beta are replaced, not accumulated (unlike PyTorch's ``.grad``); backward may
        be called again for another dy of the same forward.

        Examples
        --------
        >>> bn = pybn.BatchNorm(3)
        >>> x = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)
        >>> y = bn(x)
        >>> dx = bn.backward(np.ones_like(y))  # the loss sum(y) does not depend on x
        >>> np.allclose(dx, 0, atol=1e-5), bn.grad_beta
        (True, array([16., 16., 16.], dtype=float32))
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() call first")
        x, mean, invstd, batch, y, rd = self._saved
        dx, dgamma, dbeta = self._backward_call(dy, x, mean, invstd, batch, y, rd)
        if self.affine:
            self.grad_gamma, self.grad_beta = dgamma, dbeta
        return dx

    # the functional calls behind forward / backward (SyncBatchNorm exchanges statistics here)
    def _forward_call(self, x, running_mean, running_var, training, momentum):
        return batchnorm_forward(x, self.gamma, self.beta, running_mean, running_var,
                                 training=training, momentum=momentum, eps=self.eps,
                                 axis=self.axis, running_var_correction=self.running_var_correction,
                                 activation=self.activation,
                                 renorm=self.renorm if training and running_mean is not None else None,
                                 virtual_batch=self.virtual_batch if self.training else None)

    def _backward_call(self, dy, x, mean, invstd, training, y=None, rd=None):
        return batchnorm_backward(dy, x, mean, invstd, self.gamma, training=training,
                                  axis=self.axis, activation=self.activation, y=y, renorm=rd)

    def fold_into(self, weight: Array, bias: Optional[Array] = None, axis: int = 0) -> tuple:
        """Fold this layer's inference-mode BN into the preceding layer's weight and bias.

        Parameters
        ----------
        weight : array (floating dtype)
            The preceding layer's weight, with num_features output channels on `axis`.
        bias : array of shape (num_features,), optional
            Its bias; None: 0.
        axis : int, default 0
            The output-channel axis of weight: 0 for conv OIHW and linear (out, in), 1 for transposed conv
            IOHW, -1 for HWIO / (in, out).

        Returns
        -------
        weight2, bias2 : array
            The folded weight and bias, as `fold` returns them: in weight's dtype, with this layer's
            gamma, beta, running statistics and eps (its mode does not matter).

        Raises
        ------
        ValueError
            The layer has no running statistics (``track_running_stats=False``); and the ValueErrors of
            `fold`.
        TypeError
            As `fold`.

        See Also
        --------
        fold : The functional form.

        Examples
        --------
        >>> bn = pybn.BatchNorm(4, dtype=np.float64)
        >>> _ = bn(np.random.default_rng(0).standard_normal((8, 4)))  # a training step moves the running statistics
        >>> w, b = np.ones((4, 3)), np.zeros(4)  # a linear layer (out, in) before the BN
        >>> w2, b2 = bn.fold_into(w, b)
        >>> x = np.ones((2, 3))
        >>> np.allclose(x @ w2.T + b2, bn.eval()(x @ w.T + b))
        True
        """
        if not self.track_running_stats:
            raise ValueError("fold_into needs running statistics (track_running_stats=True)")
        return fold(weight, bias, self.gamma, self.beta, self.running_mean, self.running_var,
                    eps=self.eps, axis=axis)

    def state_dict(self) -> Dict[str, Any]:
        """The layer's parameters and running statistics, as copies.

        Returns
        -------
        dict
            "gamma" and "beta" (when affine), "running_mean", "running_var" (arrays of dtype, copies) and
            "num_batches_tracked" (an int) when track_running_stats; `load_state_dict` takes it back.

        See Also
        --------
        load_state_dict : The inverse.

        Examples
        --------
        >>> sorted(pybn.BatchNorm(3).state_dict())
        ['beta', 'gamma', 'num_batches_tracked', 'running_mean', 'running_var']
        >>> pybn.BatchNorm(3, affine=False, track_running_stats=False).state_dict()
        {}
        """
        d: Dict[str, Any] = {}
        if self.affine:
            d["gamma"], d["beta"] = self.gamma.copy(), self.beta.copy()
        if self.track_running_stats:
            d["running_mean"], d["running_var"] = self.running_mean.copy(), self.running_var.copy()
            d["num_batches_tracked"] = self.num_batches_tracked
        return d

    # PyTorch's names for the same entries (nn.BatchNorm*d.state_dict())
    _TORCH_NAMES = {"weight": "gamma", "bias": "beta"}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        """Load what `state_dict` returned, or a PyTorch BatchNorm state dict.

        Also after a round trip through ``numpy.savez`` / ``numpy.load`` (0-d arrays). Every entry is
        checked before anything changes; the values are copied into the layer's existing arrays.

        Parameters
        ----------
        d : mapping
            The entries of `state_dict`: "gamma" / "beta" (or PyTorch's "weight" / "bias") when affine,
            "running_mean", "running_var" and "num_batches_tracked" when track_running_stats; exactly
            these keys. Arrays of shape (num_features,) (any array, PyTorch tensors converted with
            ``.detach().cpu().numpy()``), cast to the layer's dtype; num_batches_tracked an int >= 0 or a
            0-d array / tensor holding one.

        Raises
        ------
        ValueError
            Missing or unexpected keys; an array not of shape (num_features,); num_batches_tracked not an
            int >= 0.
        TypeError
            An array whose dtype cannot be cast to the layer's dtype (same kind), e.g. complex.

        See Also
        --------
        state_dict : What this loads.

        Examples
        --------
        >>> import io
        >>> bn = pybn.BatchNorm(3)
        >>> _ = bn(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32))
        >>> f = io.BytesIO()
        >>> np.savez(f, **bn.state_dict())
        >>> _ = f.seek(0)
        >>> bn2 = pybn.BatchNorm(3)
        >>> bn2.load_state_dict(np.load(f))
        >>> np.array_equal(bn2.running_mean, bn.running_mean), bn2.num_batches_tracked
        (True, 1)
        >>> bn2.load_state_dict({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3),
        ...                      "running_var": np.ones(3), "num_batches_tracked": 0})  # PyTorch's names
        """
        d = {self._TORCH_NAMES.get(k, k): v for k, v in dict(d).items()}
        expected = self.state_dict().keys()
        missing = [k for k in expected if k not in d]
        unexpected = [k for k in d if k not in expected]
        if missing or unexpected:
            raise ValueError(f"state dict keys do not match: missing {missing}, unexpected {unexpected}")
        arrays = {}
        for k in expected:
            if k == "num_batches_tracked":
                v = d[k]
                if hasattr(v, "shape") and tuple(v.shape) == () and hasattr(v, "item"):
                    v = v.item()  # a 0-d array (numpy.savez) or a PyTorch scalar tensor
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                    raise ValueError(f"num_batches_tracked must be an int >= 0, got {v!r}")
                continue
            v = d[k]
            if hasattr(v, "detach") and hasattr(v, "cpu"):  # a PyTorch tensor
                v = v.detach().cpu().numpy()
            a = self._xp.asarray(v)
            if a.shape != (self.num_features,):
                raise ValueError(f"{k} must have shape ({self.num_features},), got {a.shape}")
            if not np.can_cast(a.dtype, self.dtype, casting="same_kind"):
                raise TypeError(f"{k} must be a float array, got dtype {a.dtype}")
            arrays[k] = a
        for k, a in arrays.items():
            getattr(self, k)[...] = a
        if self.track_running_stats:
            n = d["num_batches_tracked"]
            self.num_batches_tracked = int(n.item() if hasattr(n, "item") else n)

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name}, "
                f"running_var_correction={self.running_var_correction}, activation={self.activation!r}"
                + (f", virtual_batch={self.virtual_batch}" if self.virtual_batch is not None else "") + ")")
