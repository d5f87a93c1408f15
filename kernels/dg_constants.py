"""Gavish–Donoho constants for the unknown-noise hard threshold (docs/maths.md).

`omega(beta)` is computed exactly from the Marchenko–Pastur median, not from the cubic
approximation printed in the paper (which is off by up to 1.1 % as beta -> 0).
"""

from __future__ import annotations

import math
from functools import lru_cache

from scipy import integrate, optimize

MP_MEDIAN_XTOL = 1e-13


def lambda_star(beta: float) -> float:
    """Optimal hard-threshold coefficient for known noise: tau = lambda*(beta) * sqrt(N) * sigma."""
    _check_beta(beta)
    return math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta * beta + 14.0 * beta + 1.0)))


def _mp_density(x: float, beta: float, lo: float, hi: float) -> float:
    if x <= lo or x >= hi:
        return 0.0
    return math.sqrt((hi - x) * (x - lo)) / (2.0 * math.pi * beta * x)


@lru_cache(maxsize=4096)
def mp_median(beta: float) -> float:
    """Median of the Marchenko–Pastur law with ratio beta in (0, 1], to better than 1e-9.

    Quadrature of the density plus Brent root finding on CDF(x) - 1/2; memoised per beta
    (a pure function, so the cache is not shared mutable state in any meaningful sense).
    """
    _check_beta(beta)
    lo = (1.0 - math.sqrt(beta)) ** 2
    hi = (1.0 + math.sqrt(beta)) ** 2

    def cdf_minus_half(x: float) -> float:
        mass, _ = integrate.quad(_mp_density, lo, x, args=(beta, lo, hi), epsabs=1e-14, epsrel=1e-13, limit=200)
        return mass - 0.5

    return float(optimize.brentq(cdf_minus_half, lo, hi, xtol=MP_MEDIAN_XTOL, rtol=1e-15, maxiter=200))


def omega(beta: float) -> float:
    """tau = omega(beta) * median(singular values) for unknown noise."""
    return lambda_star(beta) / math.sqrt(mp_median(beta))


def omega_poly(beta: float) -> float:
    """The paper's cubic approximation (eq. 5); kept only to report how far it is from exact."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def _check_beta(beta: float) -> None:
    if not (0.0 < beta <= 1.0) or math.isnan(beta):
        raise ValueError(f"beta must lie in (0, 1], got {beta!r}")
