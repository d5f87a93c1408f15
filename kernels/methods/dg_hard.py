"""DG-Hard (the paper's method, SPEC §1): keep singular values above scale · ω(β) · s_med."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..threshold import MedianRule, SpectralRule, ThresholdParams
from .base import SpectralMethod


@dataclass(frozen=True)
class DGHard(SpectralMethod):
    name: ClassVar[str] = "dg_hard"
    knob: ClassVar[str | None] = "scale"
    knob_bounds: ClassVar[tuple[float, float]] = (1e-4, 1e4)

    scale: float = 1.0
    median: MedianRule = "lower"

    def rule(self) -> SpectralRule:
        return ThresholdParams(scale=self.scale, median=self.median)
