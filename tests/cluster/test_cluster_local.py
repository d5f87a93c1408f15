"""The Ray driver on a real local Ray (2 CPUs): byte-identical to the in-process engine whatever the
number of workers, survives an actor killed mid-unit, and contains a poison tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pairs import SHARDS
from raytools import start_driver_with_a_slow_unit

ray = pytest.importorskip("ray")

from dgrepair.cluster.driver import NAMESPACE, run_distributed  # noqa: E402
from dgrepair.cluster.worker import actor_name  # noqa: E402
from dgrepair.engine.config import RepairConfig  # noqa: E402
from dgrepair.engine.errors import RepairFailure  # noqa: E402
from dgrepair.engine.run.executor import run_repair  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from dgrepair.cluster.session import loopback_only

    with loopback_only():  # like the embedded Ray of `dgrepair repair`: nothing listens beyond 127.0.0.1
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20,
                 logging_level="ERROR", _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def cfg(pair, out: Path, **kw) -> RepairConfig:
    return RepairConfig.of(base=str(pair.base), ft=str(pair.ft), out=str(out), progress=False, **kw)


def same_bytes(a: Path, b: Path) -> None:
    for shard in SHARDS:
        assert (a / shard).read_bytes() == (b / shard).read_bytes(), shard
    assert (a / "model.safetensors.index.json").read_bytes() == (b / "model.safetensors.index.json").read_bytes()


def test_two_workers_one_worker_and_in_process_write_identical_bytes(pair, tmp_path):
    run_repair(cfg(pair, tmp_path / "engine", in_process=True))
    two = run_distributed(cfg(pair, tmp_path / "two", workers=2))
    run_distributed(cfg(pair, tmp_path / "one", workers=1))
    same_bytes(tmp_path / "engine", tmp_path / "two")
    same_bytes(tmp_path / "engine", tmp_path / "one")
    assert two["executor"]["kind"] == "ray" and two["executor"]["workers"] == 2
    assert sum(n["tensors"] for n in two["executor"]["per_node"].values()) == len(pair.ft_tensors)
    m = pd.read_parquet(tmp_path / "two" / "dgrepair" / "manifest.parquet")
    assert m.node.str.len().min() > 0 and len(m) == len(pd.read_parquet(tmp_path / "engine" / "dgrepair" /
                                                                           "manifest.parquet"))


def test_actor_killed_mid_unit_is_replaced_and_the_output_is_identical(pair, tmp_path, monkeypatch):
    from dgrepair.engine.io.checkpoint import open_checkpoint
    from dgrepair.engine.plan.build import build_plan

    run_repair(cfg(pair, tmp_path / "clean", in_process=True))
    config = cfg(pair, tmp_path / "out", workers=2)
    driver, result, index, _ = start_driver_with_a_slow_unit(config, tmp_path / "sleeping", monkeypatch, 30)
    plan_id = build_plan(open_checkpoint(pair.base, "b"), open_checkpoint(pair.ft, "f"), config).plan_id
    ray.kill(ray.get_actor(actor_name(plan_id, index), namespace=NAMESPACE), no_restart=False)
    driver.join(timeout=120)
    assert not driver.is_alive()
    assert result["summary"]["executor"]["requeued_units"] >= 1
    same_bytes(tmp_path / "clean", tmp_path / "out")


def test_poison_tensor_fails_alone_and_a_rerun_finishes(pair, tmp_path, monkeypatch):
    run_repair(cfg(pair, tmp_path / "clean", in_process=True))
    poison = "model.layers.1.self_attn.q_proj.weight"  # batched with other 64x64 matrices at first
    monkeypatch.setenv("DGREPAIR_FAULT_CRASH_ON", poison)
    out = tmp_path / "out"
    with pytest.raises(RepairFailure, match=poison) as info:
        run_distributed(cfg(pair, out, workers=2, max_attempts=2))
    assert info.value.exit_code == 3
    report = json.loads((out / "dgrepair" / "failures.json").read_text())
    assert [f["tensors"] for f in report["failed"]] == [[poison]] and report["failed"][0]["attempts"] == 2
    assert not (out / "dgrepair" / "summary.json").exists() and not (out / "model.safetensors.index.json").exists()
    committed = set(pd.read_parquet(out / "dgrepair" / "manifest.parquet").tensor)
    assert committed == set(pair.ft_tensors) - {poison}  # everything else finished
    monkeypatch.delenv("DGREPAIR_FAULT_CRASH_ON")
    summary = run_distributed(cfg(pair, out, workers=2))
    assert summary["resumed_entries"] == len(pair.ft_tensors) - 1
    assert not (out / "dgrepair" / "failures.json").exists()
    same_bytes(tmp_path / "clean", out)


def test_bad_input_found_by_a_worker_stops_the_run_with_the_engine_error(tmp_path):
    from ckpt import write_nan_pair

    base, ft = write_nan_pair(tmp_path)
    c = RepairConfig.of(base=str(base), ft=str(ft), out=str(tmp_path / "o"), progress=False)
    with pytest.raises(RepairFailure, match="w.weight.*NaN/Inf"):
        run_distributed(c)
    assert not (tmp_path / "o" / "dgrepair" / "summary.json").exists()


def test_oversubscribed_workers_and_threads_still_complete(pair, tmp_path):
    # 4 workers x 2 threads on 2 CPUs: every actor must still be schedulable (fractional CPUs)
    run_repair(cfg(pair, tmp_path / "engine", in_process=True))
    summary = run_distributed(cfg(pair, tmp_path / "four", workers=4, threads=2))
    assert summary["executor"]["workers"] == 4
    same_bytes(tmp_path / "engine", tmp_path / "four")


def test_unit_past_its_deadline_gets_its_worker_restarted_and_is_requeued(pair, tmp_path, monkeypatch):
    run_repair(cfg(pair, tmp_path / "clean", in_process=True))
    marker = tmp_path / "sleeping"
    monkeypatch.setenv("DGREPAIR_FAULT_SLEEP_ON", f"model.layers.0.mlp.experts.down_proj:120:{marker}")
    summary = run_distributed(cfg(pair, tmp_path / "out", workers=2, unit_timeout_s=3.0))
    assert marker.exists()  # the first attempt did hang
    assert summary["executor"]["requeued_units"] >= 1
    same_bytes(tmp_path / "clean", tmp_path / "out")


def test_poison_fp8_weight_fails_together_with_its_scales(tmp_path, monkeypatch):
    from pairs import fp8_pair

    fp8_pair(tmp_path)
    weight = "model.layers.0.mlp.down_proj.weight"
    c = RepairConfig.of(base=str(tmp_path / "base"), ft=str(tmp_path / "ft"), out=str(tmp_path / "out"),
                     progress=False, workers=2, max_attempts=2)
    monkeypatch.setenv("DGREPAIR_FAULT_CRASH_ON", weight)
    with pytest.raises(RepairFailure, match=weight):
        run_distributed(c)
    report = json.loads((tmp_path / "out" / "dgrepair" / "failures.json").read_text())
    assert [sorted(f["tensors"]) for f in report["failed"]] == [[weight, weight + "_scale_inv"]]
    monkeypatch.delenv("DGREPAIR_FAULT_CRASH_ON")
    run_distributed(c)
    run_repair(RepairConfig.of(base=str(tmp_path / "base"), ft=str(tmp_path / "ft"), out=str(tmp_path / "clean"),
                            progress=False, in_process=True))
    for shard in ("a.safetensors", "b.safetensors"):
        assert (tmp_path / "out" / shard).read_bytes() == (tmp_path / "clean" / shard).read_bytes()


@pytest.mark.parametrize("method,kw", [("dare", {"drop_prob": 0.3, "dare_rescale": False, "target_rho": 0.7}),
                                       ("dg_hard", {"target_rho": 0.9, "emit_adapter": "ADAPTER"})])
def test_methods_target_rho_and_adapter_on_ray_match_the_in_process_engine(pair, tmp_path, method, kw):
    """The calibration pass and the method run on the actors; bytes, knob and adapter equal in-process."""
    def with_dir(name):
        return {**kw, "emit_adapter": str(tmp_path / name)} if "emit_adapter" in kw else kw

    engine = run_repair(cfg(pair, tmp_path / "engine", in_process=True, method=method, **with_dir("ad-engine")))
    ray_run = run_distributed(cfg(pair, tmp_path / "ray", workers=2, method=method, **with_dir("ad-ray")))
    same_bytes(tmp_path / "engine", tmp_path / "ray")
    assert ray_run["target_rho"]["value"] == engine["target_rho"]["value"]
    assert abs(ray_run["totals"]["global_rho"] - kw["target_rho"]) < (1e-3 if method == "dare" else 0.05)
    if "emit_adapter" in kw:
        assert ((tmp_path / "ad-engine" / "adapter_model.safetensors").read_bytes()
                == (tmp_path / "ad-ray" / "adapter_model.safetensors").read_bytes())


@pytest.mark.parametrize("overlap", [True, False])
def test_an_actor_reads_the_next_unit_while_one_computes_and_writes_the_same_bytes(pair, tmp_path, monkeypatch,
                                                                                   overlap):
    from traces import never_two_computing, one_after_another, overlapped, read_trace

    run_repair(cfg(pair, tmp_path / "clean", in_process=True))
    trace = tmp_path / "trace"
    monkeypatch.setenv("DGREPAIR_TRACE_UNITS", str(trace))
    monkeypatch.setenv("DGREPAIR_FAULT_SLOW_LOAD", "0.4")  # a slow read on every unit
    run_distributed(cfg(pair, tmp_path / "out", workers=1, overlap=overlap))
    events = read_trace(trace)
    assert len({pid for pid, _, _ in events}) == 1  # one actor ran them all
    assert never_two_computing(events)
    if overlap:
        assert len(overlapped(events)) >= 2, events
    else:
        assert one_after_another(events) and overlapped(events) == []
    same_bytes(tmp_path / "clean", tmp_path / "out")


def test_an_actor_lost_with_two_units_in_flight_has_both_redone(pair, tmp_path, monkeypatch):
    import os
    import signal
    import threading
    import time

    from traces import read_trace

    run_repair(cfg(pair, tmp_path / "clean", in_process=True))
    trace = tmp_path / "trace"
    monkeypatch.setenv("DGREPAIR_TRACE_UNITS", str(trace))
    monkeypatch.setenv("DGREPAIR_FAULT_SLOW_LOAD", "1.5")
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(summary=run_distributed(
        cfg(pair, tmp_path / "out", workers=1, overlap=True))))
    driver.start()
    deadline, lost, pid = time.monotonic() + 120, set(), None
    while time.monotonic() < deadline and len(lost) < 2:
        running: dict[str, set[str]] = {}
        for p, unit, event in read_trace(trace):
            if event == "load":
                running.setdefault(p, set()).add(unit)
            elif event == "stored":
                running.get(p, set()).discard(unit)
        pid, lost = next(((p, units) for p, units in running.items() if len(units) >= 2), (None, set()))
        time.sleep(0.02)
    assert pid is not None, "never saw two units in flight on the actor"
    os.kill(int(pid), signal.SIGKILL)  # the actor process dies with both units half done
    driver.join(timeout=240)
    assert not driver.is_alive() and "summary" in result
    assert result["summary"]["executor"]["requeued_units"] >= 2
    after = read_trace(trace)
    for unit in lost:
        assert not any(p == pid and u == unit and e == "stored" for p, u, e in after)  # the first try died
        assert any(p != pid and u == unit and e == "stored" for p, u, e in after), unit  # redone elsewhere
    same_bytes(tmp_path / "clean", tmp_path / "out")
