"""The pool of large host output buffers (pybn/_pool.py): reuse after release, never while a
result or a view of it is alive, the limit (API and environment), thread safety, and results
bitwise those of the kernels."""
import gc
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import pybn

BIG = (4, 8, 64, 128)  # 1 MiB of float32: the smallest pooled size


@pytest.fixture(autouse=True)
def fresh_pool():
    before = pybn.memory_pool_info()["limit_bytes"]
    pybn.set_memory_pool_limit(0)  # empty it
    pybn.set_memory_pool_limit(256 << 20)
    yield
    gc.collect()
    pybn.set_memory_pool_limit(before)


def address(a):
    return a.__array_interface__["data"][0]


def test_released_output_is_reused(rng):
    x = rng.standard_normal(BIG).astype(np.float32)
    y = pybn.batchnorm(x)
    info = pybn.memory_pool_info()
    assert info["in_use_blocks"] == 1 and info["in_use_bytes"] >= y.nbytes
    first = address(y)
    expected = y.copy()
    del y
    gc.collect()
    assert pybn.memory_pool_info()["kept_blocks"] == 1
    hits = pybn.memory_pool_info()["hits"]
    y2 = pybn.batchnorm(x)
    assert address(y2) == first and pybn.memory_pool_info()["hits"] == hits + 1
    np.testing.assert_array_equal(y2, expected)
    # same bits as a call writing into a NumPy array of its own
    np.testing.assert_array_equal(y2, pybn.batchnorm(x, out=np.empty_like(x)))


def test_memory_still_referenced_is_never_handed_out(rng):
    x = rng.standard_normal(BIG).astype(np.float32)
    y = pybn.batchnorm(x)
    view = y[1:, ::2].T  # a view keeps the buffer
    held = view.copy()
    del y
    gc.collect()
    assert pybn.memory_pool_info()["in_use_blocks"] == 1
    others = [pybn.batchnorm(x * (k + 2)) for k in range(3)]
    assert all(not np.shares_memory(o, view) for o in others)
    np.testing.assert_array_equal(view, held)  # untouched by the later calls
    del view, others
    gc.collect()
    info = pybn.memory_pool_info()
    assert info["in_use_blocks"] == 0 and info["kept_blocks"] >= 1


def test_backward_and_layer_outputs_come_from_the_pool(rng):
    x = rng.standard_normal(BIG).astype(np.float32)
    bn = pybn.BatchNorm(8)
    misses = pybn.memory_pool_info()["misses"]
    for _ in range(4):  # a training loop: y and dx of each step released before the next
        y = bn(x)
        dx = bn.backward(y)
        del y, dx
    info = pybn.memory_pool_info()
    assert info["misses"] - misses <= 3 and info["hits"] >= 5, info


def test_small_outputs_and_a_zero_limit_bypass_the_pool(rng):
    small = rng.standard_normal((4, 3, 5)).astype(np.float32)
    pybn.batchnorm(small)
    assert pybn.memory_pool_info()["in_use_blocks"] == 0
    pybn.set_memory_pool_limit(0)
    x = rng.standard_normal(BIG).astype(np.float32)
    y = pybn.batchnorm(x)
    assert pybn.memory_pool_info()["in_use_blocks"] == 0 and y.flags.owndata  # a plain NumPy array
    del y
    gc.collect()
    assert pybn.memory_pool_info()["kept_bytes"] == 0


def test_limit_caps_the_kept_bytes(rng):
    pybn.set_memory_pool_limit(3 << 20)  # one 2 MiB block fits, two do not
    x = rng.standard_normal(BIG).astype(np.float32)
    ys = [pybn.batchnorm(x) for _ in range(3)]
    del ys
    gc.collect()
    info = pybn.memory_pool_info()
    assert info["kept_blocks"] == 1 and info["kept_bytes"] <= 3 << 20
    pybn.set_memory_pool_limit(0)
    assert pybn.memory_pool_info()["kept_bytes"] == 0


def test_limit_argument_errors():
    with pytest.raises(TypeError, match="nbytes must be an int"):
        pybn.set_memory_pool_limit(1.5)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        pybn.set_memory_pool_limit(-1)


@pytest.mark.parametrize("value,limit,warns", [("64M", 64 << 20, False), ("0", 0, False), ("2g", 2 << 30, False),
                                               ("lots", None, True)])
def test_environment_variable(value, limit, warns):
    code = "import pybn, json; print(json.dumps(pybn.memory_pool_info()))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYBN_MEMORY_POOL_LIMIT=value))
    assert run.returncode == 0, run.stderr
    import json
    info = json.loads(run.stdout)
    if warns:
        assert "PYBN_MEMORY_POOL_LIMIT must be a number of bytes" in run.stderr
        assert info["limit_bytes"] > 0
    else:
        assert info["limit_bytes"] == limit and run.stderr == ""


def test_threads_never_share_a_buffer(rng):
    xs = [rng.standard_normal(BIG).astype(np.float32) * (k + 1) + k for k in range(4)]
    expected = [pybn.batchnorm(x, out=np.empty_like(x)) for x in xs]
    errors = []

    def work(k):
        for _ in range(20):
            y = pybn.batchnorm(xs[k])
            if not np.array_equal(y, expected[k]):
                errors.append(k)
            del y

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_pooled_outputs_are_private_memory(rng):
    """A pooled block is a private anonymous mapping, as malloc's: Python's mmap defaults to
    MAP_SHARED, which Linux backs with shared memory (no transparent huge pages; kernels wrote it
    10-15 % slower) and a fork would share with the child."""
    x = rng.standard_normal(BIG).astype(np.float32)
    y = pybn.batchnorm(x)
    assert pybn.memory_pool_info()["in_use_blocks"] == 1
    a = address(y)
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= a < hi:
                perms = line.split()[1]
                break
        else:
            pytest.fail("the output's mapping is not in /proc/self/maps")
    assert perms.startswith("rw") and perms[3] == "p", f"pooled output mapped {perms}, not private"
