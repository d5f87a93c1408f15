"""What a run says, captured from real output: the periodic progress line off a terminal, that
the default on one CPU machine starts no Ray, the start-up line while Ray starts, worker deaths and
requeues, "resuming: ...", "already complete"; and the embedded Ray of `dgrepair repair
--executor ray` listens on loopback only."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dgrepair.cli import main
from dgrepair.engine.run.progress import Progress, progress_line
from dgrepair.kernels.threads import available_cores


def test_progress_line_hand_worked():
    line = progress_line("repair", 12, 40, 1.5 * 2**30, 3 * 2**30, 10.0)
    assert line == "repair: 12/40 tensors, 1.5 GiB/3.0 GiB, 153.6 MiB/s, ETA 0:00:10"
    assert progress_line("repair", 0, 4, 0, 100, 0.0) == "repair: 0/4 tensors, 0 B/100 B, 0 B/s, ETA unknown"


def test_progress_prints_lines_off_a_terminal_and_nothing_when_disabled():
    out = io.StringIO()  # not a TTY
    p = Progress("repair", 300, 3, 0, True, 1e-9, out)
    for _ in range(3):
        p.update(100, 1)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("repair: 1/3 tensors, 100 B/300 B, ")
    assert lines[-1].startswith("repair: 3/3 tensors, 300 B/300 B, ") and len(lines) == 4  # 3 ticks + close
    quiet = io.StringIO()
    q = Progress("repair", 300, 3, 0, False, 1e-9, quiet)
    q.update(300, 3)
    q.close()
    assert quiet.getvalue() == ""


def test_the_default_on_one_cpu_machine_runs_locally_and_a_rerun_says_nothing_to_do(pair, tmp_path, capsys,
                                                                                      monkeypatch):
    """No flags, no RAY_ADDRESS, the CPU: `--executor auto` runs the local lanes (ADR 0019), no Ray."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    args = ["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "repaired " in first.out and "Ray" not in first.err
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["config"]["executor"] == "auto"
    assert summary["executor"]["kind"] == "in-process" and summary["executor"]["lanes"] == available_cores()
    plan_id = summary["plan_id"]
    assert main(args) == 0
    again = capsys.readouterr()
    assert again.out.strip() == f"already complete (plan {plan_id}): nothing to do; output {out}"
    assert "already complete" not in again.err  # said once, on stdout
    assert "repaired" not in again.out


def _listening(pids: set[int]) -> list[tuple[str, str, int]]:
    import psutil

    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.slow
def test_embedded_ray_is_loopback_only_and_the_run_speaks(pair, tmp_path):
    """Run 1 (embedded Ray, a poison tensor and a slow unit): while the slow unit sleeps, every
    listening socket of the run's own processes is on loopback; the output names the start-up, a
    progress line, each worker death and the requeue, and exits 3. Run 2 resumes and says so; run 3
    says there is nothing to do."""
    import psutil

    from dgrepair.engine.config import RepairConfig
    from dgrepair.engine.run.inputs import load_inputs

    out = tmp_path / "out"
    poison = "model.layers.1.self_attn.q_proj.weight"
    cmd = [sys.executable, "-m", "dgrepair.cli", "repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out",
           str(out), "--executor", "ray", "--workers", "2", "--threads", "1", "--progress-interval-s", "1"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "DGREPAIR_FAULT_CRASH_ON": poison,
           "DGREPAIR_FAULT_UNIT_DELAY": "0.5"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline, sockets = time.monotonic() + 180, []
        while time.monotonic() < deadline and proc.poll() is None:
            pids = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            sockets = _listening(pids)
            if {"gcs_server", "raylet"} <= {name for name, _, _ in sockets} and \
                    sum(name.startswith(("python", "ray::")) for name, _, _ in sockets) >= 2:
                break
            time.sleep(0.3)
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in sockets}, sockets  # the run's own servers
        assert [s for s in sockets if not _is_loopback(s[1])] == []
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 3, stderr[-3000:]
    assert "dgrepair: starting a local Ray on 127.0.0.1 (loopback only; takes a few seconds) ..." in stderr
    assert "dgrepair: Ray ready after " in stderr and ": 127.0.0.1:" in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("repair: ") and " tensors, " in line]
    assert lines and all("/s, ETA " in line for line in lines), stderr[-3000:]
    assert re.search(rf"^dgrepair: unit {re.escape(poison)} on worker \d: worker died: \w+; requeued \(attempt 2 "
                     r"of 3\)$", stderr, re.M), stderr[-3000:]
    assert re.search(rf"^dgrepair: unit {re.escape(poison)} on worker \d: worker died: \w+; marked failed$", stderr,
                     re.M)

    plan = load_inputs(RepairConfig.of(base=str(pair.base), ft=str(pair.ft), out=str(out)), need_out=False).plan
    total = len(plan.entries)
    env = {k: v for k, v in env.items() if not k.startswith("DGREPAIR_FAULT")}
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = re.search(r"^dgrepair: resuming: (\d+) of (\d+) entries verified on disk, (\d+) to do$", resumed.stderr,
                     re.M)
    assert said, resumed.stderr[-3000:]
    done, of, todo = map(int, said.groups())
    assert of == total and done + todo == total and 1 <= todo < total  # the poison tensor at least
    assert f"repair: {total}/{total} tensors, " in resumed.stderr
    summary = json.loads((Path(out) / "dgrepair" / "summary.json").read_text())
    assert summary["executor"]["address"].startswith("127.0.0.1:")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip() == f"already complete (plan {summary['plan_id']}): nothing to do; output {out}"
    assert "starting a local Ray" not in again.stderr  # nothing to do: Ray is not even started
