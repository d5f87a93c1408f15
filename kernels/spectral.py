"""The DG-Hard spectral step on a batch of same-shape deltas `(B, m, n)` (B = 1 for a lone matrix).

Backends (`--kernel`):
- `exact`: float64 SVD, the ground truth the tests compare against.
- `gram64` (the default behind `auto`): float64 Gram of the small side, eigenvalues, then only the
  top-r eigenvectors; Δ* = (ΔV_r)V_rᵀ. Never pays for the wide orientation.
- `gram32`: the same in float32 (TF32 off), guarded: if κ = s_max/s_med > KAPPA_MAX_F32 or a
  singular value lies within NEAR_TAU_F32 of τ, the matrix is recomputed with `gram64` and the
  stats record why (research/kernels.md §2: float32 breaks ranks from κ ≈ 1e4).
τ and r always come from a full set of eigenvalues, never from a randomized estimate.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import numpy as np
import torch

from . import linalg
from .threads import cpu_thread_policy
from .threshold import SpectralStats, ThresholdParams, threshold_spectrum

Backend = Literal["auto", "exact", "gram64", "gram32"]
BACKENDS: tuple[str, ...] = ("auto", "exact", "gram64", "gram32")

# Float working-set bound of the Gram backends (elements per streamed block: 128 MiB in float64).
DEFAULT_CHUNK_ELEMS = 1 << 24
KAPPA_MAX_F32 = 1e3
NEAR_TAU_F32 = 1e-3
AUTO_EXACT_MAX_P = 32  # below this the SVD is as cheap as anything and needs no care


def resolve_backend(backend: str, rows: int, cols: int) -> str:
    """`auto`: exact SVD for tiny matrices, float64 Gram otherwise (on CPU and CUDA alike)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "exact" if min(rows, cols) <= AUTO_EXACT_MAX_P else "gram64"
    return backend


def resolve_device(name: str) -> str:
    """`auto` means the first CUDA device when torch sees one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA device")
    return name


def repair_batch(
    delta: torch.Tensor, params: ThresholdParams, backend: str = "auto",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS, device: torch.device | str | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, list[SpectralStats]]:
    """DG-Hard on float32 deltas `(B, m, n)`; returns float32 Δ* `(B, m, n)` and per-matrix stats.

    Degenerate matrices come back with Δ* = Δ (callers pass the fine-tuned tensor through). Δ may
    live on the CPU while `device` is CUDA: blocks are moved as they are used, and Δ* is written to
    Δ's device. `chunk_elems` bounds the working set: Δ is never converted in full. On the CPU the
    work runs under `cpu_thread_policy(threads)` (BLAS threads; default every usable core).
    """
    if delta.ndim != 3:
        raise ValueError(f"repair_batch takes (B, m, n); got shape {tuple(delta.shape)}")
    if delta.dtype != torch.float32:
        raise ValueError(f"deltas must be float32 (upcast before subtracting); got {delta.dtype}")
    _, rows, cols = delta.shape
    chosen = resolve_backend(backend, rows, cols)
    dev = torch.device(device) if device is not None else delta.device
    policy = cpu_thread_policy(threads) if dev.type == "cpu" else nullcontext()
    with policy:
        return _repair_all(delta, params, chosen, chunk_elems, dev)


def _repair_all(delta: torch.Tensor, params: ThresholdParams, chosen: str, chunk_elems: int,
                dev: torch.device) -> tuple[torch.Tensor, list[SpectralStats]]:
    _, rows, cols = delta.shape
    out = torch.empty_like(delta)
    stats: list[SpectralStats] = []
    for i in range(delta.shape[0]):
        d = delta[i]
        if not bool(torch.any(d != 0)):
            st = threshold_spectrum(np.zeros(min(rows, cols)), rows, cols, params).with_backend(chosen)
            out[i] = d
        elif chosen == "exact":
            st = _exact(d, params, out[i], dev)
        elif chosen == "gram32":
            st = _gram(d, params, out[i], chunk_elems, dev, torch.float32)
        else:
            st = _gram(d, params, out[i], chunk_elems, dev, torch.float64)
        if st.degenerate:
            out[i] = d
        stats.append(st)
    return out, stats


def _exact(d: torch.Tensor, params: ThresholdParams, dst: torch.Tensor, dev: torch.device) -> SpectralStats:
    u, s, vh = torch.linalg.svd(d.to(device=dev, dtype=torch.float64), full_matrices=False)
    st = threshold_spectrum(s.cpu().numpy(), d.shape[0], d.shape[1], params).with_backend("exact")
    if not st.degenerate:
        r = st.rank_kept
        dst.copy_(((u[:, :r] * s[:r]) @ vh[:r]).to(dst.device))
    return st


def _gram(d: torch.Tensor, params: ThresholdParams, dst: torch.Tensor, chunk_elems: int, dev: torch.device,
          dtype: torch.dtype, lapack: bool | None = None) -> SpectralStats:
    """Tall (m ≥ n): G = ΔᵀΔ over row blocks, Δ* = (ΔV_r)V_rᵀ. Wide: the same on Δᵀ.

    `lapack` None picks by device (linalg.uses_lapack); False forces the torch path (what CUDA runs).
    """
    rows, cols = d.shape
    tall = rows >= cols
    work = d if tall else d.T  # (N, p)
    name = "gram64" if dtype == torch.float64 else "gram32"
    eig = linalg.GramEigen(linalg.gram(work, dtype, dev, chunk_elems, lapack), lapack)
    s = eig.singular_values()
    st = threshold_spectrum(s, rows, cols, params).with_backend(name)
    if dtype == torch.float32:
        reason = _float32_unsafe(s, st)
        if reason:
            st = _gram(d, params, dst, chunk_elems, dev, torch.float64, lapack)
            return st.with_backend("gram64", fallback=reason)
    if st.degenerate:
        return st
    if st.rank_kept == 0:
        dst.zero_()
        return st
    v_r = eig.top_vectors(st.rank_kept).to(device=dev, dtype=dtype)
    linalg.project(work, v_r, dst if tall else dst.T, chunk_elems, lapack)
    return st


def _float32_unsafe(s: np.ndarray, st: SpectralStats) -> str | None:
    """Why a float32 spectrum cannot be trusted for this matrix, or None."""
    if st.degenerate == "zero_delta":
        return None
    if st.degenerate or st.s_max > KAPPA_MAX_F32 * st.s_med:
        return f"kappa>{KAPPA_MAX_F32:g}"
    if np.any(np.abs(s - st.tau) <= NEAR_TAU_F32 * st.tau):
        return "near_tau"
    return None


def singular_values(d: torch.Tensor, backend: str = "auto", chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                    device: torch.device | str | None = None) -> np.ndarray:
    """Descending float64 singular values of one float32 delta `(m, n)`, from the spectrum the repair
    backends use (exact SVD, or the float64 Gram; `gram32` is read in float64 here). For reports:
    the repair itself goes through `repair_batch`."""
    if d.ndim != 2 or d.dtype != torch.float32:
        raise ValueError(f"singular_values takes one float32 (m, n) matrix; got {d.dtype} {tuple(d.shape)}")
    rows, cols = d.shape
    dev = torch.device(device) if device is not None else d.device
    if resolve_backend(backend, rows, cols) == "exact":
        return torch.linalg.svdvals(d.to(device=dev, dtype=torch.float64)).cpu().numpy()
    work = d if rows >= cols else d.T
    return linalg.GramEigen(linalg.gram(work, torch.float64, dev, chunk_elems)).singular_values()
