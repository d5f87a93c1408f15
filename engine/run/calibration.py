"""--target-rho: the calibration rows (per matrix Σ Δ² and the method's curve) and the knob solver.

The calibration pass runs on the same executors as the repair (in-process or the Ray actors) and
commits `OUT/dgrepair/calibration.parquet/` part files, so an interrupted pass resumes and the
bisection itself never touches Δ again: every knob value is evaluated from the cached curves.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...kernels.methods import Method
from ..errors import InputError

CALIBRATION_DIR = "calibration.parquet"
BISECTION_STEPS = 200

SCHEMA = pa.schema([
    ("tensor", pa.string()), ("expert", pa.int32()), ("part", pa.string()), ("rows", pa.int64()),
    ("cols", pa.int64()), ("energy", pa.float64()), ("curve", pa.list_(pa.float64())), ("plan_id", pa.string()),
    ("seconds", pa.float64()),
])


@dataclass
class CalibrationRow:
    tensor: str
    expert: int | None
    part: str | None
    rows: int
    cols: int
    energy: float  # Σ Δ² of the matrix
    curve: list[float]  # the spectrum (spectral methods) or the method's own curve
    plan_id: str
    seconds: float


def calibration_dir(meta: Path) -> Path:
    return meta / CALIBRATION_DIR


def write_part(meta: Path, rows: list[CalibrationRow]) -> None:
    if not rows:
        return
    where = calibration_dir(meta)
    where.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=SCHEMA)
    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = where / f".{name}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, where / name)


def read_rows(meta: Path, plan_id: str) -> dict[tuple[str, int | None, str | None], CalibrationRow]:
    """Committed rows of this plan, last one per matrix."""
    where = calibration_dir(meta)
    found: dict[tuple[str, int | None, str | None], CalibrationRow] = {}
    if not where.is_dir():
        return found
    for part in sorted(where.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime_ns):
        for rec in pq.read_table(part, schema=SCHEMA).to_pylist():
            row = CalibrationRow(**rec)
            if row.plan_id == plan_id:
                found[(row.tensor, row.expert, row.part)] = row
    return found


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
    total = sum(r.energy for r in rows)
    if total <= 0:
        return 1.0
    kept = sum(method.kept_energy(np.asarray(r.curve), r.energy, r.rows, r.cols) for r in rows if r.energy > 0)
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
    assert method.knob is not None
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
