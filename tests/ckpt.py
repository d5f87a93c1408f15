"""Test helpers that write real safetensors checkpoints with the safetensors library itself."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_single(root: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"),
              metadata=metadata if metadata is not None else {"format": "pt"})
    return root


def write_sharded(root: Path, shards: dict[str, dict[str, torch.Tensor]], total_size: bool = False,
                  metadata: dict[str, str] | None = None) -> Path:
    """Write the given shard files plus model.safetensors.index.json (optionally without total_size)."""
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    total = 0
    for shard, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / shard),
                  metadata=metadata if metadata is not None else {"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
    meta = {"total_size": total} if total_size else {}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": meta, "weight_map": weight_map}))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove inputs are untouched)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def low_rank_plus_noise(shape: tuple[int, ...], rank: int, gen: torch.Generator, noise: float = 1e-3,
                        strength: float = 8.0) -> torch.Tensor:
    """A float64 delta: rank-`rank` signal well above the DG threshold plus white noise."""
    m, n = shape[0], math.prod(shape[1:])
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))[0]
    s = torch.linspace(strength, strength / 2, rank, dtype=torch.float64) * noise * math.sqrt(max(m, n))
    d = (u * s) @ v.T + noise * torch.randn(m, n, generator=gen, dtype=torch.float64)
    return d.reshape(shape)
