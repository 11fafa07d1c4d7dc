"""Fresh outputs against out= in a training loop: each step runs the training forward, the
backward and an inference forward of the same layer shape, as a training loop with periodic
evaluation does; the arrays of one step are released before the next, as a loop's do.

    python bench/train_loop.py [--shape 256x64x56x56] [--layout nchw|nhwc] [--steps 12] [--out DIR]

A step with fresh outputs and a step with out= alternate, so that both see the same machine;
the first two of each are warm-up. Prints, per op, the median time (min, max) of both and the
ratio fresh / out=, with the state of pybn's output memory pool (pybn/_pool.py), and writes
train_loop.json to --out. Run it with PYBN_MEMORY_POOL_LIMIT=0 to see the cost without the pool.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import pybn

OPS = ("train", "backward", "infer")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="256x64x56x56", help="N x C x H x W (default 256x64x56x56, 206 MB float32)")
    ap.add_argument("--layout", choices=["nchw", "nhwc"], default="nchw")
    ap.add_argument("--steps", type=int, default=12, help="steps of each kind (the first 2 are warm-up)")
    ap.add_argument("--out", help="folder for train_loop.json")
    args = ap.parse_args(argv)
    n, c, h, w = (int(v) for v in args.shape.split("x"))
    rng = np.random.default_rng(0)
    shape, axis = ((n, c, h, w), 1) if args.layout == "nchw" else ((n, h, w, c), -1)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y_out, dx_out, yi_out = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def step(fresh: bool):
        t0 = time.perf_counter()
        y, mean, invstd = pybn.batchnorm_forward(x, g, b, rm, rv, axis=axis, out=None if fresh else y_out)
        t1 = time.perf_counter()
        dx = pybn.batchnorm_backward(dy, x, mean, invstd, g, axis=axis, out=None if fresh else dx_out)[0]
        t2 = time.perf_counter()
        yi = pybn.batchnorm(x, g, b, rm, rv, training=False, axis=axis, out=None if fresh else yi_out)
        t3 = time.perf_counter()
        del y, dx, yi  # the step's arrays go, as a loop's do
        return t1 - t0, t2 - t1, t3 - t2

    times = {"fresh": [], "out": []}
    for _ in range(args.steps):
        times["fresh"].append(step(True))
        times["out"].append(step(False))
    stats = {}
    for kind, ts in times.items():
        a = np.array(ts[2:]) * 1e3
        stats[kind] = {op: dict(median=float(np.median(a[:, j])), min=float(a[:, j].min()), max=float(a[:, j].max()))
                       for j, op in enumerate(OPS)}
    print(f"training loop, {args.shape} {args.layout} float32 ({x.nbytes / 1e6:.0f} MB), {args.steps - 2} steps of each "
          f"kind, {pybn.get_num_threads()} threads; ms: median [min, max]")
    result = {"shape": shape, "layout": args.layout, "steps": args.steps, "stats": stats, "ratio": {},
              "pool": pybn.memory_pool_info(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    for op in OPS:
        f, o = stats["fresh"][op], stats["out"][op]
        result["ratio"][op] = f["median"] / o["median"]
        print(f"  {op:8s} fresh {f['median']:7.2f} [{f['min']:.2f}, {f['max']:.2f}]   out= {o['median']:7.2f} "
              f"[{o['min']:.2f}, {o['max']:.2f}]   fresh / out= {result['ratio'][op]:.3f}")
    print(f"pool: {result['pool']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "train_loop.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
