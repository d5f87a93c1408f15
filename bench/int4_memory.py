"""Peak RSS of repairing a Kimi-K2-Thinking-shaped INT4 MoE layer against the largest work unit.

One layer of K2-Thinking's routed experts at reduced count (`--experts`, 384 in the release): per expert
gate/up [2048, 7168] and down [7168, 2048] stored compressed-tensors pack-quantized (int4 symmetric group 32,
I32 `weight_packed`, BF16 `weight_scale`, I64 `weight_shape`), plus a BF16 shared expert; both sides INT4, the
fine-tune = base + a rank-8 signal + noise, each side quantised on its own. Measures `--in-process` (one
process is one worker) and, with `--ray`, a local Ray run with `--workers` actors, whose per-actor peak RSS
is sampled with psutil. Prints figures; asserts nothing. Sized for a 2-core / 24 GB machine by default.

    python bench/int4_memory.py --experts 8            # 24 packed matrices, ~350 MB of packed weights
    python bench/int4_memory.py --experts 8 --ray --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from repair_memory import measure
from safetensors.torch import save_file

from dgrepair.kernels import packed_int

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from frontier import KIMI_QUANTIZATION, KIMI_SCHEME  # noqa: E402  (the tests' mini Kimi checkpoint)

H, INTER = 7168, 2048  # hidden, moe_intermediate


def write_layer(root: Path, experts: int) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"gate": (INTER, H), "up": (INTER, H), "down": (H, INTER)}
    sides: dict[str, dict[str, torch.Tensor]] = {"base": {}, "ft": {}}
    for e in range(experts):
        for k, shape in shapes.items():
            w0 = 0.02 * torch.randn(shape, generator=g)
            u, v = torch.randn(shape[0], 8, generator=g), torch.randn(8, shape[1], generator=g)
            w1 = w0 + 2e-4 * (u @ v) + 2e-3 * torch.randn(shape, generator=g)
            for side, w in (("base", w0), ("ft", w1)):
                packed, scale, _ = packed_int.quantize(w, KIMI_SCHEME, torch.bfloat16)
                stem = f"model.layers.1.mlp.experts.{e}.{k}_proj."
                sides[side].update({stem + "weight_packed": packed, stem + "weight_scale": scale,
                                    stem + "weight_shape": torch.tensor(list(shape), dtype=torch.int64)})
            del w0, w1, u, v
    for k, shape in shapes.items():
        w0 = 0.02 * torch.randn(shape, generator=g)
        for side, w in (("base", w0), ("ft", w0 + 2e-3 * torch.randn(shape, generator=g))):
            sides[side][f"model.layers.1.mlp.shared_experts.{k}_proj.weight"] = w.to(torch.bfloat16)
    for side, tensors in sides.items():
        d = root / side
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "kimi_k2", "quantization_config":
                                                   KIMI_QUANTIZATION}))


def ray_peaks(cmd: list[str]) -> tuple[float, dict[int, float]]:
    """Run cmd (a Ray repair on its own local Ray) and sample the RSS of its RepairWorker actor processes, told
    apart from other Ray sessions on the machine by an environment tag; (wall, pid -> peak GiB)."""
    peaks: dict[int, float] = {}
    done = threading.Event()
    tag = f"{os.getpid()}-{time.time_ns()}"

    def sample() -> None:
        while not done.is_set():
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if "RepairWorker" in " ".join(p.info["cmdline"] or []) and \
                            p.environ().get("DGREPAIR_BENCH_TAG") == tag:
                        peaks[p.pid] = max(peaks.get(p.pid, 0.0), p.memory_info().rss / 2**30)
                except (psutil.Error, OSError):
                    continue
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DGREPAIR_BENCH_TAG": tag})
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return wall, peaks


def codec_speed() -> None:
    """Pack / unpack one expert's codes with dgrepair's kernel and with the compressed-tensors library."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:
        print("codec: compressed-tensors not installed (pip install -e '.[test]'); library timing skipped")
        return
    codes = torch.randint(-8, 8, (INTER, H), dtype=torch.int8)
    packed = pack_to_int32(codes, 4)
    ways = {"dgrepair pack": lambda: packed_int.pack(codes, 4), "library pack": lambda: pack_to_int32(codes, 4),
            "dgrepair unpack": lambda: packed_int.unpack(packed, 4, H),
            "library unpack": lambda: unpack_from_int32(packed, 4, codes.shape)}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(5):  # interleaved, best of 5: a loaded machine slows both alike
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    for name, seconds in best.items():
        print(f"codec: {name:<16} {seconds * 1e3:7.1f} ms per {INTER}x{H} matrix (best of 5)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--ray", action="store_true", help="also run on a local Ray with --workers actors")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default="bench/_work_int4")
    args = ap.parse_args()
    work = Path(args.workdir) / f"E{args.experts}"
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    codec_speed()
    if not (work / "ft" / "model.safetensors").exists():
        t0 = time.perf_counter()
        write_layer(work, args.experts)
        print(f"generated the pair in {time.perf_counter() - t0:.1f}s under {work}")
    unit = INTER * H  # the largest unit: one packed expert matrix (same-shape experts batch up to --batch-mb)
    print(f"layer: {args.experts} experts x 3 packed matrices of {INTER}x{H} (+ a BF16 shared expert); packed "
          f"{(work / 'ft' / 'model.safetensors').stat().st_size / 2**20:.0f} MiB per side; largest matrix "
          f"{unit * 4 / 2**20:.0f} MiB in float32")
    base = [sys.executable, "-m", "dgrepair", "repair", "--base", str(work / "base"), "--ft", str(work / "ft"),
            "--no-progress", "--force"]
    out = work / "out"
    wall, peak = measure([*base, "--out", str(out), "--in-process"])
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    print(f"in-process: wall {wall:.1f}s, peak RSS {peak:.2f} GiB = {peak * 2**30 / (unit * 4):.1f}x the largest "
          f"matrix in float32; global rho {summary['totals']['global_rho']:.4f}")
    if args.ray:
        wall, peaks = ray_peaks([*base, "--out", str(work / "out-ray"), "--executor", "ray",
                                 "--workers", str(args.workers)])
        per = ", ".join(f"{v:.2f}" for v in sorted(peaks.values()))
        print(f"ray, {args.workers} workers: wall {wall:.1f}s, peak RSS per worker [{per}] GiB (max "
              f"{max(peaks.values(), default=0) * 2**30 / (unit * 4):.1f}x the largest matrix in float32)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
