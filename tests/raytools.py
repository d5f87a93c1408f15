"""Helpers for the Ray tests: a driver running in a background thread, stopped mid-unit on cue."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

SLOW_TENSOR = "model.layers.0.mlp.experts.down_proj"


def start_driver_with_a_slow_unit(config, marker: Path, monkeypatch, seconds: int, timeout: float = 90.0
                                  ) -> tuple[threading.Thread, dict[str, Any], int, str]:
    """Run the Ray driver in a thread with the SLOW_TENSOR unit sleeping on its first attempt; return
    once that unit is asleep, with (thread, result holder, actor index, node id) of the sleeper."""
    from dgrepair.cluster.driver import run_distributed

    monkeypatch.setenv("DGREPAIR_FAULT_SLEEP_ON", f"{SLOW_TENSOR}:{seconds}:{marker}")
    result: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: result.update(summary=run_distributed(config)))
    driver.start()
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the slow unit never started"
    time.sleep(0.3)  # the marker is written just before the sleep starts
    index, node_id = marker.read_text().split()
    return driver, result, int(index), node_id


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A `ray start --head` on 127.0.0.1 with its own temp dir and ports, stopped by its own PIDs.

    `ray stop` (with or without --force) stops every Ray process of the user on the machine; this
    stops only the processes whose command line names this head's temp dir, and their children
    (the job supervisor's driver, the workers)."""

    def __init__(self, root: Path, env: dict[str, str], num_cpus: int = 2) -> None:
        import tempfile

        # Ray's socket paths must stay short (AF_UNIX limit); pytest's tmp_path can be too long.
        self.temp_dir = tempfile.mkdtemp(prefix="dgr-ray-", dir="/tmp")
        self.root, self.env, self.num_cpus = root, env, num_cpus
        self.gcs, self.dash = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"

    def start(self) -> None:
        import subprocess

        ports = [free_port() for _ in range(6)]
        cmd = ["ray", "start", "--head", f"--port={self.gcs}", "--node-ip-address=127.0.0.1",
               f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dash}", f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
               f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
               f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
               f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
               "--min-worker-port=0", "--max-worker-port=0"]
        # Ray maps 127.0.0.1 to the host's address unless it treats the host as single-node.
        env = {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            self.stop()
            raise AssertionError(done.stdout + done.stderr)

    def processes(self) -> list:
        import psutil

        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.temp_dir in " ".join(p.info["cmdline"] or []):
                    roots.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def stop(self) -> None:
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)

    def __enter__(self) -> RayHead:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
