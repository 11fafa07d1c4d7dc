"""The host side of the CUDA path, checked without a GPU: the launch plans (cuda/plan.hpp, a
C++ test over a table of shapes, including the zero sizes that divided by zero before), the
kernels themselves run on the CPU (tests/c/cuda_emulate.cpp: cuda/kernels.cuh compiled by the
host compiler, a block's threads as fibers), and the CUDA entry points' handling of errors that
need no device (workspace checks and sizes)."""
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("c++") is None or sys.platform != "linux", reason="needs a C++20 compiler and ucontext (Linux)")
def test_cuda_kernels_run_on_the_cpu_and_match_float64(tmp_path):
    """Batch statistics, backward sums (with the ReLU mask) and the elementwise sweep of every
    plan branch (16-byte and scalar units, misaligned data, split rows, channels-last tiles,
    fused and separate stage 2, every dtype), launched as the library launches them."""
    exe = tmp_path / "cuda_emulate"
    subprocess.run(["c++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'cuda'}",
                    f"-I{ROOT / 'cpp' / 'src'}", f"-I{ROOT / 'cpp' / 'include'}",
                    str(ROOT / "tests" / "c" / "cuda_emulate.cpp"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    checks, failures = run.stdout.split()[-4], run.stdout.split()[-2]
    assert int(checks) > 250 and failures == "0", run.stdout


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_launch_plans_for_a_table_of_shapes(tmp_path):
    exe = tmp_path / "cuda_plan"
    subprocess.run(["c++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'cuda'}",
                    f"-I{ROOT / 'cpp' / 'src'}", f"-I{ROOT / 'cpp' / 'include'}",
                    str(ROOT / "tests" / "c" / "cuda_plan.cpp"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    checks, failures = run.stdout.split()[0], run.stdout.split()[2]
    assert int(checks) > 2000 and failures == "0", run.stdout
