/* C-level hardening tests of libpybn, built with AddressSanitizer + UndefinedBehaviorSanitizer
 * (LeakSanitizer included) by tests/test_sanitizers.py:
 *   - a table of bad calls per entry point: the status, a message naming the argument, and no
 *     output written (outputs hold a sentinel before and after);
 *   - every CPU entry point, every dtype, both reduction paths, called repeatedly (leaks);
 *   - the non-finite policy: a NaN channel keeps its running statistics, others update;
 *   - threads: concurrent calls give bitwise the sequential results, and each thread's
 *     pybn_last_error() is its own;
 *   - the CUDA entry points in a build without CUDA report PYBN_ERROR_NOT_COMPILED.
 * Exit code 0 when every check passed; each failure is printed. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pybn/pybn.h>

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                              \
    do {                                                              \
        __atomic_fetch_add(&checks, 1, __ATOMIC_RELAXED);             \
        if (!(cond)) {                                                \
            __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);       \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);      \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, " [last error: %s]\n", pybn_last_error()); \
        }                                                             \
    } while (0)

static pybn_view view_of(int64_t outer, int64_t channels, int64_t inner, int dtype) {
    pybn_view v;
    v.outer = outer;
    v.channels = channels;
    v.inner = inner;
    v.dtype = (pybn_dtype)dtype;
    return v;
}

/* ------------------------------------ bad-call table ------------------------------------- */

enum { C = 3, N = 24 }; /* (2, 3, 4) float32 */
static float x[N], y[N], dy[N], dx[N];
static float rm[C], rv[C], mean_f[C], invstd_f[C], g[C], dg[C], db[C];
static double cnt[C], mean_d[C], m2_d[C], s0[C], s1[C], s2[C];

static void fill_sentinels(void) {
    for (int i = 0; i < N; ++i) {
        x[i] = (float)(i % 7) - 3.0f;
        dy[i] = (float)(i % 5) - 2.0f;
        y[i] = dx[i] = 7.0f;
    }
    for (int c = 0; c < C; ++c) {
        rm[c] = rv[c] = mean_f[c] = invstd_f[c] = dg[c] = db[c] = 5.0f;
        g[c] = 1.0f;
        cnt[c] = 8.0;
        mean_d[c] = 0.5;
        m2_d[c] = 4.0;
        s0[c] = s1[c] = s2[c] = 5.0;
    }
}

static int untouched(void) {
    for (int i = 0; i < N; ++i)
        if (y[i] != 7.0f || dx[i] != 7.0f) return 0;
    for (int c = 0; c < C; ++c)
        if (rm[c] != 5.0f || rv[c] != 5.0f || mean_f[c] != 5.0f || invstd_f[c] != 5.0f ||
            dg[c] != 5.0f || db[c] != 5.0f || s0[c] != 5.0 || s1[c] != 5.0 || s2[c] != 5.0)
            return 0;
    return 1;
}

typedef struct {
    const char* name;
    pybn_status expected;
    const char* message; /* a substring of pybn_last_error() */
} Case;

static void expect(const Case* k, pybn_status got) {
    CHECK(got == k->expected, "%s: status %d (%s), expected %d", k->name, (int)got,
          pybn_status_string(got), (int)k->expected);
    CHECK(strstr(pybn_last_error(), k->message) != NULL, "%s: message lacks \"%s\"", k->name,
          k->message);
    CHECK(untouched(), "%s: a failed call wrote an output", k->name);
}

static void bad_call_table(void) {
    const pybn_view v = view_of(2, C, 4, PYBN_FLOAT32);
    const double nan = NAN, inf = INFINITY;
    pybn_view neg = v, huge = v, dt = v, one = view_of(1, C, 1, PYBN_FLOAT32),
               none = view_of(0, C, 1, PYBN_FLOAT32);
    neg.inner = -4;
    huge.outer = (int64_t)1 << 40;
    huge.inner = (int64_t)1 << 40;
    dt.dtype = (pybn_dtype)9;
    Case k;

#define RUN(NAME, STATUS, MSG, CALL)   \
    do {                               \
        fill_sentinels();              \
        k.name = NAME;                 \
        k.expected = STATUS;           \
        k.message = MSG;               \
        expect(&k, CALL);              \
    } while (0)

    /* pybn_batch_stats */
    RUN("stats x NULL", PYBN_ERROR_INVALID_ARGUMENT, "x must not be NULL",
        pybn_batch_stats(v, NULL, s0, s1, s2));
    RUN("stats mean NULL", PYBN_ERROR_INVALID_ARGUMENT, "mean must not be NULL",
        pybn_batch_stats(v, x, s0, NULL, s2));
    RUN("stats negative", PYBN_ERROR_INVALID_ARGUMENT, "inner=-4", pybn_batch_stats(neg, x, s0, s1, s2));
    RUN("stats overflow", PYBN_ERROR_INVALID_ARGUMENT, "overflows", pybn_batch_stats(huge, x, s0, s1, s2));
    RUN("stats dtype", PYBN_ERROR_UNSUPPORTED_DTYPE, "dtype", pybn_batch_stats(dt, x, s0, s1, s2));
    /* pybn_merge_stats */
    RUN("merge k=0", PYBN_ERROR_INVALID_ARGUMENT, "k must be >= 1, got 0",
        pybn_merge_stats(0, C, cnt, mean_d, m2_d, s0, s1, s2));
    RUN("merge channels<0", PYBN_ERROR_INVALID_ARGUMENT, "channels",
        pybn_merge_stats(1, -1, cnt, mean_d, m2_d, s0, s1, s2));
    RUN("merge counts NULL", PYBN_ERROR_INVALID_ARGUMENT, "counts must not be NULL",
        pybn_merge_stats(1, C, NULL, mean_d, m2_d, s0, s1, s2));
    RUN("merge k overflow", PYBN_ERROR_INVALID_ARGUMENT, "overflow",
        pybn_merge_stats((int64_t)1 << 62, C, cnt, mean_d, m2_d, s0, s1, s2));
    /* pybn_normalize */
    RUN("normalize eps NaN", PYBN_ERROR_INVALID_VALUE, "eps must be a finite number >= 0, got nan",
        pybn_normalize(v, x, cnt, mean_d, m2_d, g, NULL, nan, y, rm, rv, 0.1, mean_f, invstd_f));
    RUN("normalize eps inf", PYBN_ERROR_INVALID_VALUE, "eps must be",
        pybn_normalize(v, x, cnt, mean_d, m2_d, g, NULL, inf, y, rm, rv, 0.1, mean_f, invstd_f));
    RUN("normalize momentum NaN", PYBN_ERROR_INVALID_VALUE, "momentum must be in [0, 1], got nan",
        pybn_normalize(v, x, cnt, mean_d, m2_d, g, NULL, 1e-5, y, rm, rv, nan, mean_f, invstd_f));
    RUN("normalize momentum 2", PYBN_ERROR_INVALID_VALUE, "momentum must be in [0, 1], got 2",
        pybn_normalize(v, x, cnt, mean_d, m2_d, g, NULL, 1e-5, y, rm, rv, 2.0, mean_f, invstd_f));
    RUN("normalize y NULL", PYBN_ERROR_INVALID_ARGUMENT, "y must not be NULL",
        pybn_normalize(v, x, cnt, mean_d, m2_d, g, NULL, 1e-5, NULL, rm, rv, 0.1, mean_f, invstd_f));
    RUN("normalize count NULL", PYBN_ERROR_INVALID_ARGUMENT, "count must not be NULL",
        pybn_normalize(v, x, NULL, mean_d, m2_d, g, NULL, 1e-5, y, rm, rv, 0.1, mean_f, invstd_f));
    /* pybn_backward_reduce / pybn_backward_elementwise */
    RUN("reduce dy NULL", PYBN_ERROR_INVALID_ARGUMENT, "dy must not be NULL",
        pybn_backward_reduce(v, NULL, x, mean_f, s0, s1, s2));
    RUN("reduce mean NULL", PYBN_ERROR_INVALID_ARGUMENT, "mean must not be NULL",
        pybn_backward_reduce(v, dy, x, NULL, s0, s1, s2));
    RUN("reduce dtype", PYBN_ERROR_UNSUPPORTED_DTYPE, "dtype",
        pybn_backward_reduce(dt, dy, x, mean_f, s0, s1, s2));
    RUN("elementwise invstd NULL", PYBN_ERROR_INVALID_ARGUMENT, "invstd must not be NULL",
        pybn_backward_elementwise(v, dy, x, mean_f, NULL, g, 1, cnt, s0, s1, NULL, dx, dg, db));
    RUN("elementwise count NULL", PYBN_ERROR_INVALID_ARGUMENT, "count must not be NULL",
        pybn_backward_elementwise(v, dy, x, mean_f, invstd_f, g, 1, NULL, s0, s1, NULL, dx, dg, db));
    /* fused */
    RUN("train too few", PYBN_ERROR_TOO_FEW_VALUES, "at least 2 values per channel, got 1",
        pybn_forward_train(one, x, g, NULL, 1e-5, rm, rv, 0.1, y, mean_f, invstd_f));
    RUN("train x NULL", PYBN_ERROR_INVALID_ARGUMENT, "x must not be NULL",
        pybn_forward_train(v, NULL, g, NULL, 1e-5, rm, rv, 0.1, y, mean_f, invstd_f));
    RUN("train eps<0", PYBN_ERROR_INVALID_VALUE, "got -1",
        pybn_forward_train(v, x, g, NULL, -1.0, rm, rv, 0.1, y, mean_f, invstd_f));
    RUN("infer running_var NULL", PYBN_ERROR_INVALID_ARGUMENT, "running_var must not be NULL",
        pybn_forward_infer(v, x, rm, NULL, g, NULL, 1e-5, y));
    RUN("backward too few", PYBN_ERROR_TOO_FEW_VALUES, "at least 1 value per channel, got 0",
        pybn_backward(none, dy, x, mean_f, invstd_f, g, 1, dx, dg, db));
    RUN("train none", PYBN_ERROR_TOO_FEW_VALUES, "at least 1 value per channel, got 0",
        pybn_forward_train(none, x, g, NULL, 1e-5, rm, NULL, 0.1, y, mean_f, invstd_f));
    RUN("backward invstd NULL", PYBN_ERROR_INVALID_ARGUMENT, "invstd must not be NULL",
        pybn_backward(v, dy, x, mean_f, NULL, g, 1, dx, dg, db));
    /* CUDA twins in a build without CUDA (with CUDA they check pointers first) */
    if (!pybn_has_cuda()) {
        RUN("cuda not compiled", PYBN_ERROR_NOT_COMPILED, "CUDA",
            pybn_cuda_forward_train(v, x, g, NULL, 1e-5, rm, rv, 0.1, y, mean_f, invstd_f, NULL));
    }
    /* unknown instruction set / thread count */
    RUN("isa unknown", PYBN_ERROR_INVALID_ARGUMENT, "got 'sse9'", pybn_set_cpu_isa("sse9"));
    RUN("threads -1", PYBN_ERROR_INVALID_VALUE, "got -1", pybn_set_num_threads(-1));
    /* statistics that cannot be counts */
    fill_sentinels();
    cnt[1] = 1.0;
    k.name = "normalize count 1 with running_var";
    k.expected = PYBN_ERROR_TOO_FEW_VALUES;
    k.message = "count[1] must be >= 2, got 1";
    expect(&k, pybn_normalize(v, x, cnt, mean_d, m2_d, g, NULL, 1e-5, y, rm, rv, 0.1, mean_f, invstd_f));
    fill_sentinels();
    cnt[2] = NAN;
    k.name = "elementwise count NaN";
    k.expected = PYBN_ERROR_INVALID_VALUE;
    k.message = "count[2] must be >= 1, got nan";
    expect(&k, pybn_backward_elementwise(v, dy, x, mean_f, invstd_f, g, 1, cnt, s0, s1, NULL, dx, dg, db));
#undef RUN
}

/* ----------------------------- every entry point, repeatedly ----------------------------- */

static void* alloc(size_t n) {
    void* p = calloc(n ? n : 1, 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static void fill_values(void* p, int64_t n, int dtype, unsigned seed) {
    for (int64_t i = 0; i < n; ++i) {
        const float f = (float)((int)((seed + 7u * (unsigned)i) % 17u) - 8) * 0.25f + 100.0f;
        if (dtype == PYBN_FLOAT32) ((float*)p)[i] = f;
        else if (dtype == PYBN_FLOAT64) ((double*)p)[i] = f;
        else if (dtype == PYBN_BFLOAT16) {
            uint32_t u;
            memcpy(&u, &f, 4);
            ((uint16_t*)p)[i] = (uint16_t)(u >> 16);
        } else { /* float16, exact for these values: in [64, 128) the step is 1/16 */
            ((uint16_t*)p)[i] = (uint16_t)(0x5400 + (int)((f - 64.0f) * 16.0f));
        }
    }
}

static void every_entry_point(int64_t outer, int64_t channels, int64_t inner, int dtype, int reps) {
    const size_t es = dtype == PYBN_FLOAT64 ? 8 : dtype == PYBN_FLOAT32 ? 4 : 2;
    const size_t ps = dtype == PYBN_FLOAT64 ? 8 : 4;
    const int64_t n = outer * channels * inner;
    const pybn_view v = view_of(outer, channels, inner, dtype);
    void *xv = alloc(n * es), *yv = alloc(n * es), *gv = alloc(n * es), *dxv = alloc(n * es);
    void *p_rm = alloc(channels * ps), *p_rv = alloc(channels * ps), *p_m = alloc(channels * ps),
         *p_r = alloc(channels * ps), *p_dg = alloc(channels * ps), *p_db = alloc(channels * ps);
    double *c = alloc(channels * 8), *m = alloc(channels * 8), *q = alloc(channels * 8);
    double *a = alloc(channels * 8), *b = alloc(channels * 8), *d = alloc(channels * 8);
    double *kc = alloc(2 * channels * 8), *km = alloc(2 * channels * 8), *kq = alloc(2 * channels * 8);
    fill_values(xv, n, dtype, 1);
    fill_values(gv, n, dtype, 5);
    for (int r = 0; r < reps; ++r) {
        pybn_status st;
        CHECK((st = pybn_batch_stats(v, xv, c, m, q)) == PYBN_SUCCESS, "batch_stats %d", st);
        memcpy(kc, c, channels * 8);
        memcpy(kc + channels, c, channels * 8);
        memcpy(km, m, channels * 8);
        memcpy(km + channels, m, channels * 8);
        memcpy(kq, q, channels * 8);
        memcpy(kq + channels, q, channels * 8);
        CHECK(pybn_merge_stats(2, channels, kc, km, kq, c, m, q) == PYBN_SUCCESS, "merge_stats");
        CHECK(pybn_forward_infer(v, xv, p_rm, p_rv, NULL, NULL, 1e-5, yv) == PYBN_SUCCESS, "forward_infer");
        if (outer * inner < 2) { /* an empty batch: statistics and inference only */
            CHECK(c[0] == 0 && m[0] == 0 && q[0] == 0, "empty statistics must be 0");
            CHECK(pybn_forward_train(v, xv, NULL, NULL, 1e-5, p_rm, p_rv, 0.1, yv, p_m, p_r) ==
                      PYBN_ERROR_TOO_FEW_VALUES, "training on an empty batch");
            continue;
        }
        CHECK(pybn_normalize(v, xv, c, m, q, NULL, NULL, 1e-5, yv, p_rm, p_rv, 0.1, p_m, p_r) ==
                  PYBN_SUCCESS, "normalize");
        CHECK(pybn_backward_reduce(v, gv, xv, p_m, a, b, d) == PYBN_SUCCESS, "backward_reduce");
        CHECK(pybn_backward_elementwise(v, gv, xv, p_m, p_r, NULL, 1, c, a, b, d, dxv, p_dg, p_db) ==
                  PYBN_SUCCESS, "backward_elementwise");
        CHECK(pybn_forward_train(v, xv, NULL, NULL, 1e-5, p_rm, p_rv, 0.1, yv, p_m, p_r) == PYBN_SUCCESS,
              "forward_train");
        CHECK(pybn_forward_infer(v, xv, p_rm, p_rv, NULL, NULL, 1e-5, yv) == PYBN_SUCCESS, "forward_infer");
        CHECK(pybn_backward(v, gv, xv, p_m, p_r, NULL, 1, dxv, p_dg, p_db) == PYBN_SUCCESS, "backward");
        CHECK(pybn_backward(v, gv, xv, p_m, p_r, NULL, 0, gv, NULL, NULL) == PYBN_SUCCESS, "backward in place");
    }
    free(xv), free(yv), free(gv), free(dxv), free(p_rm), free(p_rv), free(p_m), free(p_r);
    free(p_dg), free(p_db), free(c), free(m), free(q), free(a), free(b), free(d);
    free(kc), free(km), free(kq);
}

/* ------------------------------------ non-finite data ------------------------------------ */

static void non_finite_policy(void) {
    float xs[2 * 3 * 4], ys[2 * 3 * 4], r_m[3] = {1, 1, 1}, r_v[3] = {2, 2, 2};
    for (int i = 0; i < 24; ++i) xs[i] = (float)(i % 5);
    xs[4 + 1] = NAN;      /* channel 1, sample 0 */
    xs[12 + 8 + 2] = INFINITY; /* channel 2, sample 1 */
    CHECK(pybn_forward_train(view_of(2, 3, 4, PYBN_FLOAT32), xs, NULL, NULL, 1e-5, r_m, r_v, 0.5, ys,
                             NULL, NULL) == PYBN_SUCCESS, "forward_train with NaN");
    CHECK(r_m[1] == 1 && r_v[1] == 2 && r_m[2] == 1 && r_v[2] == 2,
          "non-finite channels must keep their running statistics");
    CHECK(r_m[0] != 1 && r_v[0] != 2 && isfinite(r_m[0]) && isfinite(r_v[0]),
          "the finite channel must update");
    for (int o = 0; o < 2; ++o)
        for (int i = 0; i < 4; ++i) {
            CHECK(isfinite(ys[o * 12 + i]), "NaN leaked into channel 0");
            CHECK(isnan(ys[o * 12 + 4 + i]), "channel 1 must be NaN");
        }
}

/* ---------------------------------------- threads ---------------------------------------- */

enum { TN = 8, TO = 16, TC = 5, TI = 40 };
static float tx[TN][TO * TC * TI], ty[TN][TO * TC * TI], ty_seq[TN][TO * TC * TI];
static pthread_barrier_t barrier;

static void* worker(void* arg) {
    const int t = (int)(intptr_t)arg;
    const pybn_view v = view_of(TO, TC, t % 2 ? TI : 1, PYBN_FLOAT32);
    pybn_view bad = v;
    bad.outer = -1 - t; /* each thread's own error */
    char expect_msg[64];
    snprintf(expect_msg, sizeof expect_msg, "outer=%d", -1 - t);
    CHECK(pybn_batch_stats(bad, tx[t], s0, s1, s2) == PYBN_ERROR_INVALID_ARGUMENT, "thread error");
    pthread_barrier_wait(&barrier); /* every thread has failed its own way */
    for (int r = 0; r < 20; ++r)
        CHECK(pybn_forward_train(v, tx[t], NULL, NULL, 1e-5, NULL, NULL, 0.1, ty[t], NULL, NULL) ==
                  PYBN_SUCCESS, "thread forward_train");
    CHECK(strstr(pybn_last_error(), expect_msg) != NULL, "thread %d: last error clobbered: %s", t,
          pybn_last_error());
    return NULL;
}

static void threads(void) {
    for (int t = 0; t < TN; ++t) {
        fill_values(tx[t], TO * TC * TI, PYBN_FLOAT32, (unsigned)t * 3u + 1u);
        const pybn_view v = view_of(TO, TC, t % 2 ? TI : 1, PYBN_FLOAT32);
        CHECK(pybn_forward_train(v, tx[t], NULL, NULL, 1e-5, NULL, NULL, 0.1, ty_seq[t], NULL, NULL) ==
                  PYBN_SUCCESS, "sequential forward_train");
    }
    pthread_t th[TN];
    pthread_barrier_init(&barrier, NULL, TN);
    for (int t = 0; t < TN; ++t) pthread_create(&th[t], NULL, worker, (void*)(intptr_t)t);
    for (int t = 0; t < TN; ++t) pthread_join(th[t], NULL);
    pthread_barrier_destroy(&barrier);
    for (int t = 0; t < TN; ++t)
        CHECK(memcmp(ty[t], ty_seq[t], sizeof ty[t]) == 0, "thread %d: result differs from sequential", t);
}

int main(void) {
    bad_call_table();
    const int dtypes[4] = {PYBN_FLOAT32, PYBN_FLOAT64, PYBN_FLOAT16, PYBN_BFLOAT16};
    for (int k = 0; k < 4; ++k) {
        every_entry_point(6, 3, 50, dtypes[k], 20);  /* row path (inner >= 32)  */
        every_entry_point(4, 12, 700, dtypes[k], 3); /* per-core channel blocks (>= 4 channels a thread), threaded */
        every_entry_point(70, 5, 1, dtypes[k], 20);  /* column path (channels-last) */
        every_entry_point(3, 2, 17, dtypes[k], 5);   /* short rows, vector tails */
        every_entry_point(0, 4, 3, dtypes[k], 1);    /* empty batch */
    }
    non_finite_policy();
    threads();
    printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
