// The CPU kernel table: one implementation (cpu_kernels.inl) compiled once per instruction-set
// path (cpu_portable.cpp, cpu_avx2.cpp, cpu_avx512.cpp), chosen once at run time
// (cpu_dispatch.cpp). Kernels assume validated arguments; the checks live in api.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pybn/pybn.h"

namespace pybn::cpu {

// Called by the fused kernels between their reduction and their elementwise step, for channels
// [c0, c1): r0, r1, r2 hold that range's reductions (mean and M2, or sum_dy, sum_dy_xmu and
// sum_xmu; r2 is nullptr for statistics), indexed from c0; fn fills coef[4 * C] for the range.
struct ChannelHook {
    void* ctx;
    void (*fn)(void* ctx, int64_t c0, int64_t c1, const double* r0, const double* r1,
               const double* r2, void* coef);
};

// Per-channel coefficient arrays are struct-of-arrays, 4 x C values of the accumulation type of
// the view's dtype (double for float64 data, float otherwise).
struct KernelTable {
    const char* isa;
    // mean and M2 (double) of every channel; the view has outer * inner >= 1.
    void (*batch_stats)(const pybn_view& v, const void* x, double* mean, double* m2);
    // y = ((x - hi) - lo) * scale + shift, coef = [hi | lo | scale | shift]. y may be x.
    void (*normalize)(const pybn_view& v, const void* x, const void* coef, void* y);
    // sum(dy), sum(dy * (x - mean)) and, if sum_xmu != nullptr, sum(x - mean) per channel;
    // mean holds C values of the accumulation type.
    void (*backward_reduce)(const pybn_view& v, const void* dy, const void* x, const void* mean,
                            double* sum_dy, double* sum_dy_xmu, double* sum_xmu);
    // dx = a * dy + b * (x - mean) + c, coef = [mean | a | b | c]; with x == nullptr, dx = a * dy.
    // dx may be dy or x.
    void (*backward_elementwise)(const pybn_view& v, const void* dy, const void* x,
                                 const void* coef, void* dx);
    // Fused training forward: statistics, hook, normalisation, channel group by channel group
    // so that a group's data is still in the cache when it is normalised.
    void (*forward_train)(const pybn_view& v, const void* x, void* y, const ChannelHook& hook);
    // Fused backward: reduction, hook, elementwise (dx may be nullptr: reduction and hook only),
    // by channel groups as above; x_in_dx: the elementwise step reads x (training).
    void (*backward)(const pybn_view& v, const void* dy, const void* x, const void* mean,
                     bool x_in_dx, void* dx, const ChannelHook& hook);
};

// The table in use (the best the CPU supports, or the one PYBN_CPU_ISA / pybn_set_cpu_isa chose).
const KernelTable& kernels();

// Bytes of data the fused kernels keep in the cache between their two sweeps: a quarter of the
// last-level cache, or the environment variable PYBN_CACHE_BUDGET.
int64_t cache_budget();
// True when an output of `bytes` should bypass the caches: larger than 4 * cache_budget() (the
// whole last-level cache by default), it could not stay cached anyway and would evict the inputs.
bool stream_output(int64_t bytes);

// Heap memory for kernel temporaries (uninitialised), defined in a baseline unit so that the
// instruction-set units share no std:: code with it; small blocks are reused by the next
// Scratch of the same thread. Throws std::bad_alloc (before any output is written).
class Scratch {
  public:
    explicit Scratch(size_t bytes);
    ~Scratch();
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    template <class U> U* as(size_t offset_elems = 0) const { return static_cast<U*>(ptr_) + offset_elems; }

  private:
    void* ptr_;
    size_t bytes_;  // the block's size (at least the bytes asked for)
};

}  // namespace pybn::cpu
