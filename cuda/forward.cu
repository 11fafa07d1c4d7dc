// CUDA forward: normalise with given statistics, fused training forward, inference forward.
#include "common.cuh"

using namespace pybn;
using namespace pybn::cuda;

namespace {

// y = ((x - hi) - lo) * scale + shift, coef = [hi | lo | scale | shift] (see formulas.hpp)
template <class T> struct NormalizeOp {
    const T* x;
    T* y;
    const acc_t<T>* coef;
    int64_t C;
    __device__ void operator()(int64_t e, int64_t c) const {
        y[e] = store<T>(((load(x[e]) - coef[c]) - coef[C + c]) * coef[2 * C + c] + coef[3 * C + c]);
    }
};

// Statistics merged by the reduction feed the per-channel coefficients and running statistics
// in the same launch (thread 0 of each channel's finishing block).
template <class P> struct TrainEpilogue {
    NormalizeArgs<P> args;
    __device__ void operator()(int64_t c, const Moments& m) const {
        normalize_channel(args, c, m.n, m.mean(), m.m2);
    }
};

// The same from given statistics (count, mean, M2 arrays).
template <class P> struct NormalizeStep {
    NormalizeArgs<P> args;
    __device__ void operator()(int64_t c) const {
        normalize_channel(args, c, args.count[c], args.mean[c], args.m2[c]);
    }
};

template <class P> struct InferStep {
    int64_t C;
    const P *running_mean, *running_var, *gamma, *beta;
    double eps;
    P* coef;
    __device__ void operator()(int64_t c) const {
        infer_channel(C, c, running_mean, running_var, gamma, beta, eps, coef);
    }
};

template <class P>
NormalizeArgs<P> normalize_args(const pybn_view& v, const double* count, const double* mean,
                                const double* m2, const void* gamma, const void* beta, double eps,
                                void* running_mean, void* running_var, double momentum,
                                void* save_mean, void* save_invstd, P* coef) {
    return {v.channels, count, mean, m2, static_cast<const P*>(gamma), static_cast<const P*>(beta),
            eps, static_cast<P*>(running_mean), static_cast<P*>(running_var), momentum,
            static_cast<P*>(save_mean), static_cast<P*>(save_invstd), coef};
}

// The shape of every forward: coefficients (step(coef) queues their computation), then y.
template <class T, class Step>
pybn_status forward(const char* fn, const pybn_view& v, const void* x, void* y, Step step, cudaStream_t stream) {
    using P = acc_t<T>;
    if (v.channels == 0) return PYBN_SUCCESS;
    Coefficients<P> coef;
    PYBN_CHECK(coef.allocate(fn, v.channels, stream));
    PYBN_CHECK(step(coef.ptr));
    return run_elementwise(fn, v, NormalizeOp<T>{static_cast<const T*>(x), static_cast<T*>(y), coef.ptr, v.channels},
                           stream);
}

pybn_status launch_forward_train(const char* fn, const pybn_view& v, const void* x,
                                 const void* gamma, const void* beta, double eps,
                                 void* running_mean, void* running_var, double momentum, void* y,
                                 void* save_mean, void* save_invstd, cudaStream_t stream) {
    pybn_status st = PYBN_SUCCESS;
    with_dtype(v.dtype, [&](auto t) {
        using T = decltype(t);
        using P = acc_t<T>;
        using R = StatsReducer<T>;
        st = forward<T>(fn, v, x, y, [&](P* coef) {
            const TrainEpilogue<P> epi{normalize_args<P>(v, nullptr, nullptr, nullptr, gamma, beta, eps, running_mean,
                                                         running_var, momentum, save_mean, save_invstd, coef)};
            return run_reduce<R>(fn, v, typename R::Inputs{static_cast<const T*>(x)}, epi, stream);
        }, stream);
    });
    return st;
}

pybn_status launch_normalize(const char* fn, const pybn_view& v, const void* x, const double* count,
                             const double* mean, const double* m2, const void* gamma,
                             const void* beta, double eps, void* y, void* running_mean,
                             void* running_var, double momentum, void* save_mean,
                             void* save_invstd, cudaStream_t stream) {
    pybn_status st = PYBN_SUCCESS;
    with_dtype(v.dtype, [&](auto t) {
        using P = acc_t<decltype(t)>;
        st = forward<decltype(t)>(fn, v, x, y, [&](P* coef) {
            const NormalizeStep<P> step{normalize_args<P>(v, count, mean, m2, gamma, beta, eps, running_mean,
                                                          running_var, momentum, save_mean, save_invstd, coef)};
            return run_per_channel(fn, v.channels, step, stream);
        }, stream);
    });
    return st;
}

pybn_status launch_forward_infer(const char* fn, const pybn_view& v, const void* x,
                                 const void* running_mean, const void* running_var,
                                 const void* gamma, const void* beta, double eps, void* y,
                                 cudaStream_t stream) {
    pybn_status st = PYBN_SUCCESS;
    with_dtype(v.dtype, [&](auto t) {
        using P = acc_t<decltype(t)>;
        st = forward<decltype(t)>(fn, v, x, y, [&](P* coef) {
            const InferStep<P> step{v.channels, static_cast<const P*>(running_mean), static_cast<const P*>(running_var),
                                    static_cast<const P*>(gamma), static_cast<const P*>(beta), eps, coef};
            return run_per_channel(fn, v.channels, step, stream);
        }, stream);
    });
    return st;
}

}  // namespace

extern "C" {

pybn_status pybn_cuda_normalize(pybn_view v, const void* x, const double* count, const double* mean,
                                const double* m2, const void* gamma, const void* beta, double eps,
                                void* y, void* running_mean, void* running_var, double momentum,
                                void* save_mean, void* save_invstd, void* stream) {
    const char* fn = "pybn_cuda_normalize";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_normalize(fn, kDevicePointers, v, x, count, mean, m2, gamma, beta, eps, y, running_mean,
                                      running_var, momentum, save_mean, save_invstd));
        return launch_normalize(fn, v, x, count, mean, m2, gamma, beta, eps, y, running_mean,
                                running_var, momentum, save_mean, save_invstd,
                                static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_forward_train(pybn_view v, const void* x, const void* gamma, const void* beta,
                                    double eps, void* running_mean, void* running_var,
                                    double momentum, void* y, void* save_mean, void* save_invstd,
                                    void* stream) {
    const char* fn = "pybn_cuda_forward_train";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_forward_train(fn, kDevicePointers, v, x, gamma, beta, eps, running_mean, running_var,
                                          momentum, y, save_mean, save_invstd));
        return launch_forward_train(fn, v, x, gamma, beta, eps, running_mean, running_var, momentum,
                                    y, save_mean, save_invstd, static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_forward_infer(pybn_view v, const void* x, const void* running_mean,
                                    const void* running_var, const void* gamma, const void* beta,
                                    double eps, void* y, void* stream) {
    const char* fn = "pybn_cuda_forward_infer";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_forward_infer(fn, kDevicePointers, v, x, running_mean, running_var, gamma, beta, eps, y));
        return launch_forward_infer(fn, v, x, running_mean, running_var, gamma, beta, eps, y,
                                    static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
