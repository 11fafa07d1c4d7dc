"""A bounded pool of large host output buffers, so that fresh outputs do not fault in.

A new NumPy array of a few hundred MB is memory the kernel must first fault in: the operating
system maps and zeroes every page on first touch, which on a VM costs more than the kernel itself
(bench/NOTES.md, step 26). In a training loop the same shapes come back every step, so pybn keeps
recently released large output buffers and hands them out again:

* Only outputs of at least ``threshold`` bytes (1 MiB) come from the pool; smaller ones are plain
  ``numpy.empty`` (the C heap already reuses them).
* A buffer is a private anonymous memory mapping (``mmap``, huge pages advised where the OS has
  them) whose size is rounded up to 2 MiB. The array handed out is ``numpy.frombuffer`` of it, shaped;
  a finaliser on that base array returns the buffer to the pool when the last array or view that
  uses it is gone, so memory that is still referenced is never handed out again.
* The pool keeps at most ``limit`` bytes of released buffers (in use buffers do not count);
  beyond that a released buffer is unmapped at once. Default: min(1 GiB, 1/8 of physical memory);
  the environment variable ``PYBN_MEMORY_POOL_LIMIT`` (bytes, or with a K / M / G suffix; 0
  disables the pool) sets it at import, ``pybn.set_memory_pool_limit(nbytes)`` at run time
  (0: off, and every kept buffer is unmapped). ``pybn.memory_pool_info()`` reports it.
* Thread-safe (one lock; a buffer is handed to one caller only).

The contents of a pooled output are undefined until pybn writes it, as with ``numpy.empty``.
"""
from __future__ import annotations

import mmap
import os
import threading
import weakref
from typing import Any, Dict, List, Tuple

import numpy as np

_GRAIN = 2 << 20  # sizes round up to 2 MiB: huge-page friendly, and equal shapes share a class
# A private anonymous mapping, as malloc's: mmap's default on POSIX is MAP_SHARED, which Linux backs
# with shared memory (tmpfs pages, no transparent huge pages unless shmem_enabled says so) and
# a fork would share; kernels ran 10-15 % slower writing it (bench/NOTES.md, step 30).
_PRIVATE = ({"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS}
            if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS") else {})
THRESHOLD = 1 << 20


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX
        return 8 << 30


def default_limit() -> int:
    return min(1 << 30, _physical_memory() // 8)


def parse_size(text: str) -> int:
    """'1073741824', '512M', '2G', '64k' -> bytes; ValueError otherwise."""
    t = text.strip()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(t[-1:].lower(), 1)
    digits = t[:-1] if scale != 1 else t
    if t[-1:].lower() == "b" or not digits.isdigit():  # no 'MB' forms: one unambiguous spelling
        raise ValueError(f"PYBN_MEMORY_POOL_LIMIT must be a number of bytes, optionally with a K, M or G suffix "
                         f"(e.g. 512M), got {text!r}")
    return int(digits) * scale


class Pool:
    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._free: Dict[int, List[mmap.mmap]] = {}
        self._limit = limit
        self._kept = 0
        self._in_use = 0
        self._in_use_blocks = 0
        self.hits = self.misses = 0

    # ---- public -----------------------------------------------------------------------------
    def empty(self, shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
        """A C-contiguous array (like numpy.empty), from the pool when it is large enough."""
        dtype = np.dtype(dtype)
        count = 1
        for s in shape:
            count *= int(s)
        nbytes = count * dtype.itemsize
        if nbytes < THRESHOLD or self._limit == 0:
            return np.empty(shape, dtype)
        size = -(-nbytes // _GRAIN) * _GRAIN
        block = self._take(size)
        base = np.frombuffer(block, dtype=dtype, count=count)
        weakref.finalize(base, self._give_back, block, size).atexit = False
        return base.reshape(shape)

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self._limit = limit
            dropped = self._trim_locked()
        for b in dropped:
            b.close()

    def info(self) -> Dict[str, int]:
        with self._lock:
            return {"limit_bytes": self._limit, "kept_bytes": self._kept,
                    "kept_blocks": sum(len(v) for v in self._free.values()), "in_use_bytes": self._in_use,
                    "in_use_blocks": self._in_use_blocks, "hits": self.hits, "misses": self.misses,
                    "threshold_bytes": THRESHOLD}

    # ---- internals --------------------------------------------------------------------------
    def _take(self, size: int) -> mmap.mmap:
        with self._lock:
            kept = self._free.get(size)
            if kept:
                block = kept.pop()
                self._kept -= size
                self.hits += 1
            else:
                block = None
                self.misses += 1
            self._in_use += size
            self._in_use_blocks += 1
        if block is None:
            try:
                block = mmap.mmap(-1, size, **_PRIVATE)
            except (OSError, ValueError):
                with self._lock:
                    self._in_use -= size
                    self._in_use_blocks -= 1
                raise MemoryError(f"could not map {size} bytes for an output array") from None
            if hasattr(block, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    block.madvise(mmap.MADV_HUGEPAGE)
                except OSError:  # a kernel without transparent huge pages
                    pass
        return block

    def _give_back(self, block: mmap.mmap, size: int) -> None:
        with self._lock:
            self._in_use -= size
            self._in_use_blocks -= 1
            if self._kept + size <= self._limit:
                self._free.setdefault(size, []).append(block)
                self._kept += size
        # not kept: the mapping goes with its last reference (the dying array still holds its
        # buffer while this runs, so it cannot be closed here)

    def _trim_locked(self) -> List[mmap.mmap]:
        """Drops kept blocks (largest first) until they fit the limit; returns them to close."""
        dropped = []
        for size in sorted(self._free, reverse=True):
            blocks = self._free[size]
            while blocks and self._kept > self._limit:
                dropped.append(blocks.pop())
                self._kept -= size
            if not blocks:
                del self._free[size]
        return dropped


def _initial_limit() -> int:
    text = os.environ.get("PYBN_MEMORY_POOL_LIMIT")
    if text is None or text.strip() == "":
        return default_limit()
    try:
        return parse_size(text)
    except ValueError as e:  # a bad setting must not break `import pybn`: say so, use the default
        import warnings
        warnings.warn(f"{e}; using the default limit of {default_limit()} bytes", RuntimeWarning, stacklevel=2)
        return default_limit()


POOL = Pool(_initial_limit())


def set_memory_pool_limit(nbytes: int) -> None:
    """Set how many bytes of released large output buffers pybn keeps for reuse.

    Parameters
    ----------
    nbytes : int
        The limit, >= 0. 0 turns the pool off and unmaps every kept buffer. Buffers in use (still
        referenced by an array or a view) are never affected; they return to the pool, or are
        unmapped, when the last reference goes.

    Raises
    ------
    TypeError
        If `nbytes` is not an int (a bool is refused).
    ValueError
        If `nbytes` is negative.

    Notes
    -----
    Only host outputs of at least 1 MiB come from the pool (``memory_pool_info()["threshold_bytes"]``).
    The default, min(1 GiB, 1/8 of physical memory), or the environment variable
    ``PYBN_MEMORY_POOL_LIMIT`` (bytes, or with a K / M / G suffix) read at import, sets the
    initial limit. A pooled output's contents are undefined until pybn writes it, as with
    ``numpy.empty``.

    Examples
    --------
    >>> limit = pybn.memory_pool_info()["limit_bytes"]
    >>> pybn.set_memory_pool_limit(0)
    >>> pybn.memory_pool_info()["kept_bytes"]
    0
    >>> pybn.set_memory_pool_limit(limit)
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    POOL.set_limit(int(nbytes))


def memory_pool_info() -> Dict[str, int]:
    """The state of the pool of large host output buffers.

    Returns
    -------
    dict of str to int
        ``limit_bytes`` (the limit on kept bytes), ``kept_bytes`` / ``kept_blocks`` (released
        buffers ready for reuse), ``in_use_bytes`` / ``in_use_blocks`` (handed out and still
        referenced), ``hits`` / ``misses`` (outputs served from kept buffers / newly mapped) and
        ``threshold_bytes`` (smaller outputs do not use the pool).

    Examples
    --------
    >>> sorted(pybn.memory_pool_info())
    ['hits', 'in_use_blocks', 'in_use_bytes', 'kept_blocks', 'kept_bytes', 'limit_bytes', 'misses', 'threshold_bytes']
    """
    return POOL.info()
