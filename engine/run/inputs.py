"""The inputs of a run: both checkpoints opened and validated, the output path checked, the plan built;
and, per plan entry, the files its step reads and writes."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import RepairConfig
from ..errors import OutputError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.objstore import StorageError, is_object_uri, parse_uri
from ..io.remote_checkpoint import RemotePath
from ..output import paths, shards
from ..output.bucket import BucketOutput
from ..output.target import LocalOutput, OutputTarget
from ..plan.build import build_plan
from ..plan.kinds import STACK_KINDS
from ..plan.layouts import row_identity
from ..plan.model import Plan, PlanEntry
from .jobs import EntryJob


@dataclass
class Inputs:
    """Both checkpoints opened and validated, the output checked, and the plan built. `out` is the
    local folder the run writes into: the output itself, or the staging folder of a bucket output."""

    cfg: RepairConfig
    base: Checkpoint
    ft: Checkpoint
    out: Path
    plan: Plan
    target: OutputTarget | None = None  # None when the command has no output (plan, estimate)


def load_inputs(cfg: RepairConfig, need_out: bool = True) -> Inputs:
    cfg.require_paths("base", "ft", *(("out",) if need_out else ()))
    base = open_checkpoint(cfg.inputs.base, "base")
    ft = open_checkpoint(cfg.inputs.ft, "fine-tune")
    target = output_target(cfg, [base.root, ft.root]) if need_out else None
    if need_out:
        ft.sidecar_files()  # refuses a sidecar link that leaves the checkpoint before anything is written
    return Inputs(cfg, base, ft, target.local if target else Path(), build_plan(base, ft, cfg), target)


def output_target(cfg: RepairConfig, inputs: list) -> OutputTarget:
    """The configured --out: a local folder, or an s3:// / gs:// prefix staged in --scratch."""
    out = str(cfg.output.out)
    if not is_object_uri(out):
        return LocalOutput(shards.check_out_path(Path(out), inputs))
    try:
        uri = parse_uri(out)
    except StorageError as exc:
        raise OutputError(str(exc)) from None
    for src in inputs:
        if isinstance(src, RemotePath):
            inside, around = uri.is_within(src.uri), src.uri.is_within(uri)
            if inside or around:
                raise OutputError(f"--out {uri} {'is inside' if inside else 'contains'} the input checkpoint {src}; "
                                  "choose a prefix outside both inputs (inputs are never modified).")
    scratch = Path(cfg.output.scratch).expanduser() if cfg.output.scratch else Path(tempfile.gettempdir())
    return BucketOutput(uri, scratch.resolve(), cfg.output.lock_ttl_s)


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
