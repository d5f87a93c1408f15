"""Resume: which plan entries an earlier attempt finished, judged by the bytes on disk.

An entry is done when every manifest row it needs was committed under this plan id and each row's
sha256 matches its byte range in the output shard as it is now (--emit-adapter: and its factors were
written). A quantized weight and its scales are written together, so they are done (or redone)
together.
"""

from __future__ import annotations

from ..io.bytes import TruncatedFile, sha256_range
from ..output import adapter, paths
from ..output.manifest import ManifestRow
from ..plan.kinds import QUANTIZED_KINDS, SCALE_KINDS, Kind
from .inputs import Inputs, adapter_parts, expected_keys


def verified_done(inp: Inputs, latest: dict[tuple[str, int | None, str | None], ManifestRow],
                  published: set[str] | None = None) -> set[str]:
    """Names of entries whose committed rows (`latest`, the last row per key) match the bytes on
    disk. Entries of `published` shards (final in a bucket, their objects matched by ETag) need only
    their rows; all of a published shard's entries are done, or none (its object is rewritten whole)."""
    published = published or set()
    parts = adapter_parts(inp)
    done = set()
    for entry in inp.plan.entries:
        rows = [latest.get(k) for k in expected_keys(entry)]
        if any(r is None or r.plan_id != inp.plan.plan_id for r in rows):
            continue
        if parts and adapter.exportable(entry) is None and not adapter.has_part(parts, entry.name):
            continue  # --emit-adapter: its factors were never written
        if entry.shard in published:
            done.add(entry.name)
            continue
        where = paths.shard_location(inp.out, entry.shard)
        ranges = {(r.byte_begin, r.byte_end): r.sha256 for r in rows if r is not None}  # fused halves share one
        try:
            if all(sha256_range(where, lo, hi) == digest for (lo, hi), digest in ranges.items() if hi > lo):
                done.add(entry.name)
        except TruncatedFile:
            continue  # a shard cut short since: its entries are redone
    # A packed weight has several companions, so this runs until nothing changes.
    pairs = [(e.name, e.companion) for e in inp.plan.entries
             if e.companion is not None and e.kind in QUANTIZED_KINDS + SCALE_KINDS + (Kind.PACKED_INT,)]
    by_shard: dict[str, set[str]] = {}
    for e in inp.plan.entries:
        if e.shard in published:
            by_shard.setdefault(e.shard, set()).add(e.name)
    changed = True
    while changed:
        changed = False
        for pair in pairs:
            if not set(pair) <= done and set(pair) & done:
                done.difference_update(pair)
                changed = True
        for names in by_shard.values():
            if not names <= done and names & done:
                done.difference_update(names)
                changed = True
    return done
