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
 * Data types. x, y, dy and dx have the view's dtype (PYBN_FLOAT32, PYBN_FLOAT64, PYBN_FLOAT16 or
 *   PYBN_BFLOAT16; any other value is PYBN_ERROR_UNSUPPORTED_DTYPE). Per-channel "parameter" arrays (gamma,
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
 *   Errors on the GPU: arguments, the workspace and the launch plan (grid sizes, computed on the
 *   host) are checked before any work is queued, so a call that returns an error has queued
 *   nothing and written nothing. Out of device memory (level-1 entry points, which allocate their
 *   workspace) is PYBN_ERROR_OUT_OF_MEMORY; the runtime's last-error slot is cleared, so no later
 *   call reports it. A fault while the queued work runs (e.g. a pointer to too little memory)
 *   surfaces at a later synchronisation and leaves every output and running statistic of the
 *   call undefined. Values in device arrays are not read on the host: the counts of given
 *   statistics and sums must obey the CPU's rules (count >= 1, >= 2 with an unbiased running_var
 *   update; merge counts >= 0) - the Python layer checks them for you.
 *   Driver: a library built with the CUDA 13 toolkit (the wheels) needs an NVIDIA driver r580 or
 *   newer; with an older driver build from source with the CUDA toolkit it supports (CUDA 12:
 *   r525+). A too-old driver is PYBN_ERROR_CUDA with a message naming both versions.
 *
 * ---------------------------------------------------------------------------------------------
 * ABI policy
 * ---------------------------------------------------------------------------------------------
 * The ABI is append-only. No function, struct layout or enum value is ever removed, reordered or
 * given another meaning; enum values are never reused. PYBN_ABI_VERSION (also
 * pybn_abi_version()) is the ABI level: it grows by one when a level adds entry points or
 * parameter blocks, and a library of level N provides every function of levels 1..N, so a
 * program built against level k runs with any library whose pybn_abi_version() >= k.
 *   Level 1: the positional entry points (pybn_forward_train, pybn_backward, ...); their
 *            `int training` arguments read any non-zero value as 1.
 *   Level 2: parameter blocks (pybn_forward_params, pybn_backward_params) and the *_v2 entry
 *            points; the running-variance convention (running_var_correction); CUDA entry
 *            points with a caller-provided workspace (no allocation, CUDA-graph capturable).
 * Parameter blocks. Each operation family takes one struct whose first field, `size`, is
 * sizeof() the struct as the caller compiled it (the PYBN_*_PARAMS_INIT initialisers set it and
 * every documented default). Later levels only append fields: the library reads the first
 * `size` bytes, gives fields beyond them their documented defaults, and refuses (status
 * PYBN_ERROR_INVALID_ARGUMENT) a `size` smaller than the level-2 struct, or a larger one whose
 * bytes past the fields it knows are not all zero (an option this library cannot honour).
 * Fields of level 2 are documented in the struct; a field marked "reserved" must be 0.
 * The level-1 entry points are thin wrappers over the level-2 ones (same results, bit for bit).
 */
#ifndef PYBN_PYBN_H
#define PYBN_PYBN_H

#include <stddef.h>
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
#define PYBN_ABI_VERSION 2

/** Status of every call. Append-only: values are never reordered or reused. */
typedef enum pybn_status {
    PYBN_SUCCESS = 0,
    PYBN_ERROR_INVALID_ARGUMENT = 1, /* NULL pointer, negative or overflowing size, bad params
                                        block, unknown CPU path name, inconsistent options     */
    PYBN_ERROR_UNSUPPORTED_DTYPE = 2, /* dtype value unknown to this library                   */
    PYBN_ERROR_INVALID_VALUE = 3,    /* a value out of range: eps < 0 / non-finite, momentum
                                        outside [0, 1] or NaN, a flag not 0 / 1, an unknown
                                        activation, renorm limits, a given count < 1, a CPU
                                        path this CPU lacks, a negative thread count            */
    PYBN_ERROR_TOO_FEW_VALUES = 4,   /* too few values per channel (see running_var_correction) */
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
 *  picks a lower one (e.g. to test it); a name that is not a supported path is reported once on
 *  stderr ("pybn: warning: ...") and the best path is used. */
PYBN_API const char* pybn_cpu_isa(void);
/** Comma-separated names of the compiled paths this CPU supports, best first. */
PYBN_API const char* pybn_cpu_isas(void);
/** Use the CPU path `name` (one of pybn_cpu_isas()) for later calls; NULL or "" picks the best.
 *  Not meant to be called while other threads run pybn kernels. */
PYBN_API pybn_status pybn_set_cpu_isa(const char* name);
/** Threads the CPU kernels use: n >= 1, or 0 for the default (OMP_NUM_THREADS, else the number
 *  of cores); n < 0: PYBN_ERROR_INVALID_VALUE. Results are bitwise identical for every thread
 *  count. */
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
 * optional saving of mean/invstd, in one call (pybn_batch_stats + pybn_normalize). The running
 * variance takes the unbiased batch variance (PyTorch); pybn_forward_v2 has the other convention.
 *   view      layout and dtype of x and y; needs n = outer*inner >= 2 when channels > 0 and
 *             running_var is given, else n >= 1 (one value per channel: y = beta).
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
 * pybn_backward_reduce + pybn_backward_elementwise with count = outer*inner. In training it
 * needs n = outer*inner >= 1 when channels > 0.
 *   dy, x     inputs, `view`.  mean, invstd: parameter dtype.  gamma: may be NULL.
 *   dx        output, may be NULL, dy or x.  dgamma, dbeta: parameter dtype, each may be NULL.
 */
PYBN_API pybn_status pybn_backward(pybn_view view, const void* dy, const void* x,
                                   const void* mean, const void* invstd, const void* gamma,
                                   int training, void* dx, void* dgamma, void* dbeta);

/* ------------------------------------- CUDA entry points ----------------------------------- */
/* (level 1; the level-2 forms with a caller workspace are at the end of this header) */
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

/* ============================== ABI level 2: parameter blocks ================================ */

/** Activation applied after the affine step (and after adding a residual). Append-only. */
typedef enum pybn_activation {
    PYBN_ACTIVATION_NONE = 0,
    /* y = max(0, v), NaN kept; backward: dy where y > 0, else 0 (0 at the tie y == 0, as in
     * PyTorch's ReLU) */
    PYBN_ACTIVATION_RELU = 1
} pybn_activation;

/**
 * Parameters of the forward family: training forward (batch statistics), normalisation with
 * given statistics (pybn_normalize), inference forward (running statistics).
 * Initialise with PYBN_FORWARD_PARAMS_INIT, then set what differs. The mode:
 *   training = 1, count/mean/m2 NULL:  statistics of x itself (pybn_forward_train);
 *   training = 1, count/mean/m2 given: normalise with those statistics, e.g. merged across
 *                                      devices (pybn_normalize);
 *   training = 0:                      normalise with running_mean / running_var, both
 *                                      required and only read (pybn_forward_infer);
 *                                      count/mean/m2 must be NULL.
 */
typedef struct pybn_forward_params {
    size_t size;           /* sizeof(pybn_forward_params) (see "Parameter blocks")            */
    int32_t training;      /* 1: batch statistics (default); 0: running statistics             */
    /* running_var update: running_var = (1 - momentum) * running_var
     * + momentum * M2 / (count - running_var_correction), i.e.
     *   1 (default): unbiased batch variance (PyTorch, cuDNN);
     *   0:           biased batch variance (ONNX, ONNX Runtime, Keras/TF, Flax, PaddlePaddle).
     * The normalisation itself always uses the biased variance M2 / count. Training needs
     * count >= 2 per channel when running_var is updated with correction 1, else count >= 1
     * (with one value per channel, y = beta). Must be 0 or 1.                                 */
    int32_t running_var_correction;
    const void* gamma;     /* C values of the parameter dtype; NULL: 1 (default NULL)          */
    const void* beta;      /* C values of the parameter dtype; NULL: 0 (default NULL)          */
    double eps;            /* added to the variance; finite, >= 0 (default 1e-5)               */
    void* running_mean;    /* parameter dtype, C values. training: updated in place when
                              non-NULL, (1 - momentum) * running + momentum * mean;
                              training = 0: required, read only (default NULL)                 */
    void* running_var;     /* likewise, with the variance convention above (default NULL)      */
    double momentum;       /* in [0, 1]; used when a running array is updated (default 0.1)    */
    void* save_mean;       /* parameter dtype, C values, may be NULL: receives the mean used
                              (batch mean, or running_mean when training = 0) (default NULL)   */
    void* save_invstd;     /* likewise 1 / sqrt(var + eps), what pybn_backward_v2 takes        */
    const double* count;   /* given statistics (training = 1 only): C doubles each, from
                              pybn_batch_stats / pybn_merge_stats; all three or none           */
    const double* mean;
    const double* m2;
    /* Fused epilogue: y = activation(gamma * x_hat + beta + residual), in the same sweep.       */
    int32_t activation;    /* a pybn_activation (default PYBN_ACTIVATION_NONE)                 */
    int32_t reserved;      /* must be 0                                                        */
    const void* residual;  /* `view` and dtype of x, may be NULL (none); may not overlap y
                              unless it is y itself (default NULL)                             */
    /* Batch renormalisation (Ioffe 2017; training with both running statistics):
     *   y = gamma * (r * x_hat + d) + beta,  sigma = sqrt(var + eps),
     *   r = clip(sigma_batch / sigma_running, 1 / renorm_r_max, renorm_r_max),
     *   d = clip((mean_batch - running_mean) / sigma_running, -renorm_d_max, renorm_d_max),
     * with the running statistics as they were before this call updates them (as usual).
     * renorm_r_max = 0: off (default); else finite and >= 1, and renorm_d_max finite, >= 0.
     * save_renorm_r / save_renorm_d (parameter dtype, C values, may be NULL) receive r and d,
     * which pybn_backward_v2 takes as constants (pybn_backward_params.renorm_r / renorm_d).   */
    double renorm_r_max;
    double renorm_d_max;
    void* save_renorm_r;
    void* save_renorm_d;
    /* Ghost (virtual) batches (Hoffer et al. 2017; cf. Keras's virtual_batch_size, which groups
     * strided samples: see docs/conventions.md for the exact mapping), training with
     * batch statistics only: the view's outer rows are split into virtual_batches = G equal,
     * contiguous groups (outer must be a multiple of G; with the batch axis outermost, each
     * group is outer / G consecutive samples), and each group is normalised with its own
     * statistics. save_mean / save_invstd then hold G x C values (row g: group g), what
     * pybn_backward_v2 takes with the same virtual_batches. The running statistics are updated
     * once per call: mean_batch is the average of the group means, var_batch the average of the
     * group variances M2_g / (n_g - running_var_correction) (Keras's rule). Each group needs
     * the values per channel a training batch needs. 0 or 1: one batch (default 0). Not with
     * given statistics or batch renormalisation.                                              */
    int64_t virtual_batches;
} pybn_forward_params;

#define PYBN_FORWARD_PARAMS_INIT \
    { sizeof(pybn_forward_params), 1, 1, NULL, NULL, 1e-5, NULL, NULL, 0.1, NULL, NULL, NULL, NULL, NULL, \
      PYBN_ACTIVATION_NONE, 0, NULL, 0.0, 0.0, NULL, NULL, 0 }

/**
 * Parameters of the backward family: the fused backward (pybn_backward: it reduces dy and x
 * itself) or the elementwise step from given sums (pybn_backward_elementwise: sum_dy and
 * sum_dy_xmu given, e.g. all-reduced across devices). Initialise with PYBN_BACKWARD_PARAMS_INIT.
 *   training = 1: mean / invstd are the batch statistics saved by the training forward;
 *   training = 0: they are constants (frozen running statistics): dx = gamma * invstd * dy.
 */
typedef struct pybn_backward_params {
    size_t size;           /* sizeof(pybn_backward_params)                                     */
    int32_t training;      /* 1 (default) or 0, as above                                       */
    int32_t activation;    /* the forward's pybn_activation: with PYBN_ACTIVATION_RELU the
                              gradient reaching the BN is dy * (y > 0), y required             */
    const void* mean;      /* parameter dtype, C values: the saved mean (or running_mean).
                              Required, except with given sums and training = 0                */
    const void* invstd;    /* parameter dtype, C values: 1 / sqrt(var + eps). Required         */
    const void* gamma;     /* parameter dtype, may be NULL (1)                                 */
    void* dgamma;          /* outputs, parameter dtype, C values; each may be NULL             */
    void* dbeta;
    /* Given sums (all NULL: the fused backward computes them). sum_dy and sum_dy_xmu: C doubles
     * from pybn_backward_reduce; sum_xmu may be NULL (no correction of a rounded mean); count:
     * C doubles, the values per channel the sums cover (>= 1), required when training = 1.     */
    const double* count;
    const double* sum_dy;
    const double* sum_dy_xmu;
    const double* sum_xmu;
    const void* y;         /* the forward's output (`view`, x's dtype): required with
                              PYBN_ACTIVATION_RELU, else ignored (default NULL)                */
    void* dresidual;       /* `view`, may be NULL: receives the residual's gradient, dy masked
                              by the activation, in the same sweep as dx (default NULL)        */
    const void* renorm_r;  /* a renormalised forward's r and d (parameter dtype, C values; both
                              or neither; training = 1): constants of the backward, so
                              dx uses gamma * r and dgamma = r * sum(dy x_hat) + d * sum(dy)   */
    const void* renorm_d;
    /* The forward's virtual_batches G (fused backward, training = 1 only): mean and invstd hold
     * G x C values, each group differentiated through its own statistics; dgamma / dbeta sum
     * over the groups. 0 or 1: one batch (default 0).                                          */
    int64_t virtual_batches;
} pybn_backward_params;

#define PYBN_BACKWARD_PARAMS_INIT \
    { sizeof(pybn_backward_params), 1, PYBN_ACTIVATION_NONE, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
      NULL, NULL, NULL, NULL, NULL, 0 }

/**
 * Forward, CPU: y from x (`view`) as `params` says (mode, statistics, running-statistics update,
 * saved mean / invstd). y may be x. Needs n = outer * inner >= 1 per channel in training (>= 2
 * with an unbiased running_var update) when channels > 0; n = 0 is fine in inference.
 */
PYBN_API pybn_status pybn_forward_v2(pybn_view view, const void* x, void* y,
                                     const pybn_forward_params* params);

/**
 * Backward, CPU: dx from dy and x (`view`), and dgamma / dbeta, as `params` says. dx may be
 * NULL (parameter gradients only), dy or x. x may be NULL with given sums and training = 0.
 * With PYBN_ACTIVATION_RELU the fused backward reads y as well (one sweep less than BN
 * backward after a separate ReLU backward). With given sums the sums must be those of the
 * masked gradient (sum over dy * (y > 0)); dresidual may be dy.
 */
PYBN_API pybn_status pybn_backward_v2(pybn_view view, const void* dy, const void* x, void* dx,
                                      const pybn_backward_params* params);

/**
 * CUDA, level 2: the same operations on device pointers with a caller-provided device
 * workspace, so that a call allocates nothing (it can be captured in a CUDA graph, and it
 * cannot fail for lack of memory once its arguments are checked). Ask the size first: it
 * depends only on the view (and the mode), is computed on the host, and needs no GPU.
 * `workspace` must be device memory of at least that many bytes, aligned to 256 bytes (what
 * cudaMalloc and the CuPy pool return), used only by work queued on `stream`; it may be NULL
 * when the size is 0. It holds temporaries only: it may be reused once the call's work on
 * `stream` is done.
 */
PYBN_API pybn_status pybn_cuda_forward_workspace_size(pybn_view view,
                                                      const pybn_forward_params* params,
                                                      size_t* bytes);
PYBN_API pybn_status pybn_cuda_forward_v2(pybn_view view, const void* x, void* y,
                                          const pybn_forward_params* params, void* workspace,
                                          size_t workspace_bytes, void* stream);
PYBN_API pybn_status pybn_cuda_backward_workspace_size(pybn_view view,
                                                       const pybn_backward_params* params,
                                                       size_t* bytes);
PYBN_API pybn_status pybn_cuda_backward_v2(pybn_view view, const void* dy, const void* x, void* dx,
                                           const pybn_backward_params* params, void* workspace,
                                           size_t workspace_bytes, void* stream);
/** Workspace of the two reductions below (batch statistics, backward sums) for `view`. */
PYBN_API pybn_status pybn_cuda_reduce_workspace_size(pybn_view view, size_t* bytes);
PYBN_API pybn_status pybn_cuda_batch_stats_v2(pybn_view view, const void* x, double* count,
                                              double* mean, double* m2, void* workspace,
                                              size_t workspace_bytes, void* stream);
PYBN_API pybn_status pybn_cuda_backward_reduce_v2(pybn_view view, const void* dy, const void* x,
                                                  const void* mean, double* sum_dy,
                                                  double* sum_dy_xmu, double* sum_xmu,
                                                  void* workspace, size_t workspace_bytes,
                                                  void* stream);

#ifdef __cplusplus
}
#endif

#endif /* PYBN_PYBN_H */
