#include "checks.hpp"

#include <cmath>
#include <cstdint>

#include "dtype.hpp"

namespace pybn {

pybn_status check_view(const char* fn, const pybn_view& v) {
    if (!dtype_known(v.dtype))
        return fail(PYBN_ERROR_UNSUPPORTED_DTYPE,
                    "%s: view.dtype must be PYBN_FLOAT32 (0), PYBN_FLOAT64 (1), PYBN_FLOAT16 (2) or "
                    "PYBN_BFLOAT16 (3), got %d", fn, int(v.dtype));
    if (v.outer < 0 || v.channels < 0 || v.inner < 0)
        return fail(PYBN_ERROR_INVALID_ARGUMENT,
                    "%s: view sizes must be >= 0, got outer=%lld, channels=%lld, inner=%lld", fn,
                    (long long)v.outer, (long long)v.channels, (long long)v.inner);
    int64_t total = 0, per_channel = 0;  // per channel: overflows even when channels is 0
    if (__builtin_mul_overflow(v.outer, v.inner, &per_channel) ||
        __builtin_mul_overflow(v.outer, v.channels, &total) ||
        __builtin_mul_overflow(total, v.inner, &total) ||
        __builtin_mul_overflow(total, dtype_size(v.dtype), &total))
        return fail(PYBN_ERROR_INVALID_ARGUMENT,
                    "%s: view of outer=%lld x channels=%lld x inner=%lld %s elements overflows "
                    "a 64-bit byte count", fn, (long long)v.outer, (long long)v.channels,
                    (long long)v.inner, dtype_name(v.dtype));
    return PYBN_SUCCESS;
}

pybn_status check_ptr(const char* fn, const char* name, const void* p) {
    if (p == nullptr)
        return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: %s must not be NULL", fn, name);
    return PYBN_SUCCESS;
}

pybn_status check_eps(const char* fn, double eps) {
    if (!(eps >= 0.0) || !std::isfinite(eps))
        return fail(PYBN_ERROR_INVALID_VALUE, "%s: eps must be a finite number >= 0, got %g", fn, eps);
    return PYBN_SUCCESS;
}

pybn_status check_momentum(const char* fn, double momentum) {
    if (!(momentum >= 0.0 && momentum <= 1.0))
        return fail(PYBN_ERROR_INVALID_VALUE, "%s: momentum must be in [0, 1], got %g", fn, momentum);
    return PYBN_SUCCESS;
}

pybn_status check_merge_sizes(const char* fn, int64_t k, int64_t channels) {
    if (k < 1) return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: k must be >= 1, got %lld", fn, (long long)k);
    if (channels < 0)
        return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: channels must be >= 0, got %lld", fn, (long long)channels);
    int64_t kc = 0, bytes = 0;
    if (__builtin_mul_overflow(k, channels, &kc) || __builtin_mul_overflow(kc, int64_t(8), &bytes))
        return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: k=%lld x channels=%lld overflows", fn,
                    (long long)k, (long long)channels);
    return PYBN_SUCCESS;
}

pybn_status check_train_count(const char* fn, const pybn_view& v) {
    if (v.channels > 0 && v.outer * v.inner < 2)
        return fail(PYBN_ERROR_TOO_FEW_VALUES,
                    "%s: training needs at least 2 values per channel, got %lld "
                    "(outer=%lld x inner=%lld)", fn, (long long)(v.outer * v.inner),
                    (long long)v.outer, (long long)v.inner);
    return PYBN_SUCCESS;
}

namespace {
pybn_status any_pointer(const char*, const char*, const void*) { return PYBN_SUCCESS; }

// The parameter-type per-channel arrays of a forward call.
pybn_status check_forward_params(const char* fn, const PointerRules& p, const void* gamma,
                                 const void* beta, const void* running_mean,
                                 const void* running_var, double momentum, const void* save_mean,
                                 const void* save_invstd) {
    PYBN_CHECK(p.optional(fn, "gamma", gamma));
    PYBN_CHECK(p.optional(fn, "beta", beta));
    PYBN_CHECK(p.optional(fn, "running_mean", running_mean));
    PYBN_CHECK(p.optional(fn, "running_var", running_var));
    PYBN_CHECK(p.optional(fn, "save_mean", save_mean));
    PYBN_CHECK(p.optional(fn, "save_invstd", save_invstd));
    if (running_mean || running_var) PYBN_CHECK(check_momentum(fn, momentum));
    return PYBN_SUCCESS;
}
}  // namespace

const PointerRules kHostPointers{check_ptr, any_pointer};

pybn_status validate_batch_stats(const char* fn, const PointerRules& p, const pybn_view& v,
                                 const void* x, const void* count, const void* mean, const void* m2) {
    PYBN_CHECK(check_view(fn, v));
    PYBN_CHECK(p.required(fn, "x", x));
    PYBN_CHECK(p.required(fn, "count", count));
    PYBN_CHECK(p.required(fn, "mean", mean));
    return p.required(fn, "m2", m2);
}

pybn_status validate_merge_stats(const char* fn, const PointerRules& p, int64_t k, int64_t channels,
                                 const void* counts, const void* means, const void* m2s,
                                 const void* count, const void* mean, const void* m2) {
    PYBN_CHECK(check_merge_sizes(fn, k, channels));
    PYBN_CHECK(p.required(fn, "counts", counts));
    PYBN_CHECK(p.required(fn, "means", means));
    PYBN_CHECK(p.required(fn, "m2s", m2s));
    PYBN_CHECK(p.required(fn, "count", count));
    PYBN_CHECK(p.required(fn, "mean", mean));
    return p.required(fn, "m2", m2);
}

pybn_status validate_normalize(const char* fn, const PointerRules& p, const pybn_view& v,
                               const void* x, const void* count, const void* mean, const void* m2,
                               const void* gamma, const void* beta, double eps, const void* y,
                               const void* running_mean, const void* running_var, double momentum,
                               const void* save_mean, const void* save_invstd) {
    PYBN_CHECK(check_view(fn, v));
    PYBN_CHECK(p.required(fn, "x", x));
    PYBN_CHECK(p.required(fn, "y", y));
    PYBN_CHECK(p.required(fn, "count", count));
    PYBN_CHECK(p.required(fn, "mean", mean));
    PYBN_CHECK(p.required(fn, "m2", m2));
    PYBN_CHECK(check_forward_params(fn, p, gamma, beta, running_mean, running_var, momentum, save_mean,
                                    save_invstd));
    return check_eps(fn, eps);
}

pybn_status validate_backward_reduce(const char* fn, const PointerRules& p, const pybn_view& v,
                                     const void* dy, const void* x, const void* mean,
                                     const void* sum_dy, const void* sum_dy_xmu, const void* sum_xmu) {
    PYBN_CHECK(check_view(fn, v));
    PYBN_CHECK(p.required(fn, "dy", dy));
    PYBN_CHECK(p.required(fn, "x", x));
    PYBN_CHECK(p.required(fn, "mean", mean));
    PYBN_CHECK(p.required(fn, "sum_dy", sum_dy));
    PYBN_CHECK(p.required(fn, "sum_dy_xmu", sum_dy_xmu));
    return p.optional(fn, "sum_xmu", sum_xmu);
}

pybn_status validate_backward_elementwise(const char* fn, const PointerRules& p, const pybn_view& v,
                                          const void* dy, const void* x, const void* mean,
                                          const void* invstd, const void* gamma, int training,
                                          const void* count, const void* sum_dy,
                                          const void* sum_dy_xmu, const void* sum_xmu,
                                          const void* dx, const void* dgamma, const void* dbeta) {
    PYBN_CHECK(check_view(fn, v));
    if (dx) PYBN_CHECK(p.required(fn, "dy", dy));
    PYBN_CHECK(p.required(fn, "invstd", invstd));
    PYBN_CHECK(p.required(fn, "sum_dy", sum_dy));
    PYBN_CHECK(p.required(fn, "sum_dy_xmu", sum_dy_xmu));
    if (training) {
        if (dx) PYBN_CHECK(p.required(fn, "x", x));
        PYBN_CHECK(p.required(fn, "mean", mean));
        PYBN_CHECK(p.required(fn, "count", count));
    }
    PYBN_CHECK(p.optional(fn, "gamma", gamma));
    PYBN_CHECK(p.optional(fn, "sum_xmu", sum_xmu));
    PYBN_CHECK(p.optional(fn, "dx", dx));
    PYBN_CHECK(p.optional(fn, "dgamma", dgamma));
    return p.optional(fn, "dbeta", dbeta);
}

pybn_status validate_forward_train(const char* fn, const PointerRules& p, const pybn_view& v,
                                   const void* x, const void* gamma, const void* beta, double eps,
                                   const void* running_mean, const void* running_var,
                                   double momentum, const void* y, const void* save_mean,
                                   const void* save_invstd) {
    PYBN_CHECK(check_view(fn, v));
    PYBN_CHECK(p.required(fn, "x", x));
    PYBN_CHECK(p.required(fn, "y", y));
    PYBN_CHECK(check_forward_params(fn, p, gamma, beta, running_mean, running_var, momentum, save_mean,
                                    save_invstd));
    PYBN_CHECK(check_eps(fn, eps));
    return check_train_count(fn, v);
}

pybn_status validate_forward_infer(const char* fn, const PointerRules& p, const pybn_view& v,
                                   const void* x, const void* running_mean, const void* running_var,
                                   const void* gamma, const void* beta, double eps, const void* y) {
    PYBN_CHECK(check_view(fn, v));
    PYBN_CHECK(p.required(fn, "x", x));
    PYBN_CHECK(p.required(fn, "y", y));
    PYBN_CHECK(p.required(fn, "running_mean", running_mean));
    PYBN_CHECK(p.required(fn, "running_var", running_var));
    PYBN_CHECK(p.optional(fn, "gamma", gamma));
    PYBN_CHECK(p.optional(fn, "beta", beta));
    return check_eps(fn, eps);
}

pybn_status validate_backward(const char* fn, const PointerRules& p, const pybn_view& v,
                              const void* dy, const void* x, const void* mean, const void* invstd,
                              const void* gamma, int training, const void* dx, const void* dgamma,
                              const void* dbeta) {
    PYBN_CHECK(check_view(fn, v));
    PYBN_CHECK(p.required(fn, "dy", dy));
    PYBN_CHECK(p.required(fn, "x", x));
    PYBN_CHECK(p.required(fn, "mean", mean));
    PYBN_CHECK(p.required(fn, "invstd", invstd));
    PYBN_CHECK(p.optional(fn, "gamma", gamma));
    PYBN_CHECK(p.optional(fn, "dx", dx));
    PYBN_CHECK(p.optional(fn, "dgamma", dgamma));
    PYBN_CHECK(p.optional(fn, "dbeta", dbeta));
    return training ? check_train_count(fn, v) : PYBN_SUCCESS;
}

}  // namespace pybn
