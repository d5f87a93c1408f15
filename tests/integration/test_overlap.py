"""Overlap of a worker's units (engine/run/pipeline.py): the next unit reads while one computes, the
kernels run one unit at a time in unit order, results are committed in unit order, and the output
bytes are the same with and without it; and the local executor's lanes (engine/run/lanes.py).
Proven from recorded phase events, never from wall times."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pairs import SHARDS
from traces import never_two_computing, one_after_another, overlapped, read_trace

from dgrepair.cli import main
from dgrepair.engine.config import RepairConfig
from dgrepair.engine.io.checkpoint import open_checkpoint
from dgrepair.engine.plan.build import build_plan
from dgrepair.engine.plan.units import make_units, runs_alone, unit_budget
from dgrepair.engine.run.pipeline import Hooks, Turns, run_overlapped
from dgrepair.kernels.threads import available_cores


def repair(pair, out: Path, *extra: str) -> int:
    return main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--no-progress",
                 "--in-process", *extra])


def test_reads_overlap_the_kernels_and_the_bytes_are_the_same_without_overlap(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("DGREPAIR_FAULT_SLOW_LOAD", "0.4")  # a slow read: each unit's load takes 0.4 s longer
    traces = {}
    for mode, flags in (("on", ("--overlap",)), ("off", ("--no-overlap", "--workers", "1"))):
        traces[mode] = tmp_path / f"trace-{mode}"
        monkeypatch.setenv("DGREPAIR_TRACE_UNITS", str(traces[mode]))
        assert repair(pair, tmp_path / mode, *flags) == 0
    on, off = read_trace(traces["on"]), read_trace(traces["off"])
    # with overlap: units start in pairs, so about every other unit had the next one reading meanwhile
    assert len(overlapped(on)) >= 2, on
    assert never_two_computing(on)  # the kernels never run for two units at once
    starts = [int(u) for _, u, e in on if e == "compute"]
    assert starts == sorted(starts)  # in unit order
    assert one_after_another(off) and overlapped(off) == []  # without: strictly one unit after the other
    for shard in SHARDS:
        assert (tmp_path / "on" / shard).read_bytes() == (tmp_path / "off" / shard).read_bytes(), shard
    for name in ("model.safetensors.index.json",):
        assert (tmp_path / "on" / name).read_bytes() == (tmp_path / "off" / name).read_bytes()


def test_lanes_run_units_side_by_side_with_the_bytes_of_one_lane(pair, tmp_path, monkeypatch):
    """The local executor's default on the CPU: one lane per worker, each unit in one lane; with two
    lanes a second unit reads while the first is still in flight, and the bytes equal one lane's."""
    monkeypatch.setenv("DGREPAIR_FAULT_SLOW_LOAD", "0.4")
    traces = {}
    for lanes in ("1", "2"):
        traces[lanes] = tmp_path / f"trace-{lanes}"
        monkeypatch.setenv("DGREPAIR_TRACE_UNITS", str(traces[lanes]))
        assert repair(pair, tmp_path / lanes, "--workers", lanes) == 0
        executor = json.loads((tmp_path / lanes / "dgrepair" / "summary.json").read_text())["executor"]
        assert (executor["kind"], executor["lanes"], executor["threads_per_lane"]) == (
            "in-process", int(lanes), max(1, available_cores() // int(lanes)))  # the cores split between them
    one, two = read_trace(traces["1"]), read_trace(traces["2"])
    assert one_after_another(one)
    assert len(overlapped(two)) >= 2, two
    for shard in SHARDS:
        assert (tmp_path / "1" / shard).read_bytes() == (tmp_path / "2" / shard).read_bytes(), shard


def test_a_slow_write_is_off_the_critical_path(pair, tmp_path, monkeypatch):
    """With a slow store, the next unit's kernels start before the previous unit has finished writing."""
    monkeypatch.setenv("DGREPAIR_FAULT_SLOW_STORE", "0.4")
    trace = tmp_path / "trace"
    monkeypatch.setenv("DGREPAIR_TRACE_UNITS", str(trace))
    assert repair(pair, tmp_path / "out", "--overlap") == 0
    events = read_trace(trace)
    assert overlapped(events, before="compute", until="stored"), events


def fake_units(n: int, log: list[str], lock: threading.Lock, fail: int | None = None):
    def work(unit: int, phases):
        with lock:
            log.append(f"load {unit}")
        if unit == fail:
            raise ValueError(f"unit {unit} is bad")
        result = phases.compute(lambda: log.append(f"compute {unit}") or unit * 10)
        with lock:
            log.append(f"store {unit}")
        return result
    return list(range(n)), work


def test_errors_commit_the_units_before_and_start_no_more():
    log: list[str] = []
    committed: list[tuple[int, int]] = []
    units, work = fake_units(6, log, threading.Lock(), fail=2)
    with pytest.raises(ValueError, match="unit 2 is bad"):
        run_overlapped(units, work, lambda u, r: committed.append((u, r)))
    assert committed == [(0, 0), (1, 10)]
    assert "load 4" not in log and "compute 2" not in log


def test_a_unit_that_runs_alone_has_no_other_unit_beside_it():
    log: list[str] = []
    lock = threading.Lock()
    units, work = fake_units(5, log, lock)
    committed: list[int] = []
    run_overlapped(units, work, lambda u, r: committed.append(u), alone=lambda u: u == 2)
    assert committed == [0, 1, 2, 3, 4]
    at = log.index("load 2")
    assert {"store 0", "store 1"} <= set(log[:at])  # everything before it had finished
    assert log.index("load 3") > log.index("store 2")  # and nothing started beside it


def test_turns_serve_the_oldest_unit_and_wait_for_an_older_one_still_loading():
    t = Turns()
    for k in "abc":
        t.begin(k)
    t.want("b")
    assert t.next() is None  # a is older and still loading
    t.want("a")
    assert t.next() == "a"
    t.start("a")
    assert t.next() is None  # one at a time
    t.done("a")
    assert t.next() == "b"
    t.end("a")
    t.start("b")
    t.done("b")
    t.want("c")
    assert t.next() == "c"


def test_hooks_are_read_from_the_environment():
    h = Hooks.from_env({"DGREPAIR_TRACE_UNITS": "/x", "DGREPAIR_FAULT_SLOW_LOAD": "1.5"})
    assert (h.trace, h.slow_load_s, h.slow_store_s) == ("/x", 1.5, 0.0)
    assert Hooks.from_env({}) == Hooks()


def test_with_overlap_units_get_half_the_budget_and_large_ones_run_alone(pair):
    plan = build_plan(open_checkpoint(pair.base, "base"), open_checkpoint(pair.ft, "ft"), RepairConfig())
    budget = 2 * 16 * 64 * 64  # room for two 64x64 matrices (q_proj of both layers)

    def sizes(units):
        return sorted(len(u.entries) for u in units if u.entries[0].matrix_shape == (64, 64))

    whole, half = make_units(plan.entries, budget), make_units(plan.entries, unit_budget(budget, 2))
    assert max(sizes(whole)) == 2 and max(sizes(half)) == 1
    alone = [u.entries[0].name for u in half if runs_alone(u, budget)]
    assert alone and all(u.working_bytes > budget for u in half if u.entries[0].name in alone)
    assert "model.embed_tokens.weight" in alone  # 160 x 64: above two 64 x 64 matrices
