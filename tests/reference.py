"""Float64 NumPy reference of batch normalisation, written from the definitions (two-pass
statistics, explicit gradient formulas); every array is upcast to float64 first."""
import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _bcast(p, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def _reduce_axes(ndim, axis):
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def stats(x, axis=1):
    """(count, mean, biased var) per channel."""
    x = _f64(x)
    red = _reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis]
    mean = x.mean(axis=red)
    var = ((x - _bcast(mean, x.ndim, axis)) ** 2).mean(axis=red)
    return n, mean, var


def forward_train(x, gamma=None, beta=None, eps=1e-5, axis=1):
    """(y, mean, invstd, unbiased var) with batch statistics."""
    xd = _f64(x)
    n, mean, var = stats(xd, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    c = xd.shape[axis]
    g = np.ones(c) if gamma is None else _f64(gamma)
    b = np.zeros(c) if beta is None else _f64(beta)
    xhat = (xd - _bcast(mean, xd.ndim, axis)) * _bcast(invstd, xd.ndim, axis)
    y = xhat * _bcast(g, xd.ndim, axis) + _bcast(b, xd.ndim, axis)
    return y, mean, invstd, var * n / (n - 1)


def forward_infer(x, running_mean, running_var, gamma=None, beta=None, eps=1e-5, axis=1):
    xd = _f64(x)
    c = xd.shape[axis]
    g = np.ones(c) if gamma is None else _f64(gamma)
    b = np.zeros(c) if beta is None else _f64(beta)
    invstd = 1.0 / np.sqrt(_f64(running_var) + eps)
    return (xd - _bcast(_f64(running_mean), xd.ndim, axis)) * _bcast(invstd * g, xd.ndim, axis) \
        + _bcast(b, xd.ndim, axis)


def ema(running, batch, momentum):
    return (1.0 - momentum) * _f64(running) + momentum * batch


def backward_train(dy, x, gamma=None, eps=1e-5, axis=1):
    """(dx, dgamma, dbeta) through the batch statistics of x."""
    dy, xd = _f64(dy), _f64(x)
    red = _reduce_axes(xd.ndim, axis)
    n, mean, var = stats(xd, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    c = xd.shape[axis]
    g = np.ones(c) if gamma is None else _f64(gamma)
    xhat = (xd - _bcast(mean, xd.ndim, axis)) * _bcast(invstd, xd.ndim, axis)
    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    dx = _bcast(g * invstd, xd.ndim, axis) * (
        dy - _bcast(dbeta / n, xd.ndim, axis) - xhat * _bcast(dgamma / n, xd.ndim, axis))
    return dx, dgamma, dbeta


def backward_frozen(dy, x, mean, invstd, gamma=None, axis=1):
    """(dx, dgamma, dbeta) with mean and invstd held constant."""
    dy, xd = _f64(dy), _f64(x)
    red = _reduce_axes(xd.ndim, axis)
    c = xd.shape[axis]
    g = np.ones(c) if gamma is None else _f64(gamma)
    m, r = _f64(mean), _f64(invstd)
    xhat = (xd - _bcast(m, xd.ndim, axis)) * _bcast(r, xd.ndim, axis)
    return dy * _bcast(g * r, xd.ndim, axis), (dy * xhat).sum(axis=red), dy.sum(axis=red)
