"""The one Parquet-part writer behind the manifest and the calibration rows.

A dataset is a folder of part files, each written to a temporary name, fsynced and renamed, so a crash
never leaves a half-written part. Parts are numbered in commit order and read back in that order, so
"the last row per key wins" means the same thing for every reader. The Arrow schema is derived from
the row dataclass, so a row type is the single definition of its columns.
"""

from __future__ import annotations

import dataclasses
import os
import typing
import uuid
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

R = TypeVar("R")

_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def schema_of(row_type: type) -> pa.Schema:
    """The Arrow schema of a row dataclass: fields in order; `X | None` is a nullable X, `list[X]` a
    list; a field's `metadata={"arrow": type}` overrides the mapping (a narrower integer)."""
    hints = typing.get_type_hints(row_type)
    cols = []
    for f in dataclasses.fields(row_type):
        if "arrow" in f.metadata:
            cols.append((f.name, f.metadata["arrow"]))
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is list:
            cols.append((f.name, pa.list_(_ARROW[args[0]])))
        else:
            cols.append((f.name, _ARROW[args[0] if args else hint]))
    return pa.schema(cols)


def write_part(folder: Path, rows: list[Any], schema: pa.Schema) -> Path | None:
    """Append one part file of dataclass rows atomically (tmp + fsync + rename); returns its path."""
    if not rows:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    seq = len(list(folder.glob("part-*.parquet")))
    final = folder / f"part-{seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".tmp-{final.name}"
    try:  # a failed write (full disk) leaves no temporary file
        pq.write_table(pa.Table.from_pylist([dataclasses.asdict(r) for r in rows], schema=schema), tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def read_parts(folder: Path, row_type: type[R], schema: pa.Schema) -> list[R]:
    """Every committed row, in commit order."""
    if not folder.is_dir():
        return []
    rows: list[R] = []
    for part in sorted(folder.glob("part-*.parquet")):
        rows.extend(row_type(**r) for r in pq.read_table(part, schema=schema).to_pylist())
    return rows


def latest_by_key(rows: list[Any]) -> dict[tuple[str, int | None, str | None], Any]:
    """Last row per matrix (tensor, expert, part): what resume, summaries and reports trust."""
    return {(r.tensor, r.expert, r.part): r for r in rows}
