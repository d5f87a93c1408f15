"""The paper's partition-conditional scoring (docs/scoring.md, paper §3.4 and App. C), as pure functions.

Input is a `ScoreTable`: benchmark scores as fractions in [0, 1] keyed by (cell, method, benchmark),
with `base` and `ft` as the reference methods and `task` as the on-task benchmark. Reading CSV or
lm-evaluation-harness files lives in `score_inputs.py`; this module does no I/O.

Conventions (docs/adr/0006-scoring-and-reports.md):
- A benchmark is damaged when FT − Base ≤ −0.03, improved when ≥ +0.03, else unchanged. The
  comparisons allow `BOUNDARY_EPS` so that a difference of exactly 3 points in decimal (0.5320 →
  0.5020, which is −0.030000000000000027 in binary) is decided as written, so an FT effect of
  exactly 3 points is a change.
- Non-damage (population): by default the metric as written (docs/scoring.md), the share of unchanged triples with
  |M − Base| < 0.03 (`two-sided`). `one-sided` (M − Base ≥ −0.03, exact
  −3 points kept) is the rule that reproduces the paper's printed population numbers.
- Per cell: healed/preserved are means of per-benchmark ratios clipped to [0, 1]; an empty side
  counts as 1; Combined is their harmonic mean (0 when either is 0). Balance is the harmonic mean
  of mean(M)/mean(Base) over held-out benchmarks and M_task/FT_task, as a ratio (1 = parity; it
  exceeds 1 when the method beats its references, the paper's "values above 100").
- Population: % healed and % preserved are plain means of the unclipped per-triple ratios pooled
  over the cells (they may exceed 1: overshoot); inputs to every harmonic mean are floored at 0;
  an empty partition counts as 1; on-task retention is the mean over cells of M_task/FT_task.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import InputError

THRESHOLD = 0.03
BOUNDARY_EPS = 1e-9
REFERENCES = ("base", "ft")
TASK = "task"
OVERALL = "overall"
NON_DAMAGE_MODES = ("one-sided", "two-sided")


@dataclass
class ScoreTable:
    """Scores in [0, 1] by (cell, method, benchmark); cohort labels by (cell, benchmark)."""

    scores: dict[tuple[str, str, str], float] = field(default_factory=dict)
    # (cell, benchmark) -> ((cohort column, label), ...); empty labels are left out
    cohorts: dict[tuple[str, str], tuple[tuple[str, str], ...]] = field(default_factory=dict)
    source: str = "scores"

    def cells(self) -> list[str]:
        return list(dict.fromkeys(c for c, _, _ in self.scores))

    def methods(self, cell: str) -> list[str]:
        return list(dict.fromkeys(m for c, m, _ in self.scores if c == cell))

    def benchmarks(self, cell: str, method: str) -> list[str]:
        return [b for c, m, b in self.scores if c == cell and m == method]


@dataclass(frozen=True)
class CellScore:
    """One (cell, method) row: the last columns of the paper's Tab. 14/15 and the balance of Tab. 10."""

    cell: str
    method: str
    n_damaged: int
    n_improved: int
    n_unchanged: int
    healed: float
    preserved: float
    combined: float
    held_out_ratio: float
    on_task_ratio: float
    balance: float


@dataclass(frozen=True)
class PopulationScore:
    """Tab. 1 statistics for one method over a cohort (or all cells), as fractions (1 = 100 %)."""

    method: str
    cohort: str
    n_cells: int
    n_damaged: int
    n_improved: int
    n_unchanged: int
    pct_healed: float
    non_damage: float
    pct_preserved: float
    on_task_retention: float
    clean_up: float
    retention: float
    combined: float


def classify(ft: float, base: float) -> str:
    """`damaged`, `improved` or `unchanged` by the FT effect d = FT − Base at ±THRESHOLD."""
    d = ft - base
    if d <= -THRESHOLD + BOUNDARY_EPS:
        return "damaged"
    if d >= THRESHOLD - BOUNDARY_EPS:
        return "improved"
    return "unchanged"


def within_threshold(method: float, base: float, mode: str = "two-sided") -> bool:
    """Non-damage test for an unchanged triple.

    `two-sided` (default): the literal rule, |M − Base| < 0.03. `one-sided`: the method did not push it
    more than 3 points below Base, M − Base ≥ −0.03 with an exact −3 points counted as kept; this
    reproduces the paper's population numbers (Tab. 1, Tab. 13, Fig. 2; docs/adr/0006-scoring-and-reports.md)."""
    if mode == "one-sided":
        return method - base >= -THRESHOLD - BOUNDARY_EPS
    if mode == "two-sided":
        return abs(method - base) < THRESHOLD - BOUNDARY_EPS
    raise ValueError(f"unknown non-damage mode {mode!r}; use one of {', '.join(NON_DAMAGE_MODES)}")


def harmonic_mean(a: float, b: float) -> float:
    """HM with inputs floored at 0; anything with a zero side is 0."""
    a, b = max(a, 0.0), max(b, 0.0)
    return 0.0 if a == 0.0 or b == 0.0 else 2.0 * a * b / (a + b)


def _mean(values: list[float], empty: float = 1.0) -> float:
    return sum(values) / len(values) if values else empty


def _clip01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def validate(table: ScoreTable) -> None:
    """Every cell has base and ft with the same benchmarks, including `task`, and at least one method
    scored on exactly those benchmarks. Errors name the source, cell, method and benchmark."""
    src = table.source
    if not table.scores:
        raise InputError(f"{src}: no scores found.")
    for cell in table.cells():
        methods = table.methods(cell)
        for ref in REFERENCES:
            if ref not in methods:
                raise InputError(f"{src}: cell {cell!r} has no rows for method {ref!r}; every cell needs the "
                                 f"references 'base' and 'ft' (methods found: {', '.join(methods)}).")
        ref_set = set(table.benchmarks(cell, "base"))
        ft_set = set(table.benchmarks(cell, "ft"))
        if ref_set != ft_set:
            odd = sorted(ref_set ^ ft_set)
            raise InputError(f"{src}: cell {cell!r}: base and ft must score the same benchmarks; only one of them "
                             f"has {', '.join(odd)}.")
        if TASK not in ref_set:
            raise InputError(f"{src}: cell {cell!r} has no on-task benchmark named {TASK!r} for base and ft; "
                             "name the fine-tuning task's benchmark 'task'.")
        if len(ref_set) < 2:
            raise InputError(f"{src}: cell {cell!r} has no held-out benchmark besides {TASK!r}.")
        others = [m for m in methods if m not in REFERENCES]
        if not others:
            raise InputError(f"{src}: cell {cell!r} has only the references base and ft; add rows for a method "
                             "to score.")
        for method in others:
            have = set(table.benchmarks(cell, method))
            if have - ref_set:
                raise InputError(f"{src}: cell {cell!r}, method {method!r} scores {', '.join(sorted(have - ref_set))}, "
                                 "which base and ft do not; every method must score the references' benchmarks.")
            if ref_set - have:
                raise InputError(f"{src}: cell {cell!r}, method {method!r} has no score for "
                                 f"{', '.join(sorted(ref_set - have))}.")
        if table.scores[(cell, "ft", TASK)] <= 0.0:
            raise InputError(f"{src}: cell {cell!r}: ft scores 0 on {TASK!r}; on-task retention M_task/FT_task "
                             "is undefined.")
        held = [b for b in ref_set if b != TASK]
        if sum(table.scores[(cell, "base", b)] for b in held) <= 0.0:
            raise InputError(f"{src}: cell {cell!r}: base scores 0 on every held-out benchmark; the balance "
                             "ratio mean(M)/mean(Base) is undefined.")


def held_out(table: ScoreTable, cell: str) -> list[str]:
    return [b for b in table.benchmarks(cell, "base") if b != TASK]


def score_cell(table: ScoreTable, cell: str, method: str) -> CellScore:
    """Per-cell Combined (Tab. 14/15) and balance (Tab. 10) of one method."""
    s = table.scores
    healed, preserved, counts = [], [], {"damaged": 0, "improved": 0, "unchanged": 0}
    for b in held_out(table, cell):
        base, ft, m = s[(cell, "base", b)], s[(cell, "ft", b)], s[(cell, method, b)]
        kind = classify(ft, base)
        counts[kind] += 1
        if kind == "damaged":
            healed.append(_clip01((m - ft) / (base - ft)))
        elif kind == "improved":
            preserved.append(_clip01((m - base) / (ft - base)))
    h, p = _mean(healed), _mean(preserved)
    bench = held_out(table, cell)
    held_ratio = sum(s[(cell, method, b)] for b in bench) / sum(s[(cell, "base", b)] for b in bench)
    task_ratio = s[(cell, method, TASK)] / s[(cell, "ft", TASK)]
    return CellScore(cell, method, counts["damaged"], counts["improved"], counts["unchanged"], h, p,
                     harmonic_mean(h, p), held_ratio, task_ratio, harmonic_mean(held_ratio, task_ratio))


def score_cells(table: ScoreTable) -> list[CellScore]:
    validate(table)
    return [score_cell(table, cell, m) for cell in table.cells() for m in table.methods(cell) if m not in REFERENCES]


def cohort_names(table: ScoreTable) -> list[str]:
    """`column=label` for every label given to a held-out benchmark, in order of first appearance."""
    names: dict[str, None] = {}
    for (_, bench), labels in table.cohorts.items():
        if bench != TASK:
            for column, label in labels:
                names[f"{column}={label}"] = None
    return list(names)


def _in_cohort(table: ScoreTable, cell: str, bench: str, cohort: str) -> bool:
    if cohort == OVERALL:
        return True
    return any(f"{c}={v}" == cohort for c, v in table.cohorts.get((cell, bench), ()))


def score_population(table: ScoreTable, method: str, cohort: str = OVERALL,
                     non_damage: str = "two-sided") -> PopulationScore:
    """Tab. 1 statistics of one method over the held-out triples of a cohort (all cells by default).

    A cohort's cells are those with at least one held-out triple in it; on-task retention averages
    M_task/FT_task over those cells."""
    s = table.scores
    healed, preserved, unchanged_ok, task_ratios = [], [], [], []
    for cell in table.cells():
        if method not in table.methods(cell):
            continue
        triples = [b for b in held_out(table, cell) if _in_cohort(table, cell, b, cohort)]
        if not triples:
            continue
        task_ratios.append(s[(cell, method, TASK)] / s[(cell, "ft", TASK)])
        for b in triples:
            base, ft, m = s[(cell, "base", b)], s[(cell, "ft", b)], s[(cell, method, b)]
            kind = classify(ft, base)
            if kind == "damaged":
                healed.append((m - ft) / (base - ft))
            elif kind == "improved":
                preserved.append((m - base) / (ft - base))
            else:
                unchanged_ok.append(1.0 if within_threshold(m, base, non_damage) else 0.0)
    pct_healed, non_damage, pct_preserved = _mean(healed), _mean(unchanged_ok), _mean(preserved)
    on_task = _mean(task_ratios)
    clean_up = harmonic_mean(pct_healed, non_damage)
    retention = harmonic_mean(pct_preserved, on_task)
    return PopulationScore(method, cohort, len(task_ratios), len(healed), len(preserved), len(unchanged_ok),
                           pct_healed, non_damage, pct_preserved, on_task, clean_up, retention,
                           harmonic_mean(clean_up, retention))


def all_methods(table: ScoreTable) -> list[str]:
    return list(dict.fromkeys(m for _, m, _ in table.scores if m not in REFERENCES))


def score_populations(table: ScoreTable, cohorts: Iterable[str] | None = None,
                      non_damage: str = "two-sided") -> list[PopulationScore]:
    """Overall, then each cohort, for every method (in order of first appearance)."""
    validate(table)
    names = [OVERALL, *(cohort_names(table) if cohorts is None else cohorts)]
    rows = (score_population(table, m, c, non_damage) for c in names for m in all_methods(table))
    return [r for r in rows if r.n_cells > 0]


def to_records(cells: list[CellScore], populations: list[PopulationScore]) -> list[dict[str, object]]:
    """The `--json` list: one record per (cell, method), then the population records (`cell` null)."""
    out: list[dict[str, object]] = []
    for c in cells:
        out.append({"level": "cell", "cell": c.cell, "method": c.method, "healed": c.healed,
                    "preserved": c.preserved, "combined": c.combined, "balance": c.balance,
                    "held_out_ratio": c.held_out_ratio, "on_task_ratio": c.on_task_ratio,
                    "n_damaged": c.n_damaged, "n_improved": c.n_improved, "n_unchanged": c.n_unchanged})
    for p in populations:
        out.append({"level": "population", "cell": None, "method": p.method, "cohort": p.cohort,
                    "pct_healed": p.pct_healed, "non_damage": p.non_damage, "pct_preserved": p.pct_preserved,
                    "on_task_retention": p.on_task_retention, "clean_up": p.clean_up, "retention": p.retention,
                    "combined": p.combined, "n_cells": p.n_cells, "n_damaged": p.n_damaged,
                    "n_improved": p.n_improved, "n_unchanged": p.n_unchanged})
    return out


def format_text(cells: list[CellScore], populations: list[PopulationScore]) -> str:
    """Per-cell rows as fractions (the paper's Tab. 14/15 style), population rows in % (Tab. 1 style)."""
    w = max([len(c.cell) for c in cells] + [4])
    mw = max([len(c.method) for c in cells] + [6])
    lines = [f"{'cell':<{w}}  {'method':<{mw}}  dmg imp unch  healed  preserved  combined  balance"]
    for c in cells:
        lines.append(f"{c.cell:<{w}}  {c.method:<{mw}}  {c.n_damaged:>3} {c.n_improved:>3} {c.n_unchanged:>4}  "
                     f"{c.healed:>6.4f}  {c.preserved:>9.4f}  {c.combined:>8.4f}  {c.balance:>7.4f}")
    cw = max([len(p.cohort) for p in populations] + [6])
    lines += ["", "population (%; n = damaged/improved/unchanged triples)",
              f"{'cohort':<{cw}}  {'method':<{mw}}  {'n':>12}  healed  non-dmg  preserved  on-task  clean-up  "
              "retention  combined"]
    for p in populations:
        n = f"{p.n_damaged}/{p.n_improved}/{p.n_unchanged}"
        lines.append(f"{p.cohort:<{cw}}  {p.method:<{mw}}  {n:>12}  {100 * p.pct_healed:>6.1f}  "
                     f"{100 * p.non_damage:>7.1f}  {100 * p.pct_preserved:>9.1f}  {100 * p.on_task_retention:>7.1f}  "
                     f"{100 * p.clean_up:>8.1f}  {100 * p.retention:>9.1f}  {100 * p.combined:>8.1f}")
    return "\n".join(lines)
