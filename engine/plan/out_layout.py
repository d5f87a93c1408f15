"""Output shard headers planned from the plan entries (ADR 0003, 0008).

With shapes and dtypes unchanged, an output shard's header is the fine-tune's bytes (plus `format: pt`
when missing). When `--out-dtype bf16` changes dtypes, shapes or names, or drops scale tensors, the
header is rebuilt in the fine-tune's tensor order with contiguous offsets, and every entry's
`out_begin` is taken from it, so workers can still write straight into preallocated shards.
"""

from __future__ import annotations

import dataclasses

from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import build_header, output_prefix
from .model import PlanEntry


def output_layout(entries: list[PlanEntry], ft: Checkpoint) -> tuple[list[PlanEntry], dict, bool]:
    """(entries with output offsets, shard -> (header prefix, file size), whether any header changed).
    A shard left with no tensor to write is absent from the map and is not written."""
    by_shard: dict[str, list[PlanEntry]] = {}
    for e in entries:
        by_shard.setdefault(e.shard, []).append(e)
    out: dict[str, tuple[bytes, int]] = {}
    new_entries: dict[str, PlanEntry] = {}
    changed_any = False
    for shard, header in sorted(ft.shards.items()):
        mine = sorted(by_shard.get(shard, []), key=lambda e: e.ft.begin)
        if not any(e.dropped or e.out_dtype or e.out_shape or e.out_name for e in mine):
            prefix = output_prefix(header)
            out[shard] = (prefix, len(prefix) + header.file_size - header.data_start)
            continue
        changed_any = True
        kept = [e for e in mine if not e.dropped]
        if not kept:
            new_entries.update({e.name: dataclasses.replace(e, out_begin=0) for e in mine})
            continue  # nothing left to write: the shard is left out of the output
        prefix = build_header([e.written for e in kept], {**(header.metadata or {}), "format": "pt"})
        pos = len(prefix)
        for e in mine:
            new_entries[e.name] = dataclasses.replace(e, out_begin=pos)
            pos += e.out_nbytes
        out[shard] = (prefix, pos)
    return [new_entries.get(e.name, e) for e in entries], out, changed_any
