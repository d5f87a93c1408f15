"""The Ray driver: plan with the engine, dispatch work units to worker actors, commit, resume.

- Units are sent largest-first (LPT) with at most `inflight_per_worker` per actor, in a bounded
  `ray.wait` loop; only paths, byte ranges and small records travel through Ray. With overlap an actor
  runs two of them at once, one in the kernels at a time (cluster/worker.py).
- Retries belong to the driver: an actor death requeues its units; a unit that kills actors
  `max_attempts` times is marked failed, the rest completes, and the run ends non-zero with a
  report naming it (no index or summary is written then, so the output never looks complete).
- A unit above a worker's whole --batch-mb (one large tensor) runs alone on its actor, as an isolated
  unit does (below), so two large units never share a worker's memory (engine/plan/units.py).
- Blame is only assigned when it is unambiguous. A unit that dies while other units were in flight
  on the same actor is requeued without charge and *isolated*: it then runs only on an idle actor
  with nothing else submitted beside it. A death while alone (or past the unit's own deadline)
  costs an attempt; a multi-tensor unit is then split into isolated single-tensor units, so one
  poison tensor can fail neither its batch-mates nor the units that shared its actor.
- A unit running longer than its deadline (proportional to its cost) gets its actor killed and is
  requeued (actor tasks cannot be cancelled by force). A unit's allowance starts when the units sent
  before it to the same actor are due (`_chain`): it may wait for their kernels, and that wait is not
  held against it.
- The manifest is written by the driver only; resume is the engine's (RunSession).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..engine.config import RepairConfig
from ..engine.errors import DGRepairError, RepairFailure
from ..engine.io.bytes import write_json_atomic
from ..engine.io.objstore import endpoint_env
from ..engine.output import shards as output
from ..engine.output.paths import failures_file
from ..engine.plan.units import WorkUnit, largest_first
from ..engine.run import interrupt
from ..engine.run.head_start import HeadStart
from ..engine.run.jobs import StepSettings, cpu_pool
from ..engine.run.pipeline import SLOTS
from ..engine.run.session import CalibrationPhase, Phase, RunSession
from ..engine.run.unit_result import UnitResult
from ..kernels.threads import available_cores
from .affinity import ShardOwners
from .session import local_cpus, ray_session
from .worker import FAULT_ENV, RepairWorker, actor_name, node_label

NAMESPACE = "dgrepair"
RECOVERY_WAIT_S = 120.0  # how long a restarting actor is waited for before it is sent units again


@dataclass
class _Flight:
    unit_id: int
    actor: int
    allowance: float  # seconds the unit may take once its turn has come (deadline_seconds)
    deadline: float = float("inf")  # set by _chain
    shared: bool = False  # another unit was in flight on the same actor at some point
    solo: bool = False  # an isolated unit: nothing else may be submitted to its actor meanwhile
    expired: bool = False  # killed by the driver for passing its own deadline


@dataclass
class _Book:
    """Driver-side bookkeeping of units, attempts, failures and per-node totals."""

    units: dict[int, WorkUnit]
    queue: deque[int]
    attempts: Counter[int] = field(default_factory=Counter)
    failed: dict[int, str] = field(default_factory=dict)
    isolated: set[int] = field(default_factory=set)
    nodes: dict[str, dict[str, float]] = field(default_factory=dict)
    next_id: int = 0
    requeues: int = 0
    head_start_units: int = 0  # units the driver ran itself while the actors started

    def split(self, unit_id: int) -> list[int]:
        """Replace a multi-entry unit by single-entry units; returns their ids."""
        unit = self.units.pop(unit_id)
        ids = []
        for entry in unit.entries:
            self.next_id += 1
            self.units[self.next_id] = WorkUnit((entry,))
            self.isolated.add(self.next_id)
            ids.append(self.next_id)
        return ids

    def next_for(self, busy: bool, allowed: Callable[[WorkUnit], bool] | None = None) -> int | None:
        """The next unit for an actor: anything for an idle actor, a non-isolated unit for a busy one;
        with `allowed`, only a unit it accepts (shard affinity)."""
        for i, unit_id in enumerate(self.queue):
            if (not busy or unit_id not in self.isolated) and (allowed is None or allowed(self.units[unit_id])):
                del self.queue[i]
                return unit_id
        return None

    def add(self, units: list[WorkUnit], alone: Callable[[WorkUnit], bool]) -> None:
        """Queue new units first (a shard's redone entries); those `alone` accepts run isolated."""
        for unit in reversed(units):
            self.next_id += 1
            self.units[self.next_id] = unit
            self.queue.appendleft(self.next_id)
            if alone(unit):
                self.isolated.add(self.next_id)


def deadline_seconds(unit: WorkUnit, floor: float) -> float:
    """Generous: `floor` plus 20x the time at a pessimistic 0.5 GFLOP/s (costs are flop proxies)."""
    return floor + 20.0 * (4.0 * unit.cost / 0.5e9)


def _chain(flights: Iterable[_Flight], actor: int, now: float) -> None:
    """(Re)set the deadlines of an actor's units in flight, in the order they were sent: each unit's
    allowance starts at the latest when the units sent before it are due, since it may wait for them
    (for their kernels with overlap, for all of them without). Called when a unit is sent and when one
    ends; a deadline only ever moves earlier. Units already killed past their deadline are skipped."""
    due = now
    for f in flights:
        if f.actor == actor and not f.expired:
            f.deadline = min(f.deadline, max(now, due) + f.allowance)
            due = max(due, f.deadline)


def run_distributed(cfg: RepairConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) a repair on Ray: the embedded local cluster, or `cfg.address` / RAY_ADDRESS.
    SIGTERM/SIGINT raise `Interrupted` in every phase, after the finished units are committed, the
    actors killed and the output lock released (the same contract as the in-process engine)."""
    with interrupt.signals_as_exceptions(), output.os_errors(Path(cfg.output.out or ".")), \
            RunSession(cfg, stream) as session:
        if session.complete:
            return {**session.target.read_summary(), "already_complete": True}
        return _run(session, cfg)


def _run(session: RunSession, cfg: RepairConfig) -> dict[str, Any]:
    failures = failures_file(session.inp.out)
    phase = session.calibration
    if not session.units and not (phase and phase.units):  # all committed earlier: nothing to distribute
        session.resolve_target()
        failures.unlink(missing_ok=True)
        session.target.mirror(failures)
        return session.finish({"executor": {"kind": "ray", "workers": 0, "note": "nothing left to run"}})
    env = {**{k: os.environ[k] for k in FAULT_ENV if k in os.environ},
           **endpoint_env(cfg.inputs.base, cfg.inputs.ft, cfg.output.out)}
    actors: list[Any] = []
    first: Phase = phase if phase is not None and phase.units else session
    lane = _head_start(first, session, cfg)
    started = time.monotonic()
    try:
        with _ray_started(cfg, session.say) as info:
            session.say(f"Ray ready after {time.monotonic() - started:.1f} s: {info['address']}, "
                        f"{info['resources'].get('CPU', 0):g} CPUs, {info['resources'].get('GPU', 0):g} GPUs")
            try:
                if phase is not None and phase.units:
                    _calibrate(phase, cfg, info, env, lane)
                    lane = None  # it belonged to the calibration pass
                session.resolve_target()
                session.defer_publication = True  # each staged shard is published by the worker holding it
                book, settings = _dispatch(session, cfg, info, actors, env, lane)
            finally:
                if lane is not None:
                    lane.close()  # before the lock goes: nothing is written after the session closes
                session.close()
                for actor in actors:
                    ray.kill(actor)
    finally:
        if lane is not None:
            lane.close()  # Ray failed to start, or a signal came during its start
    executor = {"kind": "ray", "address": info["address"], "workers": len(actors), "device": settings.device,
                "threads_per_worker": settings.threads, "overlap": cfg.execution.overlap,
                "requeued_units": book.requeues, "head_start_units": book.head_start_units,
                "per_node": book.nodes}
    if book.failed:
        report = {"failed": [{"tensors": [e.name for e in book.units[u].entries], "shards":
                              sorted({e.shard for e in book.units[u].entries}), "attempts": book.attempts[u],
                              "reason": why} for u, why in sorted(book.failed.items())], "executor": executor}
        write_json_atomic(failures, report)
        session.target.mirror(failures)
        names = ", ".join(n for f in report["failed"] for n in f["tensors"])
        raise RepairFailure(f"{len(book.failed)} unit(s) failed after {cfg.cluster.max_attempts} attempts: "
                            f"{names}. The rest is committed; details in {failures}. Re-run the same command to "
                            "retry them.")
    failures.unlink(missing_ok=True)
    session.target.mirror(failures)  # an absent file: the bucket's copy of an earlier report goes too
    return session.finish({"executor": executor})


@contextmanager
def _ray_started(cfg: RepairConfig, say: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """ray_session, with dgrepair's signal handlers back in place: ray.init installs its own SIGTERM
    handler (`sys.exit(15)`), which is turned into the same `Interrupted` as everywhere else, and
    ray.shutdown leaves the default one. A signal whose handler's exception was lost during the start
    (interrupt.SignalWatch) is raised once dgrepair's handlers are back."""
    watch = interrupt.SignalWatch()
    try:
        with ray_session(cfg.cluster.cluster_to_join(), cfg.cluster.workers, say) as info:
            interrupt.install()
            watch.check()
            yield info
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            raise interrupt.Interrupted(signal.SIGTERM) from None
        raise
    finally:
        watch.stop()
        interrupt.install()  # ray.shutdown resets SIGTERM to the default: finalising must stay covered


def _calibrate(phase: CalibrationPhase, cfg: RepairConfig, info: dict[str, Any], env: dict[str, str],
               lane: HeadStart | None) -> None:
    """The --target-rho calibration pass on its own actors (same dispatch, retries and isolation)."""
    actors: list[Any] = []
    try:
        book, _ = _dispatch(phase, cfg, info, actors, env, lane)
    finally:
        if lane is not None:
            lane.close()
        phase.close()
        for actor in actors:
            ray.kill(actor)
    if book.failed:
        names = ", ".join(e.name for u in book.failed for e in book.units[u].entries)
        raise RepairFailure(f"calibration for --target-rho failed on: {names}. Re-run the same command to retry.")


def _dispatch(session: Phase, cfg: RepairConfig, info: dict[str, Any], actors: list[Any],
              env: dict[str, str], lane: HeadStart | None = None) -> tuple[_Book, StepSettings]:
    """Run a phase's units on fresh actors (and, until the first is ready, on the driver's head start);
    returns the bookkeeping and the settings the actors ran with."""
    gpus = int(info["resources"].get("GPU", 0))
    use_gpu = session.settings.device != "cpu" and gpus > 0
    if use_gpu:
        n_workers = min(cfg.cluster.workers or gpus, gpus)  # an actor beyond the GPUs would never be scheduled
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
        settings = session.settings
    else:
        cpus = float(info["resources"].get("CPU", available_cores()))
        n_workers, settings = _cpu_workers(session, cfg, cpus)
        # Reserve at most one CPU (a fraction when oversubscribed) so every actor fits on any node
        # and is always schedulable; how many BLAS threads it uses is set separately.
        options = {"num_cpus": min(1.0, cpus / n_workers)}
    if env:
        options["runtime_env"] = {"env_vars": env}
    options["max_concurrency"] = SLOTS if cfg.execution.overlap else 1  # for `run`; control has its own threads
    actors.extend(RepairWorker.options(scheduling_strategy="SPREAD", name=actor_name(settings.plan_id, i),
                                       namespace=NAMESPACE, **options).remote(session.step, settings, i,
                                                                              session.writes_output)
                  for i in range(n_workers))
    taken = _until_an_actor_is_ready(actors, lane) if lane is not None else set()
    book = _Book(units=dict(enumerate(session.units)),
                 queue=deque(i for i in largest_first(session.units) if i not in taken), next_id=len(session.units),
                 isolated={i for i, unit in enumerate(session.units) if session.runs_alone(unit)})
    flights: dict[ray.ObjectRef, _Flight] = {}
    load = Counter()
    assembly = _Assembly.of(session, actors)

    def submit(unit_id: int, actor: int) -> None:
        unit = book.units[unit_id]
        opened = assembly.claim(actor, unit) if assembly is not None else []
        ref = actors[actor].run.remote(unit_id, session.jobs(unit), *opened)
        shared = load[actor] > 0
        for other in flights.values():
            if other.actor == actor:
                other.shared = True
        flights[ref] = _Flight(unit_id, actor, deadline_seconds(unit, cfg.cluster.unit_timeout_s), shared=shared,
                               solo=unit_id in book.isolated)
        _chain(flights.values(), actor, time.monotonic())
        load[actor] += 1

    # An actor that died (or was killed past a deadline) restarts; until its ping answers it gets no
    # unit, so no innocent unit is sent into a restarting actor and blamed for its unavailability.
    recovering: dict[ray.ObjectRef, int] = {}
    down_since: dict[int, float] = {}

    here = node_label()
    while book.queue or flights or (assembly is not None and assembly.busy) or (lane is not None and lane.busy):
        if lane is not None:
            _take_over(session, book, lane, here)
        if assembly is not None:
            assembly.publish_ready()
        down = set(recovering.values())
        for actor in sorted(range(n_workers), key=lambda a: load[a]):
            while actor not in down and load[actor] < cfg.cluster.inflight_per_worker and not any(
                    f.solo and f.actor == actor for f in flights.values()):
                busy = load[actor] > 0
                if assembly is None:
                    unit_id = book.next_for(busy)
                else:  # its own shards first, then a new shard if its scratch bound allows
                    unit_id = book.next_for(busy, assembly.accepts(actor, new_groups=False))
                    if unit_id is None:
                        unit_id = book.next_for(busy, assembly.accepts(actor, new_groups=True))
                if unit_id is None:
                    break
                submit(unit_id, actor)
        pending = [*flights, *recovering, *(assembly.publishing if assembly is not None else ())]
        if not pending:  # only the head start's last unit is left
            if lane is not None:
                lane.wait(1.0)
            continue
        ready, _ = ray.wait(pending, num_returns=1, timeout=0.2 if lane is not None and lane.busy else 1.0)
        session.bar.tick()
        for ref in ready:
            if assembly is not None and ref in assembly.publishing:
                redo, lost = assembly.collect(ref)
                book.add(redo, session.runs_alone)
                if lost is not None and lost not in recovering.values():
                    recovering[actors[lost].ping.remote()] = lost
                continue
            if ref in recovering:
                actor = recovering.pop(ref)
                try:
                    ray.get(ref)
                    down_since.pop(actor, None)
                    if assembly is not None:
                        assembly.restarted(actor)
                except RayActorError:
                    if time.monotonic() - down_since.setdefault(actor, time.monotonic()) < RECOVERY_WAIT_S:
                        time.sleep(0.2)
                        recovering[actors[actor].ping.remote()] = actor  # still restarting: ask again
                    else:  # not back in time: send it units again, as before the gate, and let them say why
                        down_since.pop(actor, None)
                        if assembly is not None:
                            assembly.restarted(actor)
                continue
            flight = flights.pop(ref)
            load[flight.actor] -= 1
            _chain(flights.values(), flight.actor, time.monotonic())  # the next unit's turn has come
            if not _collect(session, book, ref, flight, cfg) and flight.actor not in recovering.values():
                recovering[actors[flight.actor].ping.remote()] = flight.actor
        now = time.monotonic()
        for flight in list(flights.values()):
            if now > flight.deadline:
                flight.deadline = float("inf")  # kill once; the ref then fails and is requeued
                flight.expired = True
                session.say(f"{_describe(book.units[flight.unit_id])} passed its deadline on worker "
                            f"{flight.actor}; restarting that worker")
                ray.kill(actors[flight.actor], no_restart=False)
    return book, settings


@dataclass
class _Assembly:
    """Shard assembly on workers for an object-store output: each shard is filled by the worker that
    owns it (cluster/affinity.py), opened there before its first unit (again after a restart), and
    published by that worker when its last tensor is committed; a publish whose staged bytes no
    longer match the committed rows sends those entries back to the queue."""

    session: RunSession
    actors: list[Any]
    owners: ShardOwners
    opened: dict[tuple[int, str], ray.ObjectRef] = field(default_factory=dict)  # (worker, shard) -> its open
    publishing: dict[ray.ObjectRef, tuple[str, int]] = field(default_factory=dict)
    waiting: dict[int, list[str]] = field(default_factory=dict)  # publishes for a worker that is restarting

    @property
    def busy(self) -> bool:
        return bool(self.publishing or self.session.ready or any(self.waiting.values()))

    @classmethod
    def of(cls, session: Phase, actors: list[Any]) -> _Assembly | None:
        if not isinstance(session, RunSession) or not session.target.per_shard_units:
            return None
        return cls(session, actors, ShardOwners.of(session.units))

    def accepts(self, actor: int, new_groups: bool) -> Callable[[WorkUnit], bool]:
        return lambda unit: self.owners.allows(actor, unit, new_groups)

    def claim(self, actor: int, unit: WorkUnit) -> list[ray.ObjectRef]:
        """Own the unit's shards; returns the opens of its shards on `actor`, which the unit's call
        takes as arguments, so Ray runs it only after them (an actor runs calls concurrently)."""
        self.owners.claim(actor, unit)
        out_shards = self.session.inp.plan.out_shards
        refs = []
        for shard in sorted({e.shard for e in unit.entries if e.shard in out_shards}):
            if (actor, shard) not in self.opened:
                prefix, size = out_shards[shard]
                self.opened[(actor, shard)] = self.actors[actor].open_shard.remote(str(self.session.inp.out), shard,
                                                                                   prefix, size)
            refs.append(self.opened[(actor, shard)])
        return refs

    def restarted(self, actor: int) -> None:
        """A restarted worker may be on another node: its shards are opened again before its next unit
        (opening is idempotent; what the old process wrote is verified at publish time)."""
        self.opened = {(a, s): ref for (a, s), ref in self.opened.items() if a != actor}
        self.session.ready.extend(self.waiting.pop(actor, []))

    def publish_ready(self) -> None:
        session = self.session
        for shard in session.ready:
            actor = self.owners.owner_of(shard)
            ref = self.actors[actor].publish.remote(str(session.inp.out), session.target.label, shard,
                                                    session.shard_checks(shard), session.inp.plan.plan_id)
            self.publishing[ref] = (shard, actor)
        session.ready.clear()

    def collect(self, ref: ray.ObjectRef) -> tuple[list[WorkUnit], int | None]:
        """Record a finished publish; returns units to redo (none when the shard is in the bucket) and
        the worker that died while publishing (its publish is sent again once it is back)."""
        shard, actor = self.publishing.pop(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            if isinstance(cause, DGRepairError):
                raise cause from None  # the bucket refused the upload (access denied, throttled): exit 2
            raise
        except RayActorError:  # the worker died while uploading: ask again once it is back
            self.waiting.setdefault(actor, []).append(shard)
            return [], actor
        if result.bad:
            self.session.say(f"shard {shard}: {len(result.bad)} committed range(s) did not verify on worker {actor}'s "
                             "scratch (it restarted elsewhere?); redoing them")
            units = self.session.redo(shard, list(result.bad))
            self.opened.pop((actor, shard), None)
            return units, None
        self.session.target.record(result)
        self.owners.published.add(shard)
        return [], None


def _collect(session: Phase, book: _Book, ref: ray.ObjectRef, flight: _Flight,
             cfg: RepairConfig) -> bool:
    """Commit a finished unit or requeue a failed one; False when its actor was lost (it restarts)."""
    unit_id = flight.unit_id
    try:
        result = ray.get(ref)
    except RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
        if isinstance(cause, DGRepairError) or (isinstance(cause, OSError) and cause.errno in output.OUTPUT_ERRNOS):
            raise cause from None  # bad input (NaN, truncated file), full disk: stop like the in-process engine
        _retry(book, unit_id, f"error: {exc}", cfg.cluster.max_attempts, split=False)
        return True
    except RayActorError as exc:
        what = _describe(book.units[unit_id])
        if flight.shared and not flight.expired:  # the death may be another unit's doing
            book.requeues += 1
            book.isolated.add(unit_id)
            book.queue.appendleft(unit_id)
            session.say(f"{what} on worker {flight.actor}: worker died ({type(exc).__name__}) with other work in "
                        "flight; requeued without charge, to run alone")
            return False
        why = "past its deadline" if flight.expired else f"worker died: {type(exc).__name__}"
        _retry(book, unit_id, why, cfg.cluster.max_attempts, split=True)
        outcome = ("marked failed" if unit_id in book.failed else
                   f"requeued (attempt {book.attempts[unit_id] + 1} of {cfg.cluster.max_attempts})"
                   if unit_id in book.units else "split into single tensors and requeued")
        session.say(f"{what} on worker {flight.actor}: {why}; {outcome}")
        return False
    _commit(session, book, result)
    return True


def _commit(session: Phase, book: _Book, result: UnitResult) -> None:
    """Account a finished unit to its node and commit its rows."""
    unit = book.units[result.unit]
    node = book.nodes.setdefault(result.node, {"units": 0, "tensors": 0, "seconds": 0.0, "bytes_read": 0,
                                               "bytes_written": 0})
    node["units"] += 1
    node["tensors"] += len(unit.entries)
    node["seconds"] += result.seconds
    node["bytes_read"] += result.bytes_read
    node["bytes_written"] += result.bytes_written
    read_gb = sum(n["bytes_read"] for n in book.nodes.values()) / 1e9
    written_gb = sum(n["bytes_written"] for n in book.nodes.values()) / 1e9
    session.commit(unit, result.rows, note=f", read {read_gb:.2f} GB, wrote {written_gb:.2f} GB, "
                                           f"failed {len(book.failed)}", node=result.node)


def _cpu_workers(phase: Phase, cfg: RepairConfig, cpus: float) -> tuple[int, StepSettings]:
    """How many CPU actors, and the settings they run with (threads: the cores split between them)."""
    return cpu_pool(phase.settings, workers=cfg.cluster.workers, threads=cfg.execution.threads, cpus=int(cpus))


def _head_start(phase: Phase, session: RunSession, cfg: RepairConfig) -> HeadStart | None:
    """The driver's head start (engine/run/head_start.py), only where the driver shares the workers'
    machine: the embedded local Ray this run starts, on CPU, with a local output. Not when joining a
    cluster (its head may be a small node), and not under the actors' fault-injection hooks."""
    if (not cfg.cluster.head_start or ray.is_initialized() or cfg.cluster.cluster_to_join()
            or phase.settings.device != "cpu" or session.target.per_shard_units
            or any(k in os.environ for k in FAULT_ENV)):
        return None
    _, settings = _cpu_workers(phase, cfg, local_cpus(cfg.cluster.workers))  # the actors' settings: the same bytes
    return HeadStart(phase, settings, largest_first(phase.units))


def _until_an_actor_is_ready(actors: list[Any], lane: HeadStart) -> set[int]:
    """Wait until the first actor answers (its imports are done) or the head start has taken every unit;
    then stop it. Returns the units it took."""
    pings = [actor.ping.remote() for actor in actors]
    while not lane.idle:
        ready, _ = ray.wait(pings, num_returns=1, timeout=0.2)
        if ready:
            break
    return lane.stop()


def _take_over(session: Phase, book: _Book, lane: HeadStart, node: str) -> None:
    """Commit what the head start finished; a unit it handed back goes to the actors."""
    for unit_id, result in lane.collect():
        if isinstance(result, BaseException):
            book.queue.appendleft(unit_id)  # an actor runs it again and reports its error as usual
            continue
        book.head_start_units += 1
        _commit(session, book, dataclasses.replace(result, node=node))


def _describe(unit: WorkUnit) -> str:
    first = unit.entries[0].name
    return f"unit {first}" if len(unit.entries) == 1 else f"a unit of {len(unit.entries)} tensors ({first}, ...)"


def _retry(book: _Book, unit_id: int, why: str, max_attempts: int, split: bool) -> None:
    book.requeues += 1
    if split and book.units[unit_id].splittable and len(book.units[unit_id].entries) > 1:
        book.queue.extendleft(reversed(book.split(unit_id)))
        return
    book.attempts[unit_id] += 1
    if book.attempts[unit_id] >= max_attempts:
        book.failed[unit_id] = why
    else:
        book.queue.appendleft(unit_id)
