"""ABI level 2 through ctypes: the size-versioned parameter blocks (shorter blocks refused, longer
ones accepted only when the unknown tail is zero), v2 results bitwise those of the level-1
wrappers, every mode, the CUDA workspace queries (host arithmetic, no GPU needed), a level-1-only
C program built against the frozen level-1 header, and "nothing changed" when an allocation fails
in the middle of an in-place call."""
import ctypes
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pybn

HERE = pathlib.Path(__file__).resolve().parent
LIB_PATH = glob.glob(os.path.join(os.path.dirname(pybn.__file__), "libpybn*"))[0]
LIB = ctypes.CDLL(LIB_PATH)
P, D, I32, SZ = ctypes.c_void_p, ctypes.c_double, ctypes.c_int32, ctypes.c_size_t
SUCCESS, INVALID_ARGUMENT, INVALID_VALUE, TOO_FEW_VALUES, NOT_COMPILED = 0, 1, 3, 4, 6


class View(ctypes.Structure):
    _fields_ = [("outer", ctypes.c_int64), ("channels", ctypes.c_int64), ("inner", ctypes.c_int64),
                ("dtype", I32)]


class ForwardParams(ctypes.Structure):
    _fields_ = [("size", SZ), ("training", I32), ("running_var_correction", I32), ("gamma", P), ("beta", P),
                ("eps", D), ("running_mean", P), ("running_var", P), ("momentum", D), ("save_mean", P),
                ("save_invstd", P), ("count", P), ("mean", P), ("m2", P), ("activation", I32), ("reserved", I32),
                ("residual", P), ("renorm_r_max", D), ("renorm_d_max", D), ("save_renorm_r", P),
                ("save_renorm_d", P), ("virtual_batches", ctypes.c_int64)]


class BackwardParams(ctypes.Structure):
    _fields_ = [("size", SZ), ("training", I32), ("activation", I32), ("mean", P), ("invstd", P), ("gamma", P),
                ("dgamma", P), ("dbeta", P), ("count", P), ("sum_dy", P), ("sum_dy_xmu", P), ("sum_xmu", P),
                ("y", P), ("dresidual", P), ("renorm_r", P), ("renorm_d", P), ("virtual_batches", ctypes.c_int64)]


for name, args in {
    "pybn_forward_v2": [View, P, P, P],
    "pybn_backward_v2": [View, P, P, P, P],
    "pybn_forward_train": [View, P, P, P, D, P, P, D, P, P, P],
    "pybn_forward_infer": [View, P, P, P, P, P, D, P],
    "pybn_backward": [View, P, P, P, P, P, ctypes.c_int, P, P, P],
    "pybn_cuda_forward_workspace_size": [View, P, P],
    "pybn_cuda_backward_workspace_size": [View, P, P],
    "pybn_cuda_reduce_workspace_size": [View, P],
    "pybn_cuda_forward_v2": [View, P, P, P, P, SZ, P],
}.items():
    getattr(LIB, name).argtypes = args
    getattr(LIB, name).restype = ctypes.c_int
LIB.pybn_last_error.restype = ctypes.c_char_p


def addr(a):
    return None if a is None else a.ctypes.data


def last_error():
    return LIB.pybn_last_error().decode()


def forward_params(**kw):
    p = ForwardParams(size=ctypes.sizeof(ForwardParams), training=1, running_var_correction=1, eps=1e-5,
                      momentum=0.1)
    for k, v in kw.items():
        setattr(p, k, addr(v) if isinstance(v, np.ndarray) else v)
    return p


def backward_params(**kw):
    p = BackwardParams(size=ctypes.sizeof(BackwardParams), training=1)
    for k, v in kw.items():
        setattr(p, k, addr(v) if isinstance(v, np.ndarray) else v)
    return p


def test_struct_layouts_match_the_header():
    # the header's sizes, from a C compiler when there is one (else the ctypes layout is trusted)
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    src = HERE / "_sizes.c"
    exe = HERE / "_sizes"
    src.write_text('#include <stdio.h>\n#include <stddef.h>\n#include <pybn/pybn.h>\nint main(void) {\n'
                   '  printf("%zu %zu %zu %zu\\n", sizeof(pybn_forward_params), offsetof(pybn_forward_params, virtual_batches),'
                   ' sizeof(pybn_backward_params), offsetof(pybn_backward_params, virtual_batches)); return 0; }\n')
    try:
        subprocess.run(["cc", "-std=c99", f"-I{pybn.get_include()}", str(src), "-o", str(exe)], check=True)
        got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True).stdout.split()]
    finally:
        src.unlink(missing_ok=True)
        exe.unlink(missing_ok=True)
    assert got == [ctypes.sizeof(ForwardParams), ForwardParams.virtual_batches.offset,
                   ctypes.sizeof(BackwardParams), BackwardParams.virtual_batches.offset]


def test_v2_forward_and_backward_are_bitwise_the_level_1_calls(rng):
    x = (rng.standard_normal((6, 5, 33)) + 4).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g, b = rng.uniform(0.5, 2, 5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    view = View(6, 5, 33, 0)
    outs = []
    for level in (1, 2):
        rm, rv, sm, si, y = np.zeros(5, np.float32), np.ones(5, np.float32), np.empty(5, np.float32), \
            np.empty(5, np.float32), np.empty_like(x)
        if level == 1:
            st = LIB.pybn_forward_train(view, addr(x), addr(g), addr(b), 1e-5, addr(rm), addr(rv), 0.1, addr(y),
                                        addr(sm), addr(si))
        else:
            p = forward_params(gamma=g, beta=b, running_mean=rm, running_var=rv, save_mean=sm, save_invstd=si)
            st = LIB.pybn_forward_v2(view, addr(x), addr(y), ctypes.byref(p))
        assert st == SUCCESS, last_error()
        dx, dg, db = np.empty_like(x), np.empty(5, np.float32), np.empty(5, np.float32)
        if level == 1:
            st = LIB.pybn_backward(view, addr(dy), addr(x), addr(sm), addr(si), addr(g), 1, addr(dx), addr(dg),
                                   addr(db))
        else:
            bp = backward_params(mean=sm, invstd=si, gamma=g, dgamma=dg, dbeta=db)
            st = LIB.pybn_backward_v2(view, addr(dy), addr(x), addr(dx), ctypes.byref(bp))
        assert st == SUCCESS, last_error()
        outs.append([y, rm, rv, sm, si, dx, dg, db])
    for a, c in zip(*outs):
        assert a.tobytes() == c.tobytes()


def test_v2_inference_saves_mean_and_invstd(rng):
    x = rng.standard_normal((4, 3, 8)).astype(np.float64)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    y, sm, si = np.empty_like(x), np.empty(3), np.empty(3)
    p = forward_params(training=0, running_mean=rm, running_var=rv, save_mean=sm, save_invstd=si, eps=1e-3)
    assert LIB.pybn_forward_v2(View(4, 3, 8, 1), addr(x), addr(y), ctypes.byref(p)) == SUCCESS
    np.testing.assert_array_equal(sm, rm)
    np.testing.assert_array_equal(si, 1 / np.sqrt(rv + 1e-3))
    np.testing.assert_allclose(y, (x - rm[None, :, None]) * si[None, :, None], rtol=1e-14)
    # given statistics make no sense in inference
    p.count = addr(np.ones(3))
    assert LIB.pybn_forward_v2(View(4, 3, 8, 1), addr(x), addr(y), ctypes.byref(p)) == INVALID_ARGUMENT
    assert "must be NULL when training = 0" in last_error()


class Longer(ctypes.Structure):  # a later level's block: level 2's fields and one more
    _fields_ = ForwardParams._fields_ + [("future_option", ctypes.c_int64)]


def test_parameter_block_sizes():
    x = np.ones((2, 3, 4), np.float32)
    y = np.full_like(x, 7)
    view = View(2, 3, 4, 0)
    short = forward_params()
    short.size = ctypes.sizeof(ForwardParams) - 8
    assert LIB.pybn_forward_v2(view, addr(x), addr(y), ctypes.byref(short)) == INVALID_ARGUMENT
    assert "params->size must be at least sizeof(pybn_forward_params)" in last_error()
    assert LIB.pybn_forward_v2(view, addr(x), addr(y), None) == INVALID_ARGUMENT
    assert "params must not be NULL" in last_error()
    np.testing.assert_array_equal(y, 7)
    longer = Longer(size=ctypes.sizeof(Longer), training=1, running_var_correction=1, eps=1e-5, momentum=0.1)
    assert LIB.pybn_forward_v2(view, addr(x), addr(y), ctypes.byref(longer)) == SUCCESS  # zero tail: fine
    np.testing.assert_array_equal(y, 0)
    y[...] = 7
    longer.future_option = 1
    assert LIB.pybn_forward_v2(view, addr(x), addr(y), ctypes.byref(longer)) == INVALID_ARGUMENT
    assert f"sets a field at byte {ctypes.sizeof(ForwardParams)}" in last_error()
    np.testing.assert_array_equal(y, 7)


@pytest.mark.parametrize("field,value,status,message", [
    ("running_var_correction", 2, INVALID_VALUE, "running_var_correction must be 0 or 1, got 2"),
    ("training", 5, INVALID_VALUE, "training must be 0 or 1, got 5"),
    ("eps", -1.0, INVALID_VALUE, "eps must be a finite number >= 0"),
    ("activation", 7, INVALID_VALUE, "activation must be PYBN_ACTIVATION_NONE (0) or PYBN_ACTIVATION_RELU (1)"),
    ("reserved", 1, INVALID_ARGUMENT, "reserved must be 0"),
])
def test_v2_forward_field_checks(field, value, status, message):
    x = np.ones((2, 3, 4), np.float32)
    y = np.full_like(x, 7)
    p = forward_params(**{field: value})
    assert LIB.pybn_forward_v2(View(2, 3, 4, 0), addr(x), addr(y), ctypes.byref(p)) == status
    assert message in last_error()
    np.testing.assert_array_equal(y, 7)


def test_v2_backward_field_checks():
    x = np.ones((2, 3, 4), np.float32)
    one = np.ones(3, np.float32)
    dx = np.full_like(x, 7)
    p = backward_params(mean=one, invstd=one, activation=3)
    assert LIB.pybn_backward_v2(View(2, 3, 4, 0), addr(x), addr(x), addr(dx), ctypes.byref(p)) == INVALID_VALUE
    assert "activation must be PYBN_ACTIVATION_NONE (0) or PYBN_ACTIVATION_RELU (1), got 3" in last_error()
    p = backward_params(mean=one, invstd=one, activation=1)  # ReLU without y
    assert LIB.pybn_backward_v2(View(2, 3, 4, 0), addr(x), addr(x), addr(dx), ctypes.byref(p)) == INVALID_ARGUMENT
    assert "y must not be NULL" in last_error()
    p = backward_params(mean=one, invstd=one, sum_dy=np.zeros(3))  # given sums: sum_dy_xmu missing
    assert LIB.pybn_backward_v2(View(2, 3, 4, 0), addr(x), addr(x), addr(dx), ctypes.byref(p)) == INVALID_ARGUMENT
    assert "sum_dy_xmu must not be NULL" in last_error()
    np.testing.assert_array_equal(dx, 7)


def test_cuda_workspace_queries_need_no_gpu():
    n = ctypes.c_size_t(123)
    view = View(32, 64, 3136, 0)
    st = LIB.pybn_cuda_forward_workspace_size(view, ctypes.byref(forward_params()), ctypes.byref(n))
    if not pybn.has_cuda():
        assert st == NOT_COMPILED
        return
    assert st == SUCCESS, last_error()
    train = n.value
    # 4 x 64 float coefficients; then 64 channels x 25 partials (cuda/plan.hpp: blocks of
    # floor_pow2(6422528 / 1056) = 4096 values, ceil(32 * 3136 / 4096) = 25 a channel) of 32-byte
    # Moments; then 64 ticket counters (4 B), each region aligned to 256 bytes
    assert train == 1024 + 64 * 25 * 32 + 64 * 4
    LIB.pybn_cuda_forward_workspace_size(view, ctypes.byref(forward_params(training=0)), ctypes.byref(n))
    assert n.value == 1024
    LIB.pybn_cuda_backward_workspace_size(view, ctypes.byref(backward_params()), ctypes.byref(n))
    assert n.value == 1024 + 64 * 25 * 24 + 64 * 4  # 24-byte Sums
    LIB.pybn_cuda_reduce_workspace_size(view, ctypes.byref(n))
    assert n.value == 64 * 25 * 32 + 64 * 4
    for shape in [(4, 3, 0), (0, 3, 5), (3, 0, 4), (1 << 20, 7, 1)]:  # empty sizes divide by nothing
        assert LIB.pybn_cuda_reduce_workspace_size(View(*shape, 0), ctypes.byref(n)) == SUCCESS
    # a workspace that is too small is refused before anything runs (no GPU touched)
    x = np.ones((32, 64, 3136), np.float32)
    st = LIB.pybn_cuda_forward_v2(view, addr(x), addr(x), ctypes.byref(forward_params()), None, 0, None)
    assert st != SUCCESS


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_level_1_program_built_against_the_level_1_header_runs_unchanged(tmp_path):
    """examples/c/train_step_v1.c compiled with the frozen level-1 header (tests/c/abi_v1) and
    linked against this library: the binary compatibility promise."""
    exe = tmp_path / "train_step_v1"
    libdir = os.path.dirname(LIB_PATH)
    subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", f"-I{HERE / 'c' / 'abi_v1'}",
                    str(HERE.parent / "examples" / "c" / "train_step_v1.c"), f"-L{libdir}", "-lpybn", "-lm",
                    f"-Wl,-rpath,{libdir}", "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout


INJECT = textwrap.dedent("""
    import sys, numpy as np, pybn
    shape, axis, op, vb = eval(sys.argv[1])
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    before = x.copy()
    C = shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    try:
        if op == "forward":
            pybn.batchnorm(x, None, None, rm, rv, axis=axis, out=x, virtual_batch=vb)
        else:
            dy = rng.standard_normal(shape).astype(np.float32)
            dyb = dy.copy()
            y, mean, invstd = pybn.batchnorm_forward(before, axis=axis, virtual_batch=vb)
            x = dy  # in place: dx overwrites dy
            before = dyb
            pybn.batchnorm_backward(dy, y, mean, invstd, axis=axis, out=dy)
    except MemoryError as e:
        ok = x.tobytes() == before.tobytes() and (rm == 0).all() and (rv == 1).all()
        print("FAILED-CLEAN" if ok else "FAILED-DIRTY", e)
    else:
        print("SUCCEEDED")
""")


@pytest.mark.parametrize("shape,axis,op,vb", [
    ((4, 6, 3000), 1, "forward", None),   # row path, channel groups (small cache budget)
    ((2000, 12), 1, "forward", None),     # column path
    ((4, 6, 3000), 1, "backward", None),
    ((300, 4, 4, 8), -1, "backward", None),
    ((4, 8, 3000), 1, "forward", None),   # per-core channel blocks (C = 8 on 2 threads)
    ((4, 8, 3000), 1, "backward", None),
    ((8, 6, 3000), 1, "forward", 2),      # ghost batches: every group reduced before any write
    ((2000, 12), 1, "forward", 500),
    ((8, 6, 3000), 1, "backward", 2),
    ((300, 4, 4, 8), -1, "backward", 100),
])
def test_allocation_failure_mid_call_changes_nothing(shape, axis, op, vb):
    """PYBN_FAIL_SCRATCH=k fails the k-th scratch allocation; for every k until the call
    succeeds, an in-place call raises MemoryError and leaves x (or dy) and the running statistics
    exactly as they were."""
    env = dict(os.environ, PYBN_CACHE_BUDGET="20000", OMP_NUM_THREADS="2")
    seen = []
    for k in range(1, 40):
        env["PYBN_FAIL_SCRATCH"] = str(k)
        out = subprocess.run([sys.executable, "-c", INJECT, repr((shape, axis, op, vb))], env=env, capture_output=True,
                             text=True, cwd=HERE)
        assert out.returncode == 0, out.stderr[-2000:]
        word = out.stdout.split()[0]
        seen.append(word)
        assert word != "FAILED-DIRTY", f"k={k}: {out.stdout}"
        if word == "SUCCEEDED":
            break
    assert seen[-1] == "SUCCEEDED" and seen.count("FAILED-CLEAN") >= 2, seen
