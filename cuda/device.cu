// Pointer rules of the CUDA entry points (pointers must be device-accessible) and the check of
// a caller's workspace.
#include "common.cuh"

namespace pybn::cuda {

namespace {

pybn_status check_device_ptr(const char* fn, const char* name, const void* p) {
    if (p == nullptr) return PYBN_SUCCESS;
    cudaPointerAttributes attr{};
    const cudaError_t e = cudaPointerGetAttributes(&attr, p);
    if (e != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free error state of this call
        return cuda_fail(fn, "cudaPointerGetAttributes", e);
    }
    if (attr.devicePointer == nullptr)
        return fail(PYBN_ERROR_INVALID_ARGUMENT,
                    "%s: %s must be device memory (or managed / mapped host memory), got a host "
                    "pointer %p", fn, name, p);
    return PYBN_SUCCESS;
}

pybn_status check_device_arg(const char* fn, const char* name, const void* p) {
    PYBN_CHECK(check_ptr(fn, name, p));
    return check_device_ptr(fn, name, p);
}

}  // namespace

const PointerRules kDevicePointers{check_device_arg, check_device_ptr};

pybn_status check_workspace(const char* fn, const void* workspace, size_t bytes, size_t needed) {
    if (needed == 0) return PYBN_SUCCESS;
    if (bytes < needed)
        return fail(PYBN_ERROR_INVALID_ARGUMENT,
                    "%s: workspace_bytes must be at least %zu for this view (ask the "
                    "*_workspace_size function), got %zu", fn, needed, bytes);
    PYBN_CHECK(check_device_arg(fn, "workspace", workspace));
    if (reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlign != 0)
        return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: workspace must be aligned to %zu bytes, got %p", fn,
                    kWorkspaceAlign, workspace);
    return PYBN_SUCCESS;
}

}  // namespace pybn::cuda
