"""pybn: batch normalisation kernels (CPU and CUDA) behind a C ABI, for NumPy and CUDA arrays.

    y = pybn.batchnorm(x, gamma, beta)                       # functional, NCHW (axis=1)
    y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta) # keeps what backward needs
    dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, gamma)
    bn = pybn.BatchNorm(64); y = bn(x); dx = bn.backward(dy) # layer with running statistics
"""
from . import _core
from ._api import (
    backward_elementwise,
    backward_reduce,
    batch_stats,
    batchnorm,
    batchnorm_backward,
    batchnorm_forward,
    merge_stats,
    normalize,
)
from .layer import BatchNorm

__version__: str = _core.version()

if _core.abi_version() != _core.ABI_VERSION:  # the extension was built against another libpybn
    raise ImportError(
        f"pybn: libpybn ABI {_core.abi_version()} does not match the extension's {_core.ABI_VERSION}"
    )


def has_cuda() -> bool:
    """True if libpybn was built with the CUDA kernels."""
    return _core.has_cuda()


def cpu_isa() -> str:
    """Name of the CPU kernel path in use."""
    return _core.cpu_isa()


__all__ = [
    "BatchNorm",
    "__version__",
    "backward_elementwise",
    "backward_reduce",
    "batch_stats",
    "batchnorm",
    "batchnorm_backward",
    "batchnorm_forward",
    "cpu_isa",
    "has_cuda",
    "merge_stats",
    "normalize",
]
