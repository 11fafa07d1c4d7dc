// CPU kernels for x86-64-v3 (AVX2, FMA, F16C), compiled with -march=x86-64-v3 by CMake.
#define PYBN_CPU_ISA avx2
#define PYBN_CPU_ISA_NAME "avx2"
#include "cpu_kernels.inl"
