// The CPU entry points of the C ABI: argument checks, temporaries, per-channel coefficients and
// dispatch to the kernel table. Every check runs before any output is written.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.hpp"
#include "cpu_kernels.hpp"
#include "numerics.hpp"
#include "formulas.hpp"
#include "pybn/pybn.h"

#ifndef PYBN_VERSION_STRING
#error "PYBN_VERSION_STRING must be defined by the build"
#endif

using namespace pybn;

namespace {

int64_t per_channel(const pybn_view& v) { return v.outer * v.inner; }
// Whether the CPU kernels have anything to do: values in at least one channel.
bool has_values(const pybn_view& v) { return v.channels > 0 && per_channel(v) > 0; }

template <class P> void copy_out(const std::vector<P>& from, void* to) {
    if (to) std::copy(from.begin(), from.end(), static_cast<P*>(to));
}

// The per-channel outputs of a forward (running statistics, saved mean / invstd) are computed
// into copies and written back by finish(), after the kernel: nothing is written before. The
// kernels see the caller's parameter block with its output pointers redirected to the copies.
template <class P> class ForwardOutputs {
  public:
    ForwardOutputs(int64_t C, const pybn_forward_params& p, ForwardMode mode)
        : params_(p), dst_{p.running_mean, p.running_var, p.save_mean, p.save_invstd, p.save_renorm_r, p.save_renorm_d} {
        if (mode == ForwardMode::infer) dst_[0] = dst_[1] = nullptr;  // read only
        for (int k = 0; k < kOutputs; ++k) {
            if (!dst_[k]) continue;
            if (k < 2)  // running statistics are read and updated
                copy_[k].assign(static_cast<const P*>(dst_[k]), static_cast<const P*>(dst_[k]) + C);
            else  // saved values: one row per ghost batch
                copy_[k].resize(static_cast<size_t>(C * ghost_groups(p, mode)));
        }
        void** redirect[kOutputs] = {&params_.running_mean, &params_.running_var,   &params_.save_mean,
                                     &params_.save_invstd,  &params_.save_renorm_r, &params_.save_renorm_d};
        for (int k = 0; k < kOutputs; ++k)
            if (dst_[k]) *redirect[k] = copy_[k].data();
    }
    NormalizeArgs<P> args(int64_t C, P* coef) const { return {C, params_, coef}; }
    void finish() {
        for (int k = 0; k < kOutputs; ++k) copy_out(copy_[k], dst_[k]);
    }

  private:
    static constexpr int kOutputs = 6;  // running mean / var (updated), saved mean / invstd / r / d
    pybn_forward_params params_;
    void* dst_[kOutputs];
    std::vector<P> copy_[kOutputs];
};

// Fused training forward: the kernel reduces a channel group, this epilogue turns its
// statistics into coefficients (and running statistics / saved values, into copies).
template <class P> class TrainEpilogue final : public cpu::ForwardEpilogue {
  public:
    TrainEpilogue(const NormalizeArgs<P>& args, double count) : args_(args), count_(count) {}
    void operator()(int64_t c0, int64_t c1, const double* mean, const double* m2, void* coef) const override {
        NormalizeArgs<P> a = args_;
        a.coef = static_cast<P*>(coef);
        for (int64_t c = c0; c < c1; ++c) normalize_channel(a, c, count_, mean[c - c0], m2[c - c0]);
    }

  private:
    NormalizeArgs<P> args_;
    double count_;
};

// Fused backward: the kernel reduces a channel group, this epilogue computes the coefficients
// and parameter gradients (into copies).
template <class P> class SumsEpilogue final : public cpu::BackwardEpilogue {
  public:
    explicit SumsEpilogue(const BackwardArgs<P>& args) : args_(args) {}
    void operator()(int64_t c0, int64_t c1, const double* sum_dy, const double* sum_dy_xmu, const double* sum_xmu,
                    void* coef) const override {
        BackwardArgs<P> a = args_;
        a.coef = static_cast<P*>(coef);
        for (int64_t c = c0; c < c1; ++c) backward_channel(a, c, sum_dy[c - c0], sum_dy_xmu[c - c0], sum_xmu[c - c0]);
    }

  private:
    BackwardArgs<P> args_;
};

// Ghost batches: the statistics of every group (reads only), then every group's coefficients
// and the running statistics (into copies), then one normalisation sweep by groups. Nothing is
// written before the sweep, which allocates before its first write.
template <class P>
pybn_status ghost_forward(const pybn_view& v, const void* x, void* y, NormalizeArgs<P> args, int64_t groups,
                          cpu::OutputOps ops) {
    const int64_t C = v.channels;
    const pybn_view g = group_view(v, groups);
    const size_t step = size_t(per_channel(g) * C * dtype_info(v.dtype)->size);
    std::vector<double> mean(static_cast<size_t>(groups * C)), m2(mean.size());
    std::vector<P> coef(static_cast<size_t>(4 * groups * C));
    for (int64_t i = 0; i < groups; ++i)
        PYBN_CHECK(cpu::kernels().batch_stats(g, static_cast<const char*>(x) + size_t(i) * step, &mean[size_t(i * C)],
                                              &m2[size_t(i * C)]));
    args.coef = coef.data();
    for (int64_t c = 0; c < C; ++c) ghost_channel(args, groups, c, double(per_channel(g)), mean.data(), m2.data());
    ops.groups = groups;
    if (has_values(v)) PYBN_CHECK(cpu::kernels().normalize(v, x, coef.data(), y, ops));
    return PYBN_SUCCESS;
}

template <class P>
pybn_status forward_impl(const char* fn, const pybn_view& v, const void* x, void* y, const pybn_forward_params& p,
                         ForwardMode mode) {
    const int64_t C = v.channels;
    if (mode == ForwardMode::given_stats) PYBN_CHECK(check_counts(fn, C, p.count, double(train_minimum(p))));
    ForwardOutputs<P> outputs(C, p, mode);
    const cpu::OutputOps ops{p.activation, p.residual};
    if (ghost_groups(p, mode) > 1) {
        if (C > 0) PYBN_CHECK(ghost_forward(v, x, y, outputs.args(C, nullptr), ghost_groups(p, mode), ops));
    } else if (mode == ForwardMode::train) {
        const TrainEpilogue<P> epilogue(outputs.args(C, nullptr), double(per_channel(v)));
        if (C > 0) PYBN_CHECK(cpu::kernels().forward_train(v, x, y, epilogue, ops));
    } else {
        std::vector<P> coef(static_cast<size_t>(4 * C));
        const NormalizeArgs<P> args = outputs.args(C, coef.data());
        for (int64_t c = 0; c < C; ++c) {
            if (mode == ForwardMode::infer) infer_channel(args, c);
            else normalize_channel(args, c, p.count[c], p.mean[c], p.m2[c]);
        }
        if (has_values(v)) PYBN_CHECK(cpu::kernels().normalize(v, x, coef.data(), y, ops));
    }
    outputs.finish();
    return PYBN_SUCCESS;
}

// The fused backward's reduction of one group, kept: its sums per channel (no coefficients).
class SumsRecorder final : public cpu::BackwardEpilogue {
  public:
    SumsRecorder(double* sums, int64_t C) : sums_(sums), C_(C) {}  // 3 x C: sum_dy | sum_dy_xmu | sum_xmu
    void operator()(int64_t c0, int64_t c1, const double* sum_dy, const double* sum_dy_xmu, const double* sum_xmu,
                    void*) const override {
        for (int64_t c = c0; c < c1; ++c) {
            sums_[c] = sum_dy[c - c0];
            sums_[C_ + c] = sum_dy_xmu[c - c0];
            sums_[2 * C_ + c] = sum_xmu[c - c0];
        }
    }

  private:
    double* sums_;
    int64_t C_;
};

// Ghost batches: every group's sums (reads only: the fused kernel without dx), every group's
// coefficients and dgamma / dbeta (into copies), then one elementwise sweep by groups (dx,
// dresidual), which allocates before its first write.
template <class P>
pybn_status ghost_backward(const pybn_view& v, const void* dy, const void* x, void* dx, BackwardArgs<P> args,
                           int64_t groups, cpu::GradOps ops) {
    const int64_t C = v.channels;
    const pybn_view g = group_view(v, groups);
    const size_t step = size_t(per_channel(g) * C * dtype_info(v.dtype)->size);
    std::vector<double> sums(static_cast<size_t>(3 * groups * C));
    std::vector<P> coef(static_cast<size_t>(4 * groups * C));
    cpu::GradOps reduce_ops = ops;  // the mask only
    reduce_ops.dresidual = nullptr;
    for (int64_t i = 0; i < groups; ++i) {  // validated: every group has values
        const size_t off = size_t(i) * step;
        reduce_ops.y = ops.y ? static_cast<const char*>(ops.y) + off : nullptr;
        const SumsRecorder record(&sums[size_t(3 * i * C)], C);
        PYBN_CHECK(cpu::kernels().backward(g, static_cast<const char*>(dy) + off, static_cast<const char*>(x) + off,
                                           static_cast<const P*>(args.p.mean) + i * C, true, nullptr, record,
                                           reduce_ops));
    }
    args.count_all = double(per_channel(g));
    args.coef = coef.data();
    for (int64_t c = 0; c < C; ++c) ghost_backward_channel(args, groups, c, sums.data());
    ops.groups = groups;
    if ((dx || ops.dresidual) && has_values(v))
        PYBN_CHECK(cpu::kernels().backward_elementwise(v, dy, x, coef.data(), dx, ops));
    return PYBN_SUCCESS;
}

template <class P>
pybn_status backward_impl(const char* fn, const pybn_view& v, const void* dy, const void* x, void* dx,
                          const pybn_backward_params& p, BackwardMode mode) {
    const int64_t C = v.channels;
    if (mode == BackwardMode::given_sums && p.training) PYBN_CHECK(check_counts(fn, C, p.count, 1.0));
    std::vector<P> dg(static_cast<size_t>(C)), db(static_cast<size_t>(C)), coef;
    BackwardArgs<P> args{C, p, mode == BackwardMode::fused ? double(per_channel(v)) : 0.0, nullptr};
    args.p.dgamma = dg.data();  // written back after the kernel
    args.p.dbeta = db.data();
    const cpu::GradOps ops{p.activation, p.y, p.dresidual};
    if (ghost_groups(p, mode) > 1) {
        if (C > 0) PYBN_CHECK(ghost_backward(v, dy, x, dx, args, ghost_groups(p, mode), ops));
    } else if (mode == BackwardMode::fused) {
        const SumsEpilogue<P> epilogue(args);
        if (has_values(v)) {
            PYBN_CHECK(cpu::kernels().backward(v, dy, x, p.mean, p.training != 0, dx, epilogue, ops));
        } else if (C > 0) {  // nothing to reduce: zero sums give the parameter gradients
            std::vector<double> zero(static_cast<size_t>(C), 0.0);
            coef.resize(static_cast<size_t>(4 * C));
            epilogue(0, C, zero.data(), zero.data(), zero.data(), coef.data());
        }
    } else {
        coef.resize(static_cast<size_t>(4 * C));
        args.coef = coef.data();
        for (int64_t c = 0; c < C; ++c)
            backward_channel(args, c, p.sum_dy[c], p.sum_dy_xmu[c], p.sum_xmu ? p.sum_xmu[c] : 0.0);
        if ((dx || p.dresidual) && has_values(v))
            PYBN_CHECK(cpu::kernels().backward_elementwise(v, dy, p.training ? x : nullptr, coef.data(), dx, ops));
    }
    copy_out(dg, p.dgamma);
    copy_out(db, p.dbeta);
    return PYBN_SUCCESS;
}

// Every forward (v2 and the level-1 wrappers): checks, then the kernels.
pybn_status forward(const char* fn, const pybn_view& v, const void* x, void* y, const pybn_forward_params& p,
                    ForwardMode mode) {
    PYBN_CHECK(validate_forward(fn, kHostPointers, v, x, y, p, mode));
    pybn_status st = PYBN_SUCCESS;
    PYBN_CHECK(visit_param(v.dtype, [&](auto t) { st = forward_impl<decltype(t)>(fn, v, x, y, p, mode); }));
    return st;
}

pybn_status backward(const char* fn, const pybn_view& v, const void* dy, const void* x, void* dx,
                     const pybn_backward_params& p, BackwardMode mode) {
    PYBN_CHECK(validate_backward(fn, kHostPointers, v, dy, x, dx, p, mode));
    pybn_status st = PYBN_SUCCESS;
    PYBN_CHECK(visit_param(v.dtype, [&](auto t) { st = backward_impl<decltype(t)>(fn, v, dy, x, dx, p, mode); }));
    return st;
}

}  // namespace

extern "C" {

const char* pybn_status_string(pybn_status status) {
    switch (status) {
        case PYBN_SUCCESS: return "success";
        case PYBN_ERROR_INVALID_ARGUMENT: return "invalid argument";
        case PYBN_ERROR_UNSUPPORTED_DTYPE: return "unsupported dtype";
        case PYBN_ERROR_INVALID_VALUE: return "invalid value";
        case PYBN_ERROR_TOO_FEW_VALUES: return "too few values per channel";
        case PYBN_ERROR_OUT_OF_MEMORY: return "out of memory";
        case PYBN_ERROR_NOT_COMPILED: return "not compiled in this build";
        case PYBN_ERROR_CUDA: return "CUDA error";
        case PYBN_ERROR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

const char* pybn_last_error(void) { return last_error(); }
const char* pybn_version(void) { return PYBN_VERSION_STRING; }
int pybn_abi_version(void) { return PYBN_ABI_VERSION; }

int pybn_has_cuda(void) {
#ifdef PYBN_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

pybn_status pybn_batch_stats(pybn_view v, const void* x, double* count, double* mean, double* m2) {
    const char* fn = "pybn_batch_stats";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_batch_stats(fn, kHostPointers, v, x, count, mean, m2));
        const int64_t C = v.channels, n = per_channel(v);
        if (has_values(v)) {
            std::vector<double> mu(static_cast<size_t>(C)), sq(static_cast<size_t>(C));  // no output written on failure
            PYBN_CHECK(cpu::kernels().batch_stats(v, x, mu.data(), sq.data()));
            for (int64_t c = 0; c < C; ++c) {
                mean[c] = mu[size_t(c)];
                m2[c] = sq[size_t(c)];
            }
        } else {
            for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = 0.0;
        }
        for (int64_t c = 0; c < C; ++c) count[c] = double(n);
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_merge_stats(int64_t k, int64_t channels, const double* counts, const double* means,
                             const double* m2s, double* count, double* mean, double* m2) {
    const char* fn = "pybn_merge_stats";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_merge_stats(fn, kHostPointers, k, channels, counts, means, m2s, count, mean, m2));
        const int64_t kc = k * channels;
        for (int64_t i = 0; i < kc; ++i)
            if (!(counts[i] >= 0))
                return fail(PYBN_ERROR_INVALID_VALUE, "%s: counts[%lld][%lld] must be >= 0, got %g", fn,
                            (long long)(i / channels), (long long)(i % channels), counts[i]);
        for (int64_t c = 0; c < channels; ++c) merge_channel(k, channels, c, counts, means, m2s, count, mean, m2);
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_forward_v2(pybn_view v, const void* x, void* y, const pybn_forward_params* params) {
    const char* fn = "pybn_forward_v2";
    return guarded(fn, [&] {
        pybn_forward_params p;
        PYBN_CHECK(read_params(fn, params, p));
        return forward(fn, v, x, y, p, forward_mode(p));
    });
}

pybn_status pybn_backward_v2(pybn_view v, const void* dy, const void* x, void* dx,
                             const pybn_backward_params* params) {
    const char* fn = "pybn_backward_v2";
    return guarded(fn, [&] {
        pybn_backward_params p;
        PYBN_CHECK(read_params(fn, params, p));
        return backward(fn, v, dy, x, dx, p, backward_mode(p));
    });
}

// ---- level 1: positional wrappers over the parameter blocks ----

pybn_status pybn_normalize(pybn_view v, const void* x, const double* count, const double* mean,
                           const double* m2, const void* gamma, const void* beta, double eps, void* y,
                           void* running_mean, void* running_var, double momentum, void* save_mean,
                           void* save_invstd) {
    const char* fn = "pybn_normalize";
    return guarded(fn, [&] {
        pybn_forward_params p = PYBN_FORWARD_PARAMS_INIT;
        p.count = count, p.mean = mean, p.m2 = m2, p.gamma = gamma, p.beta = beta, p.eps = eps;
        p.running_mean = running_mean, p.running_var = running_var, p.momentum = momentum;
        p.save_mean = save_mean, p.save_invstd = save_invstd;
        return forward(fn, v, x, y, p, ForwardMode::given_stats);
    });
}

pybn_status pybn_backward_reduce(pybn_view v, const void* dy, const void* x, const void* mean,
                                 double* sum_dy, double* sum_dy_xmu, double* sum_xmu) {
    const char* fn = "pybn_backward_reduce";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_backward_reduce(fn, kHostPointers, v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu));
        if (has_values(v)) {
            PYBN_CHECK(cpu::kernels().backward_reduce(v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu));
        } else {
            for (int64_t c = 0; c < v.channels; ++c) {
                sum_dy[c] = sum_dy_xmu[c] = 0.0;
                if (sum_xmu) sum_xmu[c] = 0.0;
            }
        }
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_backward_elementwise(pybn_view v, const void* dy, const void* x, const void* mean,
                                      const void* invstd, const void* gamma, int training,
                                      const double* count, const double* sum_dy,
                                      const double* sum_dy_xmu, const double* sum_xmu, void* dx,
                                      void* dgamma, void* dbeta) {
    const char* fn = "pybn_backward_elementwise";
    return guarded(fn, [&] {
        pybn_backward_params p = PYBN_BACKWARD_PARAMS_INIT;
        p.training = training != 0, p.mean = mean, p.invstd = invstd, p.gamma = gamma;
        p.count = count, p.sum_dy = sum_dy, p.sum_dy_xmu = sum_dy_xmu, p.sum_xmu = sum_xmu;
        p.dgamma = dgamma, p.dbeta = dbeta;
        return backward(fn, v, dy, x, dx, p, BackwardMode::given_sums);
    });
}

pybn_status pybn_forward_train(pybn_view v, const void* x, const void* gamma, const void* beta,
                               double eps, void* running_mean, void* running_var, double momentum,
                               void* y, void* save_mean, void* save_invstd) {
    const char* fn = "pybn_forward_train";
    return guarded(fn, [&] {
        pybn_forward_params p = PYBN_FORWARD_PARAMS_INIT;
        p.gamma = gamma, p.beta = beta, p.eps = eps, p.running_mean = running_mean;
        p.running_var = running_var, p.momentum = momentum, p.save_mean = save_mean, p.save_invstd = save_invstd;
        return forward(fn, v, x, y, p, ForwardMode::train);
    });
}

pybn_status pybn_forward_infer(pybn_view v, const void* x, const void* running_mean,
                               const void* running_var, const void* gamma, const void* beta,
                               double eps, void* y) {
    const char* fn = "pybn_forward_infer";
    return guarded(fn, [&] {
        pybn_forward_params p = PYBN_FORWARD_PARAMS_INIT;
        p.training = 0, p.gamma = gamma, p.beta = beta, p.eps = eps;
        p.running_mean = const_cast<void*>(running_mean);  // only read in inference
        p.running_var = const_cast<void*>(running_var);
        return forward(fn, v, x, y, p, ForwardMode::infer);
    });
}

pybn_status pybn_backward(pybn_view v, const void* dy, const void* x, const void* mean,
                          const void* invstd, const void* gamma, int training, void* dx,
                          void* dgamma, void* dbeta) {
    const char* fn = "pybn_backward";
    return guarded(fn, [&] {
        pybn_backward_params p = PYBN_BACKWARD_PARAMS_INIT;
        p.training = training != 0, p.mean = mean, p.invstd = invstd, p.gamma = gamma;
        p.dgamma = dgamma, p.dbeta = dbeta;
        return backward(fn, v, dy, x, dx, p, BackwardMode::fused);
    });
}

}  // extern "C"
