"""Wall time and peak RSS of `dgrepair repair --in-process` (the engine alone, one process) on
synthetic bf16 pairs of growing size. The Ray path is measured by bench/ray_overhead.py.

Prints figures; asserts nothing. The pairs use TinyLlama-1.1B shapes (hidden 2048, intermediate
5632, 32 heads / 4 KV heads, vocab 32000); `--layers` scales the parameter count while the largest
tensor stays the same, which is what a streaming engine's memory should depend on.

    python bench/repair_memory.py --layers 22 --kernels exact auto       # ~1.1B parameters
    python bench/repair_memory.py --layers 88 --kernels auto             # ~4.0B parameters
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from dgrepair.engine.demo.synthetic import tinyllama_spec, write_pair

# RUSAGE_CHILDREN is a high-water mark over all children ever waited for, so each measured command
# runs under its own one-child wrapper process that reports that child's peak alone.
_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t0 = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print(json.dumps({'rc': rc, 'wall': time.perf_counter() - t0,\n"
    "                  'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run cmd in a fresh wrapper; return (wall seconds, the command's peak RSS in GiB)."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        sys.exit(f"command failed ({result['rc']}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return result["wall"], result["peak_kib"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--kernels", nargs="+", default=["auto"], choices=["exact", "auto", "gram64", "gram32"])
    ap.add_argument("--workdir", default="bench/_work")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true", help="keep the generated pair and outputs")
    args = ap.parse_args()

    spec = tinyllama_spec(args.layers, shard_bytes=int(args.shard_gb * 2**30))
    work = Path(args.workdir) / f"L{args.layers}"
    largest = max(math.prod(s) for _, s in spec.tensors())
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"pair: {spec.n_params() / 1e9:.3f}B parameters per checkpoint, BF16, {spec.layers} layers; largest "
          f"tensor {largest / 1e6:.1f}M elements = {largest * 4 / 2**30:.3f} GiB in float32")
    if not (work / "ft" / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        write_pair(work, spec)
        print(f"generated pair in {time.perf_counter() - t0:.1f}s under {work}")
    results = {}
    ranks: dict[str, dict] = {}
    for kernel in args.kernels:
        out = work / f"out-{kernel}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "dgrepair", "repair", "--base", str(work / "base"), "--ft", str(work / "ft"),
               "--out", str(out), "--kernel", kernel, "--no-progress", "--in-process"]
        wall, peak = measure(cmd)
        summary = json.loads((out / "dgrepair" / "summary.json").read_text())
        rows = pq.read_table(out / "dgrepair" / "manifest.parquet").to_pylist()
        ranks[kernel] = {(r["tensor"], r["expert"], r["part"]): r["rank_kept"] for r in rows}
        ranks = summary["totals"]["by_kind"]["svd"]["rank_kept"]
        results[kernel] = (wall, peak)
        print(f"kernel {kernel:<7} wall {wall:8.1f}s  peak RSS {peak:6.2f} GiB  "
              f"({peak / (largest * 4 / 2**30):.1f}x largest tensor in f32)  total kept rank {ranks}  "
              f"global rho {summary['totals']['global_rho']:.4f}")
        print(f"  command: {' '.join(cmd)}")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    for kernel in [k for k in results if k != "exact"]:
        if "exact" in results:
            same = sum(ranks[kernel][k] == v for k, v in ranks["exact"].items())
            print(f"speed-up {kernel} vs exact (same run): {results['exact'][0] / results[kernel][0]:.2f}x; "
                  f"per-matrix kept rank identical for {same}/{len(ranks['exact'])} manifest rows")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
