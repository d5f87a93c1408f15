"""The Ray driver's deadline accounting with units queued behind others on one actor (cluster/driver.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from dgrepair.cluster.driver import _chain, _Flight  # noqa: E402


def test_a_queued_unit_is_not_charged_for_waiting_behind_the_one_before_it():
    a, b, c = _Flight(1, actor=0, allowance=10.0), _Flight(2, actor=0, allowance=5.0), _Flight(3, actor=1,
                                                                                               allowance=7.0)
    flights = [a]
    _chain(flights, 0, now=100.0)
    assert a.deadline == 110.0
    flights.append(b)
    _chain(flights, 0, now=101.0)
    assert (a.deadline, b.deadline) == (110.0, 115.0)  # b's allowance starts when a is due
    flights.append(c)
    _chain(flights, 1, now=102.0)
    assert (b.deadline, c.deadline) == (115.0, 109.0)  # another actor: its own clock
    flights.remove(a)  # a ends early: b's turn has come now
    _chain(flights, 0, now=104.0)
    assert b.deadline == 109.0
    _chain(flights, 0, now=200.0)
    assert b.deadline == 109.0  # a deadline never moves later


def test_a_unit_killed_past_its_deadline_does_not_hold_back_the_next():
    dead, nxt = _Flight(1, actor=0, allowance=10.0, expired=True), _Flight(2, actor=0, allowance=5.0)
    _chain([dead, nxt], 0, now=50.0)
    assert dead.deadline == float("inf") and nxt.deadline == 55.0
