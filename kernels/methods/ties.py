"""TIES with a single fine-tune: trim Δ to its top `keep_ratio` entries by magnitude (per matrix), then
scale by λ. Sign election and the disjoint mean are the identity for one task vector (paper §2).

Ties at the magnitude cut-off are all kept (|Δ| ≥ the k-th largest magnitude), so the result does
not depend on a sort's tie-breaking.
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

    keep_ratio: float = 0.2  # TIES paper default density (the paper's own value was lost in extraction)
    ties_lambda: float = 1.0

    def apply_one(self, d: torch.Tensor, key: str) -> torch.Tensor:
        k = math.ceil(self.keep_ratio * d.numel())
        if k <= 0:
            return torch.zeros_like(d)
        if k >= d.numel():
            return d * self.ties_lambda
        mag = d.abs()
        cutoff = torch.kthvalue(mag.reshape(-1), d.numel() - k + 1).values
        return torch.where(mag >= cutoff, d * self.ties_lambda, torch.zeros_like(d))

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
