"""The local executor: every phase's units run in this process, without Ray (`--executor local`, and
what `--executor auto` picks for a run on one machine's CPU: `choose_executor`).

On the CPU, by default, in lanes (run/lanes.py): one thread per worker (`--workers`, default one per
core), each taking units largest-first from one list with the cores split between them (`--threads`),
the way the Ray driver sends units to its actors (for a bucket output, in plan order, shard by shard);
the main thread commits what finishes. The kernels release the GIL (kernels/lapack_nogil.py), so the
lanes use every core, and no Ray start-up, actor imports or shutdown come before and after the work
(ADR 0018). With `--overlap`, and on a GPU, one worker instead runs two units at a time, one in the
kernels (run/pipeline.py: this thread computes, unit threads read and write beside it), or one at a
time without overlap.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, TextIO

from ...kernels.spectral import resolve_device
from ...kernels.threads import available_cores, cpu_thread_policy
from ..config import RepairConfig
from ..output import shards
from ..plan.units import largest_first
from . import interrupt
from .jobs import cpu_pool
from .lanes import Lanes
from .pipeline import SLOTS, Hooks, run_overlapped
from .session import Phase, RunSession

WAKE_S = 1.0  # how often the committing thread wakes without news (progress ticks)


def choose_executor(cfg: RepairConfig) -> Literal["ray", "local"]:
    """`--executor auto` (ADR 0019): this executor for a run on this machine's CPU alone, where it is
    the faster; Ray where it adds something: a cluster to join, GPUs (one actor per device), or
    `--overlap` (two units in flight per worker, on every worker)."""
    if cfg.execution.executor != "auto":
        return cfg.execution.executor
    device = cfg.execution.device
    on_cpu = device == "cpu" or (device == "auto" and resolve_device("auto") == "cpu")
    alone = on_cpu and not cfg.execution.overlap and cfg.cluster.cluster_to_join() is None
    return "local" if alone else "ray"


def uses_lanes(cfg: RepairConfig, device: str) -> bool:
    """Lanes on the CPU without overlap; one worker (with or without overlap) otherwise."""
    return device == "cpu" and not cfg.execution.overlap


def run_phase(phase: Phase, cfg: RepairConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run a phase's units and commit them; returns how (for the summary's executor record)."""
    hooks = hooks or Hooks.from_env()
    if uses_lanes(cfg, phase.settings.device):
        count, settings = cpu_pool(phase.settings, workers=cfg.cluster.workers, threads=cfg.execution.threads,
                                   cpus=available_cores())
        run_lanes(phase, Lanes(phase, settings, lane_order(phase), count=count, hooks=hooks))
        return {"lanes": count, "threads_per_lane": settings.threads}
    policy = cpu_thread_policy(phase.settings.threads) if phase.settings.device == "cpu" else nullcontext()
    with policy:
        run_overlapped(phase.units, lambda unit, phases: phase.step(phase.jobs(unit), phase.settings, phases),
                       phase.commit, slots=SLOTS if cfg.execution.overlap else 1, hooks=hooks,
                       alone=phase.runs_alone)
    return {"lanes": 1, "threads_per_lane": phase.settings.threads}


def lane_order(phase: Phase) -> list[int]:
    """Largest first, so the small units fill the end; but for an output assembled shard by shard
    (a bucket), plan order: each shard completes and is uploaded early, so the scratch folder holds
    a few shards at a time instead of every shard partly written."""
    if isinstance(phase, RunSession) and phase.target.per_shard_units:
        return list(range(len(phase.units)))
    return largest_first(phase.units)


def run_lanes(phase: Phase, lanes: Lanes) -> None:
    """Commit the lanes' units as they finish. After a unit's error no unit starts; what finished is
    committed, then the error is raised. On a signal no unit starts writing any more, those writing
    are waited for, and what finished is committed before `Interrupted` goes on; on any other error
    raised here (a lost lock, a full disk) nothing more is committed."""
    failure: BaseException | None = None

    def commit_finished() -> None:
        nonlocal failure
        for unit_id, outcome in lanes.collect():
            if isinstance(outcome, BaseException):
                failure = failure or outcome  # the lanes took no unit after it; the running ones finish
            else:
                phase.commit(phase.units[unit_id], outcome.rows)

    try:
        while lanes.busy:
            lanes.wait(WAKE_S)
            commit_finished()
            phase.bar.tick()
    except interrupt.Interrupted:
        lanes.close()
        commit_finished()
        raise
    finally:
        lanes.close()
    if failure is not None:
        raise failure


def run_repair(cfg: RepairConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) a repair in this process; returns the summary written to summary.json.
    SIGTERM/SIGINT raise `Interrupted` after the finished work is committed and the lock released."""
    with interrupt.signals_as_exceptions(), shards.os_errors(Path(cfg.output.out or ".")), \
            RunSession(cfg, stream) as session:
        if session.complete:
            return {**session.target.read_summary(), "already_complete": True}
        if session.calibration is not None:
            try:
                run_phase(session.calibration, cfg)
            finally:
                session.calibration.close()
            session.resolve_target()
        how = run_phase(session, cfg)
        return session.finish({"executor": {"kind": "in-process", "device": session.settings.device,
                                            "overlap": cfg.execution.overlap, **how}})
