/*
 * pybn.h - the public C ABI of libpybn, and its manual.
 *
 * pybn computes batch normalisation (BN): for every channel c, over every other axis of x,
 *   mean  mu_c = sum(x) / n,   biased variance  var_c = sum((x - mu_c)^2) / n,
 *   y = gamma_c * (x - mu_c) / sqrt(var_c + eps) + beta_c.
 *
 * ---------------------------------------------------------------------------------------------
 * Conventions
 * ---------------------------------------------------------------------------------------------
 * Layout. Every tensor is described by one canonical view, pybn_view: a C-contiguous array of
 *   shape (outer, channels, inner). NCHW is (N, C, H*W); channels-last NHWC is (N*H*W, C, 1);
 *   (N, C) is (N, C, 1); a channel axis k of any shape is (prod(shape[:k]), shape[k],
 *   prod(shape[k+1:])). The count of values per channel is n = outer * inner.
 * Data types. x, y, dy and dx have the view's dtype. Per-channel "parameter" arrays (gamma,
 *   beta, running_mean, running_var, saved mean and invstd, dgamma, dbeta) are float32, or
 *   float64 when the view's dtype is PYBN_FLOAT64. Statistics arrays (count, mean, M2) and the
 *   backward sums are always float64 ("double"): they are what crosses a process boundary in
 *   synchronised BN, and carrying them in float64 keeps the mean exact when it is far from zero.
 *   Accumulation is in float32 for 16-bit and float32 data (blocked, with a per-channel shift,
 *   then merged in float64) and in float64 for float64 data. The formula E[x^2] - E[x]^2 is
 *   never used.
 * Pointers. Data pointers are void*; arrays of per-channel values have `channels` elements.
 *   Arguments documented "may be NULL" are optional; every other pointer must be non-NULL
 *   (when the array it points to is empty, any non-NULL pointer will do).
 * In place. An output may be exactly the same buffer as an elementwise input of the same dtype
 *   (y == x, dx == dy or dx == x); any other overlap between outputs and inputs is undefined.
 * Errors. Every function returns a pybn_status and never aborts, throws or exits. On any status
 *   other than PYBN_SUCCESS nothing that was passed in has been written: all arguments are
 *   checked before any output is touched. pybn_last_error() gives a message naming the argument,
 *   the expected and the received value.
 * Determinism. Results are bitwise identical from run to run and for every thread count, for
 *   the same inputs, build and CPU instruction-set path (pybn_cpu_isa()).
 * Threads. Every function may be called concurrently from several threads on distinct outputs.
 * CUDA. Every entry point named pybn_cuda_* takes device pointers and a `void* stream`
 *   (a cudaStream_t; NULL means the legacy default stream), queues its work on that stream and
 *   returns without synchronising the host. These functions exist in every build; in a build
 *   without CUDA they return PYBN_ERROR_NOT_COMPILED.
 *
 * ---------------------------------------------------------------------------------------------
 * ABI policy
 * ---------------------------------------------------------------------------------------------
 * PYBN_ABI_VERSION (also pybn_abi_version()) changes only when an existing function's signature
 * or meaning, or an existing struct, changes; a minor release may add functions and append
 * enum values, never remove or reorder them. Enum values are never reused.
 */
#ifndef PYBN_PYBN_H
#define PYBN_PYBN_H

#include <stdint.h>

#if defined(_WIN32)
#  if defined(PYBN_BUILDING_LIBRARY)
#    define PYBN_API __declspec(dllexport)
#  else
#    define PYBN_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define PYBN_API __attribute__((visibility("default")))
#else
#  define PYBN_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/** ABI version of this header; compare with pybn_abi_version() of the loaded library. */
#define PYBN_ABI_VERSION 1

/** Status of every call. Append-only: values are never reordered or reused. */
typedef enum pybn_status {
    PYBN_SUCCESS = 0,
    PYBN_ERROR_INVALID_ARGUMENT = 1, /* NULL pointer, negative or overflowing size, bad enum   */
    PYBN_ERROR_UNSUPPORTED_DTYPE = 2, /* dtype value unknown to this library                   */
    PYBN_ERROR_INVALID_VALUE = 3,    /* eps < 0 / non-finite, momentum outside [0, 1] or NaN    */
    PYBN_ERROR_TOO_FEW_VALUES = 4,   /* training needs at least 2 values per channel            */
    PYBN_ERROR_OUT_OF_MEMORY = 5,    /* a temporary buffer could not be allocated               */
    PYBN_ERROR_NOT_COMPILED = 6,     /* a CUDA entry point in a build without CUDA              */
    PYBN_ERROR_CUDA = 7,             /* the CUDA runtime reported an error (detail in message)  */
    PYBN_ERROR_INTERNAL = 8          /* a bug in pybn: please report it with pybn_last_error()  */
} pybn_status;

/** Element type of x, y, dy, dx. Append-only. */
typedef enum pybn_dtype {
    PYBN_FLOAT32 = 0,
    PYBN_FLOAT64 = 1,
    PYBN_FLOAT16 = 2,  /* IEEE 754 binary16                                    */
    PYBN_BFLOAT16 = 3  /* bfloat16: the upper 16 bits of a float32             */
} pybn_dtype;

/** The canonical view of a tensor: C-contiguous (outer, channels, inner) elements of dtype. */
typedef struct pybn_view {
    int64_t outer;    /* product of the axes before the channel axis, >= 0 */
    int64_t channels; /* number of channels C, >= 0                        */
    int64_t inner;    /* product of the axes after the channel axis, >= 0  */
    int32_t dtype;    /* a pybn_dtype                                      */
} pybn_view;

/* ----------------------------------- library information ---------------------------------- */

/** Static English text for a status, e.g. "invalid argument". Never NULL. */
PYBN_API const char* pybn_status_string(pybn_status status);
/** Detail of the last failed call on the calling thread ("" if none yet). Valid until the next
 *  pybn call on that thread. Never NULL. Successful calls leave it unchanged. */
PYBN_API const char* pybn_last_error(void);
/** Library version, "MAJOR.MINOR.PATCH". */
PYBN_API const char* pybn_version(void);
/** ABI version of the loaded library (see PYBN_ABI_VERSION). */
PYBN_API int pybn_abi_version(void);
/** 1 if the CUDA entry points were compiled into this library, else 0. */
PYBN_API int pybn_has_cuda(void);
/** Name of the CPU kernel path in use: "avx512", "avx2", "portable" (x86-64) or "neon". The
 *  best path the CPU supports is chosen at first use; the environment variable PYBN_CPU_ISA=name
 *  picks a lower one (e.g. to test it). */
PYBN_API const char* pybn_cpu_isa(void);
/** Comma-separated names of the compiled paths this CPU supports, best first. */
PYBN_API const char* pybn_cpu_isas(void);
/** Use the CPU path `name` (one of pybn_cpu_isas()) for later calls; NULL or "" picks the best.
 *  Not meant to be called while other threads run pybn kernels. */
PYBN_API pybn_status pybn_set_cpu_isa(const char* name);
/** Threads the CPU kernels use: n >= 1, or 0 for the default (OMP_NUM_THREADS, else the number
 *  of cores). Results are bitwise identical for every thread count. */
PYBN_API pybn_status pybn_set_num_threads(int n);
/** The thread count the CPU kernels use now. */
PYBN_API int pybn_get_num_threads(void);

/* ------------------------------- composable primitives (CPU) ------------------------------- */

/**
 * Batch statistics of x, per channel: count = n = outer*inner, mean, and
 * M2 = sum((x - mean)^2) (so the biased variance is M2 / count).
 *   view   layout and dtype of x.
 *   x      input, `view`.
 *   count, mean, m2   outputs, `channels` doubles each.
 * With n = 0 a channel gets count 0, mean 0 and M2 0. NaN/Inf stay in their own channel.
 */
PYBN_API pybn_status pybn_batch_stats(pybn_view view, const void* x, double* count, double* mean,
                                      double* m2);

/**
 * Merge K partial statistics of the same channels (e.g. from K devices or processes) into the
 * statistics of the union, exactly as if computed over the concatenated data: counts may differ
 * per partial and may be 0 (a partial with count 0 contributes nothing).
 *   k          number of partials, >= 1.
 *   channels   C.
 *   counts, means, m2s   inputs, K x C row-major doubles (row i is partial i).
 *   count, mean, m2      outputs, C doubles each; they may be row 0 of the inputs.
 * A channel whose total count is 0 gets count 0, mean 0, M2 0.
 */
PYBN_API pybn_status pybn_merge_stats(int64_t k, int64_t channels, const double* counts,
                                      const double* means, const double* m2s, double* count,
                                      double* mean, double* m2);

/**
 * Normalise x with given statistics and optionally update running statistics:
 *   y = gamma * (x - mean) / sqrt(M2/count + eps) + beta.
 *   view     layout and dtype of x and y.
 *   x        input, `view`.
 *   count, mean, m2   statistics, C doubles each (from pybn_batch_stats / pybn_merge_stats).
 *            count must be >= 2 for every channel when running_var is given, else >= 1.
 *   gamma, beta   parameters, C values of the parameter dtype; may be NULL (1 and 0).
 *   eps      added to the variance; finite and >= 0.
 *   y        output, `view`; may be x.
 *   running_mean, running_var   parameter dtype, updated in place when non-NULL:
 *            running = (1 - momentum) * running + momentum * batch, using mean and the
 *            unbiased variance M2 / (count - 1). Either may be NULL independently.
 *   momentum in [0, 1]; ignored when both running arrays are NULL.
 *   save_mean, save_invstd   parameter dtype, may be NULL: receive mean and
 *            1 / sqrt(M2/count + eps) rounded to the parameter dtype (what pybn_backward takes).
 */
PYBN_API pybn_status pybn_normalize(pybn_view view, const void* x, const double* count,
                                    const double* mean, const double* m2, const void* gamma,
                                    const void* beta, double eps, void* y, void* running_mean,
                                    void* running_var, double momentum, void* save_mean,
                                    void* save_invstd);

/**
 * Backward reduction, per channel, in a single sweep over (dy, x):
 *   sum_dy = sum(dy),  sum_dy_xmu = sum(dy * (x - mean)),  sum_xmu = sum(x - mean).
 *   view      layout and dtype of dy and x.
 *   mean      C values of the parameter dtype (the saved mean, or running_mean when frozen).
 *   sum_dy, sum_dy_xmu   outputs, C doubles each.
 *   sum_xmu   output, C doubles, may be NULL. In training it carries the part of the batch
 *             mean that rounding `mean` to the parameter dtype lost (sum_xmu / count), which
 *             keeps gradients exact when the mean is far from zero.
 */
PYBN_API pybn_status pybn_backward_reduce(pybn_view view, const void* dy, const void* x,
                                          const void* mean, double* sum_dy, double* sum_dy_xmu,
                                          double* sum_xmu);

/**
 * Backward elementwise step and parameter gradients from (possibly all-reduced) sums.
 *   training=1: mean/invstd are batch statistics of the whole batch of `count` values:
 *     with d = sum_xmu/count (0 if sum_xmu is NULL), S = sum_dy_xmu - d*sum_dy,
 *     dx = gamma*invstd * (dy - sum_dy/count - (x - mean - d) * invstd^2 * S/count),
 *     dgamma = invstd * S,  dbeta = sum_dy.
 *   training=0: mean/invstd are constants (frozen running statistics):
 *     dx = gamma*invstd*dy,  dgamma = invstd * sum_dy_xmu,  dbeta = sum_dy.
 *   view      layout and dtype of dy, x and dx.
 *   dy, x     inputs, `view`; x may be NULL when training=0.
 *   mean      C values of the parameter dtype; may be NULL when training=0.
 *   invstd    C values of the parameter dtype.
 *   gamma     C values of the parameter dtype, may be NULL (1).
 *   count     C doubles, total values per channel of the batch the sums cover (>= 1);
 *             may be NULL when training=0.
 *   sum_dy, sum_dy_xmu   C doubles from pybn_backward_reduce (summed over all parts).
 *   sum_xmu   C doubles, may be NULL (no correction of the mean).
 *   dx        output, `view`, may be NULL (not computed); may be dy or x.
 *   dgamma, dbeta   outputs, C values of the parameter dtype, each may be NULL.
 */
PYBN_API pybn_status pybn_backward_elementwise(pybn_view view, const void* dy, const void* x,
                                               const void* mean, const void* invstd,
                                               const void* gamma, int training,
                                               const double* count, const double* sum_dy,
                                               const double* sum_dy_xmu, const double* sum_xmu,
                                               void* dx, void* dgamma, void* dbeta);

/* ------------------------------- fused entry points (CPU) ---------------------------------- */

/**
 * Training forward: batch statistics, normalisation, optional running-statistics update and
 * optional saving of mean/invstd, in one call (pybn_batch_stats + pybn_normalize).
 *   view      layout and dtype of x and y; needs n = outer*inner >= 2 when channels > 0.
 *   x         input.  gamma, beta: parameter dtype, may be NULL.  eps: finite, >= 0.
 *   running_mean, running_var, momentum, save_mean, save_invstd: as in pybn_normalize.
 *   y         output, may be x.
 */
PYBN_API pybn_status pybn_forward_train(pybn_view view, const void* x, const void* gamma,
                                        const void* beta, double eps, void* running_mean,
                                        void* running_var, double momentum, void* y,
                                        void* save_mean, void* save_invstd);

/**
 * Inference forward with running statistics:
 *   y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.
 *   running_mean, running_var: parameter dtype, required.  gamma, beta: may be NULL.
 *   eps: finite, >= 0.  y: output, may be x. n = 0 is allowed (nothing to compute).
 */
PYBN_API pybn_status pybn_forward_infer(pybn_view view, const void* x, const void* running_mean,
                                        const void* running_var, const void* gamma,
                                        const void* beta, double eps, void* y);

/**
 * Backward of pybn_forward_train (training=1, mean/invstd as saved by it) or of
 * pybn_forward_infer (training=0, mean = running_mean, invstd = 1/sqrt(running_var + eps)):
 * pybn_backward_reduce + pybn_backward_elementwise with count = outer*inner.
 *   dy, x     inputs, `view`.  mean, invstd: parameter dtype.  gamma: may be NULL.
 *   dx        output, may be NULL, dy or x.  dgamma, dbeta: parameter dtype, each may be NULL.
 */
PYBN_API pybn_status pybn_backward(pybn_view view, const void* dy, const void* x,
                                   const void* mean, const void* invstd, const void* gamma,
                                   int training, void* dx, void* dgamma, void* dbeta);

/* ------------------------------------- CUDA entry points ----------------------------------- */
/* Same arguments and semantics as the CPU functions of the same name, on device pointers, plus
 * the stream last. Statistics and sums (double arrays) are device arrays too. */

PYBN_API pybn_status pybn_cuda_batch_stats(pybn_view view, const void* x, double* count,
                                           double* mean, double* m2, void* stream);
PYBN_API pybn_status pybn_cuda_merge_stats(int64_t k, int64_t channels, const double* counts,
                                           const double* means, const double* m2s,
                                           double* count, double* mean, double* m2,
                                           void* stream);
PYBN_API pybn_status pybn_cuda_normalize(pybn_view view, const void* x, const double* count,
                                         const double* mean, const double* m2,
                                         const void* gamma, const void* beta, double eps,
                                         void* y, void* running_mean, void* running_var,
                                         double momentum, void* save_mean, void* save_invstd,
                                         void* stream);
PYBN_API pybn_status pybn_cuda_backward_reduce(pybn_view view, const void* dy, const void* x,
                                               const void* mean, double* sum_dy,
                                               double* sum_dy_xmu, double* sum_xmu,
                                               void* stream);
PYBN_API pybn_status pybn_cuda_backward_elementwise(
    pybn_view view, const void* dy, const void* x, const void* mean, const void* invstd,
    const void* gamma, int training, const double* count, const double* sum_dy,
    const double* sum_dy_xmu, const double* sum_xmu, void* dx, void* dgamma, void* dbeta,
    void* stream);
PYBN_API pybn_status pybn_cuda_forward_train(pybn_view view, const void* x, const void* gamma,
                                             const void* beta, double eps, void* running_mean,
                                             void* running_var, double momentum, void* y,
                                             void* save_mean, void* save_invstd, void* stream);
PYBN_API pybn_status pybn_cuda_forward_infer(pybn_view view, const void* x,
                                             const void* running_mean, const void* running_var,
                                             const void* gamma, const void* beta, double eps,
                                             void* y, void* stream);
PYBN_API pybn_status pybn_cuda_backward(pybn_view view, const void* dy, const void* x,
                                        const void* mean, const void* invstd, const void* gamma,
                                        int training, void* dx, void* dgamma, void* dbeta,
                                        void* stream);

#ifdef __cplusplus
}
#endif

#endif /* PYBN_PYBN_H */
