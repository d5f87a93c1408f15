"""Ray overhead and scaling: the same repair in-process, on Ray with 1 worker, and on Ray with 2
workers, on a small pair and on the ~1.1B synthetic pair, in one run (ratios are same-run).

    python bench/ray_overhead.py --layers 22
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dgrepair.engine.demo.synthetic import SyntheticSpec, tinyllama_spec, write_pair


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--workdir", default="bench/_work_ray")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    pairs = {"small (demo shapes, 2.0M params, F32)": SyntheticSpec(),
             f"tinyllama x{args.layers} layers ({tinyllama_spec(args.layers).n_params() / 1e9:.2f}B params, BF16)":
             tinyllama_spec(args.layers)}
    for label, spec in pairs.items():
        work = Path(args.workdir) / label.split()[0]
        shutil.rmtree(work, ignore_errors=True)
        write_pair(work, spec)
        base = [sys.executable, "-m", "dgrepair", "repair", "--base", str(work / "base"), "--ft", str(work / "ft"),
                "--no-progress"]
        times = {}
        for name, extra in (("in-process", ["--in-process"]), ("ray 1 worker", ["--executor", "ray", "--workers", "1"]),
                            ("ray 2 workers", ["--executor", "ray", "--workers", "2"])):
            out = work / name.replace(" ", "-")
            times[name] = run([*base, "--out", str(out), *extra])
            shutil.rmtree(out, ignore_errors=True)
        print(f"{label}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
        print(f"  ray 1 worker / in-process = {times['ray 1 worker'] / times['in-process']:.2f}; "
              f"ray 2 workers / ray 1 worker = {times['ray 2 workers'] / times['ray 1 worker']:.2f}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
