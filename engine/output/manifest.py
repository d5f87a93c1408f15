"""The Parquet manifest: one row per repaired matrix and per passthrough tensor.

`OUT/dgrepair/manifest.parquet/` is a directory dataset of part files, each written to a temporary
name and renamed, so a crash never leaves a half-written part. Readers (`pandas.read_parquet`,
`read_manifest`) see every committed row; on resume the last row per (tensor, expert, part) wins.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("tensor", pa.string()),
    ("expert", pa.int32()),
    ("part", pa.string()),
    ("shard", pa.string()),
    ("shape", pa.list_(pa.int64())),
    ("dtype", pa.string()),
    ("kind", pa.string()),
    ("reason", pa.string()),
    ("status", pa.string()),
    ("rank_total", pa.int64()),
    ("rank_kept", pa.int64()),
    ("beta", pa.float64()),
    ("omega", pa.float64()),
    ("s_max", pa.float64()),
    ("s_med", pa.float64()),
    ("sigma_hat", pa.float64()),
    ("tau", pa.float64()),
    ("mp_edge", pa.float64()),
    ("noise_energy_fraction", pa.float64()),
    ("rho", pa.float64()),
    ("frob_delta", pa.float64()),
    ("frob_kept", pa.float64()),
    ("kernel", pa.string()),
    ("fallback", pa.string()),
    ("byte_begin", pa.int64()),
    ("byte_end", pa.int64()),
    ("sha256", pa.string()),
    ("seconds", pa.float64()),
    ("plan_id", pa.string()),
    ("node", pa.string()),
    ("requant_error", pa.float64()),
])


@dataclass
class ManifestRow:
    """One manifest row; field names and order match SCHEMA."""

    tensor: str
    expert: int | None
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


def manifest_dir(out: Path) -> Path:
    return out / "dgrepair" / "manifest.parquet"


def write_part(out: Path, rows: list[ManifestRow]) -> Path | None:
    """Append one part file atomically (tmp + fsync + rename); returns its path."""
    if not rows:
        return None
    folder = manifest_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    seq = len(list(folder.glob("part-*.parquet")))
    final = folder / f"part-{seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".tmp-{final.name}"
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=SCHEMA)
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def read_rows(out: Path) -> list[ManifestRow]:
    """All committed rows in commit order (part files sort by sequence number)."""
    folder = manifest_dir(out)
    if not folder.is_dir():
        return []
    rows: list[ManifestRow] = []
    for part in sorted(folder.glob("part-*.parquet")):
        rows.extend(ManifestRow(**r) for r in pq.read_table(part, schema=SCHEMA).to_pylist())
    return rows


def latest_by_key(rows: list[ManifestRow]) -> dict[tuple[str, int | None, str | None], ManifestRow]:
    """Last row per (tensor, expert, part): what resume trusts."""
    return {(r.tensor, r.expert, r.part): r for r in rows}
