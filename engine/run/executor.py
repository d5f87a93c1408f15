"""The in-process executor: every phase's units run one after the other in this process."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, TextIO

from ...kernels.threads import cpu_thread_policy
from ..config import RepairConfig
from ..output import shards
from .session import Phase, RunSession


def run_phase(phase: Phase) -> None:
    for unit in phase.units:
        phase.commit(unit, phase.step(phase.jobs(unit), phase.settings))


def run_repair(cfg: RepairConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) a repair in this process; returns the summary written to summary.json."""
    session = RunSession(cfg, stream)
    if session.complete:
        return shards.read_summary(session.inp.out)
    policy = cpu_thread_policy(session.settings.threads) if session.settings.device == "cpu" else nullcontext()
    try:
        with policy:
            if session.calibration is not None:
                run_phase(session.calibration)
                session.resolve_target()
            run_phase(session)
    finally:
        session.close()
    return session.finish({"executor": {"kind": "in-process", "device": session.settings.device}})
