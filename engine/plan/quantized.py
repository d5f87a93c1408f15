"""Planning of quantized tensors (SPEC §4, ADR 0002 and 0006): block-FP8 weights with `_scale_inv`,
MXFP4 `_blocks`/`_scales` pairs, compressed-tensors packed INT4 families, and how `--out-dtype bf16`
rewrites their plan entries. Headers only; no tensor data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from ..config import RepairConfig
from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import FLOAT_DTYPES_REPAIRABLE, TensorEntry
from .layouts import FUSED_GATE_UP, fused_matrix_shape

if TYPE_CHECKING:
    from .build import PlanEntry

SCALE_KINDS = ("fp8_scale", "mxfp4_scales")  # rewritten (or dropped) by their weight's unit
FP8_SCALE = "_scale_inv"
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
INT4_PACKED = "weight_packed"
INT4_FAMILY = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def classify_fp8(t: TensorEntry, b: TensorEntry | None, base_name: str | None, ft: Checkpoint, base: Checkpoint,
                 cfg: RepairConfig, in_mask: bool) -> tuple:
    """Block-FP8 weights and their `_scale_inv` companions (SPEC §4); anything else FP8 is refused."""
    refuse = ("refuse",)
    if t.name.endswith(FP8_SCALE):
        weight = t.name[: -len(FP8_SCALE)]
        if weight in ft.locations and ft.entry(weight)[1].dtype == "F8_E4M3":
            return ("fp8_scale", f"block scales of {weight}, rewritten with it", None, 0, weight, None)
        return ("passthrough", "scale of a non-FP8 tensor", None, 0, None, None)
    scale = t.name + FP8_SCALE
    if len(t.shape) != 2 or scale not in ft.locations:
        return (*refuse, f"{t.dtype} tensor without a 2-D weight + {FP8_SCALE} block-scale pair is not supported",
                None, 0, None, None)
    grid = (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
    if ft.entry(scale)[1].shape != grid or ft.entry(scale)[1].dtype not in ("F32", "BF16"):
        return (*refuse, f"{scale} must be F32 or BF16 of shape {list(grid)} (128x128 blocks)", None, 0, None, None)
    if b is None:
        return ("passthrough", "fine-tune only", None, 0, scale, None)
    base_scale = None
    if b.dtype == "F8_E4M3":
        base_scale = (base_name or t.name) + FP8_SCALE
        if base_scale not in base.locations or base.entry(base_scale)[1].shape != grid:
            return (*refuse, f"base FP8 weight has no matching {FP8_SCALE} block scales", None, 0, None, None)
    elif b.dtype not in FLOAT_DTYPES_REPAIRABLE:
        return (*refuse, f"base dtype {b.dtype} cannot be paired with an FP8 fine-tune", None, 0, None, None)
    if t.numel < cfg.min_numel or not in_mask:
        return ("passthrough", "FP8 weight kept (numel < min_numel or outside mask)", None, 0, scale, None)
    return ("fp8", "block-FP8 weight: dequantised, repaired, re-quantised to the same layout",
            (t.shape[0], t.shape[1]), 1, scale, base_scale)


def fp8_base(t: TensorEntry, b: TensorEntry, base_name: str | None, base: Checkpoint, dense: tuple) -> tuple:
    """A dense fine-tune of a block-FP8 base (a BF16 fine-tune of DeepSeek-V3): repaired as usual, the base
    dequantised with its own `_scale_inv`. `dense` is the classification as if the base were dense."""
    kind, reason, mshape, count = dense
    scale = (base_name or t.name) + FP8_SCALE
    if kind == "passthrough":  # its scales are accounted for, not reported as base-only
        return (*dense, scale if scale in base.locations else None)
    if kind != "svd" or len(b.shape) != 2 or scale not in base.locations \
            or base.entry(scale)[1].shape != (-(-b.shape[0] // 128), -(-b.shape[1] // 128)):
        return ("refuse", f"base is block-FP8 but has no 128x128 {FP8_SCALE} block scales for this 2-D weight; "
                "dequantize the base to BF16 first", None, 0, None)
    return (kind, f"{reason}; base block-FP8, dequantised with its {FP8_SCALE}", mshape, count, scale)


def classify_mxfp4(t: TensorEntry, b: TensorEntry | None, base_name: str | None, ft: Checkpoint, base: Checkpoint,
                   cfg: RepairConfig, in_mask: bool) -> tuple:
    """MXFP4 `*_blocks` / `*_scales` pairs (gpt-oss). On disk a block tensor is (out, in); a fused
    `gate_up_proj` interleaves gate and up along its out rows (research/formats.md §2)."""
    none = (None, 0, None, None, None)
    stem = t.name[: -len(MX_BLOCKS)] if t.name.endswith(MX_BLOCKS) else t.name[: -len(MX_SCALES)]
    blocks_name, scales_name = stem + MX_BLOCKS, stem + MX_SCALES
    if t.name == scales_name:
        if blocks_name in ft.locations:
            return ("mxfp4_scales", f"MXFP4 scales of {blocks_name}, rewritten with it", None, 0, blocks_name,
                    None, None)
        return ("refuse", f"MXFP4 scales without their {blocks_name} tensor", *none)
    if scales_name not in ft.locations:
        return ("refuse", f"MXFP4 blocks without their {scales_name} tensor", *none)
    sc = ft.entry(scales_name)[1]
    if t.dtype != "U8" or sc.dtype != "U8" or len(t.shape) not in (3, 4) or t.shape[-1] != 16 \
            or sc.shape != t.shape[:-1]:
        return ("refuse", f"MXFP4 pair must be U8 blocks [..., out, in/32, 16] with U8 scales [..., out, in/32]; "
                f"got {t.dtype}{list(t.shape)} and {sc.dtype}{list(sc.shape)} ({scales_name})", *none)
    if b is None:
        return ("passthrough", "fine-tune only", None, 0, scales_name, None, None)
    base_scales = mx_partner(base_name)
    if b.shape != t.shape or b.dtype != "U8" or base_scales not in base.locations \
            or base.entry(base_scales)[1].shape != sc.shape:
        return ("refuse", "the base must store the same MXFP4 blocks/scales pair (same shapes); dequantize both "
                "checkpoints to BF16 first", *none)
    logical = mx_logical_shape(t.shape)
    if math.prod(logical) < cfg.min_numel or not in_mask:
        return ("passthrough", "MXFP4 weight kept (numel < min_numel or outside mask)", None, 0, scales_name,
                None, None)
    if len(logical) == 2:
        return ("mxfp4", "MXFP4 matrix: dequantised, repaired, re-quantised", logical, 1, scales_name, base_scales,
                None)
    e, rows, cols = logical
    if FUSED_GATE_UP.search(stem):
        layout = cfg.fused_layout if cfg.fused_layout != "auto" else "out_in_interleaved"
        mshape = fused_matrix_shape(logical, layout)
        if mshape is None:
            return ("refuse", f"fused MXFP4 gate/up stack {list(logical)} has an odd fused axis", *none)
        return ("mxfp4", f"MXFP4 fused gate/up stack of {e} experts, {layout}: dequantised, repaired per expert "
                "and half, re-quantised", mshape, 2 * e, scales_name, base_scales, layout)
    return ("mxfp4", f"MXFP4 expert stack of {e}: dequantised, repaired per expert, re-quantised", (rows, cols), e,
            scales_name, base_scales, None)


def is_int4_family(name: str, ft: Checkpoint) -> bool:
    """A compressed-tensors packed-INT4 module's tensors (`weight_packed` and its siblings)."""
    for suffix in INT4_FAMILY:
        if name.endswith(suffix):
            return name[: -len(suffix)] + INT4_PACKED in ft.locations
    return False


def mx_logical_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[..., rows, cols/32, 16] U8 -> [..., rows, cols]."""
    return (*blocks_shape[:-2], blocks_shape[-2] * 32)


def mx_partner(name: str | None) -> str | None:
    """The `_scales` name of a `_blocks` name."""
    return name[: -len(MX_BLOCKS)] + MX_SCALES if name and name.endswith(MX_BLOCKS) else None


def to_bf16(e: PlanEntry) -> PlanEntry:
    """--out-dtype bf16: quantized weights are written as BF16 (repaired or not); their scales are dropped."""
    if e.kind in SCALE_KINDS or (e.kind == "passthrough" and e.name.endswith((FP8_SCALE, MX_SCALES))
                                 and e.companion is not None):
        return dataclasses.replace(e, dropped=True, kind=e.kind if e.kind in SCALE_KINDS else
                                   ("fp8_scale" if e.name.endswith(FP8_SCALE) else "mxfp4_scales"),
                                   reason=f"scales of {e.companion}, dropped: the weight is written as BF16")
    is_fp8 = e.ft.dtype == "F8_E4M3" and e.companion is not None
    is_mx = e.name.endswith(MX_BLOCKS) and e.companion is not None
    if not (is_fp8 or is_mx) or e.kind == "refuse":
        return e
    kind, reason = e.kind, e.reason
    if kind == "passthrough":
        kind, reason = "dequant", f"{reason}; dequantised, not repaired"
    if is_fp8:
        return dataclasses.replace(e, kind=kind, reason=f"{reason}; written as BF16", out_dtype="BF16")
    logical = mx_logical_shape(e.ft.shape)
    shape = (logical[0], logical[2], logical[1]) if len(logical) == 3 else logical
    name = e.name[: -len(MX_BLOCKS)]
    return dataclasses.replace(e, kind=kind, out_dtype="BF16", out_shape=shape, out_name=name,
                               reason=f"{reason}; written as BF16 {name} {list(shape)}"
                                      + (" (in, out), as transformers holds it" if len(shape) == 3 else ""))
