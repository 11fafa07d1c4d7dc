// CUDA batch statistics (count, mean, M2) and the merge of K partial statistics.
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

__global__ void merge_stats_kernel(int64_t k, int64_t channels, const double* counts,
                                   const double* means, const double* m2s, double* count,
                                   double* mean, double* m2) {
    const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c < channels) merge_channel(k, channels, c, counts, means, m2s, count, mean, m2);
}

pybn_status launch_batch_stats(const char* fn, const pybn_view& v, const void* x, double* count,
                               double* mean, double* m2, cudaStream_t stream) {
    pybn_status st = PYBN_SUCCESS;
    with_dtype(v.dtype, [&](auto t) {
        using T = decltype(t);
        using R = StatsReducer<T>;
        const ReducePlan plan = plan_reduce(v);
        DeviceBuffer parts;
        st = parts.allocate(fn, sizeof(Moments) * size_t(v.channels * plan.chunks), stream);
        if (st != PYBN_SUCCESS) return;
        st = run_reduce<R>(fn, v, typename R::Inputs{static_cast<const T*>(x)}, plan,
                           parts.as<Moments>(), StatsOut{count, mean, m2}, stream);
    });
    return st;
}

pybn_status launch_merge_stats(const char* fn, int64_t k, int64_t channels, const double* counts,
                               const double* means, const double* m2s, double* count,
                               double* mean, double* m2, cudaStream_t stream) {
    if (channels == 0) return PYBN_SUCCESS;
    merge_stats_kernel<<<unsigned(ceil_div(channels, kThreads)), kThreads, 0, stream>>>(
        k, channels, counts, means, m2s, count, mean, m2);
    return launched(fn);
}

}  // namespace

extern "C" {

pybn_status pybn_cuda_batch_stats(pybn_view v, const void* x, double* count, double* mean,
                                  double* m2, void* stream) {
    const char* fn = "pybn_cuda_batch_stats";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_batch_stats(fn, kDevicePointers, v, x, count, mean, m2));
        return launch_batch_stats(fn, v, x, count, mean, m2, static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_merge_stats(int64_t k, int64_t channels, const double* counts,
                                  const double* means, const double* m2s, double* count,
                                  double* mean, double* m2, void* stream) {
    const char* fn = "pybn_cuda_merge_stats";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_merge_stats(fn, kDevicePointers, k, channels, counts, means, m2s, count, mean, m2));
        return launch_merge_stats(fn, k, channels, counts, means, m2s, count, mean, m2,
                                  static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
