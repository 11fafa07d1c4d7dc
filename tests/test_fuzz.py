"""Fuzzing (tests/fuzz/fuzz_pybn.py): every kept corpus input replayed as a regression test, then
the fuzzer itself (atheris) for a bounded time (PYBN_FUZZ_SECONDS, default 60) on a copy of the
corpus. Its rules: only TypeError/ValueError escape, a failed call changes nothing, corrupted C
calls return an error status and write nothing, benign float64 results match NumPy."""
import ctypes
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fuzz"))
import fuzz_pybn  # noqa: E402

CORPUS = sorted((HERE / "fuzz" / "corpus").iterdir())


def test_corpus_is_kept():
    assert len(CORPUS) >= 50


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name[:12])
def test_corpus_input(path):
    fuzz_pybn.TestOneInput(path.read_bytes())


def test_channels_zero_and_overflowing_counts_are_handled():
    """Regressions the fuzzer found: a zero-size channel axis with values in the other axes
    divided by zero in the CPU kernels (SIGFPE); a view with 0 channels and an outer x inner
    that overflows int64 passed the size check."""
    import numpy as np
    import pybn

    for shape, axis in (((0, 3), 0), ((2, 0), 1), ((3, 0, 4), 1), ((2, 0), -1)):
        x = np.zeros(shape, np.float16)
        count, mean, m2 = pybn.batch_stats(x, axis=axis)
        assert count.shape == (0,)
        assert pybn.batchnorm(x, axis=axis).shape == shape
        dx, dg, db = pybn.batchnorm_backward(x, x, np.zeros(0, np.float32), np.zeros(0, np.float32), axis=axis)
        assert dx.shape == shape and dg.shape == (0,)
    lib, View = fuzz_pybn.LIB, fuzz_pybn.View
    d = np.zeros(1)
    assert lib.pybn_batch_stats(View(1 << 40, 0, 1 << 40, 0), d.ctypes.data, d.ctypes.data,
                                d.ctypes.data, d.ctypes.data) == 1
    lib.pybn_last_error.restype = ctypes.c_char_p
    assert b"overflows" in lib.pybn_last_error()


@pytest.mark.skipif(sys.platform != "linux", reason="atheris wheels: Linux")
def test_fuzz_for_a_bounded_time(tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    seconds = int(os.environ.get("PYBN_FUZZ_SECONDS", "60"))
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "fuzz" / "corpus", corpus)
    run = subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "fuzz_pybn.py"), f"-max_total_time={seconds}",
         "-rss_limit_mb=6144", "-max_len=1024", "-timeout=60", f"-artifact_prefix={tmp_path}/",
         str(corpus)], capture_output=True, text=True, timeout=seconds + 600, cwd=tmp_path)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert run.returncode == 0 and not found, (
        f"the fuzzer found {found} (exit {run.returncode}); add them to tests/fuzz/corpus:\n"
        + run.stderr[-4000:])
    assert "Done" in run.stderr, run.stderr[-2000:]
