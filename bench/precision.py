"""The precision policy against the float64 path on a synthetic BF16 TinyLlama-shaped pair: runs
`dgrepair repair` twice (`--kernel auto`, i.e. the policy, and `--kernel gram64`), then compares the
kept rank of every matrix and every stored output element. Prints wall times (with the 1-minute load
average before and after), how many matrices the guard recomputed in float64, how many ranks differ,
the fraction of output elements that differ and the largest difference in BF16 ulps. Asserts nothing.

    python bench/precision.py --layers 22        # the 1.1B pair
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from dgrepair.engine.demo.synthetic import tinyllama_spec, write_pair


def tensors(out: Path):
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as fh:
            for k in fh.keys():
                yield k, fh.get_tensor(k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--workdir", default="bench/_work")
    ap.add_argument("--pair", help="the pair's directory (base/, ft/; default WORKDIR/tinyllama_L<layers>)")
    ap.add_argument("--reuse", action="store_true", help="keep an out-<kernel> that already has summary.json")
    ap.add_argument("--extra", default="", help="extra dgrepair repair arguments (quoted), e.g. '--in-process'")
    args = ap.parse_args()
    work = Path(args.pair) if args.pair else Path(args.workdir) / f"tinyllama_L{args.layers}"
    if not (work / "ft" / "config.json").exists():
        t0 = time.perf_counter()
        write_pair(work, tinyllama_spec(args.layers))
        print(f"generated the pair in {time.perf_counter() - t0:.1f} s under {work}", flush=True)
    rows = {}
    for kernel in ("auto", "gram64"):
        out = work / f"out-{kernel}"
        if args.reuse and (out / "dgrepair" / "summary.json").is_file():
            print(f"--kernel {kernel}: reusing {out}", flush=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
            before, t0 = os.getloadavg()[0], time.perf_counter()
            subprocess.run([sys.executable, "-m", "dgrepair", "repair", "--base", str(work / "base"), "--ft",
                            str(work / "ft"), "--out", str(out), "--kernel", kernel, "--no-progress",
                            *args.extra.split()], check=True, stdout=subprocess.DEVNULL)
            print(f"--kernel {kernel}: {time.perf_counter() - t0:.1f} s (load {before:.2f} -> "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
        rows[kernel] = {(r["tensor"], r["expert"], r["part"]): r
                        for r in pq.read_table(out / "dgrepair" / "manifest.parquet").to_pylist()}
    auto, f64 = rows["auto"], rows["gram64"]
    keys = [k for k, r in auto.items() if r["rank_kept"] is not None]
    differ = [k for k in keys if auto[k]["rank_kept"] != f64[k]["rank_kept"]]
    print(f"matrices {len(keys)}; decisions {dict(Counter(auto[k]['precision'] for k in keys))}; backends "
          f"{dict(Counter(auto[k]['kernel'] for k in keys))}; guard recomputes "
          f"{dict(Counter(auto[k]['fallback'] for k in keys if auto[k]['fallback']))}")
    print(f"kept ranks: {len(differ)} of {len(keys)} matrices differ from float64 (total kept "
          f"{sum(auto[k]['rank_kept'] for k in keys)} vs {sum(f64[k]['rank_kept'] for k in keys)})")
    other = dict(tensors(work / "out-gram64"))
    changed = total = 0
    worst = 0.0
    for name, t in tensors(work / "out-auto"):
        if not t.is_floating_point():
            continue
        x, y = t.float(), other[name].float()
        mask = x != y
        changed += int(mask.sum())
        total += x.numel()
        if bool(mask.any()):
            ulp = torch.finfo(t.dtype).eps * torch.maximum(x.abs(), y.abs())[mask].clamp_min(1e-30)
            worst = max(worst, float(((x - y)[mask].abs() / ulp).max()))
    print(f"output elements that differ from the float64 path: {changed} of {total} ({changed / total:.3e}); "
          f"largest difference {worst:.2f} ulp of the stored dtype")


if __name__ == "__main__":
    main()
