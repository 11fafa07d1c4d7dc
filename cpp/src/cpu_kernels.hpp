// The CPU kernel table: one implementation (cpu_kernels.inl) compiled once per instruction-set
// path (cpu_portable.cpp, cpu_avx2.cpp, cpu_avx512.cpp), chosen once at run time
// (cpu_dispatch.cpp). Kernels assume validated arguments; the checks live in api.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pybn/pybn.h"

namespace pybn::cpu {

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
};

// The table in use (the best the CPU supports, or the one PYBN_CPU_ISA / pybn_set_cpu_isa chose).
const KernelTable& kernels();

// True when an output of `bytes` should bypass the caches (it is larger than the last-level
// cache, so it would only evict the inputs).
bool stream_output(int64_t bytes);

// Heap memory for kernel temporaries, defined in a baseline unit so that the instruction-set
// units share no std:: code with it. Throws std::bad_alloc (before any output is written).
class Scratch {
  public:
    explicit Scratch(size_t bytes);
    ~Scratch();
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    template <class U> U* as(size_t offset_elems = 0) const { return static_cast<U*>(ptr_) + offset_elems; }

  private:
    void* ptr_;
};

}  // namespace pybn::cpu
