"""Gram, eigenvalues and top eigenvectors on the CPU (LAPACK through scipy) and on CUDA (torch).

Measured on the 2-core CPU at 7168×2048 (docs/benchmarks.md): BLAS `syrk` forms the Gram in about
half the time of a general matmul; LAPACK `syev` (values only) plus `syevr` restricted to the top r
eigenvectors costs about a tenth of a full `eigh` with all vectors. The LAPACK eigen calls run on
one BLAS thread: threaded `syev` was 10-130x slower on the 2-core machine (tridiagonalisation is
memory-bound BLAS-2 with a sync per column). On CUDA the torch (cuSOLVER) calls are used as they
are. No I/O here.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas
from threadpoolctl import threadpool_limits

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32}


def gram(work: torch.Tensor, dtype: torch.dtype, device: torch.device, chunk_elems: int) -> torch.Tensor:
    """WᵀW for an (N, p) view W, accumulated over row blocks so W is never converted in full.

    CPU: the lower triangle is filled (what LAPACK reads). CUDA: the full product.
    """
    big, small = work.shape
    step = max(1, chunk_elems // max(small, 1))
    if device.type == "cpu":
        syrk = blas.dsyrk if dtype == torch.float64 else blas.ssyrk
        acc = np.zeros((small, small), dtype=_NUMPY[dtype], order="F")
        for lo in range(0, big, step):
            block = work[lo:lo + step].to(dtype).contiguous().numpy()  # C (rows, p) is F (p, rows)
            acc = syrk(1.0, block.T, beta=1.0, c=acc, trans=0, lower=1, overwrite_c=1)
        return torch.from_numpy(acc)
    acc_t = torch.zeros(small, small, dtype=dtype, device=device)
    with _ieee_fp32_matmul():
        for lo in range(0, big, step):
            block = work[lo:lo + step].to(device=device, dtype=dtype)
            acc_t.addmm_(block.T, block)
    return acc_t


def singular_values_from_gram(g: torch.Tensor) -> np.ndarray:
    """Descending float64 singular values sqrt(max(eig(G), 0))."""
    if g.device.type == "cpu":
        with threadpool_limits(limits=1, user_api="blas"):  # threaded syev is up to 100x slower here
            w = scipy.linalg.eigh(g.numpy(), lower=True, eigvals_only=True, driver="ev", check_finite=False)
    else:
        w = torch.linalg.eigvalsh(g).cpu().numpy()
    return np.sqrt(np.clip(w[::-1].astype(np.float64), 0.0, None))


def top_eigenvectors(g: torch.Tensor, r: int) -> torch.Tensor:
    """Eigenvectors of the r largest eigenvalues, largest first, as columns (p, r)."""
    p = g.shape[0]
    if g.device.type == "cpu":
        with threadpool_limits(limits=1, user_api="blas"):
            _, v = scipy.linalg.eigh(g.numpy(), lower=True, driver="evr", subset_by_index=[p - r, p - 1],
                                     check_finite=False)
        return torch.from_numpy(v[:, ::-1].copy())
    _, v = torch.linalg.eigh(g)
    return v[:, p - r:].flip(1).contiguous()


def project(work: torch.Tensor, v_r: torch.Tensor, out: torch.Tensor, chunk_elems: int) -> None:
    """out[block] = (W[block] V_r) V_rᵀ for every row block of the (N, p) view W."""
    big, small = work.shape
    step = max(1, chunk_elems // max(small, 1))
    if v_r.device.type == "cpu":  # stay in the BLAS pool (see threads.py)
        gemm = blas.dgemm if v_r.dtype == torch.float64 else blas.sgemm
        v = np.asfortranarray(v_r.numpy())
        for lo in range(0, big, step):
            block_t = work[lo:lo + step].to(v_r.dtype).contiguous().numpy().T  # F (p, rows)
            coeff = gemm(1.0, v, block_t, trans_a=1)  # V_rᵀ Wᵀ: (r, rows)
            out[lo:lo + step] = torch.from_numpy(gemm(1.0, v, coeff).T)  # ((V_r coeff)ᵀ): (rows, p)
        return
    with _ieee_fp32_matmul():
        for lo in range(0, big, step):
            block = work[lo:lo + step].to(device=v_r.device, dtype=v_r.dtype)
            out[lo:lo + step] = ((block @ v_r) @ v_r.T).to(device=out.device, dtype=out.dtype)


class _ieee_fp32_matmul:
    """Disable TF32 for the duration (it rounds inputs to 10 mantissa bits); restore afterwards."""

    def __enter__(self) -> None:
        self._saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self._saved
