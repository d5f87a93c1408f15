"""The lab's ledger: the small files of a workdir (what was measured, not the weights), kept in git.

A workdir holds ~20 GB of checkpoints and optimiser state and lives on one machine; a session's machine is
gone when the session ends. The ledger is the part that must outlive it: evaluation caches, repair records
and summaries, fine-tune metadata and loss curves, sweep results, the merged results and report. Restored
into an empty workdir, it lets the same round-2 command continue in a new session on a new machine: a cell
whose repairs and evaluations are all in the ledger is not computed again, and a fine-tune checkpoint that
is needed again (for a repair or evaluation the ledger lacks) is retrained from step 0, which is
deterministic at one thread on the same kind of CPU (another CPU's BLAS rounds differently);
lab_finetune.py checks the retrained losses against the recorded ones and names both CPUs when they differ.

    python bench/forgetting_lab/lab_ledger.py save --workdir /work/lab2_work     # workdir -> ledger
    python bench/forgetting_lab/lab_ledger.py restore --workdir /work/lab2_work  # ledger -> workdir
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

LEDGER = Path(__file__).resolve().parent / "round2_ledger"

# What is kept, relative to the workdir (Path.glob patterns). Everything else (the base, checkpoint weights
# and tokenizer copies, optimiser state, repaired weights and their sidecars) is rebuilt when needed.
PATTERNS = (
    "sweep-*.json",
    "base_eval.json",
    "suite-*.json",
    "results-*.json",
    "scores-*.csv",
    "report.md",
    "report_figures/*.png",  # the report's figures (lab_plots.py), drawn from the results above
    "ft/*/curve.csv",
    "ft/*/steps*/lab_ft.json",
    "cells/*/evals/*.json",
    "cells/*/repairs/*.lab.json",
    "cells/*/repairs/*/lab_command.txt",
    "cells/*/repairs/*/dgrepair/summary.json",
    "cells/*/repairs/*/dgrepair/manifest.parquet/*.parquet",  # the manifest is a folder of parts
)


def ledger_files(root: Path) -> list[Path]:
    """The ledger's files under `root` (a workdir or a ledger), relative to it, sorted."""
    return sorted({p.relative_to(root) for pat in PATTERNS for p in root.glob(pat) if p.is_file()})


def _copy(src: Path, dst: Path) -> None:
    """Write `dst` whole or not at all (a copy interrupted mid-way never looks like a result)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.ledger-tmp")  # two drivers may save at once
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save(work: Path, ledger: Path = LEDGER) -> list[Path]:
    """Copy the workdir's ledger files into the ledger where they are new or changed; returns those copied.
    The workdir is the newer side: a file it has replaces the ledger's."""
    copied = []
    for rel in ledger_files(work):
        src, dst = work / rel, ledger / rel
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            _copy(src, dst)
            copied.append(rel)
    return copied


def restore(ledger: Path, work: Path) -> list[Path]:
    """Copy ledger files the workdir lacks into it; never overwrites what the workdir has."""
    copied = []
    if not ledger.is_dir():
        return copied
    for rel in ledger_files(ledger):
        if not (work / rel).is_file():
            _copy(ledger / rel, work / rel)
            copied.append(rel)
    return copied


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--ledger", type=Path, default=LEDGER)
    a = p.parse_args(argv)
    done = save(a.workdir, a.ledger) if a.action == "save" else restore(a.ledger, a.workdir)
    print(f"{a.action}: {len(done)} file(s) copied")


if __name__ == "__main__":
    main()
