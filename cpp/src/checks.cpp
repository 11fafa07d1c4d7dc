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
    int64_t total = 0;
    if (__builtin_mul_overflow(v.outer, v.channels, &total) ||
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

pybn_status check_train_count(const char* fn, const pybn_view& v) {
    if (v.channels > 0 && v.outer * v.inner < 2)
        return fail(PYBN_ERROR_TOO_FEW_VALUES,
                    "%s: training needs at least 2 values per channel, got %lld "
                    "(outer=%lld x inner=%lld)", fn, (long long)(v.outer * v.inner),
                    (long long)v.outer, (long long)v.inner);
    return PYBN_SUCCESS;
}

}  // namespace pybn
