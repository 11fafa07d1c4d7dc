// The CUDA launch plans and thread walks (cuda/plan.hpp) checked on the CPU, no GPU or CUDA header
// needed. The kernels call the same functions (start_walk, walk_batches, cols_rows, FastDivmod),
// so this runs their index arithmetic exactly:
// - FastDivmod agrees with division for a table of divisors and dividends up to 2^63 - 1;
// - for a table of shapes (zero sizes, one and 100000 channels, inner 1 and 2^20, more than 2^31
//   values), every grid is within CUDA's limits and nothing divides by zero (SIGFPE otherwise);
// - simulating every thread of every block, each reduction visits every value of every channel
//   exactly once and each elementwise walk visits every unit once with the right channel (shapes
//   up to a few million units; larger ones: sampled threads, every position checked);
// - the wave target: at least 4 blocks per SM of a 132-SM GPU for the ResNet-50 and BatchNorm1d
//   shapes, and the fused stage 2 merges at most kFusedMerges partials a thread.
// Prints "<checks> checks, <failures> failures"; exit status 1 on any failure.
#include <cstdio>
#include <random>
#include <vector>

#include "plan.hpp"

using namespace pybn;
using namespace pybn::cuda;

static long checks = 0, failures = 0;

static bool expect(bool ok, const char* what, const pybn_view& v, int vec) {
    ++checks;
    if (!ok && ++failures < 50)
        std::printf("FAIL %s for view (%lld, %lld, %lld), vec %d\n", what, (long long)v.outer, (long long)v.channels,
                    (long long)v.inner, vec);
    return ok;
}

static void check_divmod() {
    const pybn_view none{0, 0, 0, PYBN_FLOAT32};
    const int64_t big = int64_t(1) << 31, top = INT64_MAX;
    const int64_t divisors[] = {1, 2, 3, 5, 7, 49, 196, 784, 3136, 50176, 1 << 20, big - 1, big, big + 1,
                                1000000000039LL, (int64_t(1) << 62) + 3, top - 1, top};
    std::mt19937_64 rng(7);
    for (int64_t d : divisors) {
        const FastDivmod f = FastDivmod::make(d);
        std::vector<int64_t> ns = {0, 1, d - 1, d, top, top - 1, top / d * d, top / d * d - 1};
        if (d < top / 2) ns.insert(ns.end(), {d + 1, 2 * d - 1, 2 * d, 2 * d + 1});
        for (int i = 0; i < 2000; ++i) ns.push_back(int64_t(rng() >> 1) >> (rng() % 63));
        bool ok = true;
        for (int64_t n : ns) {
            int64_t q, r;
            f.divmod(n, q, r);
            ok = ok && q == n / d && r == n % d;
        }
        expect(ok, "FastDivmod agrees with division", none, int(d % 1000));
    }
}

// Every thread of every block of a reduction, simulated; the count of visits of every value of
// channel c (the walk is the same for every channel: checked for the first and the last).
static void simulate_reduce(const pybn_view& v, const ReducePlan& p, int vec) {
    const int64_t values = v.outer * v.inner;
    if (!p.cols) {
        for (int64_t c : {int64_t(0), v.channels - 1}) {
            std::vector<unsigned char> seen(size_t(v.outer * v.channels * v.inner), 0);
            bool ok = true;
            for (int64_t k = 0; k < p.chunks; ++k) {
                int64_t cc, kk;
                p.by_chunks.divmod(c * p.chunks + k, cc, kk);
                ok = ok && cc == c && kk == k;
                const int64_t n = v.outer * p.units, begin = k * p.per_chunk;
                const int64_t end = begin + p.per_chunk < n ? begin + p.per_chunk : n;
                for (int t = 0; t < kThreads; ++t)
                    walk_batches(start_walk(begin + t, p.by_units, FastDivmod{}), p.step, end, p.units, 1,
                                 [&](const Walk* b, int count) {
                                     for (int j = 0; j < count; ++j)
                                         for (int l = 0; l < p.vec; ++l) {
                                             const int64_t e = (b[j].row * v.channels + c) * v.inner + b[j].u * p.vec + l;
                                             ok = ok && b[j].row < v.outer && b[j].u < p.units;
                                             if (ok) ++seen[size_t(e)];
                                         }
                                 });
            }
            int64_t once = 0;
            for (int64_t o = 0; o < v.outer; ++o)
                for (int64_t i = 0; i < v.inner; ++i) once += seen[size_t((o * v.channels + c) * v.inner + i)] == 1;
            expect(ok && once == values, "rows reduction visits each value of a channel once", v, vec);
        }
        return;
    }
    std::vector<unsigned char> seen(size_t(v.outer * v.channels), 0);
    bool ok = true;
    for (int64_t bx = 0; bx < p.grid_x; ++bx)
        for (int64_t k = 0; k < p.chunks; ++k)
            for (int tid = 0; tid < kThreads; ++tid) {
                const int tx = tid & (p.tx - 1), ty = tid >> p.tx_shift;
                const int64_t cu = bx * p.tx + tx;
                if (cu >= p.units) continue;
                cols_rows(p, v.outer, k, ty, [&](const int64_t* rows, int count) {
                    for (int j = 0; j < count; ++j)
                        for (int l = 0; l < p.vec; ++l) {
                            ok = ok && rows[j] < v.outer;
                            if (ok) ++seen[size_t(rows[j] * v.channels + cu * p.vec + l)];
                        }
                });
            }
    int64_t once = 0;
    for (unsigned char s : seen) once += s == 1;
    expect(ok && once == v.outer * v.channels, "channels-last reduction visits each value once", v, vec);
}

// Elementwise walks: every position checked against direct division; all threads simulated (and
// every unit visited once) when the tensor is small, else a sample of threads.
static void simulate_elementwise(const pybn_view& v, const ElementwisePlan& p, int vec) {
    const bool full = p.total <= 4000000;
    std::vector<unsigned char> seen(full ? size_t(p.total) : 0, 0);
    const int64_t C = p.cols ? 1 : v.channels, threads = p.blocks * kThreads;
    std::vector<int64_t> sample;
    if (full)
        for (int64_t t = 0; t < threads; ++t) sample.push_back(t);
    else
        for (int64_t t : {int64_t(0), int64_t(1), int64_t(255), int64_t(256), threads / 2 + 17, threads - 1}) sample.push_back(t);
    bool ok = true;
    for (int64_t t : sample) {
        int steps = 0;
        walk_batches(start_walk(t, p.by_units, p.by_channels), p.step, p.total, p.units, C,
                     [&](const Walk* b, int count) {
                         for (int j = 0; j < count; ++j) {
                             const Walk& w = b[j];
                             ok = ok && w.row == w.s / p.units && w.u == w.s % p.units && w.c == (w.row % C);
                             if (full && ok) ++seen[size_t(w.s)];
                         }
                         ++steps;
                     });
        (void)steps;
    }
    if (full) {
        int64_t once = 0;
        for (unsigned char s : seen) once += s == 1;
        ok = ok && once == p.total;
    }
    expect(ok, "elementwise walk: each unit once, with its row, unit and channel", v, vec);
}

// At least kTargetBlocks blocks, or, for a tensor smaller than that, a thread per unit (all of its
// loads in flight at once).
static bool wide_enough(const ElementwisePlan& e) {
    return e.blocks >= kTargetBlocks || e.blocks == ceil_div(e.total, kThreads);
}

int main() {
    check_divmod();
    const int64_t big = int64_t(1) << 31;
    const int64_t shapes[][3] = {
        {4, 3, 0}, {0, 3, 4}, {3, 0, 4}, {0, 0, 0}, {3, 4, 0}, {0, 5, 1},  // zero sizes
        {1, 1, 1}, {2, 1, 1}, {7, 1, 5}, {1, 1, 1 << 20}, {3, 5, 7}, {5, 3, 8}, {9, 6, 1}, {9, 8, 1},
        {1, 100000, 1}, {32, 100000, 1}, {2, 100000, 49}, {100000, 100000, 1},
        {32, 64, 3136}, {256, 64, 3136}, {32, 2048, 49}, {1, 64, 224 * 224},  // ResNet-50 NCHW
        {32 * 3136, 64, 1}, {256 * 3136, 64, 1}, {32 * 49, 2048, 1},         // ResNet-50 NHWC
        {4096, 1024, 1}, {256, 4096, 1}, {1, 2048, 49}, {1, 512, 1},          // BatchNorm1d, N = 1
        {1, 3, 1 << 20}, {5, 7, (1 << 20) + 3}, {big / 64 + 1, 64, 1},      // long rows, > 2^31
        {3, 2, big / 2 + 5}, {big, 1, 3}, {(big / 32) * 9, 4, 1}, {big * 4, 3, 1},
    };
    for (const auto& s : shapes) {
        for (int vec : {1, 2, 4, 8}) {
            const pybn_view v{s[0], s[1], s[2], PYBN_FLOAT32};
            const ReducePlan p = plan_reduce(v, vec);
            const bool empty = v.outer == 0 || v.inner == 0 || v.channels == 0;
            expect(empty == (p.chunks == 0), "chunks == 0 exactly when there is nothing to reduce", v, vec);
            expect(plan_fits(p) || empty, "grid within limits", v, vec);
            expect(p.grid_x >= 0 && p.grid_y >= 0 && p.grid_y <= kMaxGridY, "grid.y <= 65535", v, vec);
            if (!empty) {
                const int64_t run = p.cols ? v.channels : v.inner;
                const int want = p.cols && vec > kColsMaxVec ? kColsMaxVec : vec;
                expect(p.vec == (run % want == 0 ? want : 1), "vec kept exactly when the run is a multiple of it", v, vec);
                expect(p.cols == (v.inner == 1), "channels-last plan exactly for inner == 1", v, vec);
                expect(p.per_chunk >= 1, "chunks of at least one unit / row", v, vec);
                if (p.cols) {
                    expect((p.chunks - 1) * p.per_chunk < v.outer && p.chunks * p.per_chunk >= v.outer,
                           "chunks of rows cover outer", v, vec);
                    expect(p.tx * p.ty == kThreads && (1 << p.tx_shift) == p.tx && p.tx <= 32, "block shape", v, vec);
                    expect(p.grid_x * p.tx >= p.units && (p.grid_x - 1) * p.tx < p.units, "tiles cover the channels", v, vec);
                    if (p.fused)
                        expect(ceil_div(p.chunks, kThreads / (p.tx * p.vec)) <= kFusedMerges, "fused merge bound", v, vec);
                } else {
                    const int64_t n = v.outer * p.units;
                    expect((p.chunks - 1) * p.per_chunk < n && p.chunks * p.per_chunk >= n, "chunks of units cover a channel",
                           v, vec);
                    expect(p.grid_x == v.channels * p.chunks && p.grid_y == 1, "a block per (channel, chunk)", v, vec);
                    if (p.fused) expect(ceil_div(p.chunks, kThreads) <= kFusedMerges, "fused merge bound", v, vec);
                    expect(p.step.S == kThreads && p.step.dr * p.units + p.step.du == kThreads, "stride", v, vec);
                }
                expect(p.tickets == (p.fused && p.chunks > 1 ? (p.cols ? p.grid_x : v.channels) : 0), "tickets", v, vec);
                if (v.outer * v.channels * v.inner <= 8000000) simulate_reduce(v, p, vec);
            }
            const ElementwisePlan e = plan_elementwise(v, vec);
            const int64_t total = v.outer * v.channels * v.inner;
            expect((e.blocks == 0) == (total == 0), "elementwise blocks == 0 exactly for an empty view", v, vec);
            expect(e.blocks <= kElementwiseBlocks, "elementwise grid within limits", v, vec);
            if (total > 0) {
                expect(e.total * e.vec == total, "elementwise units cover the tensor", v, vec);
                simulate_elementwise(v, e, vec);
            }
            expect(per_channel_blocks(v.channels) * kThreads >= v.channels, "a thread per channel", v, vec);
        }
    }
    // The wave target on ResNet-50's BN layers (N = 32 and 256) and BatchNorm1d: float32 (vec 4)
    // and 16-bit types (vec 8), NCHW and channels-last.
    const int64_t resnet[][3] = {{64, 112, 112}, {64, 56, 56}, {256, 56, 56}, {128, 56, 56}, {128, 28, 28},
                                 {512, 28, 28}, {256, 28, 28}, {256, 14, 14}, {1024, 14, 14}, {512, 14, 14},
                                 {512, 7, 7}, {2048, 7, 7}};
    for (int64_t n : {32, 256})
        for (const auto& r : resnet)
            for (int vec : {4, 8})
                for (bool nhwc : {false, true}) {
                    const int64_t hw = r[1] * r[2];
                    const pybn_view v = nhwc ? pybn_view{n * hw, r[0], 1, PYBN_FLOAT32} : pybn_view{n, r[0], hw, PYBN_FLOAT32};
                    expect(plan_blocks(plan_reduce(v, vec)) >= kTargetBlocks, "reduction: >= 4 blocks per SM", v, vec);
                    expect(wide_enough(plan_elementwise(v, vec)), "elementwise: >= 4 blocks per SM", v, vec);
                }
    for (const auto& s : {pybn_view{4096, 1024, 1, PYBN_FLOAT32}, pybn_view{256, 4096, 1, PYBN_FLOAT32}})
        for (int vec : {4, 8}) {
            expect(plan_blocks(plan_reduce(s, vec)) >= kTargetBlocks, "BatchNorm1d reduction: >= 4 blocks per SM", s, vec);
            expect(wide_enough(plan_elementwise(s, vec)), "BatchNorm1d elementwise: >= 4 blocks per SM", s, vec);
        }
    std::printf("%ld checks, %ld failures\n", checks, failures);
    return failures ? 1 : 0;
}
