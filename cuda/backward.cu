// CUDA backward family: the fused backward (reduction, coefficients and parameter gradients,
// elementwise dx) and the elementwise step from given sums; level 2 with a caller workspace,
// level 1 allocating it.
#include "common.cuh"

using namespace pybn;
using namespace pybn::cuda;

namespace {

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

// Ghost batches: each group's reduction leaves its sums (3 x C); one step per channel then
// computes every group's coefficients and the summed parameter gradients (formulas.hpp).
struct StoreSums {
    double* sums;
    int64_t C;
    __device__ void operator()(int64_t c, const Sums& s) const {
        sums[c] = s.dy;
        sums[C + c] = s.dy_xmu;
        sums[2 * C + c] = s.xmu;
    }
};
template <class P> struct GhostSumsStep {
    BackwardArgs<P> args;
    int64_t groups;
    const double* sums;
    __device__ void operator()(int64_t c) const { ghost_backward_channel(args, groups, c, sums); }
};

size_t backward_workspace(const pybn_view& v, const pybn_backward_params& p, BackwardMode mode) {
    return workspace_bytes(v, [&](auto t, Workspace& ws) {
        using T = decltype(t);
        carve_temps<T, SumsReducer<T>>(v, mode == BackwardMode::fused, ws, ghost_groups(p, mode));
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
        const int64_t G = ghost_groups(p, mode), C = v.channels;
        const auto tmp = carve_temps<T, SumsReducer<T>>(v, mode == BackwardMode::fused, ws, G);
        const pybn_view g = group_view(v, G);
        const int64_t step = g.outer * C * g.inner;
        const BackwardArgs<P> args{v.channels, p, double(g.outer * g.inner), tmp.coef};
        const T* ymask = p.activation == PYBN_ACTIVATION_RELU ? static_cast<const T*>(p.y) : nullptr;
        const T* xin = p.training ? static_cast<const T*>(x) : nullptr;
        const int vec = vec_width<T>(v, {dy, x, dx, ymask, p.dresidual});
        if (G > 1) {  // ghost batches: the groups' sums, then one step per channel
            for (int64_t i = 0; i < G && st == PYBN_SUCCESS; ++i) {
                const typename SumsReducer<T>::Inputs in{static_cast<const T*>(dy) + i * step,
                                                         static_cast<const T*>(x) + i * step,
                                                         static_cast<const P*>(p.mean) + i * C,
                                                         ymask ? ymask + i * step : nullptr};
                st = run_reduce<SumsReducer<T>>(fn, g, in, vec, StoreSums{tmp.stats + 3 * i * C, C}, tmp.reduce,
                                                stream);
            }
            if (st == PYBN_SUCCESS) st = run_per_channel(fn, C, GhostSumsStep<P>{args, G, tmp.stats}, stream);
        } else if (mode == BackwardMode::fused) {
            const typename SumsReducer<T>::Inputs in{static_cast<const T*>(dy), static_cast<const T*>(x),
                                                     static_cast<const P*>(p.mean), ymask};
            st = run_reduce<SumsReducer<T>>(fn, v, in, vec, SumsEpilogue<P>{args}, tmp.reduce, stream);
        } else {
            st = run_per_channel(fn, v.channels, GivenSumsStep<P>{args}, stream);
        }
        if (dx == nullptr && p.dresidual == nullptr) return;
        // the sweep, a launch per ghost batch (each with its coefficients)
        for (int64_t i = 0; i < G && st == PYBN_SUCCESS; ++i) {
            const int64_t off = G > 1 ? i * step : 0;
            T* dres = static_cast<T*>(p.dresidual);
            const BackwardOp<T> op{static_cast<const T*>(dy) + off, xin ? xin + off : nullptr,
                                   dx ? static_cast<T*>(dx) + off : nullptr, tmp.coef + 4 * i * C, C,
                                   ymask ? ymask + off : nullptr, dres ? dres + off : nullptr};
            st = run_elementwise<T>(fn, G > 1 ? g : v, vec, op, stream);
        }
    }));
    return st;
}

pybn_status backward_v2(const char* fn, const pybn_view& v, const void* dy, const void* x, void* dx,
                        const pybn_backward_params* params, void* workspace, size_t bytes, void* stream) {
    pybn_backward_params p;
    PYBN_CHECK(read_params(fn, params, p));
    const BackwardMode mode = backward_mode(p);
    PYBN_CHECK(validate_backward(fn, kDevicePointers, v, dy, x, dx, p, mode));
    PYBN_CHECK(check_workspace(fn, workspace, bytes, backward_workspace(v, p, mode)));
    return launch_backward(fn, v, dy, x, dx, p, mode, workspace, bytes, static_cast<cudaStream_t>(stream));
}

pybn_status backward_v1(const char* fn, const pybn_view& v, const void* dy, const void* x, void* dx,
                        const pybn_backward_params& p, BackwardMode mode, void* stream) {
    PYBN_CHECK(validate_backward(fn, kDevicePointers, v, dy, x, dx, p, mode));
    const size_t bytes = backward_workspace(v, p, mode);
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
        *bytes = backward_workspace(v, p, backward_mode(p));
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
