"""Running one work unit and what it returns, the same for a Ray actor and for the driver's head start
(run/head_start.py): the phase's rows and the per-node accounting the summary reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .jobs import EntryJob, StepSettings
from .pipeline import ComputeGate, Phases

Step = Callable[[list[EntryJob], StepSettings, Phases], list[Any]]


@dataclass(frozen=True)
class UnitResult:
    """One unit's execution: the phase's rows (manifest rows, or calibration rows) and its accounting."""

    unit: int
    rows: list[Any]
    node: str
    seconds: float  # excluding the wait for the kernels' turn
    bytes_read: int
    bytes_written: int


def run_unit(step: Step, unit_id: int, jobs: list[EntryJob], settings: StepSettings, gate: ComputeGate,
             node: str, writes_output: bool) -> UnitResult:
    """Execute one unit's jobs through `gate` (one unit in the kernels at a time) and account for it."""
    start = time.perf_counter()
    with gate.unit(unit_id) as phases:
        rows = step(jobs, settings, phases)
    return UnitResult(unit_id, rows, node, time.perf_counter() - start - phases.waited,
                      bytes_read=sum(j.entry.ft.nbytes + (j.entry.base.nbytes if j.entry.base else 0) for j in jobs),
                      bytes_written=sum(j.entry.out_nbytes for j in jobs) if writes_output else 0)
