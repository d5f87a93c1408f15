"""A repaired tiny LLaMA checkpoint loads with transformers and runs; its weights and logits match a
model built from the float64 reference repair."""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch

transformers = pytest.importorskip("transformers")

from dgrepair.cli import main  # noqa: E402


def tiny_config():
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)


def test_repaired_llama_loads_and_matches_reference_forward(tmp_path):
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(tiny_config()).eval()
    base_model.save_pretrained(tmp_path / "base", safe_serialization=True)
    base_sd = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    ft_sd = {}
    for name, w in base_sd.items():
        if w.ndim == 2:
            m, n = w.shape
            signal = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen) * 0.05
            ft_sd[name] = w + signal + 2e-3 * torch.randn(m, n, generator=gen)
        else:
            ft_sd[name] = w + 1e-3 * torch.randn(w.shape, generator=gen)
    ft_model = transformers.LlamaForCausalLM(tiny_config())
    ft_model.load_state_dict(ft_sd)
    ft_model.save_pretrained(tmp_path / "ft", safe_serialization=True)

    out = tmp_path / "repaired"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process"]) == 0
    repaired = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # the real client

    # Expected weights: docs/maths.md via the float64 numpy reference; 1-D and small tensors keep the fine-tune.
    expected = {}
    saved_ft = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft").state_dict()
    for name, w1 in saved_ft.items():
        w0 = base_sd[name]
        if w1.ndim >= 2 and w1.numel() >= 1024:
            d_star, rank, _ = reference.dg_hard((w1.float() - w0.float()).numpy())
            assert rank == 2, name
            expected[name] = torch.from_numpy((w0.double().numpy() + d_star).astype(np.float32))
        else:
            expected[name] = w1
    got = repaired.state_dict()
    for name, want in expected.items():
        assert torch.allclose(got[name], want, rtol=0, atol=1e-6), name
    reference_model = transformers.LlamaForCausalLM(tiny_config()).eval()
    reference_model.load_state_dict(expected)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    with torch.no_grad():
        logits = repaired(input_ids=ids).logits
        want_logits = reference_model(input_ids=ids).logits
        ft_logits = ft_model.eval()(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, want_logits, atol=1e-4)
    assert not torch.allclose(logits, ft_logits, atol=1e-4)  # the repair changed the model
