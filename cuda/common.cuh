// Device helpers shared by every CUDA op file: dtypes, error handling, stream-ordered
// temporaries, the deterministic per-channel reduction skeleton and the elementwise launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "checks.hpp"
#include "formulas.hpp"
#include "numerics.hpp"
#include "plan.hpp"
#include "pybn/pybn.h"

namespace pybn::cuda {

constexpr int kChunk = 64;        // values of one thread sharing a shift (as on the CPU)

// ---- dtypes (the table is numerics.hpp's) -------------------------------------------------------
template <int32_t D> struct DeviceStorage;
template <> struct DeviceStorage<PYBN_FLOAT32> { using type = float; };
template <> struct DeviceStorage<PYBN_FLOAT64> { using type = double; };
template <> struct DeviceStorage<PYBN_FLOAT16> { using type = __half; };
template <> struct DeviceStorage<PYBN_BFLOAT16> { using type = __nv_bfloat16; };

__device__ inline float load(float v) { return v; }
__device__ inline double load(double v) { return v; }
__device__ inline float load(__half v) { return __half2float(v); }
__device__ inline float load(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ inline T store(acc_t<T> v) {
    if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
    else return v;
}

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

// ---- per-channel reduction skeleton ---------------------------------------------------------
// Stage 1 (reduce_rows / reduce_cols) writes one partial per (channel, chunk of rows); stage 2
// (reduce_finish) merges the partials of a channel in a fixed tree and hands the result to an
// epilogue. The partition depends only on the shape, and every merge order is fixed, so results
// are bitwise identical from run to run (no atomics).
//
// A Reducer R provides: Part (a merge-able partial, default-constructible as the identity),
// static merge(Part&, const Part&), and Thread, a per-thread accumulator constructed from
// (const Inputs&, channel) with add(int64_t element_index) and part().

// Shared-memory array of N partials (raw storage: __shared__ variables cannot have constructors).
#define PYBN_SHARED_PARTS(R, name, N)                                                 \
    __shared__ alignas(16) unsigned char name##_storage[sizeof(typename R::Part) * (N)]; \
    typename R::Part* name = reinterpret_cast<typename R::Part*>(name##_storage)

template <class R>
__device__ void block_merge(typename R::Part* sh, typename R::Part mine, int tid, int nthreads) {
    sh[tid] = mine;
    __syncthreads();
    for (int stride = nthreads / 2; stride > 0; stride >>= 1) {
        if (tid < stride) R::merge(sh[tid], sh[tid + stride]);
        __syncthreads();
    }
}

// inner > 1: block (c, k) walks rows [k*rows, (k+1)*rows) of channel c, threads across values.
template <class R>
__global__ void reduce_rows(pybn_view v, typename R::Inputs in, int64_t rows, int64_t chunks,
                            typename R::Part* parts) {
    PYBN_SHARED_PARTS(R, sh, kThreads);
    const int64_t c = blockIdx.x / chunks, k = blockIdx.x % chunks;
    const int64_t o0 = k * rows;
    const int64_t o1 = o0 + rows < v.outer ? o0 + rows : v.outer;
    typename R::Thread t(in, c);
    const int64_t len = (o1 - o0) * v.inner;
    for (int64_t j = threadIdx.x; j < len; j += kThreads) {
        const int64_t o = o0 + j / v.inner, i = j % v.inner;
        t.add((o * v.channels + c) * v.inner + i);
    }
    block_merge<R>(sh, t.part(), threadIdx.x, kThreads);
    if (threadIdx.x == 0) parts[c * chunks + k] = sh[0];
}

// inner == 1 (channels-last): block (32 x 8) covers 32 channels; threadIdx.y strides the rows
// of chunk blockIdx.y, so a warp reads 32 consecutive channels of one row (coalesced).
template <class R>
__global__ void reduce_cols(pybn_view v, typename R::Inputs in, int64_t rows, int64_t chunks,
                            typename R::Part* parts) {
    PYBN_SHARED_PARTS(R, sh, 8 * 32);  // [threadIdx.y][threadIdx.x]
    const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x, k = blockIdx.y;
    const int64_t o0 = k * rows;
    const int64_t o1 = o0 + rows < v.outer ? o0 + rows : v.outer;
    typename R::Part mine{};
    if (c < v.channels) {
        typename R::Thread t(in, c);
        for (int64_t o = o0 + threadIdx.y; o < o1; o += 8) t.add(o * v.channels + c);
        mine = t.part();
    }
    sh[threadIdx.y * 32 + threadIdx.x] = mine;
    __syncthreads();
    for (unsigned stride = 4; stride > 0; stride >>= 1) {
        if (threadIdx.y < stride)
            R::merge(sh[threadIdx.y * 32 + threadIdx.x], sh[(threadIdx.y + stride) * 32 + threadIdx.x]);
        __syncthreads();
    }
    if (threadIdx.y == 0 && c < v.channels) parts[c * chunks + k] = sh[threadIdx.x];
}

// One block per channel merges its `chunks` partials (thread t takes t, t+256, ... in order,
// then a fixed tree) and calls epilogue(c, part) on thread 0.
template <class R, class Epilogue>
__global__ void reduce_finish(const typename R::Part* parts, int64_t chunks, Epilogue epilogue) {
    PYBN_SHARED_PARTS(R, sh, kThreads);
    const int64_t c = blockIdx.x;
    typename R::Part mine{};
    for (int64_t k = threadIdx.x; k < chunks; k += kThreads) R::merge(mine, parts[c * chunks + k]);
    block_merge<R>(sh, mine, threadIdx.x, kThreads);
    if (threadIdx.x == 0) epilogue(c, sh[0]);
}

// The partials of stage 1, from the workspace.
template <class R> typename R::Part* reduce_parts(const pybn_view& v, Workspace& ws) {
    return ws.template take<typename R::Part>(size_t(v.channels * plan_reduce(v).chunks));
}

// Queues both stages on `stream`; `parts` from reduce_parts.
template <class R, class Epilogue>
pybn_status run_reduce(const char* fn, const pybn_view& v, const typename R::Inputs& in,
                       Epilogue epilogue, typename R::Part* parts, cudaStream_t stream) {
    if (v.channels == 0) return PYBN_SUCCESS;
    const ReducePlan plan = plan_reduce(v);
    if (!plan_fits(plan))
        return fail(PYBN_ERROR_INVALID_ARGUMENT, "%s: view of %lld x %lld x %lld is too large for one launch", fn,
                    (long long)v.outer, (long long)v.channels, (long long)v.inner);
    if (plan.chunks > 0) {
        if (plan.cols) {
            const dim3 grid(unsigned(plan.grid_x), unsigned(plan.grid_y));
            reduce_cols<R><<<grid, dim3(32, 8), 0, stream>>>(v, in, plan.rows, plan.chunks, parts);
        } else {
            reduce_rows<R><<<unsigned(plan.grid_x), kThreads, 0, stream>>>(v, in, plan.rows, plan.chunks, parts);
        }
    }
    reduce_finish<R><<<unsigned(v.channels), kThreads, 0, stream>>>(parts, plan.chunks, epilogue);
    return launched(fn);
}

// The temporaries of a forward or backward, in workspace order: the coefficients (4 x C per
// ghost batch), then, when the call reduces, the partials of reducer R (sized for one ghost
// batch: the groups reduce one after another, in stream order) and, with ghost batches, 3 x C
// float64 values per group that the reductions leave for the per-channel step.
template <class T, class R> struct Temps {
    acc_t<T>* coef = nullptr;
    typename R::Part* parts = nullptr;
    double* stats = nullptr;
};

template <class T, class R>
Temps<T, R> carve_temps(const pybn_view& v, bool reduces, Workspace& ws, int64_t groups = 1) {
    Temps<T, R> t;
    if (v.channels == 0) return t;
    const int64_t n = groups > 1 ? groups : 1;
    t.coef = ws.take<acc_t<T>>(size_t(4 * n * v.channels));
    if (reduces) t.parts = reduce_parts<R>(group_view(v, n), ws);
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

// ---- elementwise -------------------------------------------------------------------------------
// op(element_index, channel) for every element of the view, grid-stride.
template <class Op>
__global__ void elementwise_rows(pybn_view v, Op op) {
    // inner >= kThreads: a block per (outer, channel) row, threads across the row
    const int64_t nrows = v.outer * v.channels;
    for (int64_t r = blockIdx.x; r < nrows; r += gridDim.x) {
        const int64_t c = r % v.channels;
        for (int64_t i = threadIdx.x; i < v.inner; i += blockDim.x) op(r * v.inner + i, c);
    }
}

template <class Op>
__global__ void elementwise_flat(pybn_view v, Op op) {
    const int64_t total = v.outer * v.channels * v.inner;
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += int64_t(gridDim.x) * blockDim.x)
        op(e, (e / v.inner) % v.channels);
}

template <class Op>
pybn_status run_elementwise(const char* fn, const pybn_view& v, Op op, cudaStream_t stream) {
    const ElementwisePlan plan = plan_elementwise(v);
    if (plan.blocks == 0) return PYBN_SUCCESS;
    if (plan.rows) elementwise_rows<<<unsigned(plan.blocks), kThreads, 0, stream>>>(v, op);
    else elementwise_flat<<<unsigned(plan.blocks), kThreads, 0, stream>>>(v, op);
    return launched(fn);
}

// ---- reducers ---------------------------------------------------------------------------------
// Batch statistics: shifted float32 runs of kDepth, blocks of kChunk values per thread with their
// own shift, merged as pybn::Moments (as on the CPU).
template <class T> struct StatsReducer {
    using A = acc_t<T>;
    using Part = Moments;
    struct Inputs { const T* x; };
    __device__ static void merge(Part& a, const Part& b) { a.merge(b); }
    struct Thread {
        const T* x;
        Moments m{};
        A shift = 0, s = 0, q = 0;
        double ss = 0, qq = 0;
        int cnt = 0, depth = 0;
        __device__ Thread(const Inputs& in, int64_t) : x(in.x) {}
        __device__ void flush_run() {
            ss += double(s);
            qq += double(q);
            s = q = 0;
            depth = 0;
        }
        __device__ void add(int64_t e) {
            const A val = load(x[e]);
            if (cnt == 0) shift = val;
            const A d = val - shift;
            s += d;
            q += d * d;
            if (++depth == kDepth) flush_run();
            if (++cnt == kChunk) close_chunk();
        }
        __device__ void close_chunk() {
            flush_run();
            if (cnt > 0) m.merge_shifted(double(cnt), double(shift), ss, qq);
            ss = qq = 0;
            cnt = 0;
        }
        __device__ Part part() {
            close_chunk();
            return m;
        }
    };
};

// Backward sums (pybn::Sums): float32 runs of kDepth, then float64.
template <class T> struct SumsReducer {
    using A = acc_t<T>;
    using Part = Sums;
    struct Inputs { const T* dy; const T* x; const A* mean; const T* y = nullptr; };  // y: ReLU mask
    __device__ static void merge(Part& a, const Part& b) { a.merge(b); }
    struct Thread {
        const T *dy, *x;
        A m, s0 = 0, s1 = 0, s2 = 0;
        Sums total{};
        int depth = 0;
        const T* y;
        __device__ Thread(const Inputs& in, int64_t c) : dy(in.dy), x(in.x), m(in.mean[c]), y(in.y) {}
        __device__ void flush() {
            total.dy += double(s0);
            total.dy_xmu += double(s1);
            total.xmu += double(s2);
            s0 = s1 = s2 = 0;
            depth = 0;
        }
        __device__ void add(int64_t e) {
            A g = load(dy[e]);
            if (y && !(load(y[e]) > A(0))) g = A(0);  // behind a ReLU: the masked gradient
            const A d = load(x[e]) - m;
            s0 += g;
            s1 += g * d;
            s2 += d;
            if (++depth == kDepth) flush();
        }
        __device__ Part part() {
            flush();
            return total;
        }
    };
};

}  // namespace pybn::cuda
