"""The inputs of a run: both checkpoints opened and validated, the output path checked, the plan built;
and, per plan entry, the files its step reads and writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import RepairConfig
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..output import paths, shards
from ..plan.build import build_plan
from ..plan.kinds import STACK_KINDS
from ..plan.layouts import row_identity
from ..plan.model import Plan, PlanEntry
from .jobs import EntryJob


@dataclass
class Inputs:
    """Both checkpoints opened and validated, the output path checked, and the plan built."""

    cfg: RepairConfig
    base: Checkpoint
    ft: Checkpoint
    out: Path
    plan: Plan


def load_inputs(cfg: RepairConfig, need_out: bool = True) -> Inputs:
    cfg.require_paths("base", "ft", *(("out",) if need_out else ()))
    base = open_checkpoint(cfg.inputs.base, "base")
    ft = open_checkpoint(cfg.inputs.ft, "fine-tune")
    out = shards.check_out_path(Path(cfg.output.out), [base.root, ft.root]) if need_out else Path()
    if need_out:
        ft.sidecar_files()  # refuses a sidecar link that leaves the checkpoint before anything is written
    return Inputs(cfg, base, ft, out, build_plan(base, ft, cfg))


def expected_keys(entry: PlanEntry) -> list[tuple[str, int | None, str | None]]:
    """The manifest keys (tensor, expert, part) a finished entry has: one per matrix of a stack."""
    if entry.batch_kind in STACK_KINDS:
        return [(entry.name, *row_identity(entry.batch_kind, i)) for i in range(entry.n_matrices)]
    return [(entry.name, None, None)]


def entry_job(inp: Inputs, e: PlanEntry) -> EntryJob:
    """The files an entry reads and the partial shard it writes."""
    return EntryJob(e, inp.base.entry(e.base_name)[0] if e.base is not None and e.base_name else None,
                    inp.ft.entry(e.name)[0], paths.partial_path(inp.out, e.shard),
                    inp.base.entry(e.base_companion)[0] if e.base_companion else None,
                    inp.base.entry(e.base_packed.zero_point.name)[0]
                    if e.base_packed is not None and e.base_packed.zero_point is not None else None)


def adapter_parts(inp: Inputs) -> Path | None:
    """Where --emit-adapter factors go (None without --emit-adapter)."""
    return paths.adapter_parts_dir(inp.out) if inp.cfg.output.emit_adapter else None
