/* Level 1 (positional entry points, kept for existing programs; train_step.c is the level-2
 * form). A training forward and backward through the C ABI on a small buffer, checked against values
 * worked out by hand. x is (N=2, C=1, L=2) = {1, 2, 3, 6}: mean 3, biased variance 3.5. */
#include <math.h>
#include <stdio.h>

#include <pybn/pybn.h>

static int check(const char* what, double got, double want) {
    if (fabs(got - want) > 1e-5 * (1.0 + fabs(want))) {
        printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
        return 1;
    }
    return 0;
}

int main(void) {
    const float x[4] = {1.0f, 2.0f, 3.0f, 6.0f};
    const float dy[4] = {1.0f, 0.0f, 0.0f, 0.0f};
    float y[4], dx[4], mean[1], invstd[1], dgamma[1], dbeta[1];
    float running_mean[1] = {0.0f}, running_var[1] = {1.0f};
    const pybn_view view = {2, 1, 2, PYBN_FLOAT32};
    const double r = 1.0 / sqrt(3.5); /* eps = 0 */
    int bad = 0, i;
    pybn_status st;

    printf("pybn %s (ABI %d), CPU path %s\n", pybn_version(), pybn_abi_version(), pybn_cpu_isa());
    st = pybn_forward_train(view, x, NULL, NULL, 0.0, running_mean, running_var, 0.5, y, mean, invstd);
    if (st != PYBN_SUCCESS) {
        printf("pybn_forward_train: %s: %s\n", pybn_status_string(st), pybn_last_error());
        return 1;
    }
    for (i = 0; i < 4; ++i) bad |= check("y", y[i], (x[i] - 3.0) * r);
    bad |= check("mean", mean[0], 3.0);
    bad |= check("invstd", invstd[0], r);
    bad |= check("running_mean", running_mean[0], 0.5 * 3.0);              /* (1-m)*0 + m*3 */
    bad |= check("running_var", running_var[0], 0.5 * 1.0 + 0.5 * 14.0 / 3.0); /* unbiased 14/3 */

    st = pybn_backward(view, dy, x, mean, invstd, NULL, 1, dx, dgamma, dbeta);
    if (st != PYBN_SUCCESS) {
        printf("pybn_backward: %s: %s\n", pybn_status_string(st), pybn_last_error());
        return 1;
    }
    /* dbeta = sum dy = 1; dgamma = sum dy * xhat = xhat[0] = -2r;
     * dx = r * (dy - 1/4 - xhat * (-2r) / 4) with xhat = (x - 3) r */
    bad |= check("dbeta", dbeta[0], 1.0);
    bad |= check("dgamma", dgamma[0], -2.0 * r);
    for (i = 0; i < 4; ++i)
        bad |= check("dx", dx[i], r * (dy[i] - 0.25 + (x[i] - 3.0) * r * 2.0 * r / 4.0));

    /* a bad argument is a status with a message, never a crash */
    st = pybn_forward_train(view, NULL, NULL, NULL, 0.0, NULL, NULL, 0.1, y, NULL, NULL);
    if (st != PYBN_ERROR_INVALID_ARGUMENT) bad = 1;
    printf("expected error: %s (%s)\n", pybn_status_string(st), pybn_last_error());

    printf(bad ? "FAILED\n" : "OK\n");
    return bad;
}
