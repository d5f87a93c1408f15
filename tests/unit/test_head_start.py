"""The driver's head start (engine/run/head_start.py) without Ray: which units it takes, that it takes
none after `stop`, that a unit that raises is handed back and ends it, and that `close` (a signal)
abandons a unit before its writes but waits for one that is writing."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fake_units import SETTINGS, FakeJob, FakeUnit

from dgrepair.engine.run.head_start import HeadStart
from dgrepair.engine.run.pipeline import Cancelled


@dataclass
class _Phase:
    """The part of a Phase the head start uses; the step records what it ran and can block or fail."""

    units: list[FakeUnit]
    fail_on: str | None = None
    gate: threading.Event = field(default_factory=threading.Event)  # the step waits for it
    started: threading.Event = field(default_factory=threading.Event)  # set when a step begins
    ran: list[str] = field(default_factory=list)
    writes_output = False

    @property
    def step(self):
        def run(jobs, settings, phases):
            self.started.set()
            self.gate.wait(10)
            (name,) = (j.name for j in jobs)
            if name == self.fail_on:
                raise ValueError(f"bad tensor {name}")
            self.ran.append(name)
            return [f"row of {name}"]
        return run

    def jobs(self, unit: FakeUnit) -> list[FakeJob]:
        return [FakeJob(unit.name)]


def test_units_run_in_the_given_order_and_are_handed_over_with_their_rows():
    phase = _Phase([FakeUnit("a"), FakeUnit("b"), FakeUnit("c")])
    phase.gate.set()
    lane = HeadStart(phase, SETTINGS, order=[2, 0, 1])
    while lane.running:
        lane.wait(0.05)
    got = lane.collect()
    assert [u for u, _ in got] == [2, 0, 1] and phase.ran == ["c", "a", "b"]
    assert [r.rows for _, r in got] == [["row of c"], ["row of a"], ["row of b"]]
    assert [r.bytes_read for _, r in got] == [8, 8, 8] and {r.bytes_written for _, r in got} == {0}
    assert lane.stop() == {0, 1, 2} and lane.idle and not lane.busy


def test_no_unit_starts_after_stop_and_the_running_one_finishes():
    phase = _Phase([FakeUnit("a"), FakeUnit("b"), FakeUnit("c")])
    lane = HeadStart(phase, SETTINGS, order=[0, 1, 2])
    assert phase.started.wait(10)  # "a" is in its step, held there by the gate
    taken = lane.stop()
    phase.gate.set()
    while lane.running:
        lane.wait(0.05)
    assert taken == {0} and phase.ran == ["a"]
    assert [u for u, _ in lane.collect()] == [0]


def test_a_unit_that_raises_is_handed_back_and_nothing_starts_after_it():
    phase = _Phase([FakeUnit("a"), FakeUnit("b"), FakeUnit("c")], fail_on="b")
    phase.gate.set()
    lane = HeadStart(phase, SETTINGS, order=[0, 1, 2])
    while lane.running:
        lane.wait(0.05)
    got = lane.collect()
    assert [(u, type(r).__name__) for u, r in got] == [(0, "UnitResult"), (1, "ValueError")]
    assert str(got[1][1]) == "bad tensor b"
    assert phase.ran == ["a"] and lane.stop() == {0, 1}


@dataclass
class _PhasedStep:
    """A step that reads, computes and writes through its `phases`, each held by an event."""

    before_compute: threading.Event = field(default_factory=threading.Event)
    writing: threading.Event = field(default_factory=threading.Event)  # set once the step writes
    finish_write: threading.Event = field(default_factory=threading.Event)
    events: list[str] = field(default_factory=list)

    def __call__(self, jobs, settings, phases):
        self.events.append("read")
        self.before_compute.wait(10)
        phases.compute(lambda: self.events.append("computed"))
        self.events.append("write")
        self.writing.set()
        self.finish_write.wait(10)
        self.events.append("written")
        return ["row"]


@dataclass
class _PhasedPhase:
    units: list[FakeUnit]
    step: _PhasedStep
    writes_output = False

    def jobs(self, unit: FakeUnit) -> list[FakeJob]:
        return [FakeJob(unit.name)]


def test_close_abandons_a_unit_that_has_not_begun_to_write():
    step = _PhasedStep()
    phase = _PhasedPhase([FakeUnit("a"), FakeUnit("b")], step)
    lane = HeadStart(phase, SETTINGS, order=[0, 1])
    while "read" not in step.events:
        threading.Event().wait(0.01)
    lane.close()  # returns at once: the unit is still before its kernels
    step.before_compute.set()
    while lane.running:
        lane.wait(0.05)
    assert step.events == ["read"]  # no compute, no write after close
    ((unit, outcome),) = lane.collect()
    assert unit == 0 and isinstance(outcome, Cancelled)


def test_close_waits_for_a_unit_that_is_writing():
    step = _PhasedStep()
    step.before_compute.set()
    phase = _PhasedPhase([FakeUnit("a"), FakeUnit("b")], step)
    lane = HeadStart(phase, SETTINGS, order=[0, 1])
    assert step.writing.wait(10)
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (lane.close(), closed.set()))
    closer.start()
    assert not closed.wait(0.5)  # held while the unit writes
    step.finish_write.set()
    assert closed.wait(10)
    closer.join()
    assert step.events == ["read", "computed", "write", "written"]  # the second unit never started
    while lane.running:
        lane.wait(0.05)
    assert [(u, r.rows) for u, r in lane.collect()] == [(0, ["row"])]
