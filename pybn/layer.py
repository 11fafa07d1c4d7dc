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
    """Batch normalisation over every axis but `axis`, with learnable gamma/beta and running
    statistics, like torch.nn.BatchNorm{1,2,3}d.

    momentum=None means a cumulative moving average (weight 1/num_batches_tracked).
    device="cuda" keeps parameters and statistics as CuPy arrays on the current device.
    track_running_stats=False normalises with batch statistics in training and in eval.
    running_var_correction=1 updates running_var with the unbiased batch variance (PyTorch),
    0 with the biased one (Keras/TF, Flax, PaddlePaddle, ONNX; their momentum m is 1 - m here).
    activation="relu" fuses a ReLU into the layer (forward and backward, no extra pass).
    renorm=(r_max, d_max): batch renormalisation in training (needs track_running_stats; see
    pybn.batchnorm), r and d kept for backward as constants.
    virtual_batch=k: ghost batches in training, each group of k consecutive samples normalised
    with its own statistics (see pybn.batchnorm; Keras's virtual_batch_size).
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
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        return self.train(False)

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def __call__(self, x: Array) -> Array:
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
        """dx for the last forward; sets grad_gamma and grad_beta (None when affine=False)."""
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
        """(weight2, bias2): this layer's inference-mode BN folded into the preceding layer's
        weight and bias (see pybn.fold; axis is weight's output-channel axis)."""
        if not self.track_running_stats:
            raise ValueError("fold_into needs running statistics (track_running_stats=True)")
        return fold(weight, bias, self.gamma, self.beta, self.running_mean, self.running_var,
                    eps=self.eps, axis=axis)

    def state_dict(self) -> Dict[str, Any]:
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
        """Load what state_dict() returned, also after a round trip through numpy.savez / np.load
        (0-d arrays), or a PyTorch BatchNorm state dict (weight / bias; tensors converted with
        .cpu().numpy() or any array); every entry is checked before anything changes."""
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
