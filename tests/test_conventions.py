"""Every framework's BN convention, expressed exactly with pybn: the running-variance correction
(unbiased for PyTorch / cuDNN, biased for ONNX, ONNX Runtime, Keras/TF, Flax, PaddlePaddle), the
momentum convention (pybn's m = 1 - theirs), eps defaults, one value per channel; each checked
against a float64 reference written from the framework's documented formula, and against the real
thing where it installs (ONNX Runtime; PyTorch when present). docs/conventions.md is the table."""
import numpy as np
import pytest

import pybn

from conftest import FLOAT_DTYPES


def f64_stats(x, axis):
    """float64 batch mean, biased and unbiased variance per channel (x of any dtype)."""
    a = np.moveaxis(np.asarray(x).astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    n = a.shape[1]
    mean = a.mean(axis=1)
    m2 = ((a - mean[:, None]) ** 2).sum(axis=1)
    return mean, m2 / n, (m2 / (n - 1) if n > 1 else np.full_like(m2, np.nan)), n


def ulp_equal(actual, expected, what):
    """float32 results: the float64 reference rounded to float32, within 4 ulps (pybn's float32
    accumulation runs, README "Numerics"). float64 results: within 1e-13 relative (pybn and
    NumPy sum float64 data in different orders)."""
    exp = np.asarray(expected).astype(actual.dtype)
    gap = np.abs(actual.astype(np.float64) - exp.astype(np.float64))
    if actual.dtype == np.float64:
        ok = gap <= 1e-13 * np.abs(exp)
    else:
        ok = gap <= 4 * np.spacing(np.abs(exp)).astype(np.float64)
    assert ok.all(), f"{what}: {np.flatnonzero(~ok)[:5]} differ by more than 1 ulp: {actual[~ok][:3]} vs {exp[~ok][:3]}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((8, 5, 7, 3), 1), ((6, 4, 4, 5), -1), ((64, 9), 1), ((3, 7, 40), 1)])
@pytest.mark.parametrize("correction", [0, 1])
def test_running_var_correction_matches_the_float64_reference(rng, dtype, shape, axis, correction):
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    C = shape[axis]
    pd = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rm0, rv0 = rng.standard_normal(C).astype(pd), rng.uniform(0.5, 2, C).astype(pd)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = pybn.batchnorm_forward(x, None, None, rm, rv, momentum=0.25, axis=axis,
                                             running_var_correction=correction)
    # the update rule, bit for bit: the float64 formula on pybn's own float64 batch statistics,
    # rounded once to the parameter dtype
    count, smean, m2 = pybn.batch_stats(x, axis=axis)
    np.testing.assert_array_equal(rm, ((1 - 0.25) * rm0.astype(np.float64) + 0.25 * smean).astype(pd))
    np.testing.assert_array_equal(rv, ((1 - 0.25) * rv0.astype(np.float64)
                                       + 0.25 * (m2 / (count - correction))).astype(pd))
    # and against a two-pass float64 reference of the statistics, to float32 rounding (pybn's
    # float32 runs cost at most a few float32 ulps of the variance)
    mu, var_b, var_u, n = f64_stats(x, axis)
    batch_var = var_b if correction == 0 else var_u
    ulp_equal(rm, 0.75 * rm0.astype(np.float64) + 0.25 * mu, "running_mean")
    ulp_equal(rv, 0.75 * rv0.astype(np.float64) + 0.25 * batch_var, "running_var")
    # normalisation always uses the biased variance, whatever the correction
    ulp_equal(invstd, 1 / np.sqrt(var_b + 1e-5), "invstd")


def test_default_convention_is_pytorchs_and_the_two_differ_by_n_over_n_minus_1(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float64)
    rv1, rv0 = np.zeros(3), np.zeros(3)
    pybn.batchnorm(x, running_mean=np.zeros(3), running_var=rv1, momentum=1.0)
    pybn.batchnorm(x, running_mean=np.zeros(3), running_var=rv0, momentum=1.0, running_var_correction=0)
    np.testing.assert_allclose(rv1, rv0 * 20 / 19, rtol=1e-14)


@pytest.mark.parametrize("axis,shape", [(1, (1, 4)), (1, (1, 4, 1, 1)), (-1, (1, 1, 4))])
def test_one_value_per_channel(axis, shape):
    x = np.arange(1, 5, dtype=np.float32).reshape(shape)
    beta = np.array([0.5, -1, 2, 3], np.float32)
    gamma = np.full(4, 3.0, np.float32)
    # no running statistics, or a biased running_var: valid, y = beta (the variance is 0)
    np.testing.assert_array_equal(pybn.batchnorm(x, gamma, beta, axis=axis).reshape(-1), beta)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y, mean, invstd = pybn.batchnorm_forward(x, gamma, beta, rm, rv, axis=axis, momentum=0.5,
                                             running_var_correction=0)
    np.testing.assert_array_equal(y.reshape(-1), beta)
    np.testing.assert_array_equal(mean, [1, 2, 3, 4])
    np.testing.assert_array_equal(rm, 0.5 * np.arange(1, 5))
    np.testing.assert_array_equal(rv, 0.5)  # (1 - m) * 1 + m * 0
    dx, dgamma, dbeta = pybn.batchnorm_backward(np.ones_like(x), x, mean, invstd, gamma, axis=axis)
    np.testing.assert_array_equal(dx, 0)  # one value: y does not depend on x
    np.testing.assert_array_equal(dbeta, 1)
    # PyTorch's unbiased update needs two values: an error, and nothing changes
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="at least 2 values per channel, got 1.*running_var_correction"):
        pybn.batchnorm(x, None, None, rm, rv, axis=axis)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    # a running mean alone does not need the variance
    rm = np.zeros(4, np.float32)
    pybn.batchnorm(x, None, None, rm, None, axis=axis, momentum=1.0)
    np.testing.assert_array_equal(rm, [1, 2, 3, 4])


def test_normalize_primitive_and_layer_take_the_correction(rng):
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    count, mean, m2 = pybn.batch_stats(x)
    rv = np.ones(3, np.float32)
    pybn.normalize(x, count, mean, m2, running_var=rv, momentum=1.0, running_var_correction=0)
    ulp_equal(rv, m2 / count, "normalize running_var")
    one = pybn.batch_stats(x[:1, :, :1])
    with pytest.raises(ValueError, match=r"count\[0\] must be >= 2"):
        pybn.normalize(x[:1, :, :1], *one, running_var=rv)
    pybn.normalize(x[:1, :, :1], *one, running_var=rv, running_var_correction=0)
    bn = pybn.BatchNorm(3, running_var_correction=0, momentum=1.0)
    bn(x)
    ulp_equal(bn.running_var, m2 / count, "layer running_var")
    assert "running_var_correction=0" in repr(bn)
    pybn.BatchNorm(3, running_var_correction=0)(x[:1, :, :1])  # one value: fine when biased
    with pytest.raises(ValueError, match="running_var_correction must be 0"):
        pybn.BatchNorm(3, running_var_correction=2)
    with pytest.raises(TypeError, match="running_var_correction must be the int"):
        pybn.batchnorm(x, running_var_correction=1.0)


# ---- each framework's documented update rule, in its own terms, as one pybn call ----------------

def framework_steps(rng, *, momentum_theirs, eps, their_momentum_is_running_weight, biased, steps=50):
    """Runs `steps` training steps through pybn with the framework's settings mapped per
    docs/conventions.md, and the framework's documented formula in float64 beside it."""
    C = 4
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    ref_m, ref_v = np.zeros(C), np.ones(C)
    m = momentum_theirs
    pybn_m = 1 - m if their_momentum_is_running_weight else m
    worst = 0.0
    for _ in range(steps):
        x = (rng.standard_normal((16, C, 3)) * 3 + 7).astype(np.float32)
        y = pybn.batchnorm(x, None, None, rm, rv, momentum=pybn_m, eps=eps,
                           running_var_correction=0 if biased else 1)
        mu, var_b, var_u, _ = f64_stats(x, 1)
        if their_momentum_is_running_weight:  # Keras / Flax / Paddle / ONNX: running * m + batch * (1 - m)
            ref_m = ref_m * m + mu * (1 - m)
            ref_v = ref_v * m + (var_b if biased else var_u) * (1 - m)
        else:  # PyTorch: (1 - m) * running + m * batch
            ref_m = (1 - m) * ref_m + m * mu
            ref_v = (1 - m) * ref_v + m * (var_b if biased else var_u)
        y_ref = (x - mu[None, :, None]) / np.sqrt(var_b[None, :, None] + eps)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        worst = max(worst, float(np.max(np.abs(rv - ref_v) / ref_v)))
        np.testing.assert_allclose(rm, ref_m, rtol=1e-5, atol=1e-6)
    return worst


@pytest.mark.parametrize("name,m,eps,biased,running_weight", [
    ("pytorch", 0.1, 1e-5, False, False),
    ("keras", 0.99, 1e-3, True, True),
    ("flax", 0.99, 1e-5, True, True),
    ("paddle", 0.9, 1e-5, True, True),
    ("onnx", 0.9, 1e-5, True, True),
])
def test_framework_update_rules_over_50_steps(rng, name, m, eps, biased, running_weight):
    worst = framework_steps(rng, momentum_theirs=m, eps=eps, their_momentum_is_running_weight=running_weight,
                            biased=biased)
    assert worst < 5e-6, f"{name}: running_var drifted by {worst:.2e} relative"


def test_onnxruntime_training_mode_batchnormalization(rng):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    C, momentum, eps = 3, 0.9, 1e-5
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"],
                            ["Y", "running_mean", "running_var"], epsilon=eps, momentum=momentum,
                            training_mode=1)
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "bn",
        [helper.make_tensor_value_info(n, f, s) for n, s in
         (("X", [4, C, 5, 2]), ("scale", [C]), ("B", [C]), ("mean", [C]), ("var", [C]))],
        [helper.make_tensor_value_info(n, f, s) for n, s in
         (("Y", [4, C, 5, 2]), ("running_mean", [C]), ("running_var", [C]))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = min(model.ir_version, 8)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # a build without training-mode BatchNormalization
        pytest.skip(f"onnxruntime cannot run training-mode BatchNormalization: {e}")
    x = (rng.standard_normal((4, C, 5, 2)) * 2 + 1).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    y_ort, rm_ort, rv_ort = sess.run(None, {"X": x, "scale": gamma, "B": beta, "mean": rm, "var": rv})
    y = pybn.batchnorm(x, gamma, beta, rm, rv, momentum=1 - momentum, eps=eps, running_var_correction=0)
    np.testing.assert_allclose(y, y_ort, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rm, rm_ort, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rv, rv_ort, rtol=0, atol=1e-6)


def test_pytorch_running_statistics(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((8, 3, 5)).astype(np.float32) * 2 + 3
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    trm, trv = torch.zeros(3), torch.ones(3)
    y = pybn.batchnorm(x, None, None, rm, rv, momentum=0.1)
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True, momentum=0.1)
    np.testing.assert_allclose(y, yt.numpy(), atol=1e-5)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-6)


def test_cpu_dlpack_producers_are_used_zero_copy(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((4, 3, 5)).astype(np.float32))
    rm, rv = torch.zeros(3), torch.ones(3)
    y = pybn.batchnorm(x, None, None, rm, rv)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, pybn.batchnorm(x.numpy()))
    assert float(rv.sum()) != 3.0  # the torch tensors were updated in place
    out = torch.empty(4, 3, 5)
    assert pybn.batchnorm(x, out=out) is out
    np.testing.assert_array_equal(out.numpy(), y)
    y2, mean, invstd = pybn.batchnorm_forward(x)
    dx, _, _ = pybn.batchnorm_backward(torch.ones(4, 3, 5), x, torch.from_numpy(mean), torch.from_numpy(invstd))
    assert isinstance(dx, np.ndarray)
    with pytest.raises(TypeError, match="same device|DLPack|NumPy"):
        pybn.batchnorm(x.requires_grad_())
