"""Marchenko–Pastur edge cut: keep singular values above scale · (1 + √β) · √N · σ̂ (the bulk edge,
docs/maths.md), i.e. everything the noise model cannot explain, with no optimality claim on the cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..threshold import SpectralRule, ThresholdParams
from .dg_hard import DGHard


@dataclass(frozen=True)
class MPEdge(DGHard):
    """DG-Hard's parameters and knob; only where the hard cut sits differs."""

    name: ClassVar[str] = "mp_edge"

    def rule(self) -> SpectralRule:
        return ThresholdParams(scale=self.scale, median=self.median, at="mp_edge")
