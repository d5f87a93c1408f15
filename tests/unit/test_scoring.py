"""`dgrepair score` (docs/scoring.md): values worked by hand, the paper's Tab. 14/15 Combined column and
Tab. 9 partition counts, the population numbers the paper prints (Tab. 1, Tab. 13, Fig. 2), input
validation, and lm-evaluation-harness result files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dgrepair.cli import main
from dgrepair.engine.analysis import score_inputs, scoring
from dgrepair.engine.analysis.scoring import ScoreTable
from dgrepair.engine.errors import InputError

DATA = Path(__file__).parents[1] / "data"
PAPER_SCORES = DATA / "paper_tab14_15_scores.csv"
PAPER_COMBINED = DATA / "paper_tab14_15_combined.csv"


def table_of(rows: list[tuple[str, str, str, float]], cohorts: dict | None = None) -> ScoreTable:
    t = ScoreTable(scores={(c, m, b): v for c, m, b, v in rows}, source="test")
    t.cohorts = cohorts or {}
    return t


def write_csv(path: Path, rows: list[tuple], header: tuple = ("cell", "method", "benchmark", "score")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# One cell worked by hand: A damaged (0.80 -> 0.60), B improved (0.40 -> 0.60), C unchanged.
HAND = [("c", "base", "A", 0.80), ("c", "ft", "A", 0.60), ("c", "m", "A", 0.70),   # healed 0.5
        ("c", "base", "B", 0.40), ("c", "ft", "B", 0.60), ("c", "m", "B", 0.55),   # preserved 0.75
        ("c", "base", "C", 0.50), ("c", "ft", "C", 0.51), ("c", "m", "C", 0.50),   # unchanged
        ("c", "base", "task", 0.50), ("c", "ft", "task", 0.90), ("c", "m", "task", 0.81)]


def test_cell_worked_by_hand():
    (cs,) = scoring.score_cells(table_of(HAND))
    assert (cs.n_damaged, cs.n_improved, cs.n_unchanged) == (1, 1, 1)
    assert cs.healed == pytest.approx(0.5)
    assert cs.preserved == pytest.approx(0.75)
    assert cs.combined == pytest.approx(0.6)  # 2 * 0.5 * 0.75 / 1.25
    # held-out ratio (0.70 + 0.55 + 0.50) / (0.80 + 0.40 + 0.50) = 35/34; on-task 0.81 / 0.90 = 9/10
    assert cs.held_out_ratio == pytest.approx(35 / 34)
    assert cs.on_task_ratio == pytest.approx(0.9)
    assert cs.balance == pytest.approx(630 / 656)  # HM(35/34, 9/10)


def test_clipping_empty_sides_and_zero():
    over = [r if r[1] != "m" else (r[0], r[1], r[2], {"A": 0.95, "B": 0.30, "C": 0.5, "task": 0.9}[r[2]])
            for r in HAND]
    (cs,) = scoring.score_cells(table_of(over))
    assert cs.healed == 1.0  # (0.95 - 0.60) / 0.20 = 1.75, clipped to 1
    assert cs.preserved == 0.0  # (0.30 - 0.40) / 0.20 = -0.5, clipped to 0
    assert cs.combined == 0.0
    only_damaged = [r for r in HAND if r[2] != "B"]
    (cs,) = scoring.score_cells(table_of(only_damaged))
    assert cs.preserved == 1.0 and cs.n_improved == 0  # a side with no benchmarks counts as 1
    assert cs.combined == pytest.approx(2 * 0.5 / 1.5)


@pytest.mark.parametrize("base, ft, expected", [
    (0.300, 0.270, "damaged"),    # 0.27 - 0.30 = -0.02999999999999997 in binary: exactly -3 points as written
    (0.270, 0.300, "improved"),   # +0.02999999999999997
    (0.532, 0.502, "damaged"),    # -0.030000000000000027
    (0.5000, 0.4701, "unchanged"),
    (0.5000, 0.5299, "unchanged"),
    (0.5000, 0.4699, "damaged"),
])
def test_threshold_boundary_is_decided_as_written(base, ft, expected):
    assert scoring.classify(ft, base) == expected


def test_non_damage_boundary_and_modes():
    # exactly 3 points below base: kept by the one-sided rule, a change for the two-sided rule
    assert scoring.within_threshold(0.27, 0.30, "one-sided")
    assert not scoring.within_threshold(0.27, 0.30, "two-sided")
    assert not scoring.within_threshold(0.2699, 0.30, "one-sided")
    assert scoring.within_threshold(0.40, 0.30, "one-sided")  # above base is never damage
    assert not scoring.within_threshold(0.40, 0.30, "two-sided")
    assert scoring.within_threshold(0.3299, 0.30, "two-sided")


def test_population_worked_by_hand():
    """Two cells; the population pools triples and does not clip per-triple ratios."""
    rows = [*HAND]
    rows += [("d", "base", "A", 0.50), ("d", "ft", "A", 0.30), ("d", "m", "A", 0.55),  # healed 1.25 (overshoot)
             ("d", "base", "C", 0.50), ("d", "ft", "C", 0.50), ("d", "m", "C", 0.46),  # unchanged, M-Base=-0.04
             ("d", "base", "E", 0.50), ("d", "ft", "E", 0.49), ("d", "m", "E", 0.60),  # unchanged, M-Base=+0.10
             ("d", "base", "task", 0.50), ("d", "ft", "task", 0.80), ("d", "m", "task", 0.60)]
    t = table_of(rows)
    one = scoring.score_population(t, "m", non_damage="one-sided")
    assert (one.n_cells, one.n_damaged, one.n_improved, one.n_unchanged) == (2, 2, 1, 3)
    assert one.pct_healed == pytest.approx((0.5 + 1.25) / 2)
    assert one.pct_preserved == pytest.approx(0.75)
    assert one.non_damage == pytest.approx(2 / 3)  # c/C (0.0) and d/E (+0.10) kept; d/C (-0.04) not
    assert one.on_task_retention == pytest.approx((0.9 + 0.75) / 2)
    assert one.clean_up == pytest.approx(2 * 0.875 * (2 / 3) / (0.875 + 2 / 3))
    assert one.retention == pytest.approx(2 * 0.75 * 0.825 / (0.75 + 0.825))
    assert one.combined == pytest.approx(2 * one.clean_up * one.retention / (one.clean_up + one.retention))
    two = scoring.score_population(t, "m", non_damage="two-sided")
    assert two.non_damage == pytest.approx(1 / 3)  # only c/C is within +-3 points


def test_population_floors_negative_inputs_at_zero():
    rows = [r if not (r[1] == "m" and r[2] == "B") else ("c", "m", "B", 0.30) for r in HAND]  # preserved -0.5
    p = scoring.score_population(table_of(rows), "m")
    assert p.pct_preserved == pytest.approx(-0.5)  # reported as is
    assert p.retention == 0.0 and p.combined == 0.0  # floored at 0 inside the harmonic means


def test_cohorts_select_triples_and_cells():
    labels = {("c", "A"): (("dim", "K"),), ("c", "B"): (("dim", "G"),), ("c", "C"): (("dim", "G"),)}
    t = table_of(HAND, labels)
    assert scoring.cohort_names(t) == ["dim=K", "dim=G"]
    k = scoring.score_population(t, "m", "dim=K")
    assert (k.n_damaged, k.n_improved, k.n_unchanged, k.n_cells) == (1, 0, 0, 1)
    assert k.pct_healed == pytest.approx(0.5) and k.pct_preserved == 1.0  # empty side counts as 1
    assert k.on_task_retention == pytest.approx(0.9)


# --- the paper ------------------------------------------------------------------------------------

def paper_table() -> ScoreTable:
    rows = score_inputs.read_csv(PAPER_SCORES, ("family", "dimension"))
    return score_inputs.build_table(score_inputs.normalise_units(rows, "auto", "paper"), "paper")


def printed_rows() -> list[dict[str, str]]:
    with open(PAPER_COMBINED, newline="") as fh:
        return list(csv.DictReader(fh))


def test_paper_csv_columns_are_what_the_tables_say():
    """The nine held-out columns average to the printed Avg. column, so the column mapping is right."""
    t = paper_table()
    assert len(t.cells()) == 14 and len(printed_rows()) == 14 * 9
    for row in printed_rows():
        bench = [b for b in t.benchmarks(row["cell"], row["method"]) if b != "task"]
        assert len(bench) == 9
        mean = sum(t.scores[(row["cell"], row["method"], b)] for b in bench) / 9
        assert mean == pytest.approx(float(row["printed_avg"]), abs=1e-4), row  # every value is rounded to 4 decimals


def test_paper_tab14_tab15_combined_column():
    t = paper_table()
    cells = {(c.cell, c.method): c for c in scoring.score_cells(t)}
    checked, worst = 0, 0.0
    for row in printed_rows():
        if not row["printed_combined"]:
            continue  # Pre-trained and Full-SFT have none
        ours = cells[(row["cell"], row["method"])].combined
        worst = max(worst, abs(ours - float(row["printed_combined"])))
        assert ours == pytest.approx(float(row["printed_combined"]), abs=1e-3), row
        checked += 1
    assert checked == 98
    assert worst < 1e-3
    assert cells[("Qwen/MedQA", "WiSE-FT")].combined == pytest.approx(0.9437, abs=1e-3)  # the worked example


def test_paper_tab9_partition_counts():
    """Tab. 9: damaged / improved held-out benchmarks per (model, task) cell; 30 / 55 over 14 cells."""
    tab9 = {"Qwen/RTE": (2, 5), "Qwen/StrategyQA": (2, 5), "Qwen/ReClor": (3, 5), "Qwen/BoolQ": (2, 5),
            "Qwen/MedQA": (4, 4), "Qwen/WikiQA": (2, 5), "Qwen/Winogrande": (3, 3), "Llama/RTE": (3, 3),
            "Llama/StrategyQA": (3, 3), "Llama/ReClor": (0, 4), "Llama/BoolQ": (2, 2), "Llama/MedQA": (1, 4),
            "Llama/WikiQA": (2, 3), "Llama/Winogrande": (1, 4)}
    cells = {c.cell: (c.n_damaged, c.n_improved) for c in scoring.score_cells(paper_table()) if c.method == "DG-Hard"}
    assert cells == tab9
    overall = scoring.score_population(paper_table(), "DG-Hard", non_damage="one-sided")
    assert (overall.n_damaged, overall.n_improved, overall.n_unchanged) == (30, 55, 41)


# Combined (%) as printed: Tab. 1 (overall, every method) and Tab. 13 / Fig. 2 / Fig. 3 (per cohort).
PAPER_POPULATION = {
    ("DG-Hard", "overall"): 83.3, ("WiSE-FT", "overall"): 76.4, ("L1-reg", "overall"): 66.7,
    ("CoFi-Tune", "overall"): 41.7, ("V-SoftMask", "overall"): 39.7, ("LoRA", "overall"): 16.3,
    ("FAPM", "overall"): 0.0,
    ("DG-Hard", "dimension=Knowledge"): 84.8, ("DG-Hard", "dimension=Cognition"): 82.1,
    ("DG-Hard", "family=Reasoning"): 80.5, ("DG-Hard", "family=Non-reasoning"): 83.2,
    ("WiSE-FT", "dimension=Knowledge"): 83.7, ("WiSE-FT", "dimension=Cognition"): 66.8,
    ("WiSE-FT", "family=Reasoning"): 72.7, ("WiSE-FT", "family=Non-reasoning"): 80.1,
    ("V-SoftMask", "dimension=Knowledge"): 67.7,
}


def test_paper_population_combined():
    """15 of the 16 printed values agree to the printed digit; WiSE-FT Non-reasoning gives 80.03 against
    a printed 80.1 (the inputs are rounded to 4 decimals; preserved ratios divide by FT gains of a few
    points, which amplifies that rounding). Fig. 2's L1-reg Knowledge Clean-up of 102.0 shows that
    population % healed is not clipped."""
    got = {(p.method, p.cohort): p for p in scoring.score_populations(paper_table(), non_damage="one-sided")}
    exact = 0
    for key, printed in PAPER_POPULATION.items():
        ours = 100 * got[key].combined
        assert ours == pytest.approx(printed, abs=0.1), key
        exact += abs(ours - printed) <= 0.05
    assert exact == 15
    assert 100 * got[("L1-reg", "dimension=Knowledge")].clean_up == pytest.approx(102.0, abs=0.05)


def test_spec_two_sided_non_damage_does_not_reproduce_the_paper():
    """Why one-sided exists beside the default: the literal |M - Base| < 0.03 misses Knowledge by
    6 points."""
    got = {(p.method, p.cohort): p for p in scoring.score_populations(paper_table(), non_damage="two-sided")}
    assert 100 * got[("DG-Hard", "dimension=Knowledge")].combined == pytest.approx(78.9, abs=0.05)
    assert 100 * got[("DG-Hard", "overall")].combined == pytest.approx(82.7, abs=0.05)


# --- the command and its inputs -------------------------------------------------------------------

def test_cli_json_records(capsys):
    assert main(["score", "--table", str(PAPER_SCORES), "--cohort-column", "family", "--json",
                 "--non-damage", "one-sided"]) == 0
    records = json.loads(capsys.readouterr().out)
    cells = [r for r in records if r["level"] == "cell"]
    pops = [r for r in records if r["level"] == "population"]
    assert len(cells) == 98
    assert {"cell", "method", "healed", "preserved", "combined", "balance"} <= set(cells[0])
    wise = next(r for r in cells if r["cell"] == "Qwen/MedQA" and r["method"] == "WiSE-FT")
    assert wise["combined"] == pytest.approx(0.9437, abs=1e-3)
    assert {r["cohort"] for r in pops} == {"overall", "family=Reasoning", "family=Non-reasoning"}
    dg = next(r for r in pops if r["method"] == "DG-Hard" and r["cohort"] == "overall")
    assert dg["combined"] == pytest.approx(0.833, abs=5e-4)
    assert records.index(cells[-1]) < records.index(pops[0])  # population rows come below the cells
    assert main(["score", "--table", str(PAPER_SCORES), "--json"]) == 0  # default: the two-sided rule
    dg_spec = next(r for r in json.loads(capsys.readouterr().out)
                   if r["level"] == "population" and r["method"] == "DG-Hard" and r["cohort"] == "overall")
    assert dg_spec["combined"] == pytest.approx(0.827, abs=5e-4)


def test_cli_table_and_percent_units(tmp_path, capsys):
    pct = write_csv(tmp_path / "pct.csv", [(c, m, b, f"{100 * v:g}") for c, m, b, v in HAND])
    frac = write_csv(tmp_path / "frac.csv", HAND)
    assert main(["score", "--table", str(pct), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["score", "--table", str(frac), "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a[0]["combined"] == pytest.approx(b[0]["combined"]) == pytest.approx(0.6)
    assert main(["score", "--table", str(frac)]) == 0
    text = capsys.readouterr().out
    assert "0.6000" in text and "overall" in text


@pytest.mark.parametrize("rows, message", [
    ([r for r in HAND if r[1] != "base"], "no rows for method 'base'"),
    ([r for r in HAND if not (r[1] == "ft" and r[2] == "task")], "base and ft must score the same"),
    ([r for r in HAND if r[2] != "task"], "no on-task benchmark named 'task'"),
    ([r for r in HAND if not (r[1] == "m" and r[2] == "B")], "method 'm' has no score for B"),
    ([*HAND, ("c", "m", "Z", 0.5)], "scores Z, which base and ft do not"),
    ([r for r in HAND if r[1] != "m"], "has only the references"),
    ([r if r[:3] != ("c", "ft", "task") else ("c", "ft", "task", 0.0) for r in HAND], "ft scores 0 on 'task'"),
    ([r if r[1] != "base" or r[2] == "task" else (*r[:3], 0.0) for r in HAND], "base scores 0 on every held-out"),
])
def test_structural_errors(tmp_path, capsys, rows, message):
    path = write_csv(tmp_path / "s.csv", rows)
    assert main(["score", "--table", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


@pytest.mark.parametrize("extra, message", [
    ([("c", "m", "A", "0.7")], "line 14: duplicate score for cell 'c', method 'm', benchmark 'A' (first given at"),
    ([("c", "x", "A", "abc")], "line 14: score 'abc' is not a number"),
    ([("c", "x", "A", "nan")], "line 14: score 'nan' is not a finite number"),
    ([("c", "x", "A", "-0.1")], "line 14: score -0.1 is negative"),
    ([("c", "x", "A", "55")], "line 2: score 0.8 looks like a fraction"),
])
def test_row_errors_name_file_and_line(tmp_path, capsys, extra, message):
    path = write_csv(tmp_path / "s.csv", [*HAND, *extra])
    before = path.read_bytes()
    assert main(["score", "--table", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert path.read_bytes() == before


def test_header_errors(tmp_path, capsys):
    path = write_csv(tmp_path / "s.csv", HAND, header=("cell", "method", "bench", "score"))
    assert main(["score", "--table", str(path)]) == 2
    assert "no column 'benchmark'" in capsys.readouterr().err
    path = write_csv(tmp_path / "t.csv", HAND)
    assert main(["score", "--table", str(path), "--cohort-column", "family"]) == 2
    assert "no column 'family'" in capsys.readouterr().err
    assert main(["score", "--table", str(tmp_path / "missing.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["score", "--table", str(path), "--units", "percent"]) == 0  # 0.8 % etc.: legal when asked
    capsys.readouterr()


def test_conflicting_cohort_labels(tmp_path, capsys):
    rows = [(*r, "K") for r in HAND]
    rows[1] = (*HAND[1], "G")
    path = write_csv(tmp_path / "s.csv", rows, header=("cell", "method", "benchmark", "score", "dim"))
    assert main(["score", "--table", str(path), "--cohort-column", "dim"]) == 2
    assert "conflicts with 'K'" in capsys.readouterr().err


# --- lm-evaluation-harness results ---------------------------------------------------------------

def lm_eval_file(path: Path, scores: dict[str, float], task_key: dict[str, str] | None = None) -> Path:
    """The layout lm_eval --output_path writes (v0.4): results per task with `metric,filter` keys,
    group aggregates with their subtasks listed in group_subtasks."""
    results: dict[str, dict] = {}
    for task, value in scores.items():
        key = (task_key or {}).get(task, "acc,none")
        results[task] = {"alias": task, key: value, key.replace(",", "_stderr,", 1): "N/A"}
    results["mmlu_anatomy"] = {"alias": " - anatomy", "acc,none": 0.123, "acc_stderr,none": 0.01}
    data = {"results": results, "group_subtasks": {"mmlu": ["mmlu_anatomy"]}, "configs": {}, "versions": {},
            "n-shot": {}, "config": {"model": "hf"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_lm_eval_inputs_match_the_csv_path(tmp_path, capsys):
    names = {"A": "arc_challenge", "B": "gsm8k", "C": "mmlu", "task": "medqa_4options"}
    keys = {"gsm8k": "exact_match,strict-match"}
    paths = {}
    for method in ("base", "ft", "m"):
        scores = {names[b]: v for c, m, b, v in HAND if m == method}
        paths[method] = lm_eval_file(tmp_path / method / "model" / "results_2026-01-01.json", scores, keys)
    argv = ["score", "--cell", "c", "--task-benchmark", "medqa_4options", "--json",
            "--lm-eval", f"base={paths['base']}", f"ft={tmp_path / 'ft'}",  # a folder works too
            "--lm-eval", f"m={paths['m']}"]
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["cell"] == "c" and records[0]["method"] == "m"
    assert records[0]["combined"] == pytest.approx(0.6)
    assert records[0]["balance"] == pytest.approx(630 / 656)  # mmlu_anatomy (a subtask) left out
    assert main(argv[:-2]) == 2  # only base and ft: nothing to score
    assert "only the references" in capsys.readouterr().err
    bad = lm_eval_file(tmp_path / "bad.json", {"arc_challenge": 0.5, "gsm8k": 0.5, "mmlu": 0.5,
                                               "medqa_4options": 0.5}, {"gsm8k": "bleu,none"})
    assert main([*argv, "--lm-eval", f"x={bad}"]) == 2
    err = capsys.readouterr().err
    assert "task 'gsm8k' has no metric" in err and "bleu,none" in err and str(bad) in err
    assert main(["score", "--lm-eval", f"base={paths['base']}"]) == 2
    assert "--task-benchmark" in capsys.readouterr().err


def test_lm_eval_file_errors(tmp_path):
    not_json = tmp_path / "r.json"
    not_json.write_text("{nope")
    with pytest.raises(InputError, match="not a readable JSON"):
        score_inputs.read_lm_eval(not_json, "m", "c", "t")
    no_results = tmp_path / "n.json"
    no_results.write_text(json.dumps({"config": {}}))
    with pytest.raises(InputError, match="no 'results' mapping"):
        score_inputs.read_lm_eval(no_results, "m", "c", "t")
    ok = lm_eval_file(tmp_path / "ok.json", {"arc": 0.5})
    with pytest.raises(InputError, match="no task 'medqa'"):
        score_inputs.read_lm_eval(ok, "m", "c", "medqa")
    rows = score_inputs.read_lm_eval(ok, "m", "c", "arc", {"arc": "acc"})
    assert [(r.benchmark, r.value) for r in rows] == [("task", 0.5)]
