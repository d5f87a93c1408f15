"""How a stored tensor maps to the batch of matrices DG-Hard repairs, and back (docs/maths.md).

- `svd`: a 2-D matrix, one matrix.
- `conv`: `[out, in, k...]` as one `[out, in·Πk]` matrix.
- `experts`: `[E, a, b]`, E matrices.
- `experts_fused`: a fused gate/up stack, 2E matrices (each expert's gate and up halves separately,
  so the result equals the per-expert 2-D layout's bit for bit). Layouts (docs/formats.md):
  `out_in_concat` `[E, 2I, H]`, rows gate then up (transformers v5, Qwen3.5);
  `in_out_concat` `[E, H, 2I]`, columns gate then up (Llama-4);
  `in_out_interleaved` `[E, H, 2I]`, gate = even columns, up = odd columns (gpt-oss in memory);
  `out_in_interleaved` `[E, 2I, H]`, gate = even rows, up = odd rows (gpt-oss MXFP4 on disk).
Matrices come out in the order expert 0 gate, expert 0 up, expert 1 gate, ...
"""

from __future__ import annotations

import re

import torch

from .kinds import Kind

FUSED_GATE_UP = re.compile(r"(^|\.)experts\.gate_up_proj(\.weight)?$")  # anchored: not shared_experts.*
FUSED_LAYOUTS = ("out_in_concat", "in_out_concat", "in_out_interleaved", "out_in_interleaved")
FUSED_PARTS = ("gate", "up")
MODEL_TYPE_LAYOUTS = {"gpt_oss": "in_out_interleaved", "llama4": "in_out_concat", "llama4_text": "in_out_concat"}


def fused_layout_for(requested: str, model_type: str | None) -> tuple[str, bool]:
    """(layout, assumed): `auto` follows config.json's model_type; unknown types use the v5 layout."""
    if requested != "auto":
        return requested, False
    if model_type in MODEL_TYPE_LAYOUTS:
        return MODEL_TYPE_LAYOUTS[model_type], False
    return "out_in_concat", model_type is None


def fused_matrix_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int] | None:
    """Shape of each half, or None when the fused axis is odd (not a gate/up pair)."""
    e, a, b = shape
    if layout in ("out_in_concat", "out_in_interleaved"):
        return (a // 2, b) if a % 2 == 0 else None
    return (a, b // 2) if b % 2 == 0 else None


def to_matrices(t: torch.Tensor, kind: str, matrix_shape: tuple[int, int], layout: str | None) -> torch.Tensor:
    """The stored tensor as a (B, m, n) batch (a view where possible)."""
    m, n = matrix_shape
    if kind != Kind.EXPERTS_FUSED:
        return t.reshape(-1, m, n)
    e = t.shape[0]
    if layout == "out_in_concat":  # [E, 2I, H]: rows [gate; up]
        return t.reshape(e * 2, m, n)
    if layout == "out_in_interleaved":  # [E, 2I, H]: rows g0 u0 g1 u1 ...
        return t.reshape(e, m, 2, n).permute(0, 2, 1, 3).reshape(e * 2, m, n)
    if layout == "in_out_concat":  # [E, H, 2I]: columns [gate | up]
        return t.reshape(e, m, 2, n).permute(0, 2, 1, 3).reshape(e * 2, m, n)
    if layout == "in_out_interleaved":  # [E, H, 2I]: columns g0 u0 g1 u1 ...
        return t.reshape(e, m, n, 2).permute(0, 3, 1, 2).reshape(e * 2, m, n)
    raise ValueError(f"unknown fused layout {layout!r}")


def from_matrices(mats: torch.Tensor, kind: str, shape: tuple[int, ...], layout: str | None) -> torch.Tensor:
    """Inverse of `to_matrices`: the (B, m, n) batch back in the stored layout, contiguous."""
    if kind != Kind.EXPERTS_FUSED or layout == "out_in_concat":
        return mats.reshape(shape).contiguous()
    e, h, two_i = shape
    m, n = mats.shape[1:]
    if layout == "out_in_interleaved":
        return mats.reshape(e, 2, m, n).permute(0, 2, 1, 3).reshape(e, h, two_i).contiguous()
    if layout == "in_out_concat":
        return mats.reshape(e, 2, m, n).permute(0, 2, 1, 3).reshape(e, h, two_i).contiguous()
    if layout == "in_out_interleaved":
        return mats.reshape(e, 2, m, n).permute(0, 2, 3, 1).reshape(e, h, two_i).contiguous()
    raise ValueError(f"unknown fused layout {layout!r}")


def row_identity(kind: str, index: int) -> tuple[int | None, str | None]:
    """(expert, part) of matrix `index` of a batch, as recorded in the manifest."""
    if kind == Kind.EXPERTS:
        return index, None
    if kind == Kind.EXPERTS_FUSED:
        return index // 2, FUSED_PARTS[index % 2]
    return None, None
