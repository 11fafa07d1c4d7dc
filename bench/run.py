"""pybn benchmark: CPU and GPU against peers and the memory-bandwidth limit.

    python bench/run.py --quick --out DIR     # a small subset, < 2 minutes on 2 CPU cores
    python bench/run.py --out DIR             # every shape, dtype, layout and op
    python bench/run.py --op train --dtype float32 --layout nhwc --shape 256x14 --device cpu

Napkin math: BN is memory-bound, so each op is charged the fewest passes over memory it needs,
b = bytes of x: training forward 3b (read x for the statistics, read x and write y), inference
2b, backward 5b (read dy and x for the sums, read them again and write dx). The ceiling is a copy
of the same bytes measured in the same run (np.copyto on the CPU, a device-to-device copy on a
GPU), timed right before every sample so that drifts of the machine's bandwidth cancel:
% of roofline = (passes * b / t) / (2 * b / t_copy).

Peers, measured side by side: a NumPy float32 implementation and PyTorch CPU at the same thread
count; on a GPU PyTorch CUDA with cuDNN and with its native kernels, and a plain CuPy
implementation. Every contender is timed the same way and, on the CPU, in the same rounds: each
round times the copy, then pybn (fresh outputs and out=) and every peer once each, the order
reversed every other round, so a machine whose speed drifts (a shared VM moves by 1.5x within
minutes) moves all contenders alike and their ratios hold (bench/NOTES.md, step 29). A peer
that is not installed or does not support a case is reported as missing, with the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import pybn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import CPU_PEERS  # noqa: E402  (bench/peers.py, next to this file)

# passes over memory of the unfused minimum (the roofline's yardstick): training forward reads x
# twice and writes y; backward reads dy and x twice and writes dx; the fused epilogues add the
# residual's read (BN + add + ReLU) or y's two reads (ReLU backward: the mask)
PASSES = {"train": 3, "infer": 2, "backward": 5, "train_relu": 3, "train_add_relu": 4, "backward_relu": 7}
FUSED = ("train_relu", "train_add_relu", "backward_relu")
BUSY_SPREAD = 1.5  # max / min of one measurement's samples above this: a busy machine
# ResNet-50's BN layers (C, H, W)
RESNET = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
          (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7)]
BN1D = [(256, 1024), (4096, 1024), (65536, 256), (126000, 16)]
STRESS = [(20, 6, 65536)]


@dataclass
class Case:
    name: str
    shape: Tuple[int, ...]  # logical NC... shape
    layout: str             # "nchw" (channel axis 1) or "nhwc" (channels last, 4-D only)
    dtype: str


def all_cases(quick: bool) -> List[Case]:
    if quick:
        shapes = [(32,) + RESNET[1], (32,) + RESNET[7], (32,) + RESNET[11], BN1D[1], STRESS[0]]
        dtypes = {"float32"}
        extra = [Case("32x64x56x56", (32, 64, 56, 56), "nchw", "bfloat16"),
                 Case("32x64x56x56", (32, 64, 56, 56), "nhwc", "float16")]
    else:
        shapes = [(n,) + chw for chw in RESNET for n in (1, 32, 256)] + BN1D + STRESS
        dtypes = {"float32", "float16", "bfloat16"}
        extra = []
    cases = []
    for shape in shapes:
        name = "x".join(str(s) for s in shape)
        for layout in ("nchw", "nhwc") if len(shape) == 4 else ("nchw",):
            for dtype in sorted(dtypes):
                cases.append(Case(name, shape, layout, dtype))
    return cases + extra


# ------------------------------------------------------------------------------------------------
# Arrays and implementations

def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_inputs(case: Case, xp, rng) -> Dict[str, Any]:
    """x, dy (in the case's layout), gamma, beta, running stats; axis for pybn."""
    shape = case.shape
    if case.layout == "nhwc":
        shape = (shape[0],) + shape[2:] + (shape[1],)
    x = rng.standard_normal(shape, dtype=np.float32).astype(np_dtype(case.dtype))
    dy = rng.standard_normal(shape, dtype=np.float32).astype(np_dtype(case.dtype))
    c = case.shape[1]
    pd = np.float64 if case.dtype == "float64" else np.float32
    host = dict(x=x, dy=dy, gamma=rng.standard_normal(c).astype(pd), beta=rng.standard_normal(c).astype(pd),
                rm=np.zeros(c, pd), rv=np.ones(c, pd))
    out = {k: xp.asarray(v) for k, v in host.items()}
    out["axis"] = -1 if case.layout == "nhwc" else 1
    return out


def saved(a) -> Tuple[Any, Any, Any]:
    """What the backward ops take, computed once per case and kept in `a`: the forward's mean and
    invstd, and the fused ReLU forward's output (the mask of the ReLU backward)."""
    if "y_relu" not in a:
        x, g, b, ax = a["x"], a["gamma"], a["beta"], a["axis"]
        _, a["mean"], a["invstd"] = pybn.batchnorm_forward(x, g, b, axis=ax)
        a["y_relu"] = pybn.batchnorm(x, g, b, axis=ax, activation="relu")
    return a["mean"], a["invstd"], a["y_relu"]


def pybn_ops(a, fresh: bool = True) -> Dict[str, Callable[[], Any]]:
    """pybn's calls as users make them: fresh outputs (fresh=True), or out= a preallocated y."""
    ax = a["axis"]
    x, g, b, rm, rv, z = a["x"], a["gamma"], a["beta"], a["rm"], a["rv"], a["dy"]  # dy doubles as the residual
    mean, invstd, _ = saved(a)
    y = None if fresh else x.copy()
    return {
        "train": lambda: pybn.batchnorm(x, g, b, rm, rv, axis=ax, out=y),
        "infer": lambda: pybn.batchnorm(x, g, b, rm, rv, training=False, axis=ax, out=y),
        "backward": lambda: pybn.batchnorm_backward(a["dy"], x, mean, invstd, g, axis=ax, out=y),
        "train_relu": lambda: pybn.batchnorm(x, g, b, rm, rv, axis=ax, out=y, activation="relu"),
        "train_add_relu": lambda: pybn.batchnorm(x, g, b, rm, rv, axis=ax, out=y, residual=z, activation="relu"),
        "backward_relu": lambda: pybn.batchnorm_backward(a["dy"], x, mean, invstd, g, axis=ax, out=y,
                                                         activation="relu", y=a["y_relu"]),
    }


def separate_ops(a, xp) -> Dict[str, Callable[[], Any]]:
    """The fused ops as pybn BN plus separate array ops (in place, no extra allocation)."""
    ax = a["axis"]
    x, g, b, rm, rv, z = a["x"], a["gamma"], a["beta"], a["rm"], a["rv"], a["dy"]
    mean, invstd, _ = saved(a)
    y, grad = x.copy(), x.copy()

    def train_relu():
        pybn.batchnorm(x, g, b, rm, rv, axis=ax, out=y)
        xp.maximum(y, 0, out=y)

    def train_add_relu():
        pybn.batchnorm(x, g, b, rm, rv, axis=ax, out=y)
        xp.add(y, z, out=y)
        xp.maximum(y, 0, out=y)

    def backward_relu():
        xp.multiply(a["dy"], a["y_relu"] > 0, out=grad)
        pybn.batchnorm_backward(grad, x, mean, invstd, g, axis=ax, out=y)

    return {"train_relu": train_relu, "train_add_relu": train_add_relu, "backward_relu": backward_relu}


def array_ops(a, xp) -> Dict[str, Callable[[], Any]]:
    """A plain float32 implementation with NumPy or CuPy (two-pass statistics)."""
    x, dy, g, b = a["x"], a["dy"], a["gamma"], a["beta"]
    ax = a["axis"] % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    sh = [1] * x.ndim
    sh[ax] = -1
    n = x.size // x.shape[ax]

    def train():
        m = x.mean(axis=red, keepdims=True)
        v = x.var(axis=red, keepdims=True)
        return (x - m) / xp.sqrt(v + 1e-5) * g.reshape(sh) + b.reshape(sh)

    def infer():
        return (x - a["rm"].reshape(sh)) * (g / xp.sqrt(a["rv"] + 1e-5)).reshape(sh) + b.reshape(sh)

    def backward():
        m = x.mean(axis=red, keepdims=True)
        r = 1 / xp.sqrt(x.var(axis=red, keepdims=True) + 1e-5)
        xh = (x - m) * r
        sdy = dy.sum(axis=red, keepdims=True)
        sdyx = (dy * xh).sum(axis=red, keepdims=True)
        return g.reshape(sh) * r * (dy - sdy / n - xh * sdyx / n)

    return {"train": train, "infer": infer, "backward": backward}


def torch_ops(a, device: str, cudnn: bool) -> Dict[str, Callable[[], Any]]:
    import torch
    x = torch.from_dlpack(a["x"]) if device == "cuda" else torch.from_numpy(_torchable(a["x"]))
    dy = torch.from_dlpack(a["dy"]) if device == "cuda" else torch.from_numpy(_torchable(a["dy"]))
    if a["x"].dtype.name == "bfloat16" and device == "cpu":
        x, dy = x.view(torch.bfloat16), dy.view(torch.bfloat16)
    if a["axis"] == -1:  # NHWC memory as a channels_last NCHW tensor
        x, dy = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    conv = (lambda t: torch.from_dlpack(t)) if device == "cuda" else torch.from_numpy
    g, b, rm, rv = (conv(a[k]) for k in ("gamma", "beta", "rm", "rv"))
    _, sm, sr = torch.ops.aten.native_batch_norm(x, g, b, rm.clone(), rv.clone(), True, 0.1, 1e-5)
    z = dy
    yr = torch.relu(torch.ops.aten.native_batch_norm(x, g, b, rm.clone(), rv.clone(), True, 0.1, 1e-5)[0])
    # the fused ops as PyTorch runs them: BN, then (in place) add and ReLU; ReLU's backward, then BN's
    separate = {
        "train_relu": lambda bn: bn().relu_(),
        "train_add_relu": lambda bn: bn().add_(z).relu_(),
    }
    relu_backward = lambda: torch.ops.aten.native_batch_norm_backward(  # noqa: E731
        torch.ops.aten.threshold_backward(dy, yr, 0), x, g, rm, rv, sm, sr, True, 1e-5, [True, True, True])

    def run(fn):
        def call():
            with torch.backends.cudnn.flags(enabled=cudnn):
                return fn()
        return call

    if cudnn:  # torch's public entry point picks cuDNN where it applies
        import torch.nn.functional as F
        xg = x.detach().requires_grad_(False)
        bn = lambda: F.batch_norm(xg, rm, rv, g, b, True, 0.1, 1e-5)  # noqa: E731
        return {
            "train": run(bn),
            "infer": run(lambda: F.batch_norm(xg, rm, rv, g, b, False, 0.1, 1e-5)),
            "backward": run(lambda: torch.ops.aten.native_batch_norm_backward(
                dy, x, g, rm, rv, sm, sr, True, 1e-5, [True, True, True])),
            **{op: run(lambda f=f: f(bn)) for op, f in separate.items()},
            "backward_relu": run(relu_backward),
        }
    bn = lambda: torch.ops.aten.native_batch_norm(x, g, b, rm, rv, True, 0.1, 1e-5)[0]  # noqa: E731
    return {
        "train": run(lambda: torch.ops.aten.native_batch_norm(x, g, b, rm, rv, True, 0.1, 1e-5)),
        "infer": run(lambda: torch.ops.aten.native_batch_norm(x, g, b, rm, rv, False, 0.1, 1e-5)),
        "backward": run(lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, g, rm, rv, sm, sr, True, 1e-5, [True, True, True])),
        **{op: run(lambda f=f: f(bn)) for op, f in separate.items()},
        "backward_relu": run(relu_backward),
    }


def _torchable(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


CPU_PEER_NAMES = ["pybn_separate", "numpy", "torch", *CPU_PEERS]
GPU_PEER_NAMES = ["pybn_separate", "torch_cudnn", "torch_native", "cupy"]


def peers_for(case: Case, device: str, a, xp, wanted: Optional[List[str]] = None) -> Dict[str, Any]:
    """name -> ops dict, or a string saying why the peer is missing; `wanted` filters (--peers)."""
    peers: Dict[str, Any] = {}
    keep = (lambda n: True) if not wanted else (lambda n: n in wanted)
    if keep("pybn_separate"):
        peers["pybn_separate"] = separate_ops(a, xp)
    if device == "cpu":
        if keep("numpy"):
            peers["numpy"] = array_ops(a, np) if case.dtype == "float32" else "float32 only"
        if keep("torch"):
            peers["torch"] = _try_torch(a, "cpu", cudnn=False)
        for name, make in CPU_PEERS.items():
            if keep(name):
                try:
                    peers[name] = make(a, pybn.get_num_threads())
                except Exception as e:  # a peer's own failure is reported, never fatal
                    peers[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        return peers
    else:
        if keep("torch_cudnn"):
            peers["torch_cudnn"] = _try_torch(a, "cuda", cudnn=True)
        if keep("torch_native"):
            peers["torch_native"] = _try_torch(a, "cuda", cudnn=False)
        if keep("cupy"):
            peers["cupy"] = array_ops(a, xp) if case.dtype == "float32" else "float32 only"
    return peers


def _try_torch(a, device, cudnn):
    try:
        import torch
    except ImportError:
        return "PyTorch not installed"
    if device == "cuda" and not torch.cuda.is_available():
        return "PyTorch without CUDA"
    try:
        ops = torch_ops(a, device, cudnn)
        for f in ops.values():
            f()
        return ops
    except Exception as e:  # a dtype / layout this build of PyTorch does not run
        return f"PyTorch error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


# ------------------------------------------------------------------------------------------------
# Timing

def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class CpuTimer:
    name = "cpu"

    def __init__(self, repeat: int):
        self.repeat = repeat

    def copy_fn(self, nbytes: int):
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        return lambda: np.copyto(dst, src)

    def median(self, fn) -> float:
        fn()
        return float(np.median([_t(fn) for _ in range(self.repeat)]))

    def interleaved(self, fns: Dict[str, Callable[[], Any]], copy) -> Dict[str, Tuple[float, float, Dict[str, float]]]:
        """Every contender timed in the same rounds: each round times the copy, then each
        function once (in turn, the order reversed every other round), so that a machine whose
        speed drifts (a shared VM) moves every contender alike and the ratios hold. Per function:
        (median time, median of the round's copy / time, {min, median, max, copy_median})."""
        names = list(fns)
        for name in names:
            fns[name]()
        times: Dict[str, List[float]] = {n: [] for n in names}
        copies: List[float] = []
        for r in range(self.repeat):
            copies.append(_t(copy))
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(_t(fns[name]))
        out = {}
        for name, ts in times.items():
            spread = dict(min=float(min(ts)), median=float(np.median(ts)), max=float(max(ts)),
                          copy_median=float(np.median(copies)))
            out[name] = (float(np.median(ts)), float(np.median([c / t for c, t in zip(copies, ts)])), spread)
        return out


class GpuTimer:
    """CUDA-event timing through cupyx.profiler.benchmark (warm-up included)."""

    name = "cuda"

    def __init__(self, repeat: int):
        import cupy
        from cupyx.profiler import benchmark
        self.cp, self.benchmark, self.repeat = cupy, benchmark, max(repeat, 20)

    def copy_fn(self, nbytes: int):
        src = self.cp.ones(nbytes // 4, self.cp.float32)
        dst = self.cp.empty_like(src)
        return lambda: self.cp.copyto(dst, src)

    def median(self, fn) -> float:
        r = self.benchmark(fn, n_repeat=self.repeat, n_warmup=5)
        return float(np.median(r.gpu_times[0]))

    def median_vs_copy(self, fn, copy) -> Tuple[float, float, Dict[str, float]]:
        r = self.benchmark(fn, n_repeat=self.repeat, n_warmup=5).gpu_times[0]
        t, c = float(np.median(r)), self.median(copy)
        return t, c / t, dict(min=float(np.min(r)), median=t, max=float(np.max(r)), copy_median=c)

    def interleaved(self, fns: Dict[str, Callable[[], Any]], copy) -> Dict[str, Tuple[float, float, Dict[str, float]]]:
        """CUDA-event times are the GPU's own, not the host's: one function after the other."""
        return {name: self.median_vs_copy(fn, copy) for name, fn in fns.items()}


# ------------------------------------------------------------------------------------------------

def environment(devices: List[str]) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(), "numpy": np.__version__, "pybn": pybn.__version__,
        "cpu": _cpu_name(), "cpu_isa": pybn.cpu_isa(), "threads": pybn.get_num_threads(),
        "pybn_has_cuda": pybn.has_cuda(),
    }
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    if "cuda" in devices:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        env.update(cupy=cupy.__version__, gpu=props["name"].decode(),
                   driver=cupy.cuda.runtime.driverGetVersion(), runtime=cupy.cuda.runtime.runtimeGetVersion())
    return env


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on this OS
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_available() -> bool:
    if not pybn.has_cuda():
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def progress(i: int, n: int, what: str) -> None:
    if sys.stderr.isatty() or os.environ.get("PYBN_BENCH_PROGRESS"):
        bar = "#" * (30 * i // n)
        sys.stderr.write(f"\r[{bar:<30}] {i}/{n} {what:<48}")
        sys.stderr.flush()


def run(args) -> Dict[str, Any]:
    devices = ["cpu"] + (["cuda"] if gpu_available() else [])
    devices = [d for d in devices if not args.device or d in args.device]
    cases = [c for c in all_cases(args.quick)
             if (not args.dtype or c.dtype in args.dtype) and (not args.layout or c.layout in args.layout)
             and (not args.shape or any(s in c.name for s in args.shape))]
    ops = [o for o in PASSES if not args.op or o in args.op]
    rng = np.random.default_rng(0)
    load_start = _loadavg()
    rows, total, done = [], len(cases) * len(devices), 0
    ceilings: Dict[str, List[float]] = {}
    for device in devices:
        timer = CpuTimer(args.repeat) if device == "cpu" else GpuTimer(args.repeat)
        xp = np if device == "cpu" else timer.cp
        for case in cases:
            done += 1
            progress(done, total, f"{device} {case.name} {case.layout} {case.dtype}")
            try:
                a = make_inputs(case, xp, rng)
            except (ImportError, TypeError) as e:
                rows.append(dict(device=device, case=case.name, layout=case.layout, dtype=case.dtype,
                                 op=None, error=f"inputs: {e}"))
                continue
            nbytes = a["x"].nbytes
            copy = timer.copy_fn(nbytes)
            ceilings.setdefault(device, []).append(2 * nbytes / timer.median(copy))
            ours, ours_out = pybn_ops(a, fresh=True), pybn_ops(a, fresh=False)
            peers = peers_for(case, device, a, xp, args.peers)
            for op in ops:
                # pybn (fresh and out=) and every peer that offers the op, in the same rounds
                contenders = {"pybn": ours[op], "pybn_out": ours_out[op]}
                contenders.update({"peer:" + n: p[op] for n, p in peers.items() if isinstance(p, dict) and op in p})
                timed = timer.interleaved(contenders, copy)
                t, copy_ratio, spread = timed["pybn"]
                t_out, ratio_out, spread_out = timed["pybn_out"]
                row = dict(device=device, case=case.name, shape=list(case.shape), layout=case.layout,
                           dtype=case.dtype, op=op, bytes=nbytes, pybn_s=t, pybn_spread=spread,
                           pybn_out_s=t_out, pybn_out_spread=spread_out,
                           roofline=copy_ratio * PASSES[op] / 2, roofline_out=ratio_out * PASSES[op] / 2,
                           copy_GBps=2 * nbytes / spread["copy_median"], peers={})
                for name, p in peers.items():
                    if isinstance(p, dict) and op not in p:
                        why = ("fused ops only" if name == "pybn_separate" and op not in FUSED else
                               "unfused ops only" if op in FUSED and name == "pybn_separate" else "op not offered")
                        row["peers"][name] = {"missing": why}
                    elif isinstance(p, dict):
                        tp, _, sp = timed["peer:" + name]
                        row["peers"][name] = {"s": tp, "spread": sp}
                    else:
                        row["peers"][name] = {"missing": p}
                rows.append(row)
            del a, ours, ours_out, peers
    if total:
        progress(total, total, "done")
        sys.stderr.write("\n")
    env = environment(devices)
    env["loadavg_end"] = _loadavg()
    env["loadavg_start"] = load_start
    return {"environment": env,
            "copy_bandwidth_GBps": {d: float(np.median(v)) / 1e9 for d, v in ceilings.items()},
            "rows": rows}


def print_table(result: Dict[str, Any]) -> None:
    env = result["environment"]
    print(f"pybn {env['pybn']} ({env['cpu_isa']}, {env['threads']} threads) on {env['cpu']}"
          + (f"; GPU {env['gpu']}" if "gpu" in env else "; no GPU")
          + f"; PyTorch {env['torch'] or 'missing'}")
    print("copy bandwidth (same run): " + ", ".join(f"{d} {v:.1f} GB/s" for d, v in result["copy_bandwidth_GBps"].items()))
    peer_names = sorted({n for r in result["rows"] if r.get("op") for n in r["peers"]})
    if env.get("loadavg_start") is not None:
        print(f"load average (1, 5, 15 min): {env['loadavg_start']} at the start, {env['loadavg_end']} at the end")
    print("pybn ms: fresh outputs (as users call it); out ms: with out= (the kernel alone); vs X: X's time / "
          "pybn's fresh time")
    head = f"{'device':6} {'case':16} {'layout':6} {'dtype':8} {'op':14} {'pybn ms':>9} {'out ms':>9} {'%roof':>6}"
    print(head + "".join(f" {'vs ' + n:>14}" for n in peer_names))
    missing: Dict[str, Any] = {}
    busy: List[str] = []
    for r in result["rows"]:
        if not r.get("op"):
            print(f"{r['device']:6} {r['case']:16} {r['layout']:6} {r['dtype']:8} skipped: {r['error']}")
            continue
        line = (f"{r['device']:6} {r['case']:16} {r['layout']:6} {r['dtype']:8} {r['op']:14} "
                f"{r['pybn_s'] * 1e3:9.3f} {r.get('pybn_out_s', float('nan')) * 1e3:9.3f} {r['roofline'] * 100:5.0f}%")
        sp = r.get("pybn_spread")
        if sp and sp["max"] > BUSY_SPREAD * sp["min"]:
            busy.append(f"{r['case']} {r['layout']} {r['dtype']} {r['op']}")
            line += " *"
        for n in peer_names:
            p = r["peers"].get(n)
            if p is None or "missing" in p:
                line += f" {'missing':>14}"
                if p is not None:
                    missing[n] = missing.get(n, set()) | {p["missing"]}
            else:
                line += f" {p['s'] / r['pybn_s']:13.2f}x"
        print(line)
    for n, why in missing.items():
        print(f"missing {n}: " + "; ".join(sorted(why)))
    if busy:
        print(f"warning: {len(busy)} row(s) marked * had samples more than {BUSY_SPREAD:g}x apart (max / min of "
              "pybn's samples): the machine was busy; their ratios are unreliable, rerun them (--shape / --op)")


PLOT_OPS = {"train": "training forward", "infer": "inference", "backward": "backward"}
ROOFLINE_NOTE = ("Above 100 %: the % counts the minimum passes over DRAM (train 3, infer 2, backward 5) against a\n"
                 "1-thread copy of the same bytes; in-cache tensors (or channel groups a fused kernel sweeps twice\n"
                 "while cached) move fewer DRAM bytes, and pybn writes with 2 threads and streaming stores.")


def plot(result: Dict[str, Any], out: str) -> List[str]:
    """speedup_<device>.png: pybn against each peer, one panel per op (training forward,
    inference, backward); roofline.png: % of the copy roofline against size, marker = op,
    colour = dtype, filled = NCHW / hollow = NHWC, with why points exceed 100 %."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = [r for r in result["rows"] if r.get("op")]
    # 1. speed-up over each peer, per case, one panel per op
    for device in sorted({r["device"] for r in rows}):
        ops = [op for op in PLOT_OPS if any(r["device"] == device and r["op"] == op for r in rows)]
        if not ops:
            continue
        n = max(len([r for r in rows if r["device"] == device and r["op"] == op]) for op in ops)
        fig, axes = plt.subplots(len(ops), 1, figsize=(max(6, 0.45 * n), 3.6 * len(ops)), squeeze=False)
        for ax, op in zip(axes[:, 0], ops):
            sel = [r for r in rows if r["device"] == device and r["op"] == op]
            labels = [f"{r['case']} {r['layout']} {r['dtype']}" for r in sel]
            peers = sorted({n for r in sel for n, p in r["peers"].items() if "s" in p})
            width = 0.8 / max(1, len(peers))
            for k, name in enumerate(peers):
                sp = [r["peers"][name]["s"] / r["pybn_s"] if "s" in r["peers"].get(name, {}) else 0 for r in sel]
                ax.bar(np.arange(len(sel)) + k * width, sp, width, label=f"pybn vs {name}")
            ax.axhline(1, color="k", lw=0.8)
            ax.set_xticks(np.arange(len(sel)) + 0.4 - width / 2)
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("peer time / pybn time")
            ax.set_title(f"{PLOT_OPS[op]} on {device}: pybn against peers (> 1: pybn faster)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(os.path.join(out, f"speedup_{device}.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    # 2. % of the copy roofline against tensor size
    fig, ax = plt.subplots(figsize=(8, 5.5))
    dtypes = sorted({r["dtype"] for r in rows})
    colours = {d: f"C{i}" for i, d in enumerate(dtypes)}
    markers = dict(zip(PASSES, "o^sDvP"))
    for device in sorted({r["device"] for r in rows}):
        for op in PASSES:
            for dt in dtypes:
                for layout in ("nchw", "nhwc"):
                    sel = [r for r in rows if (r["device"], r["op"], r["dtype"], r["layout"]) == (device, op, dt, layout)]
                    if not sel:
                        continue
                    c = colours[dt]
                    ax.scatter([r["bytes"] / 1e6 for r in sel], [100 * r["roofline"] for r in sel],
                               marker=markers[op], alpha=0.8, s=30,
                               facecolors=c if layout == "nchw" else "none", edgecolors=c)
    ax.axhline(100, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("size of x (MB)")
    ax.set_ylabel("% of copy roofline (minimum passes)")
    ax.set_title("pybn against the memory-bandwidth limit\n(marker: op; colour: dtype; filled: NCHW, hollow: NHWC)",
                 fontsize=10)
    from matplotlib.lines import Line2D  # one legend entry per op, dtype and layout, not per combination
    shown = {r["op"] for r in rows}
    handles = ([Line2D([], [], ls="", marker=markers[op], color="0.3", label=op) for op in PASSES if op in shown]
               + [Line2D([], [], ls="", marker="s", color=colours[d], label=d) for d in dtypes]
               + [Line2D([], [], ls="", marker="o", color="0.3", label="NCHW (filled)"),
                  Line2D([], [], ls="", marker="o", markerfacecolor="none", color="0.3", label="NHWC (hollow)")])
    ax.legend(handles=handles, fontsize=7, ncol=2, loc="lower right")
    fig.text(0.01, 0.01, ROOFLINE_NOTE, fontsize=6.5, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    files.append(os.path.join(out, "roofline.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small subset (< 2 minutes on 2 CPU cores)")
    ap.add_argument("--out", help="folder for results.json and the PNG plots")
    ap.add_argument("--repeat", type=int, default=None, help="samples per measurement (default 5 quick, 9 full)")
    ap.add_argument("--op", nargs="*", choices=list(PASSES), help="ops to run")
    ap.add_argument("--dtype", nargs="*", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--layout", nargs="*", choices=["nchw", "nhwc"])
    ap.add_argument("--shape", nargs="*", help="keep cases whose name contains one of these, e.g. 64x56")
    ap.add_argument("--device", nargs="*", choices=["cpu", "cuda"])
    ap.add_argument("--peers", nargs="*", choices=sorted(set(CPU_PEER_NAMES + GPU_PEER_NAMES)),
                    help="peers to run (default: all; each missing one is reported with the reason)")
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 5 if args.quick else 9
    result = run(args)
    print_table(result)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        try:
            files = plot(result, args.out)
        except ImportError:
            files = []
            print("plots skipped: matplotlib is not installed (pip install 'pybn-kernels[bench]')")
        print("wrote " + ", ".join([os.path.join(args.out, "results.json")] + files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
