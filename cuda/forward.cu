// CUDA forward family: training forward (batch statistics), normalisation with given
// statistics, inference forward; level 2 with a caller workspace, level 1 allocating it.
#include "common.cuh"

using namespace pybn;
using namespace pybn::cuda;

namespace {

// The per-channel steps of the three modes (formulas.hpp): statistics merged by the reduction
// feed the coefficients and running statistics in the same launch (thread 0 of each channel's
// finishing block); given statistics and inference run one thread per channel.
template <class P> struct TrainEpilogue {
    NormalizeArgs<P> args;
    __device__ void operator()(int64_t c, const Moments& m) const { normalize_channel(args, c, m.n, m.mean(), m.m2); }
};
template <class P> struct GivenStatsStep {
    NormalizeArgs<P> args;
    __device__ void operator()(int64_t c) const {
        normalize_channel(args, c, args.p.count[c], args.p.mean[c], args.p.m2[c]);
    }
};
// Ghost batches: each group's reduction leaves its statistics; one step per channel then
// normalises every group and updates the running statistics (formulas.hpp, as on the CPU).
struct StoreMoments {
    double *mean, *m2;
    __device__ void operator()(int64_t c, const Moments& m) const {
        mean[c] = m.mean();
        m2[c] = m.m2;
    }
};
template <class P> struct GhostStep {
    NormalizeArgs<P> args;
    int64_t groups;
    double count;  // values per channel of one group
    const double *mean, *m2;
    __device__ void operator()(int64_t c) const { ghost_channel(args, groups, c, count, mean, m2); }
};
template <class P> struct InferStep {
    NormalizeArgs<P> args;
    __device__ void operator()(int64_t c) const { infer_channel(args, c); }
};

size_t forward_workspace(const pybn_view& v, const pybn_forward_params& p, ForwardMode mode) {
    return workspace_bytes(v, [&](auto t, Workspace& ws) {
        using T = decltype(t);
        carve_temps<T, StatsReducer<T>>(v, mode == ForwardMode::train, ws, ghost_groups(p, mode));
    });
}

pybn_status launch_forward(const char* fn, const pybn_view& v, const void* x, void* y, const pybn_forward_params& p,
                           ForwardMode mode, void* workspace, size_t bytes, cudaStream_t stream) {
    clear_stale_error();
    pybn_status st = PYBN_SUCCESS;
    PYBN_CHECK(visit_dtype<DeviceStorage>(v.dtype, [&](auto t) {
        using T = decltype(t);
        using P = acc_t<T>;
        if (v.channels == 0) return;
        Workspace ws(workspace, bytes);
        const int64_t G = ghost_groups(p, mode), C = v.channels;
        const auto tmp = carve_temps<T, StatsReducer<T>>(v, mode == ForwardMode::train, ws, G);
        const NormalizeArgs<P> args{v.channels, p, tmp.coef};
        const pybn_view g = group_view(v, G);
        const int64_t step = g.outer * C * g.inner;
        const int vec = vec_width<T>(v, {x, y, p.residual});
        if (G > 1) {  // ghost batches: the groups' statistics, then one step per channel
            for (int64_t i = 0; i < G && st == PYBN_SUCCESS; ++i)
                st = run_reduce<StatsReducer<T>>(fn, g, {static_cast<const T*>(x) + i * step}, vec,
                                                 StoreMoments{tmp.stats + i * C, tmp.stats + (G + i) * C}, tmp.reduce,
                                                 stream);
            if (st == PYBN_SUCCESS)
                st = run_per_channel(fn, C, GhostStep<P>{args, G, double(g.outer * g.inner), tmp.stats,
                                                         tmp.stats + G * C}, stream);
        } else if (mode == ForwardMode::train)
            st = run_reduce<StatsReducer<T>>(fn, v, {static_cast<const T*>(x)}, vec, TrainEpilogue<P>{args},
                                             tmp.reduce, stream);
        else if (mode == ForwardMode::given_stats)
            st = run_per_channel(fn, v.channels, GivenStatsStep<P>{args}, stream);
        else
            st = run_per_channel(fn, v.channels, InferStep<P>{args}, stream);
        // the sweep, a launch per ghost batch (each with its coefficients)
        for (int64_t i = 0; i < G && st == PYBN_SUCCESS; ++i) {
            const int64_t off = G > 1 ? i * step : 0;
            const T* z = static_cast<const T*>(p.residual);
            const NormalizeOp<T> op{static_cast<const T*>(x) + off, static_cast<T*>(y) + off, tmp.coef + 4 * i * C,
                                    C, z ? z + off : nullptr, p.activation == PYBN_ACTIVATION_RELU};
            st = run_elementwise<T>(fn, G > 1 ? g : v, vec, op, stream);
        }
    }));
    return st;
}

// Level 2: checks (arguments, then the workspace), then the launches.
pybn_status forward_v2(const char* fn, const pybn_view& v, const void* x, void* y, const pybn_forward_params* params,
                       void* workspace, size_t bytes, void* stream) {
    pybn_forward_params p;
    PYBN_CHECK(read_params(fn, params, p));
    const ForwardMode mode = forward_mode(p);
    PYBN_CHECK(validate_forward(fn, kDevicePointers, v, x, y, p, mode));
    PYBN_CHECK(check_workspace(fn, workspace, bytes, forward_workspace(v, p, mode)));
    return launch_forward(fn, v, x, y, p, mode, workspace, bytes, static_cast<cudaStream_t>(stream));
}

// Level 1: checks, then a stream-ordered workspace of the size level 2 would ask for.
pybn_status forward_v1(const char* fn, const pybn_view& v, const void* x, void* y, const pybn_forward_params& p,
                       ForwardMode mode, void* stream) {
    PYBN_CHECK(validate_forward(fn, kDevicePointers, v, x, y, p, mode));
    const size_t bytes = forward_workspace(v, p, mode);
    DeviceBuffer ws;
    PYBN_CHECK(ws.allocate(fn, bytes, static_cast<cudaStream_t>(stream)));
    return launch_forward(fn, v, x, y, p, mode, ws.get(), bytes, static_cast<cudaStream_t>(stream));
}

}  // namespace

extern "C" {

pybn_status pybn_cuda_forward_workspace_size(pybn_view v, const pybn_forward_params* params, size_t* bytes) {
    const char* fn = "pybn_cuda_forward_workspace_size";
    return guarded(fn, [&] {
        pybn_forward_params p;
        PYBN_CHECK(read_params(fn, params, p));
        PYBN_CHECK(check_view(fn, v));
        PYBN_CHECK(check_ptr(fn, "bytes", bytes));
        *bytes = forward_workspace(v, p, forward_mode(p));
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_cuda_forward_v2(pybn_view v, const void* x, void* y, const pybn_forward_params* params,
                                 void* workspace, size_t workspace_bytes, void* stream) {
    const char* fn = "pybn_cuda_forward_v2";
    return guarded(fn, [&] { return forward_v2(fn, v, x, y, params, workspace, workspace_bytes, stream); });
}

pybn_status pybn_cuda_normalize(pybn_view v, const void* x, const double* count, const double* mean,
                                const double* m2, const void* gamma, const void* beta, double eps,
                                void* y, void* running_mean, void* running_var, double momentum,
                                void* save_mean, void* save_invstd, void* stream) {
    const char* fn = "pybn_cuda_normalize";
    return guarded(fn, [&] {
        pybn_forward_params p = PYBN_FORWARD_PARAMS_INIT;
        p.count = count, p.mean = mean, p.m2 = m2, p.gamma = gamma, p.beta = beta, p.eps = eps;
        p.running_mean = running_mean, p.running_var = running_var, p.momentum = momentum;
        p.save_mean = save_mean, p.save_invstd = save_invstd;
        return forward_v1(fn, v, x, y, p, ForwardMode::given_stats, stream);
    });
}

pybn_status pybn_cuda_forward_train(pybn_view v, const void* x, const void* gamma, const void* beta,
                                    double eps, void* running_mean, void* running_var,
                                    double momentum, void* y, void* save_mean, void* save_invstd,
                                    void* stream) {
    const char* fn = "pybn_cuda_forward_train";
    return guarded(fn, [&] {
        pybn_forward_params p = PYBN_FORWARD_PARAMS_INIT;
        p.gamma = gamma, p.beta = beta, p.eps = eps, p.running_mean = running_mean;
        p.running_var = running_var, p.momentum = momentum, p.save_mean = save_mean, p.save_invstd = save_invstd;
        return forward_v1(fn, v, x, y, p, ForwardMode::train, stream);
    });
}

pybn_status pybn_cuda_forward_infer(pybn_view v, const void* x, const void* running_mean,
                                    const void* running_var, const void* gamma, const void* beta,
                                    double eps, void* y, void* stream) {
    const char* fn = "pybn_cuda_forward_infer";
    return guarded(fn, [&] {
        pybn_forward_params p = PYBN_FORWARD_PARAMS_INIT;
        p.training = 0, p.gamma = gamma, p.beta = beta, p.eps = eps;
        p.running_mean = const_cast<void*>(running_mean);  // only read in inference
        p.running_var = const_cast<void*>(running_var);
        return forward_v1(fn, v, x, y, p, ForwardMode::infer, stream);
    });
}

}  // extern "C"
