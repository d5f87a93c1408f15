"""The DG-Hard spectral step (SPEC.md §1): spectrum -> threshold -> low-rank reconstruction.

Every backend produces the singular values of a float32 delta in float64 and hands them to the
one threshold function `threshold_spectrum`, so the rank rule, the median convention and the
degenerate cases are identical across backends. Inputs are batches `(B, m, n)` of same-shape
deltas; a lone matrix is `B = 1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .dg_constants import lambda_star, mp_median

MedianRule = Literal["lower", "mean"]
Backend = Literal["exact", "gram64"]
BACKENDS: tuple[str, ...] = ("exact", "gram64")

# A singular value at or below ZERO_RTOL * s_max is numerically zero. Deltas are float32 data,
# and float64 spectra of exactly rank-deficient float32 matrices land at ~1e-8 * s_max (Gram
# route) or ~1e-15 * s_max (SVD); real noise bulks sit orders of magnitude higher
# (docs/adr/0002-numerical-conventions.md).
ZERO_RTOL = 1e-6

# Float64 working-set bound of the Gram backend (elements per streamed block: 128 MiB).
DEFAULT_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class ThresholdParams:
    """The knobs of the DG-Hard rule."""

    scale: float = 1.0
    median: MedianRule = "lower"


@dataclass(frozen=True)
class SpectralStats:
    """What the threshold decided for one matrix, for the manifest and reports."""

    rows: int
    cols: int
    rank_total: int  # p = min(m, n)
    rank_kept: int
    beta: float
    omega: float
    s_max: float
    s_med: float
    sigma_hat: float
    tau: float
    mp_edge: float
    noise_energy_fraction: float
    rho: float  # ||delta*||_F / ||delta||_F
    frob_delta: float
    # None for the regular case; "zero_delta" (Δ == 0: pass through, no SVD) or
    # "median_zero" (s_med numerically 0 with Δ != 0: τ = 0 keeps everything, Δ* = Δ).
    degenerate: str | None


def lower_or_mean_median(s_desc: np.ndarray, rule: MedianRule) -> float:
    """SPEC §1.3: the lower median is element (p-1)//2 of the ascending values (torch.median)."""
    asc = np.sort(np.asarray(s_desc, dtype=np.float64))
    p = asc.size
    if rule == "lower" or p % 2 == 1:
        return float(asc[(p - 1) // 2])
    if rule == "mean":
        return float(0.5 * (asc[p // 2 - 1] + asc[p // 2]))
    raise ValueError(f"unknown median rule {rule!r}; use 'lower' or 'mean'")


def threshold_spectrum(s_desc: np.ndarray, rows: int, cols: int, params: ThresholdParams) -> SpectralStats:
    """Apply the DG-Hard rule to a descending float64 spectrum of an m x n delta."""
    s = np.asarray(s_desc, dtype=np.float64)
    p, big = min(rows, cols), max(rows, cols)
    if s.shape != (p,):
        raise ValueError(f"expected {p} singular values for a {rows}x{cols} matrix, got shape {s.shape}")
    beta = p / big
    mu = mp_median(beta)
    omega = lambda_star(beta) / math.sqrt(mu)
    energy = float(np.sum(s * s))
    s_max = float(s[0]) if p else 0.0
    common = dict(rows=rows, cols=cols, rank_total=p, beta=beta, omega=omega, s_max=s_max)
    if energy == 0.0 or s_max == 0.0:
        return SpectralStats(**common, rank_kept=0, s_med=0.0, sigma_hat=0.0, tau=0.0, mp_edge=0.0,
                             noise_energy_fraction=0.0, rho=1.0, frob_delta=0.0, degenerate="zero_delta")
    s_med = lower_or_mean_median(s, params.median)
    sigma_hat = s_med / math.sqrt(big * mu)
    mp_edge = (1.0 + math.sqrt(beta)) * math.sqrt(big) * sigma_hat
    noise_energy = float(np.sum(s[s <= mp_edge] ** 2)) / energy
    if s_med <= ZERO_RTOL * s_max:
        kept = int(np.count_nonzero(s > ZERO_RTOL * s_max))
        return SpectralStats(**common, rank_kept=kept, s_med=s_med, sigma_hat=sigma_hat, tau=0.0,
                             mp_edge=mp_edge, noise_energy_fraction=noise_energy, rho=1.0,
                             frob_delta=math.sqrt(energy), degenerate="median_zero")
    tau = params.scale * omega * s_med
    kept = int(np.count_nonzero(s > tau))
    rho = math.sqrt(float(np.sum(s[:kept] ** 2)) / energy)
    return SpectralStats(**common, rank_kept=kept, s_med=s_med, sigma_hat=sigma_hat, tau=tau, mp_edge=mp_edge,
                         noise_energy_fraction=noise_energy, rho=rho, frob_delta=math.sqrt(energy),
                         degenerate=None)


def repair_batch(
    delta: torch.Tensor, params: ThresholdParams, backend: Backend = "gram64",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[torch.Tensor, list[SpectralStats]]:
    """DG-Hard on a batch of same-shape float32 deltas `(B, m, n)`.

    Returns Δ* as float32 `(B, m, n)` and one `SpectralStats` per matrix. Degenerate matrices come
    back with Δ* = Δ (callers pass the fine-tuned tensor through for those). `chunk_elems` bounds
    the float64 working set of the Gram backend: Δ is never held in float64 in full.
    """
    if delta.ndim != 3:
        raise ValueError(f"repair_batch takes (B, m, n); got shape {tuple(delta.shape)}")
    if delta.dtype != torch.float32:
        raise ValueError(f"deltas must be float32 (upcast before subtracting); got {delta.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _, rows, cols = delta.shape
    out = torch.empty_like(delta)
    stats: list[SpectralStats] = []
    for i in range(delta.shape[0]):
        d = delta[i]
        if not bool(torch.any(d != 0)):
            stats.append(threshold_spectrum(np.zeros(min(rows, cols)), rows, cols, params))
            out[i] = d
            continue
        if backend == "exact":
            st = _exact(d, params, out[i])
        else:
            st = _gram64(d, params, out[i], chunk_elems)
        stats.append(st)
        if st.degenerate:
            out[i] = d
    return out, stats


def _exact(d: torch.Tensor, params: ThresholdParams, dst: torch.Tensor) -> SpectralStats:
    """Ground truth: a float64 SVD (LAPACK gesdd on CPU)."""
    u, s, vh = torch.linalg.svd(d.to(torch.float64), full_matrices=False)
    st = threshold_spectrum(s.numpy(), d.shape[0], d.shape[1], params)
    r = st.rank_kept
    dst.copy_((u[:, :r] * s[:r]) @ vh[:r])
    return st


def _gram64(d: torch.Tensor, params: ThresholdParams, dst: torch.Tensor, chunk_elems: int) -> SpectralStats:
    """Float64 Gram on the small side + eigh; Δ* = (ΔV_r)V_rᵀ needs neither U nor 1/s.

    Tall (m >= n): G = Σ_c Δ_cᵀΔ_c over row blocks, Δ*_c = (Δ_c V_r)V_rᵀ. Wide: the same over
    column blocks with G = ΔΔᵀ and Δ*_c = V_r(V_rᵀΔ_c).
    """
    rows, cols = d.shape
    tall = rows >= cols
    work = d if tall else d.T  # (N, p) view; its row blocks are Δ's row or column blocks
    big, small = work.shape
    step = max(1, chunk_elems // small)
    gram = torch.zeros(small, small, dtype=torch.float64)
    for lo in range(0, big, step):
        block = work[lo:lo + step].to(torch.float64)
        gram.addmm_(block.T, block)
    evals, evecs = torch.linalg.eigh(gram)
    s = torch.sqrt(torch.clamp(evals.flip(0), min=0.0))
    st = threshold_spectrum(s.numpy(), rows, cols, params)
    if st.degenerate:
        return st
    v_r = evecs.flip(1)[:, : st.rank_kept].contiguous()
    out = dst if tall else dst.T
    for lo in range(0, big, step):
        block = work[lo:lo + step].to(torch.float64)
        out[lo:lo + step] = (block @ v_r) @ v_r.T
    return st
