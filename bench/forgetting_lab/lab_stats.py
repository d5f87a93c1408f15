"""Paired differences between two repairs of the same fine-tunes, with an interval over seeds and items.

Two methods evaluated on one seed's fine-tune answer the same fixed items, so their difference is paired:
the per-seed Wilson intervals of the tables (about +-0.04 at n = 500) overstate the noise of a difference,
and a min-max over three seeds says nothing about the items. The interval here is a two-level bootstrap:
draw seeds with replacement, then items with replacement within each drawn seed, and take the mean of the
paired per-item differences. Its 2.5 and 97.5 percentiles bound the mean difference over seeds and items.
With one seed it is the item bootstrap alone. Binary benchmarks only (an item is right or wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DRAWS = 4000


@dataclass(frozen=True)
class PairedDiff:
    mean: float  # mean over seeds of mean(a) - mean(b)
    lo: float
    hi: float
    per_seed: tuple[float, ...]


def paired_difference(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], draws: int = DRAWS,
                      seed: int = 0) -> PairedDiff:
    """`pairs`: one (items of method a, items of method b) per seed, each the same items in the same order."""
    diffs = []
    for a, b in pairs:
        if len(a) != len(b) or not len(a):
            raise ValueError(f"paired items differ in number ({len(a)} against {len(b)}) or are empty")
        diffs.append(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    if len({len(d) for d in diffs}) != 1:
        raise ValueError("every seed must answer the same items")
    d = np.stack(diffs)  # (seeds, items)
    k, n = d.shape
    rng = np.random.default_rng(seed)
    total = np.zeros(draws)
    for _ in range(k):  # one slot per seed: a drawn seed, then its items drawn afresh
        s = rng.integers(0, k, draws) if k > 1 else np.zeros(draws, dtype=np.int64)
        idx = rng.integers(0, n, (draws, n))
        total += d[s[:, None], idx].mean(axis=1)
    boot = total / k
    lo, hi = np.percentile(boot, [2.5, 97.5])
    per_seed = tuple(float(x) for x in d.mean(axis=1))
    return PairedDiff(float(np.mean(per_seed)), float(lo), float(hi), per_seed)
