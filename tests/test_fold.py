"""pybn.fold / BatchNorm.fold_into: inference BN folded into the previous layer's weight and bias,
checked against the unfolded pipeline through real convolutions (NumPy correlation, and PyTorch's
conv2d / conv_transpose2d / linear when installed) for every axis convention."""
import numpy as np
import pytest

import pybn


def conv2d_nchw(x, w_oihw):
    """Valid cross-correlation (what conv layers compute), float64."""
    win = np.lib.stride_tricks.sliding_window_view(x, w_oihw.shape[2:], axis=(2, 3))  # N C H' W' kh kw
    return np.einsum("nchwij,ocij->nohw", win, w_oihw)


def bn_infer(y, gamma, beta, rm, rv, eps, axis=1):
    return pybn.batchnorm(np.ascontiguousarray(y), gamma, beta, rm, rv, training=False, eps=eps, axis=axis)


@pytest.fixture
def bn_params(rng):
    c = 6
    return (rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32),
            rng.standard_normal(c).astype(np.float32), rng.uniform(0.2, 3, c).astype(np.float32))


@pytest.mark.parametrize("layout", ["OIHW", "HWIO"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_conv_matches_conv_then_bn(rng, bn_params, layout, with_bias):
    g, b, rm, rv = bn_params
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32) if with_bias else None
    ref = bn_infer(conv2d_nchw(x.astype(np.float64), w.astype(np.float64)).astype(np.float32)
                   + (bias[None, :, None, None] if with_bias else 0), g, b, rm, rv, 1e-3)
    if layout == "OIHW":
        w2, b2 = pybn.fold(w, bias, g, b, rm, rv, eps=1e-3, axis=0)
        w2_oihw = w2
    else:  # HWIO: output channels last
        w2, b2 = pybn.fold(w.transpose(2, 3, 1, 0), bias, g, b, rm, rv, eps=1e-3, axis=-1)
        w2_oihw = w2.transpose(3, 2, 0, 1)
    assert w2.dtype == np.float32 and b2.dtype == np.float32 and b2.shape == (6,)
    got = conv2d_nchw(x.astype(np.float64), w2_oihw.astype(np.float64)) + b2[None, :, None, None]
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=4e-6 * scale)


@pytest.mark.parametrize("axis", [0, -1])
def test_fold_into_linear(rng, bn_params, axis):
    g, b, rm, rv = bn_params
    x = rng.standard_normal((10, 5)).astype(np.float32)
    w = rng.standard_normal((6, 5)).astype(np.float32)  # (out, in)
    bias = rng.standard_normal(6).astype(np.float32)
    ref = bn_infer((x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32) + bias, g, b, rm, rv, 1e-5)
    if axis == 0:
        w2, b2 = pybn.fold(w, bias, g, b, rm, rv)
        got = x.astype(np.float64) @ w2.T.astype(np.float64) + b2
    else:  # (in, out), as Keras / Flax store it
        w2, b2 = pybn.fold(np.ascontiguousarray(w.T), bias, g, b, rm, rv, axis=-1)
        got = x.astype(np.float64) @ w2.astype(np.float64) + b2
    np.testing.assert_allclose(got, ref, rtol=0, atol=4e-6 * np.abs(ref).max())


def test_fold_matches_pytorch_layers(rng, bn_params):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g, b, rm, rv = bn_params
    t = torch.from_numpy

    def bn(y):
        return F.batch_norm(y, t(rm), t(rv), t(g), t(b), training=False, eps=1e-5)

    x = t(rng.standard_normal((2, 3, 9, 8)).astype(np.float32))
    # conv OIHW
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    cb = rng.standard_normal(6).astype(np.float32)
    ref = bn(F.conv2d(x, t(w), t(cb)))
    w2, b2 = pybn.fold(w, cb, g, b, rm, rv, axis=0)
    np.testing.assert_allclose(F.conv2d(x, t(w2), t(b2)).numpy(), ref.numpy(), atol=4e-6 * float(ref.abs().max()))
    # transposed conv IOHW: output channels on axis 1
    wt = rng.standard_normal((3, 6, 3, 3)).astype(np.float32)
    ref = bn(F.conv_transpose2d(x, t(wt), t(cb)))
    w2, b2 = pybn.fold(wt, cb, g, b, rm, rv, axis=1)
    np.testing.assert_allclose(F.conv_transpose2d(x, t(w2), t(b2)).numpy(), ref.numpy(),
                               atol=4e-6 * float(ref.abs().max()))
    # linear (out, in), no bias
    wl = rng.standard_normal((6, 4)).astype(np.float32)
    xl = t(rng.standard_normal((7, 4)).astype(np.float32))
    ref = bn(F.linear(xl, t(wl)))
    w2, b2 = pybn.fold(wl, None, g, b, rm, rv)
    np.testing.assert_allclose(F.linear(xl, t(w2), t(b2)).numpy(), ref.numpy(), atol=4e-6 * float(ref.abs().max()))


def test_layer_fold_into_and_dtypes(rng):
    bn = pybn.BatchNorm(4, eps=1e-3)
    for _ in range(3):
        bn(rng.standard_normal((8, 4, 5)).astype(np.float32) * 2 + 1)
    w = rng.standard_normal((4, 2, 1)).astype(np.float64)
    w2, b2 = bn.fold_into(w, None, axis=0)
    expect_s = bn.gamma.astype(np.float64) / np.sqrt(bn.running_var.astype(np.float64) + 1e-3)
    np.testing.assert_allclose(w2, w * expect_s[:, None, None], rtol=1e-15)
    np.testing.assert_allclose(b2, -bn.running_mean * expect_s + bn.beta, rtol=1e-6)
    assert w2.dtype == np.float64
    w16 = w.astype(np.float16)
    assert bn.fold_into(w16)[0].dtype == np.float16
    with pytest.raises(ValueError, match="track_running_stats"):
        pybn.BatchNorm(4, track_running_stats=False).fold_into(w)


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"axis": 3}, ValueError, r"axis must be in \[-3, 3\)"),
    ({"axis": 1}, ValueError, r"gamma must have shape \(2,\)"),
    ({"eps": -1.0}, ValueError, "eps must be a finite number >= 0"),
    ({"weight": np.ones((4, 2, 1), np.int32)}, TypeError, "weight must be a floating-point array"),
    ({"running_var": None}, ValueError, "running_var is required"),
    ({"running_var": -np.ones(4, np.float32)}, ValueError, r"running_var \+ eps must be > 0"),
])
def test_fold_errors(kwargs, exc, msg):
    args = dict(weight=np.ones((4, 2, 1), np.float32), bias=None, gamma=np.ones(4, np.float32),
                beta=np.zeros(4, np.float32), running_mean=np.zeros(4, np.float32),
                running_var=np.ones(4, np.float32))
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("axis", "eps") if k in args}
    with pytest.raises(exc, match=msg):
        pybn.fold(args["weight"], args["bias"], args["gamma"], args["beta"], args["running_mean"],
                  args["running_var"], **extra)
