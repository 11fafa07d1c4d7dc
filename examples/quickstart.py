"""A few steps of pybn.BatchNorm on random NCHW data, checked against a NumPy float64 reference,
with the time per call next to a plain NumPy implementation."""
import time

import numpy as np

import pybn


def numpy_batchnorm(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma[None, :, None, None] + beta[None, :, None, None]


def median_time(fn, repeat=7):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    bn = pybn.BatchNorm(64)
    print(f"pybn {pybn.__version__}, CPU path {pybn.cpu_isa()}, CUDA {pybn.has_cuda()}")
    for step in range(3):
        x = (rng.standard_normal((32, 64, 56, 56)) * (1 + step) + 1e4).astype(np.float32)
        y = bn(x)
        dx = bn.backward(rng.standard_normal(x.shape).astype(np.float32))
        ref = numpy_batchnorm(x.astype(np.float64), bn.gamma, bn.beta)
        print(f"step {step}: max |y - float64 reference| = {np.abs(y - ref).max():.2e}, "
              f"running_mean[0] = {bn.running_mean[0]:.3f}, |dx| = {np.abs(dx).max():.3f}")
    t_pybn = median_time(lambda: pybn.batchnorm(x, bn.gamma, bn.beta))
    t_numpy = median_time(lambda: numpy_batchnorm(x, bn.gamma, bn.beta))
    mb = x.nbytes / 1e6
    print(f"training forward on {x.shape} float32 ({mb:.0f} MB): pybn {t_pybn * 1e3:.1f} ms, "
          f"NumPy {t_numpy * 1e3:.1f} ms ({t_numpy / t_pybn:.1f}x)")


if __name__ == "__main__":
    main()
