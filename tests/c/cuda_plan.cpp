// The CUDA launch plans (cuda/plan.hpp) checked on the CPU, no GPU or CUDA header needed: for a
// table of shapes, no division by zero (this program would die of SIGFPE), every grid within
// CUDA's limits, and the stage-1 partition covering every row of every channel exactly once.
// Prints "<checks> checks, <failures> failures"; exit status 1 on any failure.
#include <cstdio>

#include "plan.hpp"

using namespace pybn;
using namespace pybn::cuda;

static int checks = 0, failures = 0;

static void expect(bool ok, const char* what, const pybn_view& v) {
    ++checks;
    if (!ok) {
        ++failures;
        std::printf("FAIL %s for view (%lld, %lld, %lld)\n", what, (long long)v.outer, (long long)v.channels,
                    (long long)v.inner);
    }
}

int main() {
    const int64_t big = int64_t(1) << 31;
    const int64_t shapes[][3] = {
        {4, 3, 0}, {0, 3, 4}, {3, 0, 4}, {0, 0, 0}, {3, 4, 0}, {0, 5, 1},  // zero sizes
        {1, 1, 1}, {2, 1, 1}, {7, 1, 5}, {1, 1, 1 << 20},                  // one channel
        {1, 100000, 1}, {32, 100000, 1}, {2, 100000, 49}, {100000, 100000, 1},
        {32, 64, 3136}, {256, 64, 3136}, {32, 2048, 49}, {1, 64, 224 * 224},  // ResNet-50 NCHW
        {32 * 3136, 64, 1}, {256 * 3136, 64, 1}, {32 * 49, 2048, 1},         // ResNet-50 NHWC
        {4096, 1024, 1}, {256, 4096, 1},                                     // BatchNorm1d
        {1, 3, 1 << 20}, {5, 7, (1 << 20) + 3}, {big / 64 + 1, 64, 1},      // long rows, > 2^31
        {3, 2, big / 2 + 5}, {big, 1, 3}, {(big / 32) * 9, 4, 1}, {big * 4, 3, 1},
    };
    for (const auto& s : shapes) {
        const pybn_view v{s[0], s[1], s[2], PYBN_FLOAT32};
        const ReducePlan p = plan_reduce(v);
        const bool empty = v.outer == 0 || v.inner == 0 || v.channels == 0;
        expect(empty == (p.chunks == 0), "chunks == 0 exactly when there is nothing to reduce", v);
        expect(p.rows >= 1, "rows >= 1", v);
        expect(plan_fits(p) || empty, "grid within limits", v);
        expect(p.grid_x >= 0 && p.grid_y >= 0 && p.grid_y <= kMaxGridY, "grid.y <= 65535", v);
        if (!empty) {
            // chunks of `rows` rows cover [0, outer) exactly once: the last chunk starts inside it
            expect((p.chunks - 1) * p.rows < v.outer && p.chunks * p.rows >= v.outer, "partition covers outer", v);
            expect(p.cols == (v.inner == 1), "channels-last plan exactly for inner == 1", v);
            if (p.cols) {
                expect(p.grid_x * 32 >= v.channels && (p.grid_x - 1) * 32 < v.channels, "32 channels per block", v);
                expect(p.grid_y == p.chunks, "one grid row per chunk", v);
            } else {
                expect(p.grid_x == v.channels * p.chunks && p.grid_y == 1, "a block per (channel, chunk)", v);
                // a block reduces about kValuesPerBlock values (at least a whole row)
                expect(p.rows * v.inner >= (v.inner < kValuesPerBlock ? kValuesPerBlock : v.inner) || p.chunks == 1,
                       "blocks of at least kValuesPerBlock values", v);
            }
        }
        const ElementwisePlan e = plan_elementwise(v);
        const int64_t total = v.outer * v.channels * v.inner;
        expect((e.blocks == 0) == (total == 0), "elementwise blocks == 0 exactly for an empty view", v);
        expect(e.blocks <= kElementwiseBlocks, "elementwise grid within limits", v);
        expect(per_channel_blocks(v.channels) * kThreads >= v.channels, "a thread per channel", v);
    }
    std::printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
