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
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>  // non-temporal stores
#endif

#include "cpu_kernels.hpp"
#include "dtype.hpp"
#include "formulas.hpp"
#include "parallel.hpp"

namespace pybn::cpu {
namespace PYBN_CPU_ISA {
namespace {

constexpr int64_t kRowMin = 32;         // inner >= kRowMin: row path; else column path
constexpr int64_t kSegment = 16384;     // a long row is cut into runs of at most this many values
constexpr int64_t kParts = 64;          // reductions are cut into about this many parts
constexpr int64_t kTileRows = 64;       // column path: rows of one float level-2 sum
constexpr int64_t kMemoryOrderBytes = 1024; // row path: rows at least this long are read in memory order
constexpr int64_t kTilePrefetch = 4096; // column path, data beyond the LLC: bytes fetched ahead
constexpr int kU = 2;                   // vectors per column block / unrolled row step
constexpr int64_t kPartMinRows = 64;    // column path: rows of a part, at least
constexpr int64_t kPartMinValues = 32768; // column path: values of a part, at least
constexpr int64_t kChunkValues = 65536; // elementwise work unit

#define PYBN_INLINE inline __attribute__((always_inline))

// Vector width of this unit: the flags it was compiled with decide.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// GCC / Clang vector extensions: the same source becomes SSE2, AVX2 or AVX-512 code.
template <class A> struct VecOf { typedef A type __attribute__((vector_size(kVecBytes))); };
template <class A> using vec = typename VecOf<A>::type;
template <class A> constexpr int kLanesOf = kVecBytes / int(sizeof(A));

template <class A> inline vec<A> vload(const A* p) {
    vec<A> v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
template <class A> inline void vstore(A* p, const vec<A>& v) { __builtin_memcpy(p, &v, sizeof v); }
template <class A> inline vec<A> vsplat(A a) { return vec<A>{} + a; }

// Store bypassing the caches (no read of the destination line first); p aligned to kVecBytes.
template <class A> inline void vstream(A* p, const vec<A>& v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(A) == 4) _mm512_stream_ps(reinterpret_cast<float*>(p), (__m512)v);
    else _mm512_stream_pd(reinterpret_cast<double*>(p), (__m512d)v);
#elif defined(__AVX__)
    if constexpr (sizeof(A) == 4) _mm256_stream_ps(reinterpret_cast<float*>(p), (__m256)v);
    else _mm256_stream_pd(reinterpret_cast<double*>(p), (__m256d)v);
#elif defined(__SSE2__)
    if constexpr (sizeof(A) == 4) _mm_stream_ps(reinterpret_cast<float*>(p), (__m128)v);
    else _mm_stream_pd(reinterpret_cast<double*>(p), (__m128d)v);
#else
    vstore(p, v);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

// acc += v, widening float lanes into two float64 vectors (low half, high half); for double
// vectors, a plain add into lo.
template <class A> PYBN_INLINE void widen_add(const vec<A>& v, vec<double>& lo, vec<double>& hi) {
    if constexpr (sizeof(A) == 8) {
        (void)hi;
        lo += v;
    } else {
        // GCC 12 lowers __builtin_convertvector(float x 4 -> double x 4) two lanes at a time, so
        // the widening uses the instructions directly (masked AVX-512 forms: GCC 12 warns on the
        // plain ones' undefined operands).
#if defined(__AVX512F__)
        const __m512 f = (__m512)v;
        lo += (vec<double>)_mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, f, 0));
        hi += (vec<double>)_mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, f, 1));
#elif defined(__AVX__)
        const __m256 f = (__m256)v;
        lo += (vec<double>)_mm256_cvtps_pd(_mm256_castps256_ps128(f));
        hi += (vec<double>)_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
#elif defined(__SSE2__)
        const __m128 f = (__m128)v;
        lo += (vec<double>)_mm_cvtps_pd(f);
        hi += (vec<double>)_mm_cvtps_pd(_mm_movehl_ps(f, f));
#else
        typedef float half_vec __attribute__((vector_size(kVecBytes / 2)));
        half_vec a, b;
        __builtin_memcpy(&a, &v, sizeof a);
        __builtin_memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
        lo += __builtin_convertvector(a, vec<double>);
        hi += __builtin_convertvector(b, vec<double>);
#endif
    }
}

// Lanes of float64 vectors added in a fixed order.
template <int N> inline double hsum(const vec<double> (&v)[N]) {
    double s = 0;
    for (int k = 0; k < N; ++k)
        for (int l = 0; l < kLanesOf<double>; ++l) s += v[k][l];
    return s;
}

template <class T> constexpr bool kNative = std::is_same_v<T, acc_t<T>>;

// 16-bit values to float and back, a vector at a time: bfloat16 by shifts, float16 with the
// F16C instructions where this unit has them; the rest (and the tails) one value at a time.
typedef uint16_t u16vec __attribute__((vector_size(kVecBytes / 2)));
typedef uint32_t u32vec __attribute__((vector_size(kVecBytes)));
typedef int32_t i32vec __attribute__((vector_size(kVecBytes)));
constexpr int kLanes32 = kVecBytes / 4;

// kLanes32 values of T at p as a vector of acc_t<T>, and back (bfloat16 rounded to nearest even,
// a NaN kept as a quiet NaN; float16 through F16C where this unit has it, else one lane at a
// time): bitwise the scalar load / store of dtype.hpp.
template <class T> PYBN_INLINE vec<acc_t<T>> vload_as(const T* p) {
    if constexpr (kNative<T>) {
        return vload(p);
    } else if constexpr (std::is_same_v<T, bfloat16_t>) {
        u16vec h;
        __builtin_memcpy(&h, p, sizeof h);
        const u32vec w = __builtin_convertvector(h, u32vec) << 16;
        vec<float> f;
        __builtin_memcpy(&f, &w, sizeof f);
        return f;
    } else {
#if defined(__AVX512F__)
        // masked forms: GCC 12 warns on the plain ones' undefined operands
        return (vec<float>)_mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX__)
        return (vec<float>)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
        vec<float> f;
        for (int l = 0; l < kLanes32; ++l) f[l] = load(p[l]);
        return f;
#endif
    }
}

template <class T> PYBN_INLINE void vstore_as(T* p, const vec<acc_t<T>>& v) {
    if constexpr (kNative<T>) {
        vstore(p, v);
    } else if constexpr (std::is_same_v<T, bfloat16_t>) {
#if defined(__AVX2__) && !defined(__AVX512F__)
        // the same rounding in 11 instructions (GCC makes ~20 of the vector-extension form):
        // NaN found by an unordered compare, the 16-bit halves packed with one packus
        const __m256 f = (__m256)v;
        const __m256i u = _mm256_castps_si256(f), hi = _mm256_srli_epi32(u, 16);
        const __m256i r = _mm256_srli_epi32(
            _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), _mm256_and_si256(hi, _mm256_set1_epi32(1))),
            16);
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
        const __m256i b = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                         _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
#else
        u32vec u;
        __builtin_memcpy(&u, &v, sizeof u);
        const i32vec nan = (u & 0x7fffffffu) > 0x7f800000u;
        const u32vec r = nan ? ((u >> 16) | 0x40u) : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        const u16vec h = __builtin_convertvector(r, u16vec);
        __builtin_memcpy(p, &h, sizeof h);
#endif
    } else {
#if defined(__AVX512F__)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                            _mm512_maskz_cvtps_ph(0xFFFF, (__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__) && defined(__AVX__)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
        for (int l = 0; l < kLanes32; ++l) p[l] = store<T>(v[l]);
#endif
    }
}

template <class T> inline void to_acc(const T* p, int64_t n, acc_t<T>* out) {
    constexpr int L = kLanesOf<acc_t<T>>;
    int64_t i = 0;
    for (; i + L <= n; i += L) vstore(out + i, vload_as(p + i));
    for (; i < n; ++i) out[i] = load(p[i]);
}

// Elements between per-column accumulator arrays of W columns: W rounded up to a cache line,
// moved off multiples of 4 KiB (arrays exactly 4 KiB apart make a store to one and a load from
// the next look dependent to the CPU: "4K aliasing").
template <class E> inline int64_t spaced(int64_t W) {
    int64_t bytes = (W * int64_t(sizeof(E)) + 63) / 64 * 64;
    if (bytes % 4096 < 256 || bytes % 4096 > 4096 - 256) bytes += 512;
    return bytes / int64_t(sizeof(E));
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }


// ---------------------------------------------------------------------------------------------
// Reduction drivers: the row path (inner >= kRowMin) and the column path (inner < kRowMin).

// Software prefetch ahead of the column-path reductions pays when their `streams` inputs are
// beyond the LLC (bench/NOTES.md, step 13).
template <class T> bool fetch_ahead(const pybn_view& v, int64_t streams) {
    return stream_output(streams * v.outer * v.channels * v.inner * int64_t(sizeof(T)));
}

// Software prefetch of `bytes` from p.
inline void prefetch_bytes(const char* p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

// Row path: channel c is cut into runs sharing one shift: segments of kSegment values of a long
// row, or groups of whole short rows (about kSegment values). The runs are cut into `split`
// parts (depending on the shape only) that merge in order, so a channel's result is the same
// whichever channels are reduced with it.
struct RowRuns {
    int64_t nseg;          // segments per row (1 for short rows)
    int64_t rows_per_run;  // whole rows per run (1 for long rows)
    int64_t runs;          // runs per channel
};

inline RowRuns row_runs(const pybn_view& v) {
    if (v.inner >= kSegment) {
        const int64_t nseg = ceil_div(v.inner, kSegment);
        return {nseg, 1, v.outer * nseg};
    }
    const int64_t rpr = max64(1, kSegment / v.inner);
    return {1, rpr, ceil_div(v.outer, rpr)};
}

inline int64_t row_split(const pybn_view& v) {
    return min64(max64(8, ceil_div(kParts, v.channels)), row_runs(v).runs);  // >= 8: balanced groups
}

// The first 64-byte aligned U at or after byte offset_bytes of s.
template <class U> U* aligned_in(const Scratch& s, size_t offset_bytes) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(s.as<char>(offset_bytes));
    return reinterpret_cast<U*>((p + 63) & ~uintptr_t(63));
}

// Channels [c0, c1) are reduced into out[0, c1 - c0); parts: (c1 - c0) * row_split(v) scratch.
// A work item is a block of channels and one of the `split` ranges of runs, read in memory order
// where that is cheap: row o of channels cb0, cb0 + 1, ..., then row o + 1 (one continuous stream
// for the prefetchers instead of a short burst per row: bench/NOTES.md, step 14). Rows grouped
// into runs keep one run state per channel in memory between their rows, from kMemoryOrderBytes
// per row (the state, a few hundred bytes, then moves to and from L1 once per row of at least
// that many bytes from memory; a judgment, not tuned); shorter rows go channel by channel with
// the state in registers.
// Either way each channel adds the same values in the same order, so the order changes no bit.
// The run kernel k: k.begin(State&, c, off) starts a run at value offset off; k.add(State&, c,
// off, len) adds values [off, off + len) of channel c; k.end(State&, count) returns its Part;
// Kernel::kRowValueBytes is the bytes it reads per value.
// Runs of whole rows are read in memory order with per-channel states (segments of long rows are
// in memory order as they come).
template <class Kernel> bool row_memory_order(const pybn_view& v) {
    return row_runs(v).nseg == 1 && v.inner * Kernel::kRowValueBytes >= kMemoryOrderBytes;
}

// The temporaries of reduce_rows for channel groups of up to G channels on nt threads, allocated
// by its caller before any output is written: the parts and the per-thread run states.
template <class Part, class Kernel> struct RowScratch {
    int nt;
    Scratch parts, states;
    RowScratch(const pybn_view& v, int64_t G, int threads)
        : nt(threads), parts(sizeof(Part) * size_t(G * row_split(v))), states(state_bytes(v, G, threads)) {}
    // per thread: the states of the largest block and one more, room for the alignment
    static size_t state_bytes(const pybn_view& v, int64_t G, int nt) {
        if (!row_memory_order<Kernel>(v)) return 0;
        const int64_t nb = min64(G, ceil_div(kParts, row_split(v)));
        return sizeof(typename Kernel::State) * size_t(ceil_div(G, nb) + 1) * size_t(nt);
    }
};

template <class Part, class Kernel>
void reduce_rows(const pybn_view& v, int64_t c0, int64_t c1, const RowScratch<Part, Kernel>& scratch, Part* out,
                 const Kernel& k) {
    using State = typename Kernel::State;
    const int64_t C = v.channels, inner = v.inner, nc = c1 - c0;
    const RowRuns rr = row_runs(v);
    const int64_t split = row_split(v);
    const int64_t nb = min64(nc, ceil_div(kParts, split));  // channel blocks
    const bool memory_order = row_memory_order<Kernel>(v);
    const int nt = scratch.nt;
    const int64_t per_block = ceil_div(nc, nb);
    Part* parts = scratch.parts.template as<Part>();
    const Scratch& states = scratch.states;
    parallel_for(nb * split, v.outer * nc * inner, nt, [&](int64_t p, int t) {
        // neighbouring items: neighbouring channel blocks of the same rows
        const int64_t b = p % nb, s = p / nb;
        const int64_t cb0 = c0 + nc * b / nb, cb1 = c0 + nc * (b + 1) / nb, r1 = rr.runs * (s + 1) / split;
        for (int64_t c = cb0; c < cb1; ++c) parts[(c - c0) * split + s] = Part{};
        State* st = memory_order ? aligned_in<State>(states, sizeof(State) * size_t(per_block + 1) * size_t(t)) : nullptr;
        for (int64_t r = rr.runs * s / split; r < r1;) {
            const int64_t o0 = (r / rr.nseg) * rr.rows_per_run, g0 = r % rr.nseg;
            const int64_t g1 = min64(rr.nseg, g0 + (r1 - r));  // this part's runs in row o0 (long rows)
            const int64_t rows = min64(rr.rows_per_run, v.outer - o0);
            if (memory_order) {
                for (int64_t c = cb0; c < cb1; ++c) k.begin(st[c - cb0], c, (o0 * C + c) * inner);
                for (int64_t o = o0; o < o0 + rows; ++o)
                    for (int64_t c = cb0; c < cb1; ++c) k.add(st[c - cb0], c, (o * C + c) * inner, inner);
                for (int64_t c = cb0; c < cb1; ++c) parts[(c - c0) * split + s].merge(k.end(st[c - cb0], rows * inner));
            } else {  // channel by channel: a run of `rows` short rows, or segments of row o0
                for (int64_t c = cb0; c < cb1; ++c)
                    for (int64_t g = g0; g < g1; ++g) {
                        const int64_t off = (o0 * C + c) * inner + g * kSegment;
                        const int64_t len = min64(kSegment, inner - g * kSegment);
                        State one;
                        k.begin(one, c, off);
                        for (int64_t o = 0; o < rows; ++o) k.add(one, c, off + o * C * inner, len);
                        parts[(c - c0) * split + s].merge(k.end(one, rows * len));
                    }
            }
            r += g1 - g0;
        }
    });
    for (int64_t c = 0; c < nc; ++c) out[c] = Part{};
    for (int64_t s = 0; s < split; ++s)  // part order per channel, channels interleaved (reduce_cols)
        for (int64_t c = 0; c < nc; ++c) out[c].merge(parts[c * split + s]);
}

// Column path: the view is `outer` rows of W = C * inner columns; rows are cut into `nparts`
// ranges; part(o0, o1, cols, thread) writes the W column Parts of rows [o0, o1), thread < nt.
template <class Part, class PartFn>
void reduce_cols(const pybn_view& v, int nt, Part* out, PartFn part) {
    const int64_t C = v.channels, inner = v.inner, W = C * inner;
    // parts: at most kParts, at least kPartMinRows rows and kPartMinValues values each (the
    // per-column merges of a part cost about as much as reducing a few rows), at most ~1M
    // partials in all
    const int64_t nparts = max64(1, min64(min64(kParts, v.outer * W / kPartMinValues),
                                          min64(v.outer / kPartMinRows, (int64_t(1) << 20) / W)));
    Scratch scratch(sizeof(Part) * size_t(nparts * W));
    Part* parts = scratch.as<Part>();
    parallel_for(nparts, v.outer * W, nt, [&](int64_t p, int t) {
        part(v.outer * p / nparts, v.outer * (p + 1) / nparts, parts + p * W, t);
    });
    // each channel merges its parts in part order; channels interleaved, so that consecutive
    // merges are independent (one channel's chain of dependent divisions was latency-bound:
    // a third of a 6272 x 256 statistics call)
    for (int64_t c = 0; c < C; ++c) out[c] = Part{};
    for (int64_t p = 0; p < nparts; ++p)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < inner; ++i) out[c].merge(parts[p * W + c * inner + i]);
}

// ---------------------------------------------------------------------------------------------
// Batch statistics.

// Float64 accumulators of one run: `K` sums, each as a low and a high float64 vector per unrolled
// lane block (kU of them) and a scalar for the tails; added up in a fixed order by `total`.
template <int K> struct WideSums {
    vec<double> v[K][2 * kU];
    double tail[K];
    double total(int k) const { return hsum(v[k]) + tail[k]; }
};
template <int K> PYBN_INLINE void zero(WideSums<K>& w) {
    for (int k = 0; k < K; ++k) {
        for (int u = 0; u < 2 * kU; ++u) w.v[k][u] = vec<double>{};
        w.tail[k] = 0;
    }
}

// sum(x - shift) and sum((x - shift)^2) over p[0, len), added into w (kept across the rows of a
// run): blocks of kDepth x kU vectors accumulate in A, then widen into float64 vectors; the tail
// goes straight to float64. 16-bit values are converted a vector at a time.
template <class T>
PYBN_INLINE void shifted_sums(const T* p, int64_t len, acc_t<T> shift, WideSums<2>& w) {
    using A = acc_t<T>;
    constexpr int L = kLanesOf<A>, U = kU, B = kDepth * U * L;
    const vec<A> sh = vsplat(shift);
    int64_t i = 0;
    for (; i + B <= len; i += B) {
        vec<A> s[U], q[U];
        for (int u = 0; u < U; ++u) {  // the first step without a zero register (no spills)
            const vec<A> d = vload_as(p + i + u * L) - sh;
            s[u] = d;
            q[u] = d * d;
        }
        for (int k = 1; k < kDepth; ++k)
            for (int u = 0; u < U; ++u) {
                const vec<A> d = vload_as(p + i + (k * U + u) * L) - sh;
                s[u] += d;
                q[u] += d * d;
            }
        for (int u = 0; u < U; ++u) {
            widen_add<A>(s[u], w.v[0][2 * u], w.v[0][2 * u + 1]);
            widen_add<A>(q[u], w.v[1][2 * u], w.v[1][2 * u + 1]);
        }
    }
    {  // whole vectors left: flushed every kDepth
        vec<A> s = {}, q = {};
        for (int k = 0; i + L <= len; i += L) {
            const vec<A> d = vload_as(p + i) - sh;
            s += d;
            q += d * d;
            if (++k == kDepth || i + 2 * L > len) {
                widen_add<A>(s, w.v[0][0], w.v[0][1]);
                widen_add<A>(q, w.v[1][0], w.v[1][1]);
                s = q = vec<A>{};
                k = 0;
            }
        }
    }
    for (; i < len; ++i) {
        const A d = load(p[i]) - shift;
        w.tail[0] += double(d);
        w.tail[1] += double(d * d);
    }
}

// Moments of the runs of a channel (reduce_rows): sums relative to the run's first value.
template <class T> struct MomentsRun {
    using A = acc_t<T>;
    static constexpr int64_t kRowValueBytes = sizeof(T);  // bytes read per value of a row
    struct State {
        WideSums<2> w;
        A shift;
    };
    const T* x;
    PYBN_INLINE void begin(State& s, int64_t, int64_t off) const {
        s.shift = load(x[off]);
        zero(s.w);
    }
    PYBN_INLINE void add(State& s, int64_t, int64_t off, int64_t len) const {
        WideSums<2> w = s.w;  // in registers for the row (the state may live in memory)
        shifted_sums(x + off, len, s.shift, w);
        s.w = w;
    }
    Moments end(const State& s, int64_t count) const {
        Moments m;
        m.merge_shifted(double(count), double(s.shift), s.w.total(0), s.w.total(1));
        return m;
    }
};

// Column path, one tile: rows [0, rows) of a tile at `x` (row stride W, rows <= kTileRows), in
// memory order, relative to `sh` (the first row of the part, a shift inside the data as on the
// row path). Each group of kDepth rows is added pairwise in A; the groups' sums accumulate in A
// per column (s2, q2: at most kTileRows / kDepth = 16 of them, as accurate as the row path:
// bench/NOTES.md) and are widened into the float64 column sums S, Q once per tile.
template <class T>
void tile_moments(const T* x, int64_t W, int64_t rows, const acc_t<T>* sh, acc_t<T>* s2, acc_t<T>* q2, double* S,
                  double* Q, bool ahead) {
    using A = acc_t<T>;
    constexpr int L = kLanesOf<A>;
    for (int64_t j = 0; j < W; ++j) s2[j] = q2[j] = 0;
    int64_t r = 0;
    for (; r + kDepth <= rows; r += kDepth) {
        const T *x0 = x + r * W, *x1 = x0 + W, *x2 = x1 + W, *x3 = x2 + W;
        if (ahead) prefetch_bytes(reinterpret_cast<const char*>(x0) + kTilePrefetch, kDepth * W * int64_t(sizeof(T)));
        int64_t j = 0;
        for (; j + L <= W; j += L) {
            const vec<A> shv = vload(sh + j);
            const vec<A> d0 = vload_as(x0 + j) - shv, d1 = vload_as(x1 + j) - shv;
            const vec<A> d2 = vload_as(x2 + j) - shv, d3 = vload_as(x3 + j) - shv;
            vstore(s2 + j, vload(s2 + j) + ((d0 + d1) + (d2 + d3)));
            vstore(q2 + j, vload(q2 + j) + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)));
        }
        for (; j < W; ++j) {  // the same arithmetic, one column at a time
            const A d0 = load(x0[j]) - sh[j], d1 = load(x1[j]) - sh[j], d2 = load(x2[j]) - sh[j],
                    d3 = load(x3[j]) - sh[j];
            s2[j] += (d0 + d1) + (d2 + d3);
            q2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
    }
    for (; r < rows; ++r)  // a last, partial group
        for (int64_t j = 0; j < W; ++j) {
            const A d = load(x[r * W + j]) - sh[j];
            s2[j] += d;
            q2[j] += d * d;
        }
    for (int64_t j = 0; j < W; ++j) {
        S[j] += double(s2[j]);
        Q[j] += double(q2[j]);
    }
}

template <class T>
void batch_stats_t(const pybn_view& v, const void* xv, double* mean, double* m2) {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(xv);
    const int64_t C = v.channels, W = C * v.inner;
    Scratch result(sizeof(Moments) * size_t(C));
    Moments* mom = result.as<Moments>();
    if (v.inner >= kRowMin) {
        const RowScratch<Moments, MomentsRun<T>> scratch(v, C, num_threads());
        reduce_rows(v, 0, C, scratch, mom, MomentsRun<T>{x});
    } else {
        const int nt = num_threads();
        const int64_t R = kTileRows;
        const int64_t wa = spaced<A>(W), wd = spaced<double>(W);
        const bool ahead = fetch_ahead<T>(v, 1);
        Scratch abuf(sizeof(A) * 3 * size_t(wa) * size_t(nt)), dbuf(sizeof(double) * 2 * size_t(wd) * size_t(nt));
        reduce_cols<Moments>(v, nt, mom, [&](int64_t o0, int64_t o1, Moments* cols, int t) {
            A* sh = abuf.as<A>(size_t(3 * wa * t));  // the part's first row, then s2, q2
            double* S = dbuf.as<double>(size_t(2 * wd * t));
            to_acc(x + o0 * W, W, sh);
            for (int64_t j = 0; j < 2 * wd; ++j) S[j] = 0;
            for (int64_t r0 = o0; r0 < o1; r0 += R) {
                const int64_t rows = min64(R, o1 - r0);
                tile_moments(x + r0 * W, W, rows, sh, sh + wa, sh + 2 * wa, S, S + wd, ahead);
            }
            for (int64_t j = 0; j < W; ++j) {
                cols[j] = Moments{};
                cols[j].merge_shifted(double(o1 - o0), double(sh[j]), S[j], S[wd + j]);
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

// (sum(dy), sum(dy * (x - m)), sum(x - m)) over [0, len), added into out; blocks of kDepth
// vectors accumulate in A, then widen into float64 vectors.
template <class T>
PYBN_INLINE void dy_sums(const T* dy, const T* x, int64_t len, acc_t<T> m, WideSums<3>& w) {
    using A = acc_t<T>;
    constexpr int L = kLanesOf<A>, B = kDepth * L;
    const vec<A> mv = vsplat(m);
    int64_t i = 0;
    for (; i + B <= len; i += B) {
        vec<A> a0 = {}, a1 = {}, a2 = {};
        for (int k = 0; k < kDepth; ++k) {
            const vec<A> g = vload_as(dy + i + k * L), d = vload_as(x + i + k * L) - mv;
            a0 += g;
            a1 += g * d;
            a2 += d;
        }
        widen_add<A>(a0, w.v[0][0], w.v[0][1]);
        widen_add<A>(a1, w.v[1][0], w.v[1][1]);
        widen_add<A>(a2, w.v[2][0], w.v[2][1]);
    }
    {  // whole vectors left: flushed every kDepth
        vec<A> a0 = {}, a1 = {}, a2 = {};
        for (int k = 0; i + L <= len; i += L) {
            const vec<A> g = vload_as(dy + i), d = vload_as(x + i) - mv;
            a0 += g;
            a1 += g * d;
            a2 += d;
            if (++k == kDepth || i + 2 * L > len) {
                widen_add<A>(a0, w.v[0][0], w.v[0][1]);
                widen_add<A>(a1, w.v[1][0], w.v[1][1]);
                widen_add<A>(a2, w.v[2][0], w.v[2][1]);
                a0 = a1 = a2 = vec<A>{};
                k = 0;
            }
        }
    }
    for (; i < len; ++i) {
        const A g = load(dy[i]), d = load(x[i]) - m;
        w.tail[0] += double(g);
        w.tail[1] += double(g * d);
        w.tail[2] += double(d);
    }
}

// Backward sums of the runs of a channel (reduce_rows).
template <class T> struct SumsRun {
    using A = acc_t<T>;
    static constexpr int64_t kRowValueBytes = 2 * sizeof(T);  // bytes read per value of a row
    struct State {
        WideSums<3> w;
    };
    const T *dy, *x;
    const A* mean;
    PYBN_INLINE void begin(State& s, int64_t, int64_t) const { zero(s.w); }
    PYBN_INLINE void add(State& s, int64_t c, int64_t off, int64_t len) const {
        WideSums<3> w = s.w;  // in registers for the row (the state may live in memory)
        dy_sums(dy + off, x + off, len, mean[c], w);
        s.w = w;
    }
    Sums end(const State& s, int64_t) const {
        Sums r;
        r.dy = s.w.total(0);
        r.dy_xmu = s.w.total(1);
        r.xmu = s.w.total(2);
        return r;
    }
};

// Column path, one tile of dy and x (row stride W, rows <= kTileRows), in memory order: groups
// of kDepth rows added pairwise in A, the groups' sums accumulated in A per column (a2: 3 x W
// scratch), widened into the float64 column sums D (3 x W) once per tile.
template <class T>
void tile_sums(const T* dy, const T* x, const acc_t<T>* m, int64_t W, int64_t rows, acc_t<T>* a2, double* D,
               int64_t wa, int64_t wd, bool ahead) {
    using A = acc_t<T>;
    constexpr int L = kLanesOf<A>;
    A *a0 = a2, *a1 = a2 + wa, *ax = a2 + 2 * wa;
    for (int64_t j = 0; j < W; ++j) a0[j] = a1[j] = ax[j] = 0;
    int64_t r = 0;
    for (; r + kDepth <= rows; r += kDepth) {
        const T *g0 = dy + r * W, *g1 = g0 + W, *g2 = g1 + W, *g3 = g2 + W;
        const T *x0 = x + r * W, *x1 = x0 + W, *x2 = x1 + W, *x3 = x2 + W;
        if (ahead) {
            prefetch_bytes(reinterpret_cast<const char*>(g0) + kTilePrefetch, kDepth * W * int64_t(sizeof(T)));
            prefetch_bytes(reinterpret_cast<const char*>(x0) + kTilePrefetch, kDepth * W * int64_t(sizeof(T)));
        }
        int64_t j = 0;
        for (; j + L <= W; j += L) {
            const vec<A> mv = vload(m + j);
            const vec<A> e0 = vload_as(g0 + j), e1 = vload_as(g1 + j), e2 = vload_as(g2 + j), e3 = vload_as(g3 + j);
            const vec<A> d0 = vload_as(x0 + j) - mv, d1 = vload_as(x1 + j) - mv, d2 = vload_as(x2 + j) - mv,
                         d3 = vload_as(x3 + j) - mv;
            vstore(a0 + j, vload(a0 + j) + ((e0 + e1) + (e2 + e3)));
            vstore(a1 + j, vload(a1 + j) + ((e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3)));
            vstore(ax + j, vload(ax + j) + ((d0 + d1) + (d2 + d3)));
        }
        for (; j < W; ++j) {  // the same arithmetic, one column at a time
            const A e0 = load(g0[j]), e1 = load(g1[j]), e2 = load(g2[j]), e3 = load(g3[j]);
            const A d0 = load(x0[j]) - m[j], d1 = load(x1[j]) - m[j], d2 = load(x2[j]) - m[j], d3 = load(x3[j]) - m[j];
            a0[j] += (e0 + e1) + (e2 + e3);
            a1[j] += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3);
            ax[j] += (d0 + d1) + (d2 + d3);
        }
    }
    for (; r < rows; ++r)  // a last, partial group
        for (int64_t j = 0; j < W; ++j) {
            const A g = load(dy[r * W + j]), d = load(x[r * W + j]) - m[j];
            a0[j] += g;
            a1[j] += g * d;
            ax[j] += d;
        }
    for (int64_t j = 0; j < W; ++j) {
        D[j] += double(a0[j]);
        D[wd + j] += double(a1[j]);
        D[2 * wd + j] += double(ax[j]);
    }
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
        const RowScratch<Sums, SumsRun<T>> scratch(v, C, num_threads());
        reduce_rows(v, 0, C, scratch, sums, SumsRun<T>{dy, x, mean});
    } else {
        const int nt = num_threads();
        const int64_t R = kTileRows;
        Scratch mcol(sizeof(A) * size_t(W));
        const int64_t wa = spaced<A>(W), wd = spaced<double>(W);
        const bool ahead = fetch_ahead<T>(v, 2);
        Scratch dsum(sizeof(double) * 3 * size_t(wd) * size_t(nt)), asum(sizeof(A) * 3 * size_t(wa) * size_t(nt));
        A* m = mcol.as<A>();
        for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < inner; ++i) m[c * inner + i] = mean[c];
        reduce_cols<Sums>(v, nt, sums, [&](int64_t o0, int64_t o1, Sums* cols, int t) {
            double* D = dsum.as<double>(size_t(3 * wd * t));
            for (int64_t j = 0; j < 3 * wd; ++j) D[j] = 0;
            for (int64_t r0 = o0; r0 < o1; r0 += R) {
                const int64_t rows = min64(R, o1 - r0);
                tile_sums(dy + r0 * W, x + r0 * W, m, W, rows, asum.as<A>(size_t(3 * wa * t)), D, wa, wd, ahead);
            }
            for (int64_t j = 0; j < W; ++j) {
                cols[j].dy = D[j];
                cols[j].dy_xmu = D[wd + j];
                cols[j].xmu = D[2 * wd + j];
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

// Row path over the rows (o, c) of channels [c0, c1).
template <class RowOp>
void elementwise_rows(const pybn_view& v, int64_t c0, int64_t c1, RowOp row_op) {
    const int64_t C = v.channels, inner = v.inner, nc = c1 - c0;
    const int64_t rows = v.outer * nc, per = max64(1, kChunkValues / inner);
    parallel_for(ceil_div(rows, per), rows * inner, num_threads(), [&](int64_t b, int) {
        for (int64_t r = b * per; r < min64(rows, (b + 1) * per); ++r) {
            const int64_t o = r / nc, c = c0 + r % nc;
            row_op((o * C + c) * inner, inner, c);
        }
        stream_fence();
    });
}

template <class RowOp, class ColsOp>
void elementwise(const pybn_view& v, RowOp row_op, ColsOp cols_op) {
    const int64_t C = v.channels, inner = v.inner, total = v.outer * C * inner;
    if (inner >= kRowMin) {
        elementwise_rows(v, 0, C, row_op);
    } else {
        const int64_t W = C * inner, per = max64(1, kChunkValues / W);
        parallel_for(ceil_div(v.outer, per), total, num_threads(), [&](int64_t b, int) {
            const int64_t o0 = b * per, o1 = min64(v.outer, (b + 1) * per);
            cols_op(o0 * W, o1 - o0);
            stream_fence();
        });
    }
}

// Column path coefficients: coef (4 x C) expanded to 4 arrays of E values, the value at
// position k being coef[(k mod W) / inner]. A run of rows walks them with a column position j in
// [0, P), P the smallest multiple of W that holds a vector, so that the vector at j never passes
// the end (E = P + L) and one subtraction wraps j: rows of any width stay vectorised, and a run
// may start anywhere in a row (aligned streaming stores).
template <class A>
struct ColumnCoefs {
    int64_t W, P, E;
    Scratch buf;
    ColumnCoefs(const A* coef, int64_t C, int64_t inner, bool column_path)
        : W(C * inner), P(W * ceil_div(kLanesOf<A>, W)), E(P + kLanesOf<A>),
          buf(column_path ? sizeof(A) * 4 * size_t(E) : 0) {
        if (!column_path) return;
        A* out = buf.as<A>();
        for (int64_t k = 0; k < 4; ++k) {
            if (inner == 1)  // channels-last: a plain copy (the loop below ran at ~3 ns a value)
                __builtin_memcpy(out + k * E, coef + k * C, sizeof(A) * size_t(C));
            else
                for (int64_t c = 0; c < C; ++c)
                    for (int64_t i = 0; i < inner; ++i) out[k * E + c * inner + i] = coef[k * C + c];
            for (int64_t i = W; i < E; ++i) out[k * E + i] = out[k * E + i - W];
        }
    }
    const A* operator[](int k) const { return buf.as<A>() + k * E; }
};

// A vector of T values from an acc_t<T> vector, stored bypassing the caches (no read of the
// destination line first; p aligned to the stored bytes). 16-bit values go through vstore_as'
// conversion, then a 128- / 256-bit streaming store (SSE2-only units store normally).
template <class T> PYBN_INLINE void vstream_as(T* p, const vec<acc_t<T>>& v) {
    if constexpr (kNative<T>) {
        vstream(p, v);
    } else {
#if defined(__AVX512F__)
        alignas(32) T h[kLanes32];
        vstore_as(h, v);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
#elif defined(__AVX__)
        alignas(16) T h[kLanes32];
        vstore_as(h, v);
        _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm_load_si128(reinterpret_cast<const __m128i*>(h)));
#else
        vstore_as(p, v);
#endif
    }
}

// out[i] = f(i) for i in [0, n), f returning acc_t<T> vectors (vector index) and scalars (tail),
// converted to T: vector stores, or non-temporal stores when `stream` (outputs larger than the
// caches).
template <class T, class VecF, class ScalarF>
PYBN_INLINE void write_run(T* out, int64_t n, bool stream, VecF vf, ScalarF sf) {
    constexpr int L = kLanesOf<acc_t<T>>;
    constexpr uintptr_t kOutBytes = uintptr_t(L) * sizeof(T);
    int64_t i = 0;
    if (stream) {
        for (; i < n && (reinterpret_cast<uintptr_t>(out + i) % kOutBytes) != 0; ++i) out[i] = store<T>(sf(i));
        for (; i + L <= n; i += L) vstream_as(out + i, vf(i));
    } else {
        for (; i + L <= n; i += L) vstore_as(out + i, vf(i));
    }
    for (; i < n; ++i) out[i] = store<T>(sf(i));
}

// Column path: out[i] = f(i, j) for i in [0, n) of whole rows, j the column position of value i
// (from 0, wrapping at P: ColumnCoefs).
template <class T, class VecF, class ScalarF>
PYBN_INLINE void write_cols(T* out, int64_t n, int64_t P, bool stream, VecF vf, ScalarF sf) {
    constexpr int L = kLanesOf<acc_t<T>>;
    constexpr uintptr_t kOutBytes = uintptr_t(L) * sizeof(T);
    int64_t i = 0, j = 0;
    auto step = [&](int64_t by) {
        j += by;
        if (j >= P) j -= P;
    };
    if (stream) {
        for (; i < n && (reinterpret_cast<uintptr_t>(out + i) % kOutBytes) != 0; ++i, step(1))
            out[i] = store<T>(sf(i, j));
        for (; i + L <= n; i += L, step(L)) vstream_as(out + i, vf(i, j));
    } else {
        for (; i + L <= n; i += L, step(L)) vstore_as(out + i, vf(i, j));
    }
    for (; i < n; ++i, step(1)) out[i] = store<T>(sf(i, j));
}

// The normalisation y = ((x - hi) - lo) * scale + shift, written once for vectors and scalars,
// row and column paths. (The backward's dx = a dy + b (x - m) + c stays written out in its two
// loops: as a function GCC contracts it into FMAs differently for 16-bit data, which changed
// the last bit of some float16 dx values; bench/NOTES.md, step 23.)
template <class V> PYBN_INLINE V normalized(V x, V hi, V lo, V scale, V shift) { return ((x - hi) - lo) * scale + shift; }

// Row path: one channel's run of n values with scalar coefficients (h[0] ... b[0]).
template <class T>
PYBN_INLINE void normalize_values(const T* x, T* y, int64_t n, bool stream, const acc_t<T>* h, const acc_t<T>* l,
                                  const acc_t<T>* a, const acc_t<T>* b) {
    using A = acc_t<T>;
    const vec<A> H = vsplat(h[0]), Lo = vsplat(l[0]), S = vsplat(a[0]), B = vsplat(b[0]);
    write_run<T>(y, n, stream, [&](int64_t i) { return normalized(vload_as(x + i), H, Lo, S, B); },
                 [&](int64_t i) { return normalized(load(x[i]), h[0], l[0], a[0], b[0]); });
}

// dx = a dy + b (x - m) + c, or a dy when x is null (inference), over one channel's run.
template <class T>
PYBN_INLINE void backward_values(const T* dy, const T* x, T* dx, int64_t n, bool stream, const acc_t<T>* m,
                                 const acc_t<T>* a, const acc_t<T>* b, const acc_t<T>* c) {
    using A = acc_t<T>;
    const vec<A> Av = vsplat(a[0]), Bv = vsplat(b[0]), Mv = vsplat(m[0]), Cv = vsplat(c[0]);
    if (x == nullptr)
        write_run<T>(dx, n, stream, [&](int64_t i) { return Av * vload_as(dy + i); },
                     [&](int64_t i) { return a[0] * load(dy[i]); });
    else
        write_run<T>(dx, n, stream,
                     [&](int64_t i) { return Av * vload_as(dy + i) + Bv * (vload_as(x + i) - Mv) + Cv; },
                     [&](int64_t i) { return a[0] * load(dy[i]) + b[0] * (load(x[i]) - m[0]) + c[0]; });
}

// Column path: n values (whole rows) with per-column coefficients from ColumnCoefs.
template <class T>
void normalize_cols(const T* x, T* y, int64_t n, const ColumnCoefs<acc_t<T>>& e, bool stream) {
    const acc_t<T> *h = e[0], *l = e[1], *a = e[2], *b = e[3];
    write_cols<T>(y, n, e.P, stream,
        [&](int64_t i, int64_t k) {
            return normalized(vload_as(x + i), vload(h + k), vload(l + k), vload(a + k), vload(b + k));
        },
        [&](int64_t i, int64_t k) { return normalized(load(x[i]), h[k], l[k], a[k], b[k]); });
}

// dx = a dy + b (x - m) + c, or a dy when x is null (inference).
template <class T>
void backward_cols(const T* dy, const T* x, T* dx, int64_t n, const ColumnCoefs<acc_t<T>>& e, bool stream) {
    const acc_t<T> *m = e[0], *a = e[1], *b = e[2], *c = e[3];
    if (x == nullptr) {
        write_cols<T>(dx, n, e.P, stream, [&](int64_t i, int64_t k) { return vload(a + k) * vload_as(dy + i); },
                      [&](int64_t i, int64_t k) { return a[k] * load(dy[i]); });
        return;
    }
    write_cols<T>(dx, n, e.P, stream,
        [&](int64_t i, int64_t k) {
            return vload(a + k) * vload_as(dy + i) + vload(b + k) * (vload_as(x + i) - vload(m + k)) + vload(c + k);
        },
        [&](int64_t i, int64_t k) { return a[k] * load(dy[i]) + b[k] * (load(x[i]) - m[k]) + c[k]; });
}

template <class T>
void normalize_t(const pybn_view& v, const void* xv, const void* coefv, void* yv) {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(xv);
    T* y = static_cast<T*>(yv);
    const A* k = static_cast<const A*>(coefv);
    const int64_t C = v.channels, W = C * v.inner;
    const bool stream = stream_output(v.outer * W * int64_t(sizeof(T)));
    const ColumnCoefs<A> e(k, C, v.inner, v.inner < kRowMin);
    elementwise(
        v,
        [&](int64_t off, int64_t len, int64_t c) {
            normalize_values(x + off, y + off, len, stream, k + c, k + C + c, k + 2 * C + c, k + 3 * C + c);
        },
        [&](int64_t off, int64_t rows) { normalize_cols<T>(x + off, y + off, rows * W, e, stream); });
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
    const bool stream = stream_output(v.outer * W * int64_t(sizeof(T)));
    const ColumnCoefs<A> e(k, C, v.inner, v.inner < kRowMin);
    elementwise(
        v,
        [&](int64_t off, int64_t len, int64_t c) {
            backward_values(dy + off, x ? x + off : nullptr, dx + off, len, stream, k + c, k + C + c, k + 2 * C + c,
                            k + 3 * C + c);
        },
        [&](int64_t off, int64_t rows) {
            backward_cols<T>(dy + off, x ? x + off : nullptr, dx + off, rows * W, e, stream);
        });
}

// ---------------------------------------------------------------------------------------------
// Fused kernels. Row path: channel groups whose data fits in half the last-level cache are
// reduced, handed to the epilogue and swept again while still cached (2 passes over memory for
// the forward instead of 3, 3 for the backward instead of 5). Column path: one group (all
// channels share every row). Every temporary is allocated before the first group writes.

inline int64_t channel_group(const pybn_view& v, int64_t bytes_per_value) {
    if (v.inner < kRowMin) return v.channels;
    const int64_t per_channel = max64(1, v.outer * v.inner * bytes_per_value);
    return max64(1, min64(v.channels, cache_budget() / per_channel));
}

template <class T>
void forward_train_t(const pybn_view& v, const void* xv, void* yv, const ForwardEpilogue& epilogue) {
    using A = acc_t<T>;
    const int64_t C = v.channels;
    Scratch coef(sizeof(A) * 4 * size_t(C)), mean(sizeof(double) * size_t(C)), m2(sizeof(double) * size_t(C));
    if (v.inner < kRowMin) {
        batch_stats_t<T>(v, xv, mean.as<double>(), m2.as<double>());
        epilogue(0, C, mean.as<double>(), m2.as<double>(), coef.as<A>());
        normalize_t<T>(v, xv, coef.as<A>(), yv);
        return;
    }
    const T* x = static_cast<const T*>(xv);
    T* y = static_cast<T*>(yv);
    const int64_t G = channel_group(v, sizeof(T));
    const bool stream = stream_output(v.outer * C * v.inner * int64_t(sizeof(T)));
    const RowScratch<Moments, MomentsRun<T>> scratch(v, G, num_threads());
    Scratch mom(sizeof(Moments) * size_t(G));
    const A* k = coef.as<A>();
    for (int64_t c0 = 0; c0 < C; c0 += G) {
        const int64_t c1 = min64(C, c0 + G);
        reduce_rows(v, c0, c1, scratch, mom.as<Moments>(), MomentsRun<T>{x});
        for (int64_t c = 0; c < c1 - c0; ++c) {
            mean.as<double>()[c] = mom.as<Moments>()[c].mean();
            m2.as<double>()[c] = mom.as<Moments>()[c].m2;
        }
        epilogue(c0, c1, mean.as<double>(), m2.as<double>(), coef.as<A>());
        elementwise_rows(v, c0, c1, [&](int64_t off, int64_t len, int64_t c) {
            normalize_values(x + off, y + off, len, stream, k + c, k + C + c, k + 2 * C + c, k + 3 * C + c);
        });
    }
}

template <class T>
void backward_t(const pybn_view& v, const void* dyv, const void* xv, const void* meanv, bool dx_reads_x,
                void* dxv, const BackwardEpilogue& epilogue) {
    using A = acc_t<T>;
    const int64_t C = v.channels;
    Scratch coef(sizeof(A) * 4 * size_t(C)), sums(sizeof(double) * 3 * size_t(C));
    double *sum_dy = sums.as<double>(), *sum_dy_xmu = sum_dy + C, *sum_xmu = sum_dy + 2 * C;
    if (v.inner < kRowMin) {
        backward_reduce_t<T>(v, dyv, xv, meanv, sum_dy, sum_dy_xmu, sum_xmu);
        epilogue(0, C, sum_dy, sum_dy_xmu, sum_xmu, coef.as<A>());
        if (dxv) backward_elementwise_t<T>(v, dyv, dx_reads_x ? xv : nullptr, coef.as<A>(), dxv);
        return;
    }
    const T* dy = static_cast<const T*>(dyv);
    const T* x = static_cast<const T*>(xv);
    const A* mean = static_cast<const A*>(meanv);
    T* dx = static_cast<T*>(dxv);
    const int64_t G = channel_group(v, 2 * sizeof(T));
    const bool stream = stream_output(v.outer * C * v.inner * int64_t(sizeof(T)));
    const RowScratch<Sums, SumsRun<T>> scratch(v, G, num_threads());
    Scratch red(sizeof(Sums) * size_t(G));
    const A* k = coef.as<A>();
    for (int64_t c0 = 0; c0 < C; c0 += G) {
        const int64_t c1 = min64(C, c0 + G);
        reduce_rows(v, c0, c1, scratch, red.as<Sums>(), SumsRun<T>{dy, x, mean});
        for (int64_t c = 0; c < c1 - c0; ++c) {
            sum_dy[c] = red.as<Sums>()[c].dy;
            sum_dy_xmu[c] = red.as<Sums>()[c].dy_xmu;
            sum_xmu[c] = red.as<Sums>()[c].xmu;
        }
        epilogue(c0, c1, sum_dy, sum_dy_xmu, sum_xmu, coef.as<A>());
        if (!dx) continue;
        elementwise_rows(v, c0, c1, [&](int64_t off, int64_t len, int64_t c) {
            backward_values(dy + off, dx_reads_x ? x + off : nullptr, dx + off, len, stream, k + c, k + C + c,
                            k + 2 * C + c, k + 3 * C + c);
        });
    }
}

// Type-erased entry points: one per operation, dispatching on the view's dtype.
pybn_status batch_stats(const pybn_view& v, const void* x, double* mean, double* m2) {
    return visit_dtype<HostStorage>(v.dtype, [&](auto t) { batch_stats_t<decltype(t)>(v, x, mean, m2); });
}
pybn_status normalize(const pybn_view& v, const void* x, const void* coef, void* y) {
    return visit_dtype<HostStorage>(v.dtype, [&](auto t) { normalize_t<decltype(t)>(v, x, coef, y); });
}
pybn_status backward_reduce(const pybn_view& v, const void* dy, const void* x, const void* mean, double* sum_dy,
                            double* sum_dy_xmu, double* sum_xmu) {
    return visit_dtype<HostStorage>(
        v.dtype, [&](auto t) { backward_reduce_t<decltype(t)>(v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu); });
}
pybn_status backward_elementwise(const pybn_view& v, const void* dy, const void* x, const void* coef, void* dx) {
    return visit_dtype<HostStorage>(v.dtype, [&](auto t) { backward_elementwise_t<decltype(t)>(v, dy, x, coef, dx); });
}
pybn_status forward_train(const pybn_view& v, const void* x, void* y, const ForwardEpilogue& epilogue) {
    return visit_dtype<HostStorage>(v.dtype, [&](auto t) { forward_train_t<decltype(t)>(v, x, y, epilogue); });
}
pybn_status backward(const pybn_view& v, const void* dy, const void* x, const void* mean, bool dx_reads_x,
                     void* dx, const BackwardEpilogue& epilogue) {
    return visit_dtype<HostStorage>(
        v.dtype, [&](auto t) { backward_t<decltype(t)>(v, dy, x, mean, dx_reads_x, dx, epilogue); });
}

}  // namespace

const KernelTable& table() {
    static const KernelTable t{PYBN_CPU_ISA_NAME, batch_stats, normalize, backward_reduce,
                               backward_elementwise, forward_train, backward};
    return t;
}

}  // namespace PYBN_CPU_ISA
}  // namespace pybn::cpu
