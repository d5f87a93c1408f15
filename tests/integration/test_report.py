"""`dgrepair report` on a real in-process run of the make_pair checkpoints: the App. I.1 table against
values computed here from the manifest with pandas, the spectra against a float64 numpy SVD of the
delta, the figures as real PNGs of the expected size, and the error paths."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pairs import make_pair

from dgrepair.cli import main
from dgrepair.engine.analysis import report_stats

# The class of every repaired tensor of make_pair, written out by hand (App. I.1 naming).
CLASSES = {
    "model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head",
    "model.layers.0.self_attn.q_proj.weight": "attn.q_proj", "model.layers.1.self_attn.q_proj.weight": "attn.q_proj",
    "model.layers.0.self_attn.k_proj.weight": "attn.k_proj", "model.layers.1.self_attn.k_proj.weight": "attn.k_proj",
    "model.layers.0.mlp.gate_proj.weight": "mlp.gate_proj", "model.layers.1.mlp.gate_proj.weight": "mlp.gate_proj",
    "model.layers.0.mlp.down_proj.weight": "mlp.down_proj", "model.layers.1.mlp.down_proj.weight": "mlp.down_proj",
    "model.layers.0.mlp.experts.down_proj": "mlp.experts.down_proj",
    "visual.patch_embed.proj.weight": "visual.patch_embed.proj",
    "model.frozen.weight": "frozen", "model.lowrank.weight": "lowrank",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    pair = make_pair(root)
    out = root / "out"
    assert main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--in-process",
                 "--no-progress"]) == 0
    return pair, out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def assert_real_image(path: Path, size: tuple[int, int]) -> None:
    import matplotlib.image

    assert path.stat().st_size > 1000
    assert png_size(path) == size
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (size[1], size[0])
    assert float(pixels[..., :3].std()) > 0.01  # not a blank canvas


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """Body rows of the first table after a heading."""
    block: list[list[str]] = []
    for ln in text.split(heading, 1)[1].splitlines():
        if ln.startswith("|"):
            block.append([c.strip() for c in ln.strip().strip("|").split("|")])
        elif block:
            break
    return block[2:]


def expected_class_table(out: Path) -> dict[str, tuple[int, float, float, float, float]]:
    """From the manifest with pandas: last row per matrix, repaired kinds only."""
    df = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    df = df[df["rank_total"].notna()].drop_duplicates(["tensor", "expert", "part"], keep="last")
    df = df.assign(cls=df["tensor"].map(CLASSES))
    assert df["cls"].notna().all(), df[df["cls"].isna()]["tensor"].tolist()
    total = float((df["frob_delta"] ** 2).sum())
    out_table = {}
    for cls, g in df.groupby("cls"):
        live = g[g["frob_delta"] > 0]
        mean_noise = float(live["noise_energy_fraction"].mean()) if len(live) else 0.0
        share = float((live["frob_delta"] ** 2).sum()) / total
        rho = math.sqrt(float((g["frob_kept"] ** 2).sum()) / float((g["frob_delta"] ** 2).sum())) \
            if float((g["frob_delta"] ** 2).sum()) > 0 else 1.0
        out_table[cls] = (len(g), mean_noise, share, mean_noise * share, rho)
    return out_table


def test_report_numbers_match_the_manifest(run):
    pair, out = run
    assert main(["report", str(out), "--tensors", r"layers\.0\.mlp\.gate_proj", "experts\\.down_proj$"]) == 0
    folder = out / "dgrepair" / "report"
    text = (folder / "report.md").read_text()
    rows = markdown_table(text, "## Noise by layer class")
    expected = expected_class_table(out)
    assert {r[0] for r in rows} == set(expected) and len(rows) == len(expected) == 10
    for cls, n, noise, share, mass, _kept, rho, requant in rows:
        e = expected[cls]
        assert requant == "", cls  # a dense pair has no re-quantised weight
        assert int(n) == e[0], cls
        for got, want in zip((noise, share, mass, rho), e[1:], strict=True):
            assert float(got) == pytest.approx(want, abs=5e-5), cls  # printed to 4 decimals
    masses = [float(r[4]) for r in rows]
    assert masses == sorted(masses, reverse=True)
    assert sum(float(r[3]) for r in rows) == pytest.approx(1.0, abs=1e-3)
    # the experts stack dominates: expert 0 and 3 have noise 1e-2, so most of the delta mass
    assert rows[0][0] == "mlp.experts.down_proj"
    # one path style (absolute), and p printed as an integer: every class here has one p per class
    assert f"base `{pair.base.resolve()}`, fine-tune `{pair.ft.resolve()}`, output `{out.resolve()}`" in text
    for r in rows:
        kept, p = r[5].split(" / ")
        assert p.isdigit(), r


    data = json.loads((folder / "report.json").read_text())
    for c in data["classes"]:
        e = expected[c["layer_class"]]
        assert (c["matrices"], c["mean_noise"], c["norm_share"], c["noise_mass"], c["rho"]) == pytest.approx(e)

    # rho per layer, energy-weighted, from the manifest
    df = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    df = df[df["rank_total"].notna()].drop_duplicates(["tensor", "expert", "part"], keep="last")
    for layer in (0, 1):
        g = df[df["tensor"].str.contains(rf"\.layers\.{layer}\.")]
        want = math.sqrt(float((g["frob_kept"] ** 2).sum()) / float((g["frob_delta"] ** 2).sum()))
        assert data["rho_by_layer"]["all"][str(layer)] == pytest.approx(want)
        assert f"| {layer} | {want:.4f} |" in text

    # figures: real PNGs of the documented sizes (10 classes -> 3 x 4 panels of 400 x 300 px)
    assert_real_image(folder / "kept_ranks.png", (1200, 1200))
    assert_real_image(folder / "rho_per_layer.png", (800, 450))
    for i in range(5):  # gate_proj + the 4 experts
        assert_real_image(folder / f"spectrum_{i:02d}.png", (800, 450))
    assert data["figures"]["kept_ranks.png"] == [1200, 1200]
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (folder / name).is_file()


def test_spectra_match_a_float64_svd_of_the_delta(run):
    pair, out = run
    assert main(["report", str(out), "--tensors", r"layers\.0\.mlp\.gate_proj", "experts\\.down_proj$"]) == 0
    data = json.loads((out / "dgrepair" / "report" / "report.json").read_text())
    df = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    spectra = data["spectra"]
    assert [(s["tensor"], s["expert"]) for s in spectra] == [
        ("model.layers.0.mlp.gate_proj.weight", None), *(("model.layers.0.mlp.experts.down_proj", e)
                                                          for e in range(4))]
    for s in spectra:
        name, expert = s["tensor"], s["expert"]
        delta = pair.ft_tensors[name].to(torch.float32) - pair.base_tensors[name].to(torch.float32)
        if expert is not None:
            delta = delta[expert]
        ref = np.linalg.svd(delta.double().numpy(), compute_uv=False)
        got = np.asarray(s["singular_values"])
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * ref[0])
        row = df[(df["tensor"] == name) & ((df["expert"] == expert) if expert is not None else df["expert"].isna())]
        row = row.iloc[-1]
        assert s["tau_run"] == row["tau"] and s["mp_edge_run"] == row["mp_edge"]
        assert s["tau_recomputed"] == pytest.approx(row["tau"], rel=1e-9)
        assert s["rank_kept_recomputed"] == s["rank_kept_run"] == row["rank_kept"] == int(np.sum(ref > row["tau"]))


def test_default_spectrum_html_and_max_spectra(run, capsys):
    _, out = run
    assert main(["report", str(out), "--format", "html", "--tensors", "experts", "--max-spectra", "2"]) == 0
    html = (out / "dgrepair" / "report" / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and "spectrum_01.png" in html
    assert "4 matrices match; the first 2 are plotted" in html
    assert main(["report", str(out)]) == 0  # default: the 2-D matrix with the largest ||delta||_F
    data = json.loads((out / "dgrepair" / "report" / "report.json").read_text())
    df = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    plain = df[df["kind"] == "svd"]
    assert [s["tensor"] for s in data["spectra"]] == [plain.loc[plain["frob_delta"].idxmax(), "tensor"]]
    capsys.readouterr()


def test_report_errors(run, tmp_path, capsys):
    pair, out = run
    assert main(["report", str(tmp_path)]) == 2
    assert "no dgrepair/summary.json" in capsys.readouterr().err
    assert main(["report", str(out), "--tensors", "no_such_tensor"]) == 2
    assert "no repaired tensor matches" in capsys.readouterr().err
    assert main(["report", str(out), "--tensors", "("]) == 2
    assert "invalid regular expression" in capsys.readouterr().err
    # inputs gone: explicit spectra fail clearly, the rest of the report still renders without them
    moved = pair.base.with_name("base-moved")
    shutil.move(pair.base, moved)
    try:
        assert main(["report", str(out), "--tensors", "gate_proj"]) == 2
        assert "base checkpoint" in capsys.readouterr().err
        assert main(["report", str(out)]) == 0
        assert "Spectrum not plotted" in (out / "dgrepair" / "report" / "report.md").read_text()
    finally:
        shutil.move(moved, pair.base)
    capsys.readouterr()


@pytest.mark.parametrize("name, part, cls, layer", [
    ("model.layers.3.mlp.up_proj.weight", None, "mlp.up_proj", 3),
    ("model.language_model.layers.7.self_attn.o_proj.weight", None, "attn.o_proj", 7),
    ("model.layers.2.block_sparse_moe.experts.5.w1.weight", None, "mlp.experts.gate_proj", 2),
    ("model.layers.2.block_sparse_moe.experts.5.w2.weight", None, "mlp.experts.down_proj", 2),
    ("model.layers.0.mlp.experts.gate_up_proj", "up", "mlp.experts.up_proj", 0),
    ("model.layers.4.feed_forward.experts.gate_up_proj", "gate", "mlp.experts.gate_proj", 4),
    ("model.layers.1.mlp.shared_expert.down_proj.weight", None, "mlp.shared_expert.down_proj", 1),
    ("model.layers.9.linear_attn.conv1d.weight", None, "linear_attn.conv1d", 9),
    ("model.visual.blocks.11.attn.qkv.weight", None, "visual.attn.qkv", 11),
    ("transformer.h.5.attn.c_attn.weight", None, "attn.c_attn", 5),
    ("model.embed_tokens.weight", None, "embed_tokens", None),
    ("lm_head.weight", None, "lm_head", None),
])
def test_layer_class_names(name, part, cls, layer):
    assert report_stats.layer_class(name, part) == cls
    assert report_stats.layer_index(name) == layer


def test_spectra_of_fused_gate_up_and_fp8_tensors(tmp_path):
    """The recompute follows the run's own reshape rules: fused gate/up halves (gpt-oss interleaved
    layout) and block-FP8 weights dequantised with each checkpoint's scales."""
    from ckpt import write_single
    from pairs import fp8_pair
    from test_fused_experts import PREFIX, E, fused, halves, split

    from dgrepair.kernels import fp8

    base_h, ft_h = halves(5)
    for role, w in (("base", base_h), ("ft", ft_h)):
        write_single(tmp_path / "moe" / role, {f"{PREFIX}.gate_up_proj": fused(w, "in_out_interleaved")})
        (tmp_path / "moe" / role / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    base8, ft8 = fp8_pair(tmp_path / "f8")
    cases = [(tmp_path / "moe", "gate_up_proj"), (tmp_path / "f8", r"down_proj\.weight$")]
    for root, pattern in cases:
        out = root / "out"
        # float64 kernel: the precision policy would run FP8 outputs in float32 (τ to ~1e-6 only)
        assert main(["repair", "--base", str(root / "base"), "--ft", str(root / "ft"), "--out", str(out),
                     "--in-process", "--no-progress", "--kernel", "gram64"]) == 0
        assert main(["report", str(out), "--tensors", pattern, "--max-spectra", "16"]) == 0
        data = json.loads((out / "dgrepair" / "report" / "report.json").read_text())
        for s in data["spectra"]:
            if s["part"] is not None:  # fused: matrix = that expert's half, as the per-expert layout stores it
                f1, f0 = (fused(w, "in_out_interleaved") for w in (ft_h, base_h))
                delta = split(f1, "in_out_interleaved", s["expert"], s["part"]) - \
                    split(f0, "in_out_interleaved", s["expert"], s["part"])
            else:
                name = s["tensor"]
                delta = fp8.dequantize(ft8[name], ft8[name + "_scale_inv"]) - \
                    fp8.dequantize(base8[name], base8[name + "_scale_inv"])
            ref = np.linalg.svd(delta.double().numpy(), compute_uv=False)
            np.testing.assert_allclose(s["singular_values"], ref, rtol=0, atol=1e-6 * ref[0])
            assert s["rank_kept_recomputed"] == s["rank_kept_run"]
            assert s["tau_recomputed"] == pytest.approx(s["tau_run"], rel=1e-9)
        if root.name == "moe":
            assert [(s["expert"], s["part"]) for s in data["spectra"]] == [
                (e, p) for e in range(E) for p in ("gate", "up")]
            assert {c["layer_class"] for c in data["classes"]} == {"mlp.experts.gate_proj", "mlp.experts.up_proj"}
        else:
            assert [s["tensor"] for s in data["spectra"]] == ["model.layers.0.mlp.down_proj.weight"]


def test_rank_bins_make_one_matrix_a_centred_bar_and_counts_print_as_ints():
    from dgrepair.engine.analysis.report import _count, rank_bins

    bins, xlim = rank_bins([7])
    assert list(bins) == [7, 8] and xlim == (4.5, 9.5)  # five ranks wide, centred on 7
    bins, xlim = rank_bins([3, 12])
    assert list(bins) == list(range(3, 14)) and xlim == (2.5, 12.5)
    assert _count(576.0) == "576" and _count(12.25) == "12.2"
