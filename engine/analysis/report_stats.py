"""What `dgrepair report` tabulates, computed from manifest rows only (no I/O).

Layer classes follow the paper's App. I.1 (`mlp.up_proj`, `attn.q_proj`, `embed_tokens`): the
name after the layer index, with attention and MLP module names unified (`self_attn`, `attention`
→ `attn`; `block_sparse_moe`, `feed_forward` → `mlp`), expert indices dropped, Mixtral's
`w1/w3/w2` read as `gate_proj/up_proj/down_proj`, and a fused `experts.gate_up_proj` row named by
its half (`experts.gate_proj` / `experts.up_proj`, from the manifest's `part`). Vision towers keep
a `visual.` prefix so they never mix with the language model's classes.

Per class (over matrices with Δ ≠ 0): the mean noise-energy fraction (share of Σs² at or below the
MP edge), the norm share (the class's Σ‖Δ‖²_F over the run's Σ‖Δ‖²_F) and their product, the
paper's "noise mass".
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from ..output import manifest
from ..output.manifest import ManifestRow
from ..plan.kinds import REPAIR_KINDS
from ..plan.names import canonical

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
GROUPS = {"self_attn": "attn", "attention": "attn", "attn": "attn", "mlp": "mlp", "block_sparse_moe": "mlp",
          "feed_forward": "mlp", "ffn": "mlp"}
LEAVES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
VISION_PREFIXES = ("visual.", "vision_tower.", "vision_model.", "model.vision_tower.", "model.vision_model.")


def layer_index(name: str) -> int | None:
    """The decoder (or vision) block number in a tensor name, or None (embeddings, head, norms)."""
    m = LAYER_RE.search(canonical(name))
    return int(m.group(1)) if m else None


def layer_class(name: str, part: str | None = None) -> str:
    """The App. I.1 class of a tensor (and fused half), e.g. `mlp.experts.up_proj`, `attn.q_proj`."""
    n = canonical(name)
    n = re.sub(r"\.(weight|bias|weight_packed)$", "", n)  # a packed module is classed as its weight
    prefix = "visual." if n.startswith(VISION_PREFIXES) else ""
    m = LAYER_RE.search(n)
    if m:
        rest = n[m.end():]
    else:
        rest = n.split(".", 1)[1] if prefix or n.startswith("model.") else n
    parts = [p for p in rest.split(".") if not p.isdigit()]
    if parts and parts[0] in GROUPS:
        parts[0] = GROUPS[parts[0]]
    if parts and parts[-1] in LEAVES:
        parts[-1] = LEAVES[parts[-1]]
    if parts and parts[-1] == "gate_up_proj" and part:
        parts[-1] = f"{part}_proj"
    return prefix + ".".join(parts)


@dataclass(frozen=True)
class ClassStats:
    """One row of the App. I.1 table."""

    layer_class: str
    matrices: int
    zero_delta: int  # matrices with Δ = 0 (not in the means)
    mean_noise: float
    norm_share: float
    noise_mass: float
    mean_rank_kept: float
    mean_rank_total: float
    rho: float  # energy-weighted: sqrt(Σ‖Δ*‖² / Σ‖Δ‖²) over the class
    max_requant_error: float | None = None  # quantized weights: largest ‖requant(W*) − W*‖_F / ‖W*‖_F of the class


def spectral_rows(rows: list[ManifestRow], plan_id: str | None = None) -> list[ManifestRow]:
    """The last row per matrix (resume semantics) that carries spectral statistics."""
    return [r for r in manifest.latest_by_key(rows).values() if r.kind in REPAIR_KINDS and r.rank_total is not None
            and (plan_id is None or r.plan_id == plan_id)]


def class_table(rows: list[ManifestRow]) -> list[ClassStats]:
    """App. I.1 per class, largest noise mass first (ties by name)."""
    by_class: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        by_class[layer_class(r.tensor, r.part)].append(r)
    total = sum((r.frob_delta or 0.0) ** 2 for r in rows)
    out = []
    for cls, members in by_class.items():
        live = [r for r in members if (r.frob_delta or 0.0) > 0]
        mean_noise = sum(r.noise_energy_fraction or 0.0 for r in live) / len(live) if live else 0.0
        share = sum(r.frob_delta ** 2 for r in live) / total if total > 0 else 0.0
        errors = [r.requant_error for r in members if r.requant_error is not None and not math.isnan(r.requant_error)]
        out.append(ClassStats(cls, len(members), len(members) - len(live), mean_noise, share, mean_noise * share,
                              sum(r.rank_kept or 0 for r in members) / len(members),
                              sum(r.rank_total or 0 for r in members) / len(members), manifest.global_rho(members),
                              max(errors) if errors else None))
    return sorted(out, key=lambda c: (-c.noise_mass, c.layer_class))


def kept_ranks_by_class(rows: list[ManifestRow]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        out[layer_class(r.tensor, r.part)].append(int(r.rank_kept or 0))
    return dict(sorted(out.items()))


def rho_by_layer(rows: list[ManifestRow], group: str | None = None) -> dict[int, float]:
    """Energy-weighted ρ per layer index, over all matrices or one class group (`attn`, `mlp`, ...)."""
    by_layer: dict[int, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        idx = layer_index(r.tensor)
        if idx is None or (group is not None and layer_class(r.tensor, r.part).split(".")[0] != group):
            continue
        by_layer[idx].append(r)
    return {i: manifest.global_rho(rs) for i, rs in sorted(by_layer.items())}


def class_groups(rows: list[ManifestRow]) -> list[str]:
    """Class groups (`attn`, `mlp`, ...) of the rows that carry a layer index."""
    return sorted({layer_class(r.tensor, r.part).split(".")[0] for r in rows if layer_index(r.tensor) is not None})
