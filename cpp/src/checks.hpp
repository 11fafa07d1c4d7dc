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
// Training needs at least 2 values per channel (n = outer * inner), unless there are no channels.
pybn_status check_train_count(const char* fn, const pybn_view& v);

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
