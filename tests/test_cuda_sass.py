"""The CUDA kernels' machine code, checked without a GPU (issue 15's "fast by design" checks).

On a build with CUDA (``PYBN_CUDA`` found nvcc), ``cuobjdump`` (the ``nvidia-cuda-cuobjdump``
wheel of the test extra, or a CUDA toolkit's) reads the sm_90 code of the installed libpybn:

- no kernel has a stack frame or local memory: ptxas spilled nothing, under the register budgets
  of ``__launch_bounds__`` (cuda/common.cuh);
- the vectorised instantiations of the hot kernels (elementwise sweep, both reductions) move data
  with 128-bit loads and stores (64-bit in channels-last 16-bit reductions, 4 channels a thread),
  at least kUnroll = 4 of them in each (the independent loads a thread issues together);
- no kernel contains the 64-bit integer division routine (its ``I2F.U64.RP`` reciprocal): every
  index comes from a walk of additions, the few divisions from host-computed multipliers.

Skipped, with the reason, on a build without CUDA or without cuobjdump.
"""
import collections
import glob
import os
import pathlib
import re
import shutil
import subprocess

import pytest

import pybn


def _cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        return None
    for root in nvidia.__path__:
        for hit in sorted(glob.glob(os.path.join(root, "*", "bin", "cuobjdump"))):
            return hit
    return None


def _library():
    libs = sorted(pathlib.Path(pybn.get_library_dir()).glob("libpybn.so*"))
    return str(libs[0]) if libs else None


@pytest.fixture(scope="module")
def sass():
    tool, lib = _cuobjdump(), _library()
    if tool is None:
        pytest.skip("needs cuobjdump (pip install nvidia-cuda-cuobjdump, part of the test extra)")
    if lib is None:
        pytest.skip("libpybn.so not found (not a Linux build)")
    elves = subprocess.run([tool, "-lelf", lib], capture_output=True, text=True)
    if "sm_90" not in elves.stdout:
        pytest.skip("this libpybn has no sm_90 CUDA code (built without CUDA, or for other GPUs)")
    code = subprocess.run([tool, "-sass", "-arch", "sm_90", lib], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([tool, "-res-usage", "-arch", "sm_90", lib], capture_output=True, text=True,
                           check=True).stdout
    functions = {}
    for chunk in re.split(r"\n\s*Function : ", code)[1:]:
        name, body = chunk.split("\n", 1)
        functions[name.strip()] = body
    assert len(functions) > 50, "expected the CUDA kernels in the library"
    return functions, usage


def test_no_kernel_spills_or_uses_local_memory(sass):
    _, usage = sass
    entries = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert len(entries) > 50
    bad = [(name[:90], stack, local) for name, _, stack, _, local in entries if stack != "0" or local != "0"]
    assert not bad, f"kernels with a stack frame or local memory (spills): {bad}"
    # and every kernel fits the register budget of its launch bounds (2 blocks of 256: 128)
    assert max(int(reg) for _, reg, _, _, _ in entries) <= 255


# dtype mangling -> the vector width of its 16-byte units (rows and elementwise) and of its
# channels-last reduction units
WIDTH = {"f": (4, 4), "d": (2, 2), "6__half": (8, 4), "13__nv_bfloat16": (8, 4)}


def _kernels(functions, family, reducer, dtype, vec):
    pat = {
        "reduce_rows": rf"reduce_rowsINS0_\d+{reducer}I{dtype}EELi{vec}E",
        "reduce_cols": rf"reduce_colsINS0_\d+{reducer}I{dtype}EELi{vec}E",
        "elementwise": rf"elementwiseILi{vec}ELb[01]E\w*?{reducer}I{dtype}EE",
    }[family]
    return {n: b for n, b in functions.items() if re.search(pat, n)}


@pytest.mark.parametrize("dtype", list(WIDTH))
@pytest.mark.parametrize("family,reducer", [("reduce_rows", "StatsReducer"), ("reduce_rows", "SumsReducer"),
                                            ("reduce_cols", "StatsReducer"), ("reduce_cols", "SumsReducer"),
                                            ("elementwise", "NormalizeOp"), ("elementwise", "BackwardOp")])
def test_hot_kernels_use_wide_loads(sass, family, reducer, dtype):
    functions, _ = sass
    rows_vec, cols_vec = WIDTH[dtype]
    vec = cols_vec if family == "reduce_cols" else rows_vec
    kernels = _kernels(functions, family, reducer, dtype, vec)
    assert kernels, f"no {family} kernel of {reducer}<{dtype}> with {vec}-value units"
    wide = "LDG.E.64" if family == "reduce_cols" and dtype in ("6__half", "13__nv_bfloat16") else "LDG.E.128"
    for name, body in kernels.items():
        ops = collections.Counter(re.findall(r"\b(LDG\.E[.A-Z0-9]*|STG\.E[.A-Z0-9]*)", body))
        assert ops[wide] >= 4, f"{name[:100]}: {dict(ops)}"
        if family == "elementwise":
            assert ops["STG.E.128"] >= 1, f"{name[:100]}: {dict(ops)}"


def test_no_64_bit_integer_division_in_any_kernel(sass):
    functions, _ = sass
    dividing = [name[:100] for name, body in functions.items() if "I2F.U64.RP" in body]
    assert not dividing, f"kernels calling the 64-bit division routine: {dividing}"
