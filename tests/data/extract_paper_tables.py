"""Regenerate paper_tab14_15_scores.csv and paper_tab14_15_combined.csv from the paper text.

Usage: python tests/data/extract_paper_tables.py PAPER.txt   (the paper "Spectral Unforgetting" as plain text)

The paper's App. H prints Tab. 14 (Qwen3.5-4B) then Tab. 15 (Llama-3.2-3B-Instruct), each with the
header `Task | Method | ARC | GSM8K | HSwag | IFEval | Math | MMLU | MNLI | Trivia | TruthQA | Avg. |
Results | Combined`: nine held-out benchmarks, their mean, the on-task score (`task`) and the
Combined column. Pre-trained is `base`, Full-SFT is `ft`. Cohort columns: `family` (Reasoning =
Qwen, Non-reasoning = Llama, paper §4.4) and `dimension` (Knowledge = MMLU, TriviaQA, TruthfulQA;
Cognition = the other six, paper §4.1). Run by hand; the tests read only the CSVs.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

HEADER = ["Task", "Method", "ARC", "GSM8K", "HSwag", "IFEval", "Math", "MMLU", "MNLI", "Trivia", "TruthQA",
          "Avg.", "Results", "Combined"]
MODELS = ("Qwen", "Llama")  # Tab. 14, Tab. 15
FAMILY = {"Qwen": "Reasoning", "Llama": "Non-reasoning"}
KNOWLEDGE = {"MMLU", "Trivia", "TruthQA"}
METHOD = {"Pre-trained": "base", "Full-SFT": "ft", "DG-Hard (Ours)": "DG-Hard"}


def extract(text: str) -> tuple[list[list[str]], list[list[str]]]:
    scores, combined = [], []
    table, task = -1, None
    for lineno, line in enumerate(text.splitlines(), start=1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is not None and cells[:len(HEADER)] == HEADER:
            table += 1
            continue
        if cells is None:
            if table == len(MODELS) - 1:
                break  # the line after Tab. 15
            continue
        if table < 0:
            continue
        if cells[0].startswith("---"):
            continue
        if cells[1] == "Pre-trained":  # the first row of a task block carries the task name
            task, cells = cells[0], cells[1:]
        method = METHOD.get(cells[0], cells[0])
        values = cells[1:13]
        model = MODELS[table]
        cell = f"{model}/{task}"
        for bench, value in zip(HEADER[2:11], values[:9], strict=True):
            dim = "Knowledge" if bench in KNOWLEDGE else "Cognition"
            scores.append([cell, method, bench, value, FAMILY[model], dim, str(lineno)])
        scores.append([cell, method, "task", values[10], FAMILY[model], "", str(lineno)])
        if method not in ("base", "ft"):
            combined.append([cell, method, values[9], values[11], str(lineno)])
        else:
            combined.append([cell, method, values[9], "", str(lineno)])
    return scores, combined


def main(paper: str) -> None:
    scores, combined = extract(Path(paper).read_text())
    here = Path(__file__).parent
    with open(here / "paper_tab14_15_scores.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["cell", "method", "benchmark", "score", "family", "dimension", "paper_line"])
        w.writerows(scores)
    with open(here / "paper_tab14_15_combined.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["cell", "method", "printed_avg", "printed_combined", "paper_line"])
        w.writerows(combined)
    print(f"{len(scores)} scores, {len(combined)} method rows")


if __name__ == "__main__":
    main(sys.argv[1])
