"""Mask presets (docs/maths.md, paper App. I.2) and their MoE spellings; include/exclude semantics."""

import pytest

from dgrepair.engine.errors import InputError
from dgrepair.engine.plan.scope import LayerMask

NAMES = {
    "dense_gate": "model.layers.3.mlp.gate_proj.weight",
    "dense_down": "model.layers.3.mlp.down_proj.weight",
    "attn_q": "model.layers.3.self_attn.q_proj.weight",
    "expert_up": "model.layers.3.mlp.experts.17.up_proj.weight",
    "expert_down": "model.layers.3.mlp.experts.17.down_proj.weight",
    "fused": "model.layers.3.mlp.experts.gate_up_proj",
    "mixtral_w1": "model.layers.3.block_sparse_moe.experts.2.w1.weight",
    "mixtral_w2": "model.layers.3.block_sparse_moe.experts.2.w2.weight",
    "mixtral_w3": "model.layers.3.block_sparse_moe.experts.2.w3.weight",
    "shared_gate": "model.layers.3.mlp.shared_experts.gate_proj.weight",
    "router": "model.layers.3.mlp.gate.weight",
    "embed": "model.embed_tokens.weight",
}

EXPECTED = {
    "all": set(NAMES),
    "attn_only": {"attn_q"},
    "mlp_only": set(NAMES) - {"attn_q", "embed"},
    "gate_up": {"dense_gate", "expert_up", "fused", "mixtral_w1", "mixtral_w3", "shared_gate"},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_presets_select_exactly_the_expected_tensors(preset):
    mask = LayerMask(preset)
    assert {k for k, name in NAMES.items() if mask.selects(name)} == EXPECTED[preset]


def test_include_and_exclude_compose_with_the_preset():
    mask = LayerMask("mlp_only", include=(r"experts\.",), exclude=(r"down_proj", r"\.w2\."))
    chosen = {k for k, name in NAMES.items() if mask.selects(name)}
    assert chosen == {"expert_up", "fused", "mixtral_w1", "mixtral_w3", "shared_gate"}


def test_bad_preset_or_regex_is_a_clear_error():
    with pytest.raises(InputError, match="unknown mask preset 'mlp'"):
        LayerMask("mlp")
    with pytest.raises(InputError, match="invalid regular expression"):
        LayerMask("all", exclude=("(",))
