// Thread-local error detail behind pybn_last_error().
#pragma once

#include "pybn/pybn.h"

namespace pybn {

// Records a printf-style message for pybn_last_error() on this thread and returns `status`.
pybn_status fail(pybn_status status, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

const char* last_error();

}  // namespace pybn
