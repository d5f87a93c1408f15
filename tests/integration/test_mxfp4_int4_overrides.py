"""MXFP4 conventions (docs/formats.md), packed INT4 (row
"INT4 compressed-tensors"), `--treat-as` classification overrides for tensors with more than two axes, and
BF16 conversion of FP8 weights that are not repaired."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from ckpt import low_rank_plus_noise, tree_digest, write_single
from fmtref import dense, e2m1, fp8_dense, load_dir, mxfp4_dense, reference_repair
from frontier import write_pair

from dgrepair.cli import main
from dgrepair.kernels import fp8, mxfp4


def test_mxfp4_dequant_matches_the_bitfield_reference():
    """E=2, out=64, in=64: blocks [2, 64, 2, 16] U8, scales [2, 64, 2] U8, every byte and many exponents."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 64, 2, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    scales = torch.randint(110, 140, (2, 64, 2), generator=g, dtype=torch.int64).to(torch.uint8)
    got = mxfp4.dequantize(blocks, scales)
    assert got.shape == (2, 64, 64)
    assert np.array_equal(got.numpy(), mxfp4_dense(blocks, scales))
    # worked by hand: byte 0x71 = low nibble 1 (0.5), high nibble 7 (6.0); byte 0xF8 = -0.0, -6.0; scale 128 = x2
    one = torch.zeros(1, 1, 16, dtype=torch.uint8)
    one[0, 0, 0], one[0, 0, 1] = 0x71, 0xF8
    vals = mxfp4.dequantize(one, torch.full((1, 1), 128, dtype=torch.uint8))
    assert vals[0, :4].tolist() == [1.0, 12.0, -0.0, -12.0]
    assert [e2m1(c) for c in range(8)] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_mxfp4_quantiser_follows_the_ocp_rule():
    g = torch.Generator().manual_seed(1)
    w = 0.02 * torch.randn(4, 64, 96, generator=g)
    w[0, 0, :32] = 0  # an all-zero block
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (4, 64, 3, 16) and scales.shape == (4, 64, 3)
    amax = w.reshape(4, 64, 3, 32).abs().amax(-1).numpy().astype(np.float64)
    want = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2 + 127, 127)
    assert np.array_equal(scales.numpy(), want.astype(np.uint8))  # shared exponent = floor(log2 amax) - 2
    back = mxfp4_dense(blocks, scales)
    step = np.ldexp(1.0, scales.numpy().astype(int) - 127)[..., None].repeat(32, -1).reshape(4, 64, 96)
    err, inside = np.abs(back - w.numpy()), np.abs(w.numpy()) <= 6 * step
    assert np.all(err[inside] <= step[inside] + 1e-12)  # nearest grid point (largest gap: 4 -> 6, i.e. 2 * 2^exp)
    assert np.all(err[~inside] <= 2 * step[~inside])  # amax / 2^exp lies in [4, 8): values above 6 saturate
    assert np.all(back[0, 0, :32] == 0)
    again = mxfp4.quantize(torch.from_numpy(back))  # an MXFP4 tensor comes back with the same values
    assert np.array_equal(mxfp4_dense(*again), back)
    # ties go to the even code: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4; saturation at 6 (amax 7 -> exp 0)
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([0.25, 0.75, 2.5, 5.0, -5.0, 7.0])
    assert mxfp4_dense(*mxfp4.quantize(x))[0, :6].tolist() == [0.0, 1.0, 2.0, 4.0, -4.0, 6.0]


def test_mxfp4_keep_writes_the_same_layout_and_records_the_error(tmp_path):
    base, ft = write_pair("gpt_oss", tmp_path)
    out = tmp_path / "out"
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress",
                 "--in-process"]) == 0
    assert (out / "model.safetensors").stat().st_size == (ft / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").read_bytes()[:64] == (ft / "model.safetensors").read_bytes()[:64]
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    rows = m[m.tensor == name].sort_values(["expert", "part"])
    assert list(zip(rows.expert, rows.part, strict=True)) == [(0, "gate"), (0, "up"), (1, "gate"), (1, "up")]
    want, ranks = reference_repair(dense(b, name), dense(f, name), "rows_interleaved")
    assert rows.rank_kept.tolist() == ranks
    got = dense(o, name)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err == pytest.approx(rows.requant_error.iloc[0], rel=1e-2)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    assert m[m.tensor == name.replace("_blocks", "_scales")].status.tolist() == ["rewritten"]


def int4_args(tmp_path, *extra):
    base, ft = write_pair("kimi_int4", tmp_path)
    return base, ft, ["repair", "--base", str(base), "--ft", str(ft), "--out", str(tmp_path / "out"), "--no-progress",
                      "--in-process", *extra]


def test_packed_int4_without_a_readable_scheme_is_refused_naming_tensor_file_and_option(tmp_path, capsys):
    base, ft, args = int4_args(tmp_path)
    cfg = json.loads((ft / "config.json").read_text())
    del cfg["quantization_config"]["config_groups"]
    (ft / "config.json").write_text(json.dumps(cfg))
    before = tree_digest(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.experts.0.down_proj.weight_packed" in err and "model.safetensors" in err
    assert "no config_groups" in err and "--packed-int4 passthrough" in err
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path) == before  # nothing written


def test_packed_int4_is_repaired_by_default(tmp_path):
    base, ft, args = int4_args(tmp_path)
    assert main(args) == 0
    m = pd.read_parquet(tmp_path / "out" / "dgrepair" / "manifest.parquet").set_index("tensor")
    assert m.loc["model.layers.1.mlp.experts.0.down_proj.weight_packed", "kind"] == "packed_int"
    assert m.loc["model.layers.1.mlp.experts.0.down_proj.weight_scale", "status"] == "rewritten"


def test_packed_int4_passthrough_copies_the_tensors_verbatim(tmp_path, capsys):
    base, ft, args = int4_args(tmp_path, "--packed-int4", "passthrough")
    assert main(args) == 0
    f, o = load_dir(ft), load_dir(tmp_path / "out")
    m = pd.read_parquet(tmp_path / "out" / "dgrepair" / "manifest.parquet").set_index("tensor")
    packed = [k for k in f if ".experts." in k]
    assert len(packed) == 6
    for k in packed:  # never treated as dense
        assert torch.equal(o[k], f[k]) and o[k].dtype == f[k].dtype
        assert m.loc[k, "kind"] == "passthrough" and "packed INT4" in m.loc[k, "reason"]
    assert m.loc["model.layers.1.self_attn.o_proj.weight", "kind"] == "svd"  # the BF16 rest is repaired
    capsys.readouterr()
    assert main(["plan", "--base", str(base), "--ft", str(ft), "--packed-int4", "passthrough", "--tensors"]) == 0
    assert "packed INT4 (compressed-tensors), copied verbatim" in capsys.readouterr().out


def stack_pair(tmp_path, name="model.layers.0.mlp.moe_stack.weight"):
    g = torch.Generator().manual_seed(5)
    w0 = 0.02 * torch.randn(3, 32, 64, generator=g, dtype=torch.float64)
    w1 = w0 + torch.stack([low_rank_plus_noise((32, 64), 2, g) for _ in range(3)])
    write_single(tmp_path / "base", {name: w0.float()})
    write_single(tmp_path / "ft", {name: w1.float()})
    return name, ["--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft")]


def test_unrecognised_3d_tensor_is_refused_and_names_treat_as(tmp_path, capsys):
    name, io = stack_pair(tmp_path)
    assert main(["plan", *io]) == 2
    assert "--treat-as" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["experts", "conv", "passthrough"])
def test_treat_as_overrides_the_classification(tmp_path, capsys, kind):
    name, io = stack_pair(tmp_path)
    capsys.readouterr()
    assert main(["plan", *io, "--treat-as", f"moe_stack={kind}", "--tensors"]) == 0
    assert f"--treat-as moe_stack={kind}" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["repair", *io, "--out", str(out), "--no-progress", "--in-process", "--treat-as",
                 f"moe_stack={kind}"]) == 0
    b, f, o = load_dir(tmp_path / "base"), load_dir(tmp_path / "ft"), load_dir(out)
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    assert set(m.kind) == {kind} and all("--treat-as" in r for r in m.reason)
    if kind == "passthrough":
        assert torch.equal(o[name], f[name])
        return
    want, ranks = reference_repair(b[name].numpy(), f[name].numpy(), kind)
    assert sorted(m.rank_kept.tolist()) == sorted(ranks) and len(ranks) == (3 if kind == "experts" else 1)
    assert np.linalg.norm(o[name].numpy() - want) <= 1e-5 * np.linalg.norm(want - b[name].numpy())


def test_bad_treat_as_is_a_clear_error(tmp_path, capsys):
    _, io = stack_pair(tmp_path)
    assert main(["plan", *io, "--treat-as", "moe_stack=matrix"]) == 2
    assert "REGEX=KIND" in capsys.readouterr().err


def test_fp8_weight_kept_by_the_mask_is_still_written_as_bf16(tmp_path):
    """With --out-dtype bf16 every FP8 weight must become BF16 (config.json loses quantization_config), so an
    excluded weight is dequantised but not repaired; a ragged [320, 200] weight keeps its exact values."""
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for role in ("base", "ft"):
        w = 0.02 * torch.randn(320, 200, generator=g)
        codes, scale = fp8.quantize(w, torch.bfloat16, power_of_two=False)
        tensors[role] = {"a.weight": codes, "a.weight_scale_inv": scale, "n.weight": torch.ones(8)}
        write_single(tmp_path / role, tensors[role])
        (tmp_path / role / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process", "--out-dtype", "bf16", "--exclude", r"^a\."]) == 0
    o = load_dir(out)
    assert set(o) == {"a.weight", "n.weight"} and o["a.weight"].dtype == torch.bfloat16
    want = fp8_dense(tensors["ft"]["a.weight"], tensors["ft"]["a.weight_scale_inv"])
    assert np.array_equal(o["a.weight"].float().numpy(), torch.from_numpy(want).to(torch.bfloat16).float().numpy())
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    assert m.loc["a.weight", "kind"] == "dequant" and m.loc["a.weight", "status"] == "dequantized"
    assert m.loc["a.weight_scale_inv", "status"] == "dropped"
    assert json.loads((out / "config.json").read_text()) == {}
    assert not math.isnan(m.loc["a.weight", "requant_error"])


def test_mxfp4_resume_redoes_damaged_blocks_with_their_scales(tmp_path):
    base, ft = write_pair("gpt_oss", tmp_path)
    args = ["repair", "--base", str(base), "--ft", str(ft), "--no-progress", "--in-process"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    (out / "dgrepair" / "summary.json").unlink()  # as if interrupted before the end
    rows = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    row = rows[rows.tensor == "model.layers.0.mlp.experts.down_proj_scales"].iloc[0]
    raw = bytearray((out / row.shard).read_bytes())
    raw[row.byte_begin] ^= 0xFF  # damage only the scales
    (out / row.shard).write_bytes(bytes(raw))
    assert main([*args, "--out", str(out)]) == 0
    after = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    assert len(after) == len(rows) + 3  # the two experts of down_proj_blocks and their scales, nothing else
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()


def test_mxfp4_outside_the_mask_passes_through_with_its_scales(tmp_path):
    base, ft = write_pair("gpt_oss", tmp_path)
    out = tmp_path / "out"
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress",
                 "--in-process", "--exclude", r"\.experts\."]) == 0
    f, o = load_dir(ft), load_dir(out)
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    for k in [k for k in f if k.endswith(("_blocks", "_scales"))]:
        assert torch.equal(o[k], f[k]) and m.loc[k, "kind"] == "passthrough", k
