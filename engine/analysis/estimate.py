"""`dgrepair plan --estimate N x TYPE`: projected wall time and peak memory of a repair on a cluster.

Per matrix, the time comes from a per-device cost model t(m, n) = a·N·p² + b·p³ + c (N the long
side, p the short one: the Gram and the projection scale with N·p², the eigen step with p³), fitted
per device and backend to the rows of engine/analysis/cost_table.py, which bench/cost_table.py measures. CPU
rows are measured (one worker = one core); GPU rows are projections from the devices' published
throughput until bench/gpu_check.sh has measured them, and every estimate says which it used. The
backend per matrix is the precision policy's (kernels.spectral.precision_policy). I/O is bytes read
(both checkpoints) plus bytes written over the given aggregate rate; with --overlap reads and writes
run beside compute (two units in flight per worker, run/pipeline.py), so the wall time is
start-up + max(compute / N, I/O), without it start-up + compute / N + I/O, never less than the longest
single unit. Peak host memory per worker is the larger of the largest tensor's working set (a unit
above --batch-mb runs alone, plan/units.py) and the units in flight within the budget (two with
overlap, one without).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ...kernels.spectral import AUTO_EXACT_MAX_P, matrix_device_bytes, precision_policy
from ..errors import InputError
from ..plan.kinds import REPAIR_KINDS
from ..plan.units import DEFAULT_BATCH_BYTES
from ..run.jobs import policy_out_dtype
from ..run.pipeline import SLOTS
from .cost_table import COST_ROWS, DEVICES

RAY_STARTUP_S = 6.0  # embedded Ray start-up and shutdown, measured (docs/benchmarks.md)
HOST_BASE_GIB = 0.35  # interpreter + libraries of one worker (docs/benchmarks.md, peak RSS)
HOST_PER_F32_COPY = 4.7  # float32 copies of the largest tensor a worker holds at peak (same table)


@dataclass(frozen=True)
class Cluster:
    count: int
    device: str  # a key of cost_table.DEVICES ("cpu" = one single-threaded worker per core)

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"


def parse_cluster(text: str) -> Cluster:
    """`8xH100`, `16 x cpu`, `H200` (one)."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[xX*]\s*)?([A-Za-z0-9]+)\s*", text)
    name = m.group(2).lower() if m else ""
    if not m or name not in DEVICES or int(m.group(1) or 1) < 1:
        raise InputError(f"--estimate {text!r}: expected N x TYPE with TYPE one of {', '.join(DEVICES)} "
                         "(cpu = one worker per core), e.g. 8xH100 or 32xcpu.")
    return Cluster(int(m.group(1) or 1), name)


@dataclass(frozen=True)
class MatrixWork:
    """Matrices of one shape stored in one output dtype."""

    rows: int
    cols: int
    count: int
    out_dtype: str


def _model(device: str, backend: str) -> tuple[np.ndarray, bool]:
    """Least-squares (a, b, c) of t = a·N·p² + b·p³ + c over the table's rows, and whether measured."""
    rows = [r for r in COST_ROWS if r["device"] == device and r["backend"] == backend]
    if not rows:
        raise InputError(f"no cost rows for {backend} on {device}; run bench/cost_table.py")
    x = np.array([[max(r["rows"], r["cols"]) * min(r["rows"], r["cols"]) ** 2, min(r["rows"], r["cols"]) ** 3, 1.0]
                  for r in rows])
    y = np.array([r["seconds"] for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    if np.any(coef[:2] < 0):  # too few distinct shapes to separate the terms: scale the flop count alone
        coef = np.array([float(np.sum(y) / np.sum(x[:, 0] + x[:, 1])), float(np.sum(y) / np.sum(x[:, 0] + x[:, 1])),
                         0.0])
    return coef, all(r["measured"] for r in rows)


def matrix_seconds(device: str, backend: str, rows: int, cols: int) -> float:
    coef, _ = _model(device, "gram64" if backend == "exact" else backend)
    big, p = max(rows, cols), min(rows, cols)
    return max(float(coef @ np.array([big * p * p, p ** 3, 1.0])), 0.0)


def estimate(work: list[MatrixWork], bytes_io: int, largest_f32_bytes: int, cluster: Cluster,
             io_gbps: float, kernel: str = "auto", overlap: bool = False,
             batch_bytes: int = DEFAULT_BATCH_BYTES) -> dict:
    """Projected seconds and peak memory; `measured` False when any GPU row used is a projection."""
    spec = DEVICES[cluster.device]
    compute, longest, device_peak = 0.0, 0.0, 0
    measured = True
    backends: dict[str, int] = {}
    for w in work:
        backend, _ = precision_policy(kernel, w.out_dtype, "cpu", "fast" if spec["fp64_fast"] else "slow")
        if kernel == "auto" and min(w.rows, w.cols) <= AUTO_EXACT_MAX_P:
            backend = "exact"
        t = matrix_seconds(cluster.device, backend, w.rows, w.cols)
        measured &= _model(cluster.device, "gram64" if backend == "exact" else backend)[1]
        compute += t * w.count
        longest = max(longest, t)
        backends[backend] = backends.get(backend, 0) + w.count
        if cluster.gpu:
            device_peak = max(device_peak, matrix_device_bytes(w.rows, w.cols, backend, True))
    io_s = bytes_io / (io_gbps * 1e9)
    per_worker = compute / cluster.count
    wall = RAY_STARTUP_S + max(max(per_worker, io_s) if overlap else per_worker + io_s, longest)
    return {
        "cluster": f"{cluster.count}x{cluster.device}", "measured": measured, "matrices": sum(backends.values()),
        "backends": backends, "compute_s_total": compute, "compute_s_per_worker": per_worker, "io_s": io_s,
        "io_gbps": io_gbps, "wall_s": wall, "bound": "I/O" if io_s > per_worker else "compute",
        "overlap": overlap,
        "peak_host_gib_per_worker": HOST_BASE_GIB + HOST_PER_F32_COPY * max(
            largest_f32_bytes, (SLOTS if overlap else 1) * batch_bytes / 4) / 2 ** 30,
        "peak_device_gib": device_peak / 2 ** 30 if cluster.gpu else None,
        "device_gib": spec.get("memory_gib"),
    }


def plan_work(entries) -> tuple[list[MatrixWork], int, int]:
    """(matrix groups, bytes read + written, largest repaired tensor in float32 bytes) of a plan."""
    groups: dict[tuple[int, int, str], int] = {}
    io = largest = 0
    for e in entries:
        io += e.ft.nbytes + (e.base.nbytes if e.base is not None else 0) + e.out_nbytes
        if e.kind in REPAIR_KINDS and e.matrix_shape is not None and e.kind != "dequant":
            key = (*e.matrix_shape, policy_out_dtype(e))
            groups[key] = groups.get(key, 0) + e.n_matrices
            largest = max(largest, math.prod(e.ft.shape) * 4)
    return [MatrixWork(m, n, c, d) for (m, n, d), c in groups.items()], io, largest


def format_estimate(est: dict) -> list[str]:
    kind = "measured CPU cost rows" if est["measured"] else "PROJECTION (GPU cost rows not measured yet)"
    lines = [f"estimate for {est['cluster']} ({kind}):",
             f"  {est['matrices']} matrices ({', '.join(f'{k} {v}' for k, v in sorted(est['backends'].items()))}); "
             f"compute {est['compute_s_total'] / 3600:.2f} h total, {est['compute_s_per_worker'] / 60:.1f} min "
             f"per worker",
             f"  I/O {est['io_s'] / 60:.1f} min at {est['io_gbps']:g} GB/s aggregate, "
             f"{'beside compute (overlap)' if est['overlap'] else 'after compute (no --overlap)'}; "
             f"{est['bound']}-bound",
             f"  wall ~{est['wall_s'] / 60:.1f} min (Ray start-up included); peak host memory "
             f"~{est['peak_host_gib_per_worker']:.1f} GiB per worker"]
    if est["peak_device_gib"] is not None:
        lines.append(f"  peak device memory ~{est['peak_device_gib']:.2f} GiB of {est['device_gib']} GiB "
                     "(one matrix resident plus the next one's copy)")
    return lines
