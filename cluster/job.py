"""`ray job submit ... -- python -m dgrepair.cluster.job --config repair.yaml`: the driver on the head.

The config file has the same schema as the CLI options (dgrepair.engine.config.RepairConfig). The
Ray job supervisor sets RAY_ADDRESS, so the driver joins the cluster the job runs on. Exit codes
match the CLI: 0 done, 2 bad input, 3 some tensors failed (the rest is committed; resubmit with a
new submission id to retry them), 143 stopped by `ray job stop` (resubmit to resume).
"""

from __future__ import annotations

import argparse
import sys

from ..engine.config import RepairConfig
from ..engine.errors import DGRepairError
from .driver import run_distributed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dgrepair.cluster.job", description=__doc__)
    ap.add_argument("--config", required=True, help="YAML file with the repair options")
    ap.add_argument("--address", help="Ray address (default: RAY_ADDRESS, set by the job supervisor)")
    args = ap.parse_args(argv)
    try:
        cfg = RepairConfig.from_yaml(args.config, {"address": args.address} if args.address else {})
        summary = run_distributed(cfg)
    except DGRepairError as exc:
        print(f"dgrepair: error: {exc}", file=sys.stderr)
        return exc.exit_code
    totals = summary["totals"]
    print(f"repaired {totals['matrices_repaired']} matrices in {totals['tensors']} tensors; plan {summary['plan_id']}"
          f"; wrote {cfg.output.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
