"""Read benchmark scores for `dgrepair score`: a long-format CSV, or lm-evaluation-harness results.

CSV columns: `cell, method, benchmark, score` (+ optional cohort columns). lm-eval files are the
`results_*.json` that `lm_eval --output_path` writes: `{"results": {task: {"acc,none": 0.61, ...}},
"group_subtasks": {...}}`. Every error names the file and the line (or task) and says what to do.
Units: each file is read as fractions or percentages (`--units`); `auto` decides per file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .scoring import TASK, ScoreTable

REQUIRED_COLUMNS = ("cell", "method", "benchmark", "score")
UNITS = ("auto", "fraction", "percent")
# lm-eval metric keys tried in order when --metric does not name one for a task.
METRIC_PREFERENCE = ("acc,none", "exact_match,strict-match", "exact_match,none", "prompt_level_strict_acc,none",
                     "acc_norm,none", "exact_match,flexible-extract", "em,none", "f1,none")


@dataclass(frozen=True)
class RawScore:
    """One score as read, with where it came from (for messages)."""

    cell: str
    method: str
    benchmark: str
    value: float
    where: str
    cohorts: tuple[tuple[str, str], ...] = ()


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{where}: score {text!r} is not a number.") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: score {text!r} is not a finite number.")
    return value


def read_csv(path: str | Path, cohort_columns: tuple[str, ...] = ()) -> list[RawScore]:
    """Rows of a long-format CSV; blank lines are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"score table {p}: cannot read ({exc.strerror}).") from exc
    except UnicodeDecodeError:
        raise InputError(f"score table {p}: not UTF-8 text; save it as a UTF-8 CSV.") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise InputError(f"score table {p}: the file is empty; it needs a header "
                         f"{','.join(REQUIRED_COLUMNS)}.")
    names = [h.strip().lower() for h in header]
    wanted = (*REQUIRED_COLUMNS, *(c.strip().lower() for c in cohort_columns))
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InputError(f"score table {p}: no column {', '.join(repr(c) for c in missing)} in the header "
                         f"({', '.join(names)}); the columns are {', '.join(REQUIRED_COLUMNS)} "
                         "(plus any --cohort-column).")
    idx = {c: names.index(c) for c in wanted}
    rows: list[RawScore] = []
    for lineno, record in enumerate(reader, start=2):
        if not any(f.strip() for f in record):
            continue
        where = f"score table {p} line {lineno}"
        if len(record) != len(names):
            raise InputError(f"{where}: {len(record)} fields, the header has {len(names)}.")
        fields = {c: record[i].strip() for c, i in idx.items()}
        for c in ("cell", "method", "benchmark"):
            if not fields[c]:
                raise InputError(f"{where}: empty {c!r}.")
        cohorts = tuple((c, fields[c.strip().lower()]) for c in cohort_columns if fields[c.strip().lower()])
        rows.append(RawScore(fields["cell"], fields["method"], fields["benchmark"],
                             _number(fields["score"], where), where, cohorts))
    return rows


def find_lm_eval_results(path: str | Path) -> Path:
    """A results file, or the one `results*.json` under a folder lm-eval wrote."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.rglob("results*.json"))
        if len(found) != 1:
            what = "no results*.json" if not found else f"{len(found)} results files ({', '.join(map(str, found[:4]))})"
            raise InputError(f"lm-eval folder {p}: {what}; pass the results JSON file itself.")
        return found[0]
    if not p.is_file():
        raise InputError(f"lm-eval results {p}: no such file.")
    return p


def _pick_metric(task: str, entry: dict, overrides: dict[str, str], where: str) -> str:
    wanted = overrides.get(task)
    candidates = (wanted, wanted + ",none") if wanted else METRIC_PREFERENCE + tuple(
        k.split(",")[0] for k in METRIC_PREFERENCE)
    for key in candidates:
        if key in entry:
            return key
    numeric = sorted(k for k, v in entry.items() if isinstance(v, (int, float)) and "stderr" not in k)
    how = f"--metric {task}=KEY" if not wanted else f"another KEY in --metric {task}=KEY"
    raise InputError(f"{where}: task {task!r} has no metric {wanted or 'among ' + ', '.join(METRIC_PREFERENCE)}; "
                     f"it has {', '.join(numeric) or 'no numeric metric'}; choose one with {how}.")


def read_lm_eval(path: str | Path, method: str, cell: str, task_benchmark: str,
                 metrics: dict[str, str] | None = None) -> list[RawScore]:
    """One method's scores from an lm-eval results file; `task_benchmark` becomes the on-task `task`.

    Group subtasks (`group_subtasks`, e.g. the 57 MMLU subjects) are left out: the group's own
    aggregate is the benchmark."""
    p = find_lm_eval_results(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"lm-eval results {p}: not a readable JSON file ({exc}).") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results:
        raise InputError(f"lm-eval results {p}: no 'results' mapping of task -> metrics; pass the "
                         "results_*.json file lm_eval --output_path wrote.")
    subtasks = {t for subs in (data.get("group_subtasks") or {}).values() if isinstance(subs, list) for t in subs}
    tasks = [t for t in results if t not in subtasks or t == task_benchmark]
    if task_benchmark not in results:
        raise InputError(f"lm-eval results {p}: no task {task_benchmark!r} (the --task-benchmark); tasks: "
                         f"{', '.join(tasks)}.")
    rows = []
    for task in tasks:
        entry = results[task]
        where = f"lm-eval results {p} task {task!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a mapping of metric -> value.")
        key = _pick_metric(task, entry, metrics or {}, where)
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: metric {key!r} is {value!r}, not a number.")
        rows.append(RawScore(cell, method, TASK if task == task_benchmark else task,
                             _number(str(value), f"{where} metric {key!r}"), f"{where} metric {key!r}"))
    return rows


def normalise_units(rows: list[RawScore], units: str, source: str) -> list[RawScore]:
    """Scores as fractions. `auto`: a file whose scores all lie in [0, 1] is fractions; one with a
    score above 1 is percentages, and then a non-zero score at or below 1 is refused as ambiguous."""
    if units not in UNITS:
        raise InputError(f"units must be one of {', '.join(UNITS)}, got {units!r}.")
    for r in rows:
        if r.value < 0:
            raise InputError(f"{r.where}: score {r.value:g} is negative; scores are accuracies in [0, 1] or [0, 100].")
    if units == "auto":
        top = max((r.value for r in rows), default=0.0)
        units = "fraction" if top <= 1.0 else "percent"
        if units == "percent":
            small = next((r for r in rows if 0.0 < r.value <= 1.0), None)
            if small is not None:
                raise InputError(f"{small.where}: score {small.value:g} looks like a fraction while {source} also "
                                 f"has {top:g} (a percentage); make the file consistent, or pass --units percent "
                                 "if it really is a score of at most 1 %.")
    limit = 1.0 if units == "fraction" else 100.0
    for r in rows:
        if r.value > limit:
            raise InputError(f"{r.where}: score {r.value:g} is above {limit:g} for --units {units}.")
    factor = 1.0 if units == "fraction" else 0.01
    return [RawScore(r.cell, r.method, r.benchmark, r.value * factor, r.where, r.cohorts) for r in rows]


def build_table(rows: list[RawScore], source: str) -> ScoreTable:
    """Refuse duplicate (cell, method, benchmark) rows and conflicting cohort labels."""
    table = ScoreTable(source=source)
    seen: dict[tuple[str, str, str], str] = {}
    labels: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    for r in rows:
        key = (r.cell, r.method, r.benchmark)
        if key in seen:
            raise InputError(f"{r.where}: duplicate score for cell {r.cell!r}, method {r.method!r}, benchmark "
                             f"{r.benchmark!r} (first given at {seen[key]}); keep one row per triple.")
        seen[key] = r.where
        table.scores[key] = r.value
        have = labels.setdefault((r.cell, r.benchmark), {})
        for column, label in r.cohorts:
            if column in have and have[column][0] != label:
                raise InputError(f"{r.where}: {column} {label!r} for cell {r.cell!r}, benchmark {r.benchmark!r} "
                                 f"conflicts with {have[column][0]!r} at {have[column][1]}; a cohort label belongs "
                                 "to the (cell, benchmark), so every method's row must agree.")
            have[column] = (label, r.where)
    table.cohorts = {k: tuple((c, v[0]) for c, v in d.items()) for k, d in labels.items() if d}
    return table
