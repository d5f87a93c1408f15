"""TIES with a single fine-tune: trim Δ to its top `keep_ratio` entries by magnitude (per matrix), then
scale by λ. Sign election and the disjoint mean are the identity for one task vector (paper §2).

Exactly k = ⌈keep_ratio · numel⌉ entries are kept: equal magnitudes (common in a BF16 delta, whose
values sit on a coarse grid) are ordered by their flat index through a stable sort, so the result is
deterministic and the kept energy is exactly the calibration curve's top-k energy (--target-rho).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import CURVE_POINTS, ElementwiseMethod, interpolate_curve


@dataclass(frozen=True)
class Ties(ElementwiseMethod):
    name: ClassVar[str] = "ties"
    knob: ClassVar[str | None] = "keep_ratio"
    knob_bounds: ClassVar[tuple[float, float]] = (0.0, 1.0)
    checks: ClassVar[dict] = {"keep_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")}

    keep_ratio: float = 0.2  # TIES paper default density (the paper's own value was lost in extraction)
    ties_lambda: float = 1.0

    def apply_one(self, d: torch.Tensor, key: str) -> torch.Tensor:
        k = math.ceil(self.keep_ratio * d.numel())
        if k <= 0:
            return torch.zeros_like(d)
        if k >= d.numel():
            return d * self.ties_lambda
        order = torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices
        keep = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
        keep[order[:k]] = True
        return torch.where(keep.reshape(d.shape), d * self.ties_lambda, torch.zeros_like(d))

    def curve(self, d: torch.Tensor, key: str) -> np.ndarray:
        """Fraction of Σ Δ² in the top ⌈x · numel⌉ entries, at x = j / (CURVE_POINTS − 1)."""
        sq = torch.sort((d.double() ** 2).reshape(-1), descending=True).values
        cum = torch.cumsum(sq, 0)
        total = float(cum[-1])
        if total == 0.0:
            return np.zeros(CURVE_POINTS)
        x = np.linspace(0.0, 1.0, CURVE_POINTS)
        idx = np.ceil(x * d.numel()).astype(np.int64)
        frac = np.zeros(CURVE_POINTS)
        frac[idx > 0] = cum[torch.as_tensor(idx[idx > 0] - 1)].numpy() / total
        return frac

    def kept_energy(self, curve: np.ndarray, energy: float, rows: int, cols: int) -> float:
        return self.ties_lambda ** 2 * interpolate_curve(curve, self.keep_ratio) * energy
