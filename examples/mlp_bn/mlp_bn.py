"""Why batch normalisation matters: a small NumPy MLP trained with and without pybn.BatchNorm.

The same network (same seed, so the same initial weights and the same batch order) is trained
twice per learning rate, once plain and once with a BatchNorm after each hidden Linear layer, and
the two are compared: training loss and test accuracy per epoch, a summary table and a PNG. At
a small learning rate both train, BN faster; at a large one the plain network falls apart while
the BN network still trains.

    python examples/mlp_bn/mlp_bn.py                            # digits, lrs 0.01, 0.1, 0.5
    python examples/mlp_bn/mlp_bn.py --placement after          # BN after the ReLU instead
    python examples/mlp_bn/mlp_bn.py --pitfall                  # train() vs eval() at prediction
    python examples/mlp_bn/mlp_bn.py --finetune-frozen          # fine-tuning with frozen BN
    python examples/mlp_bn/mlp_bn.py --cifar10 cifar-10-python.tar.gz --hidden 512,512,512

Everything but the BatchNorm layers is written out in plain NumPy (or CuPy with --device cuda):
Linear layers with He initialisation, ReLU, softmax cross-entropy, SGD with momentum.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import pybn
from data import load_cifar10, load_digits_split  # data.py, next to this file

DEFAULT_LRS = (0.01, 0.1, 0.5)
SINGLE_RUN_LR = 0.1  # --pitfall / --finetune-frozen when --lrs is not given
LOSS_AXIS_TOP = 20.0  # the figure's loss axis ends here (ln 10 = 2.3 is a network guessing)


# --------------------------------------------------------------------------------------------
# Arrays: NumPy on the CPU, CuPy on a GPU. The code below is the same for both.
# --------------------------------------------------------------------------------------------

def array_module(device: str) -> Any:
    """numpy for --device cpu; cupy for --device cuda, after checking that it can work."""
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError:
        raise SystemExit("--device cuda needs CuPy (e.g. pip install cupy-cuda12x); it is not installed") from None
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device, ...
        raise SystemExit(f"--device cuda: CuPy found no usable CUDA GPU ({type(e).__name__}: {e})") from None
    if n_gpus == 0:
        raise SystemExit("--device cuda: CuPy found no CUDA GPU")
    if not pybn.has_cuda():
        raise SystemExit("--device cuda: the installed pybn was built without CUDA (pybn.has_cuda() is False)")
    return cupy


def xp_of(a: Any) -> Any:
    """The array module of `a`: numpy for NumPy arrays, cupy for CuPy arrays."""
    return np if isinstance(a, np.ndarray) else sys.modules["cupy"]


# --------------------------------------------------------------------------------------------
# Layers. Each has forward(x) -> y and backward(dy) -> dx; backward also keeps the gradients of
# the layer's parameters. pybn.BatchNorm has the same two methods, so it slots right in.
# --------------------------------------------------------------------------------------------

class Linear:
    """y = x @ W + b. He initialisation: W ~ N(0, 2 / fan_in), which keeps the size of the
    activations roughly constant from layer to layer in a ReLU network."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, xp: Any):
        w = rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)
        self.W = xp.asarray(w.astype(np.float32))  # drawn on the CPU: the same weights on any device
        self.b = xp.zeros(n_out, np.float32)

    def forward(self, x):
        self.x = x
        return x @ self.W + self.b

    def backward(self, dy):
        self.dW = self.x.T @ dy
        self.db = dy.sum(axis=0)
        return dy @ self.W.T


class ReLU:
    """y = max(x, 0)."""

    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


class MLP:
    """Linear -> [BN] -> ReLU, once per hidden width, then a Linear to the class scores.

    bn=False: no BatchNorm. placement="before": BN between the Linear and the ReLU (as in the
    BN paper and most CNNs); "after": Linear -> ReLU -> BN. The Linear weights depend only on
    `seed`, so the networks with and without BN start from the same weights. (A Linear bias just
    before a BN is redundant, BN subtracts the mean anyway; it is kept so that the networks with
    and without BN have the same Linear layers.)
    """

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, *, bn: bool, placement: str = "before",
                 seed: int = 0, device: str = "cpu"):
        xp = array_module(device)
        rng = np.random.default_rng(seed)
        self.layers: List[Any] = []
        for width in hidden:
            self.layers.append(Linear(n_in, width, rng, xp))
            if not bn:
                self.layers.append(ReLU())
            elif placement == "before":
                self.layers += [pybn.BatchNorm(width, device=device), ReLU()]
            else:
                self.layers += [ReLU(), pybn.BatchNorm(width, device=device)]
            n_in = width
        self.layers.append(Linear(n_in, n_out, rng, xp))

    @property
    def batchnorms(self) -> List[pybn.BatchNorm]:
        return [layer for layer in self.layers if isinstance(layer, pybn.BatchNorm)]

    def train(self, freeze_bn: bool = False) -> None:
        """Training mode: BN normalises with the batch's statistics and updates its running ones.
        freeze_bn=True keeps the BN layers in eval mode (running statistics used, not updated)."""
        for bn in self.batchnorms:
            bn.train(not freeze_bn)

    def eval(self) -> None:
        """Inference mode: BN normalises with its running statistics."""
        for bn in self.batchnorms:
            bn.eval()

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dlogits) -> None:
        for layer in reversed(self.layers):
            dlogits = layer.backward(dlogits)

    def params_and_grads(self) -> List[Tuple[Any, Any]]:
        """(parameter, gradient) pairs, always in the same order, after a backward()."""
        pairs = []
        for layer in self.layers:
            if isinstance(layer, Linear):
                pairs += [(layer.W, layer.dW), (layer.b, layer.db)]
            elif isinstance(layer, pybn.BatchNorm):
                pairs += [(layer.gamma, layer.grad_gamma), (layer.beta, layer.grad_beta)]
        return pairs


def softmax_cross_entropy(logits, y) -> Tuple[float, Any]:
    """Mean cross-entropy of softmax(logits) against the labels y, and its gradient dL/dlogits."""
    xp = xp_of(logits)
    z = logits - logits.max(axis=1, keepdims=True)  # subtracting the row maximum avoids overflow
    log_probs = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    rows = xp.arange(len(y))
    loss = -log_probs[rows, y].mean()
    dlogits = xp.exp(log_probs)  # softmax probabilities
    dlogits[rows, y] -= 1.0
    return float(loss), dlogits / len(y)


class SGD:
    """Stochastic gradient descent with momentum (PyTorch's form): v <- mu * v + g; p <- p - lr * v."""

    def __init__(self, lr: float, momentum: float = 0.9):
        self.lr, self.momentum = lr, momentum
        self.velocities: Optional[List[Any]] = None

    def step(self, params_and_grads: List[Tuple[Any, Any]]) -> None:
        if self.velocities is None:
            self.velocities = [xp_of(p).zeros_like(p) for p, _ in params_and_grads]
        for (p, g), v in zip(params_and_grads, self.velocities):
            v *= self.momentum
            v += g
            p -= self.lr * v  # in place: the layers keep using the same arrays


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------

def train_epoch(model: MLP, opt: SGD, x, y, batch_size: int, rng: np.random.Generator,
                freeze_bn: bool = False) -> float:
    """One pass over (x, y) in shuffled mini-batches; returns the mean training loss (nan or inf
    as soon as a batch's loss is not finite: the run has diverged)."""
    model.train(freeze_bn)
    xp = xp_of(x)
    order = rng.permutation(len(x))
    losses = []
    for start in range(0, len(x), batch_size):
        idx = xp.asarray(order[start:start + batch_size])
        if len(idx) < 2:  # BN in training needs >= 2 samples per channel (see --pitfall)
            continue
        logits = model.forward(x[idx])
        loss, dlogits = softmax_cross_entropy(logits, y[idx])
        losses.append(loss)
        if not np.isfinite(loss):
            break
        model.backward(dlogits)
        opt.step(model.params_and_grads())
    return float(np.mean(losses))


def predict(model: MLP, x, batch_size: int = 1000):
    """Predicted classes in eval mode (BN uses its running statistics)."""
    model.eval()
    xp = xp_of(x)
    return xp.concatenate([model.forward(x[i:i + batch_size]).argmax(axis=1) for i in range(0, len(x), batch_size)])


def accuracy(pred, y) -> float:
    return float((pred == y).mean())


def progress_line(label: str, epoch: int, epochs: int, loss: float, acc: float, seconds: float,
                  width: int = 20) -> str:
    """e.g. 'BN     lr 0.1   [######..............] epoch  6/20  loss 0.2412  test acc 0.947  (0.1 s)'."""
    done = round(width * epoch / epochs)
    bar = "#" * done + "." * (width - done)
    loss_text = f"{loss:8.4f}" if abs(loss) < 1e4 else f"{loss:8.3g}"  # a blow-up: 6.5e+17, not 18 digits
    return (f"{label:<22} [{bar}] epoch {epoch:>{len(str(epochs))}}/{epochs}  loss {loss_text}  "
            f"test acc {acc:.3f}  ({seconds:.1f} s)")


def fit(model: MLP, data: Dict[str, Any], *, lr: float, epochs: int, batch_size: int, seed: int,
        momentum: float = 0.9, label: str = "", freeze_bn: bool = False) -> Dict[str, Any]:
    """Train for `epochs` epochs; prints a progress line per epoch and returns the history."""
    opt = SGD(lr, momentum)
    rng = np.random.default_rng(seed + 1)  # the batch order: the same for every run with this seed
    history: Dict[str, Any] = {"label": label, "lr": lr, "loss": [], "test_acc": [], "diverged_at": None}
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run overflows: reported below
            loss = train_epoch(model, opt, data["x_train"], data["y_train"], batch_size, rng, freeze_bn)
            acc = accuracy(predict(model, data["x_test"]), data["y_test"]) if np.isfinite(loss) else float("nan")
        history["loss"].append(loss)
        history["test_acc"].append(acc)
        print(progress_line(label, epoch, epochs, loss, acc, time.perf_counter() - t0), flush=True)
        if not np.isfinite(loss):
            history["diverged_at"] = epoch
            print(f"{label:<22} diverged (training loss {loss}): run stopped", flush=True)
            break
    return history


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_data(args: argparse.Namespace, xp: Any) -> Dict[str, Any]:
    """The chosen data set as float32 features in [0, 1] and int64 labels, on the device."""
    if args.cifar10:
        x_train, y_train, x_test, y_test = load_cifar10(args.cifar10)
        x_train, x_test = x_train.astype(np.float32) / 255.0, x_test.astype(np.float32) / 255.0
        name = "CIFAR-10"
    else:
        try:
            x_train, y_train, x_test, y_test = load_digits_split(seed=0)  # the split never depends on --seed
        except ImportError:
            raise SystemExit("the default data set (digits) needs scikit-learn: pip install scikit-learn; "
                             "or pass --cifar10 PATH") from None
        name = "digits (scikit-learn)"
    if args.subset:
        keep = np.random.default_rng(args.seed).permutation(len(x_train))[:args.subset]
        x_train, y_train = x_train[keep], y_train[keep]
    return {"name": name, "x_train": xp.asarray(x_train), "y_train": xp.asarray(y_train),
            "x_test": xp.asarray(x_test), "y_test": xp.asarray(y_test),
            "n_features": x_train.shape[1], "n_classes": 10}


def make_model(data: Dict[str, Any], args: argparse.Namespace, bn: bool) -> MLP:
    return MLP(data["n_features"], args.hidden, data["n_classes"], bn=bn, placement=args.placement,
               seed=args.seed, device=args.device)


# --------------------------------------------------------------------------------------------
# The three modes
# --------------------------------------------------------------------------------------------

def sweep(data: Dict[str, Any], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Default mode: with and without BN for every learning rate; summary table and PNG."""
    runs = []
    for lr in args.lrs:
        for bn in (False, True):
            label = f"{'BN' if bn else 'no BN'}  lr {lr:g}"
            history = fit(make_model(data, args, bn), data, lr=lr, epochs=args.epochs, batch_size=args.batch_size,
                          seed=args.seed, momentum=args.momentum, label=label)
            history["bn"] = bn
            runs.append(history)
    print_summary(runs)
    plot(runs, args.out, f"{data['name']}: MLP {'-'.join(map(str, args.hidden))}, SGD momentum {args.momentum}, "
                         f"batch {args.batch_size}, BN {args.placement} ReLU")
    print(f"figure written to {args.out}")
    return runs


def print_summary(runs: List[Dict[str, Any]]) -> None:
    print()
    print(f"{'run':<8} {'lr':>6}  {'final train loss':>16}  {'best test acc (epoch)':>21}  {'final test acc':>14}")
    for r in runs:
        accs = np.array(r["test_acc"], dtype=float)
        if np.isfinite(accs).any():
            best = int(np.nanargmax(accs))
            best_text = f"{accs[best]:.3f} ({best + 1})"
        else:
            best_text = "-"
        final_acc = "-" if r["diverged_at"] else f"{accs[-1]:.3f}"
        final_loss = f"diverged (ep {r['diverged_at']})" if r["diverged_at"] else f"{r['loss'][-1]:.4f}"
        print(f"{'BN' if r['bn'] else 'no BN':<8} {r['lr']:>6g}  {final_loss:>16}  {best_text:>21}  {final_acc:>14}")
    print()


def plot(runs: List[Dict[str, Any]], path: str, title: str) -> None:
    """Two panels: training loss (log scale) and test accuracy per epoch, a line per run;
    colour = learning rate, solid = BN, dashed = no BN."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the figure needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in runs})
    colours = {lr: plt.get_cmap("tab10")(i) for i, lr in enumerate(lrs)}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in runs:
        epochs = np.arange(1, len(r["loss"]) + 1)
        loss = np.array(r["loss"], dtype=float)
        loss[~np.isfinite(loss)] = np.nan  # a diverged epoch: no point
        label = f"{'BN' if r['bn'] else 'no BN'}, lr {r['lr']:g}"
        if r["diverged_at"]:
            label += f" (diverged, epoch {r['diverged_at']})"
        style = dict(color=colours[r["lr"]], linestyle="-" if r["bn"] else "--", marker="." if r["bn"] else None)
        ax_loss.plot(epochs, loss, label=label, **style)
        ax_acc.plot(epochs, r["test_acc"], label=label, **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log",
                title=f"training loss (log scale, cut at {LOSS_AXIS_TOP:g})")
    ax_loss.set_ylim(top=LOSS_AXIS_TOP)  # a blowing-up run would squash every other line
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    ax_acc.set_ylim(0, 1.0)
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pitfall(data: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """A trained BN network predicting ONE sample at a time, in eval() (right) and in train() (wrong)."""
    lr = args.lrs[0]
    print("== pitfall: predicting one sample at a time with a trained BN network ==")
    model = make_model(data, args, bn=True)
    fit(model, data, lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        momentum=args.momentum, label=f"BN  lr {lr:g}")
    x, y = data["x_test"], data["y_test"]
    xp, n = xp_of(x), len(x)
    result: Dict[str, Any] = {"eval_acc_batched": accuracy(predict(model, x), y)}
    print(f"\ntrained; eval() accuracy on the {n} test samples as one batch: {result['eval_acc_batched']:.3f}")
    print("now predicting them ONE (or two) at a time:")

    # Right: eval() normalises with the running statistics, so a prediction does not depend on
    # what else is in the batch.
    model.eval()
    pred = xp.concatenate([model.forward(x[i:i + 1]).argmax(axis=1) for i in range(n)])
    result["eval_acc_single"] = accuracy(pred, y)
    print(f"  eval()  batch of 1  : acc {result['eval_acc_single']:.3f}   <- correct: running statistics")

    # Wrong: train() normalises with the batch's own statistics. Done on a copy, since a
    # training-mode forward also updates the running statistics.
    wrong = copy.deepcopy(model)
    wrong.train()
    try:
        wrong.forward(x[:1])
        result["train_single_error"] = None
    except ValueError as e:
        result["train_single_error"] = str(e)
        print(f"  train() batch of 1  : pybn refuses: ValueError: {e}")

    # pybn accepts one value per channel when the running variance is updated with the biased
    # variance (running_var_correction=0, the Keras convention). Then x - mean(x) = 0: every BN
    # output is beta, whatever the input, and the network predicts one class for everything.
    biased = copy.deepcopy(model)
    for i, layer in enumerate(biased.layers):
        if isinstance(layer, pybn.BatchNorm):
            biased.layers[i] = pybn.BatchNorm(layer.num_features, device=layer.device, running_var_correction=0)
            biased.layers[i].load_state_dict(layer.state_dict())
    biased.train()
    pred = xp.concatenate([biased.forward(x[i:i + 1]).argmax(axis=1) for i in range(n)])
    result["train_single_acc"] = accuracy(pred, y)
    result["train_single_distinct"] = int(len(xp.unique(pred)))
    print(f"  train() batch of 1  : acc {result['train_single_acc']:.3f} with running_var_correction=0 (which "
          f"allows it): {result['train_single_distinct']} distinct prediction(s); x - mean(x) = 0, so every BN "
          f"output is beta")

    # A batch of 2: each sample is normalised against one other sample.
    pred = xp.concatenate([wrong.forward(x[i:i + 2]).argmax(axis=1) for i in range(0, n - 1, 2)])
    result["train_pairs_acc"] = accuracy(pred, y[:len(pred)])
    print(f"  train() batches of 2: acc {result['train_pairs_acc']:.3f}   <- each sample normalised against one other")

    # The whole test set as one batch: its statistics are close to the running ones.
    result["train_full_acc"] = accuracy(wrong.forward(x).argmax(axis=1), y)
    print(f"  train() one batch of {n}: acc {result['train_full_acc']:.3f}   <- large batch: statistics close to "
          f"the running ones")

    drift = max(float(xp.abs(a.running_mean - b.running_mean).max()) for a, b in zip(wrong.batchnorms, model.batchnorms))
    result["running_mean_drift"] = drift
    print(f"  side effect: those train() forwards also moved running_mean (max |change| {drift:.3g}); done on a "
          f"copy, the trained model is untouched")
    print("rule: call eval() before predicting; train() only while training on batches of a sensible size")
    return result


def finetune_frozen(data: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """Pretrain on classes 0-4, then fine-tune on all classes with the BN layers frozen."""
    lr = args.lrs[0]
    xp = xp_of(data["x_train"])
    first = data["y_train"] < 5
    part = dict(data, x_train=data["x_train"][first], y_train=data["y_train"][first])
    test_first = data["y_test"] < 5

    def report(model: MLP, when: str) -> Tuple[float, float]:
        pred = predict(model, data["x_test"])
        acc_first = accuracy(pred[test_first], data["y_test"][test_first])
        acc_all = accuracy(pred, data["y_test"])
        print(f"{when}: test accuracy classes 0-4 {acc_first:.3f}, all 10 classes {acc_all:.3f}")
        return acc_first, acc_all

    print("== fine-tuning with frozen BN ==")
    print(f"pretraining a BN network on classes 0-4 only ({len(part['x_train'])} samples)")
    model = make_model(data, args, bn=True)
    fit(model, part, lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, momentum=args.momentum,
        label=f"pretrain  lr {lr:g}")
    result: Dict[str, Any] = {}
    result["pretrain_acc_first"], result["pretrain_acc_all"] = report(model, "after pretraining")

    before = [bn.state_dict() for bn in model.batchnorms]
    print(f"\nfine-tuning on all 10 classes ({len(data['x_train'])} samples) with frozen BN: the BN layers stay in "
          f"eval() (running statistics used, not updated); gradients still reach gamma and beta")
    fit(model, data, lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed + 7,
        momentum=args.momentum, label=f"fine-tune  lr {lr:g}", freeze_bn=True)
    result["finetune_acc_first"], result["finetune_acc_all"] = report(model, "after fine-tuning")

    def max_change(key: str) -> float:
        return max(float(xp.abs(bn.state_dict()[key] - old[key]).max()) for bn, old in zip(model.batchnorms, before))

    stats_same = all(bool(xp.array_equal(bn.running_mean, old["running_mean"])) and
                     bool(xp.array_equal(bn.running_var, old["running_var"])) and
                     bn.num_batches_tracked == old["num_batches_tracked"]
                     for bn, old in zip(model.batchnorms, before))
    result.update(running_stats_unchanged=stats_same, running_mean_change=max_change("running_mean"),
                  running_var_change=max_change("running_var"), gamma_change=max_change("gamma"),
                  beta_change=max_change("beta"))
    print(f"running statistics: {'unchanged' if stats_same else 'CHANGED'} in all {len(before)} BN layers "
          f"(max |change| running_mean {result['running_mean_change']:.3g}, running_var "
          f"{result['running_var_change']:.3g}; num_batches_tracked still {before[0]['num_batches_tracked']})")
    learned = result["gamma_change"] > 0 and result["beta_change"] > 0
    print(f"gamma/beta: {'changed' if learned else 'UNCHANGED'} (max |change| gamma {result['gamma_change']:.3g}, "
          f"beta {result['beta_change']:.3g})")
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default 64)")
    p.add_argument("--hidden", default="256,256,256", help="hidden layer widths, comma-separated (default 256,256,256)")
    p.add_argument("--lrs", default=None,
                   help=f"learning rates, comma-separated (default {','.join(map(str, DEFAULT_LRS))}; "
                        f"--pitfall and --finetune-frozen use the first, default {SINGLE_RUN_LR})")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    p.add_argument("--subset", type=int, default=None, metavar="N", help="use only N training samples (default: all)")
    p.add_argument("--placement", choices=("before", "after"), default="before", help="BN before (default) or after the ReLU")
    p.add_argument("--out", default="mlp_bn.png", help="the PNG the default mode writes (default mlp_bn.png, in the current directory)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda: CuPy arrays and pybn.BatchNorm(device='cuda')")
    p.add_argument("--cifar10", metavar="PATH", default=None,
                   help="CIFAR-10 instead of scikit-learn's digits: cifar-10-python.tar.gz or the "
                        "cifar-10-batches-py folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--pitfall", action="store_true", help="train() vs eval() when predicting single samples")
    mode.add_argument("--finetune-frozen", action="store_true", help="fine-tuning with frozen BN layers")
    args = p.parse_args(argv)
    try:
        args.hidden = [int(v) for v in args.hidden.split(",")]
        lrs = DEFAULT_LRS if args.lrs is None and not (args.pitfall or args.finetune_frozen) else (
            (SINGLE_RUN_LR,) if args.lrs is None else args.lrs.split(","))
        args.lrs = [float(v) for v in lrs]
    except ValueError as e:
        p.error(f"--hidden and --lrs take comma-separated numbers ({e})")
    if min(args.hidden) < 1 or min(args.lrs) <= 0 or args.epochs < 1 or args.batch_size < 2:
        p.error("hidden widths >= 1, learning rates > 0, --epochs >= 1 and --batch-size >= 2 please")
    if args.subset is not None and args.subset < 2:
        p.error("--subset needs at least 2 samples")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Any:
    args = parse_args(argv)
    xp = array_module(args.device)
    try:
        data = load_data(args, xp)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    isa = pybn.cpu_isa() if args.device == "cpu" else "CUDA"
    print(f"pybn {pybn.__version__} ({isa}); data {data['name']}: {len(data['x_train'])} train / "
          f"{len(data['x_test'])} test samples, {data['n_features']} features; MLP "
          f"{data['n_features']}-{'-'.join(map(str, args.hidden))}-{data['n_classes']}, BN {args.placement} ReLU; "
          f"SGD momentum {args.momentum}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}, "
          f"device {args.device}")
    t0 = time.perf_counter()
    if args.pitfall:
        result = pitfall(data, args)
    elif args.finetune_frozen:
        result = finetune_frozen(data, args)
    else:
        result = sweep(data, args)
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
