"""--target-rho: the calibration rows (per matrix Σ Δ² and the method's curve) and the knob solver.

The calibration pass runs on the same executors as the repair (in-process or the Ray actors) and
commits `OUT/dgrepair/calibration.parquet/` part files, so an interrupted pass resumes and the
bisection itself never touches Δ again: every knob value is evaluated from the cached curves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ...kernels.methods import Method, SpectralMethod
from ...kernels.spectral import singular_values
from ..errors import InputError
from ..output import parts
from ..output.paths import calibration_dir
from ..plan.kinds import REPAIR_KINDS
from ..plan.layouts import row_identity
from ..plan.model import PlanEntry
from .jobs import EntryJob, StepSettings, companions, matrix_key
from .pipeline import SEQUENTIAL, Phases
from .repair_step import delta_matrices

BISECTION_STEPS = 200


@dataclass
class CalibrationRow:
    """One matrix's calibration: what the knob solver needs, nothing about output bytes."""

    tensor: str
    expert: int | None = field(metadata={"arrow": pa.int32()})
    part: str | None
    rows: int
    cols: int
    energy: float  # Σ Δ² of the matrix
    curve: list[float]  # the spectrum (spectral methods) or the method's own curve
    plan_id: str
    seconds: float


SCHEMA = parts.schema_of(CalibrationRow)


def write_part(out: Path, rows: list[CalibrationRow]) -> Path | None:
    return parts.write_part(calibration_dir(out), rows, SCHEMA)


def read_rows(out: Path, plan_id: str) -> dict[tuple[str, int | None, str | None], CalibrationRow]:
    """Committed rows of this plan, last one per matrix."""
    return parts.latest_by_key([r for r in parts.read_parts(calibration_dir(out), CalibrationRow, SCHEMA)
                                if r.plan_id == plan_id])


def calibrate_unit(jobs: list[EntryJob], settings: StepSettings, phases: Phases = SEQUENTIAL
                   ) -> list[CalibrationRow]:
    """Per matrix: Σ Δ² and the method's calibration curve (the spectrum for a spectral method). Every
    Δ of the unit is read first, then the curves are computed in one compute phase."""
    scales = companions(jobs)
    loaded = []
    for job in jobs:
        if job.entry.kind not in REPAIR_KINDS:  # passthrough, scales, and `dequant` (converted, never repaired)
            continue
        start = time.perf_counter()
        mats, kind = delta_matrices(job, scales.get(job.entry.name))
        loaded.append((job.entry, mats, kind, time.perf_counter() - start))
    return phases.compute(_curves, loaded, settings)


def _curves(loaded: list[tuple[PlanEntry, torch.Tensor, str, float]], settings: StepSettings
            ) -> list[CalibrationRow]:
    method = settings.method
    out: list[CalibrationRow] = []
    for e, mats, kind, read_s in loaded:
        start = time.perf_counter()
        mine = []
        for i in range(mats.shape[0]):
            d = mats[i]
            key = matrix_key(e.name, kind, i)
            if isinstance(method, SpectralMethod):
                curve = singular_values(d.contiguous(), settings.kernel, device=settings.device,
                                        threads=settings.threads)
            else:
                curve = method.curve(d, key)
            expert, part = row_identity(kind, i)
            mine.append(CalibrationRow(tensor=e.name, expert=expert, part=part, rows=int(d.shape[0]),
                                       cols=int(d.shape[1]), energy=float(torch.sum(d.double() ** 2)),
                                       curve=[float(x) for x in curve], plan_id=settings.plan_id, seconds=0.0))
        per = (read_s + time.perf_counter() - start) / len(mine)  # the entry's time, shared by its matrices
        out.extend(replace(r, seconds=per) for r in mine)
    return out


@dataclass(frozen=True)
class Solution:
    knob: str
    value: float
    predicted_rho: float
    reachable: tuple[float, float]

    def to_dict(self) -> dict[str, object]:
        return {"knob": self.knob, "value": self.value, "predicted_rho": self.predicted_rho,
                "reachable": list(self.reachable)}


def global_rho(method: Method, rows: list[CalibrationRow]) -> float:
    """sqrt(Σ kept energy / Σ energy) over every matrix, from the calibration curves alone."""
    total = math.fsum(r.energy for r in rows)  # exactly rounded: independent of the rows' order
    if total <= 0:
        return 1.0
    kept = math.fsum(method.kept_energy(np.asarray(r.curve), r.energy, r.rows, r.cols)
                     for r in rows if r.energy > 0)
    return math.sqrt(kept / total)


def rho_function(method: Method, rows: list[CalibrationRow]) -> Callable[[float], float]:
    """knob value -> global ρ; the method's precomputed energy model when it has one."""
    total = sum(r.energy for r in rows)
    curves = [(np.asarray(r.curve), r.energy, r.rows, r.cols) for r in rows if r.energy > 0]
    model = method.energy_model(curves)
    if total <= 0:
        return lambda v: 1.0
    if model is None:
        return lambda v: global_rho(method.with_knob(v), rows)
    return lambda v: math.sqrt(model(v) / total)


def solve_knob(method: Method, rows: list[CalibrationRow], target: float) -> Solution:
    """Bisect the method's knob so that the global ρ is as close to `target` as the knob allows.

    ρ is monotone in every knob; a spectral cut makes it a step function, so the answer is the
    value whose ρ is nearest the target (the caller reports the ρ actually achieved)."""
    if method.knob is None:
        raise InputError(f"--target-rho: method {method.name} has no knob to bisect.")
    lo, hi = method.knob_bounds
    at = {}

    evaluate = rho_function(method, rows)

    def rho(v: float) -> float:
        if v not in at:
            at[v] = evaluate(v)
        return at[v]

    r_lo, r_hi = rho(lo), rho(hi)
    low, high = min(r_lo, r_hi), max(r_lo, r_hi)
    if not (low - 1e-12 <= target <= high + 1e-12):
        raise InputError(f"--target-rho {target}: method {method.name} reaches rho in [{low:.4f}, {high:.4f}] by "
                         f"varying {method.knob} over [{lo:g}, {hi:g}]; choose a target in that range.")
    increasing = r_hi >= r_lo
    log = not method.knob_integer and lo > 0 and hi / lo > 100
    a, b = lo, hi  # invariant: rho(a) on one side of the target, rho(b) on the other
    for _ in range(BISECTION_STEPS):
        if method.knob_integer and b - a <= 1:
            break
        mid = math.sqrt(a * b) if log else (a + b) / 2
        if method.knob_integer:
            mid = float(int((a + b) // 2))
        if (rho(mid) < target) == increasing:
            a = mid
        else:
            b = mid
        if abs(rho(mid) - target) < 1e-9 or (not method.knob_integer and b - a <= 1e-12 * max(abs(b), 1e-300)):
            break
    best = min((a, b), key=lambda v: abs(rho(v) - target))
    value = float(int(best)) if method.knob_integer else best
    return Solution(method.knob, value, rho(value), (low, high))
