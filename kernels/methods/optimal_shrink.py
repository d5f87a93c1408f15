"""Gavish–Donoho (2017) optimal singular-value shrinker for Frobenius loss, unknown noise level.

With σ̂ = s_med / √(N μ_β) (docs/maths.md) and y = s / (√N σ̂), each singular value becomes
η(y) · √N σ̂ with η(y) = √((y² − β − 1)² − 4β) / y for y > 1 + √β and 0 below the bulk edge.
A continuous shrinker has no knob, so --target-rho does not apply to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..threshold import Cut, MedianRule, NoiseScale, SpectralRule
from .base import MEDIAN, SpectralMethod


def frobenius_shrinker(y: np.ndarray, beta: float) -> np.ndarray:
    """η(y) of Gavish & Donoho 2017 (Frobenius loss, square-root normalised singular values)."""
    y = np.asarray(y, dtype=np.float64)
    out = np.zeros_like(y)
    above = y > 1.0 + math.sqrt(beta)
    ya = y[above]
    out[above] = np.sqrt(np.maximum((ya * ya - beta - 1.0) ** 2 - 4.0 * beta, 0.0)) / ya
    return out


@dataclass(frozen=True)
class OptimalShrinkRule:
    median: MedianRule = "lower"
    needs_noise_scale: bool = True

    def cut(self, s: np.ndarray, noise: NoiseScale) -> Cut:
        unit = math.sqrt(noise.big) * noise.sigma_hat
        eta = frobenius_shrinker(s / unit, noise.beta)
        r = int(np.count_nonzero(eta > 0))
        return Cut((1.0 + math.sqrt(noise.beta)) * unit, r, eta[:r] * unit / s[:r])


@dataclass(frozen=True)
class OptimalShrink(SpectralMethod):
    name: ClassVar[str] = "optimal_shrink"
    checks: ClassVar[dict] = {"median": MEDIAN}

    median: MedianRule = "lower"

    def rule(self) -> SpectralRule:
        return OptimalShrinkRule(median=self.median)
