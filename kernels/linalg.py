"""Gram, eigenvalues and top eigenvectors on the CPU (LAPACK through scipy) and on CUDA (torch).

Measured on the 2-core CPU at 7168×2048 (docs/benchmarks.md): BLAS `syrk` forms the Gram in about
half the time of a general matmul, and one tridiagonalisation serves both the eigenvalues and the
top-r eigenvectors, about a tenth of a full `eigh` with all vectors. The LAPACK eigen calls run on
one BLAS thread: on an idle 2-core machine two threads make `sytrd` about 1.8x faster at p = 2048,
but with another process on the cores it collapsed (0.48 s -> 5.1 s observed), because the
tridiagonalisation synchronises its threads once per column. Cores are used instead by one
single-threaded worker per core (the Ray default). On CUDA (the torch path) one `eigh` call gives
the eigenvalues and the vectors together: one tridiagonalisation per matrix, and the only transfer
to the host inside a matrix is its p eigenvalues, which the threshold needs. No I/O here.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas
from threadpoolctl import threadpool_limits

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32}


def uses_lapack(device: torch.device) -> bool:
    """LAPACK/BLAS through scipy on the CPU; torch (cuSOLVER/cuBLAS) elsewhere. The torch path also
    runs on CPU tensors, which is how CI tests the code that a GPU runs."""
    return device.type == "cpu"


def gram(work: torch.Tensor, dtype: torch.dtype, device: torch.device, chunk_elems: int,
         lapack: bool | None = None) -> torch.Tensor:
    """WᵀW for an (N, p) view W, accumulated over row blocks so W is never converted in full.

    LAPACK path: the lower triangle is filled (what LAPACK reads). torch path: the full product.
    """
    big, small = work.shape
    step = max(1, chunk_elems // max(small, 1))
    if uses_lapack(device) if lapack is None else lapack:
        syrk = blas.dsyrk if dtype == torch.float64 else blas.ssyrk
        acc = np.zeros((small, small), dtype=_NUMPY[dtype], order="F")
        for lo in range(0, big, step):
            a, transposed = _fortran(work[lo:lo + step].to(dtype))
            acc = syrk(1.0, a, beta=1.0, c=acc, trans=int(transposed), lower=1, overwrite_c=1)
        return torch.from_numpy(acc)
    acc_t = torch.zeros(small, small, dtype=dtype, device=device)
    with _ieee_fp32_matmul():
        for lo in range(0, big, step):
            block = work[lo:lo + step].to(device=device, dtype=dtype)
            acc_t.addmm_(block.T, block)
    return acc_t


class GramEigen:
    """Eigen-decomposition of a Gram matrix, paid once: all eigenvalues, then only the top-r vectors.

    CPU: one LAPACK `sytrd` tridiagonalisation (the O(p³) part), `sterf` for every eigenvalue,
    `stemr` for the top r eigenvectors of the tridiagonal matrix and `ormqr` to map them back
    (O(p²r)). Measured at p = 2048: 0.62 s against 0.9 s for `syev` + `syevr` (which tridiagonalise
    twice); eigenvalues bit-identical, vectors equal to 4e-16. Torch path (CUDA): one `eigh`
    (cuSOLVER syevd) for values and vectors; the vectors stay on the device until `top_vectors`.
    """

    def __init__(self, g: torch.Tensor, lapack: bool | None = None) -> None:
        self.g = g
        self.p = g.shape[0]
        self.lapack = uses_lapack(g.device) if lapack is None else lapack
        if not self.lapack:
            self.w, self.v = torch.linalg.eigh(g)
        elif self.p > 1:
            a = g.numpy()
            sytrd, sytrd_lwork = scipy.linalg.lapack.get_lapack_funcs(("sytrd", "sytrd_lwork"), (a,))
            with threadpool_limits(limits=1, user_api="blas"):  # threaded sytrd collapses under contention
                lwork = int(sytrd_lwork(self.p, lower=1)[0])
                self.c, self.d, self.e, self.tau, info = sytrd(a, lower=1, lwork=max(lwork, 1))
            if info != 0:
                raise np.linalg.LinAlgError(f"LAPACK sytrd failed (info={info})")

    def singular_values(self) -> np.ndarray:
        """Descending float64 singular values sqrt(max(eig(G), 0))."""
        if not self.lapack:
            w = self.w.cpu().numpy()
        elif self.p == 1:
            w = self.g.numpy().reshape(1)
        else:
            sterf = scipy.linalg.lapack.get_lapack_funcs("sterf", (self.d,))
            w, info = sterf(self.d, self.e)  # copies: overwrite_d/e default to False
            if info != 0:
                raise np.linalg.LinAlgError(f"LAPACK sterf failed (info={info})")
        return np.sqrt(np.clip(np.sort(w.astype(np.float64))[::-1], 0.0, None))

    def top_vectors(self, r: int) -> torch.Tensor:
        """Eigenvectors of the r largest eigenvalues, largest first, as columns (p, r)."""
        p = self.p
        if not self.lapack:
            return self.v[:, p - r:].flip(1).contiguous()
        if p == 1:
            return torch.ones(1, 1, dtype=self.g.dtype)
        _, z = scipy.linalg.eigh_tridiagonal(self.d, self.e, select="i", select_range=(p - r, p - 1),
                                             check_finite=False, lapack_driver="stemr")
        z = np.array(z[:, ::-1], dtype=self.c.dtype, order="F")  # a real copy: no negative strides
        # Q = H(1)...H(p-1) from the lower-storage sytrd is a QR-type product on rows 2..p (what
        # LAPACK's ormtr does internally): apply it with ormqr.
        ormqr = scipy.linalg.lapack.get_lapack_funcs("ormqr", (self.c,))
        reflectors, rows = self.c[1:, :-1], np.asfortranarray(z[1:, :])
        lwork = int(ormqr("L", "N", reflectors, self.tau, rows, lwork=-1)[1][0].real)
        mapped, _, info = ormqr("L", "N", reflectors, self.tau, rows, lwork=max(lwork, 1))
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK ormqr failed (info={info})")
        z[1:, :] = mapped
        return torch.from_numpy(z.copy(order="C"))


def project(work: torch.Tensor, v_r: torch.Tensor, out: torch.Tensor, chunk_elems: int,
            lapack: bool | None = None, right: torch.Tensor | None = None,
            coeff_out: torch.Tensor | None = None) -> None:
    """out[block] = (W[block] V_r) Rᵀ for every row block of the (N, p) view W; R = V_r unless given
    (a shrinker passes R = V_r diag(w)). `coeff_out` (N, r), when given, receives W V_r on the way
    (the left factor of an exported adapter), so it is never computed twice."""
    right = v_r if right is None else right
    big, small = work.shape
    step = max(1, chunk_elems // max(small, 1))
    if uses_lapack(v_r.device) if lapack is None else lapack:  # stay in the BLAS pool (see threads.py)
        gemm = blas.dgemm if v_r.dtype == torch.float64 else blas.sgemm
        v = np.asfortranarray(v_r.numpy())
        r_mat = v if right is v_r else np.asfortranarray(right.numpy())
        for lo in range(0, big, step):
            a, transposed = _fortran(work[lo:lo + step].to(v_r.dtype))
            coeff = gemm(1.0, v, a, trans_a=1, trans_b=int(transposed))  # V_rᵀ Wᵀ: (r, rows)
            _store_projection(gemm, r_mat, coeff, out[lo:lo + step])
            if coeff_out is not None:
                coeff_out[lo:lo + step] = torch.from_numpy(coeff.T)
        return
    with _ieee_fp32_matmul():
        for lo in range(0, big, step):
            block_v = work[lo:lo + step].to(device=v_r.device, dtype=v_r.dtype) @ v_r
            out[lo:lo + step] = (block_v @ right.T).to(device=out.device, dtype=out.dtype)
            if coeff_out is not None:
                coeff_out[lo:lo + step] = block_v


def _fortran(block: torch.Tensor) -> tuple[np.ndarray, bool]:
    """A (rows, p) CPU block as the Fortran-ordered array BLAS reads, without a copy where its memory
    allows: (Wᵀ, False) for a row-major block (the tall orientation), (W, True) for a transposed one (a
    wide matrix's Δᵀ in one block), so the caller flips BLAS's trans flag instead of transposing the
    data. Measured at 2048 x 5632 on one thread: the transposing copies cost a projection 4-5x its gemms
    (docs/benchmarks.md, "Where dgrepair's time goes")."""
    if not block.is_contiguous() and block.T.is_contiguous():
        return block.T.numpy().T, True
    return block.contiguous().numpy().T, False


def _store_projection(gemm, r_mat: np.ndarray, coeff: np.ndarray, dest: torch.Tensor) -> None:
    """dest (rows, p) = (R coeff)ᵀ, written by gemm straight into dest's memory when it is laid out as
    one of the two products (R coeff, or coeffᵀ Rᵀ) and has gemm's dtype; else computed, then copied."""
    layouts = [(dest, False), (dest.T, True)] if _NUMPY.get(dest.dtype) == coeff.dtype else []
    for view, transposed in layouts:
        if view.is_contiguous():
            c = view.numpy().T  # F-ordered: R coeff (p, rows), or coeffᵀ Rᵀ (rows, p) for the transposed view
            got = (gemm(1.0, coeff, r_mat, trans_a=1, trans_b=1, beta=0.0, c=c, overwrite_c=1) if transposed
                   else gemm(1.0, r_mat, coeff, beta=0.0, c=c, overwrite_c=1))
            if not np.shares_memory(got, c):  # f2py copied after all: write the result back
                c[...] = got
            return
    dest.copy_(torch.from_numpy(gemm(1.0, r_mat, coeff).T))


class _ieee_fp32_matmul:
    """Disable TF32 for the duration (it rounds inputs to 10 mantissa bits); restore afterwards."""

    def __enter__(self) -> None:
        self._saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self._saved
