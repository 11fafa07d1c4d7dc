// CPU kernels for any CPU of the target architecture (x86-64 baseline: SSE2; AArch64: NEON).
#define PYBN_CPU_ISA portable
#if defined(__aarch64__)
#define PYBN_CPU_ISA_NAME "neon"
#else
#define PYBN_CPU_ISA_NAME "portable"
#endif
#include "cpu_kernels.inl"
