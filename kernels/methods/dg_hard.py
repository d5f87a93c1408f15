"""DG-Hard (the paper's method, docs/maths.md): keep singular values above scale · ω(β) · s_med."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from ..threshold import MedianRule, SpectralRule, ThresholdParams, threshold_spectrum
from .base import MEDIAN, POSITIVE, SpectralMethod


@dataclass(frozen=True)
class DGHard(SpectralMethod):
    name: ClassVar[str] = "dg_hard"
    knob: ClassVar[str | None] = "scale"
    knob_bounds: ClassVar[tuple[float, float]] = (1e-4, 1e4)
    checks: ClassVar[dict] = {"scale": POSITIVE, "median": MEDIAN}

    scale: float = 1.0
    median: MedianRule = "lower"

    def rule(self) -> SpectralRule:
        return ThresholdParams(scale=self.scale, median=self.median)

    def energy_model(self, curves: list[tuple[np.ndarray, float, int, int]]) -> Callable[[float], float]:
        """Hard cut at scale × c_i, with c_i fixed per matrix: precompute ascending spectra and top-k
        energies once, then each knob value costs one searchsorted per matrix."""
        constant = 0.0
        tables = []
        unit = replace(self, scale=1.0).rule()
        for s, _, rows, cols in curves:
            st = threshold_spectrum(s, rows, cols, unit)
            if st.degenerate == "zero_delta":
                continue
            if st.degenerate:  # median_zero keeps everything whatever the scale
                constant += st.frob_delta ** 2
                continue
            top = np.concatenate([[0.0], np.cumsum(np.asarray(s, dtype=np.float64) ** 2)])
            tables.append((np.sort(s), top, st.tau))

        def kept(scale: float) -> float:
            return constant + sum(float(top[asc.size - np.searchsorted(asc, scale * cut, side="right")])
                                  for asc, top, cut in tables)

        return kept
