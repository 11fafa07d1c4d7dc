"""pybn.BatchNorm: training/eval behaviour, running statistics over several steps, momentum
edge values (0, 1, None), gradients and state dicts."""
import numpy as np
import pytest

import pybn
import reference as ref
from conftest import assert_close, randn


def test_training_steps_update_running_stats(rng):
    bn = pybn.BatchNorm(4, momentum=0.2)
    rm, rv = np.zeros(4), np.ones(4)
    for step in range(3):
        x = randn(rng, (8, 4, 5, 5), np.float32, loc=step, scale=1 + step)
        y = bn(x)
        ey, mean, _, var_u = ref.forward_train(x)
        assert_close(y, ey, np.float32)
        rm, rv = ref.ema(rm, mean, 0.2), ref.ema(rv, var_u, 0.2)
        assert_close(bn.running_mean, rm, np.float32)
        assert_close(bn.running_var, rv, np.float32)
    assert bn.num_batches_tracked == 3


def test_eval_uses_running_stats_and_changes_nothing(rng):
    bn = pybn.BatchNorm(3)
    bn(randn(rng, (16, 3), np.float32, loc=2.0))
    state = bn.state_dict()
    bn.eval()
    assert not bn.training
    x = randn(rng, (5, 3), np.float32)
    y = bn(x)
    assert_close(y, ref.forward_infer(x, bn.running_mean, bn.running_var, bn.gamma, bn.beta), np.float32)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    bn.train()
    assert bn.training


def test_momentum_none_is_cumulative_average(rng):
    bn = pybn.BatchNorm(2, momentum=None)
    means, vars_u = [], []
    for step in range(4):
        x = randn(rng, (10, 2), np.float64, loc=3 * step)
        bn(x.astype(np.float32))
        _, m, _, v = ref.forward_train(x.astype(np.float32))
        means.append(m)
        vars_u.append(v)
    assert_close(bn.running_mean, np.mean(means, axis=0), np.float32)
    assert_close(bn.running_var, np.mean(vars_u, axis=0), np.float32)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_edges_in_layer(rng, momentum):
    bn = pybn.BatchNorm(3, momentum=momentum)
    x = randn(rng, (12, 3, 4), np.float32, loc=1.0)
    bn(x)
    _, mean, _, var_u = ref.forward_train(x)
    expect_m = np.zeros(3) if momentum == 0 else mean
    expect_v = np.ones(3) if momentum == 0 else var_u
    assert_close(bn.running_mean, expect_m, np.float32)
    assert_close(bn.running_var, expect_v, np.float32)


def test_no_running_stats_uses_batch_stats_in_eval(rng):
    bn = pybn.BatchNorm(3, track_running_stats=False, affine=False).eval()
    assert bn.running_mean is None and bn.gamma is None
    x = randn(rng, (9, 3, 2), np.float32, loc=4.0)
    assert_close(bn(x), ref.forward_train(x)[0], np.float32)
    dx = bn.backward(np.ones_like(x))
    assert_close(dx, ref.backward_train(np.ones_like(x), x)[0], np.float32)
    assert bn.grad_gamma is None and bn.grad_beta is None
    assert bn.state_dict() == {}


def test_backward_sets_gradients(rng):
    bn = pybn.BatchNorm(5, axis=-1)
    bn.gamma[...] = randn(rng, 5, np.float32)
    x = randn(rng, (3, 4, 4, 5), np.float32)
    dy = randn(rng, x.shape, np.float32)
    bn(x)
    dx = bn.backward(dy)
    edx, edg, edb = ref.backward_train(dy, x, bn.gamma, axis=-1)
    assert_close(dx, edx, np.float32)
    assert_close(bn.grad_gamma, edg, np.float32, scale=np.abs(dy).sum() / 5)
    assert_close(bn.grad_beta, edb, np.float32, scale=np.abs(dy).sum() / 5)


def test_eval_backward_is_frozen(rng):
    bn = pybn.BatchNorm(3)
    bn(randn(rng, (8, 3), np.float32))
    bn.eval()
    x, dy = randn(rng, (6, 3), np.float32), randn(rng, (6, 3), np.float32)
    bn(x)
    dx = bn.backward(dy)
    invstd = 1 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    assert_close(dx, ref.backward_frozen(dy, x, bn.running_mean, invstd, bn.gamma)[0], np.float32)


def test_float64_layer(rng):
    bn = pybn.BatchNorm(3, dtype=np.float64)
    x = randn(rng, (7, 3, 3), np.float64)
    assert_close(bn(x), ref.forward_train(x)[0], np.float64)


def test_state_dict_roundtrip_and_atomic_load(rng):
    a = pybn.BatchNorm(3)
    a(randn(rng, (8, 3), np.float32, loc=1))
    b = pybn.BatchNorm(3)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)
    before = b.state_dict()
    bad = a.state_dict()
    bad["running_var"] = np.ones(4, np.float32)  # wrong shape: nothing may change
    bad["gamma"] = np.full(3, 9.0, np.float32)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\), got \(4,\)"):
        b.load_state_dict(bad)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(ValueError, match="missing \\['num_batches_tracked'\\]"):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "num_batches_tracked"})


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="num_features must be >= 1, got 0"):
        pybn.BatchNorm(0)
    with pytest.raises(TypeError, match="num_features must be an int, got float"):
        pybn.BatchNorm(3.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 2"):
        pybn.BatchNorm(3, momentum=2)
    with pytest.raises(ValueError, match="eps must be"):
        pybn.BatchNorm(3, eps=-1)
    with pytest.raises(TypeError, match="float32 or float64, got float16"):
        pybn.BatchNorm(3, dtype=np.float16)
    with pytest.raises(TypeError, match="float32 or float64, got float32 in non-native byte order"):
        pybn.BatchNorm(3, dtype=">f4")
    with pytest.raises(RuntimeError, match="needs a forward"):
        pybn.BatchNorm(3).backward(np.ones((2, 3), np.float32))


def test_failed_layer_call_changes_nothing(rng):
    bn = pybn.BatchNorm(3)
    before = bn.state_dict()
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        bn(np.ones((1, 3), np.float32))
    assert bn.num_batches_tracked == 0
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_layer_pickles_deep_copies_and_loads_savez_and_torch_state_dicts(rng, tmp_path):
    import copy
    import pickle

    bn = pybn.BatchNorm(3, momentum=0.2, activation="relu")
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    bn(x)
    for clone in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[k], v)
        np.testing.assert_array_equal(clone.eval()(x), bn.eval()(x))
        bn.train()
    np.savez(tmp_path / "bn.npz", **bn.state_dict())
    other = pybn.BatchNorm(3)
    other.load_state_dict(dict(np.load(tmp_path / "bn.npz")))
    assert other.num_batches_tracked == 1
    np.testing.assert_array_equal(other.running_var, bn.running_var)
    torch_like = {"weight": bn.gamma * 2, "bias": bn.beta + 1, "running_mean": bn.running_mean,
                  "running_var": bn.running_var, "num_batches_tracked": np.array(7)}
    other.load_state_dict(torch_like)
    np.testing.assert_array_equal(other.gamma, bn.gamma * 2)
    assert other.num_batches_tracked == 7


def test_layer_errors_speak_about_x():
    with pytest.raises(TypeError, match="x has dtype float64 but this BatchNorm holds float32 parameters"):
        pybn.BatchNorm(3)(np.ones((4, 3), np.float64))
    with pytest.raises(ValueError, match="x has 5 channels on axis 1.*num_features=3"):
        pybn.BatchNorm(3)(np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        pybn.BatchNorm(3)(np.ones(3, np.float32))


def test_layer_loads_a_pytorch_state_dict():
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        tbn.weight.mul_(2)
        tbn.running_var.fill_(4)
    tbn.num_batches_tracked.fill_(5)
    bn = pybn.BatchNorm(3)
    bn.load_state_dict(tbn.state_dict())
    np.testing.assert_array_equal(bn.gamma, 2)
    np.testing.assert_array_equal(bn.running_var, 4)
    assert bn.num_batches_tracked == 5
