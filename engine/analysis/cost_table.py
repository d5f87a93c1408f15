"""Per-shape cost rows behind `dgrepair plan --estimate` (engine/analysis/estimate.py fits its model to them).

CPU rows are measured by `python bench/cost_table.py --write` (seconds per matrix on one core, as one
single-threaded Ray worker runs it); that command rewrites the CPU_ROWS block below. GPU rows are
PROJECTIONS from each device's published FP32/FP64 rates (`measured: False`) until
bench/gpu_check.sh measures them on the device: Gram and projection GEMMs at half the published rate,
the eigen step (cuSOLVER syevd) at 3 % of it, and the host-device copies of Δ and Δ* at 20 GB/s.
"""

from __future__ import annotations

# Published dense rates (TFLOP/s, non-tensor-core FP32, FP64 vector/tensor) and memory; fp64_fast
# follows kernels.spectral.FAST_FP64_CAPABILITIES.
DEVICES: dict[str, dict] = {
    "cpu": {"fp64_fast": False},
    "a100": {"fp32": 19.5, "fp64": 19.5, "fp64_fast": True, "memory_gib": 80},
    "h100": {"fp32": 67.0, "fp64": 67.0, "fp64_fast": True, "memory_gib": 80},
    "h200": {"fp32": 67.0, "fp64": 67.0, "fp64_fast": True, "memory_gib": 141},
    "b200": {"fp32": 80.0, "fp64": 40.0, "fp64_fast": True, "memory_gib": 180},
    "l4": {"fp32": 30.3, "fp64": 0.47, "fp64_fast": False, "memory_gib": 24},
    "a10": {"fp32": 31.2, "fp64": 0.98, "fp64_fast": False, "memory_gib": 24},
    "l40s": {"fp32": 91.6, "fp64": 1.43, "fp64_fast": False, "memory_gib": 48},
}

# BEGIN CPU_ROWS (written by bench/cost_table.py)
# measured 2026-12-03 on 2 cores, 1-min load 0.5 (one thread per matrix)
CPU_ROWS: list[dict] = [
    {'device': 'cpu', 'backend': 'gram32', 'rows': 256, 'cols': 2048, 'seconds': 0.0118, 'measured': True},
    {'device': 'cpu', 'backend': 'gram64', 'rows': 256, 'cols': 2048, 'seconds': 0.0214, 'measured': True},
    {'device': 'cpu', 'backend': 'gram32', 'rows': 2048, 'cols': 2048, 'seconds': 0.4707, 'measured': True},
    {'device': 'cpu', 'backend': 'gram64', 'rows': 2048, 'cols': 2048, 'seconds': 0.8506, 'measured': True},
    {'device': 'cpu', 'backend': 'gram32', 'rows': 5632, 'cols': 2048, 'seconds': 0.6409, 'measured': True},
    {'device': 'cpu', 'backend': 'gram64', 'rows': 5632, 'cols': 2048, 'seconds': 1.2479, 'measured': True},
    {'device': 'cpu', 'backend': 'gram32', 'rows': 2048, 'cols': 5632, 'seconds': 0.6325, 'measured': True},
    {'device': 'cpu', 'backend': 'gram64', 'rows': 2048, 'cols': 5632, 'seconds': 1.4475, 'measured': True},
    {'device': 'cpu', 'backend': 'gram32', 'rows': 7168, 'cols': 2048, 'seconds': 0.7239, 'measured': True},
    {'device': 'cpu', 'backend': 'gram64', 'rows': 7168, 'cols': 2048, 'seconds': 1.5681, 'measured': True},
    {'device': 'cpu', 'backend': 'gram32', 'rows': 2048, 'cols': 7168, 'seconds': 0.6865, 'measured': True},
    {'device': 'cpu', 'backend': 'gram64', 'rows': 2048, 'cols': 7168, 'seconds': 1.6281, 'measured': True},
    {'device': 'cpu', 'backend': 'gram32', 'rows': 32000, 'cols': 2048, 'seconds': 2.088, 'measured': True},
    {'device': 'cpu', 'backend': 'gram64', 'rows': 32000, 'cols': 2048, 'seconds': 4.4772, 'measured': True},
]
# END CPU_ROWS

PROJECTED_SHAPES = ((2048, 2048), (5632, 2048), (7168, 2048), (18432, 7168), (32000, 2048), (163840, 7168))
GEMM_EFFICIENCY, EIGEN_EFFICIENCY, COPY_GBPS = 0.5, 0.03, 20.0


def _projected(device: str, backend: str, rows: int, cols: int) -> dict:
    spec = DEVICES[device]
    rate = 1e12 * (spec["fp32"] if backend == "gram32" else spec["fp64"])
    big, p = max(rows, cols), min(rows, cols)
    seconds = (2 * big * p * p) / (GEMM_EFFICIENCY * rate) + (10 * p ** 3) / (EIGEN_EFFICIENCY * rate) \
        + 2 * big * p * 4 / (COPY_GBPS * 1e9)
    return {"device": device, "backend": backend, "rows": rows, "cols": cols, "seconds": seconds, "measured": False}


COST_ROWS: list[dict] = CPU_ROWS + [_projected(d, b, m, n) for d in DEVICES if d != "cpu"
                                    for b in ("gram32", "gram64") for m, n in PROJECTED_SHAPES]
