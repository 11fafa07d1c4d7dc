"""The CPU-only build (PYBN_CUDA=OFF) next to the installed one: built into a temporary folder
and checked with the whole CPU test suite, so every CI run proves both builds."""
import os
import pathlib
import subprocess
import sys

import pytest

import pybn

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not pybn.has_cuda(), reason="the installed build is already the CPU-only one")
def test_cpu_only_build_passes_the_cpu_tests(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
         "--target", str(target), "-Ccmake.define.PYBN_CUDA=OFF",
         f"-Cbuild-dir={tmp_path / 'build'}", str(ROOT)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = subprocess.run([sys.executable, "-c", "import pybn; print(pybn.has_cuda(), pybn.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.stdout.split()[0] == "False", probe.stdout + probe.stderr
    assert probe.stdout.split()[1].startswith(str(target))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu and not slow",
         "--ignore", str(pathlib.Path(__file__).name), "--ignore", "test_gpu.py",
         "--ignore", "test_sanitizers.py", "--ignore", "test_fuzz.py"],
        capture_output=True, text=True, env=env, cwd=pathlib.Path(__file__).parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout.splitlines()[-1]
