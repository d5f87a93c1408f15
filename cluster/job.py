"""`ray job submit ... -- python -m dgrepair.cluster.job --config repair.yaml`: the driver on the head.

The config file has the same schema as the CLI options (dgrepair.engine.config.RepairConfig). The
Ray job supervisor sets RAY_ADDRESS, so the driver joins the cluster the job runs on. Exit codes
match the CLI: 0 done, 2 bad input, 3 some tensors failed (the rest is committed; resubmit with a
new submission id to retry them), 143 stopped by SIGTERM (`ray job stop`) or 130 by SIGINT (resubmit to
resume).
"""

from __future__ import annotations

import argparse
import sys

from ..engine.config import RepairConfig
from ..engine.errors import DGRepairError, InputError
from ..engine.run.interrupt import Interrupted
from .driver import run_distributed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dgrepair.cluster.job", description=__doc__)
    ap.add_argument("--config", required=True, help="YAML file with the repair options")
    ap.add_argument("--address", help="Ray address (default: RAY_ADDRESS, set by the job supervisor)")
    args = ap.parse_args(argv)
    try:
        cfg = RepairConfig.from_yaml(args.config, {"address": args.address} if args.address else {})
        if cfg.execution.executor == "local":
            raise InputError(f"config file {args.config}: executor: local (or in_process: true) runs a repair in "
                             "one process, but this entry point always runs it on Ray; remove the option or set "
                             "executor: ray (or auto).")
        summary = run_distributed(cfg, sys.stdout)  # status and progress lines into the job log
    except DGRepairError as exc:
        print(f"dgrepair: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"dgrepair: stopped by {exc}; finished work is committed and the output lock released. Resubmit "
              "to resume.", file=sys.stderr)
        return exc.exit_code
    if summary.get("already_complete"):
        print(f"already complete (plan {summary['plan_id']}): nothing to do; output {cfg.output.out}", flush=True)
        return 0
    totals = summary["totals"]
    print(f"repaired {totals['matrices_repaired']} matrices in {totals['tensors']} tensors; plan {summary['plan_id']}"
          f"; wrote {cfg.output.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
