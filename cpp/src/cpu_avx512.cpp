// CPU kernels for x86-64-v4 (AVX-512 F/BW/DQ/VL), compiled with -march=x86-64-v4 by CMake.
#define PYBN_CPU_ISA avx512
#define PYBN_CPU_ISA_NAME "avx512"
#include "cpu_kernels.inl"
