"""The local executor's lanes (engine/run/lanes.py, run_lanes in engine/run/executor.py) without any
real kernels: units are taken largest-first by several threads at once, each commit happens in the
calling thread, a unit's error stops the taking and is raised after the finished units are
committed, and a signal commits what finished before it goes on."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from fake_units import SETTINGS, FakeJob, FakeUnit

from dgrepair.engine.run import interrupt
from dgrepair.engine.run.executor import run_lanes
from dgrepair.engine.run.lanes import Lanes


@dataclass
class _Phase:
    """A phase whose step runs `behaviour[name]` (default: return a row) and records the threads."""

    units: list[FakeUnit]
    behaviour: dict = field(default_factory=dict)
    threads: dict = field(default_factory=dict)  # unit name -> thread name that ran it
    committed: list = field(default_factory=list)
    committer: list = field(default_factory=list)  # the threads commit ran in
    writes_output = False
    bar: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(tick=lambda: None))

    @property
    def step(self):
        def run(jobs, settings, phases):
            (name,) = (j.name for j in jobs)
            self.threads[name] = threading.current_thread().name
            self.behaviour.get(name, lambda: None)()
            return [f"row of {name}"]
        return run

    def jobs(self, unit: FakeUnit) -> list[FakeJob]:
        return [FakeJob(unit.name)]

    def commit(self, unit, rows, note="", node=None):
        self.committed.append((unit.name, rows))
        self.committer.append(threading.current_thread().name)


def test_two_lanes_run_units_at_once_and_the_caller_commits_them():
    both = threading.Barrier(2, timeout=10)  # passes only if two units are inside the step together
    phase = _Phase([FakeUnit("a"), FakeUnit("b"), FakeUnit("c")], behaviour={"a": both.wait, "b": both.wait})
    run_lanes(phase, Lanes(phase, SETTINGS, order=[0, 1, 2], count=2))
    assert sorted(phase.committed) == [("a", ["row of a"]), ("b", ["row of b"]), ("c", ["row of c"])]
    assert phase.threads["a"] != phase.threads["b"]
    assert set(phase.committer) == {threading.current_thread().name}


def test_units_are_taken_in_the_given_order():
    phase = _Phase([FakeUnit(n) for n in "abcd"])
    run_lanes(phase, Lanes(phase, SETTINGS, order=[3, 1, 2, 0], count=1))
    assert [name for name, _ in phase.committed] == ["d", "b", "c", "a"]


def test_an_error_stops_the_taking_commits_what_finished_and_is_raised():
    lanes: list[Lanes] = []
    made = threading.Event()

    def until_stopped() -> None:  # "a" finishes only once "b" has failed and stopped the lanes
        made.wait(10)
        while not lanes[0].idle:
            time.sleep(0.01)

    def bad() -> None:
        raise ValueError("bad tensor b")

    phase = _Phase([FakeUnit(n) for n in "abcd"], behaviour={"a": until_stopped, "b": bad})
    lanes.append(Lanes(phase, SETTINGS, order=[0, 1, 2, 3], count=2))
    made.set()
    with pytest.raises(ValueError, match="bad tensor b"):
        run_lanes(phase, lanes[0])
    assert phase.committed == [("a", ["row of a"])]
    assert set(phase.threads) == {"a", "b"}  # c and d never started


def test_a_signal_commits_what_finished_and_abandons_the_rest():
    release = threading.Event()
    phase = _Phase([FakeUnit(n) for n in "abc"], behaviour={"b": lambda: release.wait(10)})
    lanes = Lanes(phase, SETTINGS, order=[0, 1, 2], count=2)
    real_wait = lanes.wait

    def wait(timeout: float) -> None:  # the signal arrives while the caller waits, once "a" is done
        real_wait(timeout)
        if "c" in phase.threads or any(n == "a" for n, _ in phase.committed):
            raise interrupt.Interrupted(15)

    lanes.wait = wait
    with pytest.raises(interrupt.Interrupted):
        run_lanes(phase, lanes)
    release.set()
    names = [n for n, _ in phase.committed]
    assert "a" in names and "b" not in names


def test_a_base_exception_in_a_lane_is_raised_not_lost_with_its_thread():
    def interrupted() -> None:
        raise KeyboardInterrupt

    phase = _Phase([FakeUnit(n) for n in "abc"], behaviour={"b": interrupted})
    with pytest.raises(KeyboardInterrupt):
        run_lanes(phase, Lanes(phase, SETTINGS, order=[0, 1, 2], count=1))
    assert [n for n, _ in phase.committed] == ["a"]  # what finished before it is committed; c never ran
    assert "c" not in phase.threads
