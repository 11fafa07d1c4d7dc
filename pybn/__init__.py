"""pybn: batch normalisation kernels (CPU and CUDA) behind a C ABI, for NumPy and CUDA arrays.

The functional API normalises (`batchnorm`), keeps what the backward needs (`batchnorm_forward`)
and differentiates (`batchnorm_backward`); the composable primitives (`batch_stats`,
`merge_stats`, `normalize`, `backward_reduce`, `backward_elementwise`) are what synchronised BN
across devices builds on; `fold` folds inference-mode BN into the preceding layer; `BatchNorm`
is the layer with running statistics, and `pybn.distributed` synchronises it across processes.
The library helpers locate the C ABI (`get_include`, `get_library_dir`, `get_cmake_dir`,
`get_pkgconfig_dir`) and control the CPU kernels (`cpu_isa`, `set_cpu_isa`, `set_num_threads`).

Examples
--------
>>> x = np.random.default_rng(0).standard_normal((8, 4, 5, 5)).astype(np.float32)
>>> gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
>>> y = pybn.batchnorm(x, gamma, beta)  # functional, NCHW (axis=1)
>>> y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta)  # keeps what backward needs
>>> dx, dgamma, dbeta = pybn.batchnorm_backward(np.ones_like(y), x, mean, invstd, gamma)
>>> bn = pybn.BatchNorm(4); y = bn(x); dx = bn.backward(np.ones_like(y))  # layer with running statistics
>>> y.shape, dx.dtype
((8, 4, 5, 5), dtype('float32'))
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
            "directory, e.g. `cd tests` or `cd /tmp`. For C build flags use the `pybn-config` command "
            "(--includes, --libs, --cmake-dir, --pkgconfig-dir), which works from any folder."
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
from ._pool import memory_pool_info, set_memory_pool_limit
from . import distributed

import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))


def get_include() -> str:
    """Folder holding ``pybn/pybn.h`` (the C ABI), for compilers: ``-I$(...)``.

    Returns
    -------
    str
        The absolute path of the ``include`` folder of the installed package.

    See Also
    --------
    get_library_dir, get_cmake_dir, get_pkgconfig_dir : The other folders a build needs.

    Notes
    -----
    The ``pybn-config`` command (``python -m pybn``) prints the same: ``pybn-config --includes``.

    Examples
    --------
    >>> import os
    >>> os.path.isfile(os.path.join(pybn.get_include(), "pybn", "pybn.h"))
    True
    """
    return _os.path.join(_HERE, "include")


def get_library_dir() -> str:
    """Folder holding libpybn, for linkers: ``-L$(...) -lpybn``.

    Returns
    -------
    str
        The absolute path of the installed package folder, which holds the shared library.

    See Also
    --------
    get_include, get_cmake_dir, get_pkgconfig_dir : The other folders a build needs.

    Notes
    -----
    ``pybn-config --libs`` prints the linker flags, with an rpath.

    Examples
    --------
    >>> import os
    >>> os.path.isdir(pybn.get_library_dir())
    True
    """
    return _HERE


def get_cmake_dir() -> str:
    """Folder of the CMake package: ``find_package(pybn)`` with ``pybn_DIR`` set to it (or on
    ``CMAKE_PREFIX_PATH``), then ``target_link_libraries(app pybn::pybn)``.

    Returns
    -------
    str
        The absolute path of ``lib/cmake/pybn`` in the installed package.

    See Also
    --------
    get_include, get_library_dir, get_pkgconfig_dir : The other folders a build needs.

    Notes
    -----
    ``pybn-config --cmake-dir`` prints the same. See the C ABI guide, docs/c_guide.md.

    Examples
    --------
    >>> import os
    >>> os.path.isdir(pybn.get_cmake_dir()), pybn.get_cmake_dir().endswith(os.path.join("lib", "cmake", "pybn"))
    (True, True)
    """
    return _os.path.join(_HERE, "lib", "cmake", "pybn")


def get_pkgconfig_dir() -> str:
    """Folder of ``pybn.pc``: ``PKG_CONFIG_PATH=$(...) pkg-config --cflags --libs pybn``.

    Returns
    -------
    str
        The absolute path of ``lib/pkgconfig`` in the installed package.

    See Also
    --------
    get_include, get_library_dir, get_cmake_dir : The other folders a build needs.

    Notes
    -----
    ``pybn-config --pkgconfig-dir`` prints the same.

    Examples
    --------
    >>> import os
    >>> os.path.isfile(os.path.join(pybn.get_pkgconfig_dir(), "pybn.pc"))
    True
    """
    return _os.path.join(_HERE, "lib", "pkgconfig")

__version__: str = _core.version()
"""The version of libpybn, "MAJOR.MINOR.PATCH" (the package version too).

Examples
--------
>>> len(pybn.__version__.split(".")) == 3
True
"""

if _core.abi_version() != _core.ABI_VERSION:  # the extension was built against another libpybn
    raise ImportError(
        f"pybn: libpybn ABI {_core.abi_version()} does not match the extension's {_core.ABI_VERSION}"
    )


def has_cuda() -> bool:
    """True if libpybn was built with the CUDA kernels.

    Returns
    -------
    bool
        Whether CUDA arrays are supported (they also need CuPy and a GPU at run time).

    See Also
    --------
    cpu_isa : The CPU kernel path in use.

    Examples
    --------
    >>> pybn.has_cuda() in (True, False)
    True
    """
    return _core.has_cuda()


def cpu_isa() -> str:
    """Name of the CPU kernel path in use ("avx512", "avx2", "portable" or "neon").

    Returns
    -------
    str
        One of `cpu_isas`: the best this CPU supports unless `set_cpu_isa` or the environment
        variable ``PYBN_CPU_ISA`` chose another.

    See Also
    --------
    cpu_isas, set_cpu_isa : The paths to choose from, and how to choose one.

    Examples
    --------
    >>> pybn.cpu_isa() in pybn.cpu_isas()
    True
    """
    return _core.cpu_isa()


def cpu_isas() -> list:
    """The compiled CPU kernel paths this CPU supports, best first.

    Returns
    -------
    list of str
        E.g. ``['avx2', 'portable']``; the names `set_cpu_isa` takes.

    See Also
    --------
    cpu_isa, set_cpu_isa : The path in use, and how to choose another.

    Examples
    --------
    >>> isas = pybn.cpu_isas()
    >>> len(isas) >= 1 and all(isinstance(name, str) for name in isas)
    True
    """
    return [s for s in _core.cpu_isas().split(",") if s]


def set_cpu_isa(name: str = "") -> None:
    """Use the CPU kernel path `name` (one of `cpu_isas`); "" picks the best.

    Parameters
    ----------
    name : str, default ""
        A name from `cpu_isas`, or "" for the best one this CPU supports.

    Raises
    ------
    TypeError
        name is not a str.
    ValueError
        name is not a compiled path, or one this CPU does not support.

    See Also
    --------
    cpu_isa : The path in use.
    cpu_isas : The paths to choose from.

    Notes
    -----
    The environment variable ``PYBN_CPU_ISA`` does the same at start-up. Results are bitwise
    identical from run to run for a given path; different paths may round differently.

    Examples
    --------
    >>> pybn.set_cpu_isa(pybn.cpu_isas()[-1])  # the most basic path
    >>> pybn.cpu_isa() == pybn.cpu_isas()[-1]
    True
    >>> pybn.set_cpu_isa("")  # back to the best
    >>> pybn.cpu_isa() == pybn.cpu_isas()[0]
    True
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    _core.set_cpu_isa(name)


def set_num_threads(n: int) -> None:
    """Set the number of threads of the CPU kernels.

    Parameters
    ----------
    n : int
        The number of threads, >= 1, or 0 for the default (``OMP_NUM_THREADS``, else the number of cores).

    Raises
    ------
    TypeError
        n is not an int (a bool is not accepted).
    ValueError
        n is negative.

    See Also
    --------
    get_num_threads : The count in use.

    Notes
    -----
    Results are bitwise identical for every thread count. OpenMP is linked dynamically, so
    threadpoolctl sees (and can limit) these threads too.

    Examples
    --------
    >>> pybn.set_num_threads(1)
    >>> pybn.get_num_threads()
    1
    >>> pybn.set_num_threads(0)  # back to the default
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0 (0: the default), got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Return the number of threads the CPU kernels use now.

    Returns
    -------
    int
        The count `set_num_threads` set, or the default (``OMP_NUM_THREADS``, else the number of
        cores).

    See Also
    --------
    set_num_threads : Sets it.

    Examples
    --------
    >>> pybn.get_num_threads() >= 1
    True
    """
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
    "memory_pool_info",
    "merge_stats",
    "normalize",
    "set_cpu_isa",
    "set_memory_pool_limit",
    "set_num_threads",
]
