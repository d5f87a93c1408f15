"""An s3:// or gs:// --out: shards assembled in local scratch, each uploaded once complete.

How a shard gets into the bucket (docs/object-storage.md, "How the output is written"):
- Every shard is assembled in a local staging folder, `SCRATCH/dgrepair-staging/<hash of the URI>`,
  exactly as a local run fills `OUT/dgrepair/partial/<shard>`. Units never span shards, and on Ray
  all units of one shard go to one worker, so a shard is always on one node's disk.
- When its last tensor is committed, the shard is checked (every committed row's sha256 against
  the staged bytes), uploaded under its final key in one multipart upload that is completed once
  (so no partial object is ever visible under a final name) and deleted from scratch. Scratch per
  worker is bounded by the shards it has open: about two.
- The upload's ETag is recorded in `OUT/dgrepair/published/<shard>.json`. On resume, a shard whose
  object still has that size and ETag is final without downloading a byte of it.
- Metadata lives in the bucket: run.json at the start, each manifest part as it is committed, and
  at the end the sidecars, the index, then summary.json last. A resume on a new machine pulls
  `OUT/dgrepair/` into a fresh staging folder and continues: the bucket alone is enough.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..io.bytes import TruncatedFile, fsync_file, sha256_range, write_atomic
from ..io.checkpoint import Checkpoint
from ..io.objstore import ObjectURI, Storage, StorageError, parse_uri
from ..plan.model import Plan
from . import manifest, shards
from .bucket_lock import BucketOutputLock
from .lock import LOCK_FILE, OutputLock
from .paths import META_DIR, RUN_FILE, SUMMARY_FILE, meta_dir, partial_path, run_file, summary_file
from .target import Check

PUBLISHED_DIR = "published"
STAGING_DIR = "dgrepair-staging"
# Under OUT/dgrepair/ in the bucket: what a resume pulls (never the lock; reports are not the run's).
_NOT_PULLED = (LOCK_FILE, "partial", "report")


@dataclass(frozen=True)
class PublishedShard:
    """The record of one uploaded shard; a resume trusts the object while its size and ETag match."""

    shard: str
    size: int
    e_tag: str | None
    plan_id: str


@dataclass(frozen=True)
class PublishResult:
    """What publishing a shard did: the record, or the committed rows whose staged bytes did not match."""

    shard: str
    record: PublishedShard | None
    bad: tuple[Check, ...] = ()


def staging_dir(scratch: Path, uri: ObjectURI) -> Path:
    """The local folder an output prefix is staged in (the same on every node for the same scratch)."""
    return scratch / STAGING_DIR / hashlib.sha256(str(uri).encode()).hexdigest()[:16]


def publish_shard(staging: str, out_uri: str, shard: str, checks: list[Check], plan_id: str) -> PublishResult:
    """Verify a staged shard against its committed rows, upload it under its final key, free the scratch.
    Runs where the shard was assembled: in the run's process, or on the Ray worker that owns it."""
    part = partial_path(Path(staging), shard)
    try:
        bad = tuple(c for c in checks if c[1] > c[0] and sha256_range(part, c[0], c[1]) != c[2])
    except (TruncatedFile, FileNotFoundError):
        bad = tuple(checks)  # the staged copy is gone (a worker restarted on another node): redo it all
    if bad:
        return PublishResult(shard, None, bad)
    fsync_file(part)
    uri = parse_uri(out_uri).child(shard)
    e_tag = Storage().write(uri, part)
    record = PublishedShard(shard, part.stat().st_size, e_tag, plan_id)
    part.unlink()
    return PublishResult(shard, record)


class BucketOutput:
    """An object-store output prefix (an `OutputTarget`, see engine/output/target.py)."""

    per_shard_units = True
    fsync_partials = False  # on Ray the staged shards are on the workers' disks; publish fsyncs them

    def __init__(self, uri: ObjectURI, scratch: Path, lock_ttl_s: float) -> None:
        self.uri = uri
        self.label = str(uri)
        self.local = staging_dir(scratch, uri)
        self.storage = Storage()
        self.lock_ttl_s = lock_ttl_s
        self._plan_id = ""  # set by prepare
        self._published: dict[str, PublishedShard] = {}

    # -- before the lock -------------------------------------------------------------------------
    def precheck(self) -> None:
        """Read-only: refuse a prefix that holds objects but no dgrepair run (one listing)."""
        objects = self.storage.list(self.uri)
        rels = {o.uri.relative_to(self.uri) for o in objects}
        foreign = sorted({r.split("/")[0] for r in rels} - {META_DIR})
        if foreign and f"{META_DIR}/{RUN_FILE}" not in rels:
            raise OutputError(f"--out {self.uri} is not empty and holds no dgrepair run ({', '.join(foreign[:5])}"
                              f"{' ...' if len(foreign) > 5 else ''}); choose an empty or new prefix (dgrepair "
                              "never deletes objects it did not write).")

    def lock(self) -> OutputLock:
        return BucketOutputLock(self.storage, self.uri, self.lock_ttl_s)

    # -- with the lock held ----------------------------------------------------------------------
    def prepare(self, plan: Plan, ft: Checkpoint, force: bool) -> str:
        self._plan_id = plan.plan_id
        self.local.mkdir(parents=True, exist_ok=True)
        self._pull()
        previous = shards.read_json(run_file(self.local))
        if previous is not None and previous.get("plan_id") != plan.plan_id and force:
            self._wipe(previous)
        self._published = self._verified(plan)
        state = shards.prepare(self.local, plan, ft, force, final=self._published.__contains__, label=self.label)
        if state != "complete":
            self.storage.delete(self.uri.child(f"{META_DIR}/{SUMMARY_FILE}"))  # a stale one marks nothing
            self.mirror(run_file(self.local))
        return state

    def published(self) -> set[str] | None:
        return set(self._published)

    def is_final(self, shard: str) -> bool:
        return shard in self._published

    def reopen(self, shard: str, prefix: bytes, size: int) -> None:
        self._published.pop(shard, None)  # its object is rewritten whole when the shard completes again
        shards.open_partial(self.local, shard, prefix, size)

    def shard_complete(self, shard: str, checks: list[Check]) -> list[Check]:
        result = publish_shard(str(self.local), str(self.uri), shard, checks, self._plan_id)
        self.record(result)
        return list(result.bad)

    def record(self, result: PublishResult) -> None:
        """Write the record of a shard published here or by a worker (the driver calls this)."""
        if result.record is None:
            return
        path = meta_dir(self.local) / PUBLISHED_DIR / f"{result.shard}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(asdict(result.record)) + "\n").encode())
        self.mirror(path)
        self._published[result.shard] = result.record

    def mirror(self, path: Path | None) -> None:
        """Make the bucket's copy of a metadata file equal the staged one (a removed file: deleted)."""
        if path is None:
            return
        uri = self.uri.child(path.relative_to(self.local).as_posix())
        if path.is_file():
            self.storage.write(uri, path.read_bytes())
        else:
            self.storage.delete(uri)

    def finalize_run(self, ft: Checkpoint, summary: dict[str, Any], plan: Plan) -> list[str]:
        """Sidecars, the index, then summary.json last, each uploaded whole; then the scratch is freed."""
        copied = shards.finalize_run(self.local, ft, summary, plan)  # written into staging first
        for name in [*copied, *([ft.index_name] if ft.index_name else [])]:
            self.storage.write(self.uri.child(name), self.local / name)
        self.mirror(summary_file(self.local))
        shutil.rmtree(self.local, ignore_errors=True)
        return copied

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.storage.read_object(self.uri.child(f"{META_DIR}/{SUMMARY_FILE}")))

    # -- internals -------------------------------------------------------------------------------
    def _pull(self) -> None:
        """Replace the staging folder's metadata by the bucket's (the bucket is the truth); staged
        partial shards of an earlier attempt on this machine stay, and are verified byte by byte."""
        meta = meta_dir(self.local)
        for child in list(meta.iterdir()) if meta.is_dir() else []:
            if child.name == "partial":
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        prefix = self.uri.child(META_DIR)
        for obj in self.storage.list(prefix):
            rel = obj.uri.relative_to(prefix)
            if rel.split("/")[0] in _NOT_PULLED or ".." in rel.split("/"):
                continue
            target = meta / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, self.storage.read_object(obj.uri))

    def _verified(self, plan: Plan) -> dict[str, PublishedShard]:
        """Published shards of this plan whose object still matches its record (one HEAD each) and
        all of whose entries have committed rows."""
        folder = meta_dir(self.local) / PUBLISHED_DIR
        if not folder.is_dir():
            return {}
        latest = manifest.latest_by_key(manifest.read_rows(self.local))
        committed = {k[0] for k, r in latest.items() if r.plan_id == plan.plan_id}
        uncommitted = {e.shard for e in plan.entries if e.name not in committed}
        found: dict[str, PublishedShard] = {}
        for path in sorted(folder.rglob("*.json")):
            try:
                record = PublishedShard(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                continue
            if record.plan_id != plan.plan_id or record.shard not in plan.out_shards:
                continue
            if record.shard in uncommitted:
                continue
            try:
                head = self.storage.head(self.uri.child(record.shard))
            except StorageError:
                continue  # deleted since: redone
            if head.size == record.size and head.e_tag == record.e_tag:
                found[record.shard] = record
        return found

    def _wipe(self, previous: dict[str, Any]) -> None:
        """--force on a prefix that holds another run: delete what that run wrote, refuse anything else."""
        owned = shards.owned_names(self.local, previous)
        objects = self.storage.list(self.uri)
        tops = {o.uri.relative_to(self.uri).split("/")[0] for o in objects}
        shards.refuse_foreign(self.label, sorted(tops - owned - {META_DIR}))
        lock = self.uri.child(f"{META_DIR}/{LOCK_FILE}")
        for obj in objects:
            if obj.uri != lock:
                self.storage.delete(obj.uri)
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
