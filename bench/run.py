"""CPU benchmark of pybn against NumPy and PyTorch CPU (when installed) and the copy-bandwidth
roofline, measured side by side in one run. Medians of repeated runs.

Bytes counted per op (the fewest passes over memory, b = bytes of x):
  training forward 3b (read x for the statistics, read x + write y), inference 2b,
  backward 5b (read dy + x for the sums, read dy + x + write dx).
"""
import argparse
import time

import numpy as np

import pybn

PASSES = {"train_fwd": 3, "infer_fwd": 2, "backward": 5}


def median_s(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_vs_copy(fn, copy, repeat):
    """Median time of fn and median of (time of copy / time of fn), each sample timing a copy right
    before fn, so that drifts of this machine's memory bandwidth cancel in the ratio."""
    fn()
    pairs = [(timed(copy), timed(fn)) for _ in range(repeat)]
    return float(np.median([p[1] for p in pairs])), float(np.median([p[0] / p[1] for p in pairs]))


def copy_bandwidth(nbytes, repeat):
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / median_s(lambda: np.copyto(dst, src), repeat)  # read + write


def numpy_ops(x, g, b, dy):
    red = (0, 2, 3)
    sh = (1, -1, 1, 1)

    def train():
        m = x.mean(axis=red, keepdims=True)
        v = x.var(axis=red, keepdims=True)
        return (x - m) / np.sqrt(v + 1e-5) * g.reshape(sh) + b.reshape(sh)

    rm, rv = np.zeros_like(g), np.ones_like(g)

    def infer():
        return (x - rm.reshape(sh)) * (g / np.sqrt(rv + 1e-5)).reshape(sh) + b.reshape(sh)

    return {"train_fwd": train, "infer_fwd": infer}


def torch_ops(x, g, b, dy, channels_last):
    try:
        import torch
    except ImportError:
        return None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tx = torch.from_numpy(x).contiguous(memory_format=fmt)
    tdy = torch.from_numpy(dy).contiguous(memory_format=fmt)
    tg, tb = torch.from_numpy(g), torch.from_numpy(b)
    rm, rv = torch.zeros_like(tg), torch.ones_like(tg)
    _, save_m, save_r, _ = torch.ops.aten.native_batch_norm.default(tx, tg, tb, rm.clone(), rv.clone(), True, 0.1, 1e-5) + (None,)
    return {
        "train_fwd": lambda: torch.ops.aten.native_batch_norm(tx, tg, tb, rm, rv, True, 0.1, 1e-5),
        "infer_fwd": lambda: torch.ops.aten.native_batch_norm(tx, tg, tb, rm, rv, False, 0.1, 1e-5),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(
            tdy, tx, tg, rm, rv, save_m, save_r, True, 1e-5, [True, True, True]),
    }


def pybn_ops(x, g, b, dy, axis):
    rm, rv = np.zeros_like(g), np.ones_like(g)
    _, mean, invstd = pybn.batchnorm_forward(x, g, b, axis=axis)
    y = np.empty_like(x)
    return {
        "train_fwd": lambda: pybn.batchnorm(x, g, b, rm, rv, axis=axis, out=y),
        "infer_fwd": lambda: pybn.batchnorm(x, g, b, rm, rv, training=False, axis=axis, out=y),
        "backward": lambda: pybn.batchnorm_backward(dy, x, mean, invstd, g, axis=axis, out=y),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="256,64,56,56", help="N,C,H,W (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    n, c, h, w = (int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    dy = rng.standard_normal((n, c, h, w), dtype=np.float32)
    g, b = rng.standard_normal(c, dtype=np.float32), rng.standard_normal(c, dtype=np.float32)
    try:
        import torch
        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    bw = copy_bandwidth(x.nbytes, args.repeat)
    src = np.ones(x.size, np.float32)
    dst = np.empty_like(src)
    copy = lambda: np.copyto(dst, src)  # noqa: E731
    print(f"pybn {pybn.__version__} ({pybn.cpu_isa()}), x {x.shape} float32 = {x.nbytes / 1e6:.0f} MB, "
          f"torch threads {threads}, copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'layout':7} {'op':10} {'pybn ms':>8} {'%roof':>6} {'numpy ms':>9} {'torch ms':>9} {'vs numpy':>9} {'vs torch':>9}")
    for layout in ("NCHW", "NHWC"):
        cl = layout == "NHWC"
        xs = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if cl else x
        dys = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)) if cl else dy
        ours = pybn_ops(xs, g, b, dys, -1 if cl else 1)
        peers_np = numpy_ops(x, g, b, dy) if not cl else {}
        peers_t = torch_ops(x, g, b, dy, cl) or {}
        for op, passes in PASSES.items():
            t, copy_ratio = median_vs_copy(ours[op], copy, args.repeat)
            tn = median_s(peers_np[op], args.repeat) if op in peers_np else float("nan")
            tt = median_s(peers_t[op], args.repeat) if op in peers_t else float("nan")
            roof = copy_ratio * passes / 2  # (passes * bytes / t) / (2 * bytes / t_copy)
            print(f"{layout:7} {op:10} {t * 1e3:8.1f} {roof * 100:5.0f}% {tn * 1e3:9.1f} {tt * 1e3:9.1f} "
                  f"{tn / t:8.2f}x {tt / t:8.2f}x")


if __name__ == "__main__":
    main()
