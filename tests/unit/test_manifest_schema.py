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
