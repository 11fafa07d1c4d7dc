// CUDA backward: reduction (sum dy, sum dy*(x-mean), sum x-mean), elementwise step with the
// parameter gradients, and the fused backward.
#include "common.cuh"

using namespace pybn;
using namespace pybn::cuda;

namespace {

// dx = a * dy + b * (x - mean) + c, coef = [mean | a | b | c]; x == nullptr: dx = a * dy.
template <class T> struct BackwardOp {
    const T *dy, *x;
    T* dx;
    const acc_t<T>* coef;
    int64_t C;
    __device__ void operator()(int64_t e, int64_t c) const {
        const acc_t<T> g = coef[C + c] * load(dy[e]);
        dx[e] = store<T>(x ? g + coef[2 * C + c] * (load(x[e]) - coef[c]) + coef[3 * C + c] : g);
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

// The reduction's sums feed the coefficients and parameter gradients in the same launch.
template <class P> struct BackwardEpilogue {
    BackwardArgs<P> args;
    __device__ void operator()(int64_t c, const Sums& s) const {
        backward_channel(args, c, s.dy, s.dy_xmu, s.xmu);
    }
};

// The same from given (possibly all-reduced) sums.
template <class P> struct BackwardStep {
    BackwardArgs<P> args;
    __device__ void operator()(int64_t c) const {
        backward_channel(args, c, args.sum_dy[c], args.sum_dy_xmu[c], args.sum_xmu ? args.sum_xmu[c] : 0.0);
    }
};

template <class P>
BackwardArgs<P> backward_args(const pybn_view& v, const void* mean, const void* invstd,
                              const void* gamma, int training, const double* count,
                              const double* sum_dy, const double* sum_dy_xmu,
                              const double* sum_xmu, void* dgamma, void* dbeta, P* coef) {
    return {v.channels, static_cast<const P*>(mean), static_cast<const P*>(invstd),
            static_cast<const P*>(gamma), training != 0, count, double(v.outer * v.inner),
            sum_dy, sum_dy_xmu, sum_xmu, static_cast<P*>(dgamma), static_cast<P*>(dbeta), coef};
}

// The shape of both backwards: coefficients and parameter gradients (step(coef) queues them),
// then dx when asked for (x only in training).
template <class T, class Step>
pybn_status backward(const char* fn, const pybn_view& v, const void* dy, const void* x, int training, void* dx,
                     Step step, cudaStream_t stream) {
    using P = acc_t<T>;
    if (v.channels == 0) return PYBN_SUCCESS;
    Coefficients<P> coef;
    PYBN_CHECK(coef.allocate(fn, v.channels, stream));
    PYBN_CHECK(step(coef.ptr));
    if (dx == nullptr) return PYBN_SUCCESS;
    const BackwardOp<T> op{static_cast<const T*>(dy), training ? static_cast<const T*>(x) : nullptr,
                           static_cast<T*>(dx), coef.ptr, v.channels};
    return run_elementwise(fn, v, op, stream);
}

pybn_status launch_backward_reduce(const char* fn, const pybn_view& v, const void* dy,
                                   const void* x, const void* mean, double* sum_dy,
                                   double* sum_dy_xmu, double* sum_xmu, cudaStream_t stream) {
    pybn_status st = PYBN_SUCCESS;
    with_dtype(v.dtype, [&](auto t) {
        using T = decltype(t);
        using R = SumsReducer<T>;
        const typename R::Inputs in{static_cast<const T*>(dy), static_cast<const T*>(x),
                                    static_cast<const acc_t<T>*>(mean)};
        st = run_reduce<R>(fn, v, in, SumsOut{sum_dy, sum_dy_xmu, sum_xmu}, stream);
    });
    return st;
}

pybn_status launch_backward_elementwise(const char* fn, const pybn_view& v, const void* dy,
                                        const void* x, const void* mean, const void* invstd,
                                        const void* gamma, int training, const double* count,
                                        const double* sum_dy, const double* sum_dy_xmu,
                                        const double* sum_xmu, void* dx, void* dgamma,
                                        void* dbeta, cudaStream_t stream) {
    pybn_status st = PYBN_SUCCESS;
    with_dtype(v.dtype, [&](auto t) {
        using P = acc_t<decltype(t)>;
        st = backward<decltype(t)>(fn, v, dy, x, training, dx, [&](P* coef) {
            const BackwardStep<P> step{backward_args<P>(v, mean, invstd, gamma, training, count, sum_dy, sum_dy_xmu,
                                                        sum_xmu, dgamma, dbeta, coef)};
            return run_per_channel(fn, v.channels, step, stream);
        }, stream);
    });
    return st;
}

pybn_status launch_backward(const char* fn, const pybn_view& v, const void* dy, const void* x,
                            const void* mean, const void* invstd, const void* gamma, int training,
                            void* dx, void* dgamma, void* dbeta, cudaStream_t stream) {
    pybn_status st = PYBN_SUCCESS;
    with_dtype(v.dtype, [&](auto t) {
        using T = decltype(t);
        using P = acc_t<T>;
        using R = SumsReducer<T>;
        st = backward<T>(fn, v, dy, x, training, dx, [&](P* coef) {
            const typename R::Inputs in{static_cast<const T*>(dy), static_cast<const T*>(x),
                                        static_cast<const P*>(mean)};
            const BackwardEpilogue<P> epi{backward_args<P>(v, mean, invstd, gamma, training, nullptr, nullptr,
                                                           nullptr, nullptr, dgamma, dbeta, coef)};
            return run_reduce<R>(fn, v, in, epi, stream);
        }, stream);
    });
    return st;
}

}  // namespace

extern "C" {

pybn_status pybn_cuda_backward_reduce(pybn_view v, const void* dy, const void* x, const void* mean,
                                      double* sum_dy, double* sum_dy_xmu, double* sum_xmu,
                                      void* stream) {
    const char* fn = "pybn_cuda_backward_reduce";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_backward_reduce(fn, kDevicePointers, v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu));
        return launch_backward_reduce(fn, v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu,
                                      static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_backward_elementwise(pybn_view v, const void* dy, const void* x,
                                           const void* mean, const void* invstd, const void* gamma,
                                           int training, const double* count, const double* sum_dy,
                                           const double* sum_dy_xmu, const double* sum_xmu,
                                           void* dx, void* dgamma, void* dbeta, void* stream) {
    const char* fn = "pybn_cuda_backward_elementwise";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_backward_elementwise(fn, kDevicePointers, v, dy, x, mean, invstd, gamma, training, count,
                                                 sum_dy, sum_dy_xmu, sum_xmu, dx, dgamma, dbeta));
        return launch_backward_elementwise(fn, v, dy, x, mean, invstd, gamma, training, count,
                                           sum_dy, sum_dy_xmu, sum_xmu, dx, dgamma, dbeta,
                                           static_cast<cudaStream_t>(stream));
    });
}

pybn_status pybn_cuda_backward(pybn_view v, const void* dy, const void* x, const void* mean,
                               const void* invstd, const void* gamma, int training, void* dx,
                               void* dgamma, void* dbeta, void* stream) {
    const char* fn = "pybn_cuda_backward";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_backward(fn, kDevicePointers, v, dy, x, mean, invstd, gamma, training, dx, dgamma, dbeta));
        return launch_backward(fn, v, dy, x, mean, invstd, gamma, training, dx, dgamma, dbeta,
                               static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
