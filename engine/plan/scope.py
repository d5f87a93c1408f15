"""Which tensors DG-Hard touches (docs/maths.md): layer-mask presets and include/exclude patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

# Paper App. I.2 presets, widened to the MoE spellings (per-expert, fused and Mixtral w1/w2/w3).
MASK_PRESETS: dict[str, str | None] = {
    "all": None,
    "mlp_only": r"\.mlp\.|\.block_sparse_moe\.|\.feed_forward\.",
    "attn_only": r"\.self_attn\.",
    "gate_up": (r"\.mlp\.(gate|up)_proj"
                r"|\.experts\.(\d+\.)?(gate_proj|up_proj|gate_up_proj)\b"
                r"|\.shared_experts?\.(gate|up)_proj"
                r"|\.experts\.\d+\.w[13]\."),
}


@dataclass(frozen=True)
class LayerMask:
    """A compiled mask: preset AND (any include) AND NOT (any exclude), all by `re.search`."""

    preset: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.preset not in MASK_PRESETS:
            raise InputError(f"unknown mask preset {self.preset!r}; choose one of {', '.join(MASK_PRESETS)}.")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"invalid regular expression {pattern!r} in include/exclude: {exc}.") from exc

    def excluded(self, name: str) -> bool:
        """An --exclude pattern matches: the fine-tuned value is kept whatever the base holds."""
        return any(re.search(p, name) for p in self.exclude)

    def selects(self, name: str) -> bool:
        preset = MASK_PRESETS[self.preset]
        if preset is not None and not re.search(preset, name):
            return False
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not self.excluded(name)
