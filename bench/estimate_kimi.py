"""Projected repair time of a Kimi-K2-shaped checkpoint pair (61 layers, 384 routed experts of
7168x2048, block-FP8 weights) on a few clusters, from the same cost model as `dgrepair plan
--estimate` (engine/analysis/estimate.py). Prints a Markdown table; asserts nothing.

Shapes (DeepSeek-V3 layout): per MoE layer 384 routed + 1 shared expert, each gate/up 2048x7168 and
down 7168x2048; layer 0 is a dense MLP (18432x7168, 18432x7168, 7168x18432); MLA attention per layer
q_a 1536x7168, q_b 12288x1536, kv_a 576x7168, kv_b 16384x512, o 7168x8192; embeddings and lm_head
163840x7168 in BF16. Weights are FP8 (1 byte), written back as FP8 (the policy's low-precision case).

    python bench/estimate_kimi.py --io-gbps 2
"""

from __future__ import annotations

import argparse

from dgrepair.engine.analysis.estimate import MatrixWork, estimate, parse_cluster

LAYERS, EXPERTS, MOE_LAYERS = 61, 384, 60
CLUSTERS = ("64xcpu", "512xcpu", "8xh100", "8xh200", "8xl4", "64xh100")


def kimi_work() -> tuple[list[MatrixWork], int, int]:
    experts = MOE_LAYERS * (EXPERTS + 1)
    work = [MatrixWork(2048, 7168, 2 * experts, "FP8"), MatrixWork(7168, 2048, experts, "FP8"),
            MatrixWork(18432, 7168, 2, "FP8"), MatrixWork(7168, 18432, 1, "FP8"),
            MatrixWork(1536, 7168, LAYERS, "FP8"), MatrixWork(12288, 1536, LAYERS, "FP8"),
            MatrixWork(576, 7168, LAYERS, "FP8"), MatrixWork(16384, 512, LAYERS, "FP8"),
            MatrixWork(7168, 8192, LAYERS, "FP8"), MatrixWork(163840, 7168, 2, "BF16")]
    params = sum(w.rows * w.cols * w.count for w in work)
    bf16 = 2 * 163840 * 7168
    nbytes = params - bf16 + 2 * bf16  # FP8 weights 1 byte, embeddings 2
    return work, 3 * nbytes, 163840 * 7168 * 4  # read base + ft, write out; largest tensor in float32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--io-gbps", type=float, default=2.0)
    args = ap.parse_args()
    work, io, largest = kimi_work()
    print(f"{sum(w.count for w in work)} matrices, {io / 3e12:.2f} TB per checkpoint, I/O {io / 1e12:.2f} TB "
          f"at {args.io_gbps:g} GB/s")
    print("| cluster | cost rows | matrices by backend | compute per worker | I/O | wall (projected) | "
          "peak host / worker | peak device |")
    print("|---|---|---|---|---|---|---|---|")
    for c in CLUSTERS:
        e = estimate(work, io, largest, parse_cluster(c), args.io_gbps, overlap=True)  # reads from a bucket
        dev = f"{e['peak_device_gib']:.1f} GiB of {e['device_gib']}" if e["peak_device_gib"] is not None else "-"
        print(f"| {c} | {'CPU, measured' if e['measured'] else 'projection'} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(e['backends'].items()))} | "
              f"{e['compute_s_per_worker'] / 3600:.2f} h | {e['io_s'] / 3600:.2f} h | {e['wall_s'] / 3600:.2f} h "
              f"({e['bound']}-bound) | {e['peak_host_gib_per_worker']:.1f} GiB | {dev} |")


if __name__ == "__main__":
    main()
