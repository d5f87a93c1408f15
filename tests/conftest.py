"""Shared fixtures: small real safetensors pairs written by the safetensors library."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from ckpt import low_rank_plus_noise, write_sharded
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_reference_blas():
    """numpy's and scipy's OpenBLAS pools default to every core; on the 2-core CI machine the
    reference SVDs then fight the kernels' own pool (measured 54 s vs 9 s for the contract tests).
    The kernels set their own limits inside, so this only affects the test-side references."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclass
class Pair:
    base: Path
    ft: Path
    base_tensors: dict[str, torch.Tensor]
    ft_tensors: dict[str, torch.Tensor]
    shard_of: dict[str, str]


SHARDS = ("model-1-of-3.safetensors", "model-00002-of-000003.safetensors", "x.safetensors")


def make_pair(root: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Pair:
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    delta: dict[str, torch.Tensor] = {}

    def mat(name: str, shape: tuple[int, ...], rank: int = 4) -> None:
        base[name] = 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)
        delta[name] = low_rank_plus_noise(shape, rank, g)

    mat("model.embed_tokens.weight", (160, 64), rank=3)
    for layer in range(2):
        p = f"model.layers.{layer}."
        mat(p + "self_attn.q_proj.weight", (64, 64))
        mat(p + "self_attn.k_proj.weight", (32, 64), rank=2)
        mat(p + "mlp.gate_proj.weight", (96, 64))
        mat(p + "mlp.down_proj.weight", (64, 96))
        base[p + "input_layernorm.weight"] = torch.ones(64, dtype=torch.float64)
        delta[p + "input_layernorm.weight"] = 0.01 * torch.randn(64, generator=g, dtype=torch.float64)
    mat("model.layers.0.mlp.experts.down_proj", (4, 48, 32), rank=2)  # expert stack
    for e in range(4):  # per-expert differences in noise scale: each expert needs its own tau
        delta["model.layers.0.mlp.experts.down_proj"][e] = (
            low_rank_plus_noise((48, 32), 2, g, noise=10.0 ** -(2 + e % 3)))
    mat("visual.patch_embed.proj.weight", (32, 3, 4, 4), rank=3)  # Conv2d kernel
    base["model.frozen.weight"] = 0.02 * torch.randn(40, 64, generator=g, dtype=torch.float64)
    delta["model.frozen.weight"] = torch.zeros(40, 64, dtype=torch.float64)  # Δ = 0
    base["model.lowrank.weight"] = 0.02 * torch.randn(64, 48, generator=g, dtype=torch.float64)
    delta["model.lowrank.weight"] = 1e-2 * (torch.randn(64, 2, generator=g, dtype=torch.float64)
                                            @ torch.randn(2, 48, generator=g, dtype=torch.float64))  # rank 2
    base["model.small.weight"] = torch.randn(16, 32, generator=g, dtype=torch.float64)  # 512 < 1024
    delta["model.small.weight"] = 0.1 * torch.randn(16, 32, generator=g, dtype=torch.float64)
    base["lm_head.weight"] = 0.02 * torch.randn(160, 64, generator=g, dtype=torch.float64)
    delta["lm_head.weight"] = low_rank_plus_noise((160, 64), 3, g)

    base_t = {k: v.to(dtype) for k, v in base.items()}
    ft_t = {k: (base[k] + delta[k]).to(dtype) for k in base}
    ids = torch.arange(128, dtype=torch.int64)[None]
    base_t["model.position_ids"] = ids
    ft_t["model.position_ids"] = ids
    base_t["mtp.only_in_base.weight"] = torch.randn(64, 64, generator=g).to(dtype)
    ft_t["model.new_adapter.weight"] = torch.randn(64, 64, generator=g).to(dtype)

    names = sorted(ft_t)
    shard_of = {n: SHARDS[i % 3] for i, n in enumerate(names)}
    base_shards = {"base-a.safetensors": {}, "base-b.safetensors": {}}
    for i, n in enumerate(sorted(base_t)):
        base_shards["base-a.safetensors" if i % 2 else "base-b.safetensors"][n] = base_t[n]
    ft_shards: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SHARDS}
    for n in names:
        ft_shards[shard_of[n]][n] = ft_t[n]
    write_sharded(root / "base", base_shards, total_size=True)
    write_sharded(root / "ft", ft_shards, total_size=False)
    ft_dir = root / "ft"
    (ft_dir / "config.json").write_text(json.dumps({"model_type": "llama", "note": "test"}))
    (ft_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    (ft_dir / "chat_template.jinja").write_text("{{ messages }}")
    (ft_dir / "generation_config.json").write_text('{"do_sample": false}')
    (ft_dir / "training_args.bin").write_bytes(b"\x80\x04\x95pickle-bytes-never-read")
    return Pair(root / "base", ft_dir, base_t, ft_t, shard_of)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


@pytest.fixture
def small_pair(tmp_path: Path):
    """Two 2-shard checkpoints of two F32 matrices (the bad-input tests' pair)."""
    g = torch.Generator().manual_seed(0)
    base = {"layer.a.weight": torch.randn(64, 32, generator=g), "layer.b.weight": torch.randn(48, 32, generator=g)}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    write_sharded(tmp_path / "base", {"s1.safetensors": {"layer.a.weight": base["layer.a.weight"]},
                                      "s2.safetensors": {"layer.b.weight": base["layer.b.weight"]}})
    write_sharded(tmp_path / "ft", {"s1.safetensors": {"layer.a.weight": ft["layer.a.weight"]},
                                    "s2.safetensors": {"layer.b.weight": ft["layer.b.weight"]}})
    return tmp_path / "base", tmp_path / "ft"
