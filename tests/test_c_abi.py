"""The C ABI of libpybn called directly (ctypes): status codes, messages naming the argument,
no output written on failure, thread-local error detail, the CUDA entry points' contract."""
import ctypes
import glob
import os
import threading

import numpy as np
import pytest

import pybn

LIB = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(pybn.__file__), "libpybn*"))[0])

SUCCESS, INVALID_ARGUMENT, UNSUPPORTED_DTYPE, INVALID_VALUE, TOO_FEW_VALUES = 0, 1, 2, 3, 4
NOT_COMPILED, CUDA_ERROR = 6, 7
F32, F64 = 0, 1


class View(ctypes.Structure):
    _fields_ = [("outer", ctypes.c_int64), ("channels", ctypes.c_int64), ("inner", ctypes.c_int64),
                ("dtype", ctypes.c_int32)]


P, D = ctypes.c_void_p, ctypes.c_double
for name, args in {
    "pybn_batch_stats": [View, P, P, P, P],
    "pybn_merge_stats": [ctypes.c_int64, ctypes.c_int64, P, P, P, P, P, P],
    "pybn_forward_train": [View, P, P, P, D, P, P, D, P, P, P],
    "pybn_forward_infer": [View, P, P, P, P, P, D, P],
    "pybn_backward": [View, P, P, P, P, P, ctypes.c_int, P, P, P],
    "pybn_cuda_forward_train": [View, P, P, P, D, P, P, D, P, P, P, P],
    "pybn_cuda_backward": [View, P, P, P, P, P, ctypes.c_int, P, P, P, P],
}.items():
    getattr(LIB, name).argtypes = args
    getattr(LIB, name).restype = ctypes.c_int
for name in ("pybn_status_string", "pybn_last_error", "pybn_version", "pybn_cpu_isa"):
    getattr(LIB, name).restype = ctypes.c_char_p
LIB.pybn_status_string.argtypes = [ctypes.c_int]


def ptr(a):
    return None if a is None else a.ctypes.data


def last_error():
    return LIB.pybn_last_error().decode()


def test_library_information():
    assert LIB.pybn_version().decode() == pybn.__version__
    assert LIB.pybn_abi_version() == 2
    assert LIB.pybn_has_cuda() == int(pybn.has_cuda())
    assert LIB.pybn_cpu_isa().decode() == pybn.cpu_isa()
    names = [LIB.pybn_status_string(i).decode() for i in range(9)]
    assert names[0] == "success" and names[1] == "invalid argument" and len(set(names)) == 9
    assert LIB.pybn_status_string(1000) == b"unknown status"


def _train_call(view, x, y, **kw):
    a = dict(gamma=None, beta=None, eps=1e-5, rm=None, rv=None, momentum=0.1, mean=None, invstd=None)
    a.update(kw)
    return LIB.pybn_forward_train(view, ptr(x), ptr(a["gamma"]), ptr(a["beta"]), a["eps"],
                                  ptr(a["rm"]), ptr(a["rv"]), a["momentum"], ptr(y),
                                  ptr(a["mean"]), ptr(a["invstd"]))


def test_forward_train_through_the_c_abi():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    y = np.empty_like(x)
    mean, invstd = np.empty(3, np.float32), np.empty(3, np.float32)
    assert _train_call(View(2, 3, 4, F32), x, y, mean=mean, invstd=invstd) == SUCCESS
    np.testing.assert_allclose(y, pybn.batchnorm(x), rtol=0, atol=0)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-7)


@pytest.mark.parametrize("case,status,message", [
    (dict(view=View(-1, 3, 4, F32)), INVALID_ARGUMENT, "view sizes must be >= 0, got outer=-1"),
    (dict(view=View(2, 3, 4, 9)), UNSUPPORTED_DTYPE, "view.dtype must be PYBN_FLOAT32 (0)"),
    (dict(view=View(1 << 40, 1 << 40, 4, F32)), INVALID_ARGUMENT, "overflows a 64-bit byte count"),
    (dict(x=None), INVALID_ARGUMENT, "pybn_forward_train: x must not be NULL"),
    (dict(y=None), INVALID_ARGUMENT, "pybn_forward_train: y must not be NULL"),
    (dict(eps=float("nan")), INVALID_VALUE, "eps must be a finite number >= 0, got nan"),
    (dict(eps=-1.0), INVALID_VALUE, "eps must be a finite number >= 0, got -1"),
    (dict(momentum=2.0, rm=True), INVALID_VALUE, "momentum must be in [0, 1], got 2"),
    (dict(view=View(1, 3, 1, F32), rm=True), TOO_FEW_VALUES, "at least 2 values per channel, got 1"),
    (dict(view=View(0, 3, 1, F32)), TOO_FEW_VALUES, "at least 1 value per channel, got 0"),
])
def test_forward_train_errors_write_nothing(case, status, message):
    x = np.ones((2, 3, 4), np.float32)
    y = np.full_like(x, 7.0)
    rm = np.full(3, 5.0, np.float32)
    mean = np.full(3, 5.0, np.float32)
    view = case.pop("view", View(2, 3, 4, F32))
    xx = case.pop("x", x)
    yy = case.pop("y", y)
    if case.pop("rm", None):
        case["rm"] = rm
    assert _train_call(view, xx, yy, mean=mean, rv=rm if "rm" in case else None, **case) == status
    assert message in last_error()
    np.testing.assert_array_equal(y, 7.0)
    np.testing.assert_array_equal(rm, 5.0)
    np.testing.assert_array_equal(mean, 5.0)


def test_other_entry_points_check_pointers():
    x = np.ones((2, 3, 4), np.float32)
    out = np.empty(3)
    assert LIB.pybn_batch_stats(View(2, 3, 4, F32), ptr(x), ptr(out), ptr(out), None) == INVALID_ARGUMENT
    assert "pybn_batch_stats: m2 must not be NULL" in last_error()
    assert LIB.pybn_forward_infer(View(2, 3, 4, F32), ptr(x), None, ptr(out), None, None, 1e-5, ptr(x)) \
        == INVALID_ARGUMENT
    assert "running_mean must not be NULL" in last_error()
    assert LIB.pybn_backward(View(2, 3, 4, F32), ptr(x), ptr(x), ptr(x), None, None, 1, None, None, None) \
        == INVALID_ARGUMENT
    assert "invstd must not be NULL" in last_error()
    assert LIB.pybn_merge_stats(0, 3, ptr(out), ptr(out), ptr(out), ptr(out), ptr(out), ptr(out)) \
        == INVALID_ARGUMENT
    assert "k must be >= 1, got 0" in last_error()


def test_success_leaves_last_error_and_errors_are_thread_local():
    x = np.ones((2, 3, 4), np.float32)
    assert _train_call(View(2, 3, 4, F32), None, x) == INVALID_ARGUMENT
    mine = last_error()
    assert _train_call(View(2, 3, 4, F32), x, x.copy()) == SUCCESS
    assert last_error() == mine
    seen = []

    def other():
        seen.append(last_error())
        _train_call(View(2, 3, 4, F32), x, None)
        seen.append(last_error())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[0] == "" and "y must not be NULL" in seen[1]
    assert last_error() == mine  # not clobbered by the other thread


def test_cuda_entry_points_exist_in_every_build():
    x = np.ones((2, 3, 4), np.float32)
    st = LIB.pybn_cuda_forward_train(View(2, 3, 4, F32), ptr(x), None, None, 1e-5, None, None, 0.1,
                                     ptr(x), None, None, None)
    if not pybn.has_cuda():
        assert st == NOT_COMPILED
        assert "built without CUDA" in last_error()
    else:  # host pointers are refused before any launch (or the runtime has no driver/GPU)
        assert st in (INVALID_ARGUMENT, CUDA_ERROR)
        assert "pybn_cuda_forward_train: " in last_error()
        assert "must be device memory" in last_error() or "failed" in last_error()
