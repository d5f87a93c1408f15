"""The lab's score table (long CSV: cell, method, benchmark, score, length) and the one call that scores it.

Scoring belongs to `dgrepair score` (docs/scoring.md). `score_table` is the only place the lab calls it; when the
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


def unscorable_cells(rows: list[dict]) -> list[str]:
    """Cells the metric cannot score: ft scores 0 on the task (M_task/FT_task undefined) or base scores 0 on
    every held-out benchmark (the balance ratio is undefined). A tiny smoke run can produce either."""
    ft_task = {r["cell"]: float(r["score"]) for r in rows if r["method"] == "ft" and r["benchmark"] == "task"}
    base_held: dict[str, float] = {}
    for r in rows:
        if r["method"] == "base" and r["benchmark"] != "task":
            base_held[r["cell"]] = base_held.get(r["cell"], 0.0) + float(r["score"])
    return sorted(c for c in ft_task if ft_task[c] <= 0.0 or base_held.get(c, 0.0) <= 0.0)


def score_table(path: Path) -> tuple[list[dict] | None, list[str]]:
    """`dgrepair score --table PATH --cohort-column length --json`, parsed, over the scorable cells (the
    others are returned by name and reported); None if the CLI lacks `score`."""
    exe = score_exe()
    helptext = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    if " score" not in helptext:
        return None, []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    skipped = unscorable_cells(rows)
    if len(skipped) == len({r["cell"] for r in rows}):
        return [], skipped
    if skipped:
        path = path.with_name(path.stem + ".scorable.csv")
        write_table(path, [r for r in rows if r["cell"] not in skipped])
    cmd = [exe, "score", "--table", str(path), "--cohort-column", "length", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), skipped
