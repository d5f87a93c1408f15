"""Head start: the driver repairs units itself while an embedded Ray cluster starts.

On a workstation the embedded start is mostly waiting: `ray.init` took 4.0 s and the actors then
imported torch and scipy for another 2.4 s (2 cores, 2026-12-02), with the cores about three
quarters idle. One background thread of the driver runs units meanwhile, in the actors' own
largest-first order (so the small units still fill the end of the run), and takes no new unit once
the first actor is ready; the one it is running then finishes beside the actors. Measured on the
8-layer benchmark pair (2 cores, 3 alternating rounds): taking the largest first ended 0-3 s sooner
than taking the smallest first. The driver's own thread commits
what it finished, like an actor's result.

Same bytes: the thread runs the phase's own step with the actors' frozen settings under the same
thread policy, and the kernels' output does not depend on the thread count (ADR 0016).
A unit that raises is handed back (an actor runs it again, and its error is reported as any
actor's is), and no unit starts after that.

Stopping early (a signal, or the run failing): `close` lets the running unit start no write. A unit
still reading or computing is abandoned and stops at its next phase boundary (run/pipeline.py), so a
signal is not held up by a long kernel; one that is writing is waited for. Nothing of the thread
writes to the output once `close` returns, and the --out lock can be released.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from ...kernels.threads import cpu_thread_policy
from .jobs import StepSettings
from .pipeline import Cancelled, ComputeGate, Phases
from .session import Phase
from .unit_result import UnitResult, run_unit

T = TypeVar("T")
THREAD_NAME = "dgrepair-head-start"  # the thread's name, for traces and tests


class _StoppableGate(ComputeGate):
    """The head start's gate: after `cancel` a unit starts no compute and no write (`Cancelled` at its
    next phase boundary), and `wait_for_writes` waits for a unit already writing."""

    def __init__(self) -> None:
        super().__init__()
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


class HeadStart:
    """Units of a phase run in one background thread until `stop`; `collect` hands over what finished."""

    def __init__(self, phase: Phase[Any], settings: StepSettings, order: Sequence[int]) -> None:
        self._phase = phase
        self._settings = settings
        self._todo = list(order)  # largest first, the order the actors would take them in
        self._lock = threading.Lock()
        self._stopped = False
        self._claimed: set[int] = set()
        self._finished: list[tuple[int, UnitResult | None]] = []  # None: the unit raised and is handed back
        self._ended = threading.Event()
        self._news = threading.Event()  # a unit finished, or the thread ended, since the last `collect`
        self._gate = _StoppableGate()
        self._thread = threading.Thread(target=self._work, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _take(self) -> int | None:
        with self._lock:
            if self._stopped or not self._todo:
                return None
            unit_id = self._todo.pop(0)
            self._claimed.add(unit_id)
            return unit_id

    def _work(self) -> None:
        try:
            with cpu_thread_policy(self._settings.threads):
                while (unit_id := self._take()) is not None:
                    unit = self._phase.units[unit_id]
                    try:
                        result: UnitResult | None = run_unit(
                            self._phase.step, unit_id, self._phase.jobs(unit), self._settings, self._gate,
                            socket.gethostname(), self._phase.writes_output)
                    except Exception:  # noqa: BLE001 - handed back: an actor runs it and reports its error
                        result = None  # (or Cancelled by `close`: the run is stopping)
                    with self._lock:
                        self._finished.append((unit_id, result))
                        if result is None:
                            self._stopped = True
                    self._news.set()
        finally:
            self._ended.set()
            self._news.set()

    def stop(self) -> set[int]:
        """Start no further unit; returns every unit this thread took (finished, handed back or running)."""
        with self._lock:
            self._stopped = True
            return set(self._claimed)

    @property
    def idle(self) -> bool:
        """True once no unit is left for this thread to take (or it was stopped)."""
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
        """Until a unit finishes or the thread ends (since the last `collect`), at most `timeout` seconds."""
        self._news.wait(timeout)

    def collect(self) -> list[tuple[int, UnitResult | None]]:
        """The units finished since the last call, in order: (unit id, result, or None if it raised)."""
        with self._lock:
            out, self._finished = self._finished, []
            if self.running:
                self._news.clear()
            return out

    def close(self) -> None:
        """Stop now: no unit starts and the running one writes nothing unless it already is writing,
        which is waited for. Nothing is written after this returns. What finished stays in `collect`."""
        self.stop()
        self._gate.cancel_and_wait_for_writes()
