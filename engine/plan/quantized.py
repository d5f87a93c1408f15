"""Planning of quantized tensors: block-FP8 weights with `_scale_inv`, MXFP4 `_blocks`/`_scales` pairs,
compressed-tensors packed INT4 families (docs/formats.md, ADR 0002 and 0008), and how `--out-dtype
bf16` rewrites their plan entries. Headers only; no tensor data.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import RepairConfig
from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import FLOAT_DTYPES_REPAIRABLE, TensorEntry
from .kinds import FP8_BLOCK, FP8_SCALE, INT4_FAMILY, INT4_PACKED, MX_BLOCKS, MX_SCALES, SCALE_KINDS, Kind
from .layouts import FUSED_GATE_UP, fused_matrix_shape
from .model import Classification, PlanEntry


def fp8_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """The block-scale grid of a 2-D FP8 weight (ragged edge blocks included)."""
    return (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))


def classify_fp8(t: TensorEntry, b: TensorEntry | None, base_name: str | None, ft: Checkpoint, base: Checkpoint,
                 cfg: RepairConfig, in_mask: bool) -> Classification:
    """Block-FP8 weights and their `_scale_inv` companions; anything else FP8 is refused."""
    if t.name.endswith(FP8_SCALE):
        weight = t.name[: -len(FP8_SCALE)]
        if weight in ft.locations and ft.entry(weight)[1].dtype == "F8_E4M3":
            return Classification(Kind.FP8_SCALE, f"block scales of {weight}, rewritten with it", companion=weight)
        return Classification(Kind.PASSTHROUGH, "scale of a non-FP8 tensor")
    scale = t.name + FP8_SCALE
    if len(t.shape) != 2 or scale not in ft.locations:
        return Classification(Kind.REFUSE, f"{t.dtype} tensor without a 2-D weight + {FP8_SCALE} block-scale pair "
                              "is not supported")
    grid = fp8_grid(t.shape)
    if ft.entry(scale)[1].shape != grid or ft.entry(scale)[1].dtype not in ("F32", "BF16"):
        return Classification(Kind.REFUSE, f"{scale} must be F32 or BF16 of shape {list(grid)} "
                              f"({FP8_BLOCK}x{FP8_BLOCK} blocks)")
    if b is None:
        return Classification(Kind.PASSTHROUGH, "fine-tune only", companion=scale)
    base_scale = None
    if b.dtype == "F8_E4M3":
        base_scale = (base_name or t.name) + FP8_SCALE
        if base_scale not in base.locations or base.entry(base_scale)[1].shape != grid:
            return Classification(Kind.REFUSE, f"base FP8 weight has no matching {FP8_SCALE} block scales")
    elif b.dtype not in FLOAT_DTYPES_REPAIRABLE:
        return Classification(Kind.REFUSE, f"base dtype {b.dtype} cannot be paired with an FP8 fine-tune")
    if t.numel < cfg.scope.min_numel or not in_mask:
        return Classification(Kind.PASSTHROUGH, "FP8 weight kept (numel < min_numel or outside mask)",
                              companion=scale)
    return Classification(Kind.FP8, "block-FP8 weight: dequantised, repaired, re-quantised to the same layout",
                          (t.shape[0], t.shape[1]), 1, companion=scale, base_companion=base_scale)


def fp8_base(t: TensorEntry, b: TensorEntry, base_name: str | None, base: Checkpoint,
             dense: Classification) -> Classification:
    """A dense fine-tune of a block-FP8 base (a BF16 fine-tune of DeepSeek-V3): repaired as usual, the base
    dequantised with its own `_scale_inv`. `dense` is the classification as if the base were dense."""
    scale = (base_name or t.name) + FP8_SCALE
    if dense.kind == Kind.PASSTHROUGH:  # its scales are accounted for, not reported as base-only
        return dataclasses.replace(dense, base_companion=scale if scale in base.locations else None)
    if dense.kind != Kind.SVD or len(b.shape) != 2 or scale not in base.locations \
            or base.entry(scale)[1].shape != fp8_grid(b.shape):
        return Classification(Kind.REFUSE, f"base is block-FP8 but has no {FP8_BLOCK}x{FP8_BLOCK} {FP8_SCALE} block "
                              "scales for this 2-D weight; dequantize the base to BF16 first")
    return dataclasses.replace(dense, reason=f"{dense.reason}; base block-FP8, dequantised with its {FP8_SCALE}",
                               base_companion=scale)


def classify_mxfp4(t: TensorEntry, b: TensorEntry | None, base_name: str | None, ft: Checkpoint, base: Checkpoint,
                   cfg: RepairConfig, in_mask: bool) -> Classification:
    """MXFP4 `*_blocks` / `*_scales` pairs (gpt-oss). On disk a block tensor is (out, in); a fused
    `gate_up_proj` interleaves gate and up along its out rows (docs/formats.md)."""
    stem = t.name[: -len(MX_BLOCKS)] if t.name.endswith(MX_BLOCKS) else t.name[: -len(MX_SCALES)]
    blocks_name, scales_name = stem + MX_BLOCKS, stem + MX_SCALES
    if t.name == scales_name:
        if blocks_name in ft.locations:
            return Classification(Kind.MXFP4_SCALES, f"MXFP4 scales of {blocks_name}, rewritten with it",
                                  companion=blocks_name)
        return Classification(Kind.REFUSE, f"MXFP4 scales without their {blocks_name} tensor")
    if scales_name not in ft.locations:
        return Classification(Kind.REFUSE, f"MXFP4 blocks without their {scales_name} tensor")
    sc = ft.entry(scales_name)[1]
    if t.dtype != "U8" or sc.dtype != "U8" or len(t.shape) not in (3, 4) or t.shape[-1] != 16 \
            or sc.shape != t.shape[:-1]:
        return Classification(Kind.REFUSE, f"MXFP4 pair must be U8 blocks [..., out, in/32, 16] with U8 scales "
                              f"[..., out, in/32]; got {t.dtype}{list(t.shape)} and {sc.dtype}{list(sc.shape)} "
                              f"({scales_name})")
    if b is None:
        return Classification(Kind.PASSTHROUGH, "fine-tune only", companion=scales_name)
    base_scales = mx_partner(base_name)
    if b.shape != t.shape or b.dtype != "U8" or base_scales not in base.locations \
            or base.entry(base_scales)[1].shape != sc.shape:
        return Classification(Kind.REFUSE, "the base must store the same MXFP4 blocks/scales pair (same shapes); "
                              "dequantize both checkpoints to BF16 first")
    logical = mx_logical_shape(t.shape)
    if math.prod(logical) < cfg.scope.min_numel or not in_mask:
        return Classification(Kind.PASSTHROUGH, "MXFP4 weight kept (numel < min_numel or outside mask)",
                              companion=scales_name)
    pair = {"companion": scales_name, "base_companion": base_scales}
    if len(logical) == 2:
        return Classification(Kind.MXFP4, "MXFP4 matrix: dequantised, repaired, re-quantised", logical, 1, **pair)
    e, rows, cols = logical
    if FUSED_GATE_UP.search(stem):
        layout = cfg.formats.fused_layout if cfg.formats.fused_layout != "auto" else "out_in_interleaved"
        mshape = fused_matrix_shape(logical, layout)
        if mshape is None:
            return Classification(Kind.REFUSE, f"fused MXFP4 gate/up stack {list(logical)} has an odd fused axis")
        return Classification(Kind.MXFP4, f"MXFP4 fused gate/up stack of {e} experts, {layout}: dequantised, "
                              "repaired per expert and half, re-quantised", mshape, 2 * e, layout=layout, **pair)
    return Classification(Kind.MXFP4, f"MXFP4 expert stack of {e}: dequantised, repaired per expert, re-quantised",
                          (rows, cols), e, **pair)


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
    if e.kind in SCALE_KINDS or (e.kind == Kind.PASSTHROUGH and e.name.endswith((FP8_SCALE, MX_SCALES))
                                 and e.companion is not None):
        return dataclasses.replace(e, dropped=True, kind=e.kind if e.kind in SCALE_KINDS else
                                   (Kind.FP8_SCALE if e.name.endswith(FP8_SCALE) else Kind.MXFP4_SCALES),
                                   reason=f"scales of {e.companion}, dropped: the weight is written as BF16")
    if e.packed is not None and e.kind in (Kind.PACKED_INT, Kind.PASSTHROUGH):  # compressed-tensors -> `X.weight`
        kind, reason = (Kind.DEQUANT, f"{e.reason}; dequantised, not repaired") if e.kind == Kind.PASSTHROUGH else \
            (e.kind, e.reason)
        return dataclasses.replace(e, kind=kind, out_dtype="BF16", out_shape=e.packed.shape,
                                   out_name=e.packed.dense_name, reason=f"{reason}; written as BF16 "
                                   f"{e.packed.dense_name} {list(e.packed.shape)}")
    is_fp8 = e.ft.dtype == "F8_E4M3" and e.companion is not None
    is_mx = e.name.endswith(MX_BLOCKS) and e.companion is not None
    if not (is_fp8 or is_mx) or e.kind == Kind.REFUSE:
        return e
    kind, reason = e.kind, e.reason
    if kind == Kind.PASSTHROUGH:
        kind, reason = Kind.DEQUANT, f"{reason}; dequantised, not repaired"
    if is_fp8:
        return dataclasses.replace(e, kind=kind, reason=f"{reason}; written as BF16", out_dtype="BF16")
    logical = mx_logical_shape(e.ft.shape)
    shape = (logical[0], logical[2], logical[1]) if len(logical) == 3 else logical
    name = e.name[: -len(MX_BLOCKS)]
    return dataclasses.replace(e, kind=kind, out_dtype="BF16", out_shape=shape, out_name=name,
                               reason=f"{reason}; written as BF16 {name} {list(shape)}"
                                      + (" (in, out), as transformers holds it" if len(shape) == 3 else ""))
