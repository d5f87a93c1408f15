"""compressed-tensors `pack-quantized` weights (Kimi-K2-Thinking's INT4 experts): the codec against the
compressed-tensors library, the scheme read from config.json, the three base/fine-tune pairings repaired end to
end (checked through the library's own decompression against the float64 reference repair), `--out-dtype bf16`,
INT8 asymmetric per-channel, resume, and the bad inputs of issue 15."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ckpt import tree_digest, write_single
from fmtref import assert_bf16_close, load_dir, reference_repair
from frontier import KIMI_QUANTIZATION, write_pair

from dgrepair.cli import main
from dgrepair.engine.io.checkpoint import open_checkpoint
from dgrepair.engine.plan.quantized_int import compressed_config
from dgrepair.kernels import packed_int

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

KIMI_WEIGHTS = KIMI_QUANTIZATION["config_groups"]["group_0"]["weights"]
EXPERT = "model.layers.1.mlp.experts.{}.{}_proj."
EXPERTS = [EXPERT.format(e, k) for e in range(4) for k in ("gate", "up", "down")]


def lib_scheme(weights: dict) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))


def lib_dense(tensors: dict[str, torch.Tensor], stem: str, weights: dict, exact: bool = True) -> np.ndarray:
    """A module's weight through the library's decompression; `exact` hands it float32 scales (the library
    otherwise multiplies in the scale's dtype, BF16)."""
    sd = {k: tensors[stem + k] for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
          if stem + k in tensors}
    if exact:
        sd["weight_scale"] = sd["weight_scale"].float()
    return PackedQuantizationCompressor.decompress(sd, lib_scheme(weights))["weight"].float().numpy()


def values(tensors: dict[str, torch.Tensor], stem: str, weights: dict = KIMI_WEIGHTS) -> np.ndarray:
    """float32 values of a module, packed or dense."""
    if stem + "weight_packed" in tensors:
        return lib_dense(tensors, stem, weights)
    return tensors[stem + "weight"].float().numpy()


def step(tensors: dict[str, torch.Tensor], stem: str, cols: int) -> np.ndarray:
    s = tensors[stem + "weight_scale"].float().numpy()
    return np.repeat(s, cols // s.shape[1], axis=1)


def run(tmp_path: Path, name: str, *extra: str, out: str = "out") -> tuple[Path, Path, Path]:
    base, ft = write_pair(name, tmp_path)
    dest = tmp_path / out
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(dest), "--no-progress",
                 "--in-process", *extra]) == 0
    return base, ft, dest


# ---- the codec against the library ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 40, 3])
def test_pack_and_unpack_match_the_library(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (24, cols), generator=g).to(torch.int8)
    for dim, n in ((1, cols), (0, 24)):
        ref = pack_to_int32(codes, bits, packed_dim=dim)
        assert torch.equal(packed_int.pack(codes, bits, dim), ref)
        assert torch.equal(packed_int.unpack(ref, bits, n, dim), unpack_from_int32(ref, bits, codes.shape, dim))


def test_pack_order_worked_by_hand():
    """8 nibbles per word, element 0 least significant, stored as code + 8: codes -8..-1 -> 0x76543210."""
    codes = torch.arange(-8, 8, dtype=torch.int8)[None]
    words = packed_int.pack(codes, 4)
    assert words.tolist() == [[0x76543210, int(np.int32(np.uint32(0xFEDCBA98)))]]
    assert packed_int.pack(torch.tensor([[-128, 0, 1, 127]], dtype=torch.int8), 8).tolist() == \
        [[int(np.int32(np.uint32(0xFF818000)))]]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_quantise_and_dequantise_follow_the_library(bits, symmetric, strategy):
    g = torch.Generator().manual_seed(7)
    w = 0.02 * torch.randn(16, 64, generator=g)
    w[0, :32] = 0  # an all-zero group
    w[1] = w[1].abs()  # a row with no negative value (asymmetric: the zero point moves)
    gs = 32 if strategy == "group" else None
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy, group_size=gs)
    scheme = packed_int.IntScheme(bits, symmetric, strategy, gs)
    x = w.reshape(16, -1, scheme.group_cols(64))
    want_scale, want_zp = calculate_qparams(x.amin(-1), x.amax(-1), args)
    packed, scale, zp = packed_int.quantize(w, scheme, torch.float32)
    assert torch.equal(scale, want_scale)
    zp_codes = None if zp is None else packed_int.unpack(zp, bits, 16, packed_dim=0).to(torch.int8)
    if not symmetric:
        assert torch.equal(zp_codes, want_zp)
    want_codes = ct_quantize(w, scale, zp_codes, args, dtype=torch.int8)
    assert torch.equal(packed_int.unpack(packed, bits, 64), want_codes)
    sd = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([16, 64])}
    if zp is not None:
        sd["weight_zero_point"] = zp
    lib = PackedQuantizationCompressor.decompress(sd, QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(packed_int.dequantize(packed, scale, zp, scheme, (16, 64)), lib["weight"])
    err = (lib["weight"] - w).abs()
    assert bool((err <= 0.5 * scale.repeat_interleave(scheme.group_cols(64), 1) * (1 + 1e-4)).all())


# ---- the scheme from config.json ------------------------------------------------------------------------


def test_kimi_config_is_read_and_matched_like_the_library(tmp_path):
    base, ft = write_pair("kimi_k2_thinking", tmp_path)
    cc = compressed_config(open_checkpoint(ft, "fine-tune"))
    assert cc is not None and cc.error is None and cc.format == "pack-quantized"
    (group,) = cc.groups
    assert group.scheme == packed_int.IntScheme(4, True, "group", 32) and group.targets == ("Linear",)
    assert cc.ignored_by("model.layers.1.self_attn.q_a_proj") == "re:.*self_attn.*"
    assert cc.ignored_by("model.layers.1.mlp.shared_experts.up_proj") == "re:.*shared_experts.*"
    assert cc.ignored_by("model.layers.0.mlp.down_proj") is not None  # the dense first layer
    assert cc.ignored_by("lm_head") == "lm_head"
    assert cc.ignored_by("model.layers.1.mlp.experts.3.down_proj") is None
    assert cc.group_for("model.layers.1.mlp.experts.3.down_proj") is group


def test_exact_names_then_patterns_then_linear(tmp_path):
    cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "a": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 32}},
        "b": {"targets": ["re:.*down_proj$"], "weights": {"num_bits": 8, "strategy": "channel"}},
        "c": {"targets": ["m.x.down_proj"], "weights": {"num_bits": 4, "strategy": "channel", "symmetric": False}}}}
    write_single(tmp_path, {"w": torch.zeros(2)})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": cfg}))
    cc = compressed_config(open_checkpoint(tmp_path, "fine-tune"))
    assert cc.group_for("m.x.down_proj").name == "c"
    assert cc.group_for("m.y.down_proj").name == "b"
    assert cc.group_for("m.y.up_proj").name == "a"


# ---- end to end -----------------------------------------------------------------------------------------


def check_against_reference(b, f, o, manifest: pd.DataFrame, stem: str) -> None:
    """Packed output: within half a step of base + DG-Hard(Δ) in float64, same rank, recorded error."""
    w0, w1 = values(b, stem), values(f, stem)
    want, (rank,) = reference_repair(w0, w1, "svd")
    got = lib_dense(o, stem, KIMI_WEIGHTS)
    half = 0.5 * step(o, stem, got.shape[1])
    err = np.abs(got - want)
    # the positive maximum of a group maps to 7.5 and clips to 7: half a step, plus the BF16 rounding of the
    # stored scale (at most 2^-8 relative) times 7.5 codes
    assert np.all(err <= half * (1 + 15 * 2.0 ** -8) + 1e-7), stem
    assert np.mean(err <= half + 1e-7) > 0.97
    row = manifest[manifest.tensor == stem + "weight_packed"].iloc[0]
    assert row.rank_kept == rank and row.status == "repaired"
    assert row.requant_error == pytest.approx(np.linalg.norm(got - want) / np.linalg.norm(want), rel=1e-3)
    bf = lib_dense(o, stem, KIMI_WEIGHTS, exact=False)  # what vLLM / llm-compressor compute (BF16 products)
    assert np.all(np.abs(bf - got) <= 2.0 ** -8 * np.abs(got) + 1e-12)


def test_kimi_int4_pair_is_repaired_requantised_and_decompresses_with_the_library(tmp_path):
    base, ft, out = run(tmp_path, "kimi_k2_thinking")
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    assert set(o) == set(f) and all(o[k].dtype == f[k].dtype and o[k].shape == f[k].shape for k in f)
    for shard in ("model-1-of-2.safetensors", "model-2-of-2.safetensors"):  # header unchanged
        raw = (ft / shard).read_bytes()
        assert (out / shard).read_bytes()[:8 + int.from_bytes(raw[:8], "little")] == \
            raw[:8 + int.from_bytes(raw[:8], "little")]
    assert (out / "model.safetensors.index.json").read_bytes() == (ft / "model.safetensors.index.json").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((ft / "config.json").read_text())
    for stem in EXPERTS:
        check_against_reference(b, f, o, m, stem)
        assert torch.equal(o[stem + "weight_shape"], f[stem + "weight_shape"])
        assert not torch.equal(o[stem + "weight_scale"], f[stem + "weight_scale"])  # fresh scales
    rows = m.set_index("tensor")
    assert rows.loc[EXPERTS[0] + "weight_scale", "status"] == "rewritten"
    assert rows.loc[EXPERTS[0] + "weight_shape", "status"] == "passthrough"
    assert "int4 symmetric group-32 (group_0" in rows.loc[EXPERTS[0] + "weight_packed", "reason"]
    q = "model.layers.1.self_attn.q_b_proj.weight"  # BF16 attention (ignored by the scheme): a plain repair
    want, (rank,) = reference_repair(b[q].float().numpy(), f[q].float().numpy(), "svd")
    assert rows.loc[q, "kind"] == "svd" and rows.loc[q, "rank_kept"] == rank
    assert_bf16_close(o[q].float().numpy(), want)


def test_bf16_fine_tune_of_an_int4_base(tmp_path):
    base, ft, out = run(tmp_path, "kimi_k2_thinking_bf16_ft")
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    assert set(o) == set(f)
    for stem in EXPERTS:
        name = stem + "weight"
        want, (rank,) = reference_repair(values(b, stem), values(f, stem), "svd")
        assert o[name].dtype == torch.bfloat16 and m.loc[name, "rank_kept"] == rank
        assert "base compressed-tensors int4 symmetric group-32" in m.loc[name, "reason"]
        assert_bf16_close(o[name].float().numpy(), want)
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert not any("weight_packed" in n or "weight_scale" in n for n in summary.get("base_only", []))


def test_int4_fine_tune_of_a_bf16_base(tmp_path):
    base, ft, out = run(tmp_path, "kimi_k2_thinking_bf16_base")
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    for stem in EXPERTS:
        check_against_reference(b, f, o, m, stem)


def test_out_dtype_bf16_writes_dense_weights_and_drops_the_scheme(tmp_path):
    base, ft, out = run(tmp_path, "kimi_k2_thinking", "--out-dtype", "bf16", "--exclude", r"experts\.3\.")
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    assert not any(k.endswith(("weight_packed", "weight_scale", "weight_shape")) for k in o)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(o)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    for stem in EXPERTS:
        name = stem + "weight"
        assert o[name].dtype == torch.bfloat16 and tuple(o[name].shape) == tuple(f[stem + "weight_shape"].tolist())
        assert m.loc[stem + "weight_scale", "status"] == "dropped"
        if ".experts.3." in stem:  # excluded: dequantised, not repaired
            assert m.loc[stem + "weight_packed", "kind"] == "dequant"
            want = values(f, stem)
            assert np.array_equal(o[name].float().numpy(), torch.from_numpy(want).bfloat16().float().numpy())
        else:
            want, _ = reference_repair(values(b, stem), values(f, stem), "svd")
            assert_bf16_close(o[name].float().numpy(), want)


def asym_int8_pair(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A per-channel INT8 asymmetric module compressed by the library itself (both sides)."""
    weights = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"}
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                   "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
                                   "ignore": []}}
    args = QuantizationArgs(**weights)
    g = torch.Generator().manual_seed(3)
    w0 = 0.02 * torch.randn(48, 64, generator=g, dtype=torch.float64) + 0.01
    u, v = torch.randn(48, 2, generator=g, dtype=torch.float64), torch.randn(2, 64, generator=g, dtype=torch.float64)
    w1 = w0 + 0.01 * (u @ v) + 5e-4 * torch.randn(48, 64, generator=g, dtype=torch.float64)
    for role, w in (("base", w0), ("ft", w1)):
        x = w.float()
        scale, zp = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
        sd = PackedQuantizationCompressor.compress({"weight": x, "weight_scale": scale, "weight_zero_point": zp},
                                                   lib_scheme(weights))
        write_single(tmp_path / role, {f"m.proj.{k}": v.contiguous() for k, v in sd.items()})
        (tmp_path / role / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "base", tmp_path / "ft", weights


def test_int8_asymmetric_per_channel_round_trip(tmp_path):
    base, ft, weights = asym_int8_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress",
                 "--in-process"]) == 0
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    assert {k: (v.dtype, v.shape) for k, v in o.items()} == {k: (v.dtype, v.shape) for k, v in f.items()}
    want, (rank,) = reference_repair(values(b, "m.proj.", weights), values(f, "m.proj.", weights), "svd")
    got = lib_dense(o, "m.proj.", weights)
    assert np.all(np.abs(got - want) <= 0.5 * step(o, "m.proj.", 64) * (1 + 2.0 ** -7) + 1e-7)
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    assert m.loc["m.proj.weight_packed", "rank_kept"] == rank
    assert m.loc["m.proj.weight_zero_point", "status"] == "rewritten"
    assert "int8 asymmetric per-channel" in m.loc["m.proj.weight_packed", "reason"]


def test_resume_redoes_a_packed_weight_whose_scale_was_damaged(tmp_path):
    base, ft, clean = run(tmp_path, "kimi_k2_thinking", out="clean")
    args = ["repair", "--base", str(base), "--ft", str(ft), "--no-progress", "--in-process"]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    (out / "dgrepair" / "summary.json").unlink()
    rows = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    row = rows[rows.tensor == EXPERTS[4] + "weight_scale"].iloc[0]
    raw = bytearray((out / row.shard).read_bytes())
    raw[row.byte_begin] ^= 0xFF
    (out / row.shard).write_bytes(bytes(raw))
    assert main([*args, "--out", str(out)]) == 0
    after = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    assert len(after) == len(rows) + 3  # weight_packed, weight_scale, weight_shape of that expert
    for shard in ("model-1-of-2.safetensors", "model-2-of-2.safetensors"):
        assert (out / shard).read_bytes() == (clean / shard).read_bytes()


def test_plan_shows_the_scheme_and_groups(tmp_path, capsys):
    base, ft = write_pair("kimi_k2_thinking", tmp_path)
    assert main(["plan", "--base", str(base), "--ft", str(ft), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["packed_schemes"] == [{"side": side, "group": "group_0", "scheme": "int4 symmetric group-32",
                                       "tensors": 12} for side in ("base", "fine-tune")]
    assert main(["plan", "--base", str(base), "--ft", str(ft)]) == 0
    assert "packed fine-tune group_0: int4 symmetric group-32, 12 tensors" in capsys.readouterr().out


def test_report_shows_the_requant_error_per_class(tmp_path):
    _, _, out = run(tmp_path, "kimi_k2_thinking")
    assert main(["report", str(out)]) == 0
    data = json.loads((out / "dgrepair" / "report" / "report.json").read_text())
    by = {c["layer_class"]: c for c in data["classes"]}
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    downs = m[m.tensor.str.contains(r"experts\.\d\.down_proj\.weight_packed")]
    assert by["mlp.experts.down_proj"]["max_requant_error"] == pytest.approx(downs.requant_error.max())
    assert by["attn.q_b_proj"]["max_requant_error"] is None
    assert "requant err" in (out / "dgrepair" / "report" / "report.md").read_text()


# ---- bad inputs: exit 2, the tensor named, nothing written ----------------------------------------------

STEM = EXPERT.format(2, "down")


def drop(name: str):
    def edit(tensors, cfg):
        del tensors[name]
    return edit


def set_tensor(name: str, value: torch.Tensor):
    def edit(tensors, cfg):
        tensors[name] = value
    return edit


def set_group(**changes):
    def edit(tensors, cfg):
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(changes)
    return edit


def bad_ignore(tensors, cfg):
    cfg["quantization_config"]["ignore"].append("re:.*(unclosed")


def ignore_experts(tensors, cfg):
    cfg["quantization_config"]["ignore"].append("re:.*experts.*")


@pytest.mark.parametrize(("edit", "words"), [
    (drop(STEM + "weight_scale"), "has no " + STEM + "weight_scale"),
    (drop(STEM + "weight_shape"), "has no " + STEM + "weight_shape"),
    (set_tensor(STEM + "weight_shape", torch.tensor([64, 48])), "disagree"),
    (set_group(group_size=48), "group_size 48 of group_0 does not divide"),
    (set_group(symmetric=False), "is asymmetric but " + STEM + "weight_zero_point is missing"),
    (set_group(num_bits=2), "num_bits must be one of 4, 8"),
    (ignore_experts, "ignores model.layers.1.mlp.experts.2.down_proj"),
    (bad_ignore, "is not a valid regular expression"),
])
def test_bad_packed_inputs_exit_2_naming_the_tensor(tmp_path, capsys, edit, words):
    base, ft = write_pair("kimi_k2_thinking", tmp_path)
    shard = ft / "model-2-of-2.safetensors"
    tensors = load_dir(ft)
    mine = {k: v for k, v in tensors.items() if json.loads((ft / "model.safetensors.index.json").read_text())[
        "weight_map"][k] == shard.name}
    cfg = json.loads((ft / "config.json").read_text())
    edit(mine, cfg)
    from safetensors.torch import save_file
    save_file(mine, str(shard), metadata={"format": "pt"})
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in mine}
    (ft / "model.safetensors.index.json").write_text(json.dumps(index))
    (ft / "config.json").write_text(json.dumps(cfg))
    before = tree_digest(tmp_path)
    capsys.readouterr()
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(tmp_path / "out"), "--no-progress",
                 "--in-process"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.experts." in err and words in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path) == before


def test_packed_int4_passthrough_stays_an_explicit_choice(tmp_path):
    base, ft, out = run(tmp_path, "kimi_k2_thinking", "--packed-int4", "passthrough")
    f, o = load_dir(ft), load_dir(out)
    for stem in EXPERTS:
        for k in ("weight_packed", "weight_scale", "weight_shape"):
            assert torch.equal(o[stem + k], f[stem + k])
    shutil.rmtree(out)
