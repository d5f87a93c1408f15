"""What every repair method provides, so the engine, the calibration pass and --target-rho can treat
all methods alike (docs/adr/0007-methods-and-target-rho.md).

A method is a frozen dataclass of its parameters. It is either *spectral* (it supplies a rule on
the singular values, run by kernels.spectral's backends) or *element-wise* (it maps Δ entry by
entry). For --target-rho it names one knob (a field) and supplies a per-matrix calibration
curve from which the kept energy at any knob value is computed without touching Δ again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from ..threshold import SpectralRule, SpectralStats, threshold_spectrum

CURVE_POINTS = 2048  # grid of an element-wise knob in [0, 1] at which calibration energies are stored


POSITIVE = (lambda v: v > 0, "> 0")
MEDIAN = (lambda v: v in ("lower", "mean"), "'lower' or 'mean'")


@dataclass(frozen=True)
class Method:
    """Base of every method; subclasses are frozen dataclasses whose fields are the method's knobs."""

    name: ClassVar[str]
    spectral: ClassVar[bool]
    knob: ClassVar[str | None] = None  # the field --target-rho bisects; None: no knob to bisect
    knob_bounds: ClassVar[tuple[float, float]] = (0.0, 1.0)
    knob_integer: ClassVar[bool] = False
    # field -> (predicate, what it must be): the one validation of each parameter, run on construction.
    checks: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    def __post_init__(self) -> None:
        for name, (ok, what) in self.checks.items():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"{name} must be {what}, got {value!r}")

    def with_knob(self, value: float) -> Method:
        if self.knob is None:
            raise ValueError(f"method {self.name} has no knob to set")
        return replace(self, **{self.knob: int(round(value)) if self.knob_integer else float(value)})

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def check_target(self) -> None:
        """Raise ValueError when --target-rho cannot apply to this method as configured."""
        if self.knob is None:
            raise ValueError(f"method {self.name} has no knob to bisect; --target-rho does not apply to it")

    def kept_energy(self, curve: np.ndarray, energy: float, rows: int, cols: int) -> float:
        """Σ Δ*² of one matrix under this method's current knob, from its calibration curve."""
        raise NotImplementedError

    def energy_model(self, curves: list[tuple[np.ndarray, float, int, int]]) -> Callable[[float], float] | None:
        """Optionally, a fast knob -> Σ kept energy over all matrices (precomputed once); None = use
        `kept_energy` matrix by matrix."""
        return None


@dataclass(frozen=True)
class SpectralMethod(Method):
    """A rule on the singular values; the calibration curve is the spectrum itself."""

    spectral: ClassVar[bool] = True

    def rule(self) -> SpectralRule:
        raise NotImplementedError

    def kept_energy(self, curve: np.ndarray, energy: float, rows: int, cols: int) -> float:
        st = threshold_spectrum(curve, rows, cols, self.rule())
        return st.rho ** 2 * st.frob_delta ** 2


@dataclass(frozen=True)
class ElementwiseMethod(Method):
    """Maps Δ entry by entry; `keys` name each matrix (seeds for random methods)."""

    spectral: ClassVar[bool] = False
    has_curve: ClassVar[bool] = True  # False: the kept energy has a closed form in Σ Δ² alone

    def apply_one(self, d: torch.Tensor, key: str) -> torch.Tensor:
        """Δ* of one float32 matrix (a new tensor)."""
        raise NotImplementedError

    def curve(self, d: torch.Tensor, key: str) -> np.ndarray:
        """Calibration curve of one matrix (float64); empty when the kept energy has a closed form."""
        return np.zeros(0)

    def energy_model(self, curves: list[tuple[np.ndarray, float, int, int]]) -> Callable[[float], float]:
        """Element-wise kept energies are linear in curve × energy on a shared grid, so the whole model
        collapses to one energy-weighted curve (or to Σ energy for a closed form with no curve)."""
        total = sum(e for _, e, _, _ in curves)
        if not self.has_curve or not curves:
            return lambda v: self.with_knob(v).kept_energy(np.zeros(0), total, 0, 0)
        combined = np.sum([c * e for c, e, _, _ in curves], axis=0)
        return lambda v: self.with_knob(v).kept_energy(combined, 1.0, 0, 0)

    def apply(self, delta: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, list[SpectralStats]]:
        out = torch.empty_like(delta)
        stats = []
        for i, key in enumerate(keys):
            d = delta[i]
            energy = float(torch.sum(d.double() ** 2))
            if energy == 0.0:
                out[i] = d
                stats.append(SpectralStats.elementwise(d.shape[0], d.shape[1], 0.0, 1.0, self.name))
                continue
            out[i] = self.apply_one(d, key)
            kept = float(torch.sum(out[i].double() ** 2))
            stats.append(SpectralStats.elementwise(d.shape[0], d.shape[1], energy ** 0.5, (kept / energy) ** 0.5,
                                                   self.name))
        return out, stats


def interpolate_curve(curve: np.ndarray, x: float) -> float:
    """Linear interpolation of a curve sampled at x = j / (len - 1), j = 0..len-1."""
    grid = np.linspace(0.0, 1.0, curve.size)
    return float(np.interp(min(max(x, 0.0), 1.0), grid, curve))


def matrix_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded from (seed, matrix key): reruns, resumes and batching draw the same numbers."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
