import zlib

import numpy as np
import pytest

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 tests are skipped without ml_dtypes
    BFLOAT16 = None

FLOAT_DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)] + (
    [BFLOAT16] if BFLOAT16 is not None else [])

# Tolerance per dtype: float64 and float32 per the project's accuracy targets; 16-bit types are
# bounded by rounding of the stored result (2 units of their epsilon).
TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 2 * 2.0 ** -10, "bfloat16": 2 * 2.0 ** -7}


def tol(dtype):
    return TOL[np.dtype(dtype).name]


def assert_close(actual, expected, dtype, scale=None, what=""):
    """|actual - expected| <= tol * (1 + |expected|) elementwise; reports the first mismatches.
    `scale` replaces |expected| for quantities that are sums (tolerance relative to their size)."""
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    bound = tol(dtype) * (1.0 + (np.abs(e) if scale is None else scale))
    bad = ~(np.abs(a - e) <= bound)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = ", ".join(f"{tuple(i)}: {a[tuple(i)]!r} vs {e[tuple(i)]!r}" for i in idx)
        pytest.fail(f"{what}: {int(bad.sum())} of {a.size} values off (tol {tol(dtype)}): {rows}")


@pytest.fixture
def rng(request):
    # a fresh, reproducible stream per test
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def randn(rng, shape, dtype, loc=0.0, scale=1.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)
