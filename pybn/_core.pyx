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


# ------------------------------------------------------------------------------------------------
# Fast path of the functional forward for the common host call: NumPy arrays, C-contiguous,
# float32 / float64 / float16 / bfloat16 (ml_dtypes', read through a uint16 view since NumPy exports
# no bfloat16 buffer), default options. It checks everything it relies on through the buffer
# protocol (a few hundred ns) and calls pybn_forward_v2 directly; anything else, and any
# call the library refuses (a refused call changes nothing), returns None, and the general Python
# path then runs and raises its precise error. Results are those of the general path, bit for bit
# (same library call, same parameter block).

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS
import numpy as _np

cdef object _ndarray = _np.ndarray
cdef object _np_empty = _np.empty
cdef object _pool_empty = None          # pybn._pool.POOL.empty, set by pybn._arrays
cdef Py_ssize_t _pool_threshold = 1 << 20


def _set_output_allocator(empty, Py_ssize_t threshold):
    global _pool_empty, _pool_threshold
    _pool_empty = empty
    _pool_threshold = threshold


cdef object _new_like(object x, Py_ssize_t nbytes):
    """A new C-contiguous array of x's shape and dtype: from the pool when it is large enough
    (the pool's own threshold, so that small outputs skip a Python-level call)."""
    if nbytes >= _pool_threshold and _pool_empty is not None:
        return _pool_empty(x.shape, x.dtype)
    return _np_empty(x.shape, x.dtype)


cdef int _code_of(const char* fmt, Py_ssize_t itemsize) noexcept:
    # native NumPy formats: "f" float32, "d" float64, "e" float16 (a leading "=" or "@" is native)
    if fmt == NULL:
        return -1
    if fmt[0] == b'=' or fmt[0] == b'@':
        fmt += 1
    if fmt[0] == 0 or fmt[1] != 0:
        return -1
    if fmt[0] == b'f' and itemsize == 4:
        return PYBN_FLOAT32
    if fmt[0] == b'd' and itemsize == 8:
        return PYBN_FLOAT64
    if fmt[0] == b'e' and itemsize == 2:
        return PYBN_FLOAT16
    return -1


cdef object _bf16_dtype = None  # the native bfloat16 dtype (ml_dtypes'), once an array of it is seen
cdef object _u16 = _np.uint16


cdef bint _is_bf16(object dt) except -1:
    """dt is a native bfloat16 dtype (NumPy exports no buffer of it: the fast path reads its bits
    through a uint16 view)."""
    global _bf16_dtype
    if dt is _bf16_dtype:
        return True
    if _bf16_dtype is None and dt.itemsize == 2 and dt.kind == "V" and dt.name == "bfloat16" and dt.isnative:
        _bf16_dtype = dt
        return True
    return False


cdef class _Buffers:
    """The buffers held for one fast call, released together: at most 10 (a backward's x, dy,
    mean, invstd, gamma, y, dx, dresidual, dgamma, dbeta; a forward's x, 4 per-channel arrays,
    residual, y and 2 saved arrays)."""
    cdef Py_buffer b[12]
    cdef int n

    def __cinit__(self):
        self.n = 0

    cdef Py_buffer* get(self, object a, int flags) except NULL:
        if self.n == 12:
            raise RuntimeError("pybn internal error: _Buffers is full")
        PyObject_GetBuffer(a, &self.b[self.n], flags)
        self.n += 1
        return &self.b[self.n - 1]

    cdef Py_buffer* array(self, object a, int flags, int* code) except? NULL:
        """The buffer of ndarray a (C-contiguous, with flags) and its dtype code (-1: not one the
        fast path takes); NULL when a exports no such buffer. A bfloat16 array's buffer is that
        of its uint16 view (the buffer holds the view)."""
        cdef Py_buffer* b
        cdef bint bf16 = _is_bf16(a.dtype)
        try:
            b = self.get(a.view(_u16) if bf16 else a, flags | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS)
        except (BufferError, ValueError, TypeError):  # not a plain native-dtype buffer
            return NULL
        code[0] = PYBN_BFLOAT16 if bf16 else _code_of(b.format, b.itemsize)
        return b

    def __dealloc__(self):
        cdef int i
        for i in range(self.n):
            PyBuffer_Release(&self.b[i])


cdef bint _per_channel_ok(_Buffers bufs, object a, int64_t C, int code, bint writable, void** ptr) except -1:
    """a is None (ptr NULL) or a contiguous 1-D array of C values of the parameter dtype."""
    if a is None:
        ptr[0] = NULL
        return True
    if type(a) is not _ndarray:
        return False
    cdef int acode
    cdef Py_buffer* b = bufs.array(a, PyBUF_WRITABLE if writable else 0, &acode)
    cdef int want = PYBN_FLOAT64 if code == PYBN_FLOAT64 else PYBN_FLOAT32
    if b == NULL or b.ndim != 1 or b.shape[0] != C or acode != want:
        return False
    ptr[0] = b.buf
    return True


cdef bint _disjoint(Py_buffer* a, Py_buffer* b) noexcept:
    cdef char* pa = <char*>a.buf
    cdef char* pb = <char*>b.buf
    return pa + a.len <= pb or pb + b.len <= pa


cdef bint _host_view(_Buffers bufs, object x, object axis, pybn_view* v) except -1:
    """x's buffer (bufs.b[0]) and canonical view when x is a C-contiguous native float32 /
    float64 / float16 array of >= 2 dimensions and axis a valid int; else False."""
    cdef int code
    cdef Py_buffer* bx = bufs.array(x, 0, &code)
    if bx == NULL:
        return False
    cdef int nd = bx.ndim, ax, i
    if code < 0 or nd < 2:
        return False
    ax = axis
    if ax < -nd or ax >= nd:
        return False
    if ax < 0:
        ax += nd
    v.outer, v.channels, v.inner, v.dtype = 1, bx.shape[ax], 1, code
    for i in range(ax):
        v.outer *= bx.shape[i]
    for i in range(ax + 1, nd):
        v.inner *= bx.shape[i]
    return True


def fast_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, out,
                 correction, bint save, int activation=0, residual=None):
    """The fast path of batchnorm (save=False: returns y) and batchnorm_forward (save=True:
    returns (y, mean, invstd)), with the fused epilogue (activation: 0 none, 1 ReLU; residual:
    an array like x, or None), or None when the general path must run."""
    if type(x) is not _ndarray or not (training is True or training is False):
        return None
    if type(eps) is not float or type(momentum) is not float or type(axis) is not int or type(correction) is not int:
        return None
    if correction != 0 and correction != 1:
        return None
    cdef _Buffers bufs = _Buffers()
    cdef pybn_view v
    if not _host_view(bufs, x, axis, &v):
        return None
    cdef Py_buffer* bx = &bufs.b[0]
    cdef int code = v.dtype, nd = bx.ndim, i
    cdef int64_t C = v.channels
    cdef pybn_forward_params p
    p.size = sizeof(pybn_forward_params)
    p.training = 1 if training else 0
    p.running_var_correction = correction
    p.eps = eps
    p.momentum = momentum
    p.count = NULL
    p.mean = NULL
    p.m2 = NULL
    if activation != 0 and activation != 1:  # PYBN_ACTIVATION_NONE / _RELU
        return None
    p.activation = activation
    p.reserved = 0
    p.residual = NULL
    p.renorm_r_max = 0
    p.renorm_d_max = 0
    p.save_renorm_r = NULL
    p.save_renorm_d = NULL
    p.virtual_batches = 0
    cdef void* ptr
    if not _per_channel_ok(bufs, gamma, C, code, False, &ptr):
        return None
    p.gamma = ptr
    if not _per_channel_ok(bufs, beta, C, code, False, &ptr):
        return None
    p.beta = ptr
    if not _per_channel_ok(bufs, running_mean, C, code, training is True, &ptr):
        return None
    p.running_mean = ptr
    if not _per_channel_ok(bufs, running_var, C, code, training is True, &ptr):
        return None
    p.running_var = ptr
    if training is False and (running_mean is None or running_var is None):
        return None
    cdef int kz = -1  # the residual's buffer
    cdef Py_buffer* bz
    if residual is not None:
        kz = bufs.n
        bz = _like(bufs, residual, bx, code, False)
        if bz == NULL:
            return None
        p.residual = bz.buf
    # as the general path: y may not overlap gamma / beta / the running statistics, and overlaps x
    # or the residual only by being it (checked below, once y's buffer is held)
    cdef int k
    cdef Py_buffer* by
    if out is None:
        y = _new_like(x, bx.len)
    elif out is x:
        y = x  # in place (on the residual: any ndarray below; the overlap check skips it)
    elif type(out) is _ndarray:
        y = out
    else:
        return None
    cdef int ycode
    by = bufs.array(y, PyBUF_WRITABLE, &ycode)
    if by == NULL or by.ndim != nd or ycode != code:
        return None
    for i in range(nd):
        if by.shape[i] != bx.shape[i]:
            return None
    for k in range(1 if out is x else 0, bufs.n - 1):
        if k == kz and out is residual:
            continue
        if not _disjoint(by, &bufs.b[k]):
            return None
    smean = sinvstd = None
    p.save_mean = NULL
    p.save_invstd = NULL
    cdef Py_buffer* bs
    if save:
        pd = _np.float64 if code == PYBN_FLOAT64 else _np.float32
        smean, sinvstd = _np_empty(C, pd), _np_empty(C, pd)
        bs = bufs.get(smean, PyBUF_ND | PyBUF_WRITABLE)
        p.save_mean = bs.buf
        bs = bufs.get(sinvstd, PyBUF_ND | PyBUF_WRITABLE)
        p.save_invstd = bs.buf
    cdef pybn_status st
    with nogil:
        st = pybn_forward_v2(v, bx.buf, by.buf, &p)
    if st == PYBN_ERROR_OUT_OF_MEMORY or st == PYBN_ERROR_INTERNAL:
        _check(st)  # not an argument the general path would refuse: MemoryError / PybnError now
    if st != PYBN_SUCCESS:
        return None  # a refused argument; nothing was written: the general path reports it
    if save:
        return y, smean, sinvstd
    return y


cdef Py_buffer* _like(_Buffers bufs, object a, Py_buffer* bx, int code, bint writable) except? NULL:
    """a's buffer when a is a C-contiguous ndarray of x's shape and dtype, else NULL."""
    if type(a) is not _ndarray:
        return NULL
    cdef int acode
    cdef Py_buffer* b = bufs.array(a, PyBUF_WRITABLE if writable else 0, &acode)
    if b == NULL or b.ndim != bx.ndim or acode != code:
        return NULL
    cdef int i
    for i in range(b.ndim):
        if b.shape[i] != bx.shape[i]:
            return NULL
    return b


def fast_backward(dy, x, mean, invstd, gamma, training, axis, out, int activation=0, y=None, dresidual=None):
    """The fast path of batchnorm_backward, with the ReLU mask from y (activation 1) and the
    residual's gradient written to dresidual (an array like x that overlaps nothing): (dx, dgamma,
    dbeta), or None when the general path must run (see fast_forward)."""
    if type(x) is not _ndarray or not (training is True or training is False) or type(axis) is not int:
        return None
    if mean is None or invstd is None:
        return None
    cdef _Buffers bufs = _Buffers()
    cdef pybn_view v
    if not _host_view(bufs, x, axis, &v):
        return None
    cdef Py_buffer* bx = &bufs.b[0]
    cdef int code = v.dtype, nd = bx.ndim, i
    cdef int64_t C = v.channels
    cdef Py_buffer* bdy = _like(bufs, dy, bx, code, False)
    if bdy == NULL:
        return None
    cdef pybn_backward_params p
    p.size = sizeof(pybn_backward_params)
    p.training = 1 if training else 0
    if not ((activation == 0 and y is None) or (activation == 1 and y is not None)):
        return None  # the general path explains (or ignores y, as it does)
    p.activation = activation
    p.count = NULL
    p.sum_dy = NULL
    p.sum_dy_xmu = NULL
    p.sum_xmu = NULL
    p.y = NULL
    p.dresidual = NULL
    p.renorm_r = NULL
    p.renorm_d = NULL
    p.virtual_batches = 0
    cdef void* ptr
    if mean.__class__ is not _ndarray or getattr(mean, "ndim", 0) != 1:
        return None  # 2-D: ghost-batch statistics, the general path
    if not _per_channel_ok(bufs, mean, C, code, False, &ptr):
        return None
    p.mean = ptr
    if not _per_channel_ok(bufs, invstd, C, code, False, &ptr):
        return None
    p.invstd = ptr
    if not _per_channel_ok(bufs, gamma, C, code, False, &ptr):
        return None
    p.gamma = ptr
    cdef Py_buffer* bym
    if y is not None:
        bym = _like(bufs, y, bx, code, False)
        if bym == NULL:
            return None
        p.y = bym.buf
    cdef int nin = bufs.n  # x, dy, mean, invstd (, gamma, y)
    if out is None:
        dx = _new_like(x, bx.len)
    elif out is x or out is dy or type(out) is _ndarray:
        dx = out
    else:
        return None
    cdef Py_buffer* bdx = _like(bufs, dx, bx, code, True)
    if bdx == NULL:
        return None
    cdef int k
    for k in range(nin):  # dx overlaps nothing but, exactly, dy or x (as the general path)
        if (k == 0 and out is x) or (k == 1 and out is dy):
            continue
        if not _disjoint(bdx, &bufs.b[k]):
            return None
    cdef Py_buffer* bdr
    if dresidual is not None:  # written too: it may overlap nothing (dy itself: the general path)
        bdr = _like(bufs, dresidual, bx, code, True)
        if bdr == NULL:
            return None
        for k in range(bufs.n - 1):
            if not _disjoint(bdr, &bufs.b[k]):
                return None
        p.dresidual = bdr.buf
    pd = _np.float64 if code == PYBN_FLOAT64 else _np.float32
    dgamma, dbeta = _np_empty(C, pd), _np_empty(C, pd)
    cdef Py_buffer* bs = bufs.get(dgamma, PyBUF_ND | PyBUF_WRITABLE)
    p.dgamma = bs.buf
    bs = bufs.get(dbeta, PyBUF_ND | PyBUF_WRITABLE)
    p.dbeta = bs.buf
    cdef pybn_status st
    with nogil:
        st = pybn_backward_v2(v, bdy.buf, bx.buf, bdx.buf, &p)
    if st == PYBN_ERROR_OUT_OF_MEMORY or st == PYBN_ERROR_INTERNAL:
        _check(st)
    if st != PYBN_SUCCESS:
        return None
    return dx, dgamma, dbeta
