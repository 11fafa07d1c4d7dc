"""Fuzz target (atheris, libFuzzer's engine) over pybn's Python API and its C ABI.

    python tests/fuzz/fuzz_pybn.py -max_total_time=60 NEW_CORPUS tests/fuzz/corpus

Each input picks an operation and builds arbitrary arguments from the fuzzer's bytes: shapes
(including empty), memory layouts (transposed, strided, negative strides), dtypes (the four
supported and unsupported ones), channel axis, eps / momentum (NaN, Inf, out of range),
parameter arrays of wrong shape or dtype, `out` arrays (wrong, read-only, overlapping), values
(NaN, Inf, huge, subnormal). A second family calls the C ABI through ctypes with corrupted views
(negative, overflowing, bad dtype) or NULL pointers.

The rules checked on every input:
  - only TypeError / ValueError may escape (anything else, or a crash, is a bug);
  - a call that raises changes none of the arrays it was given;
  - a C call with a corrupted view returns an error status and writes nothing;
  - on success with finite, moderate float64 data, y matches a NumPy reference.
tests/test_fuzz.py runs every file of tests/fuzz/corpus through TestOneInput (regressions) and
the fuzzer itself for a bounded time. Native code is not coverage-instrumented (that needs a
clang build with -fsanitize=fuzzer-no-link); the Python layer and the argument space are.
"""
import ctypes
import sys

import numpy as np

import pybn

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = np.dtype(np.float32)

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16,
          np.dtype(np.int32), np.dtype(np.complex64)]
SPECIAL = [np.nan, np.inf, -np.inf, 1e38, -3e38, 1e-45, 0.0, -0.0, 65504.0, 1e300]


class Bytes:
    """Reads small integers, floats and value arrays off the input bytes (plain Python, so the
    corpus replays without atheris installed)."""

    def __init__(self, data):
        self.data, self.i = data, 0

    def int(self, lo, hi):
        if self.i >= len(self.data):
            return lo
        v = self.data[self.i]
        self.i += 1
        return lo + v % (hi - lo + 1)

    def float(self):
        k = self.int(0, 15)
        if k < len(SPECIAL):
            return SPECIAL[k]
        b = self.data[self.i:self.i + 8].ljust(8, b"\0")
        self.i += 8
        v = float(np.frombuffer(b, np.float64)[0])
        return v if np.isfinite(v) else 0.5

    def values(self, n):
        raw = self.data[self.i:self.i + 2 * n]
        self.i += len(raw)
        base = np.frombuffer(raw.ljust(2 * n, b"\0"), np.int16).astype(np.float64) / 256.0
        if n and self.int(0, 3) == 0:  # sprinkle special values
            for _ in range(self.int(1, 3)):
                base[self.int(0, n - 1) if n < 256 else self.int(0, 255)] = SPECIAL[self.int(0, len(SPECIAL) - 1)]
        return base


def _array(fd, shape, dtype):
    n = int(np.prod(shape)) if shape else 1
    with np.errstate(over="ignore", invalid="ignore"):
        vals = (fd.values(n) * 10.0 ** fd.int(-3, 6) + fd.int(-2, 2) * 10.0 ** fd.int(0, 8))
        if dtype.kind in "fc" or dtype == BF16:
            a = vals.astype(dtype)
        else:
            a = np.nan_to_num(vals).clip(-1e9, 1e9).astype(dtype)
    a = a.reshape(shape)
    layout = fd.int(0, 5)
    if layout == 1 and a.ndim >= 2:  # same values, transposed memory
        a = np.ascontiguousarray(a.T).T
    elif layout == 2 and a.ndim >= 1 and a.shape[-1] > 0:  # strided view
        big = np.repeat(a, 2, axis=-1)
        a = big[..., ::2]
    elif layout == 3 and a.ndim >= 1:  # negative strides
        a = a[..., ::-1]
    elif layout == 4:
        a = np.asfortranarray(a)
    return a


def _shape(fd):
    ndim = fd.int(1, 4)
    return tuple(fd.int(0, 6) if fd.int(0, 7) else 0 for _ in range(ndim))


def _per_channel(fd, C, dtype):
    k = fd.int(0, 7)
    if k == 0:
        return None
    if k == 1:
        return np.ones(C + 1, dtype)  # wrong length
    if k == 2:
        return np.ones(C, np.float16)  # wrong dtype
    if k == 3:
        return [1.0] * C  # not an array
    a = (fd.values(C) + 1).astype(dtype)
    if k == 4:
        a.flags.writeable = False
    return a


def _snapshot(args):
    return [(a, a.tobytes(), a.shape) for a in args if isinstance(a, np.ndarray)]


def _check_unchanged(snap, what):
    for a, before, shape in snap:
        if a.tobytes() != before or a.shape != shape:
            raise AssertionError(f"{what}: a failed call changed an input of shape {shape}")


def _reference(x, axis, eps, gamma, beta):
    xc = np.moveaxis(x.astype(np.float64), axis, -1)
    red = tuple(range(xc.ndim - 1))
    m = xc.mean(axis=red)
    v = xc.var(axis=red)
    y = (xc - m) / np.sqrt(v + eps)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return np.moveaxis(y, -1, axis), v


def python_api(fd):
    shape = _shape(fd)
    dtype = DTYPES[fd.int(0, len(DTYPES) - 1)]
    x = _array(fd, shape, dtype)
    axis = fd.int(-5, 4)
    C = shape[axis] if -len(shape) <= axis < len(shape) else 3
    pdtype = np.float64 if dtype == np.float64 else np.float32
    gamma, beta = _per_channel(fd, C, pdtype), _per_channel(fd, C, pdtype)
    rm, rv = _per_channel(fd, C, pdtype), _per_channel(fd, C, pdtype)
    if isinstance(rv, np.ndarray) and rv.dtype == pdtype:
        rv = np.abs(rv)
    eps = [1e-5, 0.0, fd.float(), 1e-3][fd.int(0, 3)]
    momentum = [0.1, None, fd.float(), 1.0][fd.int(0, 3)]
    training = [True, False, 1, "yes"][fd.int(0, 3)]
    out_kind = fd.int(0, 5)
    out = None
    if out_kind == 1:
        out = np.empty_like(x)
    elif out_kind == 2:
        out = x  # exact in place
    elif out_kind == 3 and x.size > 1:
        out = x.reshape(-1)[::-1].reshape(x.shape) if x.flags.c_contiguous else None  # overlapping
    elif out_kind == 4:
        out = np.empty(shape + (1,), dtype)
    op = fd.int(0, 5)
    snap = _snapshot([x, gamma, beta, rm, rv, out])
    try:
        if op == 0:
            kw = dict(training=training, eps=eps, axis=axis, out=out)
            if momentum is not None:
                kw["momentum"] = momentum
            y = pybn.batchnorm(x, gamma, beta, rm, rv, **kw)
            _check_result(x, y, axis, eps, gamma, beta, training, out)
        elif op == 1:
            y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta, rm, rv, training=training,
                                                     eps=eps, axis=axis)
            dy = _array(fd, x.shape, x.dtype) if fd.int(0, 1) else np.ones_like(x)
            snap = _snapshot([x, dy, mean, invstd, gamma])
            pybn.batchnorm_backward(dy, x, mean, invstd, gamma, training=training, axis=axis,
                                    out=[None, dy, np.empty_like(x)][fd.int(0, 2)])
        elif op == 2:
            count, mean, m2 = pybn.batch_stats(x, axis=axis)
            k = fd.int(1, 3)
            parts = [np.stack([a] * k) for a in (count, mean, m2)]
            if fd.int(0, 3) == 0:
                parts[fd.int(0, 2)] = parts[0][:, :-1] if C > 0 else parts[0].astype(np.float32)
            snap = _snapshot(parts)
            c, m, q = pybn.merge_stats(*parts)
            snap = _snapshot([x, gamma, beta, rm, rv])
            pybn.normalize(x, c, m, q, gamma, beta, rm, rv, eps=eps, axis=axis,
                           momentum=0.1 if momentum is None else momentum)
        elif op == 3:
            mean = (fd.values(max(C, 0)) if C >= 0 else np.zeros(0)).astype(pdtype)
            dy = _array(fd, x.shape, x.dtype)
            snap = _snapshot([x, dy, mean])
            s = pybn.backward_reduce(dy, x, mean, axis=axis)
            snap = _snapshot([x, dy, mean, *s])
            pybn.backward_elementwise(dy, x, mean, np.ones(C, pdtype), gamma,
                                      np.full(C, float(fd.int(0, 9))), s[0], s[1], s[2],
                                      training=training, axis=axis)
        else:
            bn = pybn.BatchNorm(C if C > 0 else 1, axis=axis, momentum=momentum, eps=eps,
                                affine=bool(fd.int(0, 1)), track_running_stats=bool(fd.int(0, 1)))
            if op == 5:
                bn.eval()
            state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in bn.state_dict().items()}
            try:
                bn(x)
                bn.backward(_array(fd, x.shape, x.dtype))
            except (TypeError, ValueError):
                after = bn.state_dict()
                for k, v in state.items():
                    same = np.array_equal(after[k], v, equal_nan=True) if isinstance(v, np.ndarray) else after[k] == v
                    if not same:
                        raise AssertionError(f"BatchNorm: a failed call changed {k}")
                raise
    except (TypeError, ValueError):
        _check_unchanged(snap, f"op {op}")


def _check_result(x, y, axis, eps, gamma, beta, training, out):
    """Differential check on benign float64 inputs."""
    if training is not True or x.dtype != np.float64 or x.size == 0 or not np.isfinite(x).all():
        return
    if np.abs(x).max() > 1e6 or eps < 1e-3 or eps > 1e6 or x.size // x.shape[axis] < 2:
        return
    for p in (gamma, beta):
        if p is not None and (not isinstance(p, np.ndarray) or not np.isfinite(p).all() or np.abs(p).max() > 1e6):
            return
    if out is x:  # x was overwritten
        return
    ref, _ = _reference(x, axis, eps, gamma, beta)
    err = np.abs(y - ref).max()
    scale = 1.0 + np.abs(ref).max()
    if not err <= 1e-9 * scale:
        raise AssertionError(f"y differs from the reference by {err} (scale {scale})")


# ----------------------------------------- the C ABI -----------------------------------------

def _lib():
    import os
    import glob
    here = os.path.dirname(pybn.__file__)
    path = sorted(glob.glob(os.path.join(here, "libpybn*.so*")) + glob.glob(os.path.join(here, "*pybn*.dylib")))
    return ctypes.CDLL(path[0]) if path else None


class View(ctypes.Structure):
    _fields_ = [("outer", ctypes.c_int64), ("channels", ctypes.c_int64), ("inner", ctypes.c_int64),
                ("dtype", ctypes.c_int)]


LIB = _lib()
if LIB is not None:
    LIB.pybn_forward_train.argtypes = [View] + [ctypes.c_void_p] * 3 + [ctypes.c_double] + \
        [ctypes.c_void_p] * 2 + [ctypes.c_double] + [ctypes.c_void_p] * 3
    LIB.pybn_batch_stats.argtypes = [View] + [ctypes.c_void_p] * 4
    LIB.pybn_backward.argtypes = [View] + [ctypes.c_void_p] * 5 + [ctypes.c_int] + [ctypes.c_void_p] * 3
    LIB.pybn_merge_stats.argtypes = [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 6


def c_abi(fd):
    if LIB is None:
        return
    o, c, i = fd.int(0, 5), fd.int(0, 5), fd.int(0, 40)
    x = fd.values(o * c * i).astype(np.float32)
    y = np.full_like(x, 7.0)
    pc = np.full(c, 5.0, np.float32)
    d = np.full(c, 5.0)
    v = View(o, c, i, 0)
    corrupt = fd.int(0, 5)
    if corrupt == 1:
        setattr(v, ["outer", "channels", "inner"][fd.int(0, 2)], -fd.int(1, 255))
    elif corrupt == 2:
        v.outer, v.inner = 1 << fd.int(32, 62), 1 << fd.int(32, 62)
    elif corrupt == 3:
        v.dtype = fd.int(4, 255) * (1 if fd.int(0, 1) else -1)
    ptr = lambda a: a.ctypes.data  # noqa: E731
    xp = None if corrupt == 4 else ptr(x)
    op = fd.int(0, 3)
    if op == 0:
        st = LIB.pybn_forward_train(v, xp, None, None, fd.float(), ptr(pc), ptr(pc), fd.float(), ptr(y), None, None)
    elif op == 1:
        st = LIB.pybn_batch_stats(v, xp, ptr(d), ptr(d), ptr(d))
    elif op == 2:
        st = LIB.pybn_backward(v, xp, xp, ptr(pc), ptr(pc), None, fd.int(0, 1), ptr(y), None, None)
    else:
        k = fd.int(1, 3)
        parts = np.full(k * c, 5.0)
        res = np.full(max(c, 1), 5.0)
        kk, cc = k, c
        if corrupt == 1:
            kk = -fd.int(0, 3)
        elif corrupt == 2:
            kk, cc = 1 << 62, max(c, 2)
        elif corrupt == 3:
            cc = -fd.int(1, 9)
        st = LIB.pybn_merge_stats(kk, cc, ptr(parts), ptr(parts), ptr(parts), None if corrupt == 4 else ptr(res),
                                  ptr(res), ptr(res))
        if corrupt in (1, 2, 3, 4) and (st == 0 or not (res == 5.0).all()):
            raise AssertionError(f"merge_stats: corrupted call accepted or wrote (corruption {corrupt})")
    if corrupt in (1, 2, 3, 4) and op != 3:
        if st == 0:
            raise AssertionError(f"C ABI accepted a corrupted call (corruption {corrupt}, op {op})")
        if not (y == 7.0).all() or not (pc == 5.0).all():
            raise AssertionError(f"C ABI wrote outputs on a failed call (corruption {corrupt}, op {op})")


def TestOneInput(data: bytes) -> None:
    fd = Bytes(data)
    with np.errstate(all="ignore"):
        if fd.int(0, 3) == 0:
            c_abi(fd)
        else:
            python_api(fd)


def main():
    import atheris

    atheris.instrument_all()  # coverage of the Python layer (pybn's and this target's bytecode)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
