"""Independent reference for SPEC.md §1: float64 numpy SVD, MP median from mpmath (not scipy).

Shares no code with dgrepair.kernels, so agreement is evidence, not tautology.
"""

from __future__ import annotations

import math
from functools import cache

import mpmath
import numpy as np

mpmath.mp.dps = 30


def lambda_star(beta: float) -> float:
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))


@cache
def mp_median(beta: float) -> float:
    b = mpmath.mpf(beta)
    lo, hi = (1 - mpmath.sqrt(b)) ** 2, (1 + mpmath.sqrt(b)) ** 2

    def cdf(x):
        return mpmath.quad(lambda t: mpmath.sqrt((hi - t) * (t - lo)) / (2 * mpmath.pi * b * t), [lo, x])

    return float(mpmath.findroot(lambda x: cdf(x) - mpmath.mpf(1) / 2, (lo + 1e-12, hi - 1e-12), solver="illinois"))


def dg_hard(delta: np.ndarray, scale: float = 1.0, median: str = "lower") -> tuple[np.ndarray, int, float]:
    """Return (Δ*, kept rank, τ) for one matrix, straight from SPEC §1 with a float64 SVD."""
    d = np.asarray(delta, dtype=np.float64)
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    p, n_big = len(s), max(d.shape)
    beta = p / n_big
    omega = lambda_star(beta) / math.sqrt(mp_median(beta))
    asc = np.sort(s)
    s_med = asc[(p - 1) // 2] if (median == "lower" or p % 2) else 0.5 * (asc[p // 2 - 1] + asc[p // 2])
    tau = scale * omega * s_med
    r = int(np.sum(s > tau))
    return (u[:, :r] * s[:r]) @ vt[:r], r, tau


def spiked(m: int, n: int, rank: int, rng: np.random.Generator, sigma: float = 1.0,
           strengths: tuple[float, float] = (3.0, 12.0)) -> np.ndarray:
    """Signal of the given rank with singular values in strengths x sigma*sqrt(max(m,n)), plus white noise."""
    u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    s = np.linspace(strengths[1], strengths[0], rank) * sigma * math.sqrt(max(m, n))
    return (u * s) @ v.T + sigma * rng.standard_normal((m, n))
