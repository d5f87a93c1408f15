"""Wall time of every `--method` and of the `--target-rho` calibration pass, on one synthetic BF16
pair with TinyLlama shapes (`dgrepair repair --in-process`, the engine alone, all cores).

Prints figures; asserts nothing. Ratios are against `dg_hard` measured in the same run.

    python bench/methods.py --layers 2
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from dgrepair.engine.demo.synthetic import tinyllama_spec, write_pair

RUNS = [
    ("dg_hard", []), ("wise_ft", []), ("ties", []), ("dare", []), ("fixed_rank", []), ("mp_edge", []),
    ("optimal_shrink", []),
    ("dg_hard", ["--target-rho", "0.5"]), ("ties", ["--target-rho", "0.5"]),
    ("dare", ["--no-dare-rescale", "--target-rho", "0.5"]), ("dg_hard", ["--emit-adapter", "ADAPTER"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workdir", default="bench/_work/methods")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    spec = tinyllama_spec(args.layers)
    base, ft = write_pair(work, spec)
    print(f"pair: {spec.n_params() / 1e6:.0f}M parameters, BF16, {args.layers} layers; machine "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    exe = shutil.which("dgrepair") or sys.exit("dgrepair is not on PATH")
    reference = None
    print(f"{'method':<16} {'options':<32} {'wall s':>8} {'x dg_hard':>10} {'global rho':>11}  calibration s")
    for i, (method, extra) in enumerate(RUNS):
        out = work / f"out{i}"
        extra = [str(work / f"adapter{i}") if x == "ADAPTER" else x for x in extra]
        t0 = time.perf_counter()
        subprocess.run([exe, "repair", "--in-process", "--no-progress", "--base", str(base), "--ft", str(ft),
                        "--out", str(out), "--method", method, *extra], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        summary = json.loads((out / "dgrepair" / "summary.json").read_text())
        reference = reference or wall
        calib = out / "dgrepair" / "calibration.parquet"
        cal_s = f"{sum(pq.read_table(calib).column('seconds').to_pylist()):.1f}" if calib.is_dir() else "-"
        print(f"{method:<16} {' '.join(extra)[-32:]:<32} {wall:8.1f} {wall / reference:10.2f} "
              f"{summary['totals']['global_rho']:11.4f}  {cal_s}")
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
