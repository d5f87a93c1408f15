"""DARE: drop each entry of Δ with probability p, rescale survivors by 1/(1 − p) (DARE) or not
(DARE-Linear, `dare_rescale = False`, the paper's App. I.3 Part B form).

The random stream is seeded per matrix from (seed, tensor, expert, part), drawn on the CPU, so a
rerun, a resume, a different batch or a different device gives the same mask. An entry is dropped
when its uniform draw u < p, so the masks for different p are nested (what calibration relies on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import CURVE_POINTS, ElementwiseMethod, interpolate_curve, matrix_generator


@dataclass(frozen=True)
class Dare(ElementwiseMethod):
    name: ClassVar[str] = "dare"
    knob: ClassVar[str | None] = "drop_prob"
    knob_bounds: ClassVar[tuple[float, float]] = (0.0, 1.0)

    # 0.25: the paper's App. I.3 reports ρ = 1.155 for canonical DARE, and 1/√(1 − p) = 1.155 gives p = 0.25.
    drop_prob: float = 0.25
    dare_rescale: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= self.drop_prob <= 1.0) or (self.dare_rescale and self.drop_prob == 1.0):
            raise ValueError(f"drop_prob must be in [0, 1] (below 1 with rescaling), got {self.drop_prob}")

    def uniforms(self, d: torch.Tensor, key: str) -> torch.Tensor:
        return torch.rand(tuple(d.shape), generator=matrix_generator(self.seed, key), dtype=torch.float32)

    def apply_one(self, d: torch.Tensor, key: str) -> torch.Tensor:
        keep = (self.uniforms(d, key) >= self.drop_prob).to(d.device)
        gain = 1.0 / (1.0 - self.drop_prob) if self.dare_rescale else 1.0
        return torch.where(keep, d * gain, torch.zeros_like(d))

    def curve(self, d: torch.Tensor, key: str) -> np.ndarray:
        """Fraction of Σ Δ² kept (before rescaling) at p = j / (CURVE_POINTS − 1): exact at the grid."""
        bins = (self.uniforms(d, key).double() * (CURVE_POINTS - 1)).floor().long().reshape(-1)
        energy = torch.bincount(bins, weights=(d.double() ** 2).reshape(-1).cpu(), minlength=CURVE_POINTS)
        kept = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # Σ over bins ≥ j
        return (kept / kept[0]).numpy() if float(kept[0]) > 0 else np.zeros(CURVE_POINTS)

    def check_target(self) -> None:
        if self.dare_rescale:
            raise ValueError("--target-rho with DARE needs --no-dare-rescale (DARE-Linear): rescaled DARE keeps "
                             "an expected rho of 1/sqrt(1-p) >= 1 (paper App. I.3)")

    def kept_energy(self, curve: np.ndarray, energy: float, rows: int, cols: int) -> float:
        gain = 1.0 / (1.0 - self.drop_prob) ** 2 if self.dare_rescale else 1.0
        return gain * interpolate_curve(curve, self.drop_prob) * energy
