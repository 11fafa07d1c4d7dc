"""The MLP batch-normalisation demo (examples/mlp_bn): it trains, writes its figure, its --pitfall
and --finetune-frozen modes print true claims, and its CIFAR-10 loader reads the python format."""
import importlib.util
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

DEMO_DIR = Path(__file__).resolve().parent.parent / "examples" / "mlp_bn"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_module():
    return _load("mlp_bn_data", DEMO_DIR / "data.py")


@pytest.fixture(scope="module")
def demo():
    """examples/mlp_bn/mlp_bn.py as a module. Its `from data import ...` finds data.py through
    sys.modules (put there for the import only), not through sys.path."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    saved = sys.modules.get("data")
    sys.modules["data"] = _load("data", DEMO_DIR / "data.py")
    try:
        return _load("mlp_bn_demo", DEMO_DIR / "mlp_bn.py")
    finally:
        if saved is None:
            del sys.modules["data"]
        else:
            sys.modules["data"] = saved


def _is_png(path):
    path = Path(path)
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def test_sweep_trains_and_writes_png(demo, tmp_path, capsys):
    png = tmp_path / "fig.png"
    runs = demo.main(["--epochs", "3", "--subset", "500", "--hidden", "64,64", "--lrs", "0.05",
                      "--out", str(png)])
    out = capsys.readouterr().out
    assert [r["bn"] for r in runs] == [False, True]
    for r in runs:
        assert r["diverged_at"] is None, r
        assert len(r["loss"]) == len(r["test_acc"]) == 3
        assert r["loss"][-1] < r["loss"][0], f"{r['label']}: training loss did not go down: {r['loss']}"
        assert r["test_acc"][-1] > 0.5, f"{r['label']}: test accuracy {r['test_acc']} (chance is 0.1)"
    assert _is_png(png)
    assert re.search(r"\[#+\.*\] epoch 1/3 +loss +\d+\.\d+ +test acc \d\.\d{3}", out), out
    assert "[" + "#" * 20 + "] epoch 3/3" in out
    assert "final train loss" in out and "best test acc" in out
    assert re.search(r"^no BN +0\.05 +\d+\.\d+ +\d\.\d{3} \(\d\) +\d\.\d{3}$", out, re.M), out
    assert re.search(r"^BN +0\.05 +\d+\.\d+ +\d\.\d{3} \(\d\) +\d\.\d{3}$", out, re.M), out


def test_same_initial_weights_with_and_without_bn(demo):
    """'The same network on the same seed': BN layers draw no random numbers, so the Linear
    layers start equal; only the BN layers are added."""
    plain = demo.MLP(64, [32, 32], 10, bn=False, seed=3)
    with_bn = demo.MLP(64, [32, 32], 10, bn=True, seed=3)
    linear = lambda m: [layer for layer in m.layers if isinstance(layer, demo.Linear)]  # noqa: E731
    assert len(linear(plain)) == len(linear(with_bn)) == 3
    for a, b in zip(linear(plain), linear(with_bn)):
        np.testing.assert_array_equal(a.W, b.W)
    assert len(with_bn.batchnorms) == 2 and not plain.batchnorms
    kinds = [type(layer).__name__ for layer in demo.MLP(8, [4], 2, bn=True, placement="after").layers]
    assert kinds == ["Linear", "ReLU", "BatchNorm", "Linear"]
    kinds = [type(layer).__name__ for layer in demo.MLP(8, [4], 2, bn=True, placement="before").layers]
    assert kinds == ["Linear", "BatchNorm", "ReLU", "Linear"]


def test_softmax_cross_entropy_gradient(demo):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4))
    y = np.array([0, 3, 1, 1, 2])
    loss, grad = demo.softmax_cross_entropy(logits, y)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.log(probs[np.arange(5), y]).mean())
    h = 1e-6
    for i, j in [(0, 0), (1, 3), (4, 1)]:
        bumped = logits.copy()
        bumped[i, j] += h
        assert grad[i, j] == pytest.approx((demo.softmax_cross_entropy(bumped, y)[0] - loss) / h, abs=1e-5)


def test_script_runs_from_the_command_line(tmp_path):
    """As a user runs it: a script (its folder on sys.path, the installed pybn), default --out in
    the current directory."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, str(DEMO_DIR / "mlp_bn.py"), "--epochs", "2", "--subset", "300",
                           "--hidden", "32,32", "--lrs", "0.1,0.5", "--placement", "after"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _is_png(tmp_path / "mlp_bn.png")
    assert proc.stdout.count("] epoch 2/2") == 4  # 2 learning rates x (BN, no BN)
    assert "BN after ReLU" in proc.stdout


def test_bad_arguments_give_clear_errors(demo, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        demo.main(["--cifar10", str(tmp_path / "nowhere.tar.gz"), "--epochs", "1"])
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="needs CuPy"):
            demo.main(["--device", "cuda", "--epochs", "1"])


# ---------------------------------------------------------------------------------------------
# --pitfall and --finetune-frozen
# ---------------------------------------------------------------------------------------------

def test_pitfall(demo, capsys):
    r = demo.main(["--pitfall", "--epochs", "3", "--subset", "500", "--hidden", "64,64"])
    out = capsys.readouterr().out
    n_test = 359
    # eval(): a prediction does not depend on the batch, one at a time == all at once
    assert r["eval_acc_batched"] > 0.5
    assert abs(r["eval_acc_single"] - r["eval_acc_batched"]) <= 1.0 / n_test
    # train() with a batch of one: pybn refuses (unbiased running-variance update) ...
    assert "at least 2 values per channel" in r["train_single_error"]
    assert "pybn refuses: ValueError: training needs at least 2 values" in out
    # ... and where it is allowed, every sample gets the same prediction
    assert r["train_single_distinct"] == 1
    assert "1 distinct prediction(s)" in out
    # train() forwards moved the running statistics (of the copy)
    assert r["running_mean_drift"] > 0
    for key in ("train_pairs_acc", "train_full_acc"):
        assert 0.0 <= r[key] <= 1.0


def test_finetune_frozen(demo, capsys):
    r = demo.main(["--finetune-frozen", "--epochs", "2", "--subset", "600", "--hidden", "64,64"])
    out = capsys.readouterr().out
    assert r["running_stats_unchanged"] is True
    assert r["running_mean_change"] == 0.0 and r["running_var_change"] == 0.0
    assert r["gamma_change"] > 0 and r["beta_change"] > 0
    assert "running statistics: unchanged in all 2 BN layers" in out
    assert "gamma/beta: changed" in out
    # pretrained on classes 0-4 only: it cannot know classes 5-9 yet; fine-tuning teaches them
    assert r["pretrain_acc_all"] < 0.6
    assert r["finetune_acc_all"] > r["pretrain_acc_all"]


# ---------------------------------------------------------------------------------------------
# the CIFAR-10 loader, on a tiny data set in the same format
# ---------------------------------------------------------------------------------------------

def _write_fake_cifar10(root, n=4):
    """cifar-10-batches-py/ with data_batch_1..5 and test_batch of n images each, as the
    official files: pickled dicts (protocol 2) with b"data" (n x 3072 uint8) and b"labels"."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in CIFAR_FILES:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        written[name] = (data, np.array(labels))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return folder, archive, written


def test_cifar10_loader_archive_and_folder(data_module, tmp_path):
    folder, archive, written = _write_fake_cifar10(tmp_path)
    expected_x = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected_y = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    for path in (archive, folder, tmp_path, str(archive)):  # the .tar.gz, the folder, the folder above it
        x_train, y_train, x_test, y_test = data_module.load_cifar10(path)
        assert x_train.shape == (20, 3072) and x_train.dtype == np.uint8
        assert y_train.shape == (20,) and y_train.dtype == np.int64
        assert x_test.shape == (4, 3072) and y_test.shape == (4,)
        np.testing.assert_array_equal(x_train, expected_x)
        np.testing.assert_array_equal(y_train, expected_y)
        np.testing.assert_array_equal(x_test, written["test_batch"][0])
        np.testing.assert_array_equal(y_test, written["test_batch"][1])


def test_cifar10_loader_errors(data_module, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_module.load_cifar10(tmp_path / "missing")
    folder, _, _ = _write_fake_cifar10(tmp_path / "a")
    os.remove(folder / "test_batch")
    with pytest.raises(FileNotFoundError, match="lacks test_batch"):
        data_module.load_cifar10(folder)
    not_tar = tmp_path / "notes.txt"
    not_tar.write_text("not an archive")
    with pytest.raises(ValueError, match="not a tar archive"):
        data_module.load_cifar10(not_tar)
    bad = tmp_path / "b" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    for name in CIFAR_FILES:
        (bad / name).write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"expected data of shape \(N, 3072\)"):
        data_module.load_cifar10(bad)


def test_demo_trains_on_cifar10_format(demo, tmp_path, capsys):
    """--cifar10 end to end on the tiny fake set (20 training images: one batch per epoch)."""
    _, archive, _ = _write_fake_cifar10(tmp_path)
    runs = demo.main(["--cifar10", str(archive), "--epochs", "2", "--hidden", "16", "--lrs", "0.01",
                      "--out", str(tmp_path / "c.png")])
    assert "data CIFAR-10: 20 train / 4 test samples, 3072 features" in capsys.readouterr().out
    assert len(runs) == 2 and all(len(r["loss"]) == 2 for r in runs)
    assert _is_png(tmp_path / "c.png")


def test_digits_split(data_module):
    pytest.importorskip("sklearn")
    x_train, y_train, x_test, y_test = data_module.load_digits_split(seed=0)
    assert x_train.shape == (1438, 64) and x_test.shape == (359, 64)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_train)) == set(range(10))
    again = data_module.load_digits_split(seed=0)
    np.testing.assert_array_equal(again[3], y_test)
