"""End-to-end repairs of the mini frontier checkpoints of tests/fixtures/frontier.py (docs/formats.md rows:
"Per-expert 2-D MoE", "Fused [E, 2I, H]", "MXFP4", "Convolutions", "MLA shapes", "Mixed-precision
passthrough", "Prefix mismatch", "Block FP8"): every repaired matrix against the float64 reference
per matrix, every passthrough byte-exact, and `dgrepair plan` classifying each tensor as written here
by hand from the real layouts."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from fmtref import assert_bf16_close, dense, load_dir, reference_repair
from frontier import write_pair

from dgrepair.cli import main

# Expected classification per fixture: (regex, plan kind, how the tensor splits into matrices); first match wins.
EXPECTED: dict[str, list[tuple[str, str, str | None]]] = {
    "deepseek_v3": [(r"_scale_inv$", "fp8_scale", None), (r"_proj(_with_mqa)?\.weight$", "fp8", "svd"),
                    (r"^(model\.embed_tokens|lm_head)\.weight$", "svd", "svd"), (r".", "passthrough", None)],
    "gpt_oss": [(r"gate_up_proj_blocks$", "mxfp4", "rows_interleaved"), (r"down_proj_blocks$", "mxfp4", "experts"),
                (r"_scales$", "mxfp4_scales", None), (r"_proj\.weight$|embed_tokens|lm_head", "svd", "svd"),
                (r".", "passthrough", None)],  # biases, router, sinks, norms
    "qwen3_5_moe": [(r"experts\.gate_up_proj$", "experts_fused", "rows_concat"),
                    (r"experts\.down_proj$", "experts", "experts"),
                    (r"(in_proj_(qkv|z)|out_proj|[qkvo]_proj|shared_expert\.\w+_proj|embed_tokens|lm_head)\.weight$",
                     "svd", "svd"),
                    (r".", "passthrough", None)],  # conv1d [96, 1, 4] (384 < min_numel), A_log, gates, norms
    "mixtral": [(r"\.w[123]\.weight$|_proj\.weight$|embed_tokens|lm_head", "svd", "svd"),
                (r".", "passthrough", None)],
    "vlm": [(r"(patch_embed\.proj|patch_embedding|conv1d)\.weight$", "conv", "conv"),
            (r"in_proj\.weight$|embed_tokens|lm_head", "svd", "svd"), (r".", "passthrough", None)],
}
QUANTIZED = {"fp8", "mxfp4"}


def expected(fixture: str, name: str) -> tuple[str, str | None]:
    return next((k, how) for rx, k, how in EXPECTED[fixture] if re.search(rx, name))


def base_name(name: str) -> str:
    """The vlm fixture's base uses the pre-4.52 names."""
    return name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


def repair(tmp_path, fixture: str, *extra: str):
    base, ft = write_pair(fixture, tmp_path)
    out = tmp_path / "out"
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress",
                 "--in-process", *extra]) == 0
    return base, ft, out, pd.read_parquet(out / "dgrepair" / "manifest.parquet")


@pytest.mark.parametrize("fixture", list(EXPECTED))
def test_plan_classifies_every_tensor(tmp_path, capsys, fixture):
    base, ft = write_pair(fixture, tmp_path)
    capsys.readouterr()
    assert main(["plan", "--base", str(base), "--ft", str(ft), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    got = {e["tensor"]: e["kind"] for e in plan["entries"]}
    want = {name: expected(fixture, name)[0] for name in got}
    assert got == want
    assert plan["refused"] == [] and plan["shape_mismatches"] == []
    # Key-set drift (§7): the DeepSeek base has an MTP layer with its own embed/head copies that the fine-tune
    # dropped; reported, not written
    mtp = [f"model.layers.2.{k}" for k in ("eh_proj.weight", "embed_tokens.weight", "enorm.weight", "hnorm.weight",
                                           "shared_head.head.weight")]
    assert plan["base_only"] == (mtp if fixture == "deepseek_v3" else [])
    assert main(["plan", "--base", str(base), "--ft", str(ft), "--tensors"]) == 0
    text = capsys.readouterr().out
    for name, kind in got.items():  # the human-readable listing says the same
        assert re.search(rf"^  {kind}\s.*\s{re.escape(name)}  \[", text, re.M), name


@pytest.mark.parametrize("fixture", list(EXPECTED))
def test_fixture_repair_matches_float64_reference_per_matrix(tmp_path, fixture):
    base, ft, out, m = repair(tmp_path, fixture)
    b, f, o = load_dir(base), load_dir(ft), load_dir(out)
    assert set(o) == set(f)  # same names, nothing dropped or added (base-only MTP keys are not written)
    for name, t in f.items():
        kind, how = expected(fixture, name)
        rows = m[m.tensor == name].sort_values(["expert", "part"], na_position="first")
        assert set(rows.kind) == {kind}, name
        if kind == "passthrough":
            assert o[name].dtype == t.dtype and torch.equal(o[name].view(torch.uint8), t.view(torch.uint8)), name
            continue
        if how is None:  # scales: checked through their weight
            continue
        w0, w1, got = dense(b, name if name in b else base_name(name)), dense(f, name), dense(o, name)
        want, ranks = reference_repair(w0, w1, how)
        assert rows.rank_kept.tolist() == ranks, name  # one manifest row per matrix, in expert/part order
        assert max(ranks) > 0 or "mixer.conv1d" in name, name  # depthwise [320, 4]: no room for a signal
        if kind in QUANTIZED:  # only the re-quantisation error is left, and the manifest records it
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert err == pytest.approx(rows.requant_error.iloc[0], rel=2e-2, abs=1e-6), name
            assert err < (2 ** -4 if kind == "fp8" else 0.2), name
            assert np.linalg.norm(got - want) < np.linalg.norm(w1 - want), name  # moved towards the reference
        elif t.dtype == torch.bfloat16:
            assert_bf16_close(got, want)
        else:
            assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want - w0), name
    if fixture == "vlm":  # depthwise kernels follow the scope rule but are flagged
        conv = m[m.tensor.str.endswith("mixer.conv1d.weight")]
        assert "depthwise: rank at most 4" in conv.reason.iloc[0]
