// The CUDA kernels of every op file and how they are launched, with no CUDA runtime call: dtypes,
// 16-byte units, the deterministic per-channel reduction skeleton (rows and channels-last,
// stage 2 in the last block or in its own kernel), the elementwise walk, the two sweeps and the
// two reducers, and reduce_launches / elementwise_launches, which pick the kernels of a plan and
// queue them through a launcher (common.cuh: <<<>>> on a stream). tests/c/cuda_emulate.cpp
// compiles this file with a host compiler (PYBN_CUDA_EMULATION: a block's threads are fibers,
// __syncthreads a switch) and runs the kernels on the CPU against float64 references.
#pragma once

#if !defined(PYBN_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "formulas.hpp"
#include "numerics.hpp"
#include "plan.hpp"
#include "pybn/pybn.h"

namespace pybn::cuda {

constexpr int kChunk = 64;        // values of one thread sharing a shift (as on the CPU)

// ---- dtypes (the table is numerics.hpp's) -------------------------------------------------------
template <int32_t D> struct DeviceStorage;
template <> struct DeviceStorage<PYBN_FLOAT32> { using type = float; };
template <> struct DeviceStorage<PYBN_FLOAT64> { using type = double; };
template <> struct DeviceStorage<PYBN_FLOAT16> { using type = __half; };
template <> struct DeviceStorage<PYBN_BFLOAT16> { using type = __nv_bfloat16; };

__device__ inline float load(float v) { return v; }
__device__ inline double load(double v) { return v; }
__device__ inline float load(__half v) { return __half2float(v); }
__device__ inline float load(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ inline T store(acc_t<T> v) {
    if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
    else return v;
}

// ---- vectors -------------------------------------------------------------------------------
// V consecutive values moved as one 16-byte (or 8-byte) access; V == 1: a scalar access.
template <class T, int V> struct alignas(sizeof(T) * V) Vec {
    T v[V];
};
template <int V, class T> __device__ inline Vec<T, V> load_vec(const T* p) {
    return *reinterpret_cast<const Vec<T, V>*>(p);
}
template <int V, class T> __device__ inline void store_vec(T* p, const Vec<T, V>& a) {
    *reinterpret_cast<Vec<T, V>*>(p) = a;
}

template <class T> constexpr int kVec = int(16 / sizeof(T));  // values of a 16-byte access
template <class T> constexpr int kColsVec = kVec<T> < kColsMaxVec ? kVec<T> : kColsMaxVec;

// The unit size of a call: the dtype's vector width when every pointer is 16-byte aligned and the
// contiguous run (inner, or the channels when inner == 1) is a multiple of it; else 1.
template <class T> int vec_width(const pybn_view& v, std::initializer_list<const void*> ptrs) {
    const int64_t run = v.inner == 1 ? v.channels : v.inner;
    if (run % kVec<T> != 0) return 1;
    for (const void* p : ptrs)
        if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
    return kVec<T>;
}

// f(std::integral_constant<int, V>) for V == vec, vec in {1, Max}.
template <int Max, class F> void with_vec(int vec, F&& f) {
    if (Max > 1 && vec == Max) f(std::integral_constant<int, Max>{});
    else f(std::integral_constant<int, 1>{});
}

// Resident blocks per SM each kernel is compiled for, chosen so that ptxas spills nothing (the
// tests check it): 2 (128 registers a thread), or 1 where the accumulators are wider (16-bit
// units of 8 values, whose values widen to float; channels-last statistics, 4 Moments a thread).
// With kUnroll 16-byte loads a thread that keeps 16-32 KB of loads in flight per SM, about the
// ~20 KB that H200's bandwidth-latency product asks of each of its 132 SMs (bench/NOTES.md).
template <int V> constexpr int kBlocksPerSM = V >= 8 ? 1 : 2;
template <class R, int V> constexpr int kColsBlocksPerSM = sizeof(typename R::Part) > 24 && V >= 4 ? 1 : kBlocksPerSM<V>;

// ---- per-channel reduction skeleton ---------------------------------------------------------
// Stage 1 (reduce_rows / reduce_cols, plan.hpp) reduces a block's share of a channel to one
// partial; stage 2 merges a channel's partials in a fixed order (thread t takes t, t + lanes,
// ..., then a fixed tree) and hands the result to an epilogue, in the last block to finish
// (a ticket) or in reduce_finish. The partition depends only on the shape and every merge order
// is fixed, so results are bitwise identical from run to run (the ticket only picks which block
// does the merge, not its order).
//
// A Reducer R provides: Value (the element type), Part (a merge-able partial, default-
// constructible as the identity), static merge(Part&, const Part&), Inputs, Unit<V> (the values
// of one unit, from static fetch<V>(Inputs, element_index)), and Thread, a per-thread
// accumulator with init(Inputs, channel), add(Unit<V>, lane) and part().

// Shared-memory array of N partials (raw storage: __shared__ variables cannot have constructors).
#define PYBN_SHARED_PARTS(R, name, N)                                                 \
    alignas(16) __shared__ unsigned char name##_storage[sizeof(typename R::Part) * (N)]; \
    typename R::Part* name = reinterpret_cast<typename R::Part*>(name##_storage)

template <class R>
__device__ void block_merge(typename R::Part* sh, typename R::Part mine, int tid, int nthreads) {
    sh[tid] = mine;
    __syncthreads();
    for (int stride = nthreads / 2; stride > 0; stride >>= 1) {
        if (tid < stride) R::merge(sh[tid], sh[tid + stride]);
        __syncthreads();
    }
}

// A partial written by another block of the same launch, read from L2 (not a stale L1 line).
template <class P> __device__ P load_part(const P* p) {
    static_assert(sizeof(P) % sizeof(double) == 0, "partials are made of doubles");
    P out;
    const double* src = reinterpret_cast<const double*>(p);
    double* dst = reinterpret_cast<double*>(&out);
    PYBN_UNROLL
    for (int i = 0; i < int(sizeof(P) / sizeof(double)); ++i) dst[i] = __ldcg(src + i);
    return out;
}

// Whether this block is the last of `blocks` to finish (its partials written before the ticket).
__device__ inline bool last_block(unsigned* ticket, unsigned blocks) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == blocks - 1;
    __syncthreads();
    if (last) __threadfence();
    return last != 0;
}

// Stage 2 of one channel by the whole block: partials [0, chunks) of parts, in a fixed order.
template <class R, bool FromL2, class Epilogue>
__device__ void finish_channel(const typename R::Part* parts, int64_t chunks, typename R::Part* sh, int64_t c,
                               const Epilogue& epilogue) {
    typename R::Part mine{};
    for (int64_t k = threadIdx.x; k < chunks; k += kThreads) {
        if constexpr (FromL2) R::merge(mine, load_part(parts + k));
        else R::merge(mine, parts[k]);
    }
    block_merge<R>(sh, mine, threadIdx.x, kThreads);
    if (threadIdx.x == 0) epilogue(c, sh[0]);
}

// inner > 1: block (c, k) reduces units [k * per_chunk, ...) of channel c (plan.hpp).
template <class R, int V, class Epilogue>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM<V>)
    reduce_rows(pybn_view v, ReducePlan p, typename R::Inputs in, typename R::Part* parts, unsigned* tickets,
                Epilogue epilogue) {
    using Part = typename R::Part;
    PYBN_SHARED_PARTS(R, sh, kThreads);
    int64_t c, k;
    p.by_chunks.divmod(blockIdx.x, c, k);
    const int64_t n = v.outer * p.units, begin = k * p.per_chunk;
    const int64_t end = begin + p.per_chunk < n ? begin + p.per_chunk : n;
    typename R::Thread t;
    t.init(in, c);
    walk_batches(start_walk(begin + threadIdx.x, p.by_units, FastDivmod{}), p.step, end, p.units, 1,
                 [&](const Walk* b, int count) {
                     typename R::template Unit<V> u[kUnroll];
                     PYBN_UNROLL
                     for (int j = 0; j < kUnroll; ++j)
                         if (j < count)
                             u[j] = R::template fetch<V>(in, (b[j].row * v.channels + c) * v.inner + b[j].u * V);
                     PYBN_UNROLL
                     for (int j = 0; j < kUnroll; ++j)
                         if (j < count) {
                             PYBN_UNROLL
                             for (int l = 0; l < V; ++l) t.add(u[j], l);
                         }
                 });
    block_merge<R>(sh, t.part(), threadIdx.x, kThreads);
    if (p.fused && p.chunks == 1) {  // the only block of its channel: stage 2 is one merge
        if (threadIdx.x == 0) {
            Part m{};
            R::merge(m, sh[0]);
            epilogue(c, m);
        }
        return;
    }
    if (threadIdx.x == 0) parts[c * p.chunks + k] = sh[0];
    if (!p.fused || !last_block(tickets + c, unsigned(p.chunks))) return;
    finish_channel<R, true>(parts + c * p.chunks, p.chunks, sh, c, epilogue);
}

// inner == 1: block (tile, k): tx channel units x ty rows (plan.hpp); V accumulators a thread.
template <class R, int V, class Epilogue>
__global__ void __launch_bounds__(kThreads, (kColsBlocksPerSM<R, V>))
    reduce_cols(pybn_view v, ReducePlan p, typename R::Inputs in, typename R::Part* parts, unsigned* tickets,
                Epilogue epilogue) {
    using Part = typename R::Part;
    PYBN_SHARED_PARTS(R, sh, V * kThreads);  // [lane][thread]
    const int tid = threadIdx.x, tx = tid & (p.tx - 1), ty = tid >> p.tx_shift;
    const int64_t cu = int64_t(blockIdx.x) * p.tx + tx, c0 = cu * V, k = blockIdx.y;
    const bool active = cu < p.units;
    typename R::Thread t[V];
    if (active) {
        PYBN_UNROLL
        for (int l = 0; l < V; ++l) t[l].init(in, c0 + l);
        cols_rows(p, v.outer, k, ty, [&](const int64_t* rows, int count) {
            typename R::template Unit<V> u[kUnroll];
            PYBN_UNROLL
            for (int j = 0; j < kUnroll; ++j)
                if (j < count) u[j] = R::template fetch<V>(in, rows[j] * v.channels + c0);
            PYBN_UNROLL
            for (int j = 0; j < kUnroll; ++j)
                if (j < count) {
                    PYBN_UNROLL
                    for (int l = 0; l < V; ++l) t[l].add(u[j], l);
                }
        });
    }
    PYBN_UNROLL
    for (int l = 0; l < V; ++l) sh[l * kThreads + tid] = active ? t[l].part() : Part{};
    __syncthreads();
    for (int stride = p.ty / 2; stride > 0; stride >>= 1) {  // merge the row-threads of each unit
        if (ty < stride) {
            PYBN_UNROLL
            for (int l = 0; l < V; ++l) R::merge(sh[l * kThreads + tid], sh[l * kThreads + tid + stride * p.tx]);
        }
        __syncthreads();
    }
    if (ty == 0 && active) {
        PYBN_UNROLL
        for (int l = 0; l < V; ++l) {
            if (p.fused && p.chunks == 1) {  // the only block of its tile: stage 2 is one merge
                Part m{};
                R::merge(m, sh[l * kThreads + tx]);
                epilogue(c0 + l, m);
            } else {
                parts[(c0 + l) * p.chunks + k] = sh[l * kThreads + tx];
            }
        }
    }
    if (!p.fused || p.chunks == 1 || !last_block(tickets + blockIdx.x, unsigned(p.chunks))) return;
    // The last block of the tile merges its channels: channel j of the tile by `lanes` threads.
    const int tile_shift = p.tx_shift + (V == 4 ? 2 : V == 2 ? 1 : 0), tile = 1 << tile_shift;
    const int j = tid & (tile - 1), g = tid >> tile_shift, lanes = kThreads >> tile_shift;
    const int64_t c = int64_t(blockIdx.x) * tile + j;
    Part mine{};
    if (c < v.channels)
        for (int64_t kk = g; kk < p.chunks; kk += lanes) R::merge(mine, load_part(parts + c * p.chunks + kk));
    sh[tid] = mine;
    __syncthreads();
    for (int stride = lanes / 2; stride > 0; stride >>= 1) {
        if (g < stride) R::merge(sh[tid], sh[tid + stride * tile]);
        __syncthreads();
    }
    if (g == 0 && c < v.channels) epilogue(c, sh[tid]);
}

// Stage 2 as its own kernel: a block per channel.
template <class R, class Epilogue>
__global__ void __launch_bounds__(kThreads)
    reduce_finish(const typename R::Part* parts, int64_t chunks, Epilogue epilogue) {
    PYBN_SHARED_PARTS(R, sh, kThreads);
    finish_channel<R, false>(parts + int64_t(blockIdx.x) * chunks, chunks, sh, blockIdx.x, epilogue);
}

// ---- launches -------------------------------------------------------------------------------
// A grid of kThreads-thread blocks; launch(grid, kernel, args...) queues one kernel (CUDA: <<<>>>
// on the call's stream, common.cuh; the emulator: CPU threads), zero(tickets, bytes) clears the
// ticket counters and returns whether it could.
struct Grid {
    unsigned x, y;
};

// The launches of one reduction with plan p (plan_fits(p) checked): the tickets zeroed, stage 1
// (the kernel of the plan's layout and unit), and stage 2 in its own kernel when not fused.
// false: zero() failed, nothing was launched.
template <class R, class Epilogue, class Launch, class Zero>
bool reduce_launches(const pybn_view& v, const ReducePlan& p, const typename R::Inputs& in, typename R::Part* parts,
                     unsigned* tickets, const Epilogue& epilogue, const Launch& launch, Zero&& zero) {
    using T = typename R::Value;
    if (p.chunks > 0) {
        if (p.tickets > 0 && !zero(tickets, sizeof(unsigned) * size_t(p.tickets))) return false;
        if (p.cols)
            with_vec<kColsVec<T>>(p.vec, [&](auto V) {
                launch(Grid{unsigned(p.grid_x), unsigned(p.grid_y)}, reduce_cols<R, decltype(V)::value, Epilogue>, v,
                       p, in, parts, tickets, epilogue);
            });
        else
            with_vec<kVec<T>>(p.vec, [&](auto V) {
                launch(Grid{unsigned(p.grid_x), 1u}, reduce_rows<R, decltype(V)::value, Epilogue>, v, p, in, parts,
                       tickets, epilogue);
            });
    }
    if (!p.fused) launch(Grid{unsigned(v.channels), 1u}, reduce_finish<R, Epilogue>, parts, p.chunks, epilogue);
    return true;
}

// The four coefficient arrays [k0 | k1 | k2 | k3] (C each) at a unit: f(lane, k0, k1, k2, k3)
// for each of its V lanes. Cols: lane l is channel c + l (the coefficients loaded as vectors);
// else every lane is channel c.
template <int V, bool Cols, class A, class F>
__device__ inline void for_lanes(const A* coef, int64_t C, int64_t c, F&& f) {
    if constexpr (Cols) {
        const Vec<A, V> k0 = load_vec<V>(coef + c), k1 = load_vec<V>(coef + C + c);
        const Vec<A, V> k2 = load_vec<V>(coef + 2 * C + c), k3 = load_vec<V>(coef + 3 * C + c);
        PYBN_UNROLL
        for (int l = 0; l < V; ++l) f(l, k0.v[l], k1.v[l], k2.v[l], k3.v[l]);
    } else {
        const A k0 = coef[c], k1 = coef[C + c], k2 = coef[2 * C + c], k3 = coef[3 * C + c];
        PYBN_UNROLL
        for (int l = 0; l < V; ++l) f(l, k0, k1, k2, k3);
    }
}

// ---- elementwise -------------------------------------------------------------------------------
// An elementwise Op provides Unit<V>, fetch<V>(element_index) (the loads) and
// put<V, Cols>(element_index, channel, unit) (the arithmetic and stores; channel: the unit's
// channel, or with Cols its first channel, the unit's values being consecutive channels).
template <int V, bool Cols, class Op>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM<V>) elementwise(ElementwisePlan p, int64_t channels, Op op) {
    const Walk w = start_walk(int64_t(blockIdx.x) * kThreads + threadIdx.x, p.by_units, p.by_channels);
    walk_batches(w, p.step, p.total, p.units, Cols ? 1 : channels, [&](const Walk* b, int count) {
        typename Op::template Unit<V> u[kUnroll];
        PYBN_UNROLL
        for (int j = 0; j < kUnroll; ++j)
            if (j < count) u[j] = op.template fetch<V>(b[j].row * p.rowlen + b[j].u * V);
        PYBN_UNROLL
        for (int j = 0; j < kUnroll; ++j)
            if (j < count) op.template put<V, Cols>(b[j].row * p.rowlen + b[j].u * V, Cols ? b[j].u * V : b[j].c, u[j]);
    });
}

// The elementwise sweep of a view: one launch, of the plan's layout and unit.
template <class T, class Op, class Launch>
void elementwise_launches(const pybn_view& v, int vec, const Op& op, const Launch& launch) {
    const ElementwisePlan p = plan_elementwise(v, vec);
    if (p.blocks == 0) return;
    with_vec<kVec<T>>(p.vec, [&](auto V) {
        constexpr int W = decltype(V)::value;
        if (p.cols) launch(Grid{unsigned(p.blocks), 1u}, elementwise<W, true, Op>, p, v.channels, op);
        else launch(Grid{unsigned(p.blocks), 1u}, elementwise<W, false, Op>, p, v.channels, op);
    });
}

// ---- the two sweeps ------------------------------------------------------------------------

// y = activation(((x - hi) - lo) * scale + shift + z), coef = [hi | lo | scale | shift] (see
// formulas.hpp); z: the residual, or nullptr; relu: max(0, v) with NaN kept (as on the CPU).
template <class T> struct NormalizeOp {
    using A = acc_t<T>;
    const T* x;
    T* y;
    const A* coef;
    int64_t C;
    const T* z;
    bool relu;
    template <int V> struct Unit { Vec<T, V> x, z; };
    template <int V> __device__ Unit<V> fetch(int64_t e) const {
        Unit<V> u;
        u.x = load_vec<V>(x + e);
        if (z) u.z = load_vec<V>(z + e);
        return u;
    }
    template <int V, bool Cols> __device__ void put(int64_t e, int64_t c, const Unit<V>& u) const {
        Vec<T, V> out;
        for_lanes<V, Cols>(coef, C, c, [&](int l, A hi, A lo, A sc, A sh) { out.v[l] = value(u, l, hi, lo, sc, sh); });
        store_vec<V>(y + e, out);
    }
    template <int V> __device__ T value(const Unit<V>& u, int l, A hi, A lo, A sc, A sh) const {
        A v = ((load(u.x.v[l]) - hi) - lo) * sc + sh;
        if (z) v = v + load(u.z.v[l]);
        if (relu && v < A(0)) v = A(0);
        return store<T>(v);
    }
};

// dx = a * g + b * (x - mean) + c, coef = [mean | a | b | c]; x == nullptr: dx = a * g. g = dy,
// masked by y > 0 behind a ReLU (y != nullptr); dres (may be null) receives g; dx may be null.
template <class T> struct BackwardOp {
    using A = acc_t<T>;
    const T *dy, *x;
    T* dx;
    const A* coef;
    int64_t C;
    const T* y;
    T* dres;
    template <int V> struct Unit { Vec<T, V> dy, x, y; };
    template <int V> __device__ Unit<V> fetch(int64_t e) const {
        Unit<V> u;
        u.dy = load_vec<V>(dy + e);
        if (x && dx) u.x = load_vec<V>(x + e);
        if (y) u.y = load_vec<V>(y + e);
        return u;
    }
    template <int V, bool Cols> __device__ void put(int64_t e, int64_t c, const Unit<V>& u) const {
        Vec<T, V> g, out;
        PYBN_UNROLL
        for (int l = 0; l < V; ++l) {
            A gl = load(u.dy.v[l]);
            if (y && !(load(u.y.v[l]) > A(0))) gl = A(0);
            g.v[l] = store<T>(gl);
        }
        if (dres) store_vec<V>(dres + e, g);
        if (!dx) return;
        for_lanes<V, Cols>(coef, C, c, [&](int l, A m, A a, A bb, A k) { out.v[l] = value(u, l, m, a, bb, k); });
        store_vec<V>(dx + e, out);
    }
    template <int V> __device__ T value(const Unit<V>& u, int l, A m, A a, A b, A k) const {
        A g = load(u.dy.v[l]);
        if (y && !(load(u.y.v[l]) > A(0))) g = A(0);
        const A ag = a * g;
        return store<T>(x ? ag + b * (load(u.x.v[l]) - m) + k : ag);
    }
};

// ---- reducers ---------------------------------------------------------------------------------
// Batch statistics: shifted float32 runs of kDepth, blocks of kChunk values per thread with their
// own shift, merged as pybn::Moments (as on the CPU).
template <class T> struct StatsReducer {
    using Value = T;
    using A = acc_t<T>;
    using Part = Moments;
    struct Inputs { const T* x; };
    template <int V> struct Unit { Vec<T, V> x; };
    template <int V> __device__ static Unit<V> fetch(const Inputs& in, int64_t e) { return {load_vec<V>(in.x + e)}; }
    __device__ static void merge(Part& a, const Part& b) { a.merge(b); }
    struct Thread {
        Moments m{};
        A shift = 0, s = 0, q = 0;
        double ss = 0, qq = 0;
        int cnt = 0, depth = 0;
        __device__ void init(const Inputs&, int64_t) {}
        __device__ void flush_run() {
            ss += double(s);
            qq += double(q);
            s = q = 0;
            depth = 0;
        }
        template <int V> __device__ void add(const Unit<V>& u, int lane) {
            const A val = load(u.x.v[lane]);
            if (cnt == 0) shift = val;
            const A d = val - shift;
            s += d;
            q += d * d;
            if (++depth == kDepth) flush_run();
            if (++cnt == kChunk) close_chunk();
        }
        __device__ void close_chunk() {
            flush_run();
            if (cnt > 0) m.merge_shifted(double(cnt), double(shift), ss, qq);
            ss = qq = 0;
            cnt = 0;
        }
        __device__ Part part() {
            close_chunk();
            return m;
        }
    };
};

// Backward sums (pybn::Sums): float32 runs of kDepth, then float64.
template <class T> struct SumsReducer {
    using Value = T;
    using A = acc_t<T>;
    using Part = Sums;
    struct Inputs { const T* dy; const T* x; const A* mean; const T* y = nullptr; };  // y: ReLU mask
    template <int V> struct Unit { Vec<T, V> dy, x, y; };
    template <int V> __device__ static Unit<V> fetch(const Inputs& in, int64_t e) {
        Unit<V> u;
        u.dy = load_vec<V>(in.dy + e);
        u.x = load_vec<V>(in.x + e);
        if (in.y) u.y = load_vec<V>(in.y + e);
        return u;
    }
    __device__ static void merge(Part& a, const Part& b) { a.merge(b); }
    struct Thread {
        A m = 0, s0 = 0, s1 = 0, s2 = 0;
        Sums total{};
        int depth = 0;
        bool masked = false;
        __device__ void init(const Inputs& in, int64_t c) {
            m = in.mean[c];
            masked = in.y != nullptr;
        }
        __device__ void flush() {
            total.dy += double(s0);
            total.dy_xmu += double(s1);
            total.xmu += double(s2);
            s0 = s1 = s2 = 0;
            depth = 0;
        }
        template <int V> __device__ void add(const Unit<V>& u, int lane) {
            A g = load(u.dy.v[lane]);
            if (masked && !(load(u.y.v[lane]) > A(0))) g = A(0);  // behind a ReLU: the masked gradient
            const A d = load(u.x.v[lane]) - m;
            s0 += g;
            s1 += g * d;
            s2 += d;
            if (++depth == kDepth) flush();
        }
        __device__ Part part() {
            flush();
            return total;
        }
    };
};

}  // namespace pybn::cuda
