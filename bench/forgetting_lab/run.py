"""Forgetting lab: build the base, fine-tune, repair with every method through the CLI, evaluate, score.

    python bench/forgetting_lab/run.py --task add --seeds 0 1 2 --steps 120 300 --workdir bench/_work/lab \
        --report bench/_work/lab/report.md

Everything is cached in the workdir (base, fine-tune trajectories and their optimiser state, repairs,
evaluations per benchmark), so re-running the same command resumes; adding seeds, steps, tasks or
methods only computes what is missing. `round2.py` runs the whole second-round grid in priority order.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab_base import build_base  # noqa: E402
from lab_data import TASKS, Suite, build_suite, synthetic_suite  # noqa: E402
from lab_evaluate import BENCHMARKS, evaluate, items_of  # noqa: E402
from lab_finetune import finetune  # noqa: E402
from lab_repair import cli_methods, kept_ranks, run_repair, variants  # noqa: E402
from lab_score import score_exe, score_table, write_table  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="add", help="fine-tuning task")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs="+", default=[15, 30], help="fine-tune lengths (one trajectory)")
    p.add_argument("--save-steps", type=int, nargs="*", default=[],
                   help="further checkpoints to write along the trajectory (not processed in this call)")
    p.add_argument("--workdir", type=Path, default=Path("bench/_work/lab"))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-task", type=int, default=200, help="held-out items of the task")
    p.add_argument("--n-geography", type=int, default=500, help="all capital pairs, then city-in-region pairs")
    p.add_argument("--n-sentences", type=int, default=200)
    p.add_argument("--n-definitions", type=int, default=100)
    p.add_argument("--methods", nargs="+", help="only these repair methods (default: all the CLI offers)")
    p.add_argument("--variants", nargs="+", help="only these variants by name, e.g. dg_hard@1 (default: all)")
    p.add_argument("--num-layers", type=int, help="truncate the base to this many layers (smoke test)")
    p.add_argument("--synthetic", action="store_true", help="tiny built-in eval suite, no WordNet (smoke test)")
    p.add_argument("--keep-models", action="store_true", help="keep repaired weights (default: delete after eval)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for fine-tune/eval (0 = torch default)")
    p.add_argument("--wait", action="store_true",
                   help="wait for fine-tunes another process is writing instead of training them here")
    p.add_argument("--cached-only", action="store_true",
                   help="compute nothing new: report only cells, repairs and evals already in the workdir")
    p.add_argument("--repair-only", action="store_true",
                   help="repair and read the manifests, skip evaluation (kept ranks / noise residual only)")
    p.add_argument("--report", type=Path, help="write the markdown report here (e.g. docs/results.md)")
    return p.parse_args(argv)


def cache_key(suite: Suite, benchmark: str) -> str:
    """An evaluation cache's key for one benchmark: `<benchmark>:<hash of its exact items>` (the task's
    items with the task's name and answer length), so a changed item set is never read as cached."""
    items = items_of(suite, benchmark)
    if benchmark == "task":
        items = [suite.task_name, suite.task_new_tokens, items]
    data = [dataclasses.asdict(i) if dataclasses.is_dataclass(i) else i for i in items]
    return f"{benchmark}:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def eval_cached(model_dir: Path, tok_dir: Path, suite: Suite, path: Path, benchmarks=BENCHMARKS) -> dict:
    """Results per benchmark, cached in `path` under `benchmark:items-hash`: only benchmarks whose exact
    items were never scored on this model are evaluated (the base file serves both tasks)."""
    cache = json.loads(path.read_text()) if path.is_file() else {}
    keys = {b: cache_key(suite, b) for b in benchmarks}
    missing = [b for b in benchmarks if keys[b] not in cache]
    if missing:
        cache.update({keys[b]: r for b, r in evaluate(model_dir, tok_dir, suite, missing).items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    return {b: cache[keys[b]] for b in benchmarks}


def has_eval(suite: Suite, path: Path, benchmarks=BENCHMARKS) -> bool:
    cache = json.loads(path.read_text()) if path.is_file() else {}
    return all(cache_key(suite, b) in cache for b in benchmarks)


def trajectory_dir(work: Path, task: str, lr: float, seed: int) -> Path:
    return work / "ft" / f"{task}-lr{lr:g}-s{seed}"


def cell_dir(work: Path, task: str, lr: float, seed: int, steps: int) -> Path:
    return work / "cells" / f"{task}-lr{lr:g}-s{seed}-n{steps}"


def _variant_cached(cdir: Path, name: str, suite: Suite, repair_only: bool) -> bool:
    """A variant's results are all on disk: the repair's summary, its lab record and, unless the cell is
    repair-only, its evaluation (weights are not needed: they are deleted once evaluated)."""
    return ((cdir / "repairs" / name / "dgrepair" / "summary.json").is_file()
            and (cdir / "repairs" / f"{name}.lab.json").is_file()
            and (repair_only or has_eval(suite, cdir / "evals" / f"{name}.json")))


def _pending(work: Path, args: argparse.Namespace, suite: Suite, seed: int, steps: int, offered: set) -> bool:
    """Whether the cell needs its fine-tune's weights: its checkpoint record, the fine-tune's evaluation, or
    a selected variant's results are not cached (a cell restored from the ledger, lab_ledger.py, is complete
    without its weights)."""
    cdir = cell_dir(work, args.task, args.lr, seed, steps)
    if not (trajectory_dir(work, args.task, args.lr, seed) / f"steps{steps}" / "lab_ft.json").is_file():
        return True
    if not args.repair_only and not has_eval(suite, cdir / "evals" / "ft.json"):
        return True
    return not all(_variant_cached(cdir, v.name, suite, args.repair_only) for v in variants(seed, args.methods)
                   if not (args.variants and v.name not in args.variants) and v.method in offered)


def make_suite(args: argparse.Namespace) -> Suite:
    if args.synthetic:
        return synthetic_suite(args.task)
    return build_suite(args.task, args.n_task, args.n_geography, args.n_sentences, args.n_definitions)


def _log(msg: str) -> None:
    print(f"[lab {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = build_base(work / "base", args.num_layers)
    suite = make_suite(args)
    (work / f"suite-{args.task}.json").write_text(json.dumps(dataclasses.asdict(suite), indent=1))
    _log(f"evaluating base ({args.task} suite)")
    base_eval = eval_cached(base, base, suite, work / "base_eval.json")
    offered = cli_methods()
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "offered_methods": sorted(offered), "cells": []}
    rows: list[dict] = []
    for seed in args.seeds:
        troot = trajectory_dir(work, args.task, args.lr, seed)
        if args.wait or args.cached_only:
            ready = {n: troot / f"steps{n}" for n in args.steps}
            while args.wait and not all((p / "lab_ft.json").is_file() for p in ready.values()):
                time.sleep(10)
            if not all((p / "lab_ft.json").is_file() for p in ready.values()):
                continue
        if args.cached_only or not any(_pending(work, args, suite, seed, n, offered) for n in args.steps):
            fts = {n: troot / f"steps{n}" for n in args.steps}  # every result is cached: no weights needed
        else:
            fts = finetune(base, troot, seed, sorted(set(args.steps) | set(args.save_steps)), args.lr, args.batch,
                           args.seq_len, args.task, log=_log)
        for steps in sorted(args.steps):
            ft = fts[steps]
            cell = f"{args.task}-s{seed}-n{steps}"
            cdir = cell_dir(work, args.task, args.lr, seed, steps)
            # repair-only cells feed the kept-rank / noise-residual tables but not the score table
            evaluated = {p.stem for p in (cdir / "evals").glob("*.json") if has_eval(suite, p)}
            repair_only = args.repair_only or (args.cached_only and ("ft" not in evaluated or evaluated == {"ft"}))
            evals = {}
            if not repair_only:
                _log(f"{cell}: evaluating ft")
                evals = {"base": base_eval, "ft": eval_cached(ft, base, suite, cdir / "evals" / "ft.json")}
            info = {"cell": cell, "task": args.task, "seed": seed, "steps": steps, "lr": args.lr, "repairs": {},
                    "skipped": [], "repair_only": repair_only}
            rho = None
            for v in variants(seed, args.methods):
                if args.variants and v.name not in args.variants:
                    continue
                out = cdir / "repairs" / v.name
                done = (out / "dgrepair" / "summary.json").is_file()
                evaluated_v = has_eval(suite, cdir / "evals" / f"{v.name}.json")
                if v.method not in offered or (args.cached_only and not _variant_cached(cdir, v.name, suite,
                                                                                          repair_only)):
                    info["skipped"].append(v.name)
                    continue
                evals_needed = not repair_only and not evaluated_v
                if done and evals_needed and not list(out.glob("*.safetensors")):
                    shutil.rmtree(out)  # repaired earlier in --repair-only mode (weights deleted): redo to evaluate
                t0 = time.time()
                try:
                    summary = run_repair(base, ft, out, v, rho, len(offered) > 1, args.threads)
                except (RuntimeError, ValueError) as exc:  # one refused variant must not stop the grid
                    _log(f"{cell}: {v.name} FAILED: {exc}")
                    info.setdefault("failed", {})[v.name] = str(exc)[-500:]
                    continue
                secs = time.time() - t0
                if v.name == "dg_hard@1":
                    rho = summary["totals"]["global_rho"]
                _log(f"{cell}: {v.name} repaired (global rho {summary['totals']['global_rho']:.4f})")
                rec = cdir / "repairs" / f"{v.name}.lab.json"
                if rec.is_file() and "delta_sq" not in next(iter(json.loads(rec.read_text())["ranks"].values()), {}):
                    old = json.loads(rec.read_text())
                    old["ranks"] = kept_ranks(out)  # older record: refresh the manifest summary
                    rec.write_text(json.dumps(old))
                if not rec.is_file():
                    rec.write_text(json.dumps({"global_rho": summary["totals"]["global_rho"], "ranks": kept_ranks(out),
                                               "repair_seconds": secs,
                                               "command": (out / "lab_command.txt").read_text().strip()
                                               if (out / "lab_command.txt").is_file() else None}))
                info["repairs"][v.name] = json.loads(rec.read_text())
                if not repair_only:
                    _log(f"{cell}: evaluating {v.name}")
                    evals[v.name] = eval_cached(out, base, suite, cdir / "evals" / f"{v.name}.json")
                if not args.keep_models and (repair_only or v.name in evals):
                    for f in out.glob("*.safetensors"):
                        f.unlink()
            info["ft_meta"] = json.loads((ft / "lab_ft.json").read_text())
            results["cells"].append(info)
            if not repair_only and set(evals) <= {"base", "ft"}:
                info["repair_only"] = repair_only = True  # no evaluated repair: nothing to score in this cell
            if repair_only:
                continue
            info["evals"] = {m: {b: {k: v for k, v in e[b].items() if k not in ("items", "completions")}
                                 for b in BENCHMARKS} for m, e in evals.items()}
            rows += [{"cell": cell, "method": m, "benchmark": b, "score": e[b]["score"],
                      "length": f"{args.task}-n{steps}"} for m, e in evals.items() for b in BENCHMARKS]
    results["scores"] = None
    if rows:
        write_table(work / f"scores-{args.task}.csv", rows)
        results["scores"], results["unscorable_cells"] = score_table(work / f"scores-{args.task}.csv")
        results["score_exe"] = score_exe()
    (work / f"results-{args.task}.json").write_text(json.dumps(results, indent=1))
    if args.report:
        from lab_report import write_report

        write_report(results, args.report)
    _log("done")
    return results


if __name__ == "__main__":
    main()
