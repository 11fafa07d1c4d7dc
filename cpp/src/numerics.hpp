// The one table of pybn's element types and numerics constants, shared by the checks, the CPU
// kernels and the CUDA kernels (this header compiles with every host compiler and nvcc). An
// unknown dtype has no entry: lookups return nullptr and dispatch returns
// PYBN_ERROR_UNSUPPORTED_DTYPE, never a default size or type.
#pragma once

#include <cstdint>
#include <type_traits>

#include "pybn/pybn.h"

#if defined(__CUDACC__)
#define PYBN_HD __host__ __device__ inline
#else
#define PYBN_HD inline
#endif

// Every inline function of the headers below is compiled once per CPU instruction-set unit; the
// inline namespace PYBN_ISA_TAG gives each unit its own copies, so the linker cannot hand AVX2
// code to the baseline. A kernel unit defines PYBN_ISA_TAG before including anything.
#ifndef PYBN_ISA_TAG
#define PYBN_ISA_TAG common
#endif

namespace pybn {
inline namespace PYBN_ISA_TAG {

// Facts of one element type of x / y / dy / dx.
struct DtypeInfo {
    int32_t code;        // pybn_dtype
    const char* name;    // as NumPy names it
    int64_t size;        // bytes per element
    bool wide;           // accumulation and per-channel parameters in float64 (else float32)
};

inline constexpr DtypeInfo kDtypes[] = {
    {PYBN_FLOAT32, "float32", 4, false},
    {PYBN_FLOAT64, "float64", 8, true},
    {PYBN_FLOAT16, "float16", 2, false},
    {PYBN_BFLOAT16, "bfloat16", 2, false},
};

// The entry of `code`, or nullptr when this library does not know it.
PYBN_HD const DtypeInfo* dtype_info(int32_t code) {
    for (const DtypeInfo& d : kDtypes)
        if (d.code == code) return &d;
    return nullptr;
}

// Accumulation / parameter type of a storage type: float64 for float64, float32 otherwise.
template <class T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls f(T{}) with T = Storage<code>::type, the storage type of `code` on one side (CPU or
// CUDA: each maps the codes to its own 16-bit types); PYBN_ERROR_UNSUPPORTED_DTYPE if unknown.
template <template <int32_t> class Storage, class F> pybn_status visit_dtype(int32_t code, F&& f) {
    switch (code) {
        case PYBN_FLOAT32: f(typename Storage<PYBN_FLOAT32>::type{}); return PYBN_SUCCESS;
        case PYBN_FLOAT64: f(typename Storage<PYBN_FLOAT64>::type{}); return PYBN_SUCCESS;
        case PYBN_FLOAT16: f(typename Storage<PYBN_FLOAT16>::type{}); return PYBN_SUCCESS;
        case PYBN_BFLOAT16: f(typename Storage<PYBN_BFLOAT16>::type{}); return PYBN_SUCCESS;
    }
    return PYBN_ERROR_UNSUPPORTED_DTYPE;
}

// Calls f(P{}) with P the per-channel parameter type of `code` (float or double).
template <class F> pybn_status visit_param(int32_t code, F&& f) {
    const DtypeInfo* d = dtype_info(code);
    if (d == nullptr) return PYBN_ERROR_UNSUPPORTED_DTYPE;
    if (d->wide) f(double{});
    else f(float{});
    return PYBN_SUCCESS;
}

// Values one float32 accumulator adds before it is added into float64 (CPU and CUDA): longer
// float32 runs bias the sum of squares of coarsely quantised data far from zero (bench/NOTES.md).
constexpr int kDepth = 4;

PYBN_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace PYBN_ISA_TAG
}  // namespace pybn
