// CUDA reductions: batch statistics (count, mean, M2) and the backward sums, each with a caller
// workspace (level 2) or allocating it (level 1); and the merge of K partial statistics.
#include "common.cuh"

using namespace pybn;
using namespace pybn::cuda;

namespace {

struct StatsOut {
    double *count, *mean, *m2;
    __device__ void operator()(int64_t c, const Moments& m) const {
        count[c] = m.n;
        mean[c] = m.mean();
        m2[c] = m.m2;
    }
};

struct SumsOut {
    double *sum_dy, *sum_dy_xmu, *sum_xmu;
    __device__ void operator()(int64_t c, const Sums& s) const {
        sum_dy[c] = s.dy;
        sum_dy_xmu[c] = s.dy_xmu;
        if (sum_xmu) sum_xmu[c] = s.xmu;
    }
};

struct MergeChannel {
    int64_t k, channels;
    const double *counts, *means, *m2s;
    double *count, *mean, *m2;
    __device__ void operator()(int64_t c) const { merge_channel(k, channels, c, counts, means, m2s, count, mean, m2); }
};

// One workspace size for both reductions: the temporaries of the larger Part.
static_assert(sizeof(Moments) >= sizeof(Sums), "the reduction workspace is sized for Moments");
size_t reduce_workspace(const pybn_view& v) {
    return workspace_bytes(v, [&](auto t, Workspace& ws) { reduce_temps<StatsReducer<decltype(t)>>(v, ws); });
}

pybn_status launch_batch_stats(const char* fn, const pybn_view& v, const void* x, double* count, double* mean,
                               double* m2, void* workspace, size_t bytes, cudaStream_t stream) {
    clear_stale_error();
    pybn_status st = PYBN_SUCCESS;
    PYBN_CHECK(visit_dtype<DeviceStorage>(v.dtype, [&](auto t) {
        using T = decltype(t);
        using R = StatsReducer<T>;
        Workspace ws(workspace, bytes);
        st = run_reduce<R>(fn, v, {static_cast<const T*>(x)}, vec_width<T>(v, {x}), StatsOut{count, mean, m2},
                           reduce_temps<R>(v, ws), stream);
    }));
    return st;
}

pybn_status launch_backward_reduce(const char* fn, const pybn_view& v, const void* dy, const void* x,
                                   const void* mean, double* sum_dy, double* sum_dy_xmu, double* sum_xmu,
                                   void* workspace, size_t bytes, cudaStream_t stream) {
    clear_stale_error();
    pybn_status st = PYBN_SUCCESS;
    PYBN_CHECK(visit_dtype<DeviceStorage>(v.dtype, [&](auto t) {
        using T = decltype(t);
        using R = SumsReducer<T>;
        Workspace ws(workspace, bytes);
        const typename R::Inputs in{static_cast<const T*>(dy), static_cast<const T*>(x),
                                    static_cast<const acc_t<T>*>(mean)};
        st = run_reduce<R>(fn, v, in, vec_width<T>(v, {dy, x}), SumsOut{sum_dy, sum_dy_xmu, sum_xmu},
                           reduce_temps<R>(v, ws), stream);
    }));
    return st;
}

}  // namespace

extern "C" {

pybn_status pybn_cuda_reduce_workspace_size(pybn_view v, size_t* bytes) {
    const char* fn = "pybn_cuda_reduce_workspace_size";
    return guarded(fn, [&] {
        PYBN_CHECK(check_view(fn, v));
        PYBN_CHECK(check_ptr(fn, "bytes", bytes));
        *bytes = reduce_workspace(v);
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_cuda_batch_stats_v2(pybn_view v, const void* x, double* count, double* mean, double* m2,
                                     void* workspace, size_t workspace_bytes, void* stream) {
    const char* fn = "pybn_cuda_batch_stats_v2";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_batch_stats(fn, kDevicePointers, v, x, count, mean, m2));
        PYBN_CHECK(check_workspace(fn, workspace, workspace_bytes, reduce_workspace(v)));
        return launch_batch_stats(fn, v, x, count, mean, m2, workspace, workspace_bytes,
                                  static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_batch_stats(pybn_view v, const void* x, double* count, double* mean,
                                  double* m2, void* stream) {
    const char* fn = "pybn_cuda_batch_stats";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_batch_stats(fn, kDevicePointers, v, x, count, mean, m2));
        const size_t bytes = reduce_workspace(v);
        DeviceBuffer ws;
        PYBN_CHECK(ws.allocate(fn, bytes, static_cast<cudaStream_t>(stream)));
        return launch_batch_stats(fn, v, x, count, mean, m2, ws.get(), bytes, static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_backward_reduce_v2(pybn_view v, const void* dy, const void* x, const void* mean,
                                         double* sum_dy, double* sum_dy_xmu, double* sum_xmu, void* workspace,
                                         size_t workspace_bytes, void* stream) {
    const char* fn = "pybn_cuda_backward_reduce_v2";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_backward_reduce(fn, kDevicePointers, v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu));
        PYBN_CHECK(check_workspace(fn, workspace, workspace_bytes, reduce_workspace(v)));
        return launch_backward_reduce(fn, v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu, workspace, workspace_bytes,
                                      static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_backward_reduce(pybn_view v, const void* dy, const void* x, const void* mean,
                                      double* sum_dy, double* sum_dy_xmu, double* sum_xmu,
                                      void* stream) {
    const char* fn = "pybn_cuda_backward_reduce";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_backward_reduce(fn, kDevicePointers, v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu));
        const size_t bytes = reduce_workspace(v);
        DeviceBuffer ws;
        PYBN_CHECK(ws.allocate(fn, bytes, static_cast<cudaStream_t>(stream)));
        return launch_backward_reduce(fn, v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu, ws.get(), bytes,
                                      static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_merge_stats(int64_t k, int64_t channels, const double* counts,
                                  const double* means, const double* m2s, double* count,
                                  double* mean, double* m2, void* stream) {
    const char* fn = "pybn_cuda_merge_stats";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_merge_stats(fn, kDevicePointers, k, channels, counts, means, m2s, count, mean, m2));
        clear_stale_error();
        return run_per_channel(fn, channels, MergeChannel{k, channels, counts, means, m2s, count, mean, m2},
                               static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
