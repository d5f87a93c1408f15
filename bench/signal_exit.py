"""How long dgrepair takes to exit after SIGTERM/SIGINT, per phase and executor (prints, asserts nothing).

Each case starts the real CLI through tests/phase_run.py, waits until it reaches the phase, sends the
signal (to the process group, as systemd and `ray job stop` do) and times signal -> exit. The test
pair is the suite's small one; the bound documented in docs/operations.md is what these add to the
time of one native call (one SVD block, one `ray.wait` tick).

    python bench/signal_exit.py [--ray]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def one(phase: str, sig: int, ray: bool, work: Path) -> tuple[int, float]:
    sys.path.insert(0, str(TESTS))
    from conftest import make_pair

    root = Path(tempfile.mkdtemp(dir=work))
    pair = make_pair(root)
    marker = root / "marker"
    argv = ["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(root / "out"), "--no-progress",
            *(["--executor", "ray", "--workers", "2"] if ray else ["--in-process"])]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, str(TESTS / "phase_run.py"), phase, str(marker), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    while not marker.exists():
        time.sleep(0.02)
    if phase == "startup":
        time.sleep(1.0)
    t0 = time.perf_counter()
    os.killpg(proc.pid, sig)
    code = proc.wait()
    return code, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ray", action="store_true", help="also time the Ray driver")
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as work:
        cases = [("in-process", p, False) for p in ("planning", "dispatch", "finalising")]
        if a.ray:
            cases += [("ray", p, True) for p in ("planning", "startup", "dispatch", "finalising")]
        for executor, phase, ray in cases:
            for sig in (signal.SIGTERM, signal.SIGINT):
                code, seconds = one(phase, sig, ray, Path(work))
                print(f"{executor:<10} {phase:<10} {signal.Signals(sig).name:<7} exit {code:>3}  "
                      f"{seconds:6.2f} s signal -> exit")


if __name__ == "__main__":
    main()
