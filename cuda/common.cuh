// Host side of the CUDA op files: error handling, the caller workspace and stream-ordered
// temporaries, and the launchers of the kernels in kernels.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "checks.hpp"
#include "kernels.cuh"

namespace pybn::cuda {

// ---- errors -------------------------------------------------------------------------------
// A CUDA error as a status. The runtime's last-error slot is cleared (cudaGetLastError), so that
// a failure here (e.g. an allocation) is not reported again by the next call after its own work
// ran; a sticky error (a fault that poisoned the context) stays with the context regardless.
inline pybn_status cuda_fail(const char* fn, const char* what, cudaError_t e) {
    cudaGetLastError();
    if (e == cudaErrorMemoryAllocation)
        return fail(PYBN_ERROR_OUT_OF_MEMORY, "%s: %s failed: out of device memory (%s)", fn, what,
                    cudaGetErrorName(e));
    if (e == cudaErrorInsufficientDriver || e == cudaErrorCallRequiresNewerDriver) {
        int driver = 0;
        cudaDriverGetVersion(&driver);
        return fail(PYBN_ERROR_CUDA,
                    "%s: %s failed: %s: this libpybn links the CUDA %d.%d runtime, which needs an NVIDIA "
                    "driver for CUDA %d.%d or newer (CUDA 13: driver r580+, CUDA 12: r525+); the installed "
                    "driver supports CUDA %d.%d. Update the driver, or build pybn with the CUDA toolkit "
                    "the driver supports (README, \"GPU\")", fn, what, cudaGetErrorName(e), CUDART_VERSION / 1000,
                    CUDART_VERSION % 1000 / 10, CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10, driver / 1000,
                    driver % 1000 / 10);
    }
    return fail(PYBN_ERROR_CUDA, "%s: %s failed: %s (%s)", fn, what, cudaGetErrorName(e),
                cudaGetErrorString(e));
}

#define PYBN_CUDA_TRY(fn, what, expr)                                  \
    do {                                                               \
        const cudaError_t pybn_err_ = (expr);                          \
        if (pybn_err_ != cudaSuccess) return ::pybn::cuda::cuda_fail(fn, what, pybn_err_); \
    } while (0)

// Pointer rules of the CUDA entry points: a non-NULL pointer must be device-accessible (a host
// pointer would fault inside a kernel and poison the CUDA context, so it is refused instead).
extern const PointerRules kDevicePointers;

// Clears an error left in the runtime's last-error slot by earlier, unrelated work, so that
// launched() reports only this call's launches. Called before a call's first launch.
inline void clear_stale_error() { cudaGetLastError(); }

// The status of the launches just queued (configuration errors; faults surface later).
inline pybn_status launched(const char* fn) {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? PYBN_SUCCESS : cuda_fail(fn, "kernel launch", e);
}

// ---- temporaries: one caller-provided workspace -------------------------------------------------
// A call's temporaries are carved from one workspace in a fixed order. The same code sizes it
// (base == nullptr: only counts) and hands it out, so the size query and the call agree.
constexpr size_t kWorkspaceAlign = 256;

class Workspace {
  public:
    Workspace(void* base, size_t bytes) : base_(static_cast<char*>(base)), bytes_(bytes) {}
    template <class U> U* take(size_t count) {
        used_ = (used_ + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
        U* p = base_ ? reinterpret_cast<U*>(base_ + used_) : nullptr;
        used_ += sizeof(U) * count;
        return p;
    }
    size_t used() const { return used_; }
    size_t bytes() const { return bytes_; }

  private:
    char* base_;
    size_t bytes_, used_ = 0;
};

// The caller's workspace must hold `needed` bytes of device memory aligned to kWorkspaceAlign.
pybn_status check_workspace(const char* fn, const void* workspace, size_t bytes, size_t needed);

// Level-1 entry points allocate the workspace themselves (stream-ordered) and free it after.
class DeviceBuffer {
  public:
    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() {
        if (ptr_) cudaFreeAsync(ptr_, stream_);
    }
    pybn_status allocate(const char* fn, size_t bytes, cudaStream_t stream) {
        stream_ = stream;
        if (bytes == 0) return PYBN_SUCCESS;
        PYBN_CUDA_TRY(fn, "cudaMallocAsync", cudaMallocAsync(&ptr_, bytes, stream));
        return PYBN_SUCCESS;
    }
    void* get() const { return ptr_; }

  private:
    void* ptr_ = nullptr;
    cudaStream_t stream_ = nullptr;
};

// One thread per channel: f(c) for c in [0, C) (the per-channel steps between sweeps).
template <class F>
__global__ void per_channel_kernel(int64_t channels, F f) {
    const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c < channels) f(c);
}

template <class F>
pybn_status run_per_channel(const char* fn, int64_t channels, F f, cudaStream_t stream) {
    if (channels == 0) return PYBN_SUCCESS;
    per_channel_kernel<<<unsigned(per_channel_blocks(channels)), kThreads, 0, stream>>>(channels, f);
    return launched(fn);
}

// The reduction temporaries of a view, from the workspace: stage-1 partials (enough for every
// unit size a call may pick) and the tickets.
template <class R> struct ReduceTemps {
    typename R::Part* parts = nullptr;
    unsigned* tickets = nullptr;
};
template <class R> ReduceTemps<R> reduce_temps(const pybn_view& v, Workspace& ws) {
    using T = typename R::Value;
    const int64_t a = plan_parts(v, plan_reduce(v, 1)), b = plan_parts(v, plan_reduce(v, kVec<T>));
    ReduceTemps<R> t;
    t.parts = ws.template take<typename R::Part>(size_t(a > b ? a : b));
    t.tickets = ws.template take<unsigned>(size_t(v.channels));
    return t;
}

// Kernel launches on a stream (the launcher of kernels.cuh's *_launches).
struct StreamLauncher {
    cudaStream_t stream;
    template <class... P, class... A> void operator()(Grid g, void (*kernel)(P...), A&&... args) const {
        kernel<<<dim3(g.x, g.y), kThreads, 0, stream>>>(std::forward<A>(args)...);
    }
};

// Queues the reduction on `stream`: stage 1 and, in the last block or a second kernel, stage 2.
template <class R, class Epilogue>
pybn_status run_reduce(const char* fn, const pybn_view& v, const typename R::Inputs& in, int vec,
                       Epilogue epilogue, const ReduceTemps<R>& tmp, cudaStream_t stream) {
    if (v.channels == 0) return PYBN_SUCCESS;
    const ReducePlan p = plan_reduce(v, vec);
    if (!plan_fits(p))
        return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: view of %lld x %lld x %lld is too large for one launch", fn,
                    (long long)v.outer, (long long)v.channels, (long long)v.inner);
    cudaError_t zeroed = cudaSuccess;
    const bool ok = reduce_launches<R>(v, p, in, tmp.parts, tmp.tickets, epilogue, StreamLauncher{stream},
                                       [&](unsigned* t, size_t bytes) {
                                           zeroed = cudaMemsetAsync(t, 0, bytes, stream);
                                           return zeroed == cudaSuccess;
                                       });
    if (!ok) return cuda_fail(fn, "cudaMemsetAsync", zeroed);
    return launched(fn);
}

// The temporaries of a forward or backward, in workspace order: the coefficients (4 x C per
// ghost batch), then, when the call reduces, the reduction's (sized for one ghost batch: the
// groups reduce one after another, in stream order) and, with ghost batches, 3 x C float64
// values per group that the reductions leave for the per-channel step.
template <class T, class R> struct Temps {
    acc_t<T>* coef = nullptr;
    ReduceTemps<R> reduce;
    double* stats = nullptr;
};

template <class T, class R>
Temps<T, R> carve_temps(const pybn_view& v, bool reduces, Workspace& ws, int64_t groups = 1) {
    Temps<T, R> t;
    if (v.channels == 0) return t;
    const int64_t n = groups > 1 ? groups : 1;
    t.coef = ws.take<acc_t<T>>(size_t(4 * n * v.channels));
    if (reduces) t.reduce = reduce_temps<R>(group_view(v, n), ws);
    if (reduces && n > 1) t.stats = ws.take<double>(size_t(3 * n * v.channels));
    return t;
}

// Bytes that carve(T{}, Workspace&) takes for the view's dtype (a sizing run: nothing is touched).
template <class Carve> size_t workspace_bytes(const pybn_view& v, Carve carve) {
    size_t bytes = 0;
    visit_dtype<DeviceStorage>(v.dtype, [&](auto t) {
        Workspace sizing(nullptr, 0);
        carve(t, sizing);
        bytes = sizing.used();
    });
    return bytes;
}

template <class T, class Op>
pybn_status run_elementwise(const char* fn, const pybn_view& v, int vec, const Op& op, cudaStream_t stream) {
    elementwise_launches<T>(v, vec, op, StreamLauncher{stream});
    return launched(fn);
}

}  // namespace pybn::cuda
