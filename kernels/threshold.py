"""The DG-Hard threshold rule on a spectrum (docs/maths.md), shared by every backend.

Backends only produce a descending float64 spectrum; this module decides τ, the kept rank and the
degenerate cases, so those rules cannot differ between backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np

from .dg_constants import mp_median
from .dg_constants import omega as dg_omega

MedianRule = Literal["lower", "mean"]

# A singular value at or below ZERO_RTOL * s_max is numerically zero. Deltas are float32 data,
# and float64 spectra of exactly rank-deficient float32 matrices land at ~1e-8 * s_max (Gram
# route) or ~1e-15 * s_max (SVD); real noise bulks sit orders of magnitude higher
# (docs/adr/0002-numerical-conventions.md).
ZERO_RTOL = 1e-6


@dataclass(frozen=True)
class NoiseScale:
    """The noise estimate every rule starts from (docs/maths.md): s_med, σ̂, the MP edge, ω(β)."""

    s_med: float
    sigma_hat: float
    mp_edge: float
    omega: float
    big: int
    beta: float


@dataclass(frozen=True)
class Cut:
    """What a rule keeps: the top `rank` components, each scaled by `weights[i]` (None = 1)."""

    tau: float
    rank: int
    weights: np.ndarray | None = None


class SpectralRule(Protocol):
    """A rule that decides Δ* from the spectrum alone (DG-Hard and the other spectral methods)."""

    median: MedianRule
    # False: the rule needs no noise scale, so s_med = 0 is not a degenerate case for it.
    needs_noise_scale: bool

    def cut(self, s: np.ndarray, noise: NoiseScale) -> Cut: ...


@dataclass(frozen=True)
class ThresholdParams:
    """The DG-Hard rule (docs/maths.md): keep s_i > τ = scale · ω(β) · s_med. With `at="mp_edge"` the
    same hard cut sits at scale · λ_MP instead (the mp_edge method)."""

    scale: float = 1.0
    median: MedianRule = "lower"
    needs_noise_scale: bool = True
    at: Literal["dg", "mp_edge"] = "dg"

    def cut(self, s: np.ndarray, noise: NoiseScale) -> Cut:
        tau = self.scale * (noise.mp_edge if self.at == "mp_edge" else noise.omega * noise.s_med)
        return Cut(tau, int(np.count_nonzero(s > tau)))


@dataclass(frozen=True)
class SpectralStats:
    """What the threshold decided for one matrix, for the manifest and reports."""

    rows: int
    cols: int
    rank_total: int | None  # p = min(m, n); None for element-wise methods (no spectrum)
    rank_kept: int | None
    beta: float | None
    omega: float | None
    s_max: float | None
    s_med: float | None
    sigma_hat: float | None
    tau: float | None
    mp_edge: float | None
    noise_energy_fraction: float | None
    rho: float  # ||delta*||_F / ||delta||_F
    frob_delta: float
    # None for the regular case; "zero_delta" (Δ == 0: pass through, no SVD) or
    # "median_zero" (s_med numerically 0 with Δ != 0: τ = 0 keeps everything, Δ* = Δ).
    degenerate: str | None
    backend: str = ""  # the backend whose spectrum decided (after any fallback)
    fallback: str | None = None  # why a guarded float32 backend recomputed in float64
    precision: str = ""  # the precision policy's decision for this matrix and why (manifest column)
    # Per kept component multipliers (a shrinker); None = keep the singular values as they are.
    weights: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def elementwise(cls, rows: int, cols: int, frob_delta: float, rho: float, backend: str) -> SpectralStats:
        """Stats of an element-wise method: no spectrum, only the Frobenius norms (Δ = 0 is degenerate)."""
        return cls(rows=rows, cols=cols, rank_total=None, rank_kept=None, beta=None, omega=None, s_max=None,
                   s_med=None, sigma_hat=None, tau=None, mp_edge=None, noise_energy_fraction=None,
                   rho=rho if frob_delta > 0 else 1.0, frob_delta=frob_delta,
                   degenerate=None if frob_delta > 0 else "zero_delta", backend=backend)

    def with_backend(self, backend: str, fallback: str | None = None) -> SpectralStats:
        return replace(self, backend=backend, fallback=fallback)

    def with_precision(self, precision: str) -> SpectralStats:
        return replace(self, precision=precision)


def lower_or_mean_median(s_desc: np.ndarray, rule: MedianRule) -> float:
    """The lower median (docs/maths.md) is element (p-1)//2 of the ascending values (torch.median)."""
    asc = np.sort(np.asarray(s_desc, dtype=np.float64))
    p = asc.size
    if rule == "lower" or p % 2 == 1:
        return float(asc[(p - 1) // 2])
    if rule == "mean":
        return float(0.5 * (asc[p // 2 - 1] + asc[p // 2]))
    raise ValueError(f"unknown median rule {rule!r}; use 'lower' or 'mean'")


def threshold_spectrum(s_desc: np.ndarray, rows: int, cols: int, params: SpectralRule) -> SpectralStats:
    """Apply a spectral rule (DG-Hard by default) to a descending float64 spectrum of an m x n delta."""
    s = np.asarray(s_desc, dtype=np.float64)
    p, big = min(rows, cols), max(rows, cols)
    if s.shape != (p,):
        raise ValueError(f"expected {p} singular values for a {rows}x{cols} matrix, got shape {s.shape}")
    beta = p / big
    mu = mp_median(beta)
    omega = dg_omega(beta)  # mp_median is cached: no second integration
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
    if params.needs_noise_scale and s_med <= ZERO_RTOL * s_max:
        kept = int(np.count_nonzero(s > ZERO_RTOL * s_max))
        return SpectralStats(**common, rank_kept=kept, s_med=s_med, sigma_hat=sigma_hat, tau=0.0,
                             mp_edge=mp_edge, noise_energy_fraction=noise_energy, rho=1.0,
                             frob_delta=math.sqrt(energy), degenerate="median_zero")
    decision = params.cut(s, NoiseScale(s_med, sigma_hat, mp_edge, omega, big, beta))
    kept_s = s[:decision.rank] if decision.weights is None else s[:decision.rank] * decision.weights
    rho = math.sqrt(float(np.sum(kept_s ** 2)) / energy)
    return SpectralStats(**common, rank_kept=decision.rank, s_med=s_med, sigma_hat=sigma_hat, tau=decision.tau,
                         mp_edge=mp_edge, noise_energy_fraction=noise_energy, rho=rho, frob_delta=math.sqrt(energy),
                         degenerate=None, weights=decision.weights)
