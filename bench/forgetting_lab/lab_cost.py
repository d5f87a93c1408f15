"""The lab's machine time, summed from what its workdir (or the ledger, which has the same layout) recorded.

Issue 17 asks for the full run's wall time on this machine. The run spans sessions and machines, so no
single clock saw it; what every part did record is its own duration: each optimiser step's seconds in
`ft/*/curve.csv`, each benchmark evaluation's seconds in the evaluation caches, and each repair's seconds
in its `.lab.json` record. Summing those gives the machine time the results cost, once each (a checkpoint
retrained on a new machine keeps the first curve, lab_finetune.py). Steps that took more than
`PAUSE_FACTOR` times their trajectory's median were processes stopped by hand beside a benchmark
(SIGSTOP), not work: they are counted apart, so the total is the work and the pauses are shown.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

PAUSE_FACTOR = 10.0


@dataclass(frozen=True)
class MachineTime:
    """Seconds of one process on one core (every lab step ran with one torch thread)."""

    train_s: float
    train_steps: int
    trajectories: int
    paused_s: float  # steps over PAUSE_FACTOR x their trajectory's median, left out of train_s
    paused_steps: int
    eval_s: float
    evals: int  # benchmark evaluations (one model on one benchmark)
    repair_s: float
    repairs: int

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_s + self.repair_s

    def to_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


def _training(work: Path) -> tuple[float, int, int, float, int]:
    train = paused = 0.0
    steps = paused_steps = trajectories = 0
    for curve in sorted(work.glob("ft/*/curve.csv")):
        with curve.open(newline="") as f:
            secs = [float(row["seconds"]) for row in csv.DictReader(f)]
        if not secs:
            continue
        trajectories += 1
        cut = PAUSE_FACTOR * statistics.median(secs)
        for s in secs:
            if s > cut:
                paused, paused_steps = paused + s, paused_steps + 1
            else:
                train, steps = train + s, steps + 1
    return train, steps, trajectories, paused, paused_steps


def _evaluations(work: Path) -> tuple[float, int]:
    total, n = 0.0, 0
    for path in [work / "base_eval.json", *sorted(work.glob("cells/*/evals/*.json"))]:
        if not path.is_file():
            continue
        for entry in json.loads(path.read_text()).values():
            if isinstance(entry, dict) and "seconds" in entry:
                total, n = total + float(entry["seconds"]), n + 1
    return total, n


def _repairs(work: Path) -> tuple[float, int]:
    total, n = 0.0, 0
    for path in sorted(work.glob("cells/*/repairs/*.lab.json")):
        secs = json.loads(path.read_text()).get("repair_seconds")
        if secs is not None:
            total, n = total + float(secs), n + 1
    return total, n


def machine_time(work: Path) -> MachineTime:
    """Sum the recorded durations under `work` (a workdir or a ledger)."""
    work = Path(work)
    train, steps, trajectories, paused, paused_steps = _training(work)
    return MachineTime(train, steps, trajectories, paused, paused_steps, *_evaluations(work), *_repairs(work))
