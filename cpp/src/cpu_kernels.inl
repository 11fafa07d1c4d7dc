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

// The kernels by subject, in dependency order.
#include "cpu_simd.inl"
#include "cpu_schedule.inl"
#include "cpu_stats.inl"
#include "cpu_normalize.inl"
#include "cpu_backward.inl"

// Type-erased entry points: one per operation, dispatching on the view's dtype.
pybn_status batch_stats(const pybn_view& v, const void* x, double* mean, double* m2) {
    return visit_dtype<HostStorage>(v.dtype, [&](auto t) { batch_stats_t<decltype(t)>(v, x, mean, m2); });
}
pybn_status normalize(const pybn_view& v, const void* x, const void* coef, void* y, const OutputOps& ops) {
    return visit_dtype<HostStorage>(v.dtype, [&](auto t) { normalize_t<decltype(t)>(v, x, coef, y, ops); });
}
pybn_status backward_reduce(const pybn_view& v, const void* dy, const void* x, const void* mean, double* sum_dy,
                            double* sum_dy_xmu, double* sum_xmu) {
    return visit_dtype<HostStorage>(
        v.dtype, [&](auto t) { backward_reduce_t<decltype(t)>(v, dy, x, mean, sum_dy, sum_dy_xmu, sum_xmu); });
}
pybn_status backward_elementwise(const pybn_view& v, const void* dy, const void* x, const void* coef, void* dx,
                                 const GradOps& ops) {
    return visit_dtype<HostStorage>(v.dtype,
                                    [&](auto t) { backward_elementwise_ops_t<decltype(t)>(v, dy, x, coef, dx, ops); });
}
pybn_status forward_train(const pybn_view& v, const void* x, void* y, const ForwardEpilogue& epilogue,
                          const OutputOps& ops) {
    return visit_dtype<HostStorage>(v.dtype, [&](auto t) { forward_train_t<decltype(t)>(v, x, y, epilogue, ops); });
}
pybn_status backward(const pybn_view& v, const void* dy, const void* x, const void* mean, bool dx_reads_x,
                     void* dx, const BackwardEpilogue& epilogue, const GradOps& ops) {
    return visit_dtype<HostStorage>(v.dtype, [&](auto t) {
        using T = decltype(t);
        if (ops.activation == PYBN_ACTIVATION_RELU)  // the reduction reads y for the mask
            backward_t<T, ReluSumTerms>(v, dy, x, mean, dx_reads_x, dx, epilogue, ops);
        else
            backward_t<T, SumTerms>(v, dy, x, mean, dx_reads_x, dx, epilogue, ops);
    });
}

}  // namespace

const KernelTable& table() {
    static const KernelTable t{PYBN_CPU_ISA_NAME, batch_stats, normalize, backward_reduce,
                               backward_elementwise, forward_train, backward};
    return t;
}

}  // namespace PYBN_CPU_ISA
}  // namespace pybn::cpu
