"""Second round of the forgetting lab: two tasks, 120/300/1000-step fine-tunes, phases in priority order.

    OMP_NUM_THREADS=1 nice -n 19 python bench/forgetting_lab/round2.py --workdir /work/lab2_work --threads 1

Every phase skips what its workdir already holds (fine-tune checkpoints, the trajectory's saved optimiser
state, repairs, evaluations per benchmark), so the same command resumes after a kill. The results also go to
the ledger in git (lab_ledger.py), restored first, so the command continues in a new session on a new
machine: finished cells are not recomputed, and fine-tunes are retrained only where a result is missing.
Phases run in order of how much they answer (README "Round 2 plan"): the learning-rate sweep, then the
120-step cells of each task (DG-Hard@1 and the four baselines at its ρ), the 300-step cells, the
1,000-step cell, and last the fixed-knob variants (DG-Hard scale 0.5/2, WiSE-FT 0.5). After each phase the
report is rebuilt from the cache (`--cached-only`, nothing re-evaluated). `--phases` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab_ledger  # noqa: E402
import run as lab  # noqa: E402
from lab_base import build_base  # noqa: E402
from lab_cost import machine_time  # noqa: E402
from lab_finetune import STATE_DIR, finetune  # noqa: E402
from lab_stats import paired_difference  # noqa: E402

CORE = ["dg_hard@1", "wise_ft@rho", "ties@rho", "dare@rho", "fixed_rank@rho"]
PAIRED_METHOD = "dg_hard@1"
PAIRED_AGAINST = ["ft", "wise_ft@rho", "ties@rho", "dare@rho", "fixed_rank@rho", "dg_hard@0.5", "dg_hard@2",
                  "wise_ft@0.5"]
PAIRED_BENCHMARKS = ("geography", "task")  # the damaged skill and the fine-tuned one (binary items)
KNOBS = ["dg_hard@1", "dg_hard@0.5", "dg_hard@2", "wise_ft@0.5"]
TASKS = ("add", "date")
SWEEP_CRITERION = ("highest held-out task accuracy at the sweep length among learning rates whose loss fell "
                   "(mean of the last 10 steps below the first 10; half of a sweep under 20 steps); accuracies "
                   "within 0.02 of the best go to the smaller learning rate (fixed before the sweep ran).")


@dataclass(frozen=True)
class Plan:
    """The grid's sizes (defaults: the committed round-2 plan; the smoke test shrinks them)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    sweep_steps: int = 60
    noise_steps: tuple[int, ...] = (15, 30)  # repair-only checkpoints for the noise-residual table
    lengths: tuple[int, ...] = (120, 300)  # both tasks, every seed
    long: int = 1000  # first task, first seed
    tasks: tuple[str, ...] = TASKS

    def phases(self) -> list[str]:
        """Priority order: sweep, each length's core cells task by task, the long run, then fixed knobs."""
        return (["sweep"] + [f"{t}{n}" for n in self.lengths for t in self.tasks] + [f"{self.tasks[0]}{self.long}"]
                + [f"knobs{n}" for n in (*self.lengths, self.long)])


def _log(msg: str) -> None:
    print(f"[round2 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sweep(common: list[str], work: Path, task: str, plan: Plan) -> float:
    """The first seed, each LR for `sweep_steps` steps; the checkpoints at the noise lengths and `sweep_steps`
    stay on the trajectory, so the chosen LR's run *is* that seed's main trajectory; SWEEP_CRITERION picks.
    Geography is recorded too (damage against LR), but does not enter the choice."""
    path = work / f"sweep-{task}.json"
    if path.is_file():
        return json.loads(path.read_text())["chosen_lr"]
    args = lab.parse_args(common + ["--task", task])
    base = build_base(work / "base", args.num_layers)
    suite = lab.make_suite(args)
    rows = {}
    seed, n = plan.seeds[0], plan.sweep_steps
    for lr in plan.sweep_lrs:
        troot = lab.trajectory_dir(work, task, lr, seed)
        ft = finetune(base, troot, seed, [*plan.noise_steps, n], lr, args.batch, args.seq_len, task, log=_log)[n]
        res = lab.eval_cached(ft, base, suite, lab.cell_dir(work, task, lr, seed, n) / "evals" / "ft.json",
                              ("task", "geography"))
        losses = json.loads((ft / "lab_ft.json").read_text())["losses"]
        k = min(10, len(losses) // 2)  # 10 steps, or half of a shorter sweep
        rows[f"{lr:g}"] = {"lr": lr, "task": res["task"]["score"], "geography": res["geography"]["score"],
                           "loss_first10": statistics.mean(losses[:k]), "loss_last10": statistics.mean(losses[-k:])}
        _log(f"sweep {task} lr {lr:g}: {rows[f'{lr:g}']}")
    ok = [r for r in rows.values() if r["loss_last10"] < r["loss_first10"]]
    if not ok:
        raise SystemExit(f"sweep {task}: no learning rate lowered the loss over {n} steps: {rows}")
    best = max(r["task"] for r in ok)
    chosen = min(r["lr"] for r in ok if r["task"] >= best - 0.02)
    path.write_text(json.dumps({"task": task, "steps": n, "seed": seed, "rows": rows, "chosen_lr": chosen,
                                "criterion": SWEEP_CRITERION}, indent=1))
    for lr in plan.sweep_lrs:  # the other LRs' optimiser state (1.6 GB each) is never continued
        if lr != chosen:
            shutil.rmtree(lab.trajectory_dir(work, task, lr, seed) / STATE_DIR, ignore_errors=True)
    return chosen


def _cells(common, task, lr, seeds, steps, save, variants, repair_only=False):
    argv = common + ["--task", task, "--lr", repr(lr), "--seeds", *map(str, seeds), "--steps", *map(str, steps),
                     "--save-steps", *map(str, save), "--variants", *variants]
    return lab.main(argv + (["--repair-only"] if repair_only else []))


def _items(path: Path) -> dict[str, list]:
    """Per-item results of PAIRED_BENCHMARKS from one evaluation cache (keys are `<benchmark>:<suite hash>`)."""
    if not path.is_file():
        return {}
    found: dict[str, list] = {}
    for key, res in json.loads(path.read_text()).items():
        bench = key.split(":", 1)[0]
        if bench not in PAIRED_BENCHMARKS:
            continue
        if bench in found:
            raise SystemExit(f"{path}: more than one cached suite for {bench}; expected one")
        found[bench] = res["items"]
    return found


def paired_rows(work: Path, cells: list[dict]) -> list[dict]:
    """DG-Hard@1 against the fine-tune and each matched baseline, per (task, length) and binary benchmark:
    the paired difference with its interval over seeds and items (lab_stats.py)."""
    from lab_report import by_task_length

    rows = []
    for (task, steps), group in by_task_length(cells).items():
        evals = []  # per cell: {variant: {benchmark: items}}, each cache file read once
        for c in group:
            ev = lab.cell_dir(work, task, float(c["lr"]), int(c["seed"]), int(steps)) / "evals"
            evals.append((int(c["seed"]), {v: _items(ev / f"{v}.json") for v in (PAIRED_METHOD, *PAIRED_AGAINST)}))
        for other in PAIRED_AGAINST:
            for bench in PAIRED_BENCHMARKS:
                pairs, seeds = [], []
                for seed, items in evals:
                    a, b = items[PAIRED_METHOD].get(bench), items[other].get(bench)
                    if a is not None and b is not None:
                        pairs.append((a, b))
                        seeds.append(seed)
                if pairs:
                    d = paired_difference(pairs)
                    rows.append({"task": task, "steps": int(steps), "seeds": seeds, "benchmark": bench,
                                 "a": PAIRED_METHOD, "b": other, "n": len(pairs[0][0]), "mean": d.mean,
                                 "lo": d.lo, "hi": d.hi, "per_seed": list(d.per_seed)})
    return rows


def report(common: list[str], work: Path, lrs: dict[str, float], out: Path, plan: Plan) -> None:
    """Merge both tasks' cached results (nothing new is computed) into one report."""
    from lab_report import write_report

    merged: dict = {"cells": [], "scores": [], "unscorable_cells": [], "sweeps": []}
    for task, lr in lrs.items():
        # one call per length: a cached-only call skips a seed that lacks any requested length
        for steps, extra in ((list(plan.noise_steps), ["--repair-only", "--variants", "dg_hard@1"]),
                             *(([n], ["--variants", *CORE, *KNOBS]) for n in (*plan.lengths, plan.long))):
            if not any((lab.trajectory_dir(work, task, lr, s) / f"steps{steps[0]}" / "lab_ft.json").is_file()
                       for s in plan.seeds):
                continue  # not trained yet: nothing cached to report
            r = lab.main(common + ["--task", task, "--lr", repr(lr), "--seeds", *map(str, plan.seeds), "--steps",
                                   *map(str, steps), "--cached-only"] + extra)
            merged["args"], merged["offered_methods"] = r["args"], r["offered_methods"]
            merged["score_exe"] = r.get("score_exe", merged.get("score_exe"))
            merged["cells"] += r["cells"]
            merged["scores"] += r["scores"] or []
            merged["unscorable_cells"] += r.get("unscorable_cells", [])
        sw = work / f"sweep-{task}.json"
        if sw.is_file():
            merged["sweeps"].append(json.loads(sw.read_text()))
    if "args" not in merged:
        return  # nothing trained yet
    merged["machine_time"] = machine_time(work).to_dict()
    merged["paired"] = paired_rows(work, [c for c in merged["cells"] if not c.get("repair_only")])
    (work / "results-round2.json").write_text(json.dumps(merged, indent=1))
    write_report(merged, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the lab runs beside other work)")
    p.add_argument("--phases", nargs="+", help="run only these phases (names: see the README plan)")
    p.add_argument("--report", type=Path, help="default: WORKDIR/report.md")
    p.add_argument("--ledger", type=Path, default=lab_ledger.LEDGER,
                   help="the results kept in git (lab_ledger.py): restored into the workdir first, updated after "
                        "each phase (default: %(default)s)")
    p.add_argument("--no-ledger", action="store_true", help="neither restore nor update the ledger")
    d = Plan()
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--sweep-lrs", type=float, nargs="+", default=list(d.sweep_lrs))
    p.add_argument("--sweep-steps", type=int, default=d.sweep_steps)
    p.add_argument("--noise-steps", type=int, nargs="+", default=list(d.noise_steps))
    p.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths))
    p.add_argument("--long", type=int, default=d.long)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(d.tasks), help="the first gets the long run")
    p.add_argument("--lab-args", nargs=argparse.REMAINDER, default=[],
                   help="passed to every run.py call (smoke test: --num-layers 2 --synthetic --batch 2 ...)")
    a = p.parse_args(argv)
    plan = Plan(tuple(a.seeds), tuple(a.sweep_lrs), a.sweep_steps, tuple(a.noise_steps), tuple(a.lengths), a.long,
                tuple(a.tasks))
    phases = plan.phases()
    if a.phases and set(a.phases) - set(phases):
        p.error(f"unknown phases {sorted(set(a.phases) - set(phases))}; this plan has: {' '.join(phases)}")
    import torch

    torch.set_num_threads(a.threads)
    work = a.workdir
    common = ["--workdir", str(work), "--threads", str(a.threads), *a.lab_args]
    out = a.report or work / "report.md"
    t_start = time.time()
    ledger = None if a.no_ledger else a.ledger
    if ledger is not None:
        _log(f"ledger {ledger}: {len(lab_ledger.restore(ledger, work))} file(s) restored into {work}")
    lrs = {t: sweep(common, work, t, plan) for t in plan.tasks}  # cached after the first run; every phase needs them
    _log(f"learning rates: {lrs}")
    for phase in [ph for ph in phases if not a.phases or ph in a.phases]:
        if phase == "sweep":
            continue
        _log(f"phase {phase}")
        name, n = re.fullmatch(r"([a-z]+)(\d+)", phase).groups()
        n = int(n)
        long_run = n == plan.long
        seeds = plan.seeds[:1] if long_run else plan.seeds
        if name == "knobs":
            for task in (plan.tasks[:1] if long_run else plan.tasks):
                _cells(common, task, lrs[task], seeds, [n], [], KNOBS)
        else:
            save = [s for s in (*plan.noise_steps, *plan.lengths) if s < n]
            _cells(common, name, lrs[name], seeds, [n], save, CORE)
            if n == plan.lengths[0]:  # the noise-residual lengths ride on the same trajectories
                _cells(common, name, lrs[name], seeds, list(plan.noise_steps), [], ["dg_hard@1"], repair_only=True)
        report(common, work, lrs, out, plan)
        if ledger is not None:
            _log(f"ledger {ledger}: {len(lab_ledger.save(work, ledger))} file(s) updated")
        _log(f"phase {phase} done ({(time.time() - t_start) / 60:.1f} min since start)")
    if not out.is_file():
        report(common, work, lrs, out, plan)
    if ledger is not None:
        lab_ledger.save(work, ledger)
    _log("all requested phases done")


if __name__ == "__main__":
    main()
