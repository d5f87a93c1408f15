"""Which worker assembles which output shard, for an object-store --out with no shared filesystem.

A staged shard lives on one node's scratch disk until it is uploaded, so every unit that writes
into it must run on the worker that owns it. Shards that some unit writes together (an FP8 weight
in one shard, its scales in another) form one group with one owner. A worker is given a new group
only while it holds fewer than `max_open` groups not yet published, which bounds its scratch space
to about that many shards. Pure bookkeeping: no Ray here, so it is unit-testable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..engine.plan.units import WorkUnit

MAX_OPEN_GROUPS = 2


@dataclass
class ShardOwners:
    """Owner per shard group; `published` shards no longer count against their owner."""

    group: dict[str, str] = field(default_factory=dict)  # shard -> its group's representative shard
    owner: dict[str, int] = field(default_factory=dict)  # representative -> worker index
    published: set[str] = field(default_factory=set)
    max_open: int = MAX_OPEN_GROUPS
    members: dict[str, frozenset[str]] = field(init=False)  # representative -> its shards (from `group`)

    def __post_init__(self) -> None:
        found: dict[str, set[str]] = {}
        for shard, rep in self.group.items():
            found.setdefault(rep, set()).add(shard)
        self.members = {rep: frozenset(shards) for rep, shards in found.items()}

    @classmethod
    def of(cls, units: Iterable[WorkUnit], max_open: int = MAX_OPEN_GROUPS) -> ShardOwners:
        """Groups from the units' shard sets (union-find over shards written by one unit)."""
        parent: dict[str, str] = {}

        def find(s: str) -> str:
            parent.setdefault(s, s)
            while parent[s] != s:
                parent[s] = parent[parent[s]]
                s = parent[s]
            return s

        for unit in units:
            shards = sorted({e.shard for e in unit.entries})
            for s in shards[1:]:
                parent[find(s)] = find(shards[0])
            find(shards[0])
        return cls(group={s: find(s) for s in parent}, max_open=max_open)

    def groups_of(self, unit: WorkUnit) -> set[str]:
        return {self.group.get(e.shard, e.shard) for e in unit.entries}

    def open_groups(self, worker: int) -> int:
        return sum(1 for rep, w in self.owner.items()
                   if w == worker and not self.members.get(rep, frozenset((rep,))) <= self.published)

    def allows(self, worker: int, unit: WorkUnit, new_groups: bool) -> bool:
        """May `worker` run `unit`? Only if it owns every group the unit writes, or (with `new_groups`)
        the unowned ones fit under its open-group bound."""
        groups = self.groups_of(unit)
        if any(self.owner.get(g, worker) != worker for g in groups):
            return False
        fresh = [g for g in groups if g not in self.owner]
        return not fresh or (new_groups and self.open_groups(worker) + len(fresh) <= max(self.max_open, len(fresh)))

    def claim(self, worker: int, unit: WorkUnit) -> None:
        for g in self.groups_of(unit):
            self.owner.setdefault(g, worker)

    def owner_of(self, shard: str) -> int:
        return self.owner[self.group.get(shard, shard)]
