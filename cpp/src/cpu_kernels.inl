// The CPU kernels, written once and compiled once per instruction-set path: a unit defines
// PYBN_CPU_ISA (a namespace name) and PYBN_CPU_ISA_NAME, then includes this file. The loops are
// written for the compiler to vectorise over fixed lane counts; each unit's flags pick the ISA.
//
// Numerics of the statistics: a run of values (a row segment of one channel, or a tile of rows of
// a column) is accumulated relative to its first value, a shift inside the data, so x - shift is
// exact for data far from zero and the sum of squares does not cancel. A float32 accumulator
// adds at most kDepth values before it is added into float64 (longer float32 runs bias the sum of
// squares of coarsely quantised data far from zero: bench/NOTES.md). Runs merge as
// pybn::Moments in float64.
//
// Determinism: every reduction is cut into parts that depend only on the shape; each part is
// computed by one thread in a fixed order and the parts are merged in a fixed order, so results
// are bitwise identical for every thread count.
//
// No std:: containers or algorithms here: their instantiations would be shared (by the linker)
// with units compiled for other instruction sets.
#ifndef PYBN_CPU_ISA
#error "define PYBN_CPU_ISA before including cpu_kernels.inl"
#endif
#define PYBN_ISA_TAG PYBN_CPU_ISA

#include <cstdint>

#include "cpu_kernels.hpp"
#include "dtype.hpp"
#include "formulas.hpp"
#include "parallel.hpp"

namespace pybn::cpu {
namespace PYBN_CPU_ISA {
namespace {

constexpr int kLanes = 16;              // independent accumulators of a row run
constexpr int kDepth = 4;               // values per float32 accumulator before a float64 flush
constexpr int64_t kRowMin = 32;         // inner >= kRowMin: row path; else column path
constexpr int64_t kSegment = 16384;     // a long row is cut into runs of at most this many values
constexpr int64_t kParts = 64;          // reductions are cut into about this many parts
constexpr int64_t kTileRows = 64;       // column path: rows sharing one shift
constexpr int64_t kChunkValues = 16384; // elementwise work unit

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Reduction drivers: the row path (inner >= kRowMin) and the column path (inner < kRowMin).

// Row path: channel c is the sequence of runs (o, segment); it is cut into `split` parts of
// consecutive runs. unit(c, offset, len) returns the Part of one run.
template <class Part, class Unit>
void reduce_rows(const pybn_view& v, Part* out, Unit unit) {
    const int64_t C = v.channels, inner = v.inner;
    const int64_t nseg = ceil_div(inner, kSegment);
    const int64_t runs = v.outer * nseg;
    const int64_t split = min64(max64(1, ceil_div(kParts, C)), runs);
    Scratch scratch(sizeof(Part) * size_t(C * split));
    Part* parts = scratch.as<Part>();
    parallel_for(C * split, v.outer * C * inner, num_threads(), [&](int64_t p, int) {
        const int64_t c = p / split, s = p % split;
        Part acc{};
        for (int64_t r = runs * s / split; r < runs * (s + 1) / split; ++r) {
            const int64_t o = r / nseg, g = r % nseg;
            acc.merge(unit(c, (o * C + c) * inner + g * kSegment, min64(kSegment, inner - g * kSegment)));
        }
        parts[p] = acc;
    });
    for (int64_t c = 0; c < C; ++c) {
        Part acc{};
        for (int64_t s = 0; s < split; ++s) acc.merge(parts[c * split + s]);
        out[c] = acc;
    }
}

// Column path: the view is `outer` rows of W = C * inner columns; rows are cut into `nparts`
// ranges; part(o0, o1, cols, thread) writes the W column Parts of rows [o0, o1), thread < nt.
template <class Part, class PartFn>
void reduce_cols(const pybn_view& v, int nt, Part* out, PartFn part) {
    const int64_t C = v.channels, inner = v.inner, W = C * inner;
    // parts: at most kParts, at least kTileRows rows each, at most ~1M partials in all
    const int64_t nparts = max64(1, min64(kParts, min64(v.outer / kTileRows, (int64_t(1) << 20) / W)));
    Scratch scratch(sizeof(Part) * size_t(nparts * W));
    Part* parts = scratch.as<Part>();
    parallel_for(nparts, v.outer * W, nt, [&](int64_t p, int t) {
        part(v.outer * p / nparts, v.outer * (p + 1) / nparts, parts + p * W, t);
    });
    for (int64_t c = 0; c < C; ++c) {
        Part acc{};
        for (int64_t p = 0; p < nparts; ++p)
            for (int64_t i = 0; i < inner; ++i) acc.merge(parts[p * W + c * inner + i]);
        out[c] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Batch statistics.

template <class T>
Moments run_moments(const T* p, int64_t len) {
    using A = acc_t<T>;
    const A shift = load(p[0]);
    double S[kLanes] = {}, Q[kLanes] = {};
    int64_t i = 0;
    for (; i + kDepth * kLanes <= len; i += kDepth * kLanes) {
        A s[kLanes] = {}, q[kLanes] = {};
        for (int k = 0; k < kDepth; ++k)
            for (int l = 0; l < kLanes; ++l) {
                const A d = load(p[i + k * kLanes + l]) - shift;
                s[l] += d;
                q[l] += d * d;
            }
        for (int l = 0; l < kLanes; ++l) {
            S[l] += double(s[l]);
            Q[l] += double(q[l]);
        }
    }
    double ss = 0, qq = 0;
    for (; i < len; ++i) {
        const A d = load(p[i]) - shift;
        ss += double(d);
        qq += double(d * d);
    }
    for (int l = 0; l < kLanes; ++l) {
        ss += S[l];
        qq += Q[l];
    }
    Moments m;
    m.merge_shifted(double(len), double(shift), ss, qq);
    return m;
}

template <class T>
void batch_stats_t(const pybn_view& v, const void* xv, double* mean, double* m2) {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(xv);
    const int64_t C = v.channels, W = C * v.inner;
    Scratch result(sizeof(Moments) * size_t(C));
    Moments* mom = result.as<Moments>();
    if (v.inner >= kRowMin) {
        reduce_rows<Moments>(v, mom, [&](int64_t, int64_t off, int64_t len) { return run_moments(x + off, len); });
    } else {
        // per thread: shift, float32 runs and float64 sums of every column
        const int nt = num_threads();
        Scratch abuf(sizeof(A) * 3 * size_t(W) * size_t(nt)), dbuf(sizeof(double) * 2 * size_t(W) * size_t(nt));
        reduce_cols<Moments>(v, nt, mom, [&](int64_t o0, int64_t o1, Moments* cols, int t) {
            A* shift = abuf.as<A>(size_t(3 * W * t));
            A *s = shift + W, *q = shift + 2 * W;
            double* S = dbuf.as<double>(size_t(2 * W * t));
            double* Q = S + W;
            for (int64_t j = 0; j < W; ++j) cols[j] = Moments{};
            for (int64_t t0 = o0; t0 < o1; t0 += kTileRows) {
                const int64_t t1 = min64(o1, t0 + kTileRows);
                for (int64_t j = 0; j < W; ++j) {
                    shift[j] = load(x[t0 * W + j]);
                    S[j] = Q[j] = 0;
                }
                for (int64_t r0 = t0; r0 < t1; r0 += kDepth) {
                    for (int64_t j = 0; j < W; ++j) s[j] = q[j] = 0;
                    for (int64_t r = r0; r < min64(t1, r0 + kDepth); ++r) {
                        const T* row = x + r * W;
                        for (int64_t j = 0; j < W; ++j) {
                            const A d = load(row[j]) - shift[j];
                            s[j] += d;
                            q[j] += d * d;
                        }
                    }
                    for (int64_t j = 0; j < W; ++j) {
                        S[j] += double(s[j]);
                        Q[j] += double(q[j]);
                    }
                }
                for (int64_t j = 0; j < W; ++j) cols[j].merge_shifted(double(t1 - t0), double(shift[j]), S[j], Q[j]);
            }
        });
    }
    for (int64_t c = 0; c < C; ++c) {
        mean[c] = mom[c].mean();
        m2[c] = mom[c].m2;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward reduction: sum(dy), sum(dy * (x - mean)), sum(x - mean) in one sweep.

template <class T>
Sums run_sums(const T* dy, const T* x, int64_t len, acc_t<T> m) {
    using A = acc_t<T>;
    double D0[kLanes] = {}, D1[kLanes] = {}, D2[kLanes] = {};
    int64_t i = 0;
    for (; i + kDepth * kLanes <= len; i += kDepth * kLanes) {
        A a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {};
        for (int k = 0; k < kDepth; ++k)
            for (int l = 0; l < kLanes; ++l) {
                const A g = load(dy[i + k * kLanes + l]), d = load(x[i + k * kLanes + l]) - m;
                a0[l] += g;
                a1[l] += g * d;
                a2[l] += d;
            }
        for (int l = 0; l < kLanes; ++l) {
            D0[l] += double(a0[l]);
            D1[l] += double(a1[l]);
            D2[l] += double(a2[l]);
        }
    }
    Sums s;
    for (; i < len; ++i) {
        const A g = load(dy[i]), d = load(x[i]) - m;
        s.dy += double(g);
        s.dy_xmu += double(g * d);
        s.xmu += double(d);
    }
    for (int l = 0; l < kLanes; ++l) {
        s.dy += D0[l];
        s.dy_xmu += D1[l];
        s.xmu += D2[l];
    }
    return s;
}

template <class T>
void backward_reduce_t(const pybn_view& v, const void* dyv, const void* xv, const void* meanv,
                       double* sum_dy, double* sum_dy_xmu, double* sum_xmu) {
    using A = acc_t<T>;
    const T* dy = static_cast<const T*>(dyv);
    const T* x = static_cast<const T*>(xv);
    const A* mean = static_cast<const A*>(meanv);
    const int64_t C = v.channels, inner = v.inner, W = C * inner;
    Scratch result(sizeof(Sums) * size_t(C));
    Sums* sums = result.as<Sums>();
    if (inner >= kRowMin) {
        reduce_rows<Sums>(v, sums, [&](int64_t c, int64_t off, int64_t len) {
            return run_sums(dy + off, x + off, len, mean[c]);
        });
    } else {
        const int nt = num_threads();
        Scratch mcol(sizeof(A) * size_t(W)), abuf(sizeof(A) * 3 * size_t(W) * size_t(nt)),
            dbuf(sizeof(double) * 3 * size_t(W) * size_t(nt));
        A* m = mcol.as<A>();
        for (int64_t j = 0; j < W; ++j) m[j] = mean[j / inner];
        reduce_cols<Sums>(v, nt, sums, [&](int64_t o0, int64_t o1, Sums* cols, int t) {
            A* a0 = abuf.as<A>(size_t(3 * W * t));
            A *a1 = a0 + W, *a2 = a0 + 2 * W;
            double* D0 = dbuf.as<double>(size_t(3 * W * t));
            double *D1 = D0 + W, *D2 = D0 + 2 * W;
            for (int64_t j = 0; j < W; ++j) D0[j] = D1[j] = D2[j] = 0;
            for (int64_t r0 = o0; r0 < o1; r0 += kDepth) {
                for (int64_t j = 0; j < W; ++j) a0[j] = a1[j] = a2[j] = 0;
                for (int64_t r = r0; r < min64(o1, r0 + kDepth); ++r) {
                    const T* gr = dy + r * W;
                    const T* xr = x + r * W;
                    for (int64_t j = 0; j < W; ++j) {
                        const A g = load(gr[j]), d = load(xr[j]) - m[j];
                        a0[j] += g;
                        a1[j] += g * d;
                        a2[j] += d;
                    }
                }
                for (int64_t j = 0; j < W; ++j) {
                    D0[j] += double(a0[j]);
                    D1[j] += double(a1[j]);
                    D2[j] += double(a2[j]);
                }
            }
            for (int64_t j = 0; j < W; ++j) {
                cols[j].dy = D0[j];
                cols[j].dy_xmu = D1[j];
                cols[j].xmu = D2[j];
            }
        });
    }
    for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] = sums[c].dy;
        sum_dy_xmu[c] = sums[c].dy_xmu;
        if (sum_xmu) sum_xmu[c] = sums[c].xmu;
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise: rows of one channel (row path) or rows of W columns with per-column coefficients
// (column path), in chunks of about kChunkValues values.

template <class RowOp, class ColsOp>
void elementwise(const pybn_view& v, RowOp row_op, ColsOp cols_op) {
    const int64_t C = v.channels, inner = v.inner, total = v.outer * C * inner;
    if (inner >= kRowMin) {
        const int64_t rows = v.outer * C, per = max64(1, kChunkValues / inner);
        parallel_for(ceil_div(rows, per), total, num_threads(), [&](int64_t b, int) {
            for (int64_t r = b * per; r < min64(rows, (b + 1) * per); ++r) row_op(r * inner, inner, r % C);
        });
    } else {
        const int64_t W = C * inner, per = max64(1, kChunkValues / W);
        parallel_for(ceil_div(v.outer, per), total, num_threads(), [&](int64_t b, int) {
            for (int64_t o = b * per; o < min64(v.outer, (b + 1) * per); ++o) cols_op(o * W, W);
        });
    }
}

// coef (4 x C) expanded to 4 x W per-column values for the column path.
template <class A>
void expand_columns(const A* coef, int64_t C, int64_t inner, A* out) {
    const int64_t W = C * inner;
    for (int64_t k = 0; k < 4; ++k)
        for (int64_t j = 0; j < W; ++j) out[k * W + j] = coef[k * C + j / inner];
}

template <class T>
void normalize_t(const pybn_view& v, const void* xv, const void* coefv, void* yv) {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(xv);
    T* y = static_cast<T*>(yv);
    const A* k = static_cast<const A*>(coefv);
    const int64_t C = v.channels, W = C * v.inner;
    Scratch cols(v.inner < kRowMin ? sizeof(A) * 4 * size_t(W) : 0);
    if (v.inner < kRowMin) expand_columns(k, C, v.inner, cols.as<A>());
    const A* e = cols.as<A>();
    elementwise(
        v,
        [&](int64_t off, int64_t len, int64_t c) {
            const A h = k[c], l = k[C + c], a = k[2 * C + c], b = k[3 * C + c];
            const T* xp = x + off;
            T* yp = y + off;
            for (int64_t i = 0; i < len; ++i) yp[i] = store<T>(((load(xp[i]) - h) - l) * a + b);
        },
        [&](int64_t off, int64_t len) {
            const T* xp = x + off;
            T* yp = y + off;
            for (int64_t j = 0; j < len; ++j)
                yp[j] = store<T>(((load(xp[j]) - e[j]) - e[W + j]) * e[2 * W + j] + e[3 * W + j]);
        });
}

template <class T>
void backward_elementwise_t(const pybn_view& v, const void* dyv, const void* xv, const void* coefv,
                            void* dxv) {
    using A = acc_t<T>;
    const T* dy = static_cast<const T*>(dyv);
    const T* x = static_cast<const T*>(xv);
    T* dx = static_cast<T*>(dxv);
    const A* k = static_cast<const A*>(coefv);
    const int64_t C = v.channels, W = C * v.inner;
    Scratch cols(v.inner < kRowMin ? sizeof(A) * 4 * size_t(W) : 0);
    if (v.inner < kRowMin) expand_columns(k, C, v.inner, cols.as<A>());
    const A* e = cols.as<A>();
    elementwise(
        v,
        [&](int64_t off, int64_t len, int64_t c) {
            const A m = k[c], a = k[C + c], b = k[2 * C + c], c0 = k[3 * C + c];
            const T* gp = dy + off;
            T* dp = dx + off;
            if (x == nullptr) {
                for (int64_t i = 0; i < len; ++i) dp[i] = store<T>(a * load(gp[i]));
            } else {
                const T* xp = x + off;
                for (int64_t i = 0; i < len; ++i)
                    dp[i] = store<T>(a * load(gp[i]) + b * (load(xp[i]) - m) + c0);
            }
        },
        [&](int64_t off, int64_t len) {
            const T* gp = dy + off;
            T* dp = dx + off;
            if (x == nullptr) {
                for (int64_t j = 0; j < len; ++j) dp[j] = store<T>(e[W + j] * load(gp[j]));
            } else {
                const T* xp = x + off;
                for (int64_t j = 0; j < len; ++j)
                    dp[j] = store<T>(e[W + j] * load(gp[j]) + e[2 * W + j] * (load(xp[j]) - e[j]) + e[3 * W + j]);
            }
        });
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

const KernelTable& table() {
    static const KernelTable t{PYBN_CPU_ISA_NAME, batch_stats, normalize, backward_reduce,
                               backward_elementwise};
    return t;
}

}  // namespace PYBN_CPU_ISA
}  // namespace pybn::cpu
