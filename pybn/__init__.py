"""pybn: batch normalisation kernels (CPU and CUDA) behind a C ABI, for NumPy and CUDA arrays.

    y = pybn.batchnorm(x, gamma, beta)                       # functional, NCHW (axis=1)
    y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta) # keeps what backward needs
    dx, dgamma, dbeta = pybn.batchnorm_backward(dy, x, mean, invstd, gamma)
    bn = pybn.BatchNorm(64); y = bn(x); dx = bn.backward(dy) # layer with running statistics
"""
try:
    from . import _core
except ImportError as _e:  # pragma: no cover - depends on where Python was started
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.exists(_os.path.join(_here, "_core.pyx")):
        raise ImportError(
            f"pybn is being imported from its source folder ({_here}), which holds no compiled "
            "extension: Python found it before the installed package because the current directory "
            "is the repository root. Install it (python -m pip install .) and run Python from another "
            "directory, e.g. `cd tests` or `cd /tmp`."
        ) from None
    raise
from ._api import (
    backward_elementwise,
    backward_reduce,
    batch_stats,
    batchnorm,
    batchnorm_backward,
    batchnorm_forward,
    fold,
    merge_stats,
    normalize,
)
from .layer import BatchNorm
from . import distributed

import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))


def get_include() -> str:
    """Folder holding pybn/pybn.h (the C ABI), for compilers: -I$(...)."""
    return _os.path.join(_HERE, "include")


def get_library_dir() -> str:
    """Folder holding libpybn, for linkers: -L$(...) -lpybn."""
    return _HERE


def get_cmake_dir() -> str:
    """Folder of the CMake package: find_package(pybn) with pybn_DIR set to it (or on
    CMAKE_PREFIX_PATH), then target_link_libraries(app pybn::pybn)."""
    return _os.path.join(_HERE, "lib", "cmake", "pybn")


def get_pkgconfig_dir() -> str:
    """Folder of pybn.pc: PKG_CONFIG_PATH=$(...) pkg-config --cflags --libs pybn."""
    return _os.path.join(_HERE, "lib", "pkgconfig")

__version__: str = _core.version()

if _core.abi_version() != _core.ABI_VERSION:  # the extension was built against another libpybn
    raise ImportError(
        f"pybn: libpybn ABI {_core.abi_version()} does not match the extension's {_core.ABI_VERSION}"
    )


def has_cuda() -> bool:
    """True if libpybn was built with the CUDA kernels."""
    return _core.has_cuda()


def cpu_isa() -> str:
    """Name of the CPU kernel path in use ("avx512", "avx2", "portable" or "neon")."""
    return _core.cpu_isa()


def cpu_isas() -> list:
    """The compiled CPU kernel paths this CPU supports, best first."""
    return [s for s in _core.cpu_isas().split(",") if s]


def set_cpu_isa(name: str = "") -> None:
    """Use the CPU path `name` (one of cpu_isas()); "" picks the best. The environment variable
    PYBN_CPU_ISA does the same at start-up."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    _core.set_cpu_isa(name)


def set_num_threads(n: int) -> None:
    """Threads of the CPU kernels: n >= 1, or 0 for the default (OMP_NUM_THREADS, else the number
    of cores). Results are bitwise identical for every thread count."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0 (0: the default), got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU kernels use now."""
    return _core.get_num_threads()


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
    "cpu_isas",
    "fold",
    "get_cmake_dir",
    "get_include",
    "get_library_dir",
    "get_pkgconfig_dir",
    "get_num_threads",
    "has_cuda",
    "merge_stats",
    "normalize",
    "set_cpu_isa",
    "set_num_threads",
]
