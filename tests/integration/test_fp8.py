"""Block-FP8 (F8_E4M3 + weight_scale_inv per 128x128 block): dequantise with each checkpoint's own
scales, repair, re-quantise to the same layout and scale convention (docs/formats.md), checked against a
reference built from the float64 numpy SVD and an independent blockwise loop. docs/formats.md rows
"Block FP8 ... with ragged edges" ([320, 200] -> scale [3, 2], [192, 256]), "BF16 / UE8M0 scale variants" and
"Sharded index" (a scale in a different shard than its weight)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import reference
import torch
from ckpt import low_rank_plus_noise, write_sharded
from pairs import fp8_pair
from safetensors import safe_open

from dgrepair.cli import main
from dgrepair.kernels import fp8


def loop_dequant(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """Independent reference: an explicit loop over 128x128 blocks."""
    w = q.to(torch.float32).numpy().astype(np.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= float(s[i, j])
    return w


def test_quantiser_blocks_ragged_edges_and_conventions():
    g = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(320, 200, generator=g)
    w[256:, 128:] = 0  # an all-zero ragged block
    codes, scale = fp8.quantize(w, torch.float32, power_of_two=False)
    assert scale.shape == (3, 2) and scale[2, 1] == 1.0
    assert scale[0, 0] == pytest.approx(float(w[:128, :128].abs().max()) / 448, rel=1e-7)
    deq = fp8.dequantize(codes, scale)
    assert np.allclose(deq.numpy(), loop_dequant(codes, scale), rtol=2 ** -23, atol=0)  # one float32 rounding
    assert float((deq - w).norm() / w.norm()) < 2 ** -4  # e4m3 keeps 3 mantissa bits
    again = fp8.quantize(deq, torch.float32, power_of_two=False)  # untouched blocks stay bit-exact
    assert torch.equal(again[0].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(again[1], scale)
    c2, s2 = fp8.quantize(w, torch.bfloat16, power_of_two=True)
    assert s2.dtype == torch.bfloat16
    logs = torch.log2(s2.float())
    assert torch.equal(logs, torch.round(logs))  # ue8m0: powers of two


@pytest.mark.parametrize("scale_dtype,ue8m0", [(torch.float32, False), (torch.bfloat16, False),
                                               (torch.float32, True)])
def test_fp8_repair_matches_the_reference_and_keeps_the_layout(tmp_path, scale_dtype, ue8m0):
    base, ft = fp8_pair(tmp_path, scale_dtype, ue8m0)
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process"]) == 0
    got = {}
    for shard in ("a.safetensors", "b.safetensors"):
        with safe_open(out / shard, framework="pt") as fh:
            got.update({k: fh.get_tensor(k) for k in fh.keys()})
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    for name in ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.down_proj.weight"):
        q, s = got[name], got[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == scale_dtype and s.shape == ft[name + "_scale_inv"].shape
        if ue8m0:
            assert torch.equal(torch.log2(s.float()), torch.round(torch.log2(s.float())))
        w0 = loop_dequant(base[name], base[name + "_scale_inv"])
        w1 = loop_dequant(ft[name], ft[name + "_scale_inv"])
        d_star, r, _ = reference.dg_hard(w1.astype(np.float32) - w0.astype(np.float32))
        w_star = w0 + d_star
        assert m.loc[name, "rank_kept"] == r == 3 and m.loc[name, "kind"] == "fp8"
        out_w = loop_dequant(q, s)
        err = np.linalg.norm(out_w - w_star) / np.linalg.norm(w_star)
        assert err == pytest.approx(m.loc[name, "requant_error"], rel=1e-3)  # recorded per tensor
        assert err < 2 ** -4  # only the e4m3 re-quantisation error is left
        # and the repair moved the weights towards the reference, away from the fine-tune
        assert np.linalg.norm(out_w - w_star) < np.linalg.norm(w1 - w_star)
        assert m.loc[name + "_scale_inv", "status"] == "rewritten"
    assert torch.equal(got["model.norm.weight"], ft["model.norm.weight"] if "model.norm.weight" in ft else
                       torch.ones(64, dtype=torch.bfloat16))
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["plan"]["base_only"] == []  # base scales are consumed, not reported


def test_unchanged_fp8_weight_keeps_its_bytes(tmp_path):
    codes, scale = fp8.quantize(0.02 * torch.randn(256, 256), torch.float32, False)
    t = {"w.weight": codes, "w.weight_scale_inv": scale}
    write_sharded(tmp_path / "base", {"m.safetensors": t})
    write_sharded(tmp_path / "ft", {"m.safetensors": t})
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process"]) == 0
    assert (out / "m.safetensors").read_bytes() == (tmp_path / "ft" / "m.safetensors").read_bytes()
    assert math.isclose(pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
                        .loc["w.weight", "requant_error"], 0.0)


def test_resume_redoes_an_fp8_weight_whose_scales_no_longer_verify(tmp_path):
    fp8_pair(tmp_path)
    args = ["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--no-progress", "--in-process"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    (out / "dgrepair" / "summary.json").unlink()  # as if interrupted before the end: the next run resumes
    rows = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    scale = rows.loc["model.layers.0.mlp.down_proj.weight_scale_inv"]
    raw = bytearray((out / scale.shard).read_bytes())
    raw[scale.byte_begin:scale.byte_begin + 4] = b"\x00" * 4  # only the scales are damaged
    (out / scale.shard).write_bytes(bytes(raw))
    assert main([*args, "--out", str(out)]) == 0
    after = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    assert (after.tensor == "model.layers.0.mlp.down_proj.weight").sum() == 2  # the weight was redone with them
    for shard in ("a.safetensors", "b.safetensors"):
        assert (out / shard).read_bytes() == (tmp_path / "clean" / shard).read_bytes()


def test_dense_fine_tune_of_an_fp8_base(tmp_path, capsys):
    """A BF16 fine-tune of a block-FP8 base (the usual DeepSeek-V3 SFT): the base is dequantised with its own
    scales, the fine-tune stays BF16, the base's scales are consumed (not reported as base-only)."""
    g = torch.Generator().manual_seed(4)
    w0 = 0.02 * torch.randn(320, 200, generator=g, dtype=torch.float64)
    codes, scale = fp8.quantize(w0.float(), torch.float32, False)
    base_w = torch.from_numpy(loop_dequant(codes, scale))
    ft_w = (base_w + low_rank_plus_noise((320, 200), 3, g, noise=2e-3)).to(torch.bfloat16)
    write_sharded(tmp_path / "base", {"m.safetensors": {"a.weight": codes, "a.weight_scale_inv": scale,
                                                        "b.weight": codes.clone()}})
    write_sharded(tmp_path / "ft", {"m.safetensors": {"a.weight": ft_w, "b.weight": ft_w.clone()}})
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process"]) == 2  # b.weight: an FP8 base without scales is refused
    assert "b.weight" in capsys.readouterr().err and not out.exists()
    write_sharded(tmp_path / "ft", {"m.safetensors": {"a.weight": ft_w}})
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process"]) == 0
    with safe_open(out / "m.safetensors", framework="pt") as fh:
        got = fh.get_tensor("a.weight")
    d_star, r, _ = reference.dg_hard(ft_w.float().numpy().astype(np.float64) - base_w.numpy().astype(np.float32))
    want = torch.from_numpy(base_w.numpy() + d_star).to(torch.bfloat16)
    assert r == 3 and got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    assert (got == want).float().mean() > 0.97
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["plan"]["base_only"] == ["b.weight"]
