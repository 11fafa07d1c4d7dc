"""Bitwise comparison of two libpybn builds through the C ABI (ctypes, no Python layer): the
level-1 entry points and the level-2 fused epilogues (ReLU, residual, their gradients).

    python bench/compare_libs.py OLD/libpybn.so NEW/libpybn.so

A restructuring that must not change numerics (bench/NOTES.md) is shown this way: both libraries
are loaded into one process and called on the same inputs (every dtype, NCHW / NHWC-like views,
row and column paths, per-core channel blocks, channel groups forced by a small PYBN_CACHE_BUDGET
and PYBN_CORE_BUDGET=0 in a second run, every
ISA path both support), and every output byte must agree. Prints one line per difference (the
first few) and a summary; exits 1 on any difference.
"""
import ctypes as ct
import itertools
import sys

import numpy as np

try:
    import ml_dtypes
except ImportError:  # bfloat16 needs it
    ml_dtypes = None


class View(ct.Structure):
    _fields_ = [("outer", ct.c_int64), ("channels", ct.c_int64), ("inner", ct.c_int64), ("dtype", ct.c_int32)]


I32, I64, D = ct.c_int32, ct.c_int64, ct.c_double


class ForwardParams(ct.Structure):  # pybn_forward_params (a library of an earlier level-2
    _fields_ = [("size", ct.c_size_t), ("training", I32), ("running_var_correction", I32),  # header
                ("gamma", ct.c_void_p), ("beta", ct.c_void_p), ("eps", D), ("running_mean", ct.c_void_p),  # reads
                ("running_var", ct.c_void_p), ("momentum", D), ("save_mean", ct.c_void_p),  # the zero tail
                ("save_invstd", ct.c_void_p), ("count", ct.c_void_p), ("mean", ct.c_void_p),  # as defaults)
                ("m2", ct.c_void_p), ("activation", I32), ("reserved", I32), ("residual", ct.c_void_p),
                ("renorm_r_max", D), ("renorm_d_max", D), ("save_renorm_r", ct.c_void_p),
                ("save_renorm_d", ct.c_void_p), ("virtual_batches", I64)]


class BackwardParams(ct.Structure):  # pybn_backward_params
    _fields_ = [("size", ct.c_size_t), ("training", I32), ("activation", I32), ("mean", ct.c_void_p),
                ("invstd", ct.c_void_p), ("gamma", ct.c_void_p), ("dgamma", ct.c_void_p), ("dbeta", ct.c_void_p),
                ("count", ct.c_void_p), ("sum_dy", ct.c_void_p), ("sum_dy_xmu", ct.c_void_p),
                ("sum_xmu", ct.c_void_p), ("y", ct.c_void_p), ("dresidual", ct.c_void_p),
                ("renorm_r", ct.c_void_p), ("renorm_d", ct.c_void_p), ("virtual_batches", I64)]


DTYPES = [(0, np.float32), (1, np.float64), (2, np.float16)]
if ml_dtypes is not None:
    DTYPES.append((3, np.dtype(ml_dtypes.bfloat16)))
SHAPES = [(4, 3, 50), (2, 5, 17030), (64, 7, 1), (33, 130, 1), (5, 9, 3), (3, 2, 40000), (1, 64, 1024),
          (37, 64, 1), (19, 16, 2), (6, 8, 4),  # column blocks of 2 x 8 lanes
          (3, 16, 700), (40, 12, 45)]  # per-core channel blocks (long rows, short rows) on 2-4 threads
P = ct.c_void_p


def load(path):
    lib = ct.CDLL(path)
    for name in ("pybn_forward_train", "pybn_forward_infer", "pybn_backward", "pybn_batch_stats",
                 "pybn_backward_reduce", "pybn_normalize", "pybn_backward_elementwise", "pybn_set_cpu_isa",
                 "pybn_forward_v2", "pybn_backward_v2"):
        getattr(lib, name).restype = ct.c_int
    lib.pybn_cpu_isas.restype = ct.c_char_p
    return lib


def ptr(a):
    return P(a.ctypes.data) if a is not None else P(0)


def calls(rng, code, dt, shape):
    """(name, inputs) pairs; each call returns its outputs as a list of arrays."""
    outer, C, inner = shape
    pd = np.float64 if code == 1 else np.float32
    x = (rng.standard_normal(shape) * 3 + 100).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    gamma = rng.uniform(0.5, 2, C).astype(pd)
    beta = rng.standard_normal(C).astype(pd)
    rmean = rng.standard_normal(C).astype(pd)
    rvar = rng.uniform(0.5, 2, C).astype(pd)
    view = View(outer, C, inner, code)

    def forward_train(lib):
        y = np.empty_like(x)
        rm, rv, sm, si = rmean.copy(), rvar.copy(), np.empty(C, pd), np.empty(C, pd)
        st = lib.pybn_forward_train(view, ptr(x), ptr(gamma), ptr(beta), ct.c_double(1e-5), ptr(rm), ptr(rv),
                                    ct.c_double(0.1), ptr(y), ptr(sm), ptr(si))
        return st, [y, rm, rv, sm, si]

    def forward_infer(lib):
        y = np.empty_like(x)
        st = lib.pybn_forward_infer(view, ptr(x), ptr(rmean), ptr(rvar), ptr(gamma), ptr(beta),
                                    ct.c_double(1e-3), ptr(y))
        return st, [y]

    def backward(lib, training):
        mean = x.astype(np.float64).mean(axis=(0, 2)).astype(pd)
        invstd = (1 / np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + 1e-5)).astype(pd)
        dx, dg, db = np.empty_like(x), np.empty(C, pd), np.empty(C, pd)
        st = lib.pybn_backward(view, ptr(dy), ptr(x), ptr(mean), ptr(invstd), ptr(gamma), training, ptr(dx),
                               ptr(dg), ptr(db))
        return st, [dx, dg, db]

    def stats_then_normalize(lib):
        count, mean, m2 = (np.empty(C) for _ in range(3))
        st = lib.pybn_batch_stats(view, ptr(x), ptr(count), ptr(mean), ptr(m2))
        y, rm, rv = np.empty_like(x), rmean.copy(), rvar.copy()
        sm, si = np.empty(C, pd), np.empty(C, pd)
        st |= lib.pybn_normalize(view, ptr(x), ptr(count), ptr(mean), ptr(m2), ptr(gamma), ptr(beta),
                                 ct.c_double(1e-5), ptr(y), ptr(rm), ptr(rv), ct.c_double(0.2), ptr(sm), ptr(si))
        return st, [count, mean, m2, y, rm, rv, sm, si]

    def reduce_then_elementwise(lib):
        mean = x.astype(np.float64).mean(axis=(0, 2)).astype(pd)
        invstd = (1 / np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + 1e-5)).astype(pd)
        s = [np.empty(C) for _ in range(3)]
        st = lib.pybn_backward_reduce(view, ptr(dy), ptr(x), ptr(mean), *(ptr(a) for a in s))
        count = np.full(C, float(outer * inner))
        dx, dg, db = np.empty_like(x), np.empty(C, pd), np.empty(C, pd)
        st |= lib.pybn_backward_elementwise(view, ptr(dy), ptr(x), ptr(mean), ptr(invstd), ptr(gamma), 1,
                                            ptr(count), *(ptr(a) for a in s), ptr(dx), ptr(dg), ptr(db))
        return st, [*s, dx, dg, db]

    z = rng.standard_normal(shape).astype(dt)

    def fused_forward(lib, training):  # y = relu(bn(x) + z), level 2
        y, rm, rv, sm, si = np.empty_like(x), rmean.copy(), rvar.copy(), np.empty(C, pd), np.empty(C, pd)
        p = ForwardParams(size=ct.sizeof(ForwardParams), training=training, running_var_correction=1,
                          gamma=gamma.ctypes.data, beta=beta.ctypes.data, eps=1e-5, running_mean=rm.ctypes.data,
                          running_var=rv.ctypes.data, momentum=0.1, save_mean=sm.ctypes.data,
                          save_invstd=si.ctypes.data, activation=1, residual=z.ctypes.data)
        st = lib.pybn_forward_v2(view, ptr(x), ptr(y), ct.byref(p))
        return st, [y, rm, rv, sm, si]

    def relu_forward(lib, training):  # y = relu(bn(x)), level 2, no residual
        y, rm, rv, sm, si = np.empty_like(x), rmean.copy(), rvar.copy(), np.empty(C, pd), np.empty(C, pd)
        p = ForwardParams(size=ct.sizeof(ForwardParams), training=training, running_var_correction=1,
                          gamma=gamma.ctypes.data, beta=beta.ctypes.data, eps=1e-5, running_mean=rm.ctypes.data,
                          running_var=rv.ctypes.data, momentum=0.1, save_mean=sm.ctypes.data,
                          save_invstd=si.ctypes.data, activation=1)
        st = lib.pybn_forward_v2(view, ptr(x), ptr(y), ct.byref(p))
        return st, [y, rm, rv, sm, si]

    def relu_backward(lib, training):  # relu mask from y, no dresidual, level 2
        mean = x.astype(np.float64).mean(axis=(0, 2)).astype(pd)
        invstd = (1 / np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + 1e-5)).astype(pd)
        dx, dg, db = np.empty_like(x), np.empty(C, pd), np.empty(C, pd)
        p = BackwardParams(size=ct.sizeof(BackwardParams), training=training, activation=1, mean=mean.ctypes.data,
                           invstd=invstd.ctypes.data, gamma=gamma.ctypes.data, dgamma=dg.ctypes.data,
                           dbeta=db.ctypes.data, y=z.ctypes.data)
        st = lib.pybn_backward_v2(view, ptr(dy), ptr(x), ptr(dx), ct.byref(p))
        return st, [dx, dg, db]

    def fused_backward(lib, training):  # relu mask from y, dresidual, level 2
        mean = x.astype(np.float64).mean(axis=(0, 2)).astype(pd)
        invstd = (1 / np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + 1e-5)).astype(pd)
        dx, dres, dg, db = np.empty_like(x), np.empty_like(x), np.empty(C, pd), np.empty(C, pd)
        p = BackwardParams(size=ct.sizeof(BackwardParams), training=training, activation=1, mean=mean.ctypes.data,
                           invstd=invstd.ctypes.data, gamma=gamma.ctypes.data, dgamma=dg.ctypes.data,
                           dbeta=db.ctypes.data, y=z.ctypes.data, dresidual=dres.ctypes.data)
        st = lib.pybn_backward_v2(view, ptr(dy), ptr(x), ptr(dx), ct.byref(p))
        return st, [dx, dres, dg, db]

    return [("fused_forward_train", lambda lib: fused_forward(lib, 1)),
            ("fused_forward_infer", lambda lib: fused_forward(lib, 0)),
            ("fused_backward_train", lambda lib: fused_backward(lib, 1)),
            ("fused_backward_frozen", lambda lib: fused_backward(lib, 0)),
            ("relu_forward_train", lambda lib: relu_forward(lib, 1)),
            ("relu_backward_train", lambda lib: relu_backward(lib, 1)),
            ("relu_backward_frozen", lambda lib: relu_backward(lib, 0)),
            ("forward_train", forward_train), ("forward_infer", forward_infer),
            ("backward_train", lambda lib: backward(lib, 1)), ("backward_frozen", lambda lib: backward(lib, 0)),
            ("batch_stats+normalize", stats_then_normalize),
            ("backward_reduce+elementwise", reduce_then_elementwise)]


def main():
    old, new = load(sys.argv[1]), load(sys.argv[2])
    isas = [i for i in old.pybn_cpu_isas().decode().split(",") if i in new.pybn_cpu_isas().decode().split(",")]
    compared = differ = 0
    for isa in isas:
        for lib in (old, new):
            assert lib.pybn_set_cpu_isa(isa.encode()) == 0
        for (code, dt), shape in itertools.product(DTYPES, SHAPES):
            rng = np.random.default_rng(hash((code, shape)) % 2**32)
            for name, call in calls(rng, code, dt, shape):
                (sa, outs_a), (sb, outs_b) = call(old), call(new)
                compared += 1
                same = sa == sb and all(a.tobytes() == b.tobytes() for a, b in zip(outs_a, outs_b))
                if not same:
                    differ += 1
                    if differ <= 10:
                        print(f"DIFFERS {isa} {np.dtype(dt).name} {shape} {name}: status {sa} vs {sb}")
    print(f"{compared} calls on ISA paths {isas}: {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
