"""Marchenko–Pastur edge cut: keep singular values above scale · (1 + √β) · √N · σ̂ (the bulk edge,
SPEC §1), i.e. everything the noise model cannot explain, with no optimality claim on the cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..threshold import Cut, MedianRule, NoiseScale, SpectralRule
from .base import SpectralMethod


@dataclass(frozen=True)
class MPEdgeRule:
    scale: float = 1.0
    median: MedianRule = "lower"
    needs_noise_scale: bool = True

    def cut(self, s: np.ndarray, noise: NoiseScale) -> Cut:
        tau = self.scale * noise.mp_edge
        return Cut(tau, int(np.count_nonzero(s > tau)))


@dataclass(frozen=True)
class MPEdge(SpectralMethod):
    name: ClassVar[str] = "mp_edge"
    knob: ClassVar[str | None] = "scale"
    knob_bounds: ClassVar[tuple[float, float]] = (1e-4, 1e4)

    scale: float = 1.0
    median: MedianRule = "lower"

    def rule(self) -> SpectralRule:
        return MPEdgeRule(scale=self.scale, median=self.median)
