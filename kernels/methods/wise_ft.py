"""WiSE-FT / task arithmetic with one fine-tune: Δ* = α Δ, i.e. W* = (1 − α) W0 + α W1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import ElementwiseMethod


@dataclass(frozen=True)
class WiseFT(ElementwiseMethod):
    name: ClassVar[str] = "wise_ft"
    knob: ClassVar[str | None] = "alpha"
    knob_bounds: ClassVar[tuple[float, float]] = (0.0, 1.0)
    has_curve: ClassVar[bool] = False

    alpha: float = 0.5  # the paper's App. H.1 / I.3 canonical mixing weight

    def apply_one(self, d: torch.Tensor, key: str) -> torch.Tensor:
        return d * self.alpha

    def kept_energy(self, curve: np.ndarray, energy: float, rows: int, cols: int) -> float:
        return self.alpha ** 2 * energy  # closed form: ρ = α for every matrix, no calibration data needed
