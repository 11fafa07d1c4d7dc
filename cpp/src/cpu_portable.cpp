// Portable CPU kernels: plain C++ written so that compilers vectorise the lane loops.
//
// Numerics of the statistics: each channel is cut into blocks of at most kBlock values. A block
// is accumulated relative to its own first value (a shift inside the data: x - shift is exact for
// data far from zero, and the sum of squares does not cancel). Each float32 accumulator adds at
// most kDepth values before it is added into float64: longer float32 runs bias the sum of squares
// on data far from zero, whose values are coarsely quantised (measured in bench/NOTES.md). Blocks
// (count, mean, M2) are merged in float64 (pybn::Moments) in a fixed order, so results never
// depend on how work is split.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_kernels.hpp"
#include "dtype.hpp"
#include "formulas.hpp"

namespace pybn::cpu {
namespace {

constexpr int kLanes = 16;       // independent accumulators in a row block
constexpr int64_t kDepth = 4;    // values one float32 accumulator adds before a float64 flush
constexpr int64_t kBlock = kLanes * kDepth;  // values of one channel sharing a shift
constexpr int64_t kRowMin = 4;   // inner >= kRowMin: walk the rows of a channel; else across channels

// Moments of one row segment of a channel, block by block.
template <class T>
void row_moments(const T* p, int64_t len, Moments& mom) {
    using A = acc_t<T>;
    for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
        const int64_t nb = std::min(kBlock, len - b0);
        const T* q = p + b0;
        const A shift = load(q[0]);
        A s[kLanes] = {}, sq[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= nb; i += kLanes)
            for (int l = 0; l < kLanes; ++l) {
                const A d = load(q[i + l]) - shift;
                s[l] += d;
                sq[l] += d * d;
            }
        for (int l = 0; i < nb; ++i, ++l) {
            const A d = load(q[i]) - shift;
            s[l] += d;
            sq[l] += d * d;
        }
        double ss = 0, qq = 0;
        for (int l = 0; l < kLanes; ++l) {
            ss += s[l];
            qq += sq[l];
        }
        mom.merge_shifted(double(nb), double(shift), ss, qq);
    }
}

template <class T>
void batch_stats_t(const pybn_view& v, const void* xv, double* mean, double* m2) {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(xv);
    const int64_t C = v.channels, inner = v.inner, outer = v.outer;
    std::vector<Moments> mom(static_cast<size_t>(C));
    if (inner >= kRowMin) {
        for (int64_t o = 0; o < outer; ++o)
            for (int64_t c = 0; c < C; ++c) row_moments(x + (o * C + c) * inner, inner, mom[size_t(c)]);
    } else {
        // Across channels (inner < kRowMin): a block is a tile of `rows` outer rows; float32
        // partials cover `flush` rows (at most kDepth values) and are added into float64.
        const int64_t flush = std::max<int64_t>(1, kDepth / inner);
        const int64_t rows = flush * std::max<int64_t>(1, kBlock / (flush * inner));
        std::vector<A> shift(static_cast<size_t>(C)), s(static_cast<size_t>(C)), sq(static_cast<size_t>(C));
        std::vector<double> ss(static_cast<size_t>(C)), qq(static_cast<size_t>(C));
        for (int64_t o0 = 0; o0 < outer; o0 += rows) {
            const int64_t o1 = std::min(outer, o0 + rows);
            for (int64_t c = 0; c < C; ++c) shift[size_t(c)] = load(x[(o0 * C + c) * inner]);
            std::fill(ss.begin(), ss.end(), 0.0);
            std::fill(qq.begin(), qq.end(), 0.0);
            for (int64_t f0 = o0; f0 < o1; f0 += flush) {
                std::fill(s.begin(), s.end(), A(0));
                std::fill(sq.begin(), sq.end(), A(0));
                for (int64_t o = f0; o < std::min(o1, f0 + flush); ++o) {
                    const T* row = x + o * C * inner;
                    for (int64_t c = 0; c < C; ++c)
                        for (int64_t i = 0; i < inner; ++i) {
                            const A d = load(row[c * inner + i]) - shift[size_t(c)];
                            s[size_t(c)] += d;
                            sq[size_t(c)] += d * d;
                        }
                }
                for (int64_t c = 0; c < C; ++c) {
                    ss[size_t(c)] += s[size_t(c)];
                    qq[size_t(c)] += sq[size_t(c)];
                }
            }
            const double nb = double((o1 - o0) * inner);
            for (int64_t c = 0; c < C; ++c)
                mom[size_t(c)].merge_shifted(nb, double(shift[size_t(c)]), ss[size_t(c)], qq[size_t(c)]);
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        mean[c] = mom[size_t(c)].mean();
        m2[c] = mom[size_t(c)].m2;
    }
}

template <class T>
void normalize_t(const pybn_view& v, const void* xv, const void* coefv, void* yv) {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(xv);
    T* y = static_cast<T*>(yv);
    const int64_t C = v.channels, inner = v.inner, outer = v.outer;
    const A* hi = static_cast<const A*>(coefv);
    const A *lo = hi + C, *scale = hi + 2 * C, *shift = hi + 3 * C;
    for (int64_t o = 0; o < outer; ++o) {
        const T* xr = x + o * C * inner;
        T* yr = y + o * C * inner;
        if (inner == 1) {
            for (int64_t c = 0; c < C; ++c)
                yr[c] = store<T>(((load(xr[c]) - hi[c]) - lo[c]) * scale[c] + shift[c]);
        } else {
            for (int64_t c = 0; c < C; ++c) {
                const A h = hi[c], l = lo[c], a = scale[c], b = shift[c];
                const T* xp = xr + c * inner;
                T* yp = yr + c * inner;
                for (int64_t i = 0; i < inner; ++i) yp[i] = store<T>(((load(xp[i]) - h) - l) * a + b);
            }
        }
    }
}

// Sums of one block of a channel, flushed to float64.
template <class T>
void row_sums(const T* dy, const T* x, int64_t len, acc_t<T> m, double& sdy, double& sdyx,
              double& sx) {
    using A = acc_t<T>;
    for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
        const int64_t nb = std::min(kBlock, len - b0);
        A a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {};
        int64_t i = b0;
        for (; i + kLanes <= b0 + nb; i += kLanes)
            for (int l = 0; l < kLanes; ++l) {
                const A g = load(dy[i + l]), d = load(x[i + l]) - m;
                a0[l] += g;
                a1[l] += g * d;
                a2[l] += d;
            }
        for (int l = 0; i < b0 + nb; ++i, ++l) {
            const A g = load(dy[i]), d = load(x[i]) - m;
            a0[l] += g;
            a1[l] += g * d;
            a2[l] += d;
        }
        for (int l = 0; l < kLanes; ++l) {
            sdy += a0[l];
            sdyx += a1[l];
            sx += a2[l];
        }
    }
}

template <class T>
void backward_reduce_t(const pybn_view& v, const void* dyv, const void* xv, const void* meanv,
                       double* sum_dy, double* sum_dy_xmu, double* sum_xmu) {
    using A = acc_t<T>;
    const T* dy = static_cast<const T*>(dyv);
    const T* x = static_cast<const T*>(xv);
    const A* mean = static_cast<const A*>(meanv);
    const int64_t C = v.channels, inner = v.inner, outer = v.outer;
    std::vector<double> s0(size_t(C), 0.0), s1(size_t(C), 0.0), s2(size_t(C), 0.0);
    if (inner >= kRowMin) {
        for (int64_t o = 0; o < outer; ++o)
            for (int64_t c = 0; c < C; ++c) {
                const int64_t off = (o * C + c) * inner;
                row_sums(dy + off, x + off, inner, mean[c], s0[size_t(c)], s1[size_t(c)], s2[size_t(c)]);
            }
    } else {
        const int64_t rows = std::max<int64_t>(1, kDepth / inner);
        std::vector<A> a0(static_cast<size_t>(C)), a1(static_cast<size_t>(C)), a2(static_cast<size_t>(C));
        for (int64_t o0 = 0; o0 < outer; o0 += rows) {
            const int64_t o1 = std::min(outer, o0 + rows);
            std::fill(a0.begin(), a0.end(), A(0));
            std::fill(a1.begin(), a1.end(), A(0));
            std::fill(a2.begin(), a2.end(), A(0));
            for (int64_t o = o0; o < o1; ++o) {
                const T* gr = dy + o * C * inner;
                const T* xr = x + o * C * inner;
                for (int64_t c = 0; c < C; ++c)
                    for (int64_t i = 0; i < inner; ++i) {
                        const A g = load(gr[c * inner + i]), d = load(xr[c * inner + i]) - mean[c];
                        a0[size_t(c)] += g;
                        a1[size_t(c)] += g * d;
                        a2[size_t(c)] += d;
                    }
            }
            for (int64_t c = 0; c < C; ++c) {
                s0[size_t(c)] += a0[size_t(c)];
                s1[size_t(c)] += a1[size_t(c)];
                s2[size_t(c)] += a2[size_t(c)];
            }
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] = s0[size_t(c)];
        sum_dy_xmu[c] = s1[size_t(c)];
        if (sum_xmu) sum_xmu[c] = s2[size_t(c)];
    }
}

template <class T>
void backward_elementwise_t(const pybn_view& v, const void* dyv, const void* xv, const void* coefv,
                            void* dxv) {
    using A = acc_t<T>;
    const T* dy = static_cast<const T*>(dyv);
    const T* x = static_cast<const T*>(xv);
    T* dx = static_cast<T*>(dxv);
    const int64_t C = v.channels, inner = v.inner, outer = v.outer;
    const A* mean = static_cast<const A*>(coefv);
    const A *a = mean + C, *b = mean + 2 * C, *cc = mean + 3 * C;
    for (int64_t o = 0; o < outer; ++o)
        for (int64_t c = 0; c < C; ++c) {
            const int64_t off = (o * C + c) * inner;
            const A ac = a[c];
            if (x == nullptr) {
                for (int64_t i = 0; i < inner; ++i) dx[off + i] = store<T>(ac * load(dy[off + i]));
            } else {
                const A m = mean[c], bc = b[c], c0 = cc[c];
                for (int64_t i = 0; i < inner; ++i)
                    dx[off + i] = store<T>(ac * load(dy[off + i]) + bc * (load(x[off + i]) - m) + c0);
            }
        }
}

// Type-erased entry points: one per operation, dispatching on the view's dtype.
void batch_stats(const pybn_view& v, const void* x, double* mean, double* m2) {
    with_dtype(v.dtype, [&](auto t) { batch_stats_t<decltype(t)>(v, x, mean, m2); });
}
void normalize(const pybn_view& v, const void* x, const void* coef, void* y) {
    with_dtype(v.dtype, [&](auto t) { normalize_t<decltype(t)>(v, x, coef, y); });
}
void backward_reduce(const pybn_view& v, const void* dy, const void* x, const void* mean,
                     double* s0, double* s1, double* s2) {
    with_dtype(v.dtype, [&](auto t) { backward_reduce_t<decltype(t)>(v, dy, x, mean, s0, s1, s2); });
}
void backward_elementwise(const pybn_view& v, const void* dy, const void* x, const void* coef,
                          void* dx) {
    with_dtype(v.dtype, [&](auto t) { backward_elementwise_t<decltype(t)>(v, dy, x, coef, dx); });
}

}  // namespace

const KernelTable& portable_kernels() {
    static const KernelTable table{"portable", batch_stats, normalize, backward_reduce,
                                   backward_elementwise};
    return table;
}

const KernelTable& kernels() { return portable_kernels(); }

}  // namespace pybn::cpu
