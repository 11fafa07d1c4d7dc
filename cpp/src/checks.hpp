// Argument checks shared by the CPU and CUDA entry points. Each returns PYBN_SUCCESS or records
// a message naming the function, the argument, what was expected and what was received.
#pragma once

#include <exception>
#include <new>

#include "error.hpp"
#include "pybn/pybn.h"

namespace pybn {

pybn_status check_view(const char* fn, const pybn_view& v);
pybn_status check_ptr(const char* fn, const char* name, const void* p);
pybn_status check_eps(const char* fn, double eps);
pybn_status check_momentum(const char* fn, double momentum);
// k >= 1 partials of channels >= 0, k * channels doubles addressable.
pybn_status check_merge_sizes(const char* fn, int64_t k, int64_t channels);
// Training needs at least `minimum` values per channel (n = outer * inner), unless there are no
// channels.
pybn_status check_train_count(const char* fn, const pybn_view& v, int64_t minimum);
// count[c] >= minimum for every channel (counts of given statistics, read on the host).
pybn_status check_counts(const char* fn, int64_t channels, const double* count, double minimum);

// A caller's parameter block read into the full struct this library knows: the caller's first
// `size` bytes, the documented defaults beyond them (see "Parameter blocks" in pybn.h).
pybn_status read_params(const char* fn, const pybn_forward_params* given, pybn_forward_params& out);
pybn_status read_params(const char* fn, const pybn_backward_params* given, pybn_backward_params& out);

// What a forward call computes; v2 derives it from the block, the level-1 wrappers say it.
enum class ForwardMode { train, given_stats, infer };
ForwardMode forward_mode(const pybn_forward_params& p);
// Values per channel a training forward needs: 2 when an unbiased running_var is updated, else 1.
int64_t train_minimum(const pybn_forward_params& p);
// One ghost batch of v: outer / virtual_batches rows (v itself for 0 or 1).
pybn_view group_view(const pybn_view& v, int64_t virtual_batches);
// virtual_batches >= 0 and, when > 1, a divisor of v.outer.
pybn_status check_virtual_batches(const char* fn, const pybn_view& v, int64_t virtual_batches);
// What a backward call computes: reduce dy and x itself, or use the given sums.
enum class BackwardMode { fused, given_sums };
BackwardMode backward_mode(const pybn_backward_params& p);
// The ghost batches of a validated call: params.virtual_batches where it applies (training with
// batch statistics, the fused backward), else 1.
int64_t ghost_groups(const pybn_forward_params& p, ForwardMode mode);
int64_t ghost_groups(const pybn_backward_params& p, BackwardMode mode);

// How an entry point checks its pointers: `required` ones (non-NULL; for CUDA also device-
// accessible) and `optional` ones (may be NULL; for CUDA device-accessible when not).
struct PointerRules {
    pybn_status (*required)(const char* fn, const char* name, const void* p);
    pybn_status (*optional)(const char* fn, const char* name, const void* p);
};
extern const PointerRules kHostPointers;

// Argument checks of each operation family, shared by its CPU and CUDA entry points (which pass
// their PointerRules). Value checks that need to read arrays (counts) are the CPU's own.
pybn_status validate_batch_stats(const char* fn, const PointerRules& p, const pybn_view& v,
                                 const void* x, const void* count, const void* mean, const void* m2);
pybn_status validate_merge_stats(const char* fn, const PointerRules& p, int64_t k, int64_t channels,
                                 const void* counts, const void* means, const void* m2s,
                                 const void* count, const void* mean, const void* m2);
pybn_status validate_backward_reduce(const char* fn, const PointerRules& p, const pybn_view& v,
                                     const void* dy, const void* x, const void* mean,
                                     const void* sum_dy, const void* sum_dy_xmu, const void* sum_xmu);
pybn_status validate_forward(const char* fn, const PointerRules& rules, const pybn_view& v,
                             const void* x, const void* y, const pybn_forward_params& p, ForwardMode mode);
pybn_status validate_backward(const char* fn, const PointerRules& rules, const pybn_view& v,
                              const void* dy, const void* x, const void* dx,
                              const pybn_backward_params& p, BackwardMode mode);

// Runs body() (returning pybn_status) so that no C++ exception crosses the C ABI.
template <class F> pybn_status guarded(const char* fn, F&& body) noexcept {
    try {
        return body();
    } catch (const std::bad_alloc&) {
        return fail(PYBN_ERROR_OUT_OF_MEMORY, "%s: out of memory for temporary buffers", fn);
    } catch (const std::exception& e) {
        return fail(PYBN_ERROR_INTERNAL, "%s: internal error: %s", fn, e.what());
    } catch (...) {
        return fail(PYBN_ERROR_INTERNAL, "%s: internal error (unknown exception)", fn);
    }
}

}  // namespace pybn

// Returns from the enclosing function when a check fails.
#define PYBN_CHECK(expr)                                     \
    do {                                                     \
        const pybn_status pybn_check_status_ = (expr);       \
        if (pybn_check_status_ != PYBN_SUCCESS) return pybn_check_status_; \
    } while (0)
