// Launch planning of the CUDA kernels, as plain host C++ (no CUDA header): the kernels' grids
// come from here, and tests/c/cuda_plan.cpp checks them on the CPU for a table of shapes (zero
// sizes, one and 100000 channels, inner 1 and 2^20, more than 2^31 elements): no division by
// zero, every grid within CUDA's limits, the stage-1 partition covering every row exactly once.
#pragma once

#include <cstdint>

#include "numerics.hpp"
#include "pybn/pybn.h"

namespace pybn::cuda {

constexpr int kThreads = 256;                 // threads of every reduction and elementwise block
constexpr int64_t kValuesPerBlock = 16384;    // target values of one channel per reduction block
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1, kMaxGridY = 65535;
constexpr int64_t kElementwiseBlocks = int64_t(1) << 20;  // grid-stride beyond this

// Stage 1 of a reduction: `chunks` partials per channel, each over `rows` consecutive rows
// (outer indices) of one channel; grid (grid_x, grid_y) of blocks. chunks == 0: nothing to
// reduce (outer or inner is 0; stage 2 then merges no partial: count 0).
struct ReducePlan {
    bool cols;  // inner == 1 (channels-last): blocks of 32 channels x 8 row-threads
    int64_t rows, chunks, grid_x, grid_y;
};

inline ReducePlan plan_reduce(const pybn_view& v) {
    if (v.outer == 0 || v.inner == 0 || v.channels == 0) return {v.inner == 1, 1, 0, 0, 0};
    if (v.inner == 1) {
        // about kValuesPerBlock values per block of 32 channels x 8 row-threads, grid.y <= 65535
        int64_t rows = kValuesPerBlock / 32;
        if (ceil_div(v.outer, rows) > kMaxGridY) rows = ceil_div(v.outer, kMaxGridY);
        const int64_t chunks = ceil_div(v.outer, rows);
        return {true, rows, chunks, ceil_div(v.channels, 32), chunks};
    }
    const int64_t rows = v.inner >= kValuesPerBlock ? 1 : ceil_div(kValuesPerBlock, v.inner);
    const int64_t chunks = ceil_div(v.outer, rows);
    return {false, rows, chunks, v.channels * chunks, 1};
}

// Whether a reduction plan fits CUDA's grid limits (checked before any launch).
inline bool plan_fits(const ReducePlan& p) { return p.grid_x <= kMaxGridX && p.grid_y <= kMaxGridY; }

// The elementwise sweep: a block per (outer, channel) row when rows are long, else a flat
// grid-stride loop; at most kElementwiseBlocks blocks.
struct ElementwisePlan {
    bool rows;
    int64_t blocks;
};

inline ElementwisePlan plan_elementwise(const pybn_view& v) {
    const int64_t total = v.outer * v.channels * v.inner;
    if (total == 0) return {false, 0};
    if (v.inner >= kThreads) {
        const int64_t n = v.outer * v.channels;
        return {true, n < kElementwiseBlocks ? n : kElementwiseBlocks};
    }
    const int64_t n = ceil_div(total, kThreads);
    return {false, n < kElementwiseBlocks ? n : kElementwiseBlocks};
}

// One thread per channel (the per-channel steps between sweeps).
inline int64_t per_channel_blocks(int64_t channels) { return ceil_div(channels, kThreads); }

}  // namespace pybn::cuda
