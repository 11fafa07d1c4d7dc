// Threads for the CPU kernels (OpenMP when the build has it). Work is always cut into parts that
// depend only on the shape, so results never depend on the thread count.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pybn {

// Threads the kernels use: the count set by pybn_set_num_threads, else OpenMP's default
// (OMP_NUM_THREADS or the number of cores); 1 without OpenMP.
int num_threads();
// n >= 1 sets the count; 0 returns to the default.
void set_num_threads(int n);

// Below this many elements a call stays on the calling thread.
constexpr int64_t kParallelMinWork = int64_t(1) << 15;

// fn(i, thread) for i in [0, n) on up to nt threads (thread in [0, nt)); parallel when `work`
// (elements touched) is large enough. fn must not throw.
template <class F> void parallel_for(int64_t n, int64_t work, int nt, F&& fn) {
#ifdef _OPENMP
    if (nt > 1 && n > 1 && work >= kParallelMinWork) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int64_t i = 0; i < n; ++i) fn(i, omp_get_thread_num());
        return;
    }
#else
    (void)work;
    (void)nt;
#endif
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
}

}  // namespace pybn
