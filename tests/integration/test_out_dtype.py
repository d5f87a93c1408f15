"""`--out-dtype bf16` (docs/formats.md "fp8_cast_bf16", §7 rows "Block FP8" and "MXFP4": write BF16
instead of re-quantizing): scale tensors dropped, headers / offsets / index / total_size rebuilt from the
plan, config.json's quantization_config removed, passthroughs byte-exact, values equal to the float64
reference cast to BF16, and the output loads in transformers (DeepseekV3, GptOss). Resume works."""

from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch
from fmtref import assert_bf16_close, dense, load_dir, reference_repair
from frontier import write_pair

from dgrepair.cli import main

transformers = pytest.importorskip("transformers")


def run(base, ft, out, *extra):
    return main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress",
                 "--in-process", "--out-dtype", "bf16", *extra])


def header(path) -> dict:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])


def test_deepseek_fp8_to_bf16_loads_in_transformers_and_matches_reference(tmp_path):
    base, ft = write_pair("deepseek_v3", tmp_path)
    out = tmp_path / "out"
    assert run(base, ft, out) == 0
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    assert set(o) == {k for k in f if not k.endswith("_scale_inv")}  # scales dropped
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    for name, t in f.items():
        if name.endswith("_scale_inv"):
            assert m.loc[name, "status"] == "dropped"
        elif t.dtype == torch.float8_e4m3fn:
            assert o[name].dtype == torch.bfloat16 and o[name].shape == t.shape
            want, ranks = reference_repair(dense(b, name), dense(f, name), "svd")
            assert m.loc[name, "rank_kept"] == ranks[0] > 0 and m.loc[name, "kind"] == "fp8"
            assert_bf16_close(o[name].float().numpy(), want)
            assert m.loc[name, "requant_error"] < 2 ** -8  # the BF16 rounding only
            assert m.loc[name, "reason"].endswith("written as BF16")
        elif m.loc[name, "kind"] == "passthrough":
            assert torch.equal(o[name].view(torch.uint8), t.view(torch.uint8)), name
    # index: written names, their shards, new total_size; headers: contiguous offsets of the new dtypes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(o)
    total = 0
    for shard in set(index["weight_map"].values()):
        entries = {k: v for k, v in header(out / shard).items() if k != "__metadata__"}
        assert {k for k, s in index["weight_map"].items() if s == shard} == set(entries)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in entries.values())
    assert index["metadata"]["total_size"] == total == sum(t.numel() * t.element_size() for t in o.values())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "deepseek_v3"
    # the real client loads it, and the weights it holds are the reference's
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    sd = model.state_dict()
    same = [k for k in sd if k in o]
    assert len(same) >= 20 and all(torch.equal(sd[k], o[k].to(sd[k].dtype)) for k in same)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(12)[None]).logits
    assert logits.shape == (1, 12, 128) and torch.isfinite(logits).all()


def test_gpt_oss_mxfp4_to_bf16_loads_in_transformers_with_the_reference_weights(tmp_path, capsys):
    base, ft = write_pair("gpt_oss", tmp_path)
    out = tmp_path / "out"
    assert run(base, ft, out) == 0
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    stem = "model.layers.0.mlp.experts."
    assert not any(k.endswith(("_blocks", "_scales")) for k in o)
    for part, how in (("gate_up_proj", "rows_interleaved"), ("down_proj", "experts")):
        want, _ = reference_repair(dense(b, stem + part + "_blocks"), dense(f, stem + part + "_blocks"), how)
        got = o[stem + part]
        assert got.dtype == torch.bfloat16 and got.shape == (want.shape[0], want.shape[2], want.shape[1])
        assert_bf16_close(got.float().numpy(), np.swapaxes(want, 1, 2))  # (in, out), as transformers holds it
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    capsys.readouterr()
    assert main(["plan", "--base", str(base), "--ft", str(ft), "--out-dtype", "bf16", "--json"]) == 0
    written = {e["tensor"]: e["written"] for e in json.loads(capsys.readouterr().out)["entries"]}
    assert written[stem + "down_proj_blocks"] == {"name": stem + "down_proj", "dtype": "BF16", "shape": [2, 32, 64]}
    assert written[stem + "down_proj_scales"] == {"dropped": True} and written["lm_head.weight"] is None
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    sd = model.state_dict()
    assert torch.equal(sd[stem + "gate_up_proj"], o[stem + "gate_up_proj"])
    assert torch.equal(sd[stem + "down_proj"], o[stem + "down_proj"])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(8)[None]).logits).all()


def test_bf16_output_resumes_after_an_interruption(tmp_path):
    base, ft = write_pair("deepseek_v3", tmp_path)
    assert run(base, ft, tmp_path / "clean") == 0
    out = tmp_path / "out"
    assert run(base, ft, out) == 0
    (out / "dgrepair" / "summary.json").unlink()  # as if interrupted before the end
    (out / "model.safetensors.index.json").unlink()
    rows = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    row = rows.loc["model.layers.1.mlp.experts.2.up_proj.weight"]
    raw = bytearray((out / row.shard).read_bytes())
    raw[row.byte_begin:row.byte_begin + 8] = b"\x00" * 8  # damage one converted weight
    (out / row.shard).write_bytes(bytes(raw))
    assert run(base, ft, out) == 0
    after = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    redone = after.tensor == "model.layers.1.mlp.experts.2.up_proj.weight"
    assert redone.sum() == 2  # redone, and nothing else was
    assert len(after) == len(rows) + 2  # with its dropped scales
    for f in sorted(p.name for p in (tmp_path / "clean").iterdir() if p.is_file()):
        assert (out / f).read_bytes() == (tmp_path / "clean" / f).read_bytes(), f
