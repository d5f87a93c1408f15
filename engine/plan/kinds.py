"""The vocabulary of the plan: what a tensor can be (one `Kind`), the groups of kinds the steps branch
on, and how quantized storage names its companion tensors. Defined once; every module imports it here.

Kinds:
- `svd`: a 2-D matrix repaired as is.
- `conv`: a convolution kernel `[out, in, k...]`, repaired as `[out, in·Πk]`.
- `experts`: a stacked expert tensor `[E, a, b]`, repaired per expert (E matrices, own τ each).
- `experts_fused`: a fused gate/up stack, repaired per expert and per half (plan/layouts.py).
- `fp8`: a block-FP8 weight (F8_E4M3 + `<name>_scale_inv`), dequantised, repaired, re-quantised;
  its scale tensor (`fp8_scale`) is rewritten by the same unit.
- `mxfp4`: an MXFP4 weight (`*_blocks` U8 + `*_scales` U8, gpt-oss), dequantised, repaired per expert
  (gate/up halves split as its fused layout says), re-quantised; its scales (`mxfp4_scales`) go with it.
- `packed_int`: a compressed-tensors `pack-quantized` weight (`X.weight_packed`), dequantised with the scheme
  config.json declares, repaired, re-quantised; its `weight_scale` / `weight_zero_point` / `weight_shape`
  (`packed_aux`) go with it (ADR 0010). A dense fine-tune of a packed base is an `svd` entry whose base is
  dequantised.
- `dequant`: a quantized weight that is not repaired but written as BF16 (`--out-dtype bf16`).
- `passthrough`: keeps the fine-tuned bytes (1-D, small, masked, non-float, fine-tune-only, packed INT4
  with `--packed-int4 passthrough`).
- `refuse`: cannot be repaired correctly by this version; `repair` stops before writing.
"""

from __future__ import annotations

from enum import Enum

from ...kernels.fp8 import BLOCK as FP8_BLOCK


class Kind(str, Enum):
    """A plan entry's kind. A `str` (equal to, hashed and formatted as its value), so it is written to
    the manifest and hashed into the plan id exactly as the plain string."""

    SVD = "svd"
    CONV = "conv"
    EXPERTS = "experts"
    EXPERTS_FUSED = "experts_fused"
    FP8 = "fp8"
    MXFP4 = "mxfp4"
    PACKED_INT = "packed_int"
    FP8_SCALE = "fp8_scale"
    MXFP4_SCALES = "mxfp4_scales"
    PACKED_AUX = "packed_aux"
    DEQUANT = "dequant"
    PASSTHROUGH = "passthrough"
    REFUSE = "refuse"

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


REPAIR_KINDS = (Kind.SVD, Kind.CONV, Kind.EXPERTS, Kind.EXPERTS_FUSED, Kind.FP8, Kind.MXFP4, Kind.PACKED_INT)
SCALE_KINDS = (Kind.FP8_SCALE, Kind.MXFP4_SCALES, Kind.PACKED_AUX)  # rewritten (or dropped) by their weight's unit
QUANTIZED_KINDS = (Kind.FP8, Kind.MXFP4, Kind.DEQUANT)  # dequantised, (repaired,) re-quantised or written as BF16
STACK_KINDS = (Kind.EXPERTS, Kind.EXPERTS_FUSED)  # one manifest row per expert (and half)
ALONE_KINDS = (Kind.EXPERTS, Kind.EXPERTS_FUSED, Kind.CONV, *QUANTIZED_KINDS)  # a work unit of their own

# Quantized storage and its companion tensors.
FP8_SCALE = "_scale_inv"  # block-FP8: `<weight>_scale_inv`, one scale per FP8_BLOCK x FP8_BLOCK block
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"  # MXFP4 (gpt-oss)
INT4_PACKED = "weight_packed"  # compressed-tensors packed INT4/INT8 and its siblings (plan/quantized_int.py)
INT4_FAMILY = (INT4_PACKED, "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
QUANTIZED_SUFFIXES = (*INT4_FAMILY, MX_BLOCKS, MX_SCALES)

__all__ = ["ALONE_KINDS", "FP8_BLOCK", "FP8_SCALE", "INT4_FAMILY", "INT4_PACKED", "Kind", "MX_BLOCKS", "MX_SCALES",
           "QUANTIZED_KINDS", "QUANTIZED_SUFFIXES", "REPAIR_KINDS", "SCALE_KINDS", "STACK_KINDS"]
