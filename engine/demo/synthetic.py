"""Synthetic base/fine-tune pairs with a planted low-rank signal plus white noise.

Clearly synthetic (the config says so): used by `dgrepair demo` and the benchmarks. Each repaired
matrix gets `Δ = L + σZ`, L of a known rank whose singular values sit well above the DG threshold,
so the truth is known: DG-Hard should keep exactly rank(L) components and shrink the error.
Tensors are generated one at a time from a per-tensor seed, so any size fits in bounded memory.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.safetensors_format import TORCH_DTYPES, write_streaming


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a small LLaMA-layout model and of the planted fine-tune delta."""

    layers: int = 2
    hidden: int = 256
    intermediate: int = 688
    vocab: int = 1024
    heads: int = 8
    kv_heads: int = 4
    dtype: str = "F32"
    noise: float = 1e-3  # σ of the white part of Δ
    base_scale: float = 0.02
    signal_low: float = 4.0  # planted singular values span [low, high] x σ·sqrt(N)
    signal_high: float = 12.0
    shard_bytes: int = 0  # 0 = one model.safetensors; else shards of about this size + an index
    seed: int = 0

    def planted_rank(self, name: str) -> int:
        for key, rank in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2), ("o_proj", 4), ("gate_proj", 8),
                          ("up_proj", 8), ("down_proj", 6), ("embed_tokens", 3), ("lm_head", 3)):
            if key in name:
                return rank
        return 0

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())


def tinyllama_spec(layers: int = 22, **overrides) -> SyntheticSpec:
    """TinyLlama-1.1B shapes (hidden 2048, intermediate 5632, 32/4 heads, vocab 32000) in BF16;
    22 layers give 1.10B parameters per checkpoint. Used by the benchmarks."""
    return SyntheticSpec(**{"layers": layers, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "heads": 32,
                            "kv_heads": 4, "dtype": "BF16", "noise": 1e-4, "shard_bytes": 2 << 30, "seed": 0,
                            **overrides})


def _gen(name: str, seed: int, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{salt}/{name}".encode()))


def base_tensor(spec: SyntheticSpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape) + 0.01 * torch.randn(shape, generator=_gen(name, spec.seed, "base"))
    return spec.base_scale * torch.randn(shape, generator=_gen(name, spec.seed, "base"))


def planted_signal(spec: SyntheticSpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """L: rank `planted_rank(name)` with singular values spanning [low, high] x σ·sqrt(max(m, n))."""
    m, n = shape
    r = spec.planted_rank(name)
    g = _gen(name, spec.seed, "signal")
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.linspace(spec.signal_high, spec.signal_low, r, dtype=torch.float64) * spec.noise * math.sqrt(max(m, n))
    return (u * s) @ v.T


def ft_tensor(spec: SyntheticSpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    base = base_tensor(spec, name, shape)
    if len(shape) == 1:  # norms move a little; they are passed through by the repair
        return base + 0.001 * torch.randn(shape, generator=_gen(name, spec.seed, "ft"))
    noise = spec.noise * torch.randn(shape, generator=_gen(name, spec.seed, "noise"))
    return (base.double() + planted_signal(spec, name, shape) + noise.double()).float()


def _cast(t: torch.Tensor, spec: SyntheticSpec) -> torch.Tensor:
    return t.to(TORCH_DTYPES[spec.dtype])


def write_checkpoint(root: Path, spec: SyntheticSpec, which: str) -> None:
    """Write the base ('base') or fine-tuned ('ft') checkpoint of the synthetic pair."""
    root.mkdir(parents=True, exist_ok=True)
    make = base_tensor if which == "base" else ft_tensor
    dtype = TORCH_DTYPES[spec.dtype]
    items = [(name, (lambda n=name, s=shape: _cast(make(spec, n, s), spec)), dtype, shape)
             for name, shape in spec.tensors()]
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list] = [[]]
    size = 0
    for item in items:
        nbytes = math.prod(item[3]) * itemsize
        if spec.shard_bytes and groups[-1] and size + nbytes > spec.shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    if len(groups) == 1:
        write_streaming(root / "model.safetensors", groups[0])
    else:
        weight_map, total = {}, 0
        for k, group in enumerate(groups, 1):
            shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            write_streaming(root / shard, group)
            for name, _, _, shape in group:
                weight_map[name] = shard
                total += math.prod(shape) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "_comment": f"SYNTHETIC {which} checkpoint written by dgrepair (planted low-rank signal + noise)",
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[spec.dtype],
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))


def write_pair(workdir: Path, spec: SyntheticSpec) -> tuple[Path, Path]:
    base, ft = workdir / "base", workdir / "ft"
    write_checkpoint(base, spec, "base")
    write_checkpoint(ft, spec, "ft")
    return base, ft
