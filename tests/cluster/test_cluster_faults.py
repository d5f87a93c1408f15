"""Crash and cluster tests with real processes: SIGKILL the driver and resume, lose a node of a
multi-node Ray cluster, and the real `ray start` + `ray job submit` path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from pairs import SHARDS
from raytools import RayHead, start_driver_with_a_slow_unit

ray = pytest.importorskip("ray")

from dgrepair.engine.config import RepairConfig  # noqa: E402
from dgrepair.engine.run.executor import run_repair  # noqa: E402

pytestmark = pytest.mark.slow


def clean_copy(pair, tmp_path: Path) -> Path:
    out = tmp_path / "clean"
    run_repair(RepairConfig.of(base=str(pair.base), ft=str(pair.ft), out=str(out), progress=False, in_process=True))
    return out


def same_bytes(a: Path, b: Path) -> None:
    for shard in SHARDS:
        assert (a / shard).read_bytes() == (b / shard).read_bytes(), shard


def committed_rows(out: Path) -> pd.DataFrame:
    parts = sorted((out / "dgrepair" / "manifest.parquet").glob("part-*.parquet"))
    return pd.concat([pq.read_table(p).to_pandas() for p in parts]) if parts else pd.DataFrame(columns=["tensor"])


def cli(pair, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dgrepair", "repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out",
            str(out), "--executor", "ray", "--workers", "2", "--no-progress", "--commit-interval-s", "0", *extra]


def start_slowed_driver(pair, out: Path, committed: int) -> subprocess.Popen:
    """`dgrepair repair` on Ray in its own session, each unit slowed; returns once `committed`
    tensors are in the manifest and the run is still going."""
    env = {**os.environ, "DGREPAIR_FAULT_UNIT_DELAY": "0.4"}
    proc = subprocess.Popen(cli(pair, out), env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "dgrepair" / "manifest.parquet").is_dir() and committed_rows(out).tensor.nunique() >= committed:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stdout.read().decode()[-3000:]
    return proc


@pytest.mark.parametrize("kill_after", [1, 8, 16])  # committed tensors before the kill: early, middle, late
def test_sigkill_driver_then_resume(pair, tmp_path, kill_after):
    clean = clean_copy(pair, tmp_path)
    out = tmp_path / "out"
    proc = start_slowed_driver(pair, out, kill_after)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only
    proc.wait()
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # then the local Ray it had started (a real crash loses it too)
    before = committed_rows(out)
    assert before.tensor.nunique() >= kill_after
    assert not (out / "dgrepair" / "summary.json").exists()
    done = subprocess.run(cli(pair, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = committed_rows(out)
    per = after[after.expert.isna() | (after.expert == 0)].groupby("tensor").size()
    assert all(per[t] == 1 for t in before.tensor.unique())  # committed before the kill: not recomputed
    same_bytes(clean, out)
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["resumed_entries"] == before.tensor.nunique()


def test_node_removed_mid_run(pair, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster


    clean = clean_copy(pair, tmp_path)
    for key, value in {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                       "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}.items():
        monkeypatch.setenv(key, value)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 << 20) for _ in range(3)]
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        config = RepairConfig.of(base=str(pair.base), ft=str(pair.ft), out=str(tmp_path / "out"), progress=False,
                              workers=2, threads=1)
        driver, result, _, node_id = start_driver_with_a_slow_unit(config, tmp_path / "sleeping", monkeypatch, 60)
        victim = next(n for n in nodes if n.node_id == node_id)
        cluster.remove_node(victim, allow_graceful=False)
        driver.join(timeout=180)
        assert not driver.is_alive()
        assert result["summary"]["executor"]["requeued_units"] >= 1
        same_bytes(clean, tmp_path / "out")
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.skipif(shutil.which("ray") is None, reason="ray CLI not installed")
def test_ray_job_submit_with_token_auth_end_to_end(pair, tmp_path):
    """A head in token mode the way a user starts one (RAY_AUTH_TOKEN exported, RAY_AUTH_MODE not),
    `ray job submit` of `dgrepair repair` with the two variables the docs name (the job's RAY_ADDRESS
    makes `--executor auto` join the cluster; `python -m dgrepair.cluster.job` always does), and a direct
    --address run without a
    token that must fail with the exact variables to export. Only this head's processes are stopped."""
    import secrets

    clean = clean_copy(pair, tmp_path)
    out = tmp_path / "out"
    config = tmp_path / "repair.yaml"
    config.write_text(yaml.safe_dump({"base": str(pair.base), "ft": str(pair.ft), "out": str(out), "workers": 2,
                                      "progress": False, "progress_interval_s": 1}))
    token = secrets.token_hex(32)
    home = tmp_path / "home"  # no ~/.ray/auth_token of the user's leaks into the test
    home.mkdir()
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    clean_env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    with RayHead(tmp_path, {**clean_env, "RAY_AUTH_TOKEN": token}) as head:
        no_token = subprocess.run([sys.executable, "-m", "dgrepair.cluster.job", "--config", str(config),
                                   "--address", head.address], env=clean_env, capture_output=True, text=True,
                                  timeout=300)
        assert no_token.returncode == 2, no_token.stderr[-3000:]
        assert "Traceback" not in no_token.stderr
        assert "export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN=<token>" in no_token.stderr
        assert "RAY_AUTH_MODE is unset here and no token was found" in no_token.stderr
        assert not out.exists() or not (out / "dgrepair" / "summary.json").exists()

        env = {**clean_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        submit = subprocess.run(["ray", "job", "submit", f"--address={head.dashboard}",
                                 f"--submission-id=dgrepair-test-{head.gcs}", "--", sys.executable, "-m",
                                 "dgrepair", "repair", "--config", str(config)],  # as deploy/'s RayJobs run it
                                env=env, capture_output=True, text=True, timeout=300)
        logs = submit.stdout + submit.stderr
        assert submit.returncode == 0, logs[-3000:]
        assert f"Job 'dgrepair-test-{head.gcs}' succeeded" in logs
        assert f"connecting to Ray cluster {head.address}" in logs
        summary = json.loads((out / "dgrepair" / "summary.json").read_text())
        assert summary["executor"]["kind"] == "ray" and summary["executor"]["workers"] == 2
        assert summary["executor"]["address"] == head.address
        same_bytes(clean, out)
        # the same job again: it says there is nothing to do instead of claiming a repair
        again = subprocess.run(["ray", "job", "submit", f"--address={head.dashboard}",
                                f"--submission-id=dgrepair-test-{head.gcs}-a2", "--", sys.executable, "-m",
                                "dgrepair.cluster.job", "--config", str(config)],
                               env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        assert f"already complete (plan {summary['plan_id']}): nothing to do" in again.stdout + again.stderr
    assert head.processes() == []


def test_sigterm_commits_finished_work_and_exits_143_then_resumes(pair, tmp_path):
    """`ray job stop` sends SIGTERM to the driver: it commits what is done, exits 143, and the same
    command resumes."""
    clean = clean_copy(pair, tmp_path)
    out = tmp_path / "out"
    proc = start_slowed_driver(pair, out, 2)
    part = out / "dgrepair" / "partial"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    committed = committed_rows(out).tensor.nunique()
    assert committed >= 2 and part.is_dir() and not (out / "dgrepair" / "summary.json").exists()
    done = subprocess.run(cli(pair, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    same_bytes(clean, out)
    assert json.loads((out / "dgrepair" / "summary.json").read_text())["resumed_entries"] == committed
