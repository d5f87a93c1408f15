"""End-to-end `dgrepair repair` on real safetensors pairs, checked against the float64 reference."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reference
import torch
from ckpt import tree_digest
from pairs import SHARDS, Pair, make_pair
from safetensors import safe_open
from safetensors.torch import save_file

from dgrepair.cli import main

REQUIRED_COLUMNS = ["tensor", "expert", "shard", "shape", "dtype", "kind", "rank_total", "rank_kept", "s_med",
                    "sigma_hat", "tau", "rho", "noise_energy_fraction", "seconds", "status", "sha256"]


def repair(pair: Pair, out: Path, *extra: str) -> int:
    return main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--no-progress",
                 "--in-process", *extra])


def load_out(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in SHARDS:
        with safe_open(out / shard, framework="pt") as fh:  # the real safetensors reader
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def reference_matrices(pair: Pair, name: str) -> list[tuple[np.ndarray, np.ndarray, int, float]]:
    """Per matrix: (base float32 as float64, reference Δ*, rank, τ) following docs/maths.md."""
    b = pair.base_tensors[name].float().numpy()
    f = pair.ft_tensors[name].float().numpy()
    if b.ndim == 3 and "experts" in name:
        mats = [(b[e], f[e]) for e in range(b.shape[0])]
    else:
        mats = [(b.reshape(b.shape[0], -1), f.reshape(f.shape[0], -1))]
    out = []
    for bm, fm in mats:
        d_star, r, tau = reference.dg_hard(fm - bm)  # float32 subtraction, as docs/maths.md says
        out.append((bm.astype(np.float64), d_star, r, tau))
    return out


REPAIRED = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.1.mlp.down_proj.weight", "lm_head.weight", "visual.patch_embed.proj.weight",
            "model.layers.0.mlp.experts.down_proj"]
BYTE_IDENTICAL = ["model.layers.0.input_layernorm.weight", "model.position_ids", "model.small.weight",
                  "model.new_adapter.weight", "model.frozen.weight", "model.lowrank.weight"]


def test_values_ranks_and_manifest_match_the_reference(pair, tmp_path):
    out = tmp_path / "out"
    assert repair(pair, out) == 0
    got = load_out(out)
    assert set(got) == set(pair.ft_tensors)
    manifest = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    assert set(REQUIRED_COLUMNS) <= set(manifest.columns)
    for name in REPAIRED:
        rows = manifest[manifest.tensor == name].sort_values("expert", na_position="first")
        refs = reference_matrices(pair, name)
        assert len(rows) == len(refs)
        w = got[name].double().numpy()
        w_mats = [w[e] for e in range(w.shape[0])] if len(refs) > 1 else [w.reshape(w.shape[0], -1)]
        for (bm, d_star, r, tau), wm, (_, row) in zip(refs, w_mats, rows.iterrows(), strict=True):
            assert row.rank_kept == r and row.tau == pytest.approx(tau, rel=1e-7)
            assert row.status == "repaired"
            err = np.linalg.norm((wm - bm) - d_star) / np.linalg.norm(d_star)
            assert err < 1e-5, (name, err)  # float32 storage of W* is the only error left
    experts = manifest[manifest.tensor == "model.layers.0.mlp.experts.down_proj"]
    assert sorted(experts.expert.tolist()) == [0, 1, 2, 3]
    assert experts.tau.nunique() == 4  # each expert has its own threshold
    assert manifest[manifest.tensor == "visual.patch_embed.proj.weight"].kind.item() == "conv"
    for name in BYTE_IDENTICAL:
        assert torch.equal(got[name], pair.ft_tensors[name]), name
    status = dict(zip(manifest.tensor, manifest.status, strict=False))
    assert status["model.frozen.weight"] == "zero_delta"
    assert status["model.lowrank.weight"] == "median_zero"
    assert status["model.position_ids"] == "passthrough"
    reasons = dict(zip(manifest.tensor, manifest.reason, strict=False))
    assert reasons["model.new_adapter.weight"] == "fine-tune only"
    assert reasons["model.position_ids"] == "non-float"
    assert reasons["model.small.weight"] == "numel < 1024"
    assert reasons["model.layers.0.input_layernorm.weight"] == "1-D"
    assert manifest[manifest.expert.isna()].shape[0] == len(pair.ft_tensors) - 1


def test_output_layout_headers_index_sidecars_and_summary(pair, tmp_path):
    # §7 rows "Sharded index, arbitrary names, no total_size" (conftest SHARDS: model-1-of-3,
    # model-00002-of-000003, x.safetensors, metadata {}), "Header and metadata" (output header byte-identical)
    # and "Streaming write" (pwrite into preallocated partial shards, renamed, checked here by hash and safe_open)
    out = tmp_path / "out"
    assert repair(pair, out) == 0
    for shard in SHARDS:
        src, dst = (pair.ft / shard).read_bytes(), (out / shard).read_bytes()
        n = int.from_bytes(src[:8], "little")
        assert dst[: 8 + n] == src[: 8 + n]  # byte-identical header
        assert len(dst) == len(src)
    index = "model.safetensors.index.json"
    assert (out / index).read_bytes() == (pair.ft / index).read_bytes()
    for sidecar in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / sidecar).read_bytes() == (pair.ft / sidecar).read_bytes()
    assert not (out / "training_args.bin").exists()  # pickles are never carried over
    assert not (out / "dgrepair" / "partial").exists()
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["plan"]["base_only"] == ["mtp.only_in_base.weight"]
    assert summary["plan"]["ft_only"] == ["model.new_adapter.weight"]
    assert summary["config"]["scale"] == 1.0 and len(summary["plan_id"]) == 16
    # 2 layers x 4 projections + embed + lm_head + conv = 11 matrices, 4 experts, 2 degenerate matrices
    assert summary["totals"]["matrices_repaired"] == 11 + 4 + 2
    # Manifest sha256 values describe the bytes actually on disk.
    manifest = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    for row in manifest.itertuples():
        data = (out / row.shard).read_bytes()[row.byte_begin:row.byte_end]
        assert hashlib.sha256(data).hexdigest() == row.sha256


def test_global_rho_is_the_energy_weighted_ratio(pair, tmp_path):
    out = tmp_path / "out"
    assert repair(pair, out) == 0
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    m = m[m.kind.isin(["svd", "conv", "experts"])]
    want = math.sqrt(((m.rho * m.frob_delta) ** 2).sum() / (m.frob_delta**2).sum())
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["totals"]["global_rho"] == pytest.approx(want, rel=1e-12)


def test_bf16_pair_is_written_in_bf16_within_one_rounding(tmp_path):
    pair = make_pair(tmp_path, dtype=torch.bfloat16, seed=3)
    out = tmp_path / "out"
    assert repair(pair, out) == 0
    got = load_out(out)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert got[name].dtype == torch.bfloat16
    (bm, d_star, _, _), = reference_matrices(pair, name)
    expected = torch.from_numpy((bm + d_star).astype(np.float32)).to(torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp_min(1e-30)
    assert bool(((got[name].float() - expected.float()).abs() <= ulp).all())


def test_scale_and_mask_options_reach_the_kernel(pair, tmp_path):
    out = tmp_path / "out"
    assert repair(pair, out, "--scale", "2.5", "--mask", "attn_only", "--exclude", r"k_proj") == 0
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    q = "model.layers.0.self_attn.q_proj.weight"
    refs = reference_matrices(pair, q)
    b, f = pair.base_tensors[q].float().numpy(), pair.ft_tensors[q].float().numpy()
    _, r, tau = reference.dg_hard(f - b, scale=2.5)
    assert (m.loc[q].rank_kept, m.loc[q].tau) == (r, pytest.approx(tau, rel=1e-7)) and tau > refs[0][3]
    assert m.loc["model.layers.1.self_attn.k_proj.weight"].reason == "outside mask"
    assert m.loc["model.layers.0.mlp.gate_proj.weight"].reason == "outside mask"
    got = load_out(out)
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(got[gate], pair.ft_tensors[gate])


def test_inputs_are_untouched(pair, tmp_path):
    before = {**tree_digest(pair.base), **{"ft/" + k: v for k, v in tree_digest(pair.ft).items()}}
    assert repair(pair, tmp_path / "out") == 0
    after = {**tree_digest(pair.base), **{"ft/" + k: v for k, v in tree_digest(pair.ft).items()}}
    assert before == after


@pytest.mark.parametrize("metadata", [None, {}, {"origin": "trainer"}])
def test_single_file_without_format_metadata_gets_format_pt(tmp_path, metadata):
    g = torch.Generator().manual_seed(0)
    w0 = {"a.weight": torch.randn(64, 48, generator=g), "b.bias": torch.randn(64, generator=g)}
    d = torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g) + 0.01 * torch.randn(64, 48, generator=g)
    w1 = {"a.weight": w0["a.weight"] + d, "b.bias": w0["b.bias"] + 1}
    for root, tensors in ((tmp_path / "base", w0), (tmp_path / "ft", w1)):
        root.mkdir()
        save_file(tensors, str(root / "model.safetensors"), metadata=metadata)
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process"]) == 0
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        assert fh.metadata() == {**(metadata or {}), "format": "pt"}
        a, bias = fh.get_tensor("a.weight"), fh.get_tensor("b.bias")
    d_star, r, _ = reference.dg_hard((w1["a.weight"] - w0["a.weight"]).numpy())
    assert r == 3
    assert np.linalg.norm((a - w0["a.weight"]).double().numpy() - d_star) / np.linalg.norm(d_star) < 1e-5
    assert torch.equal(bias, w1["b.bias"])
    assert not (out / "model.safetensors.index.json").exists()  # single-file input, single-file output
    assert (out / "dgrepair" / "summary.json").is_file()
