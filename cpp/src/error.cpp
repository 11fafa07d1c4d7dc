#include "error.hpp"

#include <cstdarg>
#include <cstdio>

namespace pybn {

namespace {
// A fixed buffer: recording an error never allocates, so it works when memory has run out.
thread_local char g_last_error[1024] = "";
}  // namespace

pybn_status fail(pybn_status status, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(g_last_error, sizeof g_last_error, fmt, args);
    va_end(args);
    return status;
}

const char* last_error() { return g_last_error; }

}  // namespace pybn
