"""dgrepair against the paper's own tool (`dghard repair`, installed separately) on the same
synthetic BF16 TinyLlama-shaped pairs, in one sitting.

Each round runs both tools once (and each `--variant` of dgrepair, e.g. `--executor ray`), reversing
the order every other round, so a load change on a shared machine hits all; before every run, untimed,
it flushes the previous run's writes (`sync`) and re-reads the inputs (`settle`). It prints every
wall time with the 1-minute load average before and after, the median ratio, a kept-rank comparison
per matrix (dgrepair's manifest against dghard's --report), and where dgrepair's time goes: Ray
start-up (a bare `ray.init` + one actor + shutdown, measured alone) and, from one in-process run
with one lane of one thread under timers, reads, Gram, eigen, projection, writes and the rest
(upcast, subtract, cast, hashing, plan). Asserts nothing.

    python bench/vs_paper.py --dghard /path/to/venv/bin/dghard --layers 8 --rounds 3
    python bench/vs_paper.py --dghard /path/to/venv/bin/dghard --layers 22 --rounds 2 --variant "ray=--executor ray"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from dgrepair.engine.demo.synthetic import tinyllama_spec, write_pair

PROFILE = r"""
import json, sys, time
from collections import defaultdict
from dgrepair.engine import config
from dgrepair.engine.run import executor, repair_step
from dgrepair.kernels import linalg
spent = defaultdict(float)
def timed(owner, name, label):
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[label] += time.perf_counter() - t0
    setattr(owner, name, wrapper)
timed(repair_step, "read_tensor", "reads")
timed(repair_step, "pwrite", "writes")
timed(linalg, "gram", "gram")
timed(linalg.GramEigen, "__init__", "eigen")
timed(linalg.GramEigen, "singular_values", "eigen")
timed(linalg.GramEigen, "top_vectors", "eigen")
timed(linalg, "project", "projection")
base, ft, out = sys.argv[1:4]
cfg = config.RepairConfig.of(base=base, ft=ft, out=out, executor="local", progress=False, threads=1, workers=1)
t0 = time.perf_counter()
executor.run_repair(cfg)
total = time.perf_counter() - t0
print(json.dumps({"total": total, **spent}))
"""

RAY_START = r"""
import time, ray
t0 = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
@ray.remote
class A:
    def ping(self):
        return 1
a = A.remote(); ray.get(a.ping.remote())
ray.shutdown()
print(time.perf_counter() - t0)
"""


def load1() -> float:
    return os.getloadavg()[0]


def timed_run(cmd: list[str], log: Path, limit: float) -> tuple[float, float, float]:
    """(wall, load before, load after); a run past `limit` is stopped and counts as `inf` (the ratio
    of that round is then a lower bound, printed as such)."""
    before = load1()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            return float("inf"), before, load1()
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"command failed ({rc}): {' '.join(cmd)}; see {log}")
    return wall, before, load1()


def dgrepair_ranks(out: Path) -> dict[str, int]:
    rows = pq.read_table(out / "dgrepair" / "manifest.parquet").to_pylist()
    return {r["tensor"]: r["rank_kept"] for r in rows if r["rank_kept"] is not None}


def dghard_ranks(report: Path) -> dict[str, int]:
    return {name: st["rank_kept"] for name, st in json.loads(report.read_text()).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dghard", default="dghard", help="the paper's CLI (installed in its own environment)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="bench/_work")
    ap.add_argument("--no-profile", action="store_true", help="skip the timed in-process breakdown")
    ap.add_argument("--profile-only", action="store_true", help="only the breakdown (no rounds)")
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="stop a run after this many seconds")
    ap.add_argument("--dgrepair-args", default="", help="extra arguments for dgrepair repair (quoted)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="time dgrepair repair with these extra arguments too, in the same rounds (repeatable; "
                         "e.g. --variant 'ray=--executor ray'); the plain run (the default executor) is named dgrepair")
    args = ap.parse_args()

    spec = tinyllama_spec(args.layers)
    work = Path(args.workdir) / f"vs_paper_L{args.layers}"
    if not (work / "ft" / "config.json").exists():
        t0 = time.perf_counter()
        write_pair(work, spec)
        print(f"generated the pair in {time.perf_counter() - t0:.1f} s under {work}")
    base, ft = work / "base", work / "ft"
    print(f"pair: {spec.n_params() / 1e9:.3f}B parameters per checkpoint, BF16, {args.layers} layers; "
          f"{os.cpu_count()} cores; load (1 min) at start {load1():.2f}")
    variants = {"dgrepair": args.dgrepair_args, **dict(v.split("=", 1) for v in args.variant)}
    ours_cmds = {name: [sys.executable, "-m", "dgrepair", "repair", "--base", str(base), "--ft", str(ft), "--out",
                        str(work / f"out-{name}"), "--no-progress", "--force", *extra.split()]
                 for name, extra in variants.items()}
    paper_cmd = [args.dghard, "repair", "--base", str(base), "--ft", str(ft), "--out", str(work / "out-dghard"),
                 "--report", str(work / "dghard-report.json")]
    if not args.profile_only:
        compare(args, work, ours_cmds, paper_cmd)
    if args.no_profile:
        return
    profile(work, base, ft)


def warm_page_cache(*folders: Path) -> float:
    """Read both checkpoints, so a run does not pay the disk for inputs that are not (or no longer)
    in the page cache (seen at 22 layers: dgrepair 88.8 s from a cold cache, 49.8 s warm, in the
    same sitting). Returns the seconds it took."""
    t0 = time.perf_counter()
    for folder in folders:
        for f in sorted(folder.resolve().glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return time.perf_counter() - t0


def settle(work: Path) -> str:
    """Before every timed run, untimed and the same for every tool: flush the previous run's output
    to disk (`sync`), so its write-back does not land on the next run (in sitting 9 the run right
    after dghard's 1-2 GB of output was 10-35 % slower, whichever it was), and re-read the inputs."""
    t0 = time.perf_counter()
    os.sync()
    synced = time.perf_counter() - t0
    warm = warm_page_cache(work / "base", work / "ft")
    return f"sync {synced:.1f} s, inputs re-read {warm:.1f} s"


def compare(args: argparse.Namespace, work: Path, ours_cmds: dict[str, list[str]], paper_cmd: list[str]) -> None:
    """Alternating rounds (the order reversed every other round; every run after `settle`), each
    variant's median ratio to the paper's code and its kept-rank comparison."""
    walls: dict[str, list[float]] = {name: [] for name in [*ours_cmds, "dghard"]}
    for k in range(args.rounds):
        order = [*ours_cmds.items(), ("dghard", paper_cmd)]
        for name, cmd in (order if k % 2 == 0 else order[::-1]):
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
            settled = settle(work)
            wall, before, after = timed_run(cmd, work / f"{name}-{k}.log", args.run_timeout)
            walls[name].append(wall)
            shown = f"{wall:7.1f} s" if wall < float("inf") else f"> {args.run_timeout:.0f} s (stopped)"
            print(f"round {k + 1} {name:<8} {shown}   load {before:.2f} -> {after:.2f}   (before it: {settled})",
                  flush=True)
    paper = walls["dghard"]
    theirs = dghard_ranks(work / "dghard-report.json") if all(p < float("inf") for p in paper) else {}
    for name in ours_cmds:
        ours = walls[name]
        ratios = [p / o for o, p in zip(ours, paper, strict=True)]
        if any(r == float("inf") for r in ratios):
            print(f"{name}: a run was stopped at {args.run_timeout:.0f} s: the ratio is at least "
                  f"{args.run_timeout / max(ours):.2f}x; no rank comparison")
            continue
        print(f"{name}: median {statistics.median(ours):.1f} s, dghard {statistics.median(paper):.1f} s; ratio per "
              f"round {', '.join(f'{r:.2f}' for r in ratios)}; median ratio {statistics.median(ratios):.2f}x")
        mine = dgrepair_ranks(work / f"out-{name}")
        common = sorted(set(mine) & set(theirs))
        differ = [n for n in common if mine[n] != theirs[n]]
        print(f"{name}: kept ranks: {len(common)} matrices compared, {len(differ)} differ; total kept "
              f"{name} {sum(mine[n] for n in common)}, dghard {sum(theirs[n] for n in common)}"
              + (f"; e.g. {differ[0]}: {mine[differ[0]]} vs {theirs[differ[0]]}" if differ else ""))


def profile(work: Path, base: Path, ft: Path) -> None:
    """Ray start-up alone, then one timed in-process run with one thread."""
    started = subprocess.run([sys.executable, "-c", RAY_START], capture_output=True, text=True)
    ray_s = float(started.stdout.strip().splitlines()[-1]) if started.returncode == 0 else float("nan")
    out = work / "out-profile"
    shutil.rmtree(out, ignore_errors=True)
    before = load1()
    run = subprocess.run([sys.executable, "-c", PROFILE, str(base), str(ft), str(out)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"the timed in-process run failed:\n{run.stderr}")
    prof = json.loads(run.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    total = prof.pop("total")
    rest = total - sum(prof.values())
    print(f"Ray start-up + one actor + shutdown: {ray_s:.1f} s" if ray_s == ray_s else
          f"Ray start-up failed on this machine: {started.stderr.strip().splitlines()[-1:]}")
    print(f"in-process, 1 thread: {total:.1f} s (load {before:.2f} -> {load1():.2f}); "
          + ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in prof.items())
          + f", rest {rest:.1f} s ({rest / total:.0%})")


if __name__ == "__main__":
    main()
