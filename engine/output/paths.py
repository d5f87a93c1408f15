"""Where everything a run writes lives, spelled once.

    OUT/<shard>                              finalised output shards, sidecars, the index
    OUT/dgrepair/run.json                    which run owns the folder (plan id, options, inputs)
    OUT/dgrepair/partial/<shard>             preallocated shards being filled
    OUT/dgrepair/manifest.parquet/           committed manifest part files
    OUT/dgrepair/calibration.parquet/        --target-rho calibration part files
    OUT/dgrepair/adapter_parts/              --emit-adapter factors, one file per matrix
    OUT/dgrepair/failures.json               units the Ray driver gave up on
    OUT/dgrepair/summary.json                written last: only a complete run has it
    OUT/dgrepair/report/                     `dgrepair report`
"""

from __future__ import annotations

from pathlib import Path

META_DIR = "dgrepair"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
FAILURES_FILE = "failures.json"


def meta_dir(out: Path) -> Path:
    return out / META_DIR


def partial_dir(out: Path) -> Path:
    return meta_dir(out) / "partial"


def partial_path(out: Path, shard: str) -> Path:
    return partial_dir(out) / shard


def shard_location(out: Path, shard: str) -> Path:
    """Where a shard's bytes are now: the final file once finalised, else the partial one."""
    final = out / shard
    return final if final.is_file() else partial_path(out, shard)


def run_file(out: Path) -> Path:
    return meta_dir(out) / RUN_FILE


def summary_file(out: Path) -> Path:
    return meta_dir(out) / SUMMARY_FILE


def failures_file(out: Path) -> Path:
    return meta_dir(out) / FAILURES_FILE


def manifest_dir(out: Path) -> Path:
    return meta_dir(out) / "manifest.parquet"


def calibration_dir(out: Path) -> Path:
    return meta_dir(out) / "calibration.parquet"


def adapter_parts_dir(out: Path) -> Path:
    return meta_dir(out) / "adapter_parts"


def report_dir(out: Path) -> Path:
    return meta_dir(out) / "report"
