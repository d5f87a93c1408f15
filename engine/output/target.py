"""Where a run's output goes: a local folder, or an object-store prefix staged through a local folder.

The run always writes into a local folder (`local`): partial shards at the fine-tune's offsets, the
manifest, run.json. `OutputTarget` is what differs between a folder that *is* the output
(`LocalOutput`) and a bucket prefix (`engine/output/bucket.py`), so the run session holds one of
them and never asks which:

- how the output is checked before and locked during the run;
- what is already final when a run resumes (a file on disk, or a published object whose ETag is
  recorded);
- what happens when a shard's last tensor is committed (a rename, or an upload);
- what happens to each metadata file the run writes (nothing, or a copy to the bucket);
- the last step: sidecars, the index, then summary.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..io.checkpoint import Checkpoint
from ..plan.model import Plan
from . import shards
from .lock import FileOutputLock, OutputLock

Check = tuple[int, int, str]  # (byte_begin, byte_end, sha256) of one committed row


class OutputTarget(Protocol):
    """The output of one run (see the module docstring)."""

    local: Path  # the folder the run writes into
    label: str  # what messages call the output: the folder, or the s3:// / gs:// URI
    per_shard_units: bool  # units never span shards (each shard is assembled on one worker)
    fsync_partials: bool  # the committing process can fsync partial shards (they are on its disk)

    def precheck(self) -> None: ...

    def lock(self) -> OutputLock: ...

    def prepare(self, plan: Plan, ft: Checkpoint, force: bool) -> str: ...

    def published(self) -> set[str] | None:
        """Shards final in the output whose rows need no byte check (None: check every row on disk)."""

    def is_final(self, shard: str) -> bool:
        """Whether the shard is already in its final place."""

    def reopen(self, shard: str, prefix: bytes, size: int) -> None:
        """Make a final shard partial again: some of its tensors must be rewritten."""

    def shard_complete(self, shard: str, checks: list[Check]) -> list[Check]:
        """Finalise a shard whose rows are all committed; returns the checks that failed (redo those)."""

    def mirror(self, path: Path | None) -> None:
        """A metadata file the run wrote (or removed) under `local`: a manifest part, run.json, failures.json."""

    def finalize_run(self, ft: Checkpoint, summary: dict[str, Any], plan: Plan) -> list[str]: ...

    def read_summary(self) -> dict[str, Any]: ...


class LocalOutput:
    """The output folder itself (a local disk or a shared POSIX filesystem)."""

    per_shard_units = False
    fsync_partials = True

    def __init__(self, root: Path) -> None:
        self.local = root
        self.label = str(root)

    def precheck(self) -> None:
        shards.precheck(self.local)

    def lock(self) -> OutputLock:
        return FileOutputLock(self.local)

    def prepare(self, plan: Plan, ft: Checkpoint, force: bool) -> str:
        return shards.prepare(self.local, plan, ft, force)

    def published(self) -> set[str] | None:
        return None

    def is_final(self, shard: str) -> bool:
        return (self.local / shard).is_file()

    def reopen(self, shard: str, prefix: bytes, size: int) -> None:  # noqa: ARG002
        shards.reopen_shard(self.local, shard, prefix)

    def shard_complete(self, shard: str, checks: list[Check]) -> list[Check]:  # noqa: ARG002
        shards.finalize_shard(self.local, shard)  # its rows were verified as they were committed
        return []

    def mirror(self, path: Path | None) -> None:
        pass

    def finalize_run(self, ft: Checkpoint, summary: dict[str, Any], plan: Plan) -> list[str]:
        return shards.finalize_run(self.local, ft, summary, plan)

    def read_summary(self) -> dict[str, Any]:
        return shards.read_summary(self.local)
