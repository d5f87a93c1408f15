r"""Tiny base/fine-tune pairs that copy the tensor layouts of real frontier checkpoints
(research/formats.md §1–3, §7): names, shapes (scaled down), dtypes, quantization and config.json.

SYNTHETIC values: base weights are 0.02·N(0, 1); each fine-tuned matrix adds a rank-3 signal plus
white noise (per matrix: per expert and per gate/up half for stacks); 1-D tensors get small noise;
routers and biases change a little. Used by the format tests and available to `demo`/bench code.

- `deepseek_v3`: MLA (q_a/q_b/kv_a_proj_with_mqa [72, 64]/kv_b/o), first_k_dense_replace=1, routed +
  shared experts, all Linear weights block-FP8 with F32 `weight_scale_inv` (one in another shard),
  BF16 embeddings/norms/router, F32 e_score_correction_bias, 2 shards named `model-N-of-2` with an
  index whose metadata is empty; the base also has an MTP layer 2 the fine-tune dropped; dims match
  transformers' DeepseekV3 (the BF16 output loads there).
- `gpt_oss`: fused MXFP4 experts (`*_blocks`/`*_scales`, gate/up interleaved), BF16 biases, router,
  attention with biases and sinks.
- `qwen3_5_moe`: `model.language_model.` prefix, fused [E, 2I, H] gate_up + [E, H, I] down stacks,
  GatedDeltaNet `linear_attn.conv1d.weight` [96, 1, 4], F32 `A_log`.
- `mixtral`: `block_sparse_moe.experts.E.w1/w2/w3`.
- `vlm`: Conv3d [32, 3, 2, 4, 4] and Conv2d [32, 3, 4, 4] patch embeddings, a Mamba `mixer.conv1d`
  with bias; the base uses the older `visual.*` / `model.*` names, the fine-tune the ≥4.52 ones.
- `kimi_int4`: a minimal compressed-tensors packed-INT4 module pair (one BF16 attention matrix, a BF16 shared
  expert, two packed experts).
- `kimi_k2_thinking`: Kimi-K2-Thinking's layout and its real `quantization_config` (compressed-tensors
  `pack-quantized`, config group `group_0`: int4 symmetric group 32, targets `Linear`; ignore `lm_head`,
  `re:.*self_attn.*`, `re:.*shared_experts.*`, `re:.*mlp\.(gate|up|gate_up|down)_proj.*`): DeepSeek-V3 naming,
  MLA in BF16, first layer dense (BF16, ignored), routed experts stored as I32 `weight_packed` + BF16
  `weight_scale` + I64 `weight_shape`, BF16 shared experts, router and embeddings; 2 shards with an index and
  one expert's scale in the other shard. Both sides INT4.
- `kimi_k2_thinking_bf16_ft`: the same base; the fine-tune stores every expert as BF16 `.weight` and its
  config.json has no quantization_config (a BF16 fine-tune of the INT4 release).
- `kimi_k2_thinking_bf16_base`: a BF16 base; the fine-tune is INT4.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..kernels import fp8, mxfp4, packed_int

FIXTURES = ("deepseek_v3", "gpt_oss", "qwen3_5_moe", "mixtral", "vlm", "kimi_int4", "kimi_k2_thinking",
            "kimi_k2_thinking_bf16_ft", "kimi_k2_thinking_bf16_base")
KIMI_SCHEME = packed_int.IntScheme(num_bits=4, symmetric=True, strategy="group", group_size=32)
KIMI_QUANTIZATION = {  # Kimi-K2-Thinking's config.json quantization_config
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


@dataclass(frozen=True)
class T:
    """One logical tensor. role: matrix (low-rank delta), vector (small noise), same (identical),
    fp8 (stored F8_E4M3 + `_scale_inv`), mxfp4 (stored `_blocks` + `_scales`; shape is [E, out, in]),
    int4 (compressed-tensors weight_packed + weight_scale + weight_shape; name is the module)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "BF16"
    role: str = "matrix"
    shard: int = 0
    base_name: str | None = None  # the base stores it under another name (prefix drift)
    base_only: bool = False  # only the base has it (a fine-tune that dropped the MTP layer)


@dataclass(frozen=True)
class Fixture:
    name: str
    config: dict
    tensors: list[T] = field(default_factory=list)
    shards: int = 1  # > 1: sharded with an index whose metadata is empty
    dense_side: str | None = None  # "base" / "ft": that side stores `int4` tensors as BF16 `.weight`, unquantised


DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


def deepseek_v3() -> Fixture:
    cfg = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 128,
           "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1,
           "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
           "q_lora_rank": 48, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 8,
           "v_head_dim": 32, "max_position_embeddings": 64, "tie_word_embeddings": False,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}}
    ts = [T("model.embed_tokens.weight", (128, 64)), T("model.norm.weight", (64,), role="vector"),
          T("lm_head.weight", (128, 64), shard=1)]
    for n in range(2):
        p = f"model.layers.{n}."
        ts += [T(p + "input_layernorm.weight", (64,), role="vector"),
               T(p + "post_attention_layernorm.weight", (64,), role="vector"),
               T(p + "self_attn.q_a_proj.weight", (48, 64), role="fp8"),
               T(p + "self_attn.q_a_layernorm.weight", (48,), role="vector"),
               T(p + "self_attn.q_b_proj.weight", (80, 48), role="fp8"),
               T(p + "self_attn.kv_a_proj_with_mqa.weight", (72, 64), role="fp8", shard=n),
               T(p + "self_attn.kv_a_layernorm.weight", (64,), role="vector"),
               T(p + "self_attn.kv_b_proj.weight", (128, 64), role="fp8"),
               T(p + "self_attn.o_proj.weight", (64, 64), role="fp8")]
        if n == 0:  # first_k_dense_replace = 1
            ts += [T(p + f"mlp.{k}_proj.weight", s, role="fp8", shard=1)
                   for k, s in (("gate", (96, 64)), ("up", (96, 64)), ("down", (64, 96)))]
            continue
        ts += [T(p + "mlp.gate.weight", (4, 64), role="vector"),
               T(p + "mlp.gate.e_score_correction_bias", (4,), "F32", role="vector")]
        for e in [*(f"experts.{i}" for i in range(4)), "shared_experts"]:
            ts += [T(p + f"mlp.{e}.{k}_proj.weight", s, role="fp8", shard=1)
                   for k, s in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32)))]
    # MTP layer (num_nextn_predict_layers = 1) with its stored copies of the embedding and head; fine-tunes
    # often drop it, so only the base has it (research/formats.md §4 "Unmatched keys")
    ts += [T("model.layers.2." + k, s, role="vector" if len(s) == 1 else "matrix", base_only=True) for k, s in (
        ("embed_tokens.weight", (128, 64)), ("shared_head.head.weight", (128, 64)), ("eh_proj.weight", (64, 128)),
        ("enorm.weight", (64,)), ("hnorm.weight", (64,)))]
    return Fixture("deepseek_v3", cfg, ts, shards=2)


def gpt_oss() -> Fixture:
    cfg = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "vocab_size": 128, "hidden_size": 64,
           "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 32, "num_local_experts": 2, "num_experts_per_tok": 1, "max_position_embeddings": 64,
           "layer_types": ["full_attention"], "sliding_window": 16, "tie_word_embeddings": False,
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
               "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    p = "model.layers.0."
    ts = [T("model.embed_tokens.weight", (128, 64)), T("model.norm.weight", (64,), role="vector"),
          T("lm_head.weight", (128, 64)),
          T(p + "input_layernorm.weight", (64,), role="vector"),
          T(p + "post_attention_layernorm.weight", (64,), role="vector"),
          T(p + "mlp.experts.gate_up_proj", (2, 64, 64), role="mxfp4"),  # on disk (out = 2I, in = H)
          T(p + "mlp.experts.gate_up_proj_bias", (2, 64), role="vector"),
          T(p + "mlp.experts.down_proj", (2, 64, 32), role="mxfp4"),  # (out = H, in = I)
          T(p + "mlp.experts.down_proj_bias", (2, 64), role="vector"),
          T(p + "mlp.router.weight", (2, 64), role="vector"), T(p + "mlp.router.bias", (2,), role="vector"),
          T(p + "self_attn.sinks", (2,), role="vector")]
    for k, rows in (("q", 64), ("k", 32), ("v", 32), ("o", 64)):
        ts += [T(p + f"self_attn.{k}_proj.weight", (rows, 64)), T(p + f"self_attn.{k}_proj.bias", (rows,),
                                                                  role="vector")]
    return Fixture("gpt_oss", cfg, ts)


def qwen3_5_moe() -> Fixture:
    cfg = {"model_type": "qwen3_5_moe", "text_config": {"model_type": "qwen3_5_moe_text", "hidden_size": 64,
                                                        "num_experts": 4, "moe_intermediate_size": 32,
                                                        "linear_conv_kernel_dim": 4}}
    p0, p1 = "model.language_model.layers.0.", "model.language_model.layers.1."
    ts = [T("model.language_model.embed_tokens.weight", (128, 64)),
          T("model.language_model.norm.weight", (64,), role="vector"), T("lm_head.weight", (128, 64)),
          T(p0 + "linear_attn.in_proj_qkv.weight", (96, 64)), T(p0 + "linear_attn.in_proj_z.weight", (64, 64)),
          T(p0 + "linear_attn.in_proj_b.weight", (2, 64), role="vector"),
          T(p0 + "linear_attn.in_proj_a.weight", (2, 64), role="vector"),
          T(p0 + "linear_attn.conv1d.weight", (96, 1, 4)),
          T(p0 + "linear_attn.A_log", (2,), "F32", role="vector"), T(p0 + "linear_attn.dt_bias", (2,), role="vector"),
          T(p0 + "linear_attn.norm.weight", (32,), role="vector"), T(p0 + "linear_attn.out_proj.weight", (64, 64)),
          T(p1 + "self_attn.q_proj.weight", (128, 64)), T(p1 + "self_attn.k_proj.weight", (32, 64)),
          T(p1 + "self_attn.v_proj.weight", (32, 64)), T(p1 + "self_attn.o_proj.weight", (64, 64))]
    for p in (p0, p1):
        ts += [T(p + "input_layernorm.weight", (64,), role="vector"),
               T(p + "mlp.gate.weight", (4, 64), role="vector"),
               T(p + "mlp.experts.gate_up_proj", (4, 64, 64)),  # [E, 2I, H], gate rows then up rows
               T(p + "mlp.experts.down_proj", (4, 64, 32)),  # [E, H, I]
               T(p + "mlp.shared_expert.gate_proj.weight", (32, 64)), T(p + "mlp.shared_expert.up_proj.weight",
                                                                        (32, 64)),
               T(p + "mlp.shared_expert.down_proj.weight", (64, 32)),
               T(p + "mlp.shared_expert_gate.weight", (1, 64), role="vector")]
    return Fixture("qwen3_5_moe", cfg, ts)


def mixtral() -> Fixture:
    cfg = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 32, "num_local_experts": 4}
    ts = [T("model.embed_tokens.weight", (128, 64)), T("model.norm.weight", (64,), role="vector"),
          T("lm_head.weight", (128, 64))]
    for n in range(2):
        p = f"model.layers.{n}."
        ts += [T(p + "input_layernorm.weight", (64,), role="vector"),
               T(p + "self_attn.q_proj.weight", (64, 64)), T(p + "self_attn.k_proj.weight", (32, 64)),
               T(p + "self_attn.v_proj.weight", (32, 64)), T(p + "self_attn.o_proj.weight", (64, 64)),
               T(p + "block_sparse_moe.gate.weight", (4, 64), role="vector")]
        for e in range(4):
            q = p + f"block_sparse_moe.experts.{e}."
            ts += [T(q + "w1.weight", (32, 64)), T(q + "w2.weight", (64, 32)), T(q + "w3.weight", (32, 64))]
    return Fixture("mixtral", cfg, ts)


def vlm() -> Fixture:
    cfg = {"model_type": "qwen2_5_vl", "vision_config": {"patch_size": 4, "temporal_patch_size": 2}}
    lm = "model.language_model.layers.0."
    ts = [T("model.visual.patch_embed.proj.weight", (32, 3, 2, 4, 4), "F32",
            base_name="visual.patch_embed.proj.weight"),
          T("model.vision_tower.vision_model.embeddings.patch_embedding.weight", (32, 3, 4, 4), "F32"),
          T("model.vision_tower.vision_model.embeddings.patch_embedding.bias", (32,), "F32", role="vector"),
          T(lm + "mixer.conv1d.weight", (320, 1, 4), base_name="model.layers.0.mixer.conv1d.weight"),
          T(lm + "mixer.conv1d.bias", (320,), role="vector", base_name="model.layers.0.mixer.conv1d.bias"),
          T(lm + "mixer.in_proj.weight", (96, 64), base_name="model.layers.0.mixer.in_proj.weight"),
          T(lm + "mixer.A_log", (8,), "F32", role="vector", base_name="model.layers.0.mixer.A_log"),
          T(lm + "mixer.D", (8,), "F32", role="vector", base_name="model.layers.0.mixer.D"),
          T("model.language_model.embed_tokens.weight", (128, 64), base_name="model.embed_tokens.weight"),
          T("lm_head.weight", (128, 64))]
    return Fixture("vlm", cfg, ts)


def kimi_int4() -> Fixture:
    cfg = {"model_type": "kimi_k2", "quantization_config": KIMI_QUANTIZATION}
    p = "model.layers.1."
    ts = [T(p + "self_attn.o_proj.weight", (64, 64)), T(p + "mlp.shared_experts.down_proj.weight", (64, 32))]
    ts += [T(p + f"mlp.experts.{e}.down_proj", (64, 32), role="int4") for e in range(2)]
    return Fixture("kimi_int4", cfg, ts)


def kimi_k2_thinking(dense_side: str | None = None) -> Fixture:
    cfg = {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 128,
           "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1,
           "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
           "q_lora_rank": 48, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 8,
           "v_head_dim": 32, "max_position_embeddings": 64, "tie_word_embeddings": False,
           "quantization_config": KIMI_QUANTIZATION}
    ts = [T("model.embed_tokens.weight", (128, 64)), T("model.norm.weight", (64,), role="vector"),
          T("lm_head.weight", (128, 64), shard=1)]
    for n in range(2):
        p = f"model.layers.{n}."
        ts += [T(p + "input_layernorm.weight", (64,), role="vector"),
               T(p + "post_attention_layernorm.weight", (64,), role="vector"),
               T(p + "self_attn.q_a_proj.weight", (48, 64)), T(p + "self_attn.q_a_layernorm.weight", (48,),
                                                                 role="vector"),
               T(p + "self_attn.q_b_proj.weight", (80, 48)), T(p + "self_attn.kv_a_proj_with_mqa.weight", (72, 64)),
               T(p + "self_attn.kv_a_layernorm.weight", (64,), role="vector"),
               T(p + "self_attn.kv_b_proj.weight", (128, 64)), T(p + "self_attn.o_proj.weight", (64, 64))]
        if n == 0:  # first_k_dense_replace = 1: a BF16 dense MLP (ignored by `re:.*mlp\.(gate|up|down)_proj.*`)
            ts += [T(p + f"mlp.{k}_proj.weight", s) for k, s in (("gate", (96, 64)), ("up", (96, 64)),
                                                                 ("down", (64, 96)))]
            continue
        ts += [T(p + "mlp.gate.weight", (4, 64), role="vector"),
               T(p + "mlp.gate.e_score_correction_bias", (4,), "F32", role="vector")]
        ts += [T(p + f"mlp.shared_experts.{k}_proj.weight", s, shard=1)
               for k, s in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32)))]
        ts += [T(p + f"mlp.experts.{e}.{k}_proj", s, role="int4", shard=1)
               for e in range(4) for k, s in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32)))]
    name = "kimi_k2_thinking" + (f"_bf16_{dense_side}" if dense_side else "")
    return Fixture(name, cfg, ts, shards=2, dense_side=dense_side)


def kimi_k2_thinking_bf16_ft() -> Fixture:
    return kimi_k2_thinking("ft")


def kimi_k2_thinking_bf16_base() -> Fixture:
    return kimi_k2_thinking("base")


def build(name: str) -> Fixture:
    if name not in FIXTURES:
        raise ValueError(f"unknown fixture {name!r}; choose one of {', '.join(FIXTURES)}")
    return globals()[name]()


def _gen(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 7919 + seed)


def _delta(shape: tuple[int, ...], g: torch.Generator, noise: float = 2e-3, rank: int = 3) -> torch.Tensor:
    """Rank-3 signal well above the DG threshold plus white noise, per matrix (leading axes = stack)."""
    if len(shape) > 3:  # a convolution: one [out, in·Πk] matrix
        return _delta((shape[0], math.prod(shape[1:])), g, noise, rank).reshape(shape)
    if len(shape) == 3:
        return torch.stack([_delta(shape[1:], g, noise, rank) for _ in range(shape[0])])
    m, n = shape
    r = min(rank, m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(12.0, 6.0, r, dtype=torch.float64) * noise * math.sqrt(max(m, n))
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def _stored(t: T, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors for one logical float64 tensor."""
    if t.role == "fp8":
        codes, scale = fp8.quantize(w.float(), torch.float32, power_of_two=False)
        return {t.name: codes, t.name + "_scale_inv": scale}
    if t.role == "mxfp4":
        blocks, scales = mxfp4.quantize(w.float())
        return {t.name + "_blocks": blocks, t.name + "_scales": scales}
    if t.role == "int4":  # compressed-tensors pack-quantized, int4 symmetric group 32, BF16 scales
        packed, scale, _ = packed_int.quantize(w.float(), KIMI_SCHEME, torch.bfloat16)
        return {t.name + ".weight_packed": packed, t.name + ".weight_scale": scale,
                t.name + ".weight_shape": torch.tensor(list(t.shape), dtype=torch.int64)}
    return {t.name: w.to(DTYPES[t.dtype])}


def write_pair(name: str, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `root/base` and `root/ft` for fixture `name`; returns both paths."""
    fx = build(name)
    stores: dict[str, list[dict[str, torch.Tensor]]] = {"base": [{} for _ in range(fx.shards)],
                                                        "ft": [{} for _ in range(fx.shards)]}
    for t in fx.tensors:
        g = _gen(t.name, seed)
        w0 = 0.02 * torch.randn(t.shape, generator=g, dtype=torch.float64)
        if t.role in ("matrix", "fp8", "mxfp4", "int4"):
            w1 = w0 + _delta(t.shape, g, noise=2e-3 if t.role in ("matrix", "int4") else 4e-3)
        elif t.role == "vector":
            w1 = w0 + 1e-3 * torch.randn(t.shape, generator=g, dtype=torch.float64)
        else:
            w1 = w0.clone()
        for role, w in (("base", w0), ("ft", w1)):
            if role == "ft" and t.base_only:
                continue
            stored = {t.name + ".weight": w.to(torch.bfloat16)} if t.role == "int4" and role == fx.dense_side \
                else _stored(t, w)
            if role == "base" and t.base_name:
                stored = {t.base_name + k[len(t.name):]: v for k, v in stored.items()}
            for k, v in stored.items():  # a weight's block scales can live in the other shard
                other = (k.endswith("_scale_inv") and "kv_a_proj" in k) or (k.endswith("weight_scale")
                                                                            and ".experts.1.down" in k)
                shard = (t.shard + 1) % fx.shards if other else t.shard
                stores[role][shard][k] = v
    paths = []
    for role in ("base", "ft"):
        d = root / role
        d.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in fx.config.items() if not (role == fx.dense_side and k == "quantization_config")}
        (d / "config.json").write_text(json.dumps(config, indent=2))
        if fx.shards == 1:
            save_file(stores[role][0], str(d / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, tensors in enumerate(stores[role]):
                shard = f"model-{i + 1}-of-{fx.shards}.safetensors"  # unpadded, like Kimi-K2
                save_file(tensors, str(d / shard), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, shard))
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        paths.append(d)
    return paths[0], paths[1]
