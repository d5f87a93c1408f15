"""The manifest's columns have one definition (ManifestRow): the Arrow schema is derived from it, and the
per-matrix statistics are copied from SpectralStats by name."""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from dgrepair.engine.output.manifest import SCHEMA, ManifestRow
from dgrepair.engine.run.jobs import STAT_COLUMNS
from dgrepair.kernels.threshold import SpectralStats

# Columns that describe the tensor, its bytes or the run, not the spectrum of one matrix.
NOT_STATS = {"tensor", "expert", "part", "shard", "shape", "dtype", "kind", "reason", "status", "frob_kept",
             "kernel", "byte_begin", "byte_end", "sha256", "seconds", "plan_id", "node", "requant_error",
             "precision"}


def test_schema_is_the_row_type() -> None:
    assert SCHEMA.names == [f.name for f in dataclasses.fields(ManifestRow)]
    assert SCHEMA.field("expert").type == pa.int32() and SCHEMA.field("shape").type == pa.list_(pa.int64())
    assert SCHEMA.field("rank_kept").type == pa.int64() and SCHEMA.field("tau").type == pa.float64()


def test_every_statistics_column_comes_from_spectral_stats() -> None:
    stats = {f.name for f in dataclasses.fields(SpectralStats)}
    columns = {f.name for f in dataclasses.fields(ManifestRow)}
    assert set(STAT_COLUMNS) == columns - NOT_STATS
    assert set(STAT_COLUMNS) <= stats


def test_global_rho_is_exact_and_does_not_depend_on_the_commit_order() -> None:
    """Runs commit their units in different orders (an object-store output publishes shard by shard),
    and a plain float sum in another order can differ in the last bit. Worked by hand: energies 1 (all
    kept) and four of 2^-54 (none kept) sum exactly to 1 + 2^-52, so ρ = sqrt(1 / (1 + 2^-52)) =
    0.9999999999999999 in every order; a left-to-right sum starting at 1 loses the small ones and gives 1.0."""
    import itertools
    import math

    from dgrepair.engine.output.manifest import global_rho

    blank = {f.name: None for f in dataclasses.fields(ManifestRow)}

    def row(frob_delta: float, frob_kept: float) -> ManifestRow:
        return ManifestRow(**{**blank, "frob_delta": frob_delta, "frob_kept": frob_kept})

    rows = [row(1.0, 1.0)] + [row(2.0**-27, 0.0) for _ in range(4)]
    assert sum(r.frob_delta ** 2 for r in rows) == 1.0  # the naive sum in this order
    values = {global_rho(list(order)) for order in itertools.permutations(rows)}
    assert values == {math.sqrt(1.0 / (1.0 + 2.0**-52))} and values != {1.0}
