"""Synchronised BN (pybn.distributed) over MPI: several ranks on this machine through mpiexec
(tests/mpi_sync_check.py does the comparisons on every rank), and in-process checks on
COMM_SELF. Needs mpi4py and an MPI (the test extra installs the mpich wheel)."""
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import pybn
from pybn.distributed import SyncBatchNorm, sync_batchnorm, sync_batchnorm_backward, sync_batchnorm_forward

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed (pip install 'pybn-kernels[mpi]')")

HERE = os.path.dirname(os.path.abspath(__file__))


def _mpiexec():
    for cand in (os.path.join(sysconfig.get_path("scripts"), "mpiexec"), shutil.which("mpiexec")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _run_ranks(sizes, device="cpu"):
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install 'pybn-kernels[mpi]')")
    cmd = [mpiexec, "-n", str(len(sizes)), sys.executable, "-m", "mpi4py",
           os.path.join(HERE, "mpi_sync_check.py"), ",".join(map(str, sizes)), device]
    # -m mpi4py: an exception on any rank aborts the whole job instead of leaving it hanging
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    assert f"OK {len(sizes)} ranks" in p.stdout, p.stdout
    return p.stdout


@pytest.mark.parametrize("sizes", [(4, 3), (5, 0, 2), (1, 1, 1), (0, 0, 6), (2, 7, 0)],
                         ids=lambda s: "-".join(map(str, s)))
def test_ranks_match_one_process(sizes):
    """Outputs, dx, parameter gradients and running statistics over several steps equal one
    process on the concatenated batch; unequal and empty ranks; error rules."""
    out = _run_ranks(sizes)
    checks = int(out.split(":")[-1].split()[0])
    assert checks > 300  # every comparison ran on every rank


@pytest.mark.gpu
def test_ranks_match_one_process_cuda_arrays():
    """The MPI path with CuPy arrays (staged through the host unless MPI is CUDA-aware); both
    ranks share the one GPU a test machine has."""
    cp = pytest.importorskip("cupy")
    if not pybn.has_cuda() or cp.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("needs a CUDA GPU and a pybn built with CUDA")
    _run_ranks((3, 0, 4), device="cuda")


# ------------------------------------- in-process, COMM_SELF -------------------------------------

def test_single_rank_equals_batchnorm(rng):
    x = rng.standard_normal((6, 4, 5)).astype(np.float32) + 100
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g = rng.uniform(0.5, 2, 4).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    y, m, r = sync_batchnorm_forward(x, g, b, rm, rv, comm=MPI.COMM_SELF)
    y_ref, m_ref, r_ref = pybn.batchnorm_forward(x, g, b, rm2, rv2)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=4e-6)
    np.testing.assert_allclose(m, m_ref, rtol=1e-7)
    np.testing.assert_allclose(rm, rm2, rtol=1e-7)
    np.testing.assert_allclose(rv, rv2, rtol=1e-6)
    dx, dg, db = sync_batchnorm_backward(dy, x, m, r, g, comm=MPI.COMM_SELF)
    dx_ref, dg_ref, db_ref = pybn.batchnorm_backward(dy, x, m_ref, r_ref, g)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=4e-6)
    np.testing.assert_allclose(dg, dg_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sync_batchnorm(x, g, b, comm=MPI.COMM_SELF), y)


def test_layer_interface(rng):
    bn = SyncBatchNorm(3, comm=MPI.COMM_SELF, axis=-1, momentum=None)
    ref = pybn.BatchNorm(3, axis=-1, momentum=None)
    for _ in range(2):
        x = rng.standard_normal((4, 5, 3)).astype(np.float32)
        np.testing.assert_allclose(bn(x), ref(x), atol=4e-6)
        np.testing.assert_allclose(bn.backward(x), ref.backward(x), atol=4e-6)
    assert bn.num_batches_tracked == 2
    np.testing.assert_allclose(bn.running_var, ref.running_var, rtol=1e-6)
    ref.load_state_dict(bn.state_dict())
    bn.eval()
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(bn(x), ref.eval()(x), atol=4e-6)
    assert "SyncBatchNorm(3" in repr(bn) and "1 ranks" in repr(bn)


def test_errors_change_nothing(rng):
    with pytest.raises(TypeError, match="mpi4py communicator"):
        SyncBatchNorm(3, comm=object())
    with pytest.raises(TypeError, match="mpi4py communicator"):
        sync_batchnorm(np.ones((2, 3), np.float32), comm="world")
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    one = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match="at least 2 values per channel over all ranks"):
        sync_batchnorm(one, None, None, rm, rv, comm=MPI.COMM_SELF)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="gamma"):
        sync_batchnorm(x, np.ones(4, np.float32), None, rm, rv, comm=MPI.COMM_SELF)
    with pytest.raises(ValueError, match="eps"):
        sync_batchnorm(x, None, None, rm, rv, comm=MPI.COMM_SELF, eps=-1.0)
    bn = SyncBatchNorm(3, comm=MPI.COMM_SELF)
    with pytest.raises(ValueError, match="3 channels"):
        bn(rng.standard_normal((4, 5)).astype(np.float32))
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    np.testing.assert_array_equal(bn.running_mean, 0)
    assert bn.num_batches_tracked == 0
    # the backward checks y and dresidual before the exchange: nothing written on error
    y, m, r = sync_batchnorm_forward(x, comm=MPI.COMM_SELF)
    dy, out = np.ones_like(x), np.full_like(x, 7)
    with pytest.raises((TypeError, ValueError), match="dresidual must have the dtype of x"):
        sync_batchnorm_backward(dy, x, m, r, comm=MPI.COMM_SELF, out=out, dresidual=np.zeros((4, 3)))
    with pytest.raises((TypeError, ValueError), match="dresidual must have the shape of x"):
        sync_batchnorm_backward(dy, x, m, r, comm=MPI.COMM_SELF, out=out, dresidual=np.zeros((4, 4), np.float32))
    with pytest.raises((TypeError, ValueError), match="y must have the dtype of x"):
        sync_batchnorm_backward(dy, x, m, r, comm=MPI.COMM_SELF, out=out, activation="relu", y=y.astype(np.float64))
    assert (out == 7).all()


def test_nccl_needs_cuda_arrays():
    """An NCCL communicator with NumPy arrays is a TypeError (checked without a GPU through a
    stand-in of the communicator's interface)."""
    class NcclCommunicator:  # same name and methods as cupy.cuda.nccl.NcclCommunicator
        def size(self):
            return 1

        def rank_id(self):
            return 0

    with pytest.raises(TypeError, match="NCCL communicator needs CUDA arrays"):
        sync_batchnorm(np.ones((2, 3), np.float32), comm=NcclCommunicator())


def test_example_trains():
    """examples/sync_bn_mpi.py on 3 ranks: the loss falls and the ranks stay in step."""
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install 'pybn-kernels[mpi]')")
    script = os.path.join(os.path.dirname(HERE), "examples", "sync_bn_mpi.py")
    p = subprocess.run([mpiexec, "-n", "3", sys.executable, "-m", "mpi4py", script, "101"],
                       capture_output=True, text=True, timeout=600, cwd=HERE)
    assert p.returncode == 0, p.stdout + p.stderr
    losses = [float(line.split()[-1]) for line in p.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < 0.3 * losses[0], p.stdout
    assert "identical running statistics" in p.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["nccl", "mpi-staged", "mpi-cuda-aware"])
def test_single_rank_cuda(transport, rng):
    """CuPy arrays through each transport on one rank (one GPU cannot host two NCCL ranks):
    NCCL on the current stream, MPI staged through the host, CUDA-aware MPI if it is."""
    cp = pytest.importorskip("cupy")
    if not pybn.has_cuda() or cp.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("needs a CUDA GPU and a pybn built with CUDA")
    if transport == "nccl":
        from cupy.cuda import nccl
        if not nccl.available:
            pytest.skip("CuPy without NCCL")
        comm, aware = pybn.distributed.nccl_comm(MPI.COMM_SELF), None
    elif transport == "mpi-staged":
        comm, aware = MPI.COMM_SELF, False
    else:
        if not MPI.Query_cuda_support():
            pytest.skip("this MPI is not CUDA-aware")
        comm, aware = MPI.COMM_SELF, True
    x = rng.standard_normal((5, 4, 6)).astype(np.float32) + 10
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = SyncBatchNorm(4, comm=comm, cuda_aware=aware, device="cuda")
    ref = pybn.BatchNorm(4)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        y = bn(cp.asarray(x))
        dx = bn.backward(cp.asarray(dy))
    stream.synchronize()
    np.testing.assert_allclose(cp.asnumpy(y), ref(x), atol=4e-6)
    np.testing.assert_allclose(cp.asnumpy(dx), ref.backward(dy), atol=4e-6)
    np.testing.assert_allclose(cp.asnumpy(bn.running_var), ref.running_var, rtol=1e-6)
    np.testing.assert_allclose(cp.asnumpy(bn.grad_gamma), ref.grad_gamma, rtol=1e-5, atol=1e-5)
