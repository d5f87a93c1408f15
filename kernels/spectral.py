"""The DG-Hard spectral step on a batch of same-shape deltas `(B, m, n)` (B = 1 for a lone matrix).

Backends (`--kernel`):
- `exact`: float64 SVD, the ground truth the tests compare against.
- `gram64` (the default behind `auto`): float64 Gram of the small side, eigenvalues, then only the
  top-r eigenvectors; Δ* = (ΔV_r)V_rᵀ. Never pays for the wide orientation.
- `gram32`: the same in float32 (TF32 off), guarded: if κ = s_max/s_med > KAPPA_MAX_F32 or a
  singular value lies within NEAR_TAU_F32 of τ, the matrix is recomputed with `gram64` and the
  stats record why (docs/adr/0004-cpu-spectral-kernels.md: float32 breaks ranks from κ ≈ 1e4).
τ and r always come from a full set of eigenvalues, never from a randomized estimate.
"""

from __future__ import annotations

import typing
from contextlib import nullcontext
from typing import Literal

import numpy as np
import torch

from . import linalg
from .threads import cpu_thread_policy
from .threshold import SpectralRule, SpectralStats, threshold_spectrum

Backend = Literal["auto", "exact", "gram64", "gram32"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)

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


Factors = list[tuple[torch.Tensor, torch.Tensor] | None]


def repair_batch(
    delta: torch.Tensor, params: SpectralRule, backend: str = "auto",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS, device: torch.device | str | None = None,
    threads: int | None = None, factors: Factors | None = None,
) -> tuple[torch.Tensor, list[SpectralStats]]:
    """A spectral rule (DG-Hard by default) on float32 deltas `(B, m, n)`; returns float32 Δ* and stats.

    `factors`, when given, receives per matrix (L (m, r), R (r, n)) in float32 on the CPU with
    Δ* = L R and balanced column/row norms (None for a degenerate or rank-0 matrix): the adapter export.

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
        return _repair_all(delta, params, chosen, chunk_elems, dev, factors)


def _repair_all(delta: torch.Tensor, params: SpectralRule, chosen: str, chunk_elems: int,
                dev: torch.device, factors: Factors | None) -> tuple[torch.Tensor, list[SpectralStats]]:
    _, rows, cols = delta.shape
    out = torch.empty_like(delta)
    stats: list[SpectralStats] = []
    for i in range(delta.shape[0]):
        d = delta[i]
        pair: list = []
        if not bool(torch.any(d != 0)):
            st = threshold_spectrum(np.zeros(min(rows, cols)), rows, cols, params).with_backend(chosen)
            out[i] = d
        elif chosen == "exact":
            st = _exact(d, params, out[i], dev, pair)
        elif chosen == "gram32":
            st = _gram(d, params, out[i], chunk_elems, dev, torch.float32, pair=pair)
        else:
            st = _gram(d, params, out[i], chunk_elems, dev, torch.float64, pair=pair)
        if st.degenerate:
            out[i] = d
        stats.append(st)
        if factors is not None:
            factors.append(_balanced(*pair[-1]) if pair else None)
    return out, stats


def _balanced(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale so component i has equal norms on both sides (Δ* = L R is unchanged)."""
    gain = (left.norm(dim=0) / right.norm(dim=1).clamp_min(1e-300)).clamp_min(1e-300).sqrt()
    return ((left / gain).to(device="cpu", dtype=torch.float32).contiguous(),
            (right * gain[:, None]).to(device="cpu", dtype=torch.float32).contiguous())


def _weights(st: SpectralStats, like: torch.Tensor) -> torch.Tensor | None:
    return None if st.weights is None else torch.as_tensor(st.weights, dtype=like.dtype, device=like.device)


def _exact(d: torch.Tensor, params: SpectralRule, dst: torch.Tensor, dev: torch.device,
           pair: list | None = None) -> SpectralStats:
    u, s, vh = torch.linalg.svd(d.to(device=dev, dtype=torch.float64), full_matrices=False)
    st = threshold_spectrum(s.cpu().numpy(), d.shape[0], d.shape[1], params).with_backend("exact")
    if st.degenerate == "zero_delta":
        return st
    r = st.rank_kept
    kept = s[:r] if st.weights is None else s[:r] * _weights(st, s)
    if not st.degenerate:
        dst.copy_(((u[:, :r] * kept) @ vh[:r]).to(dst.device))
    if pair is not None and r:  # median_zero (Δ* = Δ) still exports its non-zero components
        pair.append((u[:, :r] * kept, vh[:r]))
    return st


def _gram(d: torch.Tensor, params: SpectralRule, dst: torch.Tensor, chunk_elems: int, dev: torch.device,
          dtype: torch.dtype, lapack: bool | None = None, pair: list | None = None) -> SpectralStats:
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
            st = _gram(d, params, dst, chunk_elems, dev, torch.float64, lapack, pair)
            return st.with_backend("gram64", fallback=reason)
    if st.degenerate == "zero_delta" or (st.degenerate and pair is None):
        return st
    if st.rank_kept == 0:
        dst.zero_()
        return st
    v_r = eig.top_vectors(st.rank_kept).to(device=dev, dtype=dtype)
    w = _weights(st, v_r)
    right = v_r if w is None else v_r * w
    # A median_zero matrix only gets here for its factors; the caller then writes Δ* = Δ over dst.
    work_v = None if pair is None else torch.empty(work.shape[0], st.rank_kept, dtype=dtype, device=dev)
    linalg.project(work, v_r, dst if tall else dst.T, chunk_elems, lapack, right=right, coeff_out=work_v)
    if pair is not None:
        pair.append((work_v, right.T) if tall else (right, work_v.T))
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
    """All singular values of one float32 delta (m, n), descending, float64: the calibration pass of
    --target-rho caches these so bisecting a spectral method's knob never repeats the decomposition, and
    `dgrepair report` plots them (the repair itself goes through `repair_batch`)."""
    if d.ndim != 2 or d.dtype != torch.float32:
        raise ValueError(f"singular_values takes one float32 (m, n) matrix; got {d.dtype} {tuple(d.shape)}")
    rows, cols = d.shape
    chosen = resolve_backend(backend, rows, cols)
    dev = torch.device(device) if device is not None else d.device
    if not bool(torch.any(d != 0)):
        return np.zeros(min(rows, cols))
    if chosen == "exact":
        return torch.linalg.svdvals(d.to(device=dev, dtype=torch.float64)).cpu().numpy()
    work = d if rows >= cols else d.T
    # Calibration only needs ranks and energies; float64 Gram eigenvalues serve both Gram backends.
    return linalg.GramEigen(linalg.gram(work, torch.float64, dev, chunk_elems, None), None).singular_values()
