// The CUDA entry points of a build without CUDA: they exist so that the ABI is the same in every
// build, and say why they cannot run.
#include "error.hpp"
#include "pybn/pybn.h"

namespace {
pybn_status not_compiled(const char* fn) {
    return pybn::fail(PYBN_ERROR_NOT_COMPILED,
                      "%s: this libpybn was built without CUDA (PYBN_CUDA=OFF, or no CUDA "
                      "toolkit was found at build time)", fn);
}
}  // namespace

extern "C" {

pybn_status pybn_cuda_batch_stats(pybn_view, const void*, double*, double*, double*, void*) {
    return not_compiled("pybn_cuda_batch_stats");
}
pybn_status pybn_cuda_merge_stats(int64_t, int64_t, const double*, const double*, const double*,
                                  double*, double*, double*, void*) {
    return not_compiled("pybn_cuda_merge_stats");
}
pybn_status pybn_cuda_normalize(pybn_view, const void*, const double*, const double*, const double*,
                                const void*, const void*, double, void*, void*, void*, double,
                                void*, void*, void*) {
    return not_compiled("pybn_cuda_normalize");
}
pybn_status pybn_cuda_backward_reduce(pybn_view, const void*, const void*, const void*, double*,
                                      double*, double*, void*) {
    return not_compiled("pybn_cuda_backward_reduce");
}
pybn_status pybn_cuda_backward_elementwise(pybn_view, const void*, const void*, const void*,
                                          const void*, const void*, int, const double*,
                                          const double*, const double*, const double*, void*,
                                          void*, void*, void*) {
    return not_compiled("pybn_cuda_backward_elementwise");
}
pybn_status pybn_cuda_forward_train(pybn_view, const void*, const void*, const void*, double, void*,
                                    void*, double, void*, void*, void*, void*) {
    return not_compiled("pybn_cuda_forward_train");
}
pybn_status pybn_cuda_forward_infer(pybn_view, const void*, const void*, const void*, const void*,
                                    const void*, double, void*, void*) {
    return not_compiled("pybn_cuda_forward_infer");
}
pybn_status pybn_cuda_backward(pybn_view, const void*, const void*, const void*, const void*,
                               const void*, int, void*, void*, void*, void*) {
    return not_compiled("pybn_cuda_backward");
}

pybn_status pybn_cuda_forward_workspace_size(pybn_view, const pybn_forward_params*, size_t*) {
    return not_compiled("pybn_cuda_forward_workspace_size");
}
pybn_status pybn_cuda_forward_v2(pybn_view, const void*, void*, const pybn_forward_params*, void*, size_t, void*) {
    return not_compiled("pybn_cuda_forward_v2");
}
pybn_status pybn_cuda_backward_workspace_size(pybn_view, const pybn_backward_params*, size_t*) {
    return not_compiled("pybn_cuda_backward_workspace_size");
}
pybn_status pybn_cuda_backward_v2(pybn_view, const void*, const void*, void*, const pybn_backward_params*, void*,
                                  size_t, void*) {
    return not_compiled("pybn_cuda_backward_v2");
}
pybn_status pybn_cuda_reduce_workspace_size(pybn_view, size_t*) {
    return not_compiled("pybn_cuda_reduce_workspace_size");
}
pybn_status pybn_cuda_batch_stats_v2(pybn_view, const void*, double*, double*, double*, void*, size_t, void*) {
    return not_compiled("pybn_cuda_batch_stats_v2");
}
pybn_status pybn_cuda_backward_reduce_v2(pybn_view, const void*, const void*, const void*, double*, double*, double*,
                                         void*, size_t, void*) {
    return not_compiled("pybn_cuda_backward_reduce_v2");
}

}  // extern "C"
