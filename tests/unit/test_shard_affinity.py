"""Shard affinity for object-store outputs: every unit of a shard group goes to one worker, and a
worker opens at most `max_open` groups that are not yet published (its scratch bound)."""

from __future__ import annotations

from types import SimpleNamespace

from dgrepair.cluster.affinity import ShardOwners
from dgrepair.engine.plan.units import WorkUnit


def unit(*shards: str) -> WorkUnit:
    return WorkUnit(tuple(SimpleNamespace(shard=s) for s in shards))  # only .shard is read


def test_shards_written_by_one_unit_form_one_group():
    owners = ShardOwners.of([unit("a"), unit("b", "c"), unit("c", "d"), unit("e")])
    assert owners.group["b"] == owners.group["c"] == owners.group["d"] != owners.group["a"]
    assert owners.group["e"] == "e"


def test_a_group_belongs_to_the_first_worker_that_claims_it():
    owners = ShardOwners.of([unit("a"), unit("b")], max_open=2)
    assert owners.allows(0, unit("a"), new_groups=True)
    owners.claim(0, unit("a"))
    assert not owners.allows(1, unit("a"), new_groups=True)  # a's other units go to worker 0 only
    assert owners.allows(0, unit("a"), new_groups=False)
    assert not owners.allows(1, unit("a"), new_groups=False)
    assert owners.owner_of("a") == 0


def test_a_worker_opens_at_most_max_open_groups_until_one_is_published():
    owners = ShardOwners.of([unit(s) for s in "abc"], max_open=2)
    owners.claim(0, unit("a"))
    owners.claim(0, unit("b"))
    assert not owners.allows(0, unit("c"), new_groups=True)  # two open: the scratch bound
    assert owners.allows(1, unit("c"), new_groups=True)
    assert not owners.allows(0, unit("c"), new_groups=False)  # never without new_groups
    owners.published.add("a")
    assert owners.allows(0, unit("c"), new_groups=True)


def test_a_unit_spanning_groups_of_two_workers_is_never_split_between_them():
    owners = ShardOwners.of([unit("a"), unit("b"), unit("a", "b")])
    assert owners.group["a"] == owners.group["b"]  # merged, so this cannot happen
    owners.claim(0, unit("a"))
    assert owners.owner_of("b") == 0
