"""Work units: what one call of the repair step does, and what a Ray actor receives.

Same-shape 2-D matrices (one layer's per-expert tensors, a layer's equal-shape projections) are
batched into one kernel call up to a memory budget; every other repair entry (a stacked expert
tensor, a convolution, a large matrix) is a unit of its own; passthrough copies are grouped by
shard up to the same budget. Batching never changes results: the kernel treats each matrix of a
batch independently (tested).

With overlap a worker holds two units at once (run/pipeline.py), so each is sized to half the
worker's budget (`unit_budget`), and a unit whose working set exceeds the whole budget (one large
tensor: an embedding, an expert stack) runs alone (`runs_alone`): the peak is that of one large unit,
or of two units within the budget, never of two large units.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from .kinds import ALONE_KINDS, REPAIR_KINDS, SCALE_KINDS, Kind
from .model import PlanEntry

DEFAULT_BATCH_BYTES = 256 << 20


def unit_budget(batch_bytes: int, in_flight: int) -> int:
    """One unit's share of a worker's budget when `in_flight` units are in memory on it at once (with
    overlap, one computing and one reading or writing: run/pipeline.py)."""
    return max(1, batch_bytes // max(1, in_flight))


def working_bytes(e: PlanEntry) -> int:
    """float32 working copies of a repair entry's matrices: about 4 (Δ, W0, Δ*, output) of 4 bytes per
    element; 0 for copies (read and written in chunks) and scales."""
    if e.kind == Kind.SVD:
        return 16 * e.ft.numel  # a resized vocabulary's new rows too: they travel with the matrix
    if e.kind not in REPAIR_KINDS or e.matrix_shape is None:
        return 0
    return 16 * e.n_matrices * math.prod(e.matrix_shape)


def runs_alone(unit: WorkUnit, batch_bytes: int) -> bool:
    """With overlap: a unit above the worker's whole budget has the worker to itself."""
    return unit.working_bytes > batch_bytes


@dataclass(frozen=True)
class WorkUnit:
    """Entries executed together (one call of the repair step)."""

    entries: tuple[PlanEntry, ...]
    splittable: bool = True  # False for entries that must be executed together (an FP8 weight and its scales)

    @property
    def cost(self) -> float:
        return sum(e.cost for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.ft.nbytes for e in self.entries)

    @property
    def working_bytes(self) -> int:
        return sum(working_bytes(e) for e in self.entries)


def largest_first(units: list[WorkUnit]) -> list[int]:
    """Unit indices by descending cost: the order workers take them in, so the small ones fill the end
    (longest-processing-time-first scheduling)."""
    return sorted(range(len(units)), key=lambda i: -units[i].cost)


def make_units(entries: list[PlanEntry], batch_bytes: int = DEFAULT_BATCH_BYTES,
               per_shard: bool = False) -> list[WorkUnit]:
    """Group entries into units; order follows the plan (first entry of each group). `per_shard`:
    batches never mix output shards (an object-store output assembles each shard on one worker)."""
    groups: dict[tuple, list[PlanEntry]] = defaultdict(list)
    order: list[tuple] = []
    packed_keys = {e.name: ("packed", e.matrix_shape, *((e.shard,) if per_shard else ())) for e in entries
                   if e.kind == Kind.PACKED_INT}
    for e in entries:
        if e.name in packed_keys or (e.kind == Kind.PACKED_AUX and e.companion in packed_keys):
            key = packed_keys[e.name if e.kind == Kind.PACKED_INT else e.companion]  # same-shape experts batch
        elif e.kind == Kind.SVD:
            key: tuple = ("svd", e.matrix_shape, e.shard) if per_shard else ("svd", e.matrix_shape)
        elif e.kind in ALONE_KINDS:
            key = ("alone", e.name)
        elif e.kind in SCALE_KINDS:  # rewritten (or dropped) by its weight's unit
            key = ("alone", e.companion)
        else:
            key = ("copy", e.shard)
        if key not in groups:
            order.append(key)
        groups[key].append(e)
    units: list[WorkUnit] = []
    for key in order:
        if key[0] == "alone":  # never split (an FP8 weight travels with its scales)
            units.append(WorkUnit(tuple(groups[key]), splittable=False))
            continue
        weight = working_bytes if key[0] != "copy" else (lambda e: e.ft.nbytes)
        members = groups[key]
        if key[0] == "packed":  # each weight followed by its companions, so a batch never separates them
            aux: dict[str, list[PlanEntry]] = defaultdict(list)
            for e in members:
                if e.kind == Kind.PACKED_AUX:
                    aux[e.companion or ""].append(e)
            members = [x for e in members if e.kind == Kind.PACKED_INT for x in (e, *aux[e.name])]
        batch: list[PlanEntry] = []
        size = 0
        for e in members:
            if batch and weight(e) and size + weight(e) > batch_bytes:  # a packed weight's companions follow it
                units.append(WorkUnit(tuple(batch), splittable=key[0] != "packed"))
                batch, size = [], 0
            batch.append(e)
            size += weight(e)
        if batch:
            units.append(WorkUnit(tuple(batch), splittable=key[0] != "packed"))
    return units
