"""The DG-Hard threshold rule on a spectrum (SPEC.md §1), shared by every backend.

Backends only produce a descending float64 spectrum; this module decides τ, the kept rank and the
degenerate cases, so those rules cannot differ between backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from .dg_constants import lambda_star, mp_median

MedianRule = Literal["lower", "mean"]

# A singular value at or below ZERO_RTOL * s_max is numerically zero. Deltas are float32 data,
# and float64 spectra of exactly rank-deficient float32 matrices land at ~1e-8 * s_max (Gram
# route) or ~1e-15 * s_max (SVD); real noise bulks sit orders of magnitude higher
# (docs/adr/0002-numerical-conventions.md).
ZERO_RTOL = 1e-6



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
    backend: str = ""  # the backend whose spectrum decided (after any fallback)
    fallback: str | None = None  # why a guarded float32 backend recomputed in float64

    def with_backend(self, backend: str, fallback: str | None = None) -> SpectralStats:
        return replace(self, backend=backend, fallback=fallback)


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


