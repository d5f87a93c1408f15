"""kernels/lapack_nogil.py against scipy's own LAPACK wrappers (the reference): bit-identical
tridiagonalisation, eigenvalues and top eigenvectors, and the GIL released during the call."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import scipy.linalg

from dgrepair.kernels import lapack_nogil


def _gram(p: int, dtype, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((p + 7, p)).astype(dtype)
    return np.asfortranarray(x.T @ x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [2, 3, 31, 257])
def test_bit_identical_to_scipy(dtype, p):
    a = _gram(p, dtype, seed=p)
    sytrd, sytrd_lwork = scipy.linalg.lapack.get_lapack_funcs(("sytrd", "sytrd_lwork"), (a,))
    c, d, e, tau, info = sytrd(a, lower=1, lwork=max(int(sytrd_lwork(p, lower=1)[0]), 1))
    assert info == 0
    before = a.copy()
    ours = lapack_nogil.sytrd_lower(a)
    assert np.array_equal(a, before)  # the input is not modified
    for theirs, mine in zip((c, d, e, tau), ours, strict=True):
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
    sterf = scipy.linalg.lapack.get_lapack_funcs("sterf", (d,))
    assert np.array_equal(lapack_nogil.sterf(d, e), sterf(d, e)[0])
    for r in sorted({1, max(1, p // 3), p}):
        _, z = scipy.linalg.eigh_tridiagonal(d, e, select="i", select_range=(p - r, p - 1), check_finite=False,
                                             lapack_driver="stemr")
        mine = lapack_nogil.stemr_top(d, e, r)
        assert mine.shape == (p, r) and np.array_equal(mine, z), r


def test_a_failing_routine_raises():
    d = np.array([1.0, np.nan, 2.0])
    e = np.array([0.5, 0.5])
    with pytest.raises(np.linalg.LinAlgError):
        lapack_nogil.stemr_top(d, e, 1)


def test_sytrd_lets_other_python_threads_run():
    """While one thread tridiagonalises a 2048 Gram, this thread keeps running Python: with the GIL
    held for the call (scipy's f2py wrapper, or a PYFUNCTYPE prototype) it counted a few thousand
    loop turns at most, released it counts hundreds of thousands."""
    a = _gram(2048, np.float32)
    started, done = threading.Event(), threading.Event()

    def tridiagonalise() -> None:
        started.set()
        lapack_nogil.sytrd_lower(a)
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # the other thread takes the GIL back within 0.1 ms when it wants it
    try:
        worker = threading.Thread(target=tridiagonalise)
        worker.start()
        started.wait()
        turns = 0
        while not done.is_set():
            turns += 1
        worker.join()
    finally:
        sys.setswitchinterval(old)
    assert turns > 100_000, turns
