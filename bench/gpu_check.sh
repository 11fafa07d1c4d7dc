#!/usr/bin/env bash
# One command that verifies the GPU path on a machine with a GPU (and no network):
#   bash bench/gpu_check.sh OUTDIR [CYTHON_CMAKE_WHEEL]
# builds pybn for the local GPU only, runs the GPU tests (and the NCCL / MPI SyncBatchNorm ones
# when mpi4py is there), a compute-sanitizer subset when the tool is there, and the GPU rows of
# the benchmark; writes the build and test logs, results.json and plots to OUTDIR. Without a GPU
# it stops at the first GPU step with a clear message (exit status 3).
set -uo pipefail
out="${1:?usage: bash bench/gpu_check.sh OUTDIR [cython-cmake wheel]}"
wheel="${2:-}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$out/summary.txt"; }
status=0

log "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
if ! python -c "import cupy, sys; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)" 2>>"$out/summary.txt"; then
  log "no CUDA GPU visible to CuPy: nothing on this machine can verify the GPU path"
  exit 3
fi

# build: the local architecture only; cython-cmake from a carried wheel when offline
if [ -n "$wheel" ]; then python -m pip install --no-deps --no-index "$wheel" > "$out/build.log" 2>&1; fi
arch=$(python -c "import cupy; print(cupy.cuda.Device().compute_capability)")  # e.g. 90
log "building for sm_$arch"
if ! python -m pip install --no-build-isolation --no-deps -Ccmake.define.PYBN_CUDA_ARCHITECTURES="$arch" . \
      >> "$out/build.log" 2>&1; then
  log "build FAILED (tail of $out/build.log):"; tail -30 "$out/build.log" | tee -a "$out/summary.txt"; exit 1
fi
python -c "import pybn; assert pybn.has_cuda(); print('pybn', pybn.__version__, 'CUDA build')" | tee -a "$out/summary.txt"

log "GPU tests"
(cd tests && timeout 300 python -m pytest -ra -q test_gpu.py test_distributed.py test_abi_v2.py test_cuda_host.py test_cuda_sass.py) \
  > "$out/tests.log" 2>&1 || status=1
tail -15 "$out/tests.log" | tee -a "$out/summary.txt"

if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    log "compute-sanitizer --tool $tool (small subset)"
    (cd tests && timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 9 python -m pytest -q -x \
        test_gpu.py -k "match_cpu_every_op or zero_inner or deterministic") > "$out/sanitizer-$tool.log" 2>&1 || status=1
    tail -3 "$out/sanitizer-$tool.log" | tee -a "$out/summary.txt"
  done
else
  log "compute-sanitizer not found: sanitizer subset skipped"
fi

log "GPU benchmark"
timeout 300 python bench/run.py --quick --device cuda --out "$out/bench" > "$out/bench.log" 2>&1 || status=1
tail -40 "$out/bench.log" | tee -a "$out/summary.txt"
log "done, status $status"
exit $status
