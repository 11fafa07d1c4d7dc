"""The C library and its C-level tests (tests/c/hardening.c: bad-call table, every entry point
repeatedly, non-finite policy, threads) built with AddressSanitizer + UndefinedBehaviorSanitizer
(LeakSanitizer included) and run clean on every instruction-set path and thread count."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("cc") is None,
                                reason="needs cmake and a C compiler")


@pytest.fixture(scope="module")
def hardening(tmp_path_factory):
    build = tmp_path_factory.mktemp("sanitize")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DPYBN_CUDA=OFF",
                          "-DPYBN_BUILD_TESTS=ON", "-DPYBN_SANITIZE=address,undefined",
                          "-DCMAKE_BUILD_TYPE=RelWithDebInfo"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    b = subprocess.run(["cmake", "--build", str(build), "--parallel"], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    exe = build / "pybn_hardening"
    assert exe.exists()
    return exe


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512", ""])
@pytest.mark.parametrize("threads", ["1", "3"])
def test_c_tests_clean_under_asan_ubsan(hardening, isa, threads):
    import pybn
    if isa and isa not in pybn.cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, OMP_NUM_THREADS=threads,
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=23",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    if isa:
        env["PYBN_CPU_ISA"] = isa
    else:
        env.pop("PYBN_CPU_ISA", None)
    run = subprocess.run([str(hardening)], capture_output=True, text=True, env=env, timeout=600)
    report = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, report
    assert "LeakSanitizer" not in run.stderr, report
    checks, failures = run.stdout.split()[0], run.stdout.split()[2]
    assert int(checks) > 2000 and failures == "0", report
