"""The output directory: safety checks, preallocated partial shards, atomic finalisation.

Layout while running (output/paths.py): `OUT/dgrepair/lock` (held for the whole run, output/lock.py),
`OUT/dgrepair/run.json` (what run owns the folder and which top-level files it writes),
`OUT/dgrepair/partial/<shard>` (preallocated copies of the fine-tune's shards, header already in
place, filled at the fine-tune's offsets) and the manifest. A shard is renamed to `OUT/<shard>` once
all its tensors are committed; sidecars, then the index, then `dgrepair/summary.json` are written
last. summary.json is the completeness marker: an interrupted run may have the index, never the
summary, and a summary counts only when it, run.json and the manifest agree on the plan id.
Every metadata file is written to a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..io.bytes import TMP_SUFFIX, copy_atomic, write_atomic, write_json_atomic
from ..io.checkpoint import Checkpoint
from ..plan.model import Plan
from . import manifest
from .lock import LOCK_FILE
from .paths import meta_dir, partial_dir, partial_path, run_file, summary_file

# errno -> what the user should do; any of these from the output becomes an exit-2 OutputError.
OUTPUT_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "the filesystem is full: free space on it or choose an --out on a larger disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or ask for a larger quota",
    errno.EROFS: "the filesystem is read-only: remount it read-write or choose another --out",
    errno.EACCES: "permission denied: make the folder writable for this user or choose another --out",
    errno.EPERM: "operation not permitted: make the folder writable for this user or choose another --out",
    errno.EIO: "the storage reported an I/O error: check the disk or network mount (dmesg) before retrying",
}


def os_error_message(exc: OSError, out: Path) -> str:
    where = exc.filename if exc.filename else out
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return (f"{where}: {exc.strerror} ({code}); {OUTPUT_ERRNOS[exc.errno]}. Everything committed so far is "
            "kept: once that is fixed, re-run the same command to resume.")


@contextmanager
def os_errors(out: Path) -> Iterator[None]:
    """Turn an output OS failure (full, read-only, no permission, quota, I/O) into an exit-2 error."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        raise OutputError(os_error_message(exc, out)) from None




def check_out_path(out: Path, inputs: list[Path]) -> Path:
    """Refuse an output that is, contains, or lies inside an input (a local output cannot overlap an
    input in a bucket)."""
    resolved = out.expanduser().resolve()
    for src in (i for i in inputs if isinstance(i, Path)):
        if resolved == src or resolved.is_relative_to(src):
            raise OutputError(f"--out {out} is inside the input checkpoint {src}; choose a directory outside "
                              "both inputs (inputs are never modified).")
        if src.is_relative_to(resolved):
            raise OutputError(f"--out {out} contains the input checkpoint {src}; choose a separate directory.")
    return resolved


def precheck(out: Path) -> None:
    """Read-only checks before the lock is taken: nothing is created in a folder that is refused."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory.")
    if out.exists() and any(out.iterdir()) and not meta_dir(out).is_dir():
        raise OutputError(f"--out {out} is not empty and holds no dgrepair run; choose an empty or new "
                          "directory (dgrepair never deletes files it did not write).")


def prepare(out: Path, plan: Plan, ft: Checkpoint, force: bool) -> str:
    """Make `out` ready (call with the output lock held); returns 'fresh', 'resume' or 'complete'."""
    state = "fresh"
    owner = run_file(out)
    previous = _read_json(owner)
    if previous is None and _foreign(out, set()):
        raise OutputError(f"--out {out} is not empty and holds no dgrepair run; choose an empty or new "
                          "directory (dgrepair never deletes files it did not write).")
    if previous is not None:
        if previous.get("plan_id") == plan.plan_id:
            state = "complete" if is_complete(out, plan) else "resume"
        elif force:
            _wipe(out, previous)
        else:
            raise OutputError(f"--out {out} holds a different dgrepair run (plan {previous.get('plan_id')}, this "
                              f"run is plan {plan.plan_id}: other inputs or options). Use another directory, or "
                              "--force to replace it.")
    if state == "complete":
        return state
    summary_file(out).unlink(missing_ok=True)  # a summary that does not agree marks nothing
    partial_dir(out).mkdir(parents=True, exist_ok=True)
    files = sorted({*plan.out_shards, *([ft.index_name] if ft.index_name else []),
                    *(p.name for p in ft.sidecar_files())})
    write_json_atomic(owner, {"plan_id": plan.plan_id, "config": plan.config, "inputs": plan.fingerprints,
                                  "files": files})
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


def is_complete(out: Path, plan: Plan) -> bool:
    """Complete means: summary.json, run.json and the manifest all name this plan, and every shard is final."""
    summary = _read_json(summary_file(out))
    run = _read_json(run_file(out))
    if summary is None or run is None or not summary.get("plan_id") == run.get("plan_id") == plan.plan_id:
        return False
    if not all((out / shard).is_file() for shard in plan.out_shards):
        return False
    latest = manifest.latest_by_key(manifest.read_rows(out)).values()
    return all(r.plan_id == plan.plan_id for r in latest) and \
        {e.name for e in plan.entries} <= {r.tensor for r in latest}



def finalize_shard(out: Path, shard: str) -> None:
    part = partial_path(out, shard)
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    target = out / shard
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)


def reopen_shard(out: Path, shard: str, prefix: bytes) -> None:
    """Move a finalised shard back to partial so missing tensors can be rewritten (its header too,
    if that was damaged: the data of the tensors still to write is verified separately)."""
    part = partial_path(out, shard)
    part.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out / shard, part)
    if not _starts_with(part, prefix):
        with open(part, "rb+") as fh:
            fh.write(prefix)


def finalize_run(out: Path, ft: Checkpoint, summary: dict[str, Any], plan: Plan) -> list[str]:
    """Sidecars, then the index, then summary.json; returns the sidecar names copied."""
    copied = []
    for src in ft.sidecar_files():
        if src.name == "config.json" and plan.drop_quantization_config:
            write_atomic(out / src.name, _without_quantization_config(src))
        else:
            copy_atomic(src, out / src.name)
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


def _owned(out: Path, previous: dict[str, Any]) -> set[str]:
    """Top-level names the previous run wrote: run.json's list, the manifest's shards, the summary's sidecars."""
    names = {str(f) for f in previous.get("files", [])}
    try:
        names |= {r.shard for r in manifest.read_rows(out)}
    except (OSError, ValueError):
        pass  # an unreadable manifest adds nothing; run.json's list still counts
    names |= set((_read_json(summary_file(out)) or {}).get("sidecars", []))
    return {Path(n).parts[0] for n in names if n and not Path(n).is_absolute() and ".." not in Path(n).parts}


def _foreign(out: Path, owned: set[str]) -> list[str]:
    """Entries of `out` that dgrepair did not write (its own folder and temporary files excepted)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != meta_dir(out).name and p.name not in owned
                  and not p.name.endswith(TMP_SUFFIX))


def _wipe(out: Path, previous: dict[str, Any]) -> None:
    """--force: remove what the previous run wrote, and refuse if anything else is there."""
    owned = _owned(out, previous)
    foreign = _foreign(out, owned)
    if foreign:
        more = f" (+{len(foreign) - 8} more)" if len(foreign) > 8 else ""
        raise OutputError(f"--out {out}: --force replaces only what dgrepair wrote, but {len(foreign)} entr"
                          f"{'y is' if len(foreign) == 1 else 'ies are'} not from the previous run: "
                          f"{', '.join(foreign[:8])}{more}. Move them away or choose another directory.")
    for child in [*out.iterdir(), *meta_dir(out).iterdir()]:
        if child == meta_dir(out) or child.name == LOCK_FILE and child.parent == meta_dir(out):
            continue  # the folder itself is kept; the lock is held by this run
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _read_json(path: Path) -> dict[str, Any] | None:
    """A metadata file dgrepair wrote (atomically), or None when absent or not a JSON object."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(prefix)) == prefix
