# cython: language_level=3, boundscheck=False, wraparound=False
"""Binding of libpybn: a mirror of cpp/include/pybn/pybn.h, plus `host_address`.

Arrays are passed as integer addresses (0 for NULL) so that host and device memory take the same
path; views are (outer, channels, inner, dtype) tuples. Every call releases the GIL while the
library runs and raises on a non-success status.
"""
from cpython.buffer cimport PyBUF_STRIDES, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int32_t, int64_t, uintptr_t

cdef extern from "pybn/pybn.h" nogil:
    ctypedef enum pybn_status:
        PYBN_SUCCESS
        PYBN_ERROR_INVALID_ARGUMENT
        PYBN_ERROR_UNSUPPORTED_DTYPE
        PYBN_ERROR_INVALID_VALUE
        PYBN_ERROR_TOO_FEW_VALUES
        PYBN_ERROR_OUT_OF_MEMORY
        PYBN_ERROR_NOT_COMPILED
        PYBN_ERROR_CUDA
        PYBN_ERROR_INTERNAL
    ctypedef enum pybn_dtype:
        PYBN_FLOAT32
        PYBN_FLOAT64
        PYBN_FLOAT16
        PYBN_BFLOAT16
    ctypedef struct pybn_view:
        int64_t outer
        int64_t channels
        int64_t inner
        int32_t dtype
    int PYBN_ABI_VERSION

    ctypedef struct pybn_forward_params:
        size_t size
        int32_t training
        int32_t running_var_correction
        const void* gamma
        const void* beta
        double eps
        void* running_mean
        void* running_var
        double momentum
        void* save_mean
        void* save_invstd
        const double* count
        const double* mean
        const double* m2
        int32_t activation
        int32_t reserved
        const void* residual
        double renorm_r_max
        double renorm_d_max
        void* save_renorm_r
        void* save_renorm_d
        int64_t virtual_batches
    ctypedef struct pybn_backward_params:
        size_t size
        int32_t training
        int32_t activation
        const void* mean
        const void* invstd
        const void* gamma
        void* dgamma
        void* dbeta
        const double* count
        const double* sum_dy
        const double* sum_dy_xmu
        const double* sum_xmu
        const void* y
        void* dresidual
        const void* renorm_r
        const void* renorm_d
        int64_t virtual_batches

    const char* pybn_status_string(pybn_status status)
    const char* pybn_last_error()
    const char* pybn_version()
    int pybn_abi_version()
    int pybn_has_cuda()
    const char* pybn_cpu_isa()
    const char* pybn_cpu_isas()
    pybn_status pybn_set_cpu_isa(const char* name)
    pybn_status pybn_set_num_threads(int n)
    int pybn_get_num_threads()

    pybn_status pybn_batch_stats(pybn_view v, const void* x, double* count, double* mean, double* m2)
    pybn_status pybn_merge_stats(int64_t k, int64_t channels, const double* counts,
                                 const double* means, const double* m2s, double* count,
                                 double* mean, double* m2)
    pybn_status pybn_normalize(pybn_view v, const void* x, const double* count, const double* mean,
                               const double* m2, const void* gamma, const void* beta, double eps,
                               void* y, void* running_mean, void* running_var, double momentum,
                               void* save_mean, void* save_invstd)
    pybn_status pybn_backward_reduce(pybn_view v, const void* dy, const void* x, const void* mean,
                                     double* sum_dy, double* sum_dy_xmu, double* sum_xmu)
    pybn_status pybn_backward_elementwise(pybn_view v, const void* dy, const void* x,
                                          const void* mean, const void* invstd, const void* gamma,
                                          int training, const double* count, const double* sum_dy,
                                          const double* sum_dy_xmu, const double* sum_xmu,
                                          void* dx, void* dgamma, void* dbeta)
    pybn_status pybn_forward_train(pybn_view v, const void* x, const void* gamma, const void* beta,
                                   double eps, void* running_mean, void* running_var,
                                   double momentum, void* y, void* save_mean, void* save_invstd)
    pybn_status pybn_forward_infer(pybn_view v, const void* x, const void* running_mean,
                                   const void* running_var, const void* gamma, const void* beta,
                                   double eps, void* y)
    pybn_status pybn_backward(pybn_view v, const void* dy, const void* x, const void* mean,
                              const void* invstd, const void* gamma, int training, void* dx,
                              void* dgamma, void* dbeta)

    pybn_status pybn_cuda_batch_stats(pybn_view v, const void* x, double* count, double* mean,
                                      double* m2, void* stream)
    pybn_status pybn_cuda_merge_stats(int64_t k, int64_t channels, const double* counts,
                                      const double* means, const double* m2s, double* count,
                                      double* mean, double* m2, void* stream)
    pybn_status pybn_cuda_normalize(pybn_view v, const void* x, const double* count,
                                    const double* mean, const double* m2, const void* gamma,
                                    const void* beta, double eps, void* y, void* running_mean,
                                    void* running_var, double momentum, void* save_mean,
                                    void* save_invstd, void* stream)
    pybn_status pybn_cuda_backward_reduce(pybn_view v, const void* dy, const void* x,
                                          const void* mean, double* sum_dy, double* sum_dy_xmu,
                                          double* sum_xmu, void* stream)
    pybn_status pybn_cuda_backward_elementwise(pybn_view v, const void* dy, const void* x,
                                               const void* mean, const void* invstd,
                                               const void* gamma, int training,
                                               const double* count, const double* sum_dy,
                                               const double* sum_dy_xmu, const double* sum_xmu,
                                               void* dx, void* dgamma, void* dbeta, void* stream)
    pybn_status pybn_cuda_forward_train(pybn_view v, const void* x, const void* gamma,
                                        const void* beta, double eps, void* running_mean,
                                        void* running_var, double momentum, void* y,
                                        void* save_mean, void* save_invstd, void* stream)
    pybn_status pybn_cuda_forward_infer(pybn_view v, const void* x, const void* running_mean,
                                        const void* running_var, const void* gamma,
                                        const void* beta, double eps, void* y, void* stream)
    pybn_status pybn_cuda_backward(pybn_view v, const void* dy, const void* x, const void* mean,
                                   const void* invstd, const void* gamma, int training, void* dx,
                                   void* dgamma, void* dbeta, void* stream)

    pybn_status pybn_forward_v2(pybn_view v, const void* x, void* y, const pybn_forward_params* p)
    pybn_status pybn_backward_v2(pybn_view v, const void* dy, const void* x, void* dx,
                                 const pybn_backward_params* p)
    pybn_status pybn_cuda_forward_workspace_size(pybn_view v, const pybn_forward_params* p,
                                                 size_t* nbytes)
    pybn_status pybn_cuda_forward_v2(pybn_view v, const void* x, void* y,
                                     const pybn_forward_params* p, void* workspace,
                                     size_t workspace_bytes, void* stream)
    pybn_status pybn_cuda_backward_workspace_size(pybn_view v, const pybn_backward_params* p,
                                                  size_t* nbytes)
    pybn_status pybn_cuda_backward_v2(pybn_view v, const void* dy, const void* x, void* dx,
                                      const pybn_backward_params* p, void* workspace,
                                      size_t workspace_bytes, void* stream)
    pybn_status pybn_cuda_reduce_workspace_size(pybn_view v, size_t* nbytes)
    pybn_status pybn_cuda_batch_stats_v2(pybn_view v, const void* x, double* count, double* mean,
                                         double* m2, void* workspace, size_t workspace_bytes,
                                         void* stream)
    pybn_status pybn_cuda_backward_reduce_v2(pybn_view v, const void* dy, const void* x,
                                             const void* mean, double* sum_dy,
                                             double* sum_dy_xmu, double* sum_xmu, void* workspace,
                                             size_t workspace_bytes, void* stream)

FLOAT32 = PYBN_FLOAT32
FLOAT64 = PYBN_FLOAT64
FLOAT16 = PYBN_FLOAT16
BFLOAT16 = PYBN_BFLOAT16
ABI_VERSION = PYBN_ABI_VERSION
ACTIVATION_NONE = 0
ACTIVATION_RELU = 1


class PybnError(RuntimeError):
    """An error reported by libpybn that is not a bad argument (CUDA, memory, internal)."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


cdef int _check(pybn_status status) except -1:
    if status == PYBN_SUCCESS:
        return 0
    message = pybn_last_error().decode("utf-8", "replace")
    if status == PYBN_ERROR_UNSUPPORTED_DTYPE:
        raise TypeError(message)
    if status in (PYBN_ERROR_INVALID_ARGUMENT, PYBN_ERROR_INVALID_VALUE,
                  PYBN_ERROR_TOO_FEW_VALUES):
        raise ValueError(message)
    if status == PYBN_ERROR_OUT_OF_MEMORY:
        raise MemoryError(message)
    raise PybnError(message, int(status))


cdef pybn_view _view(tuple view) except *:
    cdef pybn_view v
    v.outer, v.channels, v.inner, v.dtype = view
    return v


def host_address(a):
    """Address of the first element of a host array (NumPy, any dtype, any strides), read through
    the buffer protocol without a format string: ~20x cheaper than __array_interface__, which
    builds a dict per call."""
    cdef Py_buffer buf
    PyObject_GetBuffer(a, &buf, PyBUF_STRIDES)
    cdef uintptr_t p = <uintptr_t>buf.buf
    PyBuffer_Release(&buf)
    return p


def status_string(int status):
    return pybn_status_string(<pybn_status>status).decode()

def version():
    return pybn_version().decode()

def abi_version():
    return pybn_abi_version()

def has_cuda():
    return bool(pybn_has_cuda())

def cpu_isa():
    return pybn_cpu_isa().decode()

def cpu_isas():
    return pybn_cpu_isas().decode()

def set_cpu_isa(str name):
    cdef bytes b = name.encode()
    _check(pybn_set_cpu_isa(b))

def set_num_threads(int n):
    _check(pybn_set_num_threads(n))

def get_num_threads():
    return pybn_get_num_threads()


cdef class ForwardParams:
    """pybn_forward_params: one field per header field (addresses as ints, 0 for NULL)."""
    cdef pybn_forward_params p

    def given_statistics(self, uintptr_t count, uintptr_t mean, uintptr_t m2):
        """Sets count / mean / m2 (the mode "normalise with given statistics")."""
        self.p.count = <const double*>count
        self.p.mean = <const double*>mean
        self.p.m2 = <const double*>m2

    def __init__(self, *, bint training=True, int running_var_correction=1, uintptr_t gamma=0,
                 uintptr_t beta=0, double eps=1e-5, uintptr_t running_mean=0,
                 uintptr_t running_var=0, double momentum=0.1, uintptr_t save_mean=0,
                 uintptr_t save_invstd=0, uintptr_t count=0, uintptr_t mean=0, uintptr_t m2=0,
                 int activation=0, uintptr_t residual=0, double renorm_r_max=0,
                 double renorm_d_max=0, uintptr_t save_renorm_r=0, uintptr_t save_renorm_d=0,
                 int64_t virtual_batches=0):
        self.p.size = sizeof(pybn_forward_params)
        self.p.training = training
        self.p.running_var_correction = running_var_correction
        self.p.gamma = <const void*>gamma
        self.p.beta = <const void*>beta
        self.p.eps = eps
        self.p.running_mean = <void*>running_mean
        self.p.running_var = <void*>running_var
        self.p.momentum = momentum
        self.p.save_mean = <void*>save_mean
        self.p.save_invstd = <void*>save_invstd
        self.p.count = <const double*>count
        self.p.mean = <const double*>mean
        self.p.m2 = <const double*>m2
        self.p.activation = activation
        self.p.reserved = 0
        self.p.residual = <const void*>residual
        self.p.renorm_r_max = renorm_r_max
        self.p.renorm_d_max = renorm_d_max
        self.p.save_renorm_r = <void*>save_renorm_r
        self.p.save_renorm_d = <void*>save_renorm_d
        self.p.virtual_batches = virtual_batches


cdef class BackwardParams:
    """pybn_backward_params: one field per header field (addresses as ints, 0 for NULL)."""
    cdef pybn_backward_params p

    def __init__(self, *, bint training=True, uintptr_t mean=0, uintptr_t invstd=0,
                 uintptr_t gamma=0, uintptr_t dgamma=0, uintptr_t dbeta=0, uintptr_t count=0,
                 uintptr_t sum_dy=0, uintptr_t sum_dy_xmu=0, uintptr_t sum_xmu=0, int activation=0,
                 uintptr_t y=0, uintptr_t dresidual=0, uintptr_t renorm_r=0, uintptr_t renorm_d=0,
                 int64_t virtual_batches=0):
        self.p.size = sizeof(pybn_backward_params)
        self.p.training = training
        self.p.activation = activation
        self.p.y = <const void*>y
        self.p.dresidual = <void*>dresidual
        self.p.renorm_r = <const void*>renorm_r
        self.p.renorm_d = <const void*>renorm_d
        self.p.virtual_batches = virtual_batches
        self.p.mean = <const void*>mean
        self.p.invstd = <const void*>invstd
        self.p.gamma = <const void*>gamma
        self.p.dgamma = <void*>dgamma
        self.p.dbeta = <void*>dbeta
        self.p.count = <const double*>count
        self.p.sum_dy = <const double*>sum_dy
        self.p.sum_dy_xmu = <const double*>sum_dy_xmu
        self.p.sum_xmu = <const double*>sum_xmu


def forward_workspace_size(tuple view, ForwardParams params):
    cdef size_t n = 0
    _check(pybn_cuda_forward_workspace_size(_view(view), &params.p, &n))
    return n


def backward_workspace_size(tuple view, BackwardParams params):
    cdef size_t n = 0
    _check(pybn_cuda_backward_workspace_size(_view(view), &params.p, &n))
    return n


def reduce_workspace_size(tuple view):
    cdef size_t n = 0
    _check(pybn_cuda_reduce_workspace_size(_view(view), &n))
    return n


def forward(tuple view, uintptr_t x, uintptr_t y, ForwardParams params, object stream=None,
            uintptr_t workspace=0, size_t workspace_bytes=0):
    """pybn_forward_v2, or pybn_cuda_forward_v2 on `stream` with the given workspace."""
    cdef pybn_view v = _view(view)
    cdef pybn_status st
    cdef uintptr_t s = 0
    if stream is None:
        with nogil:
            st = pybn_forward_v2(v, <const void*>x, <void*>y, &params.p)
    else:
        s = stream
        with nogil:
            st = pybn_cuda_forward_v2(v, <const void*>x, <void*>y, &params.p, <void*>workspace,
                                      workspace_bytes, <void*>s)
    _check(st)


def backward(tuple view, uintptr_t dy, uintptr_t x, uintptr_t dx, BackwardParams params,
             object stream=None, uintptr_t workspace=0, size_t workspace_bytes=0):
    """pybn_backward_v2, or pybn_cuda_backward_v2 on `stream` with the given workspace."""
    cdef pybn_view v = _view(view)
    cdef pybn_status st
    cdef uintptr_t s = 0
    if stream is None:
        with nogil:
            st = pybn_backward_v2(v, <const void*>dy, <const void*>x, <void*>dx, &params.p)
    else:
        s = stream
        with nogil:
            st = pybn_cuda_backward_v2(v, <const void*>dy, <const void*>x, <void*>dx, &params.p,
                                       <void*>workspace, workspace_bytes, <void*>s)
    _check(st)


def batch_stats(tuple view, uintptr_t x, uintptr_t count, uintptr_t mean, uintptr_t m2,
                object stream=None, uintptr_t workspace=0, size_t workspace_bytes=0):
    cdef pybn_view v = _view(view)
    cdef pybn_status st
    cdef uintptr_t s = 0
    if stream is None:
        with nogil:
            st = pybn_batch_stats(v, <const void*>x, <double*>count, <double*>mean, <double*>m2)
    else:
        s = stream
        with nogil:
            st = pybn_cuda_batch_stats_v2(v, <const void*>x, <double*>count, <double*>mean,
                                          <double*>m2, <void*>workspace, workspace_bytes, <void*>s)
    _check(st)


def merge_stats(int64_t k, int64_t channels, uintptr_t counts, uintptr_t means, uintptr_t m2s,
                uintptr_t count, uintptr_t mean, uintptr_t m2, object stream=None):
    cdef pybn_status st
    cdef uintptr_t s = 0
    if stream is None:
        with nogil:
            st = pybn_merge_stats(k, channels, <const double*>counts, <const double*>means,
                                  <const double*>m2s, <double*>count, <double*>mean, <double*>m2)
    else:
        s = stream
        with nogil:
            st = pybn_cuda_merge_stats(k, channels, <const double*>counts, <const double*>means,
                                       <const double*>m2s, <double*>count, <double*>mean,
                                       <double*>m2, <void*>s)
    _check(st)


def backward_reduce(tuple view, uintptr_t dy, uintptr_t x, uintptr_t mean, uintptr_t sum_dy,
                    uintptr_t sum_dy_xmu, uintptr_t sum_xmu, object stream=None,
                    uintptr_t workspace=0, size_t workspace_bytes=0):
    cdef pybn_view v = _view(view)
    cdef pybn_status st
    cdef uintptr_t s = 0
    if stream is None:
        with nogil:
            st = pybn_backward_reduce(v, <const void*>dy, <const void*>x, <const void*>mean,
                                      <double*>sum_dy, <double*>sum_dy_xmu, <double*>sum_xmu)
    else:
        s = stream
        with nogil:
            st = pybn_cuda_backward_reduce_v2(v, <const void*>dy, <const void*>x,
                                              <const void*>mean, <double*>sum_dy,
                                              <double*>sum_dy_xmu, <double*>sum_xmu,
                                              <void*>workspace, workspace_bytes, <void*>s)
    _check(st)
