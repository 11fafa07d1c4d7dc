// Per-channel formulas shared by the CPU API and the CUDA kernels, so both compute the same
// coefficients from the same statistics. All arithmetic is float64; results are rounded once to
// the parameter type P (float or double).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PYBN_HD __host__ __device__ inline
#else
#define PYBN_HD inline
#endif

namespace pybn {

// y = ((x - hi) - lo) * scale + shift, with hi + lo the float64 mean split into two P values so
// that x - hi is exact for x near the mean: the mean survives rounding to P.
template <class P> struct NormCoef { P hi, lo, scale, shift; };

template <class P>
PYBN_HD NormCoef<P> train_coef(double mean, double invstd, double gamma, double beta) {
    const P hi = P(mean);
    return {hi, P(mean - double(hi)), P(gamma * invstd), P(beta)};
}

template <class P>
PYBN_HD NormCoef<P> infer_coef(P running_mean, double running_var, double eps, double gamma,
                               double beta) {
    return {running_mean, P(0), P(gamma / std::sqrt(running_var + eps)), P(beta)};
}

PYBN_HD double invstd_of(double count, double m2, double eps) {
    return 1.0 / std::sqrt(m2 / count + eps);
}

// Exponential moving average, PyTorch's convention: unbiased variance for running_var.
PYBN_HD double ema(double running, double batch, double momentum) {
    return (1.0 - momentum) * running + momentum * batch;
}

// dx = a * dy + b * (x - mean) + c, and the parameter gradients.
template <class P> struct BackCoef { P a, b, c; P dgamma, dbeta; };

template <class P>
PYBN_HD BackCoef<P> backward_coef(bool training, double count, double invstd, double gamma,
                                  double sum_dy, double sum_dy_xmu, double sum_xmu) {
    const double a = gamma * invstd;
    if (!training) return {P(a), P(0), P(0), P(invstd * sum_dy_xmu), P(sum_dy)};
    // d: the part of the batch mean that `mean` (rounded to P) lost; s: sum(dy * (x - true mean))
    const double d = sum_xmu / count;
    const double s = sum_dy_xmu - d * sum_dy;
    const double b = -a * invstd * invstd * s / count;
    return {P(a), P(b), P(-a * sum_dy / count - b * d), P(invstd * s), P(sum_dy)};
}

}  // namespace pybn
