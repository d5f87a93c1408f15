"""The in-process executor: every phase's units run in this process, two at a time with overlap
(run/pipeline.py: this thread computes, unit threads read and write beside it), one at a time without."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from ...kernels.threads import cpu_thread_policy
from ..config import RepairConfig
from ..output import shards
from . import interrupt
from .pipeline import SLOTS, Hooks, run_overlapped
from .session import Phase, RunSession


def run_phase(phase: Phase, overlap: bool = False, hooks: Hooks | None = None) -> None:
    """Run a phase's units and commit them in order; `overlap` runs the next unit's reads and the
    previous unit's writes beside the current unit's kernels."""
    run_overlapped(phase.units, lambda unit, phases: phase.step(phase.jobs(unit), phase.settings, phases),
                   phase.commit, slots=SLOTS if overlap else 1, hooks=hooks or Hooks.from_env(),
                   alone=phase.runs_alone)


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
                    run_phase(session.calibration, cfg.execution.overlap)
                finally:
                    session.calibration.close()
                session.resolve_target()
            run_phase(session, cfg.execution.overlap)
        return session.finish({"executor": {"kind": "in-process", "device": session.settings.device,
                                            "overlap": cfg.execution.overlap}})
