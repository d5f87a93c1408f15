"""Lanes: threads of this process that take a phase's units from one shared list and run them.

Two users: the Ray driver's head start (run/head_start.py: one lane while the embedded Ray starts)
and the local executor (run/executor.py: one lane per worker, no Ray at all). A lane runs the
phase's own step through `run_unit` with frozen settings under one thread policy for the whole
process (kernels/threads.py), so a unit's bytes are the same in any lane, on any actor and on any
thread count (ADR 0016). The caller commits: `collect` hands over what finished, in any order
(committing is order-independent, run/session.py).

Lanes run beside each other because the kernels release the GIL: numpy's matmul, scipy's `ormqr`,
and the tridiagonal routines through kernels/lapack_nogil.py.

A unit that raises ends its lane's taking: no lane takes another unit, and `collect` returns the
exception in place of the result (the head start hands the unit back to an actor; the local
executor re-raises it after committing what finished).

Stopping early (a signal, or the run failing): `close` lets no running unit start a write. A unit
still reading or computing is abandoned and stops at its next phase boundary (run/pipeline.py), so a
signal is not held up by a long kernel; one that is writing is waited for. Nothing of the lanes
writes to the output once `close` returns, and the --out lock can be released.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from ...kernels.threads import cpu_thread_policy
from .jobs import StepSettings
from .pipeline import Cancelled, ComputeGate, Hooks, Phases
from .session import Phase
from .unit_result import UnitResult, run_unit

T = TypeVar("T")
Outcome = UnitResult | BaseException  # a finished unit's result, or what it raised


class _StoppableGate(ComputeGate):
    """A lane's gate: after `cancel` a unit starts no compute and no write (`Cancelled` at its next
    phase boundary), and `cancel_and_wait_for_writes` also waits for a unit already writing."""

    def __init__(self, hooks: Hooks | None = None) -> None:
        super().__init__(hooks)
        self._state = threading.Condition()
        self._cancelled = False
        self._writing: set[Hashable] = set()

    @contextmanager
    def unit(self, label: object) -> Iterator[Phases]:
        with super().unit(label) as phases:
            try:
                yield phases
            finally:
                with self._state:
                    self._writing.discard(label)  # type: ignore[arg-type]
                    self._state.notify_all()

    def compute(self, unit: Any, fn: Callable[[], T]) -> T:
        with self._state:
            if self._cancelled:
                raise Cancelled
        return super().compute(unit, fn)

    def enter_store(self, unit: Any) -> None:
        with self._state:
            if self._cancelled:
                raise Cancelled
            self._writing.add(unit.label)

    def cancel_and_wait_for_writes(self) -> None:
        with self._state:
            self._cancelled = True
            self._state.wait_for(lambda: not self._writing)


class Lanes:
    """Units of a phase run in `count` background threads until `stop`; `collect` hands over what finished."""

    def __init__(self, phase: Phase[Any], settings: StepSettings, order: Sequence[int], count: int = 1,
                 name: str = "dgrepair-lane", hooks: Hooks | None = None) -> None:
        self._phase = phase
        self._settings = settings
        self._todo = deque(order)  # taken from the front, in the caller's order
        self._lock = threading.Lock()
        self._stopped = False
        self._claimed: set[int] = set()
        self._finished: list[tuple[int, Outcome]] = []
        self._alive = count
        self._ended = threading.Event()
        self._news = threading.Event()  # a unit finished, or the lanes ended, since the last `collect`
        self._gates = [_StoppableGate(hooks) for _ in range(count)]
        # One thread policy for the process while any lane runs: entered here, left by the last lane
        # (a policy per thread would restore torch's thread count while another lane still computes).
        self._policy = ExitStack()
        if settings.device == "cpu":
            self._policy.enter_context(cpu_thread_policy(settings.threads))
        for i, gate in enumerate(self._gates):
            threading.Thread(target=self._work, args=(gate,), name=name if count == 1 else f"{name}-{i}",
                             daemon=True).start()

    def _take(self) -> int | None:
        with self._lock:
            if self._stopped or not self._todo:
                return None
            unit_id = self._todo.popleft()
            self._claimed.add(unit_id)
            return unit_id

    def _work(self, gate: _StoppableGate) -> None:
        try:
            while (unit_id := self._take()) is not None:
                unit = self._phase.units[unit_id]
                try:
                    outcome: Outcome = run_unit(self._phase.step, unit_id, self._phase.jobs(unit), self._settings,
                                                gate, socket.gethostname(), self._phase.writes_output)
                except BaseException as exc:  # noqa: BLE001 - the caller decides (hand back, or raise); a
                    outcome = exc  # KeyboardInterrupt too, never lost with its thread (or Cancelled: stopping)
                with self._lock:
                    self._finished.append((unit_id, outcome))
                    if isinstance(outcome, BaseException):
                        self._stopped = True
                self._news.set()
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._policy.close()
                self._ended.set()
            self._news.set()

    def stop(self) -> set[int]:
        """Start no further unit; returns every unit the lanes took (finished, failed or running)."""
        with self._lock:
            self._stopped = True
            return set(self._claimed)

    @property
    def idle(self) -> bool:
        """True once no unit is left for the lanes to take (or they were stopped)."""
        with self._lock:
            return self._stopped or not self._todo

    @property
    def running(self) -> bool:
        return not self._ended.is_set()

    @property
    def busy(self) -> bool:
        """Running, or holding finished units not yet collected."""
        with self._lock:
            return self.running or bool(self._finished)

    def wait(self, timeout: float) -> None:
        """Until a unit finishes or the lanes end (since the last `collect`), at most `timeout` seconds."""
        self._news.wait(timeout)

    def collect(self) -> list[tuple[int, Outcome]]:
        """The units finished since the last call, in order: (unit id, result, or the exception it raised)."""
        with self._lock:
            out, self._finished = self._finished, []
            if self.running:
                self._news.clear()
            return out

    def close(self) -> None:
        """Stop now: no unit starts and a running one writes nothing unless it already is writing, which
        is waited for. Nothing is written after this returns. What finished stays in `collect`."""
        self.stop()
        for gate in self._gates:
            gate.cancel_and_wait_for_writes()
