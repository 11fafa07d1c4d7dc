// Pointer rules of the CUDA entry points (pointers must be device-accessible).
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

}  // namespace pybn::cuda
