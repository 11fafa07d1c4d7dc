// The same training step as examples/c, in C++ through a small RAII-free wrapper: pybn's C ABI
// owns no memory, so a status-to-exception helper and std::vector buffers are all it takes.
// With CUDA built and a GPU present, it runs the device entry point on a stream too.
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybn/pybn.h>

#if defined(PYBN_EXAMPLE_CUDA)
#include <cuda_runtime.h>
#endif

namespace {

void check(pybn_status st, const char* call) {
    if (st != PYBN_SUCCESS)
        throw std::runtime_error(std::string(call) + ": " + pybn_status_string(st) + ": " + pybn_last_error());
}

struct Batch {  // (N, C, L) float32 tensors with their per-channel statistics
    pybn_view view;
    std::vector<float> x, y, mean, invstd;
    Batch(int64_t n, int64_t c, int64_t l, std::vector<float> data)
        : view{n, c, l, PYBN_FLOAT32}, x(std::move(data)), y(x.size()), mean(size_t(c)), invstd(size_t(c)) {}
    void forward(double eps) {
        pybn_forward_params p = PYBN_FORWARD_PARAMS_INIT;
        p.eps = eps;
        p.save_mean = mean.data();
        p.save_invstd = invstd.data();
        check(pybn_forward_v2(view, x.data(), y.data(), &p), "pybn_forward_v2");
    }
};

bool close(double got, double want) { return std::fabs(got - want) <= 1e-5 * (1.0 + std::fabs(want)); }

}  // namespace

int main() {
    std::printf("pybn %s, CUDA compiled: %d\n", pybn_version(), pybn_has_cuda());
    Batch b(2, 1, 2, {1.0f, 2.0f, 3.0f, 6.0f});
    b.forward(0.0);
    const double r = 1.0 / std::sqrt(3.5);
    bool ok = close(b.mean[0], 3.0) && close(b.invstd[0], r);
    for (size_t i = 0; i < b.x.size(); ++i) ok = ok && close(b.y[i], (b.x[i] - 3.0) * r);

    std::vector<float> dy{1, 0, 0, 0}, dx(4), dgamma(1), dbeta(1);
    pybn_backward_params bp = PYBN_BACKWARD_PARAMS_INIT;
    bp.mean = b.mean.data();
    bp.invstd = b.invstd.data();
    bp.dgamma = dgamma.data();
    bp.dbeta = dbeta.data();
    check(pybn_backward_v2(b.view, dy.data(), b.x.data(), dx.data(), &bp), "pybn_backward_v2");
    ok = ok && close(dbeta[0], 1.0) && close(dgamma[0], -2.0 * r);

    try {  // errors arrive as statuses; the wrapper turns them into exceptions
        Batch bad(1, 1, 1, {1.0f});
        bad.forward(-1.0);  // eps < 0
        ok = false;
    } catch (const std::runtime_error& e) {
        std::printf("expected error: %s\n", e.what());
    }

    // The device entry point takes device pointers and a cudaStream_t as void*. Host memory is
    // refused with a status (or "not compiled" in a build without CUDA) ...
    // The level-2 CUDA entry points take a workspace whose size the library computes on the host.
    const pybn_forward_params fp = PYBN_FORWARD_PARAMS_INIT;
    size_t ws_bytes = 0;
    const pybn_status sq = pybn_cuda_forward_workspace_size(b.view, &fp, &ws_bytes);
    std::printf("CUDA workspace for this view: %s, %zu bytes\n", pybn_status_string(sq), ws_bytes);
    const pybn_status st = pybn_cuda_forward_v2(b.view, b.x.data(), b.y.data(), &fp, nullptr, 0, /*stream=*/nullptr);
    std::printf("pybn_cuda_forward_v2 on host memory: %s\n", pybn_status_string(st));
    ok = ok && st != PYBN_SUCCESS;
#if defined(PYBN_EXAMPLE_CUDA)
    // ... and with a GPU the same step runs on device memory, queued on our own stream.
    int devices = 0;
    if (pybn_has_cuda() && cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
        float *dx_in = nullptr, *dy_out = nullptr;
        cudaStream_t stream = nullptr;
        cudaStreamCreate(&stream);
        cudaMalloc(&dx_in, 4 * sizeof(float));
        cudaMalloc(&dy_out, 4 * sizeof(float));
        cudaMemcpyAsync(dx_in, b.x.data(), 4 * sizeof(float), cudaMemcpyHostToDevice, stream);
        pybn_forward_params gp = PYBN_FORWARD_PARAMS_INIT;
        gp.eps = 0.0;
        void* ws = nullptr;
        check(pybn_cuda_forward_workspace_size(b.view, &gp, &ws_bytes), "pybn_cuda_forward_workspace_size");
        cudaMallocAsync(&ws, ws_bytes, stream);  // or any allocator's memory; reusable after the call
        check(pybn_cuda_forward_v2(b.view, dx_in, dy_out, &gp, ws, ws_bytes, stream), "pybn_cuda_forward_v2");
        cudaFreeAsync(ws, stream);
        std::vector<float> y(4);
        cudaMemcpyAsync(y.data(), dy_out, 4 * sizeof(float), cudaMemcpyDeviceToHost, stream);
        cudaStreamSynchronize(stream);
        for (size_t i = 0; i < y.size(); ++i) ok = ok && close(y[i], (b.x[i] - 3.0) * r);
        std::printf("GPU training forward on a stream: %s\n", ok ? "matches" : "differs");
        cudaFree(dx_in);
        cudaFree(dy_out);
        cudaStreamDestroy(stream);
    } else {
        std::printf("no CUDA device (or no CUDA build): GPU step skipped\n");
    }
#endif

    std::printf(ok ? "OK\n" : "FAILED\n");
    return ok ? 0 : 1;
}
