"""Time the spectral backends per matrix, against float32 torch.linalg.svd in the same process.

Prints a Markdown table (one row per backend x shape x batch) with seconds per matrix, matrices per
second, and the speed-up over `torch.linalg.svd(float32)` (what the paper's code runs) on the same
device. Asserts nothing. The SVD baseline is skipped, and the row says so, where its estimated
time exceeds --baseline-budget.

    python bench/kernels.py                       # CPU, default shapes
    python bench/kernels.py --device cuda         # on a GPU machine (adds 163840x7168)
    python bench/kernels.py --shapes 7168x2048 2048x7168   # a subset
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time

import torch

from dgrepair.kernels.spectral import repair_batch
from dgrepair.kernels.threads import available_cores
from dgrepair.kernels.threshold import ThresholdParams

SHAPES = [((2048, 2048), (1,)), ((5632, 2048), (1,)), ((2048, 5632), (1,)), ((7168, 2048), (1, 8, 32)),
          ((2048, 7168), (1, 8, 32)), ((18432, 7168), (1,)), ((32000, 2048), (1,))]
GPU_ONLY = [((163840, 7168), (1,))]


def spiked(m: int, n: int, rank: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    s = torch.linspace(12, 3, rank) * 1e-3 * max(m, n) ** 0.5
    return (u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=g)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", nargs="+", default=["gram64", "gram32", "exact"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--baseline-budget", type=float, default=120.0, help="seconds; skip longer SVD baselines")
    ap.add_argument("--exact-budget", type=float, default=60.0, help="seconds; skip longer exact-backend rows")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--shapes", nargs="+", help="only these MxN shapes (default: all, plus 163840x7168 on CUDA)")
    args = ap.parse_args()
    dev = args.device
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else None
    print(f"# bench/kernels.py {dt.date.today()} device={dev} {gpu or platform.processor() or platform.machine()} "
          f"cores={available_cores()} torch={torch.__version__}")
    print("| shape | batch | backend | s/matrix | matrices/s | speed-up vs svd f32 | kept rank |")
    print("|---|---|---|---|---|---|---|")
    warm = spiked(256, 128).to(dev)
    torch.linalg.svd(warm, full_matrices=False)
    for b in args.backends:
        repair_batch(warm[None], ThresholdParams(), b, device=dev)
    ref = None  # (flop proxy, seconds) of the first measured SVD, to estimate the others
    shapes = SHAPES + (GPU_ONLY if gpu else [])
    if args.shapes:
        shapes = [s for s in shapes if f"{s[0][0]}x{s[0][1]}" in args.shapes]
    for (m, n), batches in shapes:
        one = spiked(m, n).to(dev)
        proxy = max(m, n) * min(m, n) ** 2
        est = ref[1] * proxy / ref[0] if ref else 0.0
        if est <= args.baseline_budget:
            svd_s = timed(lambda x=one: torch.linalg.svd(x, full_matrices=False), dev, args.repeats)
            ref = ref or (proxy, svd_s)
        else:
            svd_s = None
        for batch in [b for b in batches if b <= args.max_batch]:
            stack = one.expand(batch, m, n).contiguous()
            for backend in args.backends:
                if backend == "exact" and (batch > 1 or (svd_s or est) * 1.3 > args.exact_budget):
                    continue
                result: dict = {}

                def run(x=stack, b=backend, res=result) -> None:
                    res["out"] = repair_batch(x, ThresholdParams(), b, device=dev)

                seconds = timed(run, dev, args.repeats) / batch
                rank = result["out"][1][0].rank_kept
                speed = f"{svd_s / seconds:.1f}x" if svd_s else f"svd not run (est. {est:.0f} s)"
                print(f"| {m}x{n} | {batch} | {backend} | {seconds:.3f} | {1 / seconds:.2f} | {speed} | {rank} |",
                      flush=True)
        if svd_s:
            print(f"| {m}x{n} | 1 | torch.linalg.svd f32 | {svd_s:.3f} | {1 / svd_s:.2f} | 1.0x | - |", flush=True)


if __name__ == "__main__":
    main()
