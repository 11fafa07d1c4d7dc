// Per-channel formulas shared by the CPU kernels and API and by the CUDA kernels, so both paths
// compute the same statistics and coefficients the same way. Arithmetic is float64; results
// are rounded once to the parameter type P (float or double).
#pragma once

#include <cmath>
#include <cstdint>

#include "numerics.hpp"
#include "pybn/pybn.h"

namespace pybn {
inline namespace PYBN_ISA_TAG {

// Running (count, mean, M2) in float64, merged with Chan, Golub & LeVeque's formula. The mean is
// carried relative to `base` (the first shift seen), so merging rounds at the scale of the
// spread, not at the scale of a mean far from zero.
struct Moments {
    double base = 0, n = 0, rel_mean = 0, m2 = 0;

    PYBN_HD void merge(const Moments& o) {
        if (o.n == 0) return;
        if (n == 0) {
            *this = o;
            return;
        }
        const double mb = (o.base - base) + o.rel_mean;
        const double nn = n + o.n;
        const double delta = mb - rel_mean;
        rel_mean += delta * (o.n / nn);
        m2 += o.m2 + delta * delta * (n * (o.n / nn));
        n = nn;
    }
    // A block of nb values with s = sum(x - shift), q = sum((x - shift)^2).
    PYBN_HD void merge_shifted(double nb, double shift, double s, double q) {
        double m2b = q - s * (s / nb);
        if (m2b < 0) m2b = 0;  // rounding only; a NaN stays NaN
        Moments b;
        b.base = shift;
        b.n = nb;
        b.rel_mean = s / nb;
        b.m2 = m2b;
        merge(b);
    }
    PYBN_HD double mean() const { return base + rel_mean; }
};

// Per-channel backward sums: sum(dy), sum(dy * (x - mean)), sum(x - mean).
struct Sums {
    double dy = 0, dy_xmu = 0, xmu = 0;
    PYBN_HD void merge(const Sums& o) {
        dy += o.dy;
        dy_xmu += o.dy_xmu;
        xmu += o.xmu;
    }
};

PYBN_HD double invstd_of(double count, double m2, double eps) {
    return 1.0 / std::sqrt(m2 / count + eps);
}

// True for finite values (NaN - NaN and Inf - Inf are NaN); the same on host and device.
PYBN_HD bool finite(double v) { return v - v == 0.0; }

// Exponential moving average of a running statistic (pybn's momentum: the batch's weight).
PYBN_HD double ema(double running, double batch, double momentum) {
    return (1.0 - momentum) * running + momentum * batch;
}

// v clipped to [lo, hi]; a NaN stays NaN.
PYBN_HD double clip(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <class P> PYBN_HD double value_or(const void* p, int64_t c, double fallback) {
    return p ? double(static_cast<const P*>(p)[c]) : fallback;
}

// The running statistics' update of channel c from a batch's mean and variance estimate var
// (running_var_correction applied). Non-finite data policy: a channel whose batch statistics
// are not finite (NaN / Inf in its values, or a sum that overflowed: batch_finite false) leaves
// its running statistics as they were, and so does an update that would overflow them; the
// batch's own outputs carry the NaN / Inf.
template <class P>
PYBN_HD void update_running(const pybn_forward_params& p, int64_t c, double mean, double var, bool batch_finite) {
    if (p.running_mean) {
        P* rmean = static_cast<P*>(p.running_mean);
        const P rm = P(ema(double(rmean[c]), mean, p.momentum));
        if (batch_finite && finite(double(rm))) rmean[c] = rm;
    }
    if (p.running_var) {
        // running_var_correction 1: unbiased M2 / (n - 1) (PyTorch); 0: biased M2 / n (ONNX, Keras)
        P* rvar = static_cast<P*>(p.running_var);
        const P rv = P(ema(double(rvar[c]), var, p.momentum));
        if (batch_finite && finite(double(rv))) rvar[c] = rv;
    }
}

// Normalisation coefficients, struct-of-arrays coef[4*C] = [hi | lo | scale | shift]:
// y = ((x - hi) - lo) * scale + shift, with hi + lo the float64 mean split into two P values so
// that x - hi is exact for x near the mean: the mean survives rounding to P.
// `p` is the caller's parameter block as the kernels see it (its pointers may be redirected to
// copies that are written back after the kernel).
template <class P> struct NormalizeArgs {
    int64_t channels;
    pybn_forward_params p;
    P* coef;  // 4 * channels
};

template <class P>
PYBN_HD void normalize_channel(const NormalizeArgs<P>& a, int64_t c, double count, double mean,
                               double m2) {
    const int64_t C = a.channels;
    const double invstd = invstd_of(count, m2, a.p.eps);
    const P hi = P(mean);
    double scale = value_or<P>(a.p.gamma, c, 1.0) * invstd, shift = value_or<P>(a.p.beta, c, 0.0);
    if (a.p.renorm_r_max > 0) {  // batch renormalisation, from the running statistics before their update
        const double sigma_run = std::sqrt(double(static_cast<const P*>(a.p.running_var)[c]) + a.p.eps);
        const double r = clip(std::sqrt(m2 / count + a.p.eps) / sigma_run, 1.0 / a.p.renorm_r_max, a.p.renorm_r_max);
        const double d = clip((mean - double(static_cast<const P*>(a.p.running_mean)[c])) / sigma_run,
                              -a.p.renorm_d_max, a.p.renorm_d_max);
        shift += value_or<P>(a.p.gamma, c, 1.0) * d;
        scale *= r;
        if (a.p.save_renorm_r) static_cast<P*>(a.p.save_renorm_r)[c] = P(r);
        if (a.p.save_renorm_d) static_cast<P*>(a.p.save_renorm_d)[c] = P(d);
    }
    a.coef[c] = hi;
    a.coef[C + c] = P(mean - double(hi));
    a.coef[2 * C + c] = P(scale);
    a.coef[3 * C + c] = P(shift);
    update_running<P>(a.p, c, mean, m2 / (count - double(a.p.running_var_correction)), finite(mean) && finite(m2));
    if (a.p.save_mean) static_cast<P*>(a.p.save_mean)[c] = P(mean);
    if (a.p.save_invstd) static_cast<P*>(a.p.save_invstd)[c] = P(invstd);
}

// Ghost batches (virtual_batches = G > 1): channel c of G groups of `count` values each, group
// g's mean and M2 at [g * C + c]. Each group is normalised with its own statistics (its
// coefficients at coef + g * 4 * C, its saved mean / invstd at [g * C + c]); the running
// statistics are updated once, from the average of the group means and the average of the
// group variances (each M2_g / (count - running_var_correction)): Keras's virtual_batch_size.
template <class P>
PYBN_HD void ghost_channel(const NormalizeArgs<P>& a, int64_t groups, int64_t c, double count, const double* mean,
                           const double* m2) {
    const int64_t C = a.channels;
    NormalizeArgs<P> g = a;
    g.p.running_mean = g.p.running_var = nullptr;  // updated once, below
    double sum_mean = 0, sum_var = 0;
    bool batch_finite = true;
    for (int64_t i = 0; i < groups; ++i) {
        const double mi = mean[i * C + c], qi = m2[i * C + c];
        g.coef = a.coef + i * 4 * C;
        g.p.save_mean = a.p.save_mean ? static_cast<P*>(a.p.save_mean) + i * C : nullptr;
        g.p.save_invstd = a.p.save_invstd ? static_cast<P*>(a.p.save_invstd) + i * C : nullptr;
        normalize_channel(g, c, count, mi, qi);
        sum_mean += mi;
        sum_var += qi / (count - double(a.p.running_var_correction));
        batch_finite = batch_finite && finite(mi) && finite(qi);
    }
    update_running<P>(a.p, c, sum_mean / double(groups), sum_var / double(groups), batch_finite);
}

// Inference: the running statistics are the statistics (only read).
template <class P> PYBN_HD void infer_channel(const NormalizeArgs<P>& a, int64_t c) {
    const int64_t C = a.channels;
    const P mean = static_cast<const P*>(a.p.running_mean)[c];
    const double var = double(static_cast<const P*>(a.p.running_var)[c]);
    a.coef[c] = mean;
    a.coef[C + c] = P(0);
    a.coef[2 * C + c] = P(value_or<P>(a.p.gamma, c, 1.0) / std::sqrt(var + a.p.eps));
    a.coef[3 * C + c] = P(value_or<P>(a.p.beta, c, 0.0));
    if (a.p.save_mean) static_cast<P*>(a.p.save_mean)[c] = mean;
    if (a.p.save_invstd) static_cast<P*>(a.p.save_invstd)[c] = P(1.0 / std::sqrt(var + a.p.eps));
}

// Backward coefficients coef[4*C] = [mean | a | b | c]: dx = a * dy + b * (x - mean) + c,
// and the parameter gradients. `p` as the kernels see it; count_all: values per channel when
// p.count is null.
template <class P> struct BackwardArgs {
    int64_t channels;
    pybn_backward_params p;
    double count_all;
    P* coef;  // 4 * channels
};

// Returns dgamma (float64) for callers that sum it over ghost batches.
template <class P>
PYBN_HD double backward_channel(const BackwardArgs<P>& a, int64_t c, double sum_dy,
                                double sum_dy_xmu, double sum_xmu) {
    const int64_t C = a.channels;
    const double invstd = double(static_cast<const P*>(a.p.invstd)[c]);
    double ga = value_or<P>(a.p.gamma, c, 1.0) * invstd;
    if (a.p.renorm_r) ga *= double(static_cast<const P*>(a.p.renorm_r)[c]);  // renormalised: gamma * r
    double b = 0, offset = 0, dgamma = invstd * sum_dy_xmu;
    if (a.p.training) {
        // d: the part of the batch mean that `mean` (rounded to P) lost; s: sum(dy * (x - mean))
        // about the true batch mean.
        const double n = a.p.count ? a.p.count[c] : a.count_all;
        const double d = sum_xmu / n;
        const double s = sum_dy_xmu - d * sum_dy;
        b = -ga * invstd * invstd * s / n;
        offset = -ga * sum_dy / n - b * d;
        dgamma = invstd * s;
        if (a.p.renorm_r)  // y = gamma * (r x_hat + d) + beta, r and d constants
            dgamma = double(static_cast<const P*>(a.p.renorm_r)[c]) * dgamma +
                     double(static_cast<const P*>(a.p.renorm_d)[c]) * sum_dy;
    }
    a.coef[c] = a.p.training ? static_cast<const P*>(a.p.mean)[c] : P(0);
    a.coef[C + c] = P(ga);
    a.coef[2 * C + c] = P(b);
    a.coef[3 * C + c] = P(offset);
    if (a.p.dgamma) static_cast<P*>(a.p.dgamma)[c] = P(dgamma);
    if (a.p.dbeta) static_cast<P*>(a.p.dbeta)[c] = P(sum_dy);
    return dgamma;
}

// Ghost batches in the backward: channel c of G groups, group g's sums at sums + 3 * g * C
// ([sum_dy | sum_dy_xmu | sum_xmu], C values each), its saved mean / invstd at [g * C + c] of
// a.p.mean / a.p.invstd, its coefficients at a.coef + g * 4 * C; a.count_all: the values per
// channel of one group. dgamma / dbeta are summed over the groups in float64.
template <class P>
PYBN_HD void ghost_backward_channel(const BackwardArgs<P>& a, int64_t groups, int64_t c, const double* sums) {
    const int64_t C = a.channels;
    BackwardArgs<P> g = a;
    g.p.dgamma = g.p.dbeta = nullptr;
    double dgamma = 0, dbeta = 0;
    for (int64_t i = 0; i < groups; ++i) {
        g.p.mean = static_cast<const P*>(a.p.mean) + i * C;
        g.p.invstd = static_cast<const P*>(a.p.invstd) + i * C;
        g.coef = a.coef + i * 4 * C;
        const double* s = sums + i * 3 * C;
        dgamma += backward_channel(g, c, s[c], s[C + c], s[2 * C + c]);
        dbeta += s[c];
    }
    if (a.p.dgamma) static_cast<P*>(a.p.dgamma)[c] = P(dgamma);
    if (a.p.dbeta) static_cast<P*>(a.p.dbeta)[c] = P(dbeta);
}

// Merge of K partial statistics of channel c (K x C row-major): weighted mean first, then M2
// about it; exact for unequal counts, and partials with count 0 contribute nothing.
PYBN_HD void merge_channel(int64_t k, int64_t C, int64_t c, const double* counts,
                           const double* means, const double* m2s, double* count, double* mean,
                           double* m2) {
    double n = 0, s = 0, q = 0;
    for (int64_t i = 0; i < k; ++i) n += counts[i * C + c];
    for (int64_t i = 0; i < k; ++i) {
        const double ni = counts[i * C + c];
        if (ni > 0) s += ni / n * means[i * C + c];
    }
    for (int64_t i = 0; i < k; ++i) {
        const double ni = counts[i * C + c];
        if (ni > 0) {
            const double d = means[i * C + c] - s;
            q += m2s[i * C + c] + ni * d * d;
        }
    }
    // outputs may alias row 0 of the inputs: written after the last read of channel c
    count[c] = n;
    mean[c] = n > 0 ? s : 0.0;
    m2[c] = n > 0 ? q : 0.0;
}

}  // namespace PYBN_ISA_TAG
}  // namespace pybn
