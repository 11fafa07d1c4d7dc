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

struct MergeChannel {
    int64_t k, channels;
    const double *counts, *means, *m2s;
    double *count, *mean, *m2;
    __device__ void operator()(int64_t c) const { merge_channel(k, channels, c, counts, means, m2s, count, mean, m2); }
};

pybn_status launch_batch_stats(const char* fn, const pybn_view& v, const void* x, double* count,
                               double* mean, double* m2, cudaStream_t stream) {
    pybn_status st = PYBN_SUCCESS;
    with_dtype(v.dtype, [&](auto t) {
        using R = StatsReducer<decltype(t)>;
        st = run_reduce<R>(fn, v, typename R::Inputs{static_cast<const decltype(t)*>(x)}, StatsOut{count, mean, m2},
                           stream);
    });
    return st;
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
        return run_per_channel(fn, channels, MergeChannel{k, channels, counts, means, m2s, count, mean, m2},
                               static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
