"""A run session: the plan, the output folder, the commit protocol, the summary, and the phases an
executor runs.

A phase (`Phase`) is a list of work units, the step that executes one (a function of jobs and frozen
settings, run in this process or on a Ray actor) and where its rows go. A run has at most two: the
--target-rho calibration pass (`CalibrationPhase`, rows are per-matrix curves) and the repair itself
(`RunSession`, rows are manifest rows). Executors (run/executor.py, dgrepair.cluster) differ only in
who calls `step`; committing rows, finalising shards, progress and the summary happen here.

Memory is bounded by the units in flight: one at a time, or two with overlap (run/pipeline.py),
each sized to its share of --batch-mb (a few float32 copies of its matrices). Rows are committed
to the manifest in batches; before a batch is committed the shards it touched are
fsynced, so a committed row always describes bytes on disk.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TextIO, TypeVar

from ...kernels.spectral import resolve_device
from ..config import RepairConfig
from ..errors import InputError, RepairFailure
from ..io.bytes import fsync_file
from ..output import adapter, manifest, paths
from ..output.lock import LockHolder, OutputLock
from ..output.manifest import ManifestRow
from ..output.target import LocalOutput, OutputTarget
from ..plan.kinds import REPAIR_KINDS, SCALE_KINDS
from ..plan.units import WorkUnit, make_units, runs_alone, unit_budget
from . import calibration
from .calibration import CalibrationRow, calibrate_unit
from .inputs import adapter_parts, entry_job, expected_keys, load_inputs
from .jobs import EntryJob, StepSettings
from .pipeline import SLOTS, Phases
from .progress import Progress
from .repair_step import repair_unit
from .resume import verified_done
from .summary import build_summary

FLUSH_ROWS = 256
FLUSH_SECONDS = 10.0

R = TypeVar("R")


class Phase(Protocol[R]):
    """What an executor needs to run one pass over work units."""

    name: str  # "repair" or "calibrate"
    settings: StepSettings
    units: list[WorkUnit]
    writes_output: ClassVar[bool]  # whether the step writes output bytes (progress and per-node totals)

    @property
    def step(self) -> Callable[[list[EntryJob], StepSettings, Phases], list[R]]: ...

    def jobs(self, unit: WorkUnit) -> list[EntryJob]: ...

    def runs_alone(self, unit: WorkUnit) -> bool: ...  # with overlap: nothing else in flight on its worker

    def commit(self, unit: WorkUnit, rows: list[R], note: str = "", node: str | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass
class Committer:
    """Buffers manifest rows; fsyncs touched shards before each part file is written (when they are
    on this machine's disk) and hands each part to the output target (a bucket copies it)."""

    out: Path
    interval_s: float = FLUSH_SECONDS
    fsync_shards: bool = True
    on_part: Callable[[Path | None], None] = lambda _: None
    rows: list[ManifestRow] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    last: float = field(default_factory=time.monotonic)

    def add(self, rows: list[ManifestRow]) -> None:
        self.rows.extend(rows)
        self.touched.update(r.shard for r in rows if r.byte_end > r.byte_begin)
        if len(self.rows) >= FLUSH_ROWS or time.monotonic() - self.last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        for shard in self.touched if self.fsync_shards else ():
            fsync_file(paths.shard_location(self.out, shard))
        self.on_part(manifest.write_part(self.out, self.rows))
        self.rows, self.touched, self.last = [], set(), time.monotonic()


class RunSession:
    """The run, and its repair phase (a `Phase` of manifest rows)."""

    name = "repair"
    writes_output: ClassVar[bool] = True
    step = staticmethod(repair_unit)

    def __init__(self, cfg: RepairConfig, stream: TextIO | None = None) -> None:
        self.t0 = time.perf_counter()
        self.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.cfg = cfg
        self.inp = load_inputs(cfg)
        self.inp.plan.check_runnable()
        try:
            device = resolve_device(cfg.execution.device)  # refused before anything is created in --out
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        self.target: OutputTarget = self.inp.target or LocalOutput(self.inp.out)
        self.target.precheck()
        self.lock: OutputLock = self.target.lock()
        stale = self.lock.acquire(LockHolder.here(self.inp.plan.plan_id))
        if stale is not None:
            print(f"dgrepair: taking over the lock on {self.target.label} left by a run that is no longer running "
                  f"({stale.describe()}); its committed work is verified and kept.", file=stream or sys.stderr)
        try:
            self._prepare(cfg, device, stream)
        except BaseException:
            self.lock.release()
            raise

    def _prepare(self, cfg: RepairConfig, device: str, stream: TextIO | None) -> None:
        """Everything after the lock is taken: the output folder, what resume can skip, the work units."""
        state = self.target.prepare(self.inp.plan, self.inp.ft, cfg.output.force)
        self.stream = stream or sys.stderr
        self.complete = state == "complete"
        latest = manifest.latest_by_key(manifest.read_rows(self.inp.out)) if state == "resume" else {}
        self.done = verified_done(self.inp, latest, self.target.published()) if state == "resume" else set()
        total = len(self.inp.plan.entries)
        if state == "resume":  # a complete output is reported by the caller (CLI, job): "already complete"
            self.say(f"resuming: {len(self.done)} of {total} entries verified on disk, {total - len(self.done)} "
                     "to do")
        parts = adapter_parts(self.inp)
        self.settings = StepSettings(cfg.repair_method(), cfg.execution.kernel, self.inp.plan.plan_id, device=device,
                                     threads=cfg.execution.threads or None, adapter_parts=str(parts) if parts else None,
                                     fp64_rate=cfg.execution.fp64_rate)
        # with overlap a worker holds two units at once: each gets half the budget (plan/units.py)
        self.unit_bytes = unit_budget(cfg.execution.batch_mb << 20, SLOTS if cfg.execution.overlap else 1)
        self.solution: calibration.Solution | None = None
        self.calibration = CalibrationPhase(self, stream) if cfg.method.target_rho is not None else None
        todo = [e for e in self.inp.plan.entries if e.name not in self.done]
        self.remaining = Counter(e.shard for e in todo)
        self.checks = self._done_checks(latest)
        self.defer_publication = False  # the Ray driver publishes on the worker that holds the shard
        self.ready: list[str] = []  # complete shards waiting for the driver to publish them
        if not self.complete:
            for shard in sorted({e.shard for e in self.inp.plan.entries} & set(self.inp.plan.out_shards)):
                if self.remaining[shard] == 0 and not self.target.is_final(shard):
                    self._shard_complete(shard)  # all committed before an interruption
                elif self.remaining[shard] > 0 and self.target.is_final(shard):
                    # a finalised shard that no longer verifies
                    self.target.reopen(shard, *self.inp.plan.out_shards[shard])
        self.units = make_units(todo, self.unit_bytes, per_shard=self.target.per_shard_units)
        self.committer = Committer(self.inp.out, interval_s=cfg.execution.commit_interval_s,
                                   fsync_shards=self.target.fsync_partials, on_part=self.target.mirror)
        self.finished = len(self.done)
        self.bar = Progress("repair", sum(u.nbytes for u in self.units), total, self.finished,
                            cfg.execution.progress and not self.complete, cfg.execution.progress_interval_s,
                            self.stream)
        self.t_plan = time.perf_counter() - self.t0

    def __enter__(self) -> RunSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Commit what is finished (also on an error or a signal), then release the output lock."""
        try:
            self.close()
        except OSError:
            if exc is None:
                raise  # otherwise the original error is the one to report
        finally:
            self.lock.release()

    def say(self, message: str) -> None:
        """A status line for the user (stderr by default), flushed at once for job logs."""
        print(f"dgrepair: {message}", file=self.stream, flush=True)

    def resolve_target(self) -> None:
        """After the calibration pass: fix the method's knob so the global ρ meets --target-rho."""
        if self.calibration is None:
            return
        method = self.settings.method
        rows = self.calibration.rows()
        self.solution = calibration.solve_knob(method, rows, float(self.cfg.method.target_rho))
        self.settings = replace(self.settings, method=method.with_knob(self.solution.value))

    def jobs(self, unit: WorkUnit) -> list[EntryJob]:
        return [entry_job(self.inp, e) for e in unit.entries]

    def runs_alone(self, unit: WorkUnit) -> bool:
        return self.cfg.execution.overlap and runs_alone(unit, self.cfg.execution.batch_mb << 20)

    def commit(self, unit: WorkUnit, rows: list[ManifestRow], note: str = "", node: str | None = None) -> None:
        """Record a finished unit; finalise every shard whose last tensor this was."""
        self.lock.check()
        self.committer.add([replace(r, node=node) for r in rows] if node else rows)
        for r in rows:
            self.checks.setdefault(r.shard, {})[(r.tensor, r.expert, r.part)] = (r.byte_begin, r.byte_end, r.sha256)
        for e in unit.entries:
            self.remaining[e.shard] -= 1
            if self.remaining[e.shard] == 0 and e.shard in self.inp.plan.out_shards:
                self.committer.flush()
                self._shard_complete(e.shard)
        self.finished += len(unit.entries)
        self.bar.update(unit.nbytes, len(unit.entries), note)

    def shard_checks(self, shard: str) -> list[tuple[int, int, str]]:
        """The byte ranges and digests of a shard's committed rows (verified before it is published)."""
        return sorted(set(self.checks.get(shard, {}).values()))

    def _shard_complete(self, shard: str) -> None:
        if self.defer_publication and self.target.per_shard_units:
            self.ready.append(shard)
            return
        bad = self.target.shard_complete(shard, self.shard_checks(shard))
        if bad:
            raise RepairFailure(f"{self.target.label}: staged shard {shard} no longer matches {len(bad)} committed "
                                f"row(s) (scratch {paths.partial_path(self.inp.out, shard)} changed during the "
                                "run); re-run the same command to redo them.")

    def redo(self, shard: str, bad: list[tuple[int, int, str]]) -> list[WorkUnit]:
        """Units that rewrite the entries of `shard` whose staged bytes did not verify (the Ray driver
        queues them on the shard's worker again)."""
        ranges = {(lo, hi) for lo, hi, _ in bad}
        keys = {k for k, (lo, hi, _) in self.checks.get(shard, {}).items() if (lo, hi) in ranges}
        names = {k[0] for k in keys}
        entries = [e for e in self.inp.plan.entries if e.shard == shard and e.name in names]
        for k in keys:
            self.checks[shard].pop(k, None)
        self.remaining[shard] += len(entries)
        self.finished -= len(entries)
        return make_units(entries, self.unit_bytes, per_shard=True)

    def _done_checks(self, latest: dict[tuple[str, int | None, str | None], ManifestRow]
                     ) -> dict[str, dict[tuple[str, int | None, str | None], tuple[int, int, str]]]:
        """The checks of the rows resume kept (entries verified done), by shard."""
        checks: dict[str, dict[tuple[str, int | None, str | None], tuple[int, int, str]]] = {}
        for key, r in latest.items():
            if r.tensor in self.done and r.plan_id == self.inp.plan.plan_id:
                checks.setdefault(r.shard, {})[key] = (r.byte_begin, r.byte_end, r.sha256)
        return checks

    def close(self) -> None:
        self.committer.flush()
        self.bar.close()

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write sidecars, the index and summary.json (in that order); call only when all is done."""
        self.close()
        unfinished = sorted(s for s in self.inp.plan.out_shards if not self.target.is_final(s))
        if unfinished:  # never a summary beside a missing shard, whatever went wrong before
            raise RepairFailure(f"{self.target.label}: {len(unfinished)} shard(s) were not finalised ({unfinished[0]}"
                                f"{', ...' if len(unfinished) > 1 else ''}); this is a bug, please report it. "
                                "Re-run the same command to finish them.")
        summary = build_summary(self.inp, self.started, resumed=len(self.done),
                                timings={"plan_s": self.t_plan, "total_s": time.perf_counter() - self.t0})
        summary["method"] = {"name": self.settings.method.name, "params": self.settings.method.params()}
        if self.solution is not None:
            summary["target_rho"] = {"target": self.cfg.method.target_rho, **self.solution.to_dict(),
                                     "achieved_rho": summary["totals"]["global_rho"]}
        if self.cfg.output.emit_adapter:
            summary["adapter"] = adapter.finalize(adapter_parts(self.inp), self.inp.plan,
                                                  Path(self.cfg.output.emit_adapter).expanduser().resolve(),
                                                  self.inp.base, self.inp.ft)
        summary.update(extra or {})
        self.target.finalize_run(self.inp.ft, summary, self.inp.plan)
        return summary


class CalibrationPhase:
    """The --target-rho calibration pass (a `Phase` of calibration rows): no output bytes."""

    name = "calibrate"
    writes_output: ClassVar[bool] = False
    step = staticmethod(calibrate_unit)

    def __init__(self, session: RunSession, stream: TextIO | None) -> None:
        self.session = session
        self.out = session.inp.out
        self.calib_id = session.inp.plan.plan_id + "-cal"
        self.settings = replace(session.settings, plan_id=self.calib_id, adapter_parts=None)
        entries = [e for e in session.inp.plan.entries if e.kind in REPAIR_KINDS]
        self.keys = [k for e in entries for k in expected_keys(e)]
        have = calibration.read_rows(self.out, self.calib_id)
        todo = {e.name for e in entries if any(k not in have for k in expected_keys(e))}
        todo |= {e.companion for e in entries if e.companion and e.name in todo}  # quantized scales travel along
        todo |= {e.name for e in session.inp.plan.entries if e.kind in SCALE_KINDS and e.companion in todo}
        self.units = make_units([e for e in session.inp.plan.entries if e.name in todo], session.unit_bytes)
        self.pending: list[CalibrationRow] = []
        self.say = session.say
        self.bar = Progress("calibrate", sum(u.nbytes for u in self.units), len(todo), 0,
                            session.cfg.execution.progress and bool(self.units),
                            session.cfg.execution.progress_interval_s, stream or sys.stderr)

    def jobs(self, unit: WorkUnit) -> list[EntryJob]:
        return self.session.jobs(unit)

    def runs_alone(self, unit: WorkUnit) -> bool:
        return self.session.runs_alone(unit)

    def commit(self, unit: WorkUnit, rows: list[CalibrationRow], note: str = "",  # noqa: ARG002
               node: str | None = None) -> None:  # noqa: ARG002
        self.pending.extend(rows)
        self.bar.update(unit.nbytes, len(unit.entries))
        if len(self.pending) >= FLUSH_ROWS:
            self.close()

    def close(self) -> None:
        self.session.target.mirror(calibration.write_part(self.out, self.pending))
        self.pending = []

    def rows(self) -> list[CalibrationRow]:
        self.close()
        self.bar.close()
        have = calibration.read_rows(self.out, self.calib_id)
        missing = [k for k in self.keys if k not in have]
        if missing:
            raise RepairFailure(f"calibration for --target-rho is incomplete ({len(missing)} matrices, e.g. "
                                f"{missing[0][0]}); re-run the same command to finish it.")
        return [have[k] for k in self.keys]
