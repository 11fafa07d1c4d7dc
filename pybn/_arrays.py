"""Array handling for the Python API: which device an array lives on, dtypes, and the canonical
``(outer, channels, inner)`` view of libpybn.

A *backend* wraps one kind of array (NumPy on the host; CUDA arrays plug in here as a second
backend). The API code is written once against the small backend interface below.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._pool import POOL, THRESHOLD

_core._set_output_allocator(POOL.empty, THRESHOLD)  # the fast path's large outputs, from the pool too

# dtype name -> libpybn dtype code
_DTYPE_CODES = {
    "float32": _core.FLOAT32,
    "float64": _core.FLOAT64,
    "float16": _core.FLOAT16,
    "bfloat16": _core.BFLOAT16,
}
SUPPORTED_DTYPES = "float16, bfloat16, float32 or float64"


_KDLCPU = 1  # DLPack device type of host memory


def _is_host_dlpack(a: Any) -> bool:
    """Any CPU __dlpack__ producer (a PyTorch CPU tensor, a JAX CPU array): used zero-copy."""
    dev = getattr(a, "__dlpack_device__", None)
    if dev is None or not hasattr(a, "__dlpack__"):
        return False
    try:
        return int(dev()[0]) == _KDLCPU
    except Exception:
        return False


class HostBackend:
    """NumPy arrays in host memory (and CPU DLPack producers, seen as zero-copy NumPy views),
    computed by the CPU kernels."""

    name = "cpu"
    xp = np

    @staticmethod
    def owns(a: Any) -> bool:
        return isinstance(a, np.ndarray) or _is_host_dlpack(a)

    address = staticmethod(_core.host_address)

    @staticmethod
    def stream() -> Optional[int]:
        return None  # host calls take no stream

    @staticmethod
    def writable(a: Any) -> bool:
        return bool(HostBackend.adopt(a).flags.writeable)

    @staticmethod
    def may_share_memory(a: Any, b: Any) -> bool:
        if not isinstance(a, np.ndarray):
            a = HostBackend.adopt(a)
        if not isinstance(b, np.ndarray):
            b = HostBackend.adopt(b)
        return bool(np.may_share_memory(a, b))

    @staticmethod
    def adopt(a: Any) -> Any:
        """A NumPy view of a host array (zero-copy for DLPack producers)."""
        if a is None or isinstance(a, np.ndarray):
            return a
        try:
            return np.from_dlpack(a)
        except (TypeError, ValueError, RuntimeError, BufferError) as e:
            raise TypeError(f"cannot use {type(a).__name__} as a host array through DLPack: {e}") from None

    @staticmethod
    def contiguous(a: Any) -> Any:
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)

    # outputs: large ones from the pool of released buffers (pybn/_pool.py)
    empty = staticmethod(POOL.empty)


HOST = HostBackend()


_PLACEHOLDERS: dict = {}


def _empty_placeholder(cp: Any, device: int) -> Any:
    """A one-element device array per device, passed for empty arrays (never read or written)."""
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = cp.empty(1, cp.float64)
    return _PLACEHOLDERS[device]


def _cupy() -> Any:
    """CuPy, imported on first use of a CUDA array."""
    try:
        import cupy
    except ImportError as e:
        raise TypeError(
            "CUDA arrays need CuPy: pip install 'pybn-kernels[cuda12]' or 'pybn-kernels[cuda13]' "
            f"(import cupy failed: {e})"
        ) from None
    return cupy


class CudaBackend:
    """CUDA arrays (CuPy, or any __cuda_array_interface__ / CUDA DLPack object, adopted as a
    zero-copy CuPy view), computed by the CUDA kernels on CuPy's current stream."""

    name = "cuda"

    def __init__(self) -> None:
        self.xp = _cupy()
        self.device = self.xp.cuda.Device().id

    def adopt(self, a: Any) -> Any:
        """A CuPy view of a CUDA array (zero-copy), on the current device."""
        if a is None:
            return None
        if not isinstance(a, self.xp.ndarray):
            # DLPack first: cupy.from_dlpack passes CuPy's current stream to the producer's
            # __dlpack__(stream=...), so a producer that wrote on another stream (a PyTorch side
            # stream) orders its work before ours; PyTorch's __cuda_array_interface__ (v2) has no
            # stream and would race. CAI only for producers without __dlpack__ (CAI v3 "stream").
            try:
                a = self.xp.from_dlpack(a) if hasattr(a, "__dlpack__") else self.xp.asarray(a)
            except (TypeError, ValueError, NotImplementedError, BufferError, RuntimeError) as e:
                hint = " (a tensor that requires grad: pass tensor.detach())" if "grad" in str(e) else ""
                raise TypeError(f"cannot use {type(a).__name__} as a CUDA array through CuPy: {e}{hint}") from None
        if a.device.id != self.device:
            raise TypeError(f"all arrays of one call must live on the same device, got devices "
                            f"{self.device} and {a.device.id}")
        return a

    def address(self, a: Any) -> int:
        ptr = int(a.data.ptr)
        if ptr == 0:  # an empty CuPy array has no memory; the C ABI wants a device pointer
            ptr = int(_empty_placeholder(self.xp, self.device).data.ptr)
        return ptr

    def stream(self) -> int:
        return int(self.xp.cuda.get_current_stream().ptr)

    def workspace(self, nbytes: int) -> Any:
        """Device temporaries of one library call, from CuPy's memory pool (256-byte aligned)."""
        return self.xp.empty(int(nbytes), dtype=self.xp.uint8)

    def writable(self, a: Any) -> bool:
        """False for a producer that marks its memory read-only (CAI "data": (ptr, True));
        CuPy arrays are always writable."""
        if isinstance(a, self.xp.ndarray):
            return True
        cai = getattr(a, "__cuda_array_interface__", None)
        return not (cai is not None and bool(cai["data"][1]))

    def may_share_memory(self, a: Any, b: Any) -> bool:
        return bool(self.xp.may_share_memory(self.adopt(a), self.adopt(b)))

    def contiguous(self, a: Any) -> Any:
        return a if a.flags.c_contiguous else self.xp.ascontiguousarray(a)

    def empty(self, shape: Tuple[int, ...], dtype: Any) -> Any:
        return self.xp.empty(shape, dtype=dtype)  # CuPy's own memory pool


def device_context(arrays: Sequence[Any], stream: Any = None) -> Any:
    """Context for a call: for CUDA arrays, the device of the first one and the requested stream
    (a CuPy stream, a torch.cuda.Stream, or a cudaStream_t as int) made current; for host
    arrays, nothing (stream is ignored)."""
    cuda = [a for a in arrays if a is not None and not isinstance(a, np.ndarray) and _is_cuda_array(a)]
    host = any(a is not None and HOST.owns(a) for a in arrays)
    if not cuda or host or not _core.has_cuda():  # host work, or an error that backend_of reports
        return contextlib.nullcontext()
    cp = _cupy()
    stack = contextlib.ExitStack()
    stack.enter_context(cp.cuda.Device(_device_id(cp, cuda[0])))
    if stream is not None:
        if isinstance(stream, cp.cuda.Stream):
            stack.enter_context(stream)
        else:
            ptr = getattr(stream, "cuda_stream", getattr(stream, "ptr", stream))
            if isinstance(ptr, bool) or not isinstance(ptr, numbers.Integral):
                raise TypeError(f"stream must be a CuPy stream, a torch.cuda.Stream or an int "
                                f"cudaStream_t, got {type(stream).__name__}")
            stack.enter_context(cp.cuda.ExternalStream(int(ptr)))
    return stack


def _device_id(cp: Any, a: Any) -> int:
    if isinstance(a, cp.ndarray):
        return int(a.device.id)
    if hasattr(a, "__dlpack_device__"):
        return int(a.__dlpack_device__()[1])
    if hasattr(a, "__cuda_array_interface__"):
        ptr = a.__cuda_array_interface__["data"][0]
        return int(cp.cuda.runtime.pointerGetAttributes(ptr).device) if ptr else cp.cuda.Device().id
    return cp.cuda.Device().id


def _is_cuda_array(a: Any) -> bool:
    if hasattr(a, "__cuda_array_interface__"):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    if dev is not None:
        try:
            return int(dev()[0]) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:
            return False
    return False


def _device_of(name: str, a: Any) -> str:
    if HOST.owns(a):
        return "cpu"
    if _is_cuda_array(a):
        return "cuda"
    raise TypeError(
        f"{name} must be a NumPy array, a CPU DLPack array (e.g. a PyTorch CPU tensor) or a CUDA "
        f"array (CuPy, or any object with __cuda_array_interface__ / a CUDA __dlpack__), got "
        f"{type(a).__module__}.{type(a).__name__}"
    )


def backend_of(arrays: Sequence[Tuple[str, Any]]) -> Any:
    """The backend of a call: all non-None arrays must live on the same device."""
    devices = [(name, _device_of(name, a)) for name, a in arrays if a is not None]
    kinds = {d for _, d in devices}
    if len(kinds) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices)
        raise TypeError(f"all arrays of one call must live on the same device, got {where}")
    if kinds == {"cuda"}:
        if not _core.has_cuda():
            raise TypeError("CUDA arrays are not supported by this pybn build (pybn.has_cuda() is "
                            "False: it was built without the CUDA toolkit); pass NumPy arrays")
        return CudaBackend()
    return HOST


def dtype_name(dt: Any) -> str:
    """A dtype for messages; float32 in non-native byte order is not the float32 pybn computes."""
    dt = np.dtype(dt)
    return dt.name if dt.isnative else f"{dt.name} in non-native byte order ({dt.str})"


_CODE_OF_DTYPE: dict = {}  # dtype -> code, filled on first use (dtype.name takes microseconds)


def dtype_code(name: str, a: Any) -> int:
    code = _CODE_OF_DTYPE.get(a.dtype)
    if code is None:
        dt = np.dtype(a.dtype)
        code = _DTYPE_CODES.get(dt.name) if dt.isnative else None
        if code is None:
            raise TypeError(f"{name} must have dtype {SUPPORTED_DTYPES} (native byte order), "
                            f"got {dtype_name(dt)}")
        _CODE_OF_DTYPE[dt] = code
    return code


def param_dtype(x_dtype: Any) -> np.dtype:
    """dtype of per-channel arrays for data of dtype x_dtype."""
    return np.dtype(np.float64) if np.dtype(x_dtype) == np.float64 else np.dtype(np.float32)


def check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_eps(eps: Any) -> float:
    e = check_real("eps", eps)
    if not (e >= 0.0) or not math.isfinite(e):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return e


def check_momentum(momentum: Any) -> float:
    m = check_real("momentum", momentum)
    if not (0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return m


def check_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim}) for a {ndim}-D x, got {axis}")
    return int(axis) % ndim


class Canonical:
    """x seen as a C-contiguous (outer, channels, inner) array.

    A C-contiguous x, or a permutation of one (e.g. a channels-last tensor with NCHW shape), is
    used in place; anything else is copied once. ``perm`` orders x's axes by memory order, so
    that every other array of the call is laid out like x.
    """

    def __init__(self, backend: Any, x: Any, axis: int, name: str = "x", batch_outer: bool = False):
        self.backend = backend
        x = backend.adopt(x)
        self.code = dtype_code(name, x)
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(x.shape)}")
        ax = check_axis(axis, x.ndim)
        self.axis = ax  # the channel axis of x
        self.shape = tuple(x.shape)
        self.dtype = np.dtype(x.dtype)
        self.pdtype = param_dtype(x.dtype)
        self.perm = self._memory_order(x)
        if batch_outer and self.perm[0] != 0:  # ghost batches: samples outermost (else a copy)
            self.perm = tuple(range(x.ndim))
        inv = [0] * x.ndim
        for i, p in enumerate(self.perm):
            inv[p] = i
        self.inv_perm = tuple(inv)
        self.data = self.arrange(x)
        k = self.perm.index(ax)
        tshape = self.data.shape
        self.channels = int(tshape[k])
        self.outer = int(math.prod(tshape[:k]))
        self.inner = int(math.prod(tshape[k + 1 :]))
        self.count = self.outer * self.inner  # values per channel
        self.view = (self.outer, self.channels, self.inner, self.code)

    @staticmethod
    def _memory_order(x: Any) -> Tuple[int, ...]:
        if x.flags.c_contiguous:
            return tuple(range(x.ndim))
        perm = tuple(sorted(range(x.ndim), key=lambda i: -abs(x.strides[i])))
        if x.transpose(perm).flags.c_contiguous:
            return perm
        return tuple(range(x.ndim))  # not a permuted contiguous array: arrange() copies

    def arrange(self, a: Any) -> Any:
        """a (with x's shape) as a C-contiguous array in x's memory order (a copy if needed)."""
        t = a.transpose(self.perm)
        return self.backend.contiguous(t)

    def is_arranged(self, a: Any) -> bool:
        return bool(a.transpose(self.perm).flags.c_contiguous)

    def empty(self) -> Any:
        """A new array shaped and laid out like x; returns (array, its canonical data)."""
        data = self.backend.empty(self.data.shape, self.dtype)
        return data.transpose(self.inv_perm), data

    def like_x(self, name: str, a: Any) -> Any:
        """Canonical data of an input that must match x in shape and dtype (dy)."""
        a = self.backend.adopt(a)
        if np.dtype(a.dtype) != self.dtype:
            raise TypeError(f"{name} must have the dtype of x ({self.dtype.name}), got {dtype_name(a.dtype)}")
        if tuple(a.shape) != self.shape:
            raise ValueError(f"{name} must have the shape of x {self.shape}, got {tuple(a.shape)}")
        return self.arrange(a)

    def per_channel(self, name: str, a: Any, *, writable: bool = False, rows: int = 0) -> Any:
        """Validated per-channel array (rows > 0: of shape (rows, channels), one row per ghost
        batch); returns its contiguous data (a copy if it was strided)."""
        if a is None:
            return None
        given, a = a, self.backend.adopt(a)
        if np.dtype(a.dtype) != self.pdtype:
            raise TypeError(
                f"{name} must have dtype {self.pdtype.name} (per-channel dtype for {self.dtype.name} x), "
                f"got {dtype_name(a.dtype)}"
            )
        shape, what = ((rows, self.channels), "one row per virtual batch") if rows else \
            ((self.channels,), "one value per channel")
        if tuple(a.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(a.shape)}")
        if writable and not self.backend.writable(given):
            raise ValueError(f"{name} is read-only; it is updated in place and must be writable")
        return self.backend.contiguous(a)

    def output(self, out: Any, inputs: Sequence[Tuple[str, Any]], in_place: Sequence[Any] = (),
               name: str = "out") -> "Output":
        """The elementwise output of a call (y or dx), laid out like x.

        out=None allocates. Otherwise out must match x's shape and dtype, be writable and overlap
        no input, except by being exactly one of `in_place` (same memory and layout). When out is
        not laid out like x, the result is computed into a temporary and copied into out.
        """
        if out is None:
            return Output(*self.empty())
        given, out = out, self.backend.adopt(out)
        if np.dtype(out.dtype) != self.dtype:
            raise TypeError(f"{name} must have the dtype of x ({self.dtype.name}), got {dtype_name(out.dtype)}")
        if tuple(out.shape) != self.shape:
            raise ValueError(f"{name} must have the shape of x {self.shape}, got {tuple(out.shape)}")
        if not self.backend.writable(given):
            raise ValueError(f"{name} is read-only")
        out_name = name
        for in_name, a in inputs:
            if a is None or not self.backend.may_share_memory(out, a):
                continue
            if any(a is b for b in in_place) and _same_memory(out, a, self.backend):
                continue
            raise ValueError(f"{out_name} overlaps {'the input ' if in_name != 'out' else ''}{in_name}; only exact "
                             "in-place use is supported")
        if self.is_arranged(out):
            return Output(given, out.transpose(self.perm))
        return Output(given, self.empty()[1], inv_perm=self.inv_perm, target=out)


class Output:
    """An elementwise result: `data` is the canonical array the library writes; finish() copies
    it into a user's `out` whose layout differs from x's."""

    def __init__(self, result: Any, data: Any, inv_perm: Optional[Tuple[int, ...]] = None,
                 target: Any = None):
        self.result, self.data, self.inv_perm, self.target = result, data, inv_perm, target

    def finish(self) -> Any:
        if self.inv_perm is not None:
            self.target[...] = self.data.transpose(self.inv_perm)
        return self.result


def _same_memory(a: Any, b: Any, backend: Any) -> bool:
    a, b = backend.adopt(a), backend.adopt(b)
    return (
        backend.address(a) == backend.address(b)
        and tuple(a.shape) == tuple(b.shape)
        and tuple(a.strides) == tuple(b.strides)
        and np.dtype(a.dtype) == np.dtype(b.dtype)
    )


def address(backend: Any, a: Any) -> int:
    """Address of an array for libpybn (0 for None)."""
    return 0 if a is None else backend.address(a)
