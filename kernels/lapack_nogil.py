"""LAPACK's symmetric tridiagonal routines, called without holding Python's GIL.

scipy's f2py wrappers of `sytrd`, `sterf` and `stemr` hold the GIL for the whole Fortran call
(`ormqr`'s wrapper and numpy's matmul release it). `sytrd` is the largest single kernel of a repair
(about 0.3 s per 2048 x 2048 Gram), so while one thread tridiagonalises, no other thread of the
process runs Python: measured on 2 cores, two threads running `ssytrd` at p = 2048 took 0.683 s
against 0.334 s for one, i.e. no overlap at all, while two `ssyrk` calls did overlap (0.809 s against
0.765 s). A unit reading beside another unit's kernels, the driver's head start beside `ray.init`,
and the local executor's lanes all stalled on it.

The routines here are the same ones from the same library: scipy publishes its LAPACK as function
pointers (`scipy.linalg.cython_lapack.__pyx_capi__`, the interface Cython extensions and numba link
against), and a ctypes call through a `CFUNCTYPE` prototype releases the GIL. The arguments are
those scipy's own wrappers pass (scipy/linalg/flapack_sym_herm.pyf.src and flapack_gen_tri.pyf.src:
the workspace query, `tryrac = 1`), so the results are bit-identical to `scipy.linalg.lapack`'s
(tests/unit/test_lapack_nogil.py compares them). No I/O here.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import scipy.linalg.cython_lapack as _cython_lapack

_INT = ctypes.c_int  # scipy's cython_lapack is LP64: C int
_P = ctypes.c_void_p
_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}

# Each routine's arguments, in LAPACK order (scipy's cython_lapack.pxd); all are pointers.
_ARGUMENTS = {
    "sytrd": "uplo n a lda d e tau work lwork info".split(),
    "sterf": "n d e info".split(),
    "stemr": "jobz range n d e vl vu il iu m w z ldz nzc isuppz tryrac work lwork iwork liwork info".split(),
}


class LapackError(np.linalg.LinAlgError):
    """A LAPACK routine returned a non-zero info."""


@cache
def _routine(name: str, dtype: np.dtype) -> Callable[..., None]:
    capsule = _cython_lapack.__pyx_capi__[_PREFIX[dtype] + name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    # CFUNCTYPE (not PYFUNCTYPE) releases the GIL during the call.
    return ctypes.CFUNCTYPE(None, *([_P] * len(_ARGUMENTS[name])))(address)


class _Args:
    """Holds the ctypes scalars and arrays of one call alive until it returns, and gives their addresses."""

    def __init__(self, dtype: np.dtype) -> None:
        self.scalar = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        self.keep: list[Any] = []

    def char(self, c: str) -> int:
        return self._hold(ctypes.create_string_buffer(c.encode()))

    def int(self, v: int) -> int:
        return self._hold(_INT(v))

    def real(self, v: float) -> int:
        return self._hold(self.scalar(v))

    def array(self, a: np.ndarray) -> int:
        self.keep.append(a)
        return int(a.ctypes.data)

    def _hold(self, obj: Any) -> int:
        self.keep.append(obj)
        return ctypes.addressof(obj)


def sytrd_lower(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tridiagonalise the symmetric `a` (lower triangle read; `a` is not modified), as
    `scipy.linalg.lapack.?sytrd(a, lower=1, lwork=<queried>)`: returns (c, d, e, tau)."""
    n = a.shape[0]
    dt = a.dtype
    c = np.array(a, dtype=dt, order="F", copy=True)
    d, e, tau = np.empty(n, dt), np.empty(max(n - 1, 0), dt), np.empty(max(n - 1, 0), dt)
    info = _INT(0)

    def run(work: np.ndarray, lwork: int) -> None:
        g = _Args(dt)
        _routine("sytrd", dt)(g.char("L"), g.int(n), g.array(c), g.int(max(n, 1)), g.array(d), g.array(e),
                              g.array(tau), g.array(work), g.int(lwork), ctypes.addressof(info))
        _check("sytrd", info)

    query = np.empty(1, dt)
    run(query, -1)
    lwork = max(int(query[0]), 1)
    run(np.empty(lwork, dt), lwork)
    return c, d, e, tau


def sterf(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Every eigenvalue of the tridiagonal (d, e), ascending, as `scipy.linalg.lapack.?sterf(d, e)`
    (the inputs are copied, not modified)."""
    dt = d.dtype
    w, off = np.array(d, dtype=dt, copy=True), np.array(e, dtype=dt, copy=True)
    info = _INT(0)
    g = _Args(dt)
    _routine("sterf", dt)(g.int(w.shape[0]), g.array(w), g.array(off), ctypes.addressof(info))
    _check("sterf", info)
    return w


def stemr_top(d: np.ndarray, e: np.ndarray, r: int) -> np.ndarray:
    """Eigenvectors of the r largest eigenvalues of the tridiagonal (d, e), ascending, as columns (n, r):
    `scipy.linalg.eigh_tridiagonal(d, e, select="i", select_range=(n - r, n - 1), lapack_driver="stemr")`."""
    n = d.shape[0]
    dt = d.dtype
    il, iu = n - r + 1, n  # LAPACK's 1-based index range
    m, info, tryrac = _INT(0), _INT(0), _INT(1)
    w = np.empty(n, dt)
    z = np.empty((n, max(r, 1)), dt, order="F")
    isuppz = np.empty(2 * n, np.intc)

    def run(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        diag = np.array(d, dtype=dt, copy=True)  # stemr overwrites d and e
        off = np.zeros(n, dt)  # stemr wants n entries, the last one workspace
        off[:-1] = e
        g = _Args(dt)
        tryrac.value = 1
        _routine("stemr", dt)(g.char("V"), g.char("I"), g.int(n), g.array(diag), g.array(off), g.real(0.0), g.real(0.0),
              g.int(il), g.int(iu), ctypes.addressof(m), g.array(w), g.array(z), g.int(n), g.int(max(r, 1)),
              g.array(isuppz), ctypes.addressof(tryrac), g.array(work), g.int(lwork), g.array(iwork), g.int(liwork),
              ctypes.addressof(info))
        _check("stemr", info)

    work_q, iwork_q = np.empty(1, dt), np.empty(1, np.intc)
    run(work_q, -1, iwork_q, -1)
    lwork, liwork = max(int(work_q[0]), 1), max(int(iwork_q[0]), 1)
    run(np.empty(lwork, dt), lwork, np.empty(liwork, np.intc), liwork)
    if m.value != r:
        raise LapackError(f"LAPACK stemr returned {m.value} eigenvectors, {r} asked for")
    return z[:, :r]


def _check(name: str, info: ctypes.c_int) -> None:
    if info.value != 0:
        raise LapackError(f"LAPACK {name} failed (info={info.value})")
