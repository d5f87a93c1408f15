"""Gram, eigenvalues and top eigenvectors on the CPU (scipy's LAPACK, its tridiagonal routines called
without the GIL through lapack_nogil.py; BLAS through numpy) and on CUDA (torch).

One tridiagonalisation serves both the eigenvalues and the top-r eigenvectors, about a tenth of a
full `eigh` with all vectors. The LAPACK eigen calls run on one BLAS thread: on an idle 2-core
machine two threads make `sytrd` about 1.8x faster at p = 2048, but with another process on the
cores it collapsed (0.48 s -> 5.1 s observed), because the tridiagonalisation synchronises its
threads once per column. The Gram and the projection use the cores by pieces whose shapes depend
only on the matrix (Gram tiles of `gram_tile(p)`, projection blocks of `PROJECT_ROWS` rows), each
one single-threaded BLAS call, up to `threads` at once (threads.py says why: a threaded BLAS call's
float32 sums change with its thread count). Measured on 2 AVX2 cores (bench/blas_threads.py, figures
in docs/adr/0016-thread-count-independent-bytes.md): the tiled Gram costs -2 % to +8 % of a threaded
`ssyrk` on 2 threads, -6 % to +22 % on 1 thread. On CUDA (the torch path) one `eigh` call gives
the eigenvalues and the vectors together: one tridiagonalisation per matrix, and the only transfer
to the host inside a matrix is its p eigenvalues, which the threshold needs. No I/O here.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from . import lapack_nogil
from .threads import run_pieces

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32}

# Rows of Δ per projection piece (a fixed shape: see the module docstring).
PROJECT_ROWS = 512


def gram_tile(p: int) -> int:
    """Side of the Gram's square tiles for a p x p Gram: a function of p alone, never of the thread
    count. 512 measured fastest at p = 2048 and 4096 on 2 cores (384 and 1024 were slower or equal)."""
    return max(64, min(512, (p // 4 + 15) // 16 * 16))


def uses_lapack(device: torch.device) -> bool:
    """LAPACK/BLAS through scipy on the CPU; torch (cuSOLVER/cuBLAS) elsewhere. The torch path also
    runs on CPU tensors, which is how CI tests the code that a GPU runs."""
    return device.type == "cpu"


def gram(work: torch.Tensor, dtype: torch.dtype, device: torch.device, chunk_elems: int,
         lapack: bool | None = None, threads: int = 1) -> torch.Tensor:
    """WᵀW for an (N, p) view W, accumulated over row blocks so W is never converted in full.

    LAPACK path: the lower triangle is filled (what LAPACK reads), tile by tile, up to `threads`
    tiles at once. torch path: the full product.
    """
    big, small = work.shape
    step = max(1, chunk_elems // max(small, 1))
    if uses_lapack(device) if lapack is None else lapack:
        acc = np.zeros((small, small), dtype=_NUMPY[dtype], order="F")
        side = gram_tile(small)
        tiles = [(i, j) for j in range(0, small, side) for i in range(j, small, side)]
        for lo in range(0, big, step):
            rows = _numpy_rows(work[lo:lo + step].to(dtype))
            run_pieces([partial(_add_gram_tile, acc, rows, i, j, side, lo == 0) for i, j in tiles], threads)
        return torch.from_numpy(acc)
    acc_t = torch.zeros(small, small, dtype=dtype, device=device)
    with _ieee_fp32_matmul():
        for lo in range(0, big, step):
            block = work[lo:lo + step].to(device=device, dtype=dtype)
            acc_t.addmm_(block.T, block)
    return acc_t


def _add_gram_tile(acc: np.ndarray, rows: np.ndarray, i: int, j: int, side: int, first: bool) -> None:
    """acc[I, J] += rows[:, I]ᵀ rows[:, J] for the tile at (i, j), i ≥ j (a diagonal tile is a syrk).

    Computed as its transpose rows[:, J]ᵀ rows[:, I], whose layout in the Fortran-ordered acc is row-major,
    so BLAS writes the first row block's tile straight into acc and later blocks add in matching order
    (measured at 8192 x 4096 on one thread: 2.27 s against 2.45-2.64 s through a temporary and a
    transposing add; one `ssyrk` 2.16-2.24 s)."""
    left = rows[:, j:j + side]
    right = left if i == j else rows[:, i:i + side]
    view = acc[i:i + side, j:j + side].T
    if first:
        np.matmul(left.T, right, out=view)
    else:
        view += left.T @ right


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
            with threadpool_limits(limits=1, user_api="blas"):  # threaded sytrd collapses under contention
                self.c, self.d, self.e, self.tau = lapack_nogil.sytrd_lower(g.numpy())

    def singular_values(self) -> np.ndarray:
        """Descending float64 singular values sqrt(max(eig(G), 0))."""
        if not self.lapack:
            w = self.w.cpu().numpy()
        elif self.p == 1:
            w = self.g.numpy().reshape(1)
        else:
            w = lapack_nogil.sterf(self.d, self.e)
        return np.sqrt(np.clip(np.sort(w.astype(np.float64))[::-1], 0.0, None))

    def top_vectors(self, r: int) -> torch.Tensor:
        """Eigenvectors of the r largest eigenvalues, largest first, as columns (p, r)."""
        p = self.p
        if not self.lapack:
            return self.v[:, p - r:].flip(1).contiguous()
        if p == 1:
            return torch.ones(1, 1, dtype=self.g.dtype)
        z = lapack_nogil.stemr_top(self.d, self.e, r)
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
            coeff_out: torch.Tensor | None = None, threads: int = 1) -> None:
    """out[block] = (W[block] V_r) Rᵀ for every row block of the (N, p) view W; R = V_r unless given
    (a shrinker passes R = V_r diag(w)). `coeff_out` (N, r), when given, receives W V_r on the way
    (the left factor of an exported adapter), so it is never computed twice. LAPACK path: pieces of
    `PROJECT_ROWS` rows, up to `threads` at once."""
    right = v_r if right is None else right
    big, small = work.shape
    step = max(1, chunk_elems // max(small, 1))
    if uses_lapack(v_r.device) if lapack is None else lapack:
        v = np.ascontiguousarray(v_r.numpy())
        r_mat = v if right is v_r else np.ascontiguousarray(right.numpy())
        for lo in range(0, big, step):
            rows = _numpy_rows(work[lo:lo + step].to(v_r.dtype))
            dest = out[lo:lo + step]
            coeff_dest = None if coeff_out is None else coeff_out[lo:lo + step]
            run_pieces([partial(_project_rows, rows, v, r_mat, dest, coeff_dest, s, s + PROJECT_ROWS)
                        for s in range(0, rows.shape[0], PROJECT_ROWS)], threads)
        return
    with _ieee_fp32_matmul():
        for lo in range(0, big, step):
            block_v = work[lo:lo + step].to(device=v_r.device, dtype=v_r.dtype) @ v_r
            out[lo:lo + step] = (block_v @ right.T).to(device=out.device, dtype=out.dtype)
            if coeff_out is not None:
                coeff_out[lo:lo + step] = block_v


def _numpy_rows(block: torch.Tensor) -> np.ndarray:
    """A (rows, p) CPU block as numpy without a copy when it is row- or column-major (a wide matrix's
    Δᵀ is column-major): numpy hands either layout to BLAS with a transpose flag. Measured at 2048 x
    5632 on one thread: transposing copies cost a projection 4-5x its gemms (docs/benchmarks.md,
    "Where dgrepair's time goes")."""
    if block.is_contiguous() or block.T.is_contiguous():
        return block.numpy()
    return block.contiguous().numpy()


def _project_rows(rows: np.ndarray, v: np.ndarray, r_mat: np.ndarray, dest: torch.Tensor,
                  coeff_dest: torch.Tensor | None, lo: int, hi: int) -> None:
    """dest[lo:hi] = (rows[lo:hi] V) Rᵀ, written by BLAS straight into dest's memory when dest has the
    product's dtype and either layout; else computed, then copied (and cast)."""
    coeff = rows[lo:hi] @ v
    target = dest[lo:hi]
    view = target.numpy() if _NUMPY.get(target.dtype) == coeff.dtype else None
    if view is not None and view.strides[1] == view.itemsize:
        np.matmul(coeff, r_mat.T, out=view)
    elif view is not None and view.strides[0] == view.itemsize:
        np.matmul(r_mat, coeff.T, out=view.T)
    else:
        target.copy_(torch.from_numpy(coeff @ r_mat.T))
    if coeff_dest is not None:
        coeff_dest[lo:hi] = torch.from_numpy(coeff)


class _ieee_fp32_matmul:
    """Disable TF32 for the duration (it rounds inputs to 10 mantissa bits); restore afterwards."""

    def __enter__(self) -> None:
        self._saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self._saved
