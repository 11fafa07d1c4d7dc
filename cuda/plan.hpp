// Launch planning of the CUDA kernels, as plain host C++ (no CUDA header): the kernels' grids and
// the walks their threads make through the tensor come from here, and tests/c/cuda_plan.cpp runs
// the same walks on the CPU for a table of shapes: no division by zero, every grid within CUDA's
// limits, every value of every channel visited exactly once, and the wave target met.
//
// Design (bench/NOTES.md, "CUDA kernels"):
// - Threads move through the tensor in units of `vec` consecutive values (16-byte loads and stores
//   when every pointer is 16-byte aligned and the contiguous run, inner or channels, is a multiple
//   of vec; else vec = 1).
// - No integer division in any kernel: the few divisions a thread needs to find its start use a
//   divisor precomputed on the host (FastDivmod, a multiply-high and shifts), and every step of a
//   walk is an addition with one carry.
// - Each thread issues kUnroll independent loads before it uses them.
// - The partition is a function of the shape only (not of the GPU), so results are bitwise
//   reproducible; it targets at least 4 blocks per SM of a 132-SM GPU for typical shapes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYBN_UNROLL _Pragma("unroll")
#else
#define PYBN_UNROLL
#endif

#include "numerics.hpp"
#include "pybn/pybn.h"

namespace pybn::cuda {

constexpr int kThreads = 256;    // threads of every reduction and elementwise block
constexpr int kUnroll = 4;       // units a thread loads before it consumes them
constexpr int kColsMaxVec = 4;   // channels-last reductions keep at most 4 accumulators a thread
constexpr int64_t kMinValuesPerBlock = 1024, kMaxValuesPerBlock = 16384;
constexpr int64_t kWaveBlocks = 132 * 8;  // a full wave of 256-thread blocks on a 132-SM GPU
constexpr int64_t kTargetBlocks = 4 * 132;  // the wave target: 4 blocks per SM
constexpr int64_t kFusedMerges = 16;       // partials a thread merges when the last block finishes
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1, kMaxGridY = 65535;
constexpr int64_t kElementwiseBlocks = int64_t(1) << 20;  // grid-stride beyond this

// ---- division by a divisor known on the host (Granlund & Montgomery, "Division by invariant
// integers using multiplication", fig. 4.1): q = (t + ((n - t) >> s1)) >> s2, t = mulhi(m, n),
// exact for every 0 <= n < 2^63 and 1 <= d < 2^63.
__extension__ typedef unsigned __int128 u128;  // host arithmetic of the divisor's magic number

PYBN_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
    return __umul64hi(a, b);
#else
    return uint64_t(u128(a) * b >> 64);
#endif
}

struct FastDivmod {
    int64_t d = 1;
    uint64_t m = 1;
    int s1 = 0, s2 = 0;

    static FastDivmod make(int64_t divisor) {  // host only
        FastDivmod f;
        f.d = divisor < 1 ? 1 : divisor;
        int l = 0;
        while ((uint64_t(1) << l) < uint64_t(f.d)) ++l;  // l = ceil(log2 d) <= 63
        const u128 two_l = u128(1) << l;
        f.m = uint64_t(((u128(1) << 64) * (two_l - uint64_t(f.d))) / uint64_t(f.d) + 1);
        f.s1 = l < 1 ? l : 1;
        f.s2 = l > 1 ? l - 1 : 0;
        return f;
    }
    PYBN_HD int64_t div(int64_t n) const {
        const uint64_t u = uint64_t(n), t = mulhi64(m, u);
        return int64_t((t + ((u - t) >> s1)) >> s2);
    }
    PYBN_HD void divmod(int64_t n, int64_t& q, int64_t& r) const {
        q = div(n);
        r = n - q * d;
    }
};

// ---- walks: a thread's positions s, s + S, s + 2S, ... (s < end) in a grid of rows x `units`
// units, as (row, unit in the row) and, where wanted, the row's channel (row % channels).
struct Walk {
    int64_t s, row, u, c;
};
struct Stride {
    int64_t S, dr, du, dc;  // S = dr * units + du, dc = dr % channels
};
inline Stride make_stride(int64_t S, int64_t units, int64_t channels) {  // host only
    const int64_t dr = S / units;
    return {S, dr, S % units, channels > 0 ? dr % channels : 0};
}
PYBN_HD Walk start_walk(int64_t s, const FastDivmod& by_units, const FastDivmod& by_channels) {
    Walk w;
    w.s = s;
    by_units.divmod(s, w.row, w.u);
    int64_t q;
    by_channels.divmod(w.row, q, w.c);
    return w;
}
PYBN_HD void advance(Walk& w, const Stride& st, int64_t units, int64_t channels) {
    w.s += st.S;
    w.u += st.du;
    w.row += st.dr;
    w.c += st.dc;
    if (w.u >= units) {
        w.u -= units;
        ++w.row;
        ++w.c;
    }
    if (w.c >= channels) w.c -= channels;
}
// f(batch, n): the next n <= kUnroll positions of the walk, in order, until s reaches end.
template <class F>
PYBN_HD void walk_batches(Walk w, const Stride& st, int64_t end, int64_t units, int64_t channels, F&& f) {
    while (w.s < end) {
        Walk b[kUnroll];
        int n = 0;
        PYBN_UNROLL
        for (int j = 0; j < kUnroll; ++j) {
            b[j] = w;
            if (w.s < end) {
                ++n;
                advance(w, st, units, channels);
            }
        }
        f(b, n);
    }
}

// ---- reductions ------------------------------------------------------------------------------
// inner > 1 ("rows"): a channel's values are outer rows of inner values = outer x units units;
//   block (c, k) = blockIdx.x (k fastest) reduces units [k * per_chunk, (k + 1) * per_chunk) of
//   channel c, thread t taking every kThreads-th unit from k * per_chunk + t (long rows split).
// inner == 1 ("cols", channels-last): block (tile, k) = (blockIdx.x, blockIdx.y) is tx x ty
//   threads: tx consecutive channel units (vec channels each) of the tile times ty rows, rows
//   [k * per_chunk, (k + 1) * per_chunk) of the chunk; when the channels are few (units < 32),
//   tx shrinks and the block packs more rows.
// Stage 2 merges a channel's `chunks` partials in a fixed order: in the last block of the
// channel (rows) or of the tile (cols) to finish, found with a ticket counter (fused), or, when
// that block would merge more than kFusedMerges partials a thread, in a second kernel with a
// block per channel.
struct ReducePlan {
    bool cols = false, fused = false;
    int vec = 1, tx = 1, ty = 1, tx_shift = 0;
    int64_t units = 0, per_chunk = 1, chunks = 0, grid_x = 0, grid_y = 0, tickets = 0;
    FastDivmod by_units, by_chunks;
    Stride step{};
};

inline int64_t floor_pow2(int64_t n) {
    int64_t p = 1;
    while (p * 2 <= n) p *= 2;
    return p;
}
// Values one reduction block covers: a full wave's share of the tensor, within [1024, 16384].
inline int64_t values_per_block(int64_t total) {
    const int64_t share = floor_pow2(total / kWaveBlocks > 1 ? total / kWaveBlocks : 1);
    return share < kMinValuesPerBlock ? kMinValuesPerBlock : (share > kMaxValuesPerBlock ? kMaxValuesPerBlock : share);
}

// vec: values per unit (1 or the dtype's vector width; cols plans keep at most kColsMaxVec).
inline ReducePlan plan_reduce(const pybn_view& v, int vec = 1) {
    ReducePlan p;
    p.cols = v.inner == 1;
    if (v.outer == 0 || v.inner == 0 || v.channels == 0) return p;  // chunks == 0: nothing to reduce
    const int64_t total = v.outer * v.channels * v.inner, vpb = values_per_block(total);
    if (!p.cols) {
        p.vec = vec >= 1 && v.inner % vec == 0 ? vec : 1;
        p.units = v.inner / p.vec;
        p.per_chunk = vpb / p.vec;
        p.chunks = ceil_div(v.outer * p.units, p.per_chunk);
        p.grid_x = v.channels * p.chunks;
        p.grid_y = 1;
        p.fused = p.chunks <= kThreads * kFusedMerges;
        p.tickets = p.fused && p.chunks > 1 ? v.channels : 0;
        p.by_units = FastDivmod::make(p.units);
        p.by_chunks = FastDivmod::make(p.chunks);
        p.step = make_stride(kThreads, p.units, 1);
        return p;
    }
    const int cv = vec < kColsMaxVec ? vec : kColsMaxVec;
    p.vec = cv >= 1 && v.channels % cv == 0 ? cv : 1;
    p.units = v.channels / p.vec;
    while (p.tx < 32 && p.tx < p.units) p.tx *= 2, ++p.tx_shift;
    p.ty = kThreads / p.tx;
    const int64_t tile = int64_t(p.tx) * p.vec;  // channels of a tile
    p.per_chunk = vpb / tile > p.ty ? vpb / tile : p.ty;
    if (ceil_div(v.outer, p.per_chunk) > kMaxGridY) p.per_chunk = ceil_div(v.outer, kMaxGridY);
    p.chunks = ceil_div(v.outer, p.per_chunk);
    p.grid_x = ceil_div(p.units, p.tx);
    p.grid_y = p.chunks;
    p.fused = ceil_div(p.chunks, kThreads / tile) <= kFusedMerges;
    p.tickets = p.fused && p.chunks > 1 ? p.grid_x : 0;
    return p;
}

// The rows a thread (row-thread ty of chunk k) of a channels-last block reduces, kUnroll at a
// time: f(rows, n).
template <class F> PYBN_HD void cols_rows(const ReducePlan& p, int64_t outer, int64_t k, int ty, F&& f) {
    const int64_t r0 = k * p.per_chunk, r1 = r0 + p.per_chunk < outer ? r0 + p.per_chunk : outer;
    for (int64_t o = r0 + ty; o < r1; o += int64_t(p.ty) * kUnroll) {
        int64_t rows[kUnroll];
        int n = 0;
        PYBN_UNROLL
        for (int j = 0; j < kUnroll; ++j) {
            rows[j] = o + int64_t(j) * p.ty;
            if (rows[j] < r1) ++n;
        }
        f(rows, n);
    }
}

// Whether a reduction plan fits CUDA's grid limits (checked before any launch).
inline bool plan_fits(const ReducePlan& p) {
    return p.grid_x <= kMaxGridX && p.grid_y <= kMaxGridY && p.chunks < (int64_t(1) << 31);
}
// Blocks the plan launches (stage 1).
inline int64_t plan_blocks(const ReducePlan& p) { return p.grid_x * p.grid_y; }
// Stage-1 partials: one per (channel, chunk).
inline int64_t plan_parts(const pybn_view& v, const ReducePlan& p) { return v.channels * p.chunks; }

// ---- the elementwise sweep ----------------------------------------------------------------
// The tensor as rows x units units: inner > 1: outer x channels rows of inner values (a row's
// channel is row % channels); channels-last: outer rows of channels values (a unit's first
// channel is unit * vec). A grid-stride walk, kUnroll units a thread per batch; at least a wave
// of blocks (fewer units a thread) where the tensor allows.
struct ElementwisePlan {
    bool cols = false;
    int vec = 1;
    int64_t units = 0, rowlen = 0, total = 0, blocks = 0;
    FastDivmod by_units, by_channels;
    Stride step{};
};

inline ElementwisePlan plan_elementwise(const pybn_view& v, int vec = 1) {
    ElementwisePlan p;
    p.cols = v.inner == 1;
    if (v.outer == 0 || v.channels == 0 || v.inner == 0) return p;
    p.rowlen = p.cols ? v.channels : v.inner;
    p.vec = vec >= 1 && p.rowlen % vec == 0 ? vec : 1;
    p.units = p.rowlen / p.vec;
    const int64_t rows = p.cols ? v.outer : v.outer * v.channels;
    p.total = rows * p.units;
    int64_t blocks = ceil_div(p.total, int64_t(kThreads) * kUnroll);
    if (blocks < kWaveBlocks) {
        const int64_t one_each = ceil_div(p.total, kThreads);
        blocks = one_each < kWaveBlocks ? one_each : kWaveBlocks;
    }
    p.blocks = blocks < kElementwiseBlocks ? blocks : kElementwiseBlocks;
    p.by_units = FastDivmod::make(p.units);
    p.by_channels = FastDivmod::make(p.cols ? 1 : v.channels);
    p.step = make_stride(p.blocks * kThreads, p.units, p.cols ? 1 : v.channels);
    return p;
}

// One thread per channel (the per-channel steps between sweeps).
inline int64_t per_channel_blocks(int64_t channels) { return ceil_div(channels, kThreads); }

}  // namespace pybn::cuda
