"""Measure the CPU rows of the cost table behind `dgrepair plan --estimate` (engine/analysis/cost_table.py):
seconds per matrix for `gram32` and `gram64` on one core (one single-threaded worker, as the Ray
default runs it), on the shapes of dense LLMs and of MoE experts. Prints the rows; `--write` puts
them into engine/analysis/cost_table.py. Asserts nothing. The machine is shared: the 1-minute load average
is printed before and after, and each row is the best of `--repeats`.

    python bench/cost_table.py --write
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from dgrepair.engine.analysis import cost_table
from dgrepair.kernels.spectral import repair_batch
from dgrepair.kernels.threshold import ThresholdParams

SHAPES = ((256, 2048), (2048, 2048), (5632, 2048), (2048, 5632), (7168, 2048), (2048, 7168), (32000, 2048))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import spiked  # noqa: E402  (bench/kernels.py: the same test matrices as the kernel table)

TABLE = Path(cost_table.__file__).resolve()  # the module itself: its path is spelled nowhere


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="rewrite the CPU_ROWS block of engine/analysis/cost_table.py")
    args = ap.parse_args()
    print(f"load (1 min) before: {os.getloadavg()[0]:.2f}")
    rows = []
    for m, n in SHAPES:
        d = spiked(m, n)[None]
        for backend in ("gram32", "gram64"):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                repair_batch(d, ThresholdParams(), backend, threads=1)
                best = min(best, time.perf_counter() - t0)
            rows.append({"device": "cpu", "backend": backend, "rows": m, "cols": n, "seconds": round(best, 4),
                         "measured": True})
            print(f"{m}x{n} {backend}: {best:.3f} s", flush=True)
    print(f"load (1 min) after: {os.getloadavg()[0]:.2f}")
    if args.write:
        body = "CPU_ROWS: list[dict] = [\n" + "".join(f"    {r!r},\n" for r in rows) + "]\n"
        text = TABLE.read_text()
        stamp = f"# measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, 1-min load " \
                f"{os.getloadavg()[0]:.1f} (one thread per matrix)\n"
        text = re.sub(r"(# BEGIN CPU_ROWS.*?\n).*?(# END CPU_ROWS)", lambda mt: mt.group(1) + stamp + body
                      + mt.group(2), text, flags=re.S)
        TABLE.write_text(text)
        print(f"wrote {len(rows)} rows into {TABLE}")


if __name__ == "__main__":
    main()
