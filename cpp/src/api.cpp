// The CPU entry points of the C ABI: argument checks, temporaries, per-channel coefficients and
// dispatch to the kernel table. Every check runs before any output is written.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.hpp"
#include "cpu_kernels.hpp"
#include "dtype.hpp"
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

pybn_status check_counts(const char* fn, int64_t channels, const double* count, double minimum) {
    for (int64_t c = 0; c < channels; ++c)
        if (!(count[c] >= minimum))
            return fail(minimum >= 2 ? PYBN_ERROR_TOO_FEW_VALUES : PYBN_ERROR_INVALID_VALUE,
                        "%s: count[%lld] must be >= %g, got %g", fn, (long long)c, minimum, count[c]);
    return PYBN_SUCCESS;
}

// The per-channel outputs of a forward (running statistics, saved mean / invstd) are computed
// into copies and written back by finish(), after the kernel: nothing is written before.
template <class P> class ForwardOutputs {
  public:
    ForwardOutputs(int64_t C, void* running_mean, void* running_var, void* save_mean, void* save_invstd)
        : dst_{running_mean, running_var, save_mean, save_invstd} {
        // running statistics are read and updated; saved values are always computed
        if (running_mean) copy_[0].assign(static_cast<const P*>(running_mean), static_cast<const P*>(running_mean) + C);
        if (running_var) copy_[1].assign(static_cast<const P*>(running_var), static_cast<const P*>(running_var) + C);
        copy_[2].resize(static_cast<size_t>(C));
        copy_[3].resize(static_cast<size_t>(C));
    }
    NormalizeArgs<P> args(int64_t C, const double* count, const double* mean, const double* m2, const void* gamma,
                          const void* beta, double eps, double momentum, P* coef) {
        return {C, count, mean, m2, static_cast<const P*>(gamma), static_cast<const P*>(beta), eps,
                dst_[0] ? copy_[0].data() : nullptr, dst_[1] ? copy_[1].data() : nullptr, momentum,
                copy_[2].data(), copy_[3].data(), coef};
    }
    void finish() {
        for (int k = 0; k < 4; ++k) copy_out(copy_[k], dst_[k]);
    }

  private:
    void* dst_[4];
    std::vector<P> copy_[4];
};

template <class P>
void normalize_impl(const pybn_view& v, const void* x, const double* count, const double* mean,
                    const double* m2, const void* gamma, const void* beta, double eps, void* y,
                    void* running_mean, void* running_var, double momentum, void* save_mean,
                    void* save_invstd) {
    const int64_t C = v.channels;
    std::vector<P> coef(static_cast<size_t>(4 * C));
    ForwardOutputs<P> outputs(C, running_mean, running_var, save_mean, save_invstd);
    const NormalizeArgs<P> args = outputs.args(C, count, mean, m2, gamma, beta, eps, momentum, coef.data());
    for (int64_t c = 0; c < C; ++c) normalize_channel(args, c, count[c], mean[c], m2[c]);
    if (has_values(v)) cpu::kernels().normalize(v, x, coef.data(), y);
    outputs.finish();
}

template <class P>
void backward_elementwise_impl(const pybn_view& v, const void* dy, const void* x, const void* mean,
                               const void* invstd, const void* gamma, int training,
                               const double* count, double count_all, const double* sum_dy,
                               const double* sum_dy_xmu, const double* sum_xmu, void* dx,
                               void* dgamma, void* dbeta) {
    const int64_t C = v.channels;
    std::vector<P> coef(static_cast<size_t>(4 * C)), dg(static_cast<size_t>(C)), db(static_cast<size_t>(C));
    const BackwardArgs<P> args{C, static_cast<const P*>(mean), static_cast<const P*>(invstd),
                               static_cast<const P*>(gamma), training != 0, count, count_all,
                               sum_dy, sum_dy_xmu, sum_xmu, dg.data(), db.data(), coef.data()};
    for (int64_t c = 0; c < C; ++c)
        backward_channel(args, c, sum_dy[c], sum_dy_xmu[c], sum_xmu ? sum_xmu[c] : 0.0);
    if (dx && has_values(v))
        cpu::kernels().backward_elementwise(v, dy, training ? x : nullptr, coef.data(), dx);
    copy_out(dg, dgamma);
    copy_out(db, dbeta);
}

// Fused training forward: the kernel reduces a channel group, this hook turns its statistics
// into coefficients (and running statistics / saved values, into copies), the kernel normalises.
template <class P>
void forward_train_impl(const pybn_view& v, const void* x, const void* gamma, const void* beta,
                        double eps, void* running_mean, void* running_var, double momentum, void* y,
                        void* save_mean, void* save_invstd) {
    const int64_t C = v.channels;
    ForwardOutputs<P> outputs(C, running_mean, running_var, save_mean, save_invstd);
    struct Ctx {
        NormalizeArgs<P> args;
        double count;
    } ctx{outputs.args(C, nullptr, nullptr, nullptr, gamma, beta, eps, momentum, nullptr), double(per_channel(v))};
    const cpu::ChannelHook hook{&ctx, [](void* p, int64_t c0, int64_t c1, const double* mean,
                                         const double* m2, const double*, void* coef) {
        Ctx& k = *static_cast<Ctx*>(p);
        NormalizeArgs<P> args = k.args;
        args.coef = static_cast<P*>(coef);
        for (int64_t c = c0; c < c1; ++c) normalize_channel(args, c, k.count, mean[c - c0], m2[c - c0]);
    }};
    if (C > 0) cpu::kernels().forward_train(v, x, y, hook);
    outputs.finish();
}

// Fused backward: the kernel reduces a channel group, this hook computes the coefficients and
// parameter gradients, the kernel writes dx.
template <class P>
void backward_impl(const pybn_view& v, const void* dy, const void* x, const void* mean,
                   const void* invstd, const void* gamma, int training, void* dx, void* dgamma,
                   void* dbeta) {
    const int64_t C = v.channels;
    std::vector<P> dg(static_cast<size_t>(C)), db(static_cast<size_t>(C));
    const BackwardArgs<P> args{C, static_cast<const P*>(mean), static_cast<const P*>(invstd),
                               static_cast<const P*>(gamma), training != 0, nullptr,
                               double(per_channel(v)), nullptr, nullptr, nullptr, dg.data(), db.data(),
                               nullptr};
    const cpu::ChannelHook hook{const_cast<BackwardArgs<P>*>(&args),
                                [](void* p, int64_t c0, int64_t c1, const double* s0, const double* s1,
                                   const double* s2, void* coef) {
        BackwardArgs<P> a = *static_cast<const BackwardArgs<P>*>(p);
        a.coef = static_cast<P*>(coef);
        for (int64_t c = c0; c < c1; ++c) backward_channel(a, c, s0[c - c0], s1[c - c0], s2[c - c0]);
    }};
    if (C > 0) {
        if (has_values(v)) {
            cpu::kernels().backward(v, dy, x, mean, training != 0, dx, hook);
        } else {  // nothing to reduce: zero sums give the parameter gradients (frozen statistics)
            std::vector<double> zero(static_cast<size_t>(C), 0.0);
            std::vector<P> coef(static_cast<size_t>(4 * C));
            hook.fn(hook.ctx, 0, C, zero.data(), zero.data(), zero.data(), coef.data());
        }
    }
    copy_out(dg, dgamma);
    copy_out(db, dbeta);
}

// Calls f(P{}) with P the parameter type of the view's dtype.
template <class F> void with_param(const pybn_view& v, F&& f) {
    if (v.dtype == PYBN_FLOAT64) f(double{});
    else f(float{});
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
            cpu::kernels().batch_stats(v, x, mu.data(), sq.data());
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

pybn_status pybn_normalize(pybn_view v, const void* x, const double* count, const double* mean,
                           const double* m2, const void* gamma, const void* beta, double eps, void* y,
                           void* running_mean, void* running_var, double momentum, void* save_mean,
                           void* save_invstd) {
    const char* fn = "pybn_normalize";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_normalize(fn, kHostPointers, v, x, count, mean, m2, gamma, beta, eps, y, running_mean,
                                      running_var, momentum, save_mean, save_invstd));
        PYBN_CHECK(check_counts(fn, v.channels, count, running_var ? 2.0 : 1.0));
        with_param(v, [&](auto p) {
            normalize_impl<decltype(p)>(v, x, count, mean, m2, gamma, beta, eps, y, running_mean,
                                        running_var, momentum, save_mean, save_invstd);
        });
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_backward_reduce(pybn_view v, const void* dy, const void* x, const void* mean,
                                 double* sum_dy, double* sum_dy_xmu, double* sum_xmu) {
    const char* fn = "pybn_backward_reduce";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_backward_reduce(fn, kHostPointers, v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu));
        if (has_values(v)) {
            cpu::kernels().backward_reduce(v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu);
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
        PYBN_CHECK(validate_backward_elementwise(fn, kHostPointers, v, dy, x, mean, invstd, gamma, training, count,
                                                 sum_dy, sum_dy_xmu, sum_xmu, dx, dgamma, dbeta));
        if (training) PYBN_CHECK(check_counts(fn, v.channels, count, 1.0));
        with_param(v, [&](auto p) {
            backward_elementwise_impl<decltype(p)>(v, dy, x, mean, invstd, gamma, training, count,
                                                   0.0, sum_dy, sum_dy_xmu, sum_xmu, dx, dgamma, dbeta);
        });
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_forward_train(pybn_view v, const void* x, const void* gamma, const void* beta,
                               double eps, void* running_mean, void* running_var, double momentum,
                               void* y, void* save_mean, void* save_invstd) {
    const char* fn = "pybn_forward_train";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_forward_train(fn, kHostPointers, v, x, gamma, beta, eps, running_mean, running_var,
                                          momentum, y, save_mean, save_invstd));
        with_param(v, [&](auto p) {
            forward_train_impl<decltype(p)>(v, x, gamma, beta, eps, running_mean, running_var,
                                            momentum, y, save_mean, save_invstd);
        });
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_forward_infer(pybn_view v, const void* x, const void* running_mean,
                               const void* running_var, const void* gamma, const void* beta,
                               double eps, void* y) {
    const char* fn = "pybn_forward_infer";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_forward_infer(fn, kHostPointers, v, x, running_mean, running_var, gamma, beta, eps, y));
        const int64_t C = v.channels;
        with_param(v, [&](auto p) {
            using P = decltype(p);
            std::vector<P> coef(static_cast<size_t>(4 * C));
            for (int64_t c = 0; c < C; ++c)
                infer_channel(C, c, static_cast<const P*>(running_mean), static_cast<const P*>(running_var),
                              static_cast<const P*>(gamma), static_cast<const P*>(beta), eps, coef.data());
            if (has_values(v)) cpu::kernels().normalize(v, x, coef.data(), y);
        });
        return PYBN_SUCCESS;
    });
}

pybn_status pybn_backward(pybn_view v, const void* dy, const void* x, const void* mean,
                          const void* invstd, const void* gamma, int training, void* dx,
                          void* dgamma, void* dbeta) {
    const char* fn = "pybn_backward";
    return guarded(fn, [&] {
        PYBN_CHECK(validate_backward(fn, kHostPointers, v, dy, x, mean, invstd, gamma, training, dx, dgamma, dbeta));
        with_param(v, [&](auto p) {
            backward_impl<decltype(p)>(v, dy, x, mean, invstd, gamma, training, dx, dgamma, dbeta);
        });
        return PYBN_SUCCESS;
    });
}

}  // extern "C"
