"""Overlap inside one worker: the next unit reads and the previous unit writes while one unit computes.

A unit's step (run/repair_step.py and its variants, run/calibration.py) has three phases: load (every
input read, the upcasts and Δ), compute (the kernels) and store (pwrite, sha256, manifest rows). The
step marks them on the `Phases` it is given: `phases.compute(fn, ...)` runs its kernels, and
`phases.store()` says that writing begins (a unit that copies without computing); after a compute
the unit is storing. A step called on its own gets `SEQUENTIAL`, which only calls `fn`.

A worker runs up to `SLOTS` units at once, each in its own thread, and admits one of them at a time
into its kernels, in the order the units began (`Turns`): the kernels keep every compute thread of the
worker while the other unit reads or writes beside them, and each unit's kernels run alone with the
same threads as without overlap (the thread count never changes the bytes anyway: kernels/threads.py).
Two ways to admit:
- `run_overlapped` (the in-process executor): the calling thread runs every unit's kernels itself and
  commits rows in unit order. The main thread keeps computing, so SIGTERM/SIGINT still interrupt the
  run at the next kernel call; a stopped run lets no unit start writing and waits only for the units
  that are writing.
- `ComputeGate` (a Ray actor's threads): each unit computes in its own thread, under a turn lock.

Test hooks (environment variables, read once when a worker starts; the Ray driver forwards them):
- `DGREPAIR_TRACE_UNITS=<file>`: append one line `<pid> <unit> <event>` per phase event: `load` (the
  unit began), `compute` (its kernels began), `computed` (they ended), `stored` (the unit ended).
- `DGREPAIR_FAULT_SLOW_LOAD=<seconds>`: every unit's load phase takes that much longer (a slow read).
- `DGREPAIR_FAULT_SLOW_STORE=<seconds>`: every unit's store phase takes that much longer (a slow write).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
U = TypeVar("U")
R = TypeVar("R")

SLOTS = 2  # units in flight per worker with overlap: one computing, one reading or writing
HOOK_ENV = ("DGREPAIR_TRACE_UNITS", "DGREPAIR_FAULT_SLOW_LOAD", "DGREPAIR_FAULT_SLOW_STORE")


class Cancelled(Exception):
    """Raised in a unit's thread at its next phase boundary once the run has stopped."""


class Phases(Protocol):
    """What a step sees of the pipeline."""

    waited: float  # seconds this unit spent waiting for its turn to compute (not its own work)

    def compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    def store(self) -> None: ...


class _Sequential:
    waited = 0.0

    def compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def store(self) -> None:
        pass


SEQUENTIAL: Phases = _Sequential()


@dataclass(frozen=True)
class Hooks:
    """The test hooks of the module docstring, as frozen values."""

    trace: str | None = None
    slow_load_s: float = 0.0
    slow_store_s: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Hooks:
        return cls(env.get("DGREPAIR_TRACE_UNITS") or None, float(env.get("DGREPAIR_FAULT_SLOW_LOAD") or 0),
                   float(env.get("DGREPAIR_FAULT_SLOW_STORE") or 0))

    def event(self, unit: object, name: str) -> None:
        if self.trace:  # one O_APPEND write per line: lines of threads and processes never interleave
            fd = os.open(self.trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{os.getpid()} {unit} {name}\n".encode())
            finally:
                os.close(fd)


@dataclass
class Turns:
    """Whose kernels run next: the oldest unit waiting to compute, unless an older unit is still in its
    first load (then that one, once it asks). Bookkeeping only; its owner serialises every call."""

    order: list[Hashable] = field(default_factory=list)  # live units, in the order they began
    state: dict[Hashable, str] = field(default_factory=dict)  # load | wait | run | after

    def begin(self, key: Hashable) -> None:
        self.order.append(key)
        self.state[key] = "load"

    def want(self, key: Hashable) -> None:
        self.state[key] = "wait"

    def start(self, key: Hashable) -> None:
        self.state[key] = "run"

    def done(self, key: Hashable) -> None:
        self.state[key] = "after"

    def end(self, key: Hashable) -> None:
        self.order.remove(key)
        del self.state[key]

    def next(self) -> Hashable | None:
        if "run" in self.state.values():
            return None
        for key in self.order:
            if self.state[key] in ("wait", "load"):
                return key if self.state[key] == "wait" else None
        return None


class _UnitPhases:
    """One unit's `Phases`; the owner admits its computes and guards its entry into the store phase."""

    def __init__(self, owner: _Owner, key: Hashable, label: object) -> None:
        self.owner, self.key, self.label = owner, key, label
        self.waited = 0.0
        self.storing = False

    def compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result = self.owner.compute(self, lambda: fn(*args, **kwargs))
        self.store()
        return result

    def store(self) -> None:
        if not self.storing:
            self.owner.enter_store(self)
            self.storing = True
            if self.owner.hooks.slow_store_s:
                time.sleep(self.owner.hooks.slow_store_s)


class _Owner(Protocol):
    hooks: Hooks

    def compute(self, unit: _UnitPhases, fn: Callable[[], T]) -> T: ...

    def enter_store(self, unit: _UnitPhases) -> None: ...


class ComputeGate:
    """Admits a worker's concurrent units into their kernels one at a time, in the order they began;
    each computes in its own thread (a Ray actor running `SLOTS` units at once)."""

    def __init__(self, hooks: Hooks | None = None) -> None:
        self.hooks = hooks or Hooks()
        self._cond = threading.Condition()
        self._turns = Turns()
        self._tickets = itertools.count()

    @contextmanager
    def unit(self, label: object) -> Iterator[Phases]:
        with self._cond:
            key = next(self._tickets)
            self._turns.begin(key)
        phases = _UnitPhases(self, key, label)
        self.hooks.event(label, "load")
        try:
            if self.hooks.slow_load_s:
                time.sleep(self.hooks.slow_load_s)
            yield phases
        finally:
            with self._cond:
                self._turns.end(key)
                self._cond.notify_all()
            self.hooks.event(label, "stored")

    def compute(self, unit: _UnitPhases, fn: Callable[[], T]) -> T:
        asked = time.perf_counter()
        with self._cond:  # events under the lock: their order in the trace is the order of the turns
            self._turns.want(unit.key)
            self._cond.wait_for(lambda: self._turns.next() == unit.key)
            self._turns.start(unit.key)
            self.hooks.event(unit.label, "compute")
        unit.waited += time.perf_counter() - asked
        try:
            return fn()
        finally:
            with self._cond:
                self._turns.done(unit.key)
                self.hooks.event(unit.label, "computed")
                self._cond.notify_all()

    def enter_store(self, unit: _UnitPhases) -> None:
        pass  # an actor is never stopped half-way: it finishes its units or dies with them


@dataclass
class _Request:
    fn: Callable[[], Any]
    answered: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    started: float = 0.0


class _Loop:
    """The state `run_overlapped` shares with its unit threads (under `lock`)."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self.lock = threading.Lock()
        self.writing = threading.Condition(self.lock)
        self.turns = Turns()
        self.inbox: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        self.storing: set[Hashable] = set()
        self.cancelled = False

    def compute(self, unit: _UnitPhases, fn: Callable[[], T]) -> T:
        request = _Request(fn)
        asked = time.perf_counter()
        with self.lock:  # under the lock: `stop` sees every request that was sent
            if self.cancelled:
                raise Cancelled
            self.turns.want(unit.key)
            self.inbox.put(("compute", unit.key, request))  # type: ignore[arg-type]
        request.answered.wait()
        unit.waited += max(0.0, request.started - asked)
        if request.error is not None:
            raise request.error
        return request.result

    def enter_store(self, unit: _UnitPhases) -> None:
        with self.lock:
            if self.cancelled:
                raise Cancelled
            self.storing.add(unit.key)

    def serve(self, wants: dict[int, _Request]) -> None:
        """Run the admitted computes in this (the calling) thread, in turn order."""
        while True:
            with self.lock:
                key = self.turns.next()
                if key is None or key not in wants:
                    return
                self.turns.start(key)
            request = wants.pop(key)  # type: ignore[arg-type]
            request.started = time.perf_counter()
            self.hooks.event(key, "compute")
            try:
                request.result = request.fn()
            except Exception as exc:  # the unit's own error: raised in its thread, reported in unit order
                request.error = exc
            except BaseException:  # a signal: the run stops; this unit is released by `stop`
                wants[key] = request  # type: ignore[index]
                raise
            with self.lock:
                self.turns.done(key)
            self.hooks.event(key, "computed")
            request.answered.set()

    def stop(self, wants: dict[int, _Request]) -> None:
        """No unit starts writing from now on; wait for those that are writing."""
        with self.lock:
            self.cancelled = True
        while not self.inbox.empty():  # requests sent but not yet read
            kind, key, payload = self.inbox.get_nowait()
            if kind == "compute":
                wants[key] = payload
        for request in wants.values():
            request.error = Cancelled()
            request.answered.set()
        with self.lock:
            self.writing.wait_for(lambda: not self.storing)


def run_overlapped(units: Sequence[U], work: Callable[[U, Phases], R], commit: Callable[[U, R], None],
                   slots: int = SLOTS, hooks: Hooks | None = None, alone: Callable[[U], bool] = lambda _: False
                   ) -> None:
    """`work(unit, phases)` for every unit, up to `slots` at once in threads (a unit for which `alone`
    is true runs with no other); this thread runs their computes (in turn order) and `commit`s results
    in unit order. After a unit's error no further unit starts; the units before it are committed,
    then the error is raised. On a signal (or any error raised here) no unit enters its store phase
    any more and those already in it are waited for."""
    loop = _Loop(hooks or Hooks())
    wants: dict[int, _Request] = {}
    finished: dict[int, tuple[Any, BaseException | None]] = {}
    running: set[int] = set()
    solo = {i for i, unit in enumerate(units) if slots > 1 and alone(unit)}
    started = committed = 0
    failed = False

    def thread_main(index: int) -> None:
        phases = _UnitPhases(loop, index, index)
        outcome: tuple[Any, BaseException | None] = (None, None)
        loop.hooks.event(index, "load")
        try:
            if loop.hooks.slow_load_s:
                time.sleep(loop.hooks.slow_load_s)
            outcome = (work(units[index], phases), None)
        except BaseException as exc:  # reported to the calling thread, raised there in unit order
            outcome = (None, exc)
        finally:
            with loop.lock:
                loop.storing.discard(index)
                loop.writing.notify_all()
            loop.hooks.event(index, "stored")
            loop.inbox.put(("done", index, outcome))

    try:
        while committed < len(units):
            while not failed and started < len(units) and len(running) < slots and not (
                    running and (started in solo or running & solo)):
                with loop.lock:
                    loop.turns.begin(started)
                threading.Thread(target=thread_main, args=(started,), daemon=True,
                                 name=f"dgrepair-unit-{started}").start()
                running.add(started)
                started += 1
            kind, index, payload = loop.inbox.get()
            if kind == "compute":
                wants[index] = payload
            else:
                running.discard(index)
                finished[index] = payload
                failed = failed or payload[1] is not None
                with loop.lock:
                    loop.turns.end(index)
            loop.serve(wants)
            while committed in finished:
                result, error = finished.pop(committed)
                if error is not None:
                    raise error
                commit(units[committed], result)
                committed += 1
    except BaseException:
        loop.stop(wants)
        raise
