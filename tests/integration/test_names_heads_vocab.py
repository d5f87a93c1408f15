"""Pairing across name prefixes, tied heads decided from the files, and resized vocabularies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import reference
import torch
from ckpt import low_rank_plus_noise, write_single
from safetensors import safe_open

from dgrepair.cli import main
from dgrepair.engine.plan.names import canonical


def mat(shape, seed, base=None):
    g = torch.Generator().manual_seed(seed)
    w0 = base if base is not None else 0.02 * torch.randn(shape, generator=g)
    return w0, (w0.double() + low_rank_plus_noise(shape, 3, g)).float()


def repair(tmp_path, base: dict, ft: dict):
    write_single(tmp_path / "base", base)
    write_single(tmp_path / "ft", ft)
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process"]) == 0
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        got = {k: fh.get_tensor(k) for k in fh.keys()}
    return got, pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")


def assert_repaired(out: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> None:
    d_star, r, _ = reference.dg_hard((w1 - w0).numpy())
    assert r == 3
    err = np.linalg.norm((out - w0).double().numpy() - d_star) / np.linalg.norm(d_star)
    assert err < 1e-5


@pytest.mark.parametrize("ft_prefix", ["model.language_model.", "language_model.model."])
def test_prefixed_fine_tune_pairs_with_plain_base_and_keeps_its_names(tmp_path, ft_prefix):
    # docs/formats.md row "Prefix mismatch"
    w0, w1 = mat((96, 64), 0)
    v0, v1 = mat((64, 48), 1)
    base = {"model.layers.0.mlp.up_proj.weight": w0, "visual.blocks.0.attn.qkv.weight": v0}
    ft = {f"{ft_prefix}layers.0.mlp.up_proj.weight": w1, "model.visual.blocks.0.attn.qkv.weight": v1}
    got, m = repair(tmp_path, base, ft)
    assert set(got) == set(ft)  # the fine-tune's names are written
    assert_repaired(got[f"{ft_prefix}layers.0.mlp.up_proj.weight"], w0, w1)
    assert_repaired(got["model.visual.blocks.0.attn.qkv.weight"], v0, v1)
    assert "paired with base model.layers.0.mlp.up_proj.weight" in m.loc[f"{ft_prefix}layers.0.mlp.up_proj.weight",
                                                                           "reason"]


def test_canonical_names():
    assert canonical("model.language_model.layers.3.x") == "model.layers.3.x"
    assert canonical("language_model.model.layers.3.x") == "model.layers.3.x"
    assert canonical("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical("model.visual.patch_embed.proj.weight") == "visual.patch_embed.proj.weight"
    assert canonical("model.layers.3.x") == "model.layers.3.x"


def test_untied_fine_tune_of_a_tied_base_repairs_the_head_against_the_base_embedding(tmp_path):
    # §7 row "Tied and lying-tied heads" (a tied base, untied fine-tune)
    e0, e1 = mat((160, 64), 2)
    _, h1 = mat((160, 64), 3, base=e0)  # the fine-tune's head started from the tied embedding
    got, m = repair(tmp_path, {"model.embed_tokens.weight": e0},
                    {"model.embed_tokens.weight": e1, "lm_head.weight": h1})
    assert_repaired(got["lm_head.weight"], e0, h1)
    assert_repaired(got["model.embed_tokens.weight"], e0, e1)
    assert "base ties the head" in m.loc["lm_head.weight", "reason"]


def test_tied_fine_tune_of_an_untied_base_writes_no_head_and_reports_it(tmp_path, capsys):
    # §7 row "Tied and lying-tied heads", pair A: base untied, fine-tune tied (no lm_head)
    e0, e1 = mat((160, 64), 4)
    h0 = 0.02 * torch.randn(160, 64)
    got, m = repair(tmp_path, {"model.embed_tokens.weight": e0, "lm_head.weight": h0},
                    {"model.embed_tokens.weight": e1})
    assert set(got) == {"model.embed_tokens.weight"}  # emitted only if the fine-tune's files had one
    assert_repaired(got["model.embed_tokens.weight"], e0, e1)
    capsys.readouterr()
    assert main(["plan", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft")]) == 0
    assert "base-only keys (1): lm_head.weight" in capsys.readouterr().out


def test_resized_vocabulary_repairs_the_shared_rows_and_copies_the_new_ones(tmp_path):
    # §7 row "Resized vocabulary": base [100, 64], fine-tune [128, 64]
    e0, e1 = mat((100, 64), 5)
    new_rows = torch.randn(28, 64)
    ft_embed = torch.cat([e1, new_rows])  # 128 rows: 28 added tokens, padded to a multiple of 64
    got, m = repair(tmp_path, {"model.embed_tokens.weight": e0}, {"model.embed_tokens.weight": ft_embed})
    out = got["model.embed_tokens.weight"]
    assert out.shape == (128, 64)
    assert torch.equal(out[100:], new_rows)  # copied verbatim
    assert_repaired(out[:100], e0, e1)
    assert m.loc["model.embed_tokens.weight", "reason"].startswith("resized vocabulary: rows 0-99 repaired, 28 new")


def test_config_that_lies_about_tying_is_ignored(tmp_path):
    """§7 row "Tied and lying-tied heads", pair B: config.json says tie_word_embeddings=false, but the base
    files hold no lm_head: the fine-tune's head is repaired against the base embedding (files win)."""
    e0, e1 = mat((160, 64), 6)
    _, h1 = mat((160, 64), 7, base=e0)
    write_single(tmp_path / "base", {"model.embed_tokens.weight": e0})
    write_single(tmp_path / "ft", {"model.embed_tokens.weight": e1, "lm_head.weight": h1})
    for role in ("base", "ft"):
        (tmp_path / role / "config.json").write_text('{"tie_word_embeddings": false}')
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process"]) == 0
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        assert_repaired(fh.get_tensor("lm_head.weight"), e0, h1)


def test_shrunk_or_reshaped_tensors_are_still_refused(tmp_path, capsys):
    write_single(tmp_path / "base", {"model.embed_tokens.weight": torch.zeros(128, 64),
                                     "model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)})
    write_single(tmp_path / "ft", {"model.embed_tokens.weight": torch.zeros(100, 64),
                                   "model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)})
    assert main(["plan", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft")]) == 2
    out = capsys.readouterr().out
    assert out.count("ERROR") == 2
