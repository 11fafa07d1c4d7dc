// CUDA backward family: the fused backward (reduction, coefficients and parameter gradients,
// elementwise dx) and the elementwise step from given sums; level 2 with a caller workspace,
// level 1 allocating it.
#include "common.cuh"

using namespace pybn;
using namespace pybn::cuda;

namespace {

// dx = a * g + b * (x - mean) + c, coef = [mean | a | b | c]; x == nullptr: dx = a * g. g = dy,
// masked by y > 0 behind a ReLU (y != nullptr); dres (may be null) receives g; dx may be null.
template <class T> struct BackwardOp {
    const T *dy, *x;
    T* dx;
    const acc_t<T>* coef;
    int64_t C;
    const T* y;
    T* dres;
    __device__ void operator()(int64_t e, int64_t c) const {
        acc_t<T> g = load(dy[e]);
        if (y && !(load(y[e]) > acc_t<T>(0))) g = acc_t<T>(0);
        if (dres) dres[e] = store<T>(g);
        if (!dx) return;
        const acc_t<T> ag = coef[C + c] * g;
        dx[e] = store<T>(x ? ag + coef[2 * C + c] * (load(x[e]) - coef[c]) + coef[3 * C + c] : ag);
    }
};

// The reduction's sums feed the coefficients and parameter gradients in the same launch.
template <class P> struct SumsEpilogue {
    BackwardArgs<P> args;
    __device__ void operator()(int64_t c, const Sums& s) const { backward_channel(args, c, s.dy, s.dy_xmu, s.xmu); }
};

// The same from given (possibly all-reduced) sums.
template <class P> struct GivenSumsStep {
    BackwardArgs<P> args;
    __device__ void operator()(int64_t c) const {
        const pybn_backward_params& p = args.p;
        backward_channel(args, c, p.sum_dy[c], p.sum_dy_xmu[c], p.sum_xmu ? p.sum_xmu[c] : 0.0);
    }
};

size_t backward_workspace(const pybn_view& v, BackwardMode mode) {
    return workspace_bytes(v, [&](auto t, Workspace& ws) {
        using T = decltype(t);
        carve_temps<T, SumsReducer<T>>(v, mode == BackwardMode::fused, ws);
    });
}

pybn_status launch_backward(const char* fn, const pybn_view& v, const void* dy, const void* x, void* dx,
                            const pybn_backward_params& p, BackwardMode mode, void* workspace, size_t bytes,
                            cudaStream_t stream) {
    clear_stale_error();
    pybn_status st = PYBN_SUCCESS;
    PYBN_CHECK(visit_dtype<DeviceStorage>(v.dtype, [&](auto t) {
        using T = decltype(t);
        using P = acc_t<T>;
        if (v.channels == 0) return;
        Workspace ws(workspace, bytes);
        const auto tmp = carve_temps<T, SumsReducer<T>>(v, mode == BackwardMode::fused, ws);
        const BackwardArgs<P> args{v.channels, p, double(v.outer * v.inner), tmp.coef};
        if (mode == BackwardMode::fused) {
            const typename SumsReducer<T>::Inputs in{
                static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const P*>(p.mean),
                p.activation == PYBN_ACTIVATION_RELU ? static_cast<const T*>(p.y) : nullptr};
            st = run_reduce<SumsReducer<T>>(fn, v, in, SumsEpilogue<P>{args}, tmp.parts, stream);
        } else {
            st = run_per_channel(fn, v.channels, GivenSumsStep<P>{args}, stream);
        }
        if (st != PYBN_SUCCESS || (dx == nullptr && p.dresidual == nullptr)) return;
        const BackwardOp<T> op{static_cast<const T*>(dy), p.training ? static_cast<const T*>(x) : nullptr,
                               static_cast<T*>(dx), tmp.coef, v.channels,
                               p.activation == PYBN_ACTIVATION_RELU ? static_cast<const T*>(p.y) : nullptr,
                               static_cast<T*>(p.dresidual)};
        st = run_elementwise(fn, v, op, stream);
    }));
    return st;
}

pybn_status backward_v2(const char* fn, const pybn_view& v, const void* dy, const void* x, void* dx,
                        const pybn_backward_params* params, void* workspace, size_t bytes, void* stream) {
    pybn_backward_params p;
    PYBN_CHECK(read_params(fn, params, p));
    const BackwardMode mode = backward_mode(p);
    PYBN_CHECK(validate_backward(fn, kDevicePointers, v, dy, x, dx, p, mode));
    PYBN_CHECK(check_workspace(fn, workspace, bytes, backward_workspace(v, mode)));
    return launch_backward(fn, v, dy, x, dx, p, mode, workspace, bytes, static_cast<cudaStream_t>(stream));
}

pybn_status backward_v1(const char* fn, const pybn_view& v, const void* dy, const void* x, void* dx,
                        const pybn_backward_params& p, BackwardMode mode, void* stream) {
    PYBN_CHECK(validate_backward(fn, kDevicePointers, v, dy, x, dx, p, mode));
    const size_t bytes = backward_workspace(v, mode);
    DeviceBuffer ws;
    PYBN_CHECK(ws.allocate(fn, bytes, static_cast<cudaStream_t>(stream)));
    return launch_backward(fn, v, dy, x, dx, p, mode, ws.get(), bytes, static_cast<cudaStream_t>(stream));
}

}  // namespace

extern "C" {

pybn_status pybn_cuda_backward_workspace_size(pybn_view v, const pybn_backward_params* params, size_t* bytes) {
    const char* fn = "pybn_cuda_backward_workspace_size";
    return guarded(fn, [&] {
        pybn_backward_params p;
        PYBN_CHECK(read_params(fn, params, p));
        PYBN_CHECK(check_view(fn, v));
        PYBN_CHECK(check_ptr(fn, "bytes", bytes));
        *bytes = backward_workspace(v, backward_mode(p));
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_cuda_backward_v2(pybn_view v, const void* dy, const void* x, void* dx,
                                  const pybn_backward_params* params, void* workspace, size_t workspace_bytes,
                                  void* stream) {
    const char* fn = "pybn_cuda_backward_v2";
    return guarded(fn, [&] { return backward_v2(fn, v, dy, x, dx, params, workspace, workspace_bytes, stream); });
}

pybn_status pybn_cuda_backward_elementwise(pybn_view v, const void* dy, const void* x,
                                           const void* mean, const void* invstd, const void* gamma,
                                           int training, const double* count, const double* sum_dy,
                                           const double* sum_dy_xmu, const double* sum_xmu,
                                           void* dx, void* dgamma, void* dbeta, void* stream) {
    const char* fn = "pybn_cuda_backward_elementwise";
    return guarded(fn, [&] {
        pybn_backward_params p = PYBN_BACKWARD_PARAMS_INIT;
        p.training = training != 0, p.mean = mean, p.invstd = invstd, p.gamma = gamma;
        p.count = count, p.sum_dy = sum_dy, p.sum_dy_xmu = sum_dy_xmu, p.sum_xmu = sum_xmu;
        p.dgamma = dgamma, p.dbeta = dbeta;
        return backward_v1(fn, v, dy, x, dx, p, BackwardMode::given_sums, stream);
    });
}

pybn_status pybn_cuda_backward(pybn_view v, const void* dy, const void* x, const void* mean,
                               const void* invstd, const void* gamma, int training, void* dx,
                               void* dgamma, void* dbeta, void* stream) {
    const char* fn = "pybn_cuda_backward";
    return guarded(fn, [&] {
        pybn_backward_params p = PYBN_BACKWARD_PARAMS_INIT;
        p.training = training != 0, p.mean = mean, p.invstd = invstd, p.gamma = gamma;
        p.dgamma = dgamma, p.dbeta = dbeta;
        return backward_v1(fn, v, dy, x, dx, p, BackwardMode::fused, stream);
    });
}

}  // extern "C"
