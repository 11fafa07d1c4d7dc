#include "checks.hpp"

#include <cmath>
#include <cstdint>

#include <cstring>

#include "numerics.hpp"

namespace pybn {

pybn_status check_view(const char* fn, const pybn_view& v) {
    const DtypeInfo* d = dtype_info(v.dtype);
    if (d == nullptr)
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
        __builtin_mul_overflow(total, d->size, &total))
        return fail(PYBN_ERROR_INVALID_ARGUMENT,
                    "%s: view of outer=%lld x channels=%lld x inner=%lld %s elements overflows "
                    "a 64-bit byte count", fn, (long long)v.outer, (long long)v.channels,
                    (long long)v.inner, d->name);
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

pybn_status check_train_count(const char* fn, const pybn_view& v, int64_t minimum) {
    if (v.channels > 0 && v.outer * v.inner < minimum)
        return fail(PYBN_ERROR_TOO_FEW_VALUES,
                    "%s: training needs at least %lld value%s per channel, got %lld "
                    "(outer=%lld x inner=%lld)%s", fn, (long long)minimum, minimum == 1 ? "" : "s",
                    (long long)(v.outer * v.inner), (long long)v.outer, (long long)v.inner,
                    minimum == 2 ? " when running_var is updated with the unbiased variance "
                                   "(running_var_correction = 1; 0 allows one value)" : "");
    return PYBN_SUCCESS;
}

int64_t ghost_groups(const pybn_forward_params& p, ForwardMode mode) {
    return mode == ForwardMode::train && p.virtual_batches > 1 ? p.virtual_batches : 1;
}
int64_t ghost_groups(const pybn_backward_params& p, BackwardMode mode) {
    return mode == BackwardMode::fused && p.virtual_batches > 1 ? p.virtual_batches : 1;
}

pybn_view group_view(const pybn_view& v, int64_t virtual_batches) {
    pybn_view g = v;
    if (virtual_batches > 1) g.outer = v.outer / virtual_batches;
    return g;
}

pybn_status check_virtual_batches(const char* fn, const pybn_view& v, int64_t virtual_batches) {
    if (virtual_batches < 0)
        return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: virtual_batches must be >= 0, got %lld", fn,
                    (long long)virtual_batches);
    if (virtual_batches > 1 && v.outer % virtual_batches != 0)
        return fail(PYBN_ERROR_INVALID_ARGUMENT,
                    "%s: virtual_batches = %lld must divide the view's outer size %lld (equal groups)", fn,
                    (long long)virtual_batches, (long long)v.outer);
    return PYBN_SUCCESS;
}

pybn_status check_counts(const char* fn, int64_t channels, const double* count, double minimum) {
    for (int64_t c = 0; c < channels; ++c)
        if (!(count[c] >= minimum))
            return fail(minimum >= 2 ? PYBN_ERROR_TOO_FEW_VALUES : PYBN_ERROR_INVALID_VALUE,
                        "%s: count[%lld] must be >= %g, got %g", fn, (long long)c, minimum, count[c]);
    return PYBN_SUCCESS;
}

namespace {
// The caller's block: at least the level-2 struct, and nothing this library does not know.
template <class Params>
pybn_status read_block(const char* fn, const char* type, const Params* given, Params& out) {
    if (given == nullptr) return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: params must not be NULL", fn);
    const size_t size = given->size;
    if (size < sizeof(Params))
        return fail(PYBN_ERROR_INVALID_ARGUMENT,
                    "%s: params->size must be at least sizeof(%s) = %zu (initialise the block "
                    "with its _INIT macro), got %zu", fn, type, sizeof(Params), size);
    const unsigned char* extra = reinterpret_cast<const unsigned char*>(given) + sizeof(Params);
    for (size_t i = 0; i < size - sizeof(Params); ++i)
        if (extra[i] != 0)
            return fail(PYBN_ERROR_INVALID_ARGUMENT,
                        "%s: params (size %zu) sets a field at byte %zu that this library (ABI "
                        "level %d, sizeof(%s) = %zu) does not know; upgrade libpybn", fn, size,
                        sizeof(Params) + i, PYBN_ABI_VERSION, type, sizeof(Params));
    std::memcpy(&out, given, sizeof(Params));  // level 2 is the first level with blocks: no defaults to fill yet
    out.size = sizeof(Params);
    return PYBN_SUCCESS;
}

pybn_status check_activation(const char* fn, int32_t activation) {
    if (activation != PYBN_ACTIVATION_NONE && activation != PYBN_ACTIVATION_RELU)
        return fail(PYBN_ERROR_INVALID_VALUE,
                    "%s: activation must be PYBN_ACTIVATION_NONE (0) or PYBN_ACTIVATION_RELU (1), got %d", fn,
                    int(activation));
    return PYBN_SUCCESS;
}

pybn_status check_flag(const char* fn, const char* name, int32_t value) {
    if (value != 0 && value != 1)
        return fail(PYBN_ERROR_INVALID_VALUE, "%s: %s must be 0 or 1, got %d", fn, name, int(value));
    return PYBN_SUCCESS;
}
}  // namespace

pybn_status read_params(const char* fn, const pybn_forward_params* given, pybn_forward_params& out) {
    return read_block(fn, "pybn_forward_params", given, out);
}
pybn_status read_params(const char* fn, const pybn_backward_params* given, pybn_backward_params& out) {
    return read_block(fn, "pybn_backward_params", given, out);
}

ForwardMode forward_mode(const pybn_forward_params& p) {
    if (!p.training) return ForwardMode::infer;
    return p.count || p.mean || p.m2 ? ForwardMode::given_stats : ForwardMode::train;
}

int64_t train_minimum(const pybn_forward_params& p) {
    return p.running_var && p.running_var_correction == 1 ? 2 : 1;
}

BackwardMode backward_mode(const pybn_backward_params& p) {
    return p.count || p.sum_dy || p.sum_dy_xmu || p.sum_xmu ? BackwardMode::given_sums : BackwardMode::fused;
}

namespace {
pybn_status any_pointer(const char*, const char*, const void*) { return PYBN_SUCCESS; }
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

pybn_status validate_forward(const char* fn, const PointerRules& rules, const pybn_view& v,
                             const void* x, const void* y, const pybn_forward_params& p, ForwardMode mode) {
    PYBN_CHECK(check_view(fn, v));
    PYBN_CHECK(rules.required(fn, "x", x));
    PYBN_CHECK(rules.required(fn, "y", y));
    PYBN_CHECK(check_flag(fn, "training", p.training));
    if (mode == ForwardMode::given_stats) {
        PYBN_CHECK(rules.required(fn, "count", p.count));
        PYBN_CHECK(rules.required(fn, "mean", p.mean));
        PYBN_CHECK(rules.required(fn, "m2", p.m2));
    }
    if (mode == ForwardMode::infer) {
        if (p.count || p.mean || p.m2)
            return fail(PYBN_ERROR_INVALID_ARGUMENT,
                        "%s: count, mean and m2 (given statistics) must be NULL when training = 0", fn);
        PYBN_CHECK(rules.required(fn, "running_mean", p.running_mean));
        PYBN_CHECK(rules.required(fn, "running_var", p.running_var));
    }
    PYBN_CHECK(rules.optional(fn, "gamma", p.gamma));
    PYBN_CHECK(rules.optional(fn, "beta", p.beta));
    if (mode != ForwardMode::infer) {
        PYBN_CHECK(rules.optional(fn, "running_mean", p.running_mean));
        PYBN_CHECK(rules.optional(fn, "running_var", p.running_var));
    }
    PYBN_CHECK(rules.optional(fn, "save_mean", p.save_mean));
    PYBN_CHECK(rules.optional(fn, "save_invstd", p.save_invstd));
    if (mode != ForwardMode::infer && (p.running_mean || p.running_var)) PYBN_CHECK(check_momentum(fn, p.momentum));
    PYBN_CHECK(check_flag(fn, "running_var_correction", p.running_var_correction));
    PYBN_CHECK(check_eps(fn, p.eps));
    PYBN_CHECK(check_activation(fn, p.activation));
    PYBN_CHECK(rules.optional(fn, "residual", p.residual));
    if (p.reserved != 0)
        return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: params->reserved must be 0, got %d", fn, int(p.reserved));
    if (p.renorm_r_max != 0 || p.renorm_d_max != 0 || p.save_renorm_r || p.save_renorm_d) {
        if (!(p.renorm_r_max >= 1.0) || !std::isfinite(p.renorm_r_max) || !(p.renorm_d_max >= 0.0) ||
            !std::isfinite(p.renorm_d_max))
            return fail(PYBN_ERROR_INVALID_VALUE,
                        "%s: batch renormalisation needs renorm_r_max >= 1 and renorm_d_max >= 0, both finite, got "
                        "%g and %g", fn, p.renorm_r_max, p.renorm_d_max);
        if (mode == ForwardMode::infer)
            return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: batch renormalisation is for training (training = 1)", fn);
        if (!p.running_mean || !p.running_var)
            return fail(PYBN_ERROR_INVALID_ARGUMENT,
                        "%s: batch renormalisation needs running_mean and running_var", fn);
        PYBN_CHECK(rules.optional(fn, "save_renorm_r", p.save_renorm_r));
        PYBN_CHECK(rules.optional(fn, "save_renorm_d", p.save_renorm_d));
    }
    PYBN_CHECK(check_virtual_batches(fn, v, p.virtual_batches));
    if (p.virtual_batches > 1) {
        if (mode != ForwardMode::train)
            return fail(PYBN_ERROR_INVALID_ARGUMENT,
                        "%s: virtual_batches > 1 is for training with batch statistics (training = 1, no given "
                        "count / mean / m2)", fn);
        if (p.renorm_r_max != 0)
            return fail(PYBN_ERROR_INVALID_ARGUMENT,
                        "%s: virtual_batches > 1 and batch renormalisation cannot be combined", fn);
    }
    return mode == ForwardMode::train ? check_train_count(fn, group_view(v, p.virtual_batches), train_minimum(p))
                                      : PYBN_SUCCESS;
}

pybn_status validate_backward(const char* fn, const PointerRules& rules, const pybn_view& v,
                              const void* dy, const void* x, const void* dx,
                              const pybn_backward_params& p, BackwardMode mode) {
    PYBN_CHECK(check_view(fn, v));
    if (mode == BackwardMode::fused) {
        PYBN_CHECK(rules.required(fn, "dy", dy));
        PYBN_CHECK(rules.required(fn, "x", x));
        PYBN_CHECK(rules.required(fn, "mean", p.mean));
        PYBN_CHECK(rules.required(fn, "invstd", p.invstd));
    } else {
        if (dx) PYBN_CHECK(rules.required(fn, "dy", dy));
        PYBN_CHECK(rules.required(fn, "invstd", p.invstd));
        PYBN_CHECK(rules.required(fn, "sum_dy", p.sum_dy));
        PYBN_CHECK(rules.required(fn, "sum_dy_xmu", p.sum_dy_xmu));
        if (p.training) {
            if (dx) PYBN_CHECK(rules.required(fn, "x", x));
            PYBN_CHECK(rules.required(fn, "mean", p.mean));
            PYBN_CHECK(rules.required(fn, "count", p.count));
        }
        PYBN_CHECK(rules.optional(fn, "sum_xmu", p.sum_xmu));
    }
    PYBN_CHECK(rules.optional(fn, "gamma", p.gamma));
    PYBN_CHECK(rules.optional(fn, "dx", dx));
    PYBN_CHECK(rules.optional(fn, "dgamma", p.dgamma));
    PYBN_CHECK(rules.optional(fn, "dbeta", p.dbeta));
    PYBN_CHECK(check_flag(fn, "training", p.training));
    PYBN_CHECK(check_activation(fn, p.activation));
    // the ReLU mask is read wherever the masked gradient is: the reduction, dx, dresidual
    if (p.activation == PYBN_ACTIVATION_RELU && (dx || p.dresidual || mode == BackwardMode::fused))
        PYBN_CHECK(rules.required(fn, "y", p.y));
    PYBN_CHECK(rules.optional(fn, "dresidual", p.dresidual));
    if (p.dresidual) PYBN_CHECK(rules.required(fn, "dy", dy));
    if (p.renorm_r || p.renorm_d) {
        PYBN_CHECK(rules.required(fn, "renorm_r", p.renorm_r));
        PYBN_CHECK(rules.required(fn, "renorm_d", p.renorm_d));
        if (!p.training)
            return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: renorm_r / renorm_d are for training (training = 1)", fn);
    }
    PYBN_CHECK(check_virtual_batches(fn, v, p.virtual_batches));
    if (p.virtual_batches > 1 && (mode != BackwardMode::fused || !p.training || p.renorm_r))
        return fail(PYBN_ERROR_INVALID_ARGUMENT,
                    "%s: virtual_batches > 1 is for the fused training backward (training = 1, no given sums, "
                    "no renorm_r / renorm_d)", fn);
    return mode == BackwardMode::fused && p.training ? check_train_count(fn, group_view(v, p.virtual_batches), 1)
                                                     : PYBN_SUCCESS;
}

}  // namespace pybn
