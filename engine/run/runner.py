"""The in-process repair run: plan, prepare the output, repair unit by unit, commit, finalise.

Memory is bounded by one work unit at a time (a few float32 copies of its matrices). Rows are
committed to the manifest in batches; before a batch is committed the shards it touched are
fsynced, so a committed row always describes bytes on disk. Re-running the same command resumes:
entries whose manifest rows verify against the bytes on disk are skipped.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from ... import __version__
from ...kernels.spectral import resolve_device
from ...kernels.threads import cpu_thread_policy
from ..config import RepairConfig
from ..errors import InputError, RepairFailure
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..output import adapter, manifest
from ..output import shards as output
from ..output.manifest import ManifestRow
from ..plan.build import REPAIR_KINDS, SCALE_KINDS, Plan, PlanEntry, build_plan
from ..plan.layouts import row_identity
from ..plan.units import WorkUnit, make_units
from . import calibration
from .repair_step import QUANTIZED_KINDS, EntryJob, StepSettings, execute_unit, sha256_range

FLUSH_ROWS = 256
FLUSH_SECONDS = 10.0


@dataclass
class Inputs:
    """Both checkpoints opened and validated, the output path checked, and the plan built."""

    cfg: RepairConfig
    base: Checkpoint
    ft: Checkpoint
    out: Path
    plan: Plan


def load_inputs(cfg: RepairConfig, need_out: bool = True) -> Inputs:
    cfg.require_paths("base", "ft", *(("out",) if need_out else ()))
    base = open_checkpoint(cfg.base, "base")
    ft = open_checkpoint(cfg.ft, "fine-tune")
    out = output.check_out_path(Path(cfg.out), [base.root, ft.root]) if need_out else Path()
    return Inputs(cfg, base, ft, out, build_plan(base, ft, cfg))


def expected_keys(entry: PlanEntry) -> list[tuple[str, int | None, str | None]]:
    if entry.batch_kind in ("experts", "experts_fused"):
        return [(entry.name, *row_identity(entry.batch_kind, i)) for i in range(entry.n_matrices)]
    return [(entry.name, None, None)]


def entry_job(inp: Inputs, e: PlanEntry) -> EntryJob:
    """The files an entry reads and the partial shard it writes."""
    return EntryJob(e, inp.base.entry(e.base_name)[0] if e.base is not None and e.base_name else None,
                    inp.ft.entry(e.name)[0], output.partial_path(inp.out, e.shard),
                    inp.base.entry(e.base_companion)[0] if e.base_companion else None)


def verified_done(inp: Inputs) -> set[str]:
    """Names of entries whose committed rows match the bytes on disk (resume)."""
    latest = manifest.latest_by_key(manifest.read_rows(inp.out))
    parts = adapter_parts(inp)
    done = set()
    for entry in inp.plan.entries:
        rows = [latest.get(k) for k in expected_keys(entry)]
        if any(r is None or r.plan_id != inp.plan.plan_id for r in rows):
            continue
        if parts and adapter.exportable(entry) is None and not adapter.has_part(parts, entry.name):
            continue  # --emit-adapter: its factors were never written
        where = output.shard_location(inp.out, entry.shard)
        ranges = {(r.byte_begin, r.byte_end): r.sha256 for r in rows if r is not None}  # fused halves share one
        if all(sha256_range(where, lo, hi) == digest for (lo, hi), digest in ranges.items() if hi > lo):
            done.add(entry.name)
    # A quantized weight and its scales are written together, so they are done (or redone) together.
    for entry in inp.plan.entries:
        if entry.companion is not None and entry.kind in QUANTIZED_KINDS + SCALE_KINDS \
                and not {entry.name, entry.companion} <= done:
            done.discard(entry.name)
            done.discard(entry.companion)
    return done


def adapter_parts(inp: Inputs) -> Path | None:
    return output.meta_dir(inp.out) / adapter.PARTS_DIR if inp.cfg.emit_adapter else None


@dataclass
class Committer:
    """Buffers manifest rows; fsyncs touched shards before each part file is written."""

    out: Path
    interval_s: float = FLUSH_SECONDS
    rows: list[ManifestRow] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    last: float = field(default_factory=time.monotonic)

    def add(self, rows: list[ManifestRow]) -> None:
        self.rows.extend(rows)
        self.touched.update(r.shard for r in rows if r.byte_end > r.byte_begin)
        if len(self.rows) >= FLUSH_ROWS or time.monotonic() - self.last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        for shard in self.touched:
            where = output.shard_location(self.out, shard)
            fd = os.open(where, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        manifest.write_part(self.out, self.rows)
        self.rows, self.touched, self.last = [], set(), time.monotonic()


class RunSession:
    """What every executor shares: the plan, the output folder, the commit protocol, the summary.

    The in-process loop below and the Ray driver (dgrepair.cluster) differ only in who executes
    `jobs(unit)`; committing rows, finalising shards, progress and the summary happen here.
    """

    def __init__(self, cfg: RepairConfig, stream: TextIO | None = None) -> None:
        self.t0 = time.perf_counter()
        self.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.cfg = cfg
        self.inp = load_inputs(cfg)
        self.inp.plan.check_runnable()
        state = output.prepare(self.inp.out, self.inp.plan, self.inp.ft, cfg.force)
        self.complete = state == "complete"
        self.done = verified_done(self.inp) if state == "resume" else set()
        try:
            device = resolve_device(cfg.device)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        parts = adapter_parts(self.inp)
        self.settings = StepSettings(cfg.repair_method(), cfg.kernel, self.inp.plan.plan_id, device=device,
                                     threads=cfg.threads or None, adapter_parts=str(parts) if parts else None)
        self.solution: calibration.Solution | None = None
        self.calibration = CalibrationPhase(self, stream) if cfg.target_rho is not None else None
        todo = [e for e in self.inp.plan.entries if e.name not in self.done]
        self.remaining = Counter(e.shard for e in todo)
        if not self.complete:
            for shard in {e.shard for e in self.inp.plan.entries} & set(self.inp.plan.out_shards):
                if self.remaining[shard] == 0 and not (self.inp.out / shard).is_file():
                    output.finalize_shard(self.inp.out, shard)  # all committed before an interruption
                elif self.remaining[shard] > 0 and (self.inp.out / shard).is_file():
                    output.reopen_shard(self.inp.out, shard)  # a finalised shard that no longer verifies
        self.units = make_units(todo, cfg.batch_mb << 20)
        self.committer = Committer(self.inp.out, interval_s=cfg.commit_interval_s)
        self.finished = len(self.done)
        self.bar = tqdm(total=sum(u.nbytes for u in self.units), unit="B", unit_scale=True, unit_divisor=1024,
                        desc="repair", disable=not cfg.progress or self.complete, file=stream or sys.stderr,
                        dynamic_ncols=True)
        self.t_plan = time.perf_counter() - self.t0

    def resolve_target(self) -> None:
        """After the calibration pass: fix the method's knob so the global ρ meets --target-rho."""
        if self.calibration is None:
            return
        method = self.settings.method
        rows = self.calibration.rows()
        self.solution = calibration.solve_knob(method, rows, float(self.cfg.target_rho))
        self.settings = replace(self.settings, method=method.with_knob(self.solution.value))

    def jobs(self, unit: WorkUnit) -> list[EntryJob]:
        return [entry_job(self.inp, e) for e in unit.entries]

    def commit(self, unit: WorkUnit, rows: list[ManifestRow], note: str = "") -> None:
        """Record a finished unit; finalise every shard whose last tensor this was."""
        self.committer.add(rows)
        for e in unit.entries:
            self.remaining[e.shard] -= 1
            if self.remaining[e.shard] == 0 and e.shard in self.inp.plan.out_shards:
                self.committer.flush()
                output.finalize_shard(self.inp.out, e.shard)
        self.finished += len(unit.entries)
        self.bar.update(unit.nbytes)
        self.bar.set_postfix_str(f"tensors {self.finished}/{len(self.inp.plan.entries)}{note}", refresh=False)

    def close(self) -> None:
        self.committer.flush()
        self.bar.close()

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write sidecars, the index and summary.json (in that order); call only when all is done."""
        self.close()
        summary = build_summary(self.inp, self.started, resumed=len(self.done),
                                timings={"plan_s": self.t_plan, "total_s": time.perf_counter() - self.t0})
        summary["method"] = {"name": self.settings.method.name, "params": self.settings.method.params()}
        if self.solution is not None:
            summary["target_rho"] = {"target": self.cfg.target_rho, **self.solution.to_dict(),
                                     "achieved_rho": summary["totals"]["global_rho"]}
        if self.cfg.emit_adapter:
            summary["adapter"] = adapter.finalize(adapter_parts(self.inp), self.inp.plan,
                                                  Path(self.cfg.emit_adapter).expanduser().resolve(),
                                                  self.inp.base, self.inp.ft)
        summary.update(extra or {})
        output.finalize_run(self.inp.out, self.inp.ft, summary, self.inp.plan)
        return summary


class CalibrationPhase:
    """The --target-rho calibration pass, shaped like a RunSession (units, jobs, commit, settings,
    close) so the in-process loop and the Ray driver execute it unchanged."""

    def __init__(self, session: RunSession, stream: TextIO | None) -> None:
        self.session = session
        self.meta = output.meta_dir(session.inp.out)
        self.calib_id = session.inp.plan.plan_id + "-cal"
        self.settings = replace(session.settings, mode="calibrate", plan_id=self.calib_id, adapter_parts=None)
        entries = [e for e in session.inp.plan.entries if e.kind in REPAIR_KINDS]
        self.keys = [k for e in entries for k in expected_keys(e)]
        have = calibration.read_rows(self.meta, self.calib_id)
        todo = {e.name for e in entries if any(k not in have for k in expected_keys(e))}
        todo |= {e.companion for e in entries if e.companion and e.name in todo}  # quantized scales travel along
        self.units = make_units([e for e in session.inp.plan.entries if e.name in todo], session.cfg.batch_mb << 20)
        self.pending: list[calibration.CalibrationRow] = []
        self.bar = tqdm(total=sum(u.nbytes for u in self.units), unit="B", unit_scale=True, unit_divisor=1024,
                        desc="calibrate", disable=not session.cfg.progress or not self.units,
                        file=stream or sys.stderr, dynamic_ncols=True)

    def jobs(self, unit: WorkUnit) -> list[EntryJob]:
        return self.session.jobs(unit)

    def commit(self, unit: WorkUnit, rows: list[calibration.CalibrationRow], note: str = "") -> None:  # noqa: ARG002
        self.pending.extend(rows)
        self.bar.update(unit.nbytes)
        if len(self.pending) >= FLUSH_ROWS:
            self.close()

    def close(self) -> None:
        calibration.write_part(self.meta, self.pending)
        self.pending = []

    def rows(self) -> list[calibration.CalibrationRow]:
        self.close()
        self.bar.close()
        have = calibration.read_rows(self.meta, self.calib_id)
        missing = [k for k in self.keys if k not in have]
        if missing:
            raise RepairFailure(f"calibration for --target-rho is incomplete ({len(missing)} matrices, e.g. "
                                f"{missing[0][0]}); re-run the same command to finish it.")
        return [have[k] for k in self.keys]


def run_repair(cfg: RepairConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) a repair in this process; returns the summary written to summary.json."""
    session = RunSession(cfg, stream)
    if session.complete:
        return output.read_summary(session.inp.out)
    policy = cpu_thread_policy(session.settings.threads) if session.settings.device == "cpu" else nullcontext()
    try:
        with policy:
            if session.calibration is not None:
                phase = session.calibration
                for unit in phase.units:
                    phase.commit(unit, execute_unit(phase.jobs(unit), phase.settings))
                session.resolve_target()
            for unit in session.units:
                session.commit(unit, execute_unit(session.jobs(unit), session.settings))
    finally:
        session.close()
    return session.finish({"executor": {"kind": "in-process", "device": session.settings.device}})


def build_summary(inp: Inputs, started: str, resumed: int, timings: dict[str, float]) -> dict[str, Any]:
    """Totals over the committed manifest (all attempts), plus config, plan id and fingerprints."""
    latest = manifest.latest_by_key(manifest.read_rows(inp.out))
    rows = [r for r in latest.values() if r.plan_id == inp.plan.plan_id]
    repaired = [r for r in rows if r.kind in REPAIR_KINDS]
    status = Counter(r.status for r in rows)
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: {"matrices": 0, "rank_kept": 0, "rank_total": 0})
    for r in repaired:
        agg = by_kind[r.kind]
        agg["matrices"] += 1
        agg["rank_kept"] += r.rank_kept or 0
        agg["rank_total"] += r.rank_total or 0
    energy = sum((r.frob_delta or 0.0) ** 2 for r in repaired)
    kept = sum((r.frob_kept or 0.0) ** 2 for r in repaired)
    return {
        "dgrepair_version": __version__,
        "plan_id": inp.plan.plan_id,
        "config": inp.cfg.to_dict(),
        "inputs": inp.plan.fingerprints,
        "plan": inp.plan.summary(),
        "started_utc": started,
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "resumed_entries": resumed,
        "totals": {
            "tensors": len({r.tensor for r in rows}),
            "rows_by_status": dict(sorted(status.items())),
            "matrices_repaired": len(repaired),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "global_rho": math.sqrt(kept / energy) if energy > 0 else 1.0,
            "bytes_written": sum(r.byte_end - r.byte_begin for r in rows),
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "platform": platform.platform()},
    }
