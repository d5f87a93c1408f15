"""Fixed rank: keep the top `rank` singular components of every matrix (a truncated-SVD baseline,
LoRA-like capacity without training). Numerically zero components are never kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..threshold import ZERO_RTOL, Cut, NoiseScale, SpectralRule
from .base import SpectralMethod


@dataclass(frozen=True)
class FixedRankRule:
    rank: int
    median: str = "lower"
    needs_noise_scale: bool = False  # no noise estimate involved: s_med = 0 is not degenerate here

    def cut(self, s: np.ndarray, noise: NoiseScale) -> Cut:
        nonzero = int(np.count_nonzero(s > ZERO_RTOL * s[0])) if s.size else 0
        r = min(self.rank, nonzero)
        return Cut(float(s[r]) if r < s.size else 0.0, r)  # τ reported as the first value dropped


@dataclass(frozen=True)
class FixedRank(SpectralMethod):
    name: ClassVar[str] = "fixed_rank"
    knob: ClassVar[str | None] = "rank"
    knob_bounds: ClassVar[tuple[float, float]] = (0, 1 << 20)
    knob_integer: ClassVar[bool] = True
    checks: ClassVar[dict] = {"rank": (lambda v: v >= 0, ">= 0")}

    rank: int = 16

    def rule(self) -> SpectralRule:
        return FixedRankRule(rank=self.rank)
