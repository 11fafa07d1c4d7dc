// The CPU kernel table: one implementation (cpu_kernels.inl) compiled once per instruction-set
// path (cpu_portable.cpp, cpu_avx2.cpp, cpu_avx512.cpp), chosen once at run time
// (cpu_dispatch.cpp). Kernels assume validated arguments; the checks live in api.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pybn/pybn.h"

namespace pybn::cpu {

// The per-channel step of a fused kernel, between its reduction and its elementwise sweep, for
// channels [c0, c1) (arrays indexed from c0): it fills the coefficients coef[4 * C] of those
// channels (the accumulation type of the view's dtype, indexed by absolute channel) and keeps
// the per-channel outputs (running statistics, saved values, parameter gradients). Implemented
// by the API (api.cpp, compiled for the baseline: the per-channel float64 arithmetic is the same
// whichever kernel path runs). A kernel may call it from several threads at once, for disjoint
// channel ranges: it must write nothing but those channels' entries.
class ForwardEpilogue {
  public:
    virtual void operator()(int64_t c0, int64_t c1, const double* mean, const double* m2, void* coef) const = 0;

  protected:
    ~ForwardEpilogue() = default;
};
class BackwardEpilogue {
  public:
    virtual void operator()(int64_t c0, int64_t c1, const double* sum_dy, const double* sum_dy_xmu,
                            const double* sum_xmu, void* coef) const = 0;

  protected:
    ~BackwardEpilogue() = default;
};

// The fused epilogue of the forward's elementwise sweep: y = activation(normalised + residual).
struct OutputOps {
    int32_t activation;    // pybn_activation
    const void* residual;  // the view's dtype and layout, or nullptr
    // Ghost batches: the view's outer rows form `groups` equal, contiguous groups, group g
    // normalised with the coefficients coef + g * 4 * C (1: one batch). normalize only.
    int64_t groups = 1;
};
// The backward's use of the activation: the gradient reaching the BN is dy masked by y > 0
// (PYBN_ACTIVATION_RELU; y required), and that gradient is also written to dresidual.
struct GradOps {
    int32_t activation;
    const void* y;    // the forward's output, or nullptr without an activation
    void* dresidual;  // or nullptr
    int64_t groups = 1;  // ghost batches, as in OutputOps (backward_elementwise only)
};

// Per-channel coefficient arrays are struct-of-arrays, 4 x C values of the accumulation type of
// the view's dtype (double for float64 data, float otherwise). Every entry returns
// PYBN_ERROR_UNSUPPORTED_DTYPE for a dtype it has no kernel for (checked views never do), and
// throws std::bad_alloc when its scratch cannot be allocated: always before any output is
// written, as every temporary is allocated before the first write.
struct KernelTable {
    const char* isa;
    // mean and M2 (double) of every channel; the view has outer * inner >= 1.
    pybn_status (*batch_stats)(const pybn_view& v, const void* x, double* mean, double* m2);
    // y = activation(((x - hi) - lo) * scale + shift + residual), coef = [hi | lo | scale |
    // shift]. y may be x or the residual.
    pybn_status (*normalize)(const pybn_view& v, const void* x, const void* coef, void* y, const OutputOps& ops);
    // sum(dy), sum(dy * (x - mean)) and, if sum_xmu != nullptr, sum(x - mean) per channel;
    // mean holds C values of the accumulation type.
    pybn_status (*backward_reduce)(const pybn_view& v, const void* dy, const void* x, const void* mean,
                                   double* sum_dy, double* sum_dy_xmu, double* sum_xmu);
    // dx = a * g + b * (x - mean) + c, coef = [mean | a | b | c], g = dy (masked by the
    // activation); with x == nullptr, dx = a * g. dx may be dy or x, or nullptr (only
    // ops.dresidual = g is written).
    pybn_status (*backward_elementwise)(const pybn_view& v, const void* dy, const void* x,
                                        const void* coef, void* dx, const GradOps& ops);
    // Fused training forward: statistics, epilogue, normalisation, channel group by channel
    // group so that a group's data is still in the cache when it is normalised.
    pybn_status (*forward_train)(const pybn_view& v, const void* x, void* y, const ForwardEpilogue& epilogue,
                                 const OutputOps& ops);
    // Fused backward: reduction, epilogue, elementwise (dx may be nullptr: reduction and
    // epilogue only), by channel groups as above; dx_reads_x: the elementwise step reads x
    // (training), else dx = a * dy.
    pybn_status (*backward)(const pybn_view& v, const void* dy, const void* x, const void* mean,
                            bool dx_reads_x, void* dx, const BackwardEpilogue& epilogue, const GradOps& ops);
};

// The table in use (the best the CPU supports, or the one PYBN_CPU_ISA / pybn_set_cpu_isa chose).
const KernelTable& kernels();

// Bytes of data the fused kernels keep in the cache between their two sweeps: a quarter of the
// last-level cache, or the environment variable PYBN_CACHE_BUDGET.
int64_t cache_budget();
// Bytes of data of one block when each of `threads` threads takes whole channel blocks of a
// fused kernel (reduction, epilogue and sweep on one core): a thread's share of an eighth of the
// last-level cache, at least three quarters of a core's level-2 cache, or the environment
// variable PYBN_CORE_BUDGET (0: never).
int64_t core_budget(int threads);
// True when an output of `bytes` should bypass the caches: larger than 2 * cache_budget() (half
// the last-level cache by default), the sweep's working set (its input and its output) does not
// fit, and write-allocating the output would evict the input (bench/NOTES.md, step 27).
bool stream_output(int64_t bytes);

// Heap memory for kernel temporaries (uninitialised), defined in a baseline unit so that the
// instruction-set units share no std:: code with it; small blocks are reused by the next
// Scratch of the same thread. Throws std::bad_alloc; every kernel allocates all its Scratch
// before it writes an output. Testing knob: PYBN_FAIL_SCRATCH=k (read once) makes the k-th
// Scratch allocation of the process (1-based, counting non-empty ones) throw, so the tests can
// show that a failed call changes nothing.
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
