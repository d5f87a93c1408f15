"""Fused gate/up expert stacks are repaired per expert and per half: the result equals the per-expert
2-D layout's bit for bit, in all three on-disk layouts, and keeps the fused layout. docs/formats.md
§7 rows "Fused [E, 2I, H] (v5 / Qwen3.5)" and "Fused [E, H, 2I] (in, out)" (no `.weight` suffix, with a
`gate_up_proj_bias`, split/merge inverse)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from ckpt import low_rank_plus_noise, write_single
from safetensors import safe_open

from dgrepair.cli import main
from dgrepair.engine.plan.layouts import from_matrices, fused_matrix_shape, to_matrices

E, INTER, H = 3, 48, 64  # each half is 48 x 64 = 3072 elements (>= min_numel, like the 2-D tensors)
PREFIX = "model.layers.0.mlp.experts"


def halves(seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for e in range(E):
        for part in ("gate", "up"):
            w0 = 0.02 * torch.randn(INTER, H, generator=g, dtype=torch.float64)
            noise = 10.0 ** -(2 + (e + (part == "up")) % 3)  # every matrix its own noise scale
            base[(e, part)] = w0.float()
            ft[(e, part)] = (w0 + low_rank_plus_noise((INTER, H), 2, g, noise=noise)).float()
    return base, ft


def per_expert(w: dict) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}.{e}.{part}_proj.weight": w[(e, part)] for e in range(E) for part in ("gate", "up")}


def fused(w: dict, layout: str) -> torch.Tensor:
    if layout == "out_in_concat":  # [E, 2I, H]
        return torch.stack([torch.cat([w[(e, "gate")], w[(e, "up")]], 0) for e in range(E)])
    if layout == "in_out_concat":  # [E, H, 2I]
        return torch.stack([torch.cat([w[(e, "gate")].T, w[(e, "up")].T], 1) for e in range(E)])
    out = torch.empty(E, H, 2 * INTER)  # in_out_interleaved: gate even columns, up odd columns
    for e in range(E):
        out[e, :, 0::2], out[e, :, 1::2] = w[(e, "gate")].T, w[(e, "up")].T
    return out


def split(t: torch.Tensor, layout: str, e: int, part: str) -> torch.Tensor:
    k = 0 if part == "gate" else 1
    if layout == "out_in_concat":
        return t[e, k * INTER:(k + 1) * INTER, :]
    if layout == "in_out_concat":
        return t[e, :, k * INTER:(k + 1) * INTER].T
    return t[e, :, k::2].T


def repair(tmp_path, name: str, base: dict, ft: dict, model_type: str | None = None, *extra: str):
    for role, tensors in (("base", base), ("ft", ft)):
        write_single(tmp_path / name / role, tensors)
        if model_type:
            (tmp_path / name / role / "config.json").write_text(json.dumps({"model_type": model_type}))
    out = tmp_path / name / "out"
    assert main(["repair", "--base", str(tmp_path / name / "base"), "--ft", str(tmp_path / name / "ft"), "--out",
                 str(out), "--no-progress", "--in-process", *extra]) == 0
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, pd.read_parquet(out / "dgrepair" / "manifest.parquet")


@pytest.mark.parametrize("layout,model_type", [("out_in_concat", "qwen3_5_moe"), ("in_out_concat", "llama4"),
                                               ("in_out_interleaved", "gpt_oss")])
def test_fused_equals_per_expert_bit_for_bit(tmp_path, layout, model_type):
    base, ft = halves(0)
    two_d, m2 = repair(tmp_path, "twod", per_expert(base), per_expert(ft))
    name = f"{PREFIX}.gate_up_proj"
    bias = f"{PREFIX}.gate_up_proj_bias"
    b0, b1 = torch.zeros(E, 2 * INTER), torch.linspace(-1, 1, E * 2 * INTER).reshape(E, 2 * INTER)
    got, mf = repair(tmp_path, layout, {name: fused(base, layout), bias: b0}, {name: fused(ft, layout), bias: b1},
                     model_type)
    assert torch.equal(got[bias], b1)  # the expert biases pass through
    out = got[name]
    assert out.shape == fused(ft, layout).shape  # the fused layout is kept
    for e in range(E):
        for part in ("gate", "up"):
            assert torch.equal(split(out, layout, e, part), two_d[f"{PREFIX}.{e}.{part}_proj.weight"]), (e, part)
    rows = mf[mf.tensor == name].sort_values(["expert", "part"])
    assert list(zip(rows.expert, rows.part, strict=True)) == [(e, p) for e in range(E) for p in ("gate", "up")]
    assert rows.kind.unique().tolist() == ["experts_fused"] and layout in rows.reason.iloc[0]
    ranks_2d = m2.set_index("tensor").rank_kept
    for row in rows.itertuples():
        assert row.rank_kept == ranks_2d[f"{PREFIX}.{int(row.expert)}.{row.part}_proj.weight"]
    assert rows.tau.nunique() == 2 * E  # every half has its own threshold


@pytest.mark.parametrize("layout", ["out_in_concat", "in_out_concat", "in_out_interleaved", "out_in_interleaved"])
def test_split_and_merge_are_inverse_and_match_explicit_slicing(layout):
    t = torch.arange(2 * 8 * 6, dtype=torch.float32).reshape(2, 8, 6)
    shape = fused_matrix_shape(tuple(t.shape), layout)
    mats = to_matrices(t, "experts_fused", shape, layout)
    assert torch.equal(from_matrices(mats, "experts_fused", tuple(t.shape), layout), t)
    for e in range(2):
        for k in range(2):  # written from docs/formats.md, independent of engine/plan/layouts.py
            want = {"out_in_concat": t[e, k * 4:(k + 1) * 4, :], "out_in_interleaved": t[e, k::2, :],
                    "in_out_concat": t[e, :, k * 3:(k + 1) * 3], "in_out_interleaved": t[e, :, k::2]}[layout]
            assert torch.equal(mats[2 * e + k], want), (layout, e, k)


def test_large_expert_bias_stack_is_passed_through(tmp_path, capsys):
    bias = {f"{PREFIX}.down_proj_bias": torch.zeros(16, 128)}  # 2-D and >= min_numel, but a bias
    write_single(tmp_path / "b", bias)
    write_single(tmp_path / "f", {k: v + 1 for k, v in bias.items()})
    capsys.readouterr()
    assert main(["plan", "--base", str(tmp_path / "b"), "--ft", str(tmp_path / "f"), "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["entries"][0]
    assert (entry["kind"], entry["reason"]) == ("passthrough", "bias")


def test_layout_override_and_plan_report(tmp_path, capsys):
    base, ft = halves(1)
    name = f"{PREFIX}.gate_up_proj"
    got, rows = repair(tmp_path, "override", {name: fused(base, "in_out_interleaved")},
                       {name: fused(ft, "in_out_interleaved")}, None, "--fused-layout", "in_out_interleaved")
    assert "in_out_interleaved" in rows.reason.iloc[0]
    capsys.readouterr()
    assert main(["plan", "--base", str(tmp_path / "override" / "base"), "--ft", str(tmp_path / "override" / "ft"),
                 "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "experts_fused" in text and "assumed: no model_type" in text and "(~" in text
