"""`dgrepair demo`: repair a synthetic pair and compare what DG-Hard kept with what was planted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from ..config import RepairConfig
from ..io.checkpoint import open_checkpoint
from ..io.safetensors_format import read_tensor
from ..run.executor import run_repair
from .synthetic import SyntheticSpec, planted_signal, write_pair


def run_demo(workdir: Path, dtype: str, kernel: str, stream: TextIO,
             executor: Callable[[RepairConfig], dict[str, Any]] = run_repair,
             executor_choice: str = "local") -> list[dict[str, float]]:
    """Write the synthetic pair, repair it with `executor` (the CLI passes its own `run`, which picks the
    executor by `executor_choice`), report."""
    spec = SyntheticSpec(dtype=dtype)
    print(f"SYNTHETIC demo ({spec.n_params() / 1e6:.2f}M parameters, {dtype}): writing base and fine-tune to "
          f"{workdir}", file=stream)
    base_dir, ft_dir = write_pair(workdir, spec)
    out = workdir / "repaired"
    cfg = RepairConfig.of(base=str(base_dir), ft=str(ft_dir), out=str(out), kernel=kernel, force=True,
                          executor=executor_choice, progress=False)
    summary = executor(cfg)
    print(f"repaired with {summary['executor']['kind']} executor", file=stream)
    base, ft, rep = (open_checkpoint(p, r) for p, r in ((base_dir, "base"), (ft_dir, "fine-tune"), (out, "output")))
    print(f"\nft - base = planted low-rank signal L + white noise (sigma {spec.noise:g}); error is ||x - L||_F / "
          "||L||_F", file=stream)
    matrices = [(name, shape) for name, shape in spec.tensors() if len(shape) >= 2]
    wn = max(len("tensor"), *(len(n) for n, _ in matrices))
    ws = max(len("shape"), *(len("x".join(map(str, sh))) for _, sh in matrices))
    print(f"{'tensor':<{wn}} {'shape':>{ws}} {'planted':>7} {'kept':>5} {'err ft':>8} {'err repaired':>12}",
          file=stream)
    results = []
    for name, shape in matrices:
        w0 = read_tensor(*base.entry(name)).double()
        w1 = read_tensor(*ft.entry(name)).double()
        w = read_tensor(*rep.entry(name)).double()
        signal = planted_signal(spec, name, shape)
        err_ft = float((w1 - w0 - signal).norm() / signal.norm())
        err_rep = float((w - w0 - signal).norm() / signal.norm())
        kept = _kept_rank(out, name)
        results.append({"tensor": name, "planted": spec.planted_rank(name), "kept": kept,
                        "err_ft": err_ft, "err_repaired": err_rep})
        print(f"{name:<{wn}} {'x'.join(map(str, shape)):>{ws}} {spec.planted_rank(name):>7} {kept:>5} "
              f"{err_ft:>8.4f} {err_rep:>12.4f}", file=stream)
    match = sum(r["planted"] == r["kept"] for r in results)
    print(f"\nkept rank == planted rank for {match}/{len(results)} matrices; mean error {_mean(results, 'err_ft'):.4f}"
          f" (fine-tune) -> {_mean(results, 'err_repaired'):.4f} (repaired); global rho "
          f"{summary['totals']['global_rho']:.4f}", file=stream)
    print(f"repaired checkpoint: {out}\nmanifest: {out / 'dgrepair' / 'manifest.parquet'}", file=stream)
    return results


def _kept_rank(out: Path, name: str) -> int:
    from ..output.manifest import latest_by_key, read_rows

    row = latest_by_key(read_rows(out))[(name, None, None)]
    return int(row.rank_kept or 0)


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return float(torch.tensor([r[key] for r in rows]).mean())
