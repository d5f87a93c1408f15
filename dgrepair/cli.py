"""`dgrepair` command line: repair, plan, demo, score, report.

Repair options are generated from `RepairConfig`, so the flags, the YAML file and the Ray job share
one schema. Errors the user can act on print one message and exit non-zero without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

from . import __version__
from .engine.config import Executor, FlagSpec, RepairConfig, flag_specs
from .engine.errors import DGRepairError, InputError
from .engine.run.interrupt import Interrupted
from .kernels.spectral import BACKENDS

EXAMPLES = """examples:
  dgrepair demo
  dgrepair plan   --base ./llama-base --ft ./llama-sft
  dgrepair repair --base ./llama-base --ft ./llama-sft --out ./llama-sft-repaired
  dgrepair repair --config repair.yaml --scale 1.5
  dgrepair score  --table scores.csv --cohort-column family
  dgrepair report ./llama-sft-repaired --tensors 'layers.0.mlp.up_proj'
"""


# --help groups, in this order; every option is in exactly one (tests/unit/test_cli_help.py).
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "inputs": ("config", "base", "ft"),
    "method": ("method", "scale", "alpha", "keep_ratio", "ties_lambda", "drop_prob", "dare_rescale", "seed", "rank",
               "target_rho", "median", "kernel", "fp64_rate"),
    "scope": ("min_numel", "mask", "include", "exclude", "treat_as"),
    "formats": ("fused_layout", "out_dtype", "packed_int4"),
    "execution": ("executor", "device", "threads", "batch_mb", "overlap", "commit_interval_s", "progress",
                  "progress_interval_s"),
    "cluster": ("address", "workers", "max_attempts", "inflight_per_worker", "unit_timeout_s", "head_start"),
    "output": ("out", "force", "emit_adapter", "scratch", "lock_ttl_s"),
}
REQUIRED = ("base", "ft", "out")


def _add_config_options(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per option (engine/config.py), grouped by concern; defaults are SUPPRESSed so only explicit
    flags override YAML. A boolean shows the one spelling that changes its default (--force,
    --no-progress); the opposite spelling still works, for overriding a --config file, but is not listed."""
    specs = {s.name: s for s in flag_specs()}
    for title, names in OPTION_GROUPS.items():
        names = tuple(n for n in names if only is None or n in only or n == "config")
        if not names:
            continue
        group = parser.add_argument_group(title)
        for name in names:
            if name == "config":
                group.add_argument("--config", metavar="FILE.yaml", help="YAML file with the options below (names "
                                   "with _ or -); flags given on the command line override it")
            else:
                _add_field(group, specs[name], name in REQUIRED)
            if name == "executor":
                _add_in_process(group)


def _add_field(group: argparse._ArgumentGroup, spec: FlagSpec, required: bool) -> None:
    flag = "--" + spec.name.replace("_", "-")
    help_text, default = spec.help, spec.default
    if required:
        help_text = "REQUIRED (here or in --config): " + help_text
    elif default is not None and default != () and not isinstance(default, bool):
        help_text += f" (default: {default})"
    kw: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS}
    if isinstance(default, bool):
        shown, hidden = (flag, "--no-" + flag[2:]) if not default else ("--no-" + flag[2:], flag)
        group.add_argument(shown, action="store_const", const=not default, help=help_text, **kw)
        group.add_argument(hidden, action="store_const", const=default, help=argparse.SUPPRESS, **kw)
    elif spec.repeatable:
        group.add_argument(flag, action="append", metavar=spec.metavar or "REGEX", help=help_text, **kw)
    else:
        typ = spec.type or (type(default) if default is not None else str)
        metavar = None if spec.choices else spec.metavar or spec.name.upper()
        group.add_argument(flag, type=typ, choices=spec.choices, metavar=metavar, help=help_text, **kw)


def _add_in_process(group: argparse._ActionsContainer) -> None:
    """`--in-process`, the older spelling of `--executor local` (`--no-in-process`: `--executor ray`)."""
    kw: dict[str, Any] = {"dest": "executor", "default": argparse.SUPPRESS, "action": "store_const"}
    group.add_argument("--in-process", const="local", help="the same as --executor local", **kw)
    group.add_argument("--no-in-process", const="ray", help=argparse.SUPPRESS, **kw)


def config_from_args(args: argparse.Namespace) -> RepairConfig:
    explicit = {s.name: getattr(args, s.name) for s in flag_specs() if hasattr(args, s.name)}
    if getattr(args, "config", None):
        return RepairConfig.from_yaml(args.config, explicit)
    return RepairConfig.from_mapping(explicit, "command line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgrepair", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Post-hoc DG-Hard repair: for every weight matrix keep only the singular components of "
                    "(fine-tuned - base) above the Donoho-Gavish threshold and write base + that.")
    parser.add_argument("--version", action="version", version=f"dgrepair {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("repair", help="repair a fine-tuned checkpoint (resumes an interrupted run on the "
                                        "same --out)")
    _add_config_options(rep)
    rep.set_defaults(func=cmd_repair)

    plan = sub.add_parser("plan", help="validate the pair and print the plan; writes nothing")
    _add_config_options(plan, only=("base", "ft", "method", "scale", "alpha", "keep_ratio", "ties_lambda",
                                    "drop_prob", "dare_rescale", "seed", "rank", "min_numel", "mask", "include",
                                    "exclude", "median", "kernel", "fused_layout", "out_dtype", "packed_int4",
                                    "treat_as", "fp64_rate", "device", "batch_mb", "overlap"))
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--estimate", metavar="NxTYPE", help="project wall time and peak memory on a cluster: N "
                      "GPUs (a100, h100, h200, b200, l4, a10, l40s) or N CPU workers (cpu), e.g. 8xh100, 32xcpu")
    plan.add_argument("--io-gbps", type=float, default=1.0, help="with --estimate: aggregate read+write rate of "
                      "the shared storage in GB/s (default 1.0)")
    plan.add_argument("--tensors", action="store_true", help="list every tensor with its kind and reason")
    plan.set_defaults(func=cmd_plan)

    demo = sub.add_parser("demo", help="repair a SYNTHETIC pair with a planted low-rank signal and report "
                                       "kept vs planted ranks")
    demo.add_argument("--workdir", help="where to write the synthetic pair and the repair (default: a new "
                                        "temporary directory, kept and printed)")
    demo.add_argument("--dtype", choices=("F32", "BF16", "F16"), default="F32", help="storage dtype (default F32)")
    demo.add_argument("--kernel", choices=BACKENDS, default="auto", help="spectral backend")
    demo.add_argument("--executor", choices=typing.get_args(Executor), default="auto",
                      help="where the units run, as for repair (default: auto)")
    _add_in_process(demo)
    demo.set_defaults(func=cmd_demo)
    _add_score_parser(sub)
    _add_report_parser(sub)
    return parser


def run(cfg: RepairConfig) -> dict[str, Any]:
    """One code path: the engine alone in this process (the local executor), or the Ray driver
    (embedded local Ray unless a cluster is given); `--executor auto` picks (ADR 0019)."""
    from .engine.run.executor import choose_executor, run_repair

    if choose_executor(cfg) == "local":
        return run_repair(cfg)
    from .cluster.driver import run_distributed

    return run_distributed(cfg)


def cmd_repair(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = run(cfg)
    if summary.get("already_complete"):
        print(f"already complete (plan {summary['plan_id']}): nothing to do; output {cfg.output.out}")
        return 0
    totals = summary["totals"]
    print(f"repaired {totals['matrices_repaired']} matrices in {totals['tensors']} tensors "
          f"(global rho {totals['global_rho']:.4f}); plan {summary['plan_id']}; wrote {cfg.output.out}")
    for kind, agg in totals["by_kind"].items():
        print(f"  {kind:<8} {agg['matrices']:>7} matrices, kept rank {agg['rank_kept']} of {agg['rank_total']}")
    for node, agg in summary.get("executor", {}).get("per_node", {}).items():
        print(f"  node {node}: {agg['tensors']} tensors in {agg['units']} units, {agg['seconds']:.1f} s busy, "
              f"read {agg['bytes_read'] / 1e9:.2f} GB, wrote {agg['bytes_written'] / 1e9:.2f} GB")
    meta = f"{str(cfg.output.out).rstrip('/')}/dgrepair"
    print(f"manifest: {meta}/manifest.parquet  summary: {meta}/summary.json")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .engine.run.inputs import load_inputs

    cfg = config_from_args(args)
    inp = load_inputs(cfg, need_out=False)
    summary = inp.plan.summary()
    summary["precision"] = _precision(inp.plan.entries, cfg)
    if args.estimate:
        from .engine.analysis.estimate import estimate, parse_cluster, plan_work

        work, io, largest = plan_work(inp.plan.entries)
        summary["estimate"] = estimate(work, io, largest, parse_cluster(args.estimate), args.io_gbps,
                                       cfg.execution.kernel, cfg.execution.overlap, cfg.execution.batch_mb << 20)
    entries = [{"tensor": e.name, "kind": e.kind, "reason": e.reason, "shape": list(e.ft.shape),
                "dtype": e.ft.dtype, "shard": e.shard, "written": _written(e)} for e in inp.plan.entries]
    if args.json:
        print(json.dumps({**summary, "entries": entries}, indent=2))
    else:
        _print_plan(summary, entries if args.tensors else None)
    return 0 if not (summary["shape_mismatches"] or summary["refused"]) else 2


def _precision(entries, cfg) -> dict[str, str]:
    """Output dtype -> the precision policy's decision on this machine's device (ADR 0011)."""
    from .engine.plan.kinds import REPAIR_KINDS
    from .engine.run.jobs import policy_out_dtype
    from .kernels.spectral import precision_policy, resolve_device

    try:
        device = resolve_device(cfg.execution.device)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    dtypes = sorted({policy_out_dtype(e) for e in entries if e.kind in REPAIR_KINDS})
    ex = cfg.execution
    return {d: "{}: {}".format(*precision_policy(ex.kernel, d, device, ex.fp64_rate)) + f" (on {device})"
            for d in dtypes}


def _written(e) -> dict[str, Any] | None:
    """How a tensor is written when that differs from the fine-tune (--out-dtype bf16); None otherwise."""
    if e.dropped:
        return {"dropped": True}
    name, dtype, shape = e.written
    if (name, dtype, tuple(shape)) == (e.name, e.ft.dtype, tuple(e.ft.shape)):
        return None
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def _print_plan(summary: dict[str, Any], entries: list[dict[str, Any]] | None) -> None:
    print(f"plan {summary['plan_id']}: {summary['tensors']} tensors, {summary['bytes_total'] / 2**20:.1f} MiB")
    for kind, count in summary["tensors_by_kind"].items():
        print(f"  {kind:<12} {count:>7} tensors  {summary['bytes_by_kind'][kind] / 2**20:>10.1f} MiB")
    print(f"  matrices to repair: {summary['matrices_to_repair']}  (~{summary['estimated_gflop']} GFLOP)")
    for s in summary.get("packed_schemes", []):
        print(f"  packed {s['side']} {s['group']}: {s['scheme']}, {s['tensors']} tensors")
    for dtype, decision in summary.get("precision", {}).items():
        print(f"  precision, {dtype} outputs: {decision}")
    for reason, count in summary["passthrough_reasons"].items():
        print(f"  passthrough, {reason}: {count}")
    for label in ("ft_only", "base_only"):
        names = summary[label]
        if names:
            more = f" ... (+{len(names) - 5})" if len(names) > 5 else ""
            print(f"  {label.replace('_', '-')} keys ({len(names)}): {', '.join(names[:5])}{more}")
    for line in summary["shape_mismatches"]:
        print(f"  ERROR {line}")
    for r in summary["refused"]:
        print(f"  REFUSED {r['tensor']} ({r['shard']}): {r['reason']}")
    if "estimate" in summary:
        from .engine.analysis.estimate import format_estimate

        for line in format_estimate(summary["estimate"]):
            print(line)
    if entries:
        for e in entries:
            print(f"  {e['kind']:<12} {e['dtype']:<5} {str(e['shape']):<20} {e['tensor']}  [{e['reason']}]")


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine.demo.demo import run_demo

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dgrepair-demo-"))
    run_demo(workdir, dtype=args.dtype, kernel=args.kernel, stream=sys.stdout, executor=run,
             executor_choice=args.executor)
    return 0


def _add_score_parser(sub: argparse._SubParsersAction) -> None:
    from .engine.analysis.score_inputs import UNITS

    score = sub.add_parser(
        "score", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="score methods against base and ft from benchmark results (paper §3.4: healed, preserved, "
             "Combined, balance; population Clean-up / Retention / Combined)",
        description="Score repair methods the way the paper does (docs/scoring.md). Input: a long-format CSV with "
                    "columns cell,method,benchmark,score (methods 'base' and 'ft' are the references; the "
                    "on-task benchmark is named 'task'), and/or lm-evaluation-harness results files, one per "
                    "method, for one cell.")
    score.add_argument("--table", action="append", default=[], metavar="FILE.csv",
                       help="long-format CSV: cell,method,benchmark,score[,cohort columns] (repeatable)")
    score.add_argument("--cohort-column", action="append", default=[], metavar="NAME",
                       help="CSV column holding a cohort label per (cell, benchmark); population scores are also "
                            "given per label (repeatable)")
    score.add_argument("--lm-eval", nargs="+", action="extend", default=[], metavar="METHOD=PATH",
                       help="lm-eval results JSON (or the folder holding one) per method, e.g. --lm-eval "
                            "base=PATH ft=PATH dg_hard=PATH; base and ft are required (repeatable)")
    score.add_argument("--cell", default="lm-eval", help="cell name for the --lm-eval results (default: lm-eval)")
    score.add_argument("--task-benchmark", metavar="TASK",
                       help="the lm-eval task that is the fine-tuning (on-task) benchmark; required with --lm-eval")
    score.add_argument("--metric", action="append", default=[], metavar="TASK=KEY",
                       help="lm-eval metric key for a task, e.g. gsm8k=exact_match,flexible-extract (default: the "
                            "first of acc, exact_match strict-match, prompt_level_strict_acc, acc_norm, ...)")
    score.add_argument("--units", choices=UNITS, default="auto",
                       help="scores are fractions in [0,1] or percentages in [0,100]; auto decides per file "
                            "(default: auto)")
    score.add_argument("--non-damage", choices=("one-sided", "two-sided"), default="two-sided",
                       help="population non-damage: one-sided = M - Base >= -0.03 on unchanged triples (reproduces "
                            "the paper's numbers), two-sided = |M - Base| < 0.03 (docs/scoring.md, as written) "
                            "(default: two-sided)")
    score.add_argument("--json", action="store_true", help="print a JSON list of records instead of the table")
    score.set_defaults(func=cmd_score)


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"{flag} {v!r}: expected NAME=VALUE.")
        out.append((key.strip(), value.strip()))
    return out


def cmd_score(args: argparse.Namespace) -> int:
    from .engine.analysis import score_inputs, scoring

    if not args.table and not args.lm_eval:
        raise InputError("score: give --table FILE.csv and/or --lm-eval METHOD=PATH (with base= and ft=).")
    rows: list[score_inputs.RawScore] = []
    for path in args.table:
        rows += score_inputs.normalise_units(score_inputs.read_csv(path, tuple(args.cohort_column)), args.units,
                                             f"score table {path}")
    if args.lm_eval:
        if not args.task_benchmark:
            raise InputError("score: --lm-eval needs --task-benchmark TASK (the lm-eval task the model was "
                             "fine-tuned for).")
        metrics = dict(_pairs(args.metric, "--metric"))
        for method, path in _pairs(args.lm_eval, "--lm-eval"):
            read = score_inputs.read_lm_eval(path, method, args.cell, args.task_benchmark, metrics)
            rows += score_inputs.normalise_units(read, args.units, f"lm-eval results {path}")
    sources = ", ".join([*args.table, *(p for _, p in _pairs(args.lm_eval, "--lm-eval"))])
    table = score_inputs.build_table(rows, sources)
    cells = scoring.score_cells(table)
    populations = scoring.score_populations(table, non_damage=args.non_damage)
    if args.json:
        print(json.dumps(scoring.to_records(cells, populations), indent=1))
    else:
        print(scoring.format_text(cells, populations))
    return 0


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report", help="write a Markdown/HTML report with figures for a finished run (noise per layer class, "
                       "kept ranks, rho per layer, spectra)",
        description="Render OUT/dgrepair/report/report.md (or .html), report.json and PNG figures from a finished "
                    "run's manifest and summary.json. Spectra are recomputed from the run's base and fine-tune.")
    report.add_argument("out", metavar="OUT", help="output directory of a finished dgrepair repair run")
    report.add_argument("--format", choices=("md", "html"), default="md", help="report format (default: md)")
    report.add_argument("--tensors", nargs="+", action="extend", metavar="REGEX",
                        help="plot the spectrum of the repaired tensors matching any of these regexes (searched in "
                             "the names; default: the 2-D matrix with the largest ||delta||_F)")
    report.add_argument("--max-spectra", type=int, default=8, metavar="N",
                        help="plot at most N matrices (stacked experts count one per expert) (default: 8)")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .engine.analysis.report import build_report

    if args.max_spectra < 1:
        raise InputError(f"--max-spectra must be >= 1, got {args.max_spectra}.")
    target = build_report(Path(args.out), args.format, args.tensors, args.max_spectra)
    print(f"wrote {target} (figures and report.json beside it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DGRepairError as exc:
        print(f"dgrepair: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt) as exc:
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
        name = str(exc) if isinstance(exc, Interrupted) else "SIGINT"
        print(f"dgrepair: stopped by {name}; finished work is committed and the output lock released. "
              "Re-run the same command to resume.", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
