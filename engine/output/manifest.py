"""The Parquet manifest: one row per repaired matrix and per passthrough tensor (docs/output.md).

`OUT/dgrepair/manifest.parquet/` is a folder of part files (output/parts.py); any Parquet reader
(`pandas.read_parquet`) sees every committed row; on resume the last row per (tensor, expert, part) wins.
The columns are `ManifestRow`'s fields, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from . import parts
from .paths import manifest_dir


@dataclass
class ManifestRow:
    """One manifest row: the manifest's columns, in order (SCHEMA is derived from it)."""

    tensor: str
    expert: int | None = field(metadata={"arrow": pa.int32()})
    part: str | None
    shard: str
    shape: list[int]
    dtype: str
    kind: str
    reason: str
    status: str
    rank_total: int | None
    rank_kept: int | None
    beta: float | None
    omega: float | None
    s_max: float | None
    s_med: float | None
    sigma_hat: float | None
    tau: float | None
    mp_edge: float | None
    noise_energy_fraction: float | None
    rho: float | None
    frob_delta: float | None
    frob_kept: float | None
    kernel: str | None
    fallback: str | None
    byte_begin: int
    byte_end: int
    sha256: str
    seconds: float
    plan_id: str
    node: str = ""
    requant_error: float | None = None
    precision: str | None = None  # the precision policy's decision ("gram32: BF16 output"), see ADR 0011


SCHEMA = parts.schema_of(ManifestRow)


def write_part(out: Path, rows: list[ManifestRow]) -> Path | None:
    """Append one part file atomically; returns its path."""
    return parts.write_part(manifest_dir(out), rows, SCHEMA)


def read_rows(out: Path) -> list[ManifestRow]:
    """All committed rows in commit order."""
    return parts.read_parts(manifest_dir(out), ManifestRow, SCHEMA)


latest_by_key = parts.latest_by_key


def global_rho(rows: list[ManifestRow]) -> float:
    """sqrt(Σ ‖Δ*‖² / Σ ‖Δ‖²) over the given matrices' rows (1 when there is no Δ at all). The sums are
    exactly rounded (`math.fsum`), so the value does not depend on the order the rows were committed in
    (an object-store run commits its units in another order than a local one)."""
    energy = math.fsum((r.frob_delta or 0.0) ** 2 for r in rows)
    kept = math.fsum((r.frob_kept or 0.0) ** 2 for r in rows)
    return math.sqrt(kept / energy) if energy > 0 else 1.0
