"""Optional CPU peers of bench/run.py: oneDNN (through PyTorch's mkldnn tensors), ONNX Runtime,
JAX / XLA and TensorFlow's fused batch norm. Each returns {op: callable} for the ops it runs (the
callable returns when the result is ready: fresh outputs, as each framework's users get them), or
a string saying why it is missing. Every peer runs with the thread count pybn uses."""
from __future__ import annotations

from typing import Any, Callable, Dict, Union

import numpy as np

Ops = Union[Dict[str, Callable[[], Any]], str]
EPS, MOMENTUM = 1e-5, 0.1


def _reduce_axes(ndim: int, axis: int):
    return tuple(i for i in range(ndim) if i != axis % ndim)


def onednn(a, threads: int) -> Ops:
    """oneDNN's batch normalisation through PyTorch's mkldnn tensors (NCHW float32 4-D only)."""
    try:
        import torch
    except ImportError:
        return "PyTorch (for its mkldnn tensors) not installed"
    x = a["x"]
    if x.dtype != np.float32 or x.ndim != 4 or a["axis"] != 1:
        return "NCHW float32 4-D only (mkldnn tensors)"
    if not torch.backends.mkldnn.is_available():
        return "PyTorch built without oneDNN"
    torch.set_num_threads(threads)
    xm, dym = torch.from_numpy(x).to_mkldnn(), torch.from_numpy(a["dy"]).to_mkldnn()
    g, b, rm, rv = (torch.from_numpy(a[k]).clone() for k in ("gamma", "beta", "rm", "rv"))
    _, sm, sr = torch.ops.aten.native_batch_norm(xm, g, b, rm.clone(), rv.clone(), True, MOMENTUM, EPS)
    ops = {
        "train": lambda: torch.ops.aten.native_batch_norm(xm, g, b, rm, rv, True, MOMENTUM, EPS),
        "infer": lambda: torch.ops.aten.native_batch_norm(xm, g, b, rm, rv, False, MOMENTUM, EPS),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(dym, xm, g, rm, rv, sm, sr, True, EPS,
                                                                      [True, True, True]),
    }
    return _checked(ops, "oneDNN")


def onnxruntime(a, threads: int) -> Ops:
    """ONNX Runtime's BatchNormalization (opset 15): training mode (running statistics as
    outputs) and inference; no backward (the inference package has no BN gradient)."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return "onnx / onnxruntime not installed"
    x = a["x"]
    if a["axis"] != 1:
        return "channel axis 1 only (ONNX BatchNormalization)"
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}.get(x.dtype)
    if elem is None:
        return f"no {x.dtype.name} input in this comparison"
    c = x.shape[1]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1

    def session(training: bool):
        ins = [helper.make_tensor_value_info("x", elem, list(x.shape))]
        inits = [helper.make_tensor(n, elem, [c], a[k].astype(x.dtype).ravel().tolist())
                 for n, k in (("scale", "gamma"), ("B", "beta"), ("mean", "rm"), ("var", "rv"))]
        outs = [helper.make_tensor_value_info("y", elem, list(x.shape))]
        node_outs = ["y"]
        if training:
            outs += [helper.make_tensor_value_info(n, elem, [c]) for n in ("rm_out", "rv_out")]
            node_outs += ["rm_out", "rv_out"]
        node = helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], node_outs,
                                epsilon=EPS, momentum=1 - MOMENTUM, training_mode=int(training))
        graph = helper.make_graph([node], "bn", ins, outs, initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        model.ir_version = min(model.ir_version, 8)
        onnx.checker.check_model(model)
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    try:
        train, infer = session(True), session(False)
    except Exception as e:  # an unsupported dtype / shape in this build
        return f"ONNX Runtime error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    feed = {"x": x}
    ops = {"train": lambda: train.run(None, feed), "infer": lambda: infer.run(None, feed)}
    return _checked(ops, "ONNX Runtime")


def jax_xla(a, threads: int) -> Ops:
    """BN written in jax.numpy and compiled by XLA (jit; the backward by jax.vjp)."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return "JAX not installed"
    x = a["x"]
    ax = a["axis"] % x.ndim
    red = _reduce_axes(x.ndim, ax)
    sh = [1] * x.ndim
    sh[ax] = -1
    try:
        xj, dyj = jnp.asarray(x), jnp.asarray(a["dy"])
        g, b, rm, rv = (jnp.asarray(a[k]) for k in ("gamma", "beta", "rm", "rv"))
    except Exception as e:
        return f"JAX error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"

    def fwd(x, g, b, rm, rv):
        x32 = x.astype(jnp.float32)
        m = x32.mean(axis=red)
        v = x32.var(axis=red)
        y = (x32 - m.reshape(sh)) * jax.lax.rsqrt(v.reshape(sh) + EPS) * g.reshape(sh) + b.reshape(sh)
        n = x.size // x.shape[ax]
        return y.astype(x.dtype), (1 - MOMENTUM) * rm + MOMENTUM * m, (1 - MOMENTUM) * rv + MOMENTUM * v * n / (n - 1)

    def infer(x, g, b, rm, rv):
        x32 = x.astype(jnp.float32)
        return ((x32 - rm.reshape(sh)) * (g * jax.lax.rsqrt(rv + EPS)).reshape(sh) + b.reshape(sh)).astype(x.dtype)

    def bwd(dy, x, g, b):
        _, vjp = jax.vjp(lambda x, g, b: fwd(x, g, b, rm, rv)[0], x, g, b)
        return vjp(dy)

    train_j, infer_j, bwd_j = jax.jit(fwd), jax.jit(infer), jax.jit(bwd)
    ops = {
        "train": lambda: jax.block_until_ready(train_j(xj, g, b, rm, rv)),
        "infer": lambda: jax.block_until_ready(infer_j(xj, g, b, rm, rv)),
        "backward": lambda: jax.block_until_ready(bwd_j(dyj, xj, g, b)),
    }
    return _checked(ops, "JAX")


def tensorflow(a, threads: int) -> Ops:
    """TensorFlow's fused batch norm (tf.compat.v1.nn.fused_batch_norm, NHWC on the CPU) in a
    tf.function; the backward by a GradientTape in the same function."""
    try:
        import tensorflow as tf
    except ImportError:
        return "TensorFlow not installed"
    x = a["x"]
    if x.ndim != 4 or a["axis"] != -1:
        return "NHWC 4-D only (TensorFlow's fused batch norm on the CPU)"
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised: the setting of the first case stays
        pass
    try:
        xt, dyt = tf.constant(x), tf.constant(a["dy"])
        g, b, rm, rv = (tf.constant(a[k]) for k in ("gamma", "beta", "rm", "rv"))
    except Exception as e:
        return f"TensorFlow error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    fbn = tf.compat.v1.nn.fused_batch_norm

    @tf.function
    def train():
        return fbn(xt, g, b, mean=rm, variance=rv, epsilon=EPS, is_training=True, exponential_avg_factor=MOMENTUM)

    @tf.function
    def infer():
        return fbn(xt, g, b, mean=rm, variance=rv, epsilon=EPS, is_training=False)[0]

    @tf.function
    def bwd():
        with tf.GradientTape() as tape:
            tape.watch([xt, g, b])
            y = fbn(xt, g, b, epsilon=EPS, is_training=True)[0]
        return tape.gradient(y, [xt, g, b], output_gradients=dyt)

    # eager execution is synchronous on the CPU: a call returns with its results computed
    return _checked({"train": train, "infer": infer, "backward": bwd}, "TensorFlow")


def _checked(ops: Dict[str, Callable[[], Any]], name: str) -> Ops:
    """Runs each op once (compiles / warms up); ops that fail are dropped with the reason kept
    for the table."""
    good = {}
    why = ""
    for op, f in ops.items():
        try:
            f()
            good[op] = f
        except Exception as e:  # a dtype / layout / shape this peer does not run
            why = f"{name} error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return good if good else (why or f"{name}: nothing runs")


CPU_PEERS = {"onednn": onednn, "onnxruntime": onnxruntime, "jax": jax_xla, "tensorflow": tensorflow}
