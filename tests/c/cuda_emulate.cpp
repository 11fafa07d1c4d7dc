// The CUDA kernels (cuda/kernels.cuh) run on the CPU: no GPU, no CUDA header. A few shims make
// the device code plain C++ (PYBN_CUDA_EMULATION): every block runs its 256 threads as fibers
// that switch at each __syncthreads (a barrier phase ends when all have reached it),
// __shared__ variables are statics (blocks run one after another), atomics are the CPU's. The launches go through the same
// reduce_launches / elementwise_launches the library uses, so the plans, the kernels chosen, the
// 16-byte units, the walks, the block merges, the ticket of the fused stage 2 and the separate
// finish kernel all run as on a GPU (in a different interleaving: this checks the logic, not the
// memory model).
//
// Checked against float64 references, for a table of shapes that takes every branch of the plans,
// every dtype, aligned and misaligned data: the batch statistics (count, mean, M2), the backward
// sums (with and without the ReLU mask), the elementwise walk (each unit gets its channel) and
// the library's forward and backward sweeps (residual, ReLU, dresidual, inference) value by value.
// Prints "<checks> checks, <failures> failures"; exit status 1 on any failure.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <ucontext.h>
#include <vector>

#include "dtype.hpp"

// ---- shims ---------------------------------------------------------------------------------------
#define PYBN_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

struct EmuIndex {
    unsigned x = 0, y = 0, z = 0;
};
inline EmuIndex threadIdx, blockIdx;  // of the fiber running now (EmuLauncher)
inline void emu_sync();
inline void __syncthreads() { emu_sync(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T __ldcg(const T* p) {
    T v;
    __atomic_load(p, &v, __ATOMIC_SEQ_CST);
    return v;
}

// 16-bit types with the library's own conversions (dtype.hpp)
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) { return pybn::to_float(pybn::half_t{h.bits}); }
inline __half __float2half_rn(float f) { return {pybn::to_half(f).bits}; }
inline float __bfloat162float(__nv_bfloat16 h) { return pybn::to_float(pybn::bfloat16_t{h.bits}); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {pybn::to_bfloat16(f).bits}; }

#include "kernels.cuh"

using namespace pybn;
using namespace pybn::cuda;

// A block's kThreads threads as fibers (ucontext) on one CPU thread: each runs until its
// __syncthreads or its end, then the next; a barrier phase ends when every thread has reached it.
// A thread that ends while others wait at a barrier is a kernel bug (a non-uniform return before
// a __syncthreads): reported as a failure.
struct EmuBlock {
    ucontext_t main_ctx;
    std::vector<ucontext_t> ctx = std::vector<ucontext_t>(kThreads);
    std::vector<std::vector<char>> stacks;
    std::vector<int> state = std::vector<int>(kThreads, 0);  // 0 runnable, 1 at a barrier, 2 done
    int current = 0;
    const std::function<void()>* job = nullptr;
    bool diverged = false;
};
inline EmuBlock* emu_block = nullptr;

inline void emu_sync() {
    EmuBlock& b = *emu_block;
    b.state[size_t(b.current)] = 1;
    swapcontext(&b.ctx[size_t(b.current)], &b.main_ctx);
}
inline void emu_entry() {
    EmuBlock& b = *emu_block;
    (*b.job)();
    b.state[size_t(b.current)] = 2;
    swapcontext(&b.ctx[size_t(b.current)], &b.main_ctx);
}

static long emu_divergent_blocks = 0;

// Every block of the grid, one after another.
struct EmuLauncher {
    template <class... P, class... A> void operator()(Grid g, void (*kernel)(P...), A&&... args) const {
        const std::function<void()> job = [&] { kernel(args...); };
        static EmuBlock b;
        if (b.stacks.empty())
            for (int t = 0; t < kThreads; ++t) b.stacks.emplace_back(size_t(256) * 1024);
        emu_block = &b;
        b.job = &job;
        for (unsigned by = 0; by < g.y; ++by)
            for (unsigned bx = 0; bx < g.x; ++bx) {
                blockIdx = {bx, by, 0};
                for (int t = 0; t < kThreads; ++t) {
                    getcontext(&b.ctx[size_t(t)]);
                    b.ctx[size_t(t)].uc_stack.ss_sp = b.stacks[size_t(t)].data();
                    b.ctx[size_t(t)].uc_stack.ss_size = b.stacks[size_t(t)].size();
                    b.ctx[size_t(t)].uc_link = nullptr;
                    makecontext(&b.ctx[size_t(t)], emu_entry, 0);
                    b.state[size_t(t)] = 0;
                }
                for (;;) {  // one barrier phase per pass
                    for (int t = 0; t < kThreads; ++t) {
                        if (b.state[size_t(t)] != 0) continue;
                        b.current = t;
                        threadIdx = {unsigned(t), 0, 0};
                        swapcontext(&b.main_ctx, &b.ctx[size_t(t)]);
                    }
                    int waiting = 0, done = 0;
                    for (int t = 0; t < kThreads; ++t) waiting += b.state[size_t(t)] == 1, done += b.state[size_t(t)] == 2;
                    if (done == kThreads) break;
                    if (done > 0) {  // some ended, others wait at a barrier: a divergent __syncthreads
                        ++emu_divergent_blocks;
                        break;
                    }
                    for (int t = 0; t < kThreads; ++t) b.state[size_t(t)] = 0;  // the barrier opens
                    (void)waiting;
                }
            }
    }
};
static bool emu_zero(unsigned* p, size_t bytes) {
    std::memset(p, 0, bytes);
    return true;
}

static long checks = 0, failures = 0;
static void expect(bool ok, const char* what, const pybn_view& v, const char* dtype, int offset, const char* detail = "") {
    ++checks;
    if (!ok && ++failures < 40)
        std::printf("FAIL %s: view (%lld, %lld, %lld) %s offset %d %s\n", what, (long long)v.outer,
                    (long long)v.channels, (long long)v.inner, dtype, offset, detail);
}

template <class T> T to_t(double d) {
    if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(d));
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(d));
    else return T(d);
}
template <class T> double from_t(T v) { return double(cuda::load(v)); }

struct StatsStore {
    double *count, *mean, *m2;
    void operator()(int64_t c, const Moments& m) const {
        count[c] = m.n;
        mean[c] = m.mean();
        m2[c] = m.m2;
    }
};
struct SumsStore {
    double *dy, *dy_xmu, *xmu;
    void operator()(int64_t c, const Sums& s) const {
        dy[c] = s.dy;
        dy_xmu[c] = s.dy_xmu;
        xmu[c] = s.xmu;
    }
};
// y = x * (channel + 1): each unit must reach its own channel
template <class T> struct ChannelScale {
    const T* x;
    T* y;
    template <int V> struct Unit { Vec<T, V> x; };
    template <int V> Unit<V> fetch(int64_t e) const { return {load_vec<V>(x + e)}; }
    template <int V, bool Cols> void put(int64_t e, int64_t c, const Unit<V>& u) const {
        Vec<T, V> out;
        for (int l = 0; l < V; ++l)
            out.v[l] = cuda::store<T>(cuda::load(u.x.v[l]) * acc_t<T>((Cols ? c + l : c) + 1));
        store_vec<V>(y + e, out);
    }
};

static bool close(double got, double want, double rtol, double atol) {
    return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

template <class T> void run_case(const pybn_view& v, int offset, const char* name, std::mt19937_64& rng) {
    const int64_t C = v.channels, n = v.outer * C * v.inner;
    // 16-byte aligned buffers, the data `offset` values in (offset 1: misaligned, scalar units)
    std::vector<T, std::allocator<T>> xs(size_t(n + 16)), dys(size_t(n + 16)), ys(size_t(n + 16));
    auto aligned = [&](std::vector<T>& b) {
        uintptr_t p = reinterpret_cast<uintptr_t>(b.data());
        T* a = reinterpret_cast<T*>((p + 15) / 16 * 16);
        return a + offset;
    };
    T *x = aligned(xs), *dy = aligned(dys), *y = aligned(ys);
    std::normal_distribution<double> nd(0.0, 1.0);
    for (int64_t e = 0; e < n; ++e) {
        x[e] = to_t<T>(3.0 + 2.0 * nd(rng));
        dy[e] = to_t<T>(nd(rng));
        y[e] = to_t<T>(nd(rng));  // the ReLU mask: y > 0
    }
    const int vec = vec_width<T>(v, {x, dy, y});
    const double rtol = std::is_same_v<T, double> ? 1e-12 : 1e-6;

    // float64 references
    std::vector<double> cnt(size_t(C), 0), mean(size_t(C), 0), m2(size_t(C), 0), sdy(size_t(C), 0), sdx(size_t(C), 0),
        sxm(size_t(C), 0), mdy(size_t(C), 0), mdx(size_t(C), 0);
    auto each = [&](auto f) {
        for (int64_t o = 0; o < v.outer; ++o)
            for (int64_t c = 0; c < C; ++c)
                for (int64_t i = 0; i < v.inner; ++i) f(c, (o * C + c) * v.inner + i);
    };
    each([&](int64_t c, int64_t e) { cnt[size_t(c)] += 1, mean[size_t(c)] += from_t(x[e]); });
    for (int64_t c = 0; c < C; ++c) mean[size_t(c)] /= cnt[size_t(c)];
    std::vector<acc_t<T>> mean_acc(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) mean_acc[size_t(c)] = acc_t<T>(mean[size_t(c)]);
    each([&](int64_t c, int64_t e) {
        const double d = from_t(x[e]) - mean[size_t(c)], dm = from_t(x[e]) - double(mean_acc[size_t(c)]);
        const double g = from_t(dy[e]), gm = from_t(y[e]) > 0 ? g : 0.0;
        m2[size_t(c)] += d * d;
        sdy[size_t(c)] += g, sdx[size_t(c)] += g * dm, sxm[size_t(c)] += dm;
        mdy[size_t(c)] += gm, mdx[size_t(c)] += gm * dm;
    });

    const ReducePlan p = plan_reduce(v, vec);
    std::vector<Moments> parts(size_t(std::max<int64_t>(1, plan_parts(v, p))));
    std::vector<Sums> sparts(parts.size());
    std::vector<unsigned> tickets(size_t(C) + 1, 12345u);  // garbage: the launches zero them
    std::vector<double> gc(size_t(C), -1), gm(size_t(C), -1), gq(size_t(C), -1);
    reduce_launches<StatsReducer<T>>(v, p, {x}, parts.data(), tickets.data(), StatsStore{gc.data(), gm.data(), gq.data()},
                                     EmuLauncher{}, emu_zero);
    bool ok = true;
    for (int64_t c = 0; c < C; ++c)
        ok = ok && gc[size_t(c)] == cnt[size_t(c)] &&
             (cnt[size_t(c)] == 0 || (close(gm[size_t(c)], mean[size_t(c)], rtol, rtol) &&
                                      close(gq[size_t(c)], m2[size_t(c)], 10 * rtol, 10 * rtol * cnt[size_t(c)])));
    char detail[160];
    std::snprintf(detail, sizeof detail, "(vec %d, %s, chunks %lld, %s)", p.vec, p.cols ? "cols" : "rows",
                  (long long)p.chunks, p.fused ? "fused" : "separate finish");
    expect(ok, "batch statistics", v, name, offset, detail);
    if (std::getenv("PYBN_EMULATE_VERBOSE")) std::printf("case (%lld, %lld, %lld) %s offset %d %s\n", (long long)v.outer,
                                                         (long long)C, (long long)v.inner, name, offset, detail);

    for (bool relu : {false, true}) {
        std::vector<double> a(size_t(C), -1), b(size_t(C), -1), s(size_t(C), -1);
        const typename SumsReducer<T>::Inputs in{dy, x, mean_acc.data(), relu ? y : nullptr};
        reduce_launches<SumsReducer<T>>(v, p, in, sparts.data(), tickets.data(), SumsStore{a.data(), b.data(), s.data()},
                                        EmuLauncher{}, emu_zero);
        ok = true;
        for (int64_t c = 0; c < C; ++c) {
            const double scale = 1e-5 * cnt[size_t(c)];  // float32 runs: the sums' rounding
            ok = ok && close(a[size_t(c)], relu ? mdy[size_t(c)] : sdy[size_t(c)], rtol, scale) &&
                 close(b[size_t(c)], relu ? mdx[size_t(c)] : sdx[size_t(c)], rtol, 4 * scale) &&
                 close(s[size_t(c)], sxm[size_t(c)], rtol, 4 * scale);
        }
        expect(ok, relu ? "backward sums behind a ReLU" : "backward sums", v, name, offset, detail);
    }

    std::vector<T> outs(size_t(n + 16));
    T* out = aligned(outs);
    elementwise_launches<T>(v, vec_width<T>(v, {x, out}), ChannelScale<T>{x, out}, EmuLauncher{});
    ok = true;
    each([&](int64_t c, int64_t e) {
        const T want = cuda::store<T>(cuda::load(x[e]) * acc_t<T>(c + 1));
        ok = ok && std::memcmp(&out[e], &want, sizeof(T)) == 0;
    });
    expect(ok, "elementwise: every value with its channel", v, name, offset);

    // the library's two sweeps, with random coefficients, against the same formulas per value
    using A = acc_t<T>;
    std::vector<A> coef(size_t(4 * C + 4));
    std::uniform_real_distribution<double> ud(-2.0, 2.0);
    for (auto& k : coef) k = A(ud(rng));
    const int64_t C4 = C;
    auto k_of = [&](int j, int64_t c) { return coef[size_t(j * C4 + c)]; };
    for (int variant = 0; variant < 2; ++variant) {  // plain; with residual and ReLU
        const bool fused = variant == 1;
        const int vv = vec_width<T>(v, {x, out, fused ? dy : nullptr});
        elementwise_launches<T>(v, vv, NormalizeOp<T>{x, out, coef.data(), C, fused ? dy : nullptr, fused}, EmuLauncher{});
        ok = true;
        each([&](int64_t c, int64_t e) {
            A r = ((cuda::load(x[e]) - k_of(0, c)) - k_of(1, c)) * k_of(2, c) + k_of(3, c);
            if (fused) r = r + cuda::load(dy[e]);
            if (fused && r < A(0)) r = A(0);
            const T want = cuda::store<T>(r);
            ok = ok && std::memcmp(&out[e], &want, sizeof(T)) == 0;
        });
        expect(ok, fused ? "forward sweep with residual and ReLU" : "forward sweep", v, name, offset);
    }
    std::vector<T> dress(size_t(n + 16));
    T* dres = aligned(dress);
    for (int variant = 0; variant < 3; ++variant) {  // training; behind a ReLU with dresidual; inference (no x)
        const bool masked = variant == 1, train = variant != 2;
        const int vv = vec_width<T>(v, {dy, x, out, masked ? y : nullptr, masked ? dres : nullptr});
        elementwise_launches<T>(v, vv,
                                BackwardOp<T>{dy, train ? x : nullptr, out, coef.data(), C, masked ? y : nullptr,
                                              masked ? dres : nullptr},
                                EmuLauncher{});
        ok = true;
        each([&](int64_t c, int64_t e) {
            A g = cuda::load(dy[e]);
            if (masked && !(cuda::load(y[e]) > A(0))) g = A(0);
            const A ag = k_of(1, c) * g;
            const T want = cuda::store<T>(train ? ag + k_of(2, c) * (cuda::load(x[e]) - k_of(0, c)) + k_of(3, c) : ag);
            const T gw = cuda::store<T>(g);
            ok = ok && std::memcmp(&out[e], &want, sizeof(T)) == 0 &&
                 (!masked || std::memcmp(&dres[e], &gw, sizeof(T)) == 0);
        });
        expect(ok, variant == 0 ? "backward sweep" : variant == 1 ? "backward sweep behind a ReLU, dresidual" :
                                                                    "backward sweep, inference",
               v, name, offset);
    }
}

int main() {
    std::mt19937_64 rng(11);
    // every branch: NCHW 16-byte units with several fused chunks, scalar units (inner 49, a
    // misaligned start), one long row split over blocks, channels-last with C < 32 (tx < 32), a
    // wide channels-last tensor whose stage 2 is the separate finish kernel, C not a multiple of
    // the unit, an empty batch (count 0)
    const int64_t shapes[][3] = {{3, 2, 1500}, {8, 16, 49}, {1, 2, 5000}, {2, 3, 64}, {5000, 3, 1}, {700, 64, 1},
                                 {300, 256, 1}, {37, 24, 1}, {41, 10, 1}, {0, 5, 8}};
    for (const auto& s : shapes)
        for (int offset : {0, 1}) {
            const pybn_view v{s[0], s[1], s[2], PYBN_FLOAT32};
            run_case<float>(v, offset, "float32", rng);
            if (s[0] * s[1] * s[2] <= 20000) {
                run_case<double>(v, offset, "float64", rng);
                run_case<__half>(v, offset, "float16", rng);
                run_case<__nv_bfloat16>(v, offset, "bfloat16", rng);
            }
        }
    ++checks;
    if (emu_divergent_blocks) {
        ++failures;
        std::printf("FAIL %ld blocks returned on some threads while others waited at __syncthreads\n", emu_divergent_blocks);
    }
    std::printf("%ld checks, %ld failures\n", checks, failures);
    return failures ? 1 : 0;
}
