"""summary.json: totals over the committed manifest (all attempts), plus config, plan id and fingerprints."""

from __future__ import annotations

import datetime as dt
import platform
from collections import Counter, defaultdict
from typing import Any

import torch

from ... import __version__
from ..output import manifest
from ..plan.kinds import REPAIR_KINDS
from .inputs import Inputs


def build_summary(inp: Inputs, started: str, resumed: int, timings: dict[str, float]) -> dict[str, Any]:
    latest = manifest.latest_by_key(manifest.read_rows(inp.out))
    rows = [r for r in latest.values() if r.plan_id == inp.plan.plan_id]
    repaired = [r for r in rows if r.kind in REPAIR_KINDS]
    status = Counter(r.status for r in rows)
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: {"matrices": 0, "rank_kept": 0, "rank_total": 0})
    for r in repaired:
        agg = by_kind[r.kind]
        agg["matrices"] += 1
        agg["rank_kept"] += r.rank_kept or 0
        agg["rank_total"] += r.rank_total or 0
    return {
        "dgrepair_version": __version__,
        "plan_id": inp.plan.plan_id,
        "config": inp.cfg.to_dict(),
        "inputs": inp.plan.fingerprints,
        "plan": inp.plan.summary(),
        "started_utc": started,
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "resumed_entries": resumed,
        "totals": {
            "tensors": len({r.tensor for r in rows}),
            "rows_by_status": dict(sorted(status.items())),
            "matrices_repaired": len(repaired),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "global_rho": manifest.global_rho(repaired),
            "bytes_written": sum(r.byte_end - r.byte_begin for r in rows),
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "platform": platform.platform()},
    }
