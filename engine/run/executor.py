"""The in-process executor: every phase's units run one after the other in this process."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from ...kernels.threads import cpu_thread_policy
from ..config import RepairConfig
from ..output import shards
from . import interrupt
from .session import Phase, RunSession


def run_phase(phase: Phase) -> None:
    for unit in phase.units:
        phase.commit(unit, phase.step(phase.jobs(unit), phase.settings))


def run_repair(cfg: RepairConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) a repair in this process; returns the summary written to summary.json.
    SIGTERM/SIGINT raise `Interrupted` after the finished work is committed and the lock released."""
    with interrupt.signals_as_exceptions(), shards.os_errors(Path(cfg.output.out or ".")), \
            RunSession(cfg, stream) as session:
        if session.complete:
            return {**session.target.read_summary(), "already_complete": True}
        policy = cpu_thread_policy(session.settings.threads) if session.settings.device == "cpu" else nullcontext()
        with policy:
            if session.calibration is not None:
                try:
                    run_phase(session.calibration)
                finally:
                    session.calibration.close()
                session.resolve_target()
            run_phase(session)
        return session.finish({"executor": {"kind": "in-process", "device": session.settings.device}})
