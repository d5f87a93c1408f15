"""--target-rho (paper App. I.3 Part B, matched Frobenius rollback): the knob is bisected on cached
calibration curves, and the run then achieves the target; the calibration pass resumes."""

from __future__ import annotations

import json

import pytest
from pairs import make_pair
from test_methods import _read_all, _repair


def _rho(summary):
    return summary["totals"]["global_rho"]


@pytest.mark.parametrize("method,extra,target", [("ties", [], 0.5), ("dare", ["--no-dare-rescale"], 0.6),
                                                 ("wise_ft", [], 0.37)])
def test_continuous_knobs_hit_the_target_within_1e_3(tmp_path, method, extra, target):
    pair = make_pair(tmp_path)
    s = _repair(pair, tmp_path / "out", "--method", method, "--target-rho", str(target), *extra)
    assert abs(_rho(s) - target) < 1e-3, s["target_rho"]
    assert s["target_rho"]["target"] == target and s["target_rho"]["achieved_rho"] == _rho(s)
    knob = {"ties": "keep_ratio", "dare": "drop_prob", "wise_ft": "alpha"}[method]
    assert s["target_rho"]["knob"] == knob and s["method"]["params"][knob] == s["target_rho"]["value"]
    if method == "wise_ft":
        assert s["target_rho"]["value"] == pytest.approx(target, abs=1e-9)


def test_ties_hits_the_target_on_a_bf16_pair_full_of_tied_magnitudes(tmp_path):
    """Found by the forgetting lab: with ties kept at the cut-off, a BF16 delta overshot the target by 0.024."""
    import torch
    from ckpt import write_single

    from dgrepair.cli import main

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(96, 64, generator=g) for i in range(3)}  # |W| ~ 1: coarse BF16 grid
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    write_single(tmp_path / "base", {k: v.bfloat16() for k, v in base.items()})
    write_single(tmp_path / "ft", {k: v.bfloat16() for k, v in ft.items()})
    d = ft["layers.0.weight"].bfloat16().float() - base["layers.0.weight"].bfloat16().float()
    assert d.abs().unique().numel() < d.numel() / 20  # the delta's magnitudes really are tied
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--in-process", "--no-progress", "--method", "ties", "--target-rho", "0.8853"]) == 0
    s = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert abs(_rho(s) - 0.8853) < 1e-3, s["target_rho"]


@pytest.mark.parametrize("method,knob,value", [("dg_hard", "scale", 1.3), ("fixed_rank", "rank", 3),
                                               ("mp_edge", "scale", 0.8)])
def test_spectral_knobs_recover_an_attainable_target_exactly(tmp_path, method, knob, value):
    """ρ of a spectral cut is a step function; a ρ produced by some knob value must be hit exactly."""
    pair = make_pair(tmp_path)
    first = _repair(pair, tmp_path / "a", "--method", method, f"--{knob}", str(value))
    second = _repair(pair, tmp_path / "b", "--method", method, "--target-rho", repr(_rho(first)))
    assert _rho(second) == pytest.approx(_rho(first), abs=1e-12)
    assert second["target_rho"]["predicted_rho"] == pytest.approx(_rho(second), abs=1e-9)
    if method == "fixed_rank":
        assert second["target_rho"]["value"] == 3
    a, b = _read_all(tmp_path / "a"), _read_all(tmp_path / "b")
    assert all(a[k].equal(b[k]) for k in a)  # the same kept components, so the same bytes


def test_unreachable_target_is_a_clear_error(tmp_path, capsys):
    from dgrepair.cli import main

    pair = make_pair(tmp_path)
    code = main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(tmp_path / "o"),
                 "--in-process", "--no-progress", "--method", "fixed_rank", "--target-rho", "1.0",
                 "--min-numel", "1024"])
    # rank 2^20 keeps every component, so rho = 1 is reachable; a DG scale cannot go past its range
    assert code == 0
    code = main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(tmp_path / "p"),
                 "--in-process", "--no-progress", "--method", "ties", "--ties-lambda", "0.1", "--target-rho", "0.5"])
    assert code == 2
    assert "reaches rho in [0.0000, 0.1000]" in capsys.readouterr().err
    assert not (tmp_path / "p" / "dgrepair" / "summary.json").exists()


def test_calibration_resumes_without_recomputing(tmp_path):
    pair = make_pair(tmp_path)
    out = tmp_path / "out"
    first = _repair(pair, out, "--method", "ties", "--target-rho", "0.4")
    parts = sorted((out / "dgrepair" / "calibration.parquet").glob("part-*.parquet"))
    assert parts
    victim = sorted(out.glob("*.safetensors"))[0]
    before = victim.read_bytes()
    victim.unlink()
    (out / "dgrepair" / "summary.json").unlink()
    (out / "model.safetensors.index.json").unlink()
    again = _repair(pair, out, "--method", "ties", "--target-rho", "0.4")
    assert sorted((out / "dgrepair" / "calibration.parquet").glob("part-*.parquet")) == parts  # nothing recomputed
    assert victim.read_bytes() == before
    assert again["target_rho"]["value"] == first["target_rho"]["value"]
    assert json.loads((out / "dgrepair" / "summary.json").read_text())["resumed_entries"] > 0


def test_fast_energy_model_equals_the_rule_matrix_by_matrix():
    """DG-Hard's precomputed searchsorted model gives the same global ρ as the rule itself."""
    import numpy as np
    import reference

    from dgrepair.engine.run.calibration import CalibrationRow, global_rho, rho_function
    from dgrepair.kernels.methods import build_method

    rng = np.random.default_rng(0)
    rows = []
    for i, (m, n) in enumerate([(96, 64), (64, 64), (40, 120), (30, 30)]):
        s = np.linalg.svd(reference.spiked(m, n, 3, rng), compute_uv=False)
        rows.append(CalibrationRow(f"t{i}", None, None, m, n, float(np.sum(s ** 2)), list(s), "p", 0.0))
    rows.append(CalibrationRow("zero", None, None, 50, 40, 0.0, [0.0] * 40, "p", 0.0))
    for name in ("dg_hard", "mp_edge"):
        method = build_method(name, {})
        fast = rho_function(method, rows)
        for scale in (0.3, 0.9, 1.0, 1.7, 4.0):
            assert fast(scale) == pytest.approx(global_rho(method.with_knob(scale), rows), abs=1e-12)
    for i, r in enumerate(rows):  # element-wise curves on the shared grid: the model is one weighted curve
        r.curve = list(np.linspace(0.0, 1.0, 2048) ** (0.3 + 0.2 * i))
    for name, knob in (("ties", (0.05, 0.2, 0.77)), ("dare", (0.1, 0.5, 0.9)), ("wise_ft", (0.2, 0.6))):
        method = build_method(name, {"dare_rescale": False})
        fast = rho_function(method, rows)
        for v in knob:
            assert fast(v) == pytest.approx(global_rho(method.with_knob(v), rows), abs=1e-12)


@pytest.mark.parametrize("fixture,method,extra,target,tol", [
    ("deepseek_v3", "ties", [], 0.5, 1e-3),  # block-FP8 weights: curves from dequantised deltas
    ("gpt_oss", "dare", ["--no-dare-rescale"], 0.6, 1e-3),  # MXFP4 fused experts, per expert and half
    ("qwen3_5_moe", "wise_ft", [], 0.42, 1e-6),
])
def test_target_rho_on_frontier_fixtures(tmp_path, fixture, method, extra, target, tol):
    """Calibration reads quantized and fused tensors exactly as the repair does. For a re-quantized
    output the achieved ρ is measured on the repair's float32 Δ*, before re-quantization."""
    import pandas as pd
    from frontier import write_pair

    from dgrepair.cli import main

    base, ft = write_pair(fixture, tmp_path)
    out = tmp_path / "out"
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--in-process", "--no-progress",
                 "--method", method, "--target-rho", str(target), *extra]) == 0
    s = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert abs(s["totals"]["global_rho"] - target) < tol, s["target_rho"]
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    cal = pd.read_parquet(out / "dgrepair" / "calibration.parquet")
    repaired = m[m.status.isin(["repaired", "zero_delta"]) & m.frob_delta.notna()]
    assert len(cal) == len(repaired)  # one calibration row per repaired matrix (experts and halves included)
