"""The lab's score table (long CSV: cell, method, benchmark, score, length) and the one call that scores it.

Scoring belongs to `dgrepair score` (SPEC §5). `score_table` is the only place the lab calls it; when the
installed CLI has no `score` command yet, it returns None and the report says so instead of inventing
numbers with a private copy of the metric.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

from lab_repair import dgrepair_exe

COLUMNS = ("cell", "method", "benchmark", "score", "length")


def write_table(path: Path, rows: list[dict]) -> None:
    """Rows must be complete: every (cell, method) has every benchmark of its cell, base and ft included."""
    by_cell: dict[str, dict[str, set]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], {}).setdefault(r["method"], set()).add(r["benchmark"])
    for cell, methods in by_cell.items():
        want = methods.get("base")
        if want is None or "ft" not in methods or "task" not in want:
            raise ValueError(f"cell {cell}: base and ft rows (with a 'task' benchmark) are required")
        for method, got in methods.items():
            if got != want:
                raise ValueError(f"cell {cell} method {method}: benchmarks {sorted(got)} != base's {sorted(want)}")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in COLUMNS})


def score_exe() -> str:
    """The `dgrepair` that scores: this environment's, or `LAB_DGREPAIR_SCORE` (a path to another build's
    `dgrepair`, used while `score` was not merged yet; the report names it)."""
    return os.environ.get("LAB_DGREPAIR_SCORE") or dgrepair_exe()


def score_table(path: Path) -> list[dict] | None:
    """`dgrepair score --table PATH --cohort-column length --json`, parsed; None if the CLI lacks `score`."""
    exe = score_exe()
    helptext = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    if " score" not in helptext:
        return None
    cmd = [exe, "score", "--table", str(path), "--cohort-column", "length", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)
