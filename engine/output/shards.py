"""The output directory: safety checks, preallocated partial shards, atomic finalisation.

Layout while running: `OUT/dgrepair/run.json` (what run owns the folder), `OUT/dgrepair/partial/<shard>`
(preallocated copies of the fine-tune's shards, header already in place, filled at the fine-tune's
offsets) and the manifest. A shard is renamed to `OUT/<shard>` once all its tensors are committed;
sidecars, then the index, then `dgrepair/summary.json` are written last, so only a complete run has
an index and a summary.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..io.bytes import write_atomic, write_json_atomic
from ..io.checkpoint import Checkpoint
from ..plan.model import Plan
from .paths import partial_dir, partial_path, run_file, summary_file


def check_out_path(out: Path, inputs: list[Path]) -> Path:
    """Refuse an output that is, contains, or lies inside an input."""
    resolved = out.expanduser().resolve()
    for src in inputs:
        if resolved == src or resolved.is_relative_to(src):
            raise OutputError(f"--out {out} is inside the input checkpoint {src}; choose a directory outside "
                              "both inputs (inputs are never modified).")
        if src.is_relative_to(resolved):
            raise OutputError(f"--out {out} contains the input checkpoint {src}; choose a separate directory.")
    return resolved


def prepare(out: Path, plan: Plan, ft: Checkpoint, force: bool) -> str:
    """Make `out` ready; returns 'fresh', 'resume' or 'complete'."""
    state = "fresh"
    owner = run_file(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory.")
    if out.exists() and any(out.iterdir()):
        if not owner.is_file():
            raise OutputError(f"--out {out} is not empty and holds no dgrepair run; choose an empty or new "
                              "directory (dgrepair never deletes files it did not write).")
        previous = json.loads(owner.read_text())
        if previous.get("plan_id") == plan.plan_id:
            state = "complete" if summary_file(out).is_file() else "resume"
        elif force:
            _wipe(out)
        else:
            raise OutputError(f"--out {out} holds a different dgrepair run (plan {previous.get('plan_id')}, this "
                              f"run is plan {plan.plan_id}: other inputs or options). Use another directory, or "
                              "--force to replace it.")
    if state == "complete":
        return state
    partial_dir(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(owner, {"plan_id": plan.plan_id, "config": plan.config, "inputs": plan.fingerprints})
    for shard, (prefix, size) in plan.out_shards.items():
        # The prefix is the fine-tune's header byte for byte unless --out-dtype bf16 changed the layout.
        if (out / shard).is_file():
            continue  # finalised by an earlier attempt; verified against the manifest by the runner
        part = partial_path(out, shard)
        if part.is_file() and part.stat().st_size == size and _starts_with(part, prefix):
            continue
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as fh:
            fh.write(prefix)
            fh.truncate(size)
    return state


def finalize_shard(out: Path, shard: str) -> None:
    part = partial_path(out, shard)
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    target = out / shard
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)


def reopen_shard(out: Path, shard: str) -> None:
    """Move a finalised shard back to partial so missing tensors can be rewritten."""
    part = partial_path(out, shard)
    part.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out / shard, part)


def finalize_run(out: Path, ft: Checkpoint, summary: dict[str, Any], plan: Plan) -> list[str]:
    """Sidecars, then the index, then summary.json; returns the sidecar names copied."""
    copied = []
    for src in ft.sidecar_files():
        if src.name == "config.json" and plan.drop_quantization_config:
            write_atomic(out / src.name, _without_quantization_config(src))
        else:
            tmp = out / f".{src.name}.dgrepair-tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, out / src.name)
        copied.append(src.name)
    if ft.index_name and ft.index_bytes is not None:
        write_atomic(out / ft.index_name, new_index(ft.index_bytes, plan) if plan.layout_changed
                            else ft.index_bytes)
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    summary["sidecars"] = copied
    write_json_atomic(summary_file(out), summary)
    return copied


def new_index(old: bytes, plan: Plan) -> bytes:
    """The index of an output whose layout changed: the written names, their shards, the new total_size
    (other metadata kept; total_parameters dropped, since scales are gone)."""
    index = json.loads(old)
    meta = {k: v for k, v in (index.get("metadata") or {}).items() if k != "total_parameters"}
    kept = [e for e in plan.entries if not e.dropped]
    meta["total_size"] = sum(e.out_nbytes for e in kept)
    weight_map = {e.written[0]: e.shard for e in sorted(kept, key=lambda e: e.written[0])}
    return (json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n").encode()


def _without_quantization_config(path: Path) -> bytes:
    """config.json minus `quantization_config`: every quantized weight was written as BF16."""
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    return (json.dumps(config, indent=2) + "\n").encode()


def read_summary(out: Path) -> dict[str, Any]:
    return json.loads(summary_file(out).read_text())


def _wipe(out: Path) -> None:
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(prefix)) == prefix
