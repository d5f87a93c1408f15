"""--emit-adapter: Δ* as a PEFT LoRA adapter. Loading it with peft onto the base and merging must
reproduce the repaired checkpoint (tiny LLaMA, transformers + peft, Linear and Embedding modules)."""

from __future__ import annotations

import json

import pytest
import torch
from pairs import make_pair
from test_methods import _repair

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from dgrepair.cli import main  # noqa: E402


def _tiny(tie: bool):
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tie)


@pytest.mark.parametrize("method,tie", [("dg_hard", False), ("optimal_shrink", True), ("fixed_rank", False)])
def test_peft_merge_of_the_adapter_reproduces_the_repaired_checkpoint(tmp_path, method, tie):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_tiny(tie)).eval()
    base.save_pretrained(tmp_path / "base")
    gen = torch.Generator().manual_seed(1)
    ft = transformers.LlamaForCausalLM(_tiny(tie))
    sd = {}
    for name, w in base.state_dict().items():
        if w.ndim == 2:
            m, n = w.shape
            sd[name] = w + torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen) * 0.05 \
                + 2e-3 * torch.randn(m, n, generator=gen)
        else:
            sd[name] = w + 1e-3 * torch.randn(w.shape, generator=gen)
    ft.load_state_dict(sd)
    ft.save_pretrained(tmp_path / "ft")
    out, adapter_dir = tmp_path / "out", tmp_path / "adapter"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--in-process", "--no-progress", "--method", method, "--rank", "2",
                 "--emit-adapter", str(adapter_dir)]) == 0
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert summary["adapter"]["modules"] == len(cfg["target_modules"]) > 0
    if method == "fixed_rank":
        assert set(cfg["rank_pattern"].values()) == {2}
    elif method == "dg_hard":
        assert set(cfg["rank_pattern"].values()) == {3}  # the planted rank, found by the DG threshold

    repaired = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload().eval()
    got, want = merged.state_dict(), repaired.state_dict()
    base_sd = base.state_dict()
    changed = 0
    for name, w in want.items():
        if w.ndim == 2:  # every 2-D weight is carried by the adapter
            assert torch.allclose(got[name], w, rtol=0, atol=2e-6), name
            changed += int(not torch.equal(got[name], base_sd[name]))
    assert changed >= 14  # q/k/v/o/gate/up/down x 2 layers (+ embeddings / head) really moved
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    unmerged = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                              adapter_dir).eval()
    with torch.no_grad():
        want_logits = repaired(input_ids=ids).logits
        assert (want_logits - base(input_ids=ids).logits).abs().max() > 1e-2  # the repair moved the logits
        assert torch.allclose(merged(input_ids=ids).logits, want_logits, atol=1e-4)
        # unmerged too: with tied embeddings the head must see the repaired embedding as well
        assert torch.allclose(unmerged(input_ids=ids).logits, want_logits, atol=1e-4)
    report = json.loads((adapter_dir / "adapter_export.json").read_text())
    if tie:
        assert cfg["ensure_weight_tying"] is True and "model.embed_tokens" in cfg["modules_to_save"]
        assert report["tied_embedding"]["module"] == "model.embed_tokens"
        assert "model.embed_tokens" not in cfg["target_modules"]
    else:
        assert "ensure_weight_tying" not in cfg and "tied_embedding" not in report


def test_non_linear_tensors_are_reported_not_exportable(tmp_path):
    pair = make_pair(tmp_path)
    summary = _repair(pair, tmp_path / "out", "--emit-adapter", str(tmp_path / "ad"))
    report = json.loads((tmp_path / "ad" / "adapter_export.json").read_text())
    kinds = {r["tensor"]: r["kind"] for r in report["not_exportable"]}
    assert kinds == {"model.layers.0.mlp.experts.down_proj": "experts", "visual.patch_embed.proj.weight": "conv",
                     "model.new_adapter.weight": "passthrough"}  # the last: only in the fine-tune
    assert summary["adapter"]["not_exportable"] == 3
    # fine-tuned values the repair keeps and that differ from the base travel whole (modules_to_save)
    assert report["modules_to_save"] == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm",
                                         "model.small"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    assert not any("frozen" in k for k in keys)  # Δ = 0: nothing to export
