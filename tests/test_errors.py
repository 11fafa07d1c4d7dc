"""Every error path of the contract: the exception type, a message naming the argument with the
expected and received value, and nothing changed in any array the call was given."""
import numpy as np
import pytest

import pybn


class FakeCudaArray:
    """Looks like a CUDA array to pybn (only __cuda_array_interface__ is consulted)."""

    def __init__(self, shape):
        self.shape = shape
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (0, False), "version": 3}


def fresh():
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((4, 3, 5)).astype(np.float32),
        gamma=np.ones(3, np.float32), beta=np.zeros(3, np.float32),
        running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
    )


def ro(a):
    a.flags.writeable = False
    return a


# (id, function, kwargs change, exception, message regex)
FORWARD_CASES = [
    ("x-list", {"x": [[1.0, 2.0], [3.0, 4.0]]}, TypeError, r"x must be a NumPy array.*got builtins.list"),
    ("x-int", {"x": np.ones((4, 3), np.int32)}, TypeError, r"x must have dtype .*got int32"),
    ("x-complex", {"x": np.ones((4, 3), np.complex64)}, TypeError, r"got complex64"),
    ("x-big-endian", {"x": np.ones((4, 3), ">f4")}, TypeError, r"x must have dtype .*native byte order.*got float32 in non-native byte order \(>f4\)"),
    ("x-1d", {"x": np.ones(5, np.float32)}, ValueError, r"at least 2 dimensions, got shape \(5,\)"),
    ("axis-range", {"axis": 3}, ValueError, r"axis must be in \[-3, 3\).*got 3"),
    ("axis-type", {"axis": 1.0}, TypeError, r"axis must be an int, got float"),
    ("gamma-shape", {"gamma": np.ones(4, np.float32)}, ValueError, r"gamma must have shape \(3,\).*got \(4,\)"),
    ("gamma-2d", {"gamma": np.ones((3, 1), np.float32)}, ValueError, r"gamma must have shape \(3,\).*got \(3, 1\)"),
    ("gamma-dtype", {"gamma": np.ones(3, np.float64)}, TypeError, r"gamma must have dtype float32.*got float64"),
    ("gamma-big-endian", {"gamma": np.ones(3, ">f4")}, TypeError, r"gamma must have dtype float32.*got float32 in non-native byte order"),
    ("running-var-big-endian", {"running_var": np.ones(3, ">f4")}, TypeError, r"running_var must have dtype float32.*got float32 in non-native"),
    ("beta-list", {"beta": [0.0, 0.0, 0.0]}, TypeError, r"beta must be a NumPy array"),
    ("running-var-shape", {"running_var": np.ones(2, np.float32)}, ValueError, r"running_var must have shape \(3,\).*got \(2,\)"),
    ("running-mean-ro", {"running_mean": ro(np.zeros(3, np.float32))}, ValueError, r"running_mean is read-only"),
    ("eps-negative", {"eps": -1e-5}, ValueError, r"eps must be a finite number >= 0, got -1e-05"),
    ("eps-nan", {"eps": float("nan")}, ValueError, r"eps must be .*got nan"),
    ("eps-type", {"eps": "1e-5"}, TypeError, r"eps must be a real number, got str"),
    ("momentum-high", {"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    ("momentum-low", {"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\], got -0.1"),
    ("momentum-nan", {"momentum": float("nan")}, ValueError, r"momentum must be in \[0, 1\], got nan"),
    ("one-value", {"x": np.ones((1, 3), np.float32)}, ValueError, r"at least 2 values per channel, got 1"),
    ("one-value-4d", {"x": np.ones((1, 3, 1, 1), np.float32)}, ValueError, r"at least 2 values per channel, got 1"),
    ("out-shape", {"out": np.empty((4, 3, 6), np.float32)}, ValueError, r"out must have the shape of x \(4, 3, 5\), got \(4, 3, 6\)"),
    ("out-dtype", {"out": np.empty((4, 3, 5), np.float64)}, TypeError, r"out must have the dtype of x \(float32\), got float64"),
    ("out-big-endian", {"out": np.empty((4, 3, 5), ">f4")}, TypeError, r"out must have the dtype of x \(float32\), got float32 in non-native byte order"),
    ("out-ro", {"out": ro(np.empty((4, 3, 5), np.float32))}, ValueError, r"out is read-only"),
    ("out-list", {"out": []}, TypeError, r"out must be a NumPy array"),
    ("mixed-devices", {"gamma": FakeCudaArray((3,))}, TypeError, r"same device.*x on cpu, gamma on cuda"),
    ("training-type", {"training": "yes"}, TypeError, r"training must be a bool, got str"),
]


def _snapshot(kw):
    return {k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray)}


def _unchanged(kw, snap):
    for k, before in snap.items():
        np.testing.assert_array_equal(kw[k], before, err_msg=f"{k} changed by a failed call")


@pytest.mark.parametrize("fn", [pybn.batchnorm, pybn.batchnorm_forward])
@pytest.mark.parametrize("change,exc,msg", [c[1:] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
def test_forward_errors(fn, change, exc, msg):
    kw = fresh()
    kw.update(change)
    if "out" in change and isinstance(change["out"], np.ndarray) and change["out"].flags.writeable:
        change["out"][...] = 7
    snap = _snapshot(kw)
    x = kw.pop("x")
    with pytest.raises(exc, match=msg):
        fn(x, **kw)
    kw["x"] = x
    _unchanged(kw, snap)


def test_inference_needs_running_stats():
    kw = fresh()
    with pytest.raises(ValueError, match="running_mean and running_var are required when training=False"):
        pybn.batchnorm(kw["x"], kw["gamma"], kw["beta"], training=False)
    with pytest.raises(ValueError, match="required when training=False"):
        pybn.batchnorm(kw["x"], running_mean=kw["running_mean"], training=False)


def test_out_overlapping_an_input_is_refused():
    kw = fresh()
    x = kw["x"]
    snap = x.copy()
    with pytest.raises(ValueError, match="out overlaps the input x"):
        pybn.batchnorm(x[:, :, :4], out=x[:, :, 1:])
    np.testing.assert_array_equal(x, snap)


def _backward_args():
    kw = fresh()
    x = kw["x"]
    _, mean, invstd = pybn.batchnorm_forward(x, kw["gamma"])
    return dict(dy=np.ones_like(x), x=x, mean=mean, invstd=invstd, gamma=kw["gamma"])


BACKWARD_CASES = [
    ("dy-dtype", {"dy": np.ones((4, 3, 5), np.float64)}, TypeError, r"dy must have the dtype of x \(float32\), got float64"),
    ("dy-big-endian", {"dy": np.ones((4, 3, 5), ">f4")}, TypeError, r"dy must have the dtype of x \(float32\), got float32 in non-native byte order"),
    ("dy-shape", {"dy": np.ones((4, 3, 6), np.float32)}, ValueError, r"dy must have the shape of x \(4, 3, 5\), got \(4, 3, 6\)"),
    ("mean-shape", {"mean": np.zeros(4, np.float32)}, ValueError, r"mean must have shape \(3,\).*got \(4,\)"),
    ("invstd-dtype", {"invstd": np.ones(3, np.float64)}, TypeError, r"invstd must have dtype float32.*got float64"),
    ("mean-none", {"mean": None}, ValueError, r"mean and invstd are required"),
    ("gamma-shape", {"gamma": np.ones(2, np.float32)}, ValueError, r"gamma must have shape \(3,\).*got \(2,\)"),
    ("out-shape", {"out": np.empty((3, 3, 5), np.float32)}, ValueError, r"out must have the shape of x"),
    ("out-overlap", {"out": "dy-reversed"}, ValueError, r"out overlaps the input dy"),
    ("no-value", {"x": np.ones((0, 3), np.float32), "dy": np.ones((0, 3), np.float32)}, ValueError,
     r"at least 1 value per channel, got 0"),
    ("mixed", {"dy": FakeCudaArray((4, 3, 5))}, TypeError, r"same device"),
]


@pytest.mark.parametrize("change,exc,msg", [c[1:] for c in BACKWARD_CASES], ids=[c[0] for c in BACKWARD_CASES])
def test_backward_errors(change, exc, msg):
    kw = _backward_args()
    change = dict(change)
    if isinstance(change.get("out"), str):  # a view of dy in another layout: not exact in place
        change["out"] = kw["dy"][::-1]
    kw.update(change)
    snap = _snapshot(kw)
    args = [kw.pop(k) for k in ("dy", "x", "mean", "invstd")]
    with pytest.raises(exc, match=msg):
        pybn.batchnorm_backward(*args, **kw)
    kw.update(dict(zip(("dy", "x", "mean", "invstd"), args)))
    _unchanged(kw, snap)


def test_float64_x_needs_float64_parameters():
    x = np.ones((4, 3), np.float64)
    with pytest.raises(TypeError, match=r"gamma must have dtype float64 \(per-channel dtype for float64 x\), got float32"):
        pybn.batchnorm(x, np.ones(3, np.float32))


def test_cuda_arrays_are_refused_clearly_without_cuda_or_cupy():
    if not pybn.has_cuda():
        with pytest.raises(TypeError, match="CUDA arrays are not supported by this pybn build"):
            pybn.batchnorm(FakeCudaArray((4, 3)))
        return
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(TypeError, match=r"CUDA arrays need CuPy: pip install 'pybn-kernels\[cuda12\]'"):
            pybn.batchnorm(FakeCudaArray((4, 3)))
        return
    pytest.skip("CUDA build with CuPy: GPU behaviour is tested in test_gpu.py")


def test_merge_stats_without_an_array_is_a_type_error():
    m = np.zeros((2, 3))
    for args in ((None, m, m), (m, None, m), (m, m, None)):
        with pytest.raises(TypeError, match="is required: a \\(K, C\\) float64 array"):
            pybn.merge_stats(*args)
