"""Plan a repair from headers only: pair tensors by name, classify, validate, estimate, hash.

The kinds a tensor can get are listed in plan/kinds.py; the records the plan is made of in plan/model.py.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ..config import RepairConfig
from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import DTYPE_BITS, FLOAT_DTYPES_REPAIRABLE, TensorEntry, output_prefix
from .kinds import FP8_SCALE, INT4_PACKED, MX_BLOCKS, MX_SCALES, QUANTIZED_KINDS, QUANTIZED_SUFFIXES, SCALE_KINDS, Kind
from .layouts import FUSED_GATE_UP, fused_layout_for, fused_matrix_shape
from .model import Classification, Plan, PlanEntry
from .names import EMBEDDING, HEAD, base_partner, canonical
from .out_layout import output_layout
from .quantized import classify_fp8, classify_mxfp4, fp8_base, is_int4_family, to_bf16
from .quantized_int import classify_packed, compressed_config, packed_base
from .scope import LayerMask

QUANTIZED_DTYPES = tuple(d for d in DTYPE_BITS if d.startswith(("F8_", "F6_")) or d == "F4")
EXPERT_STACK = re.compile(r"(^|\.)experts\.(gate_proj|up_proj|down_proj|w1|w2|w3|gate_up_proj)(\.weight)?$")


def build_plan(base: Checkpoint, ft: Checkpoint, cfg: RepairConfig) -> Plan:
    """Pair and classify every fine-tune tensor; headers only."""
    mask = LayerMask(cfg.scope.mask, cfg.scope.include, cfg.scope.exclude)
    rules = cfg.scope.treat_as_rules()
    entries: list[PlanEntry] = []
    mismatches: list[str] = []
    base_names = {canonical(n): n for n in sorted(base.locations)}
    base_names.update({n: n for n in base.locations if canonical(n) == n})  # exact names win a collision
    used: set[str] = set()
    model_type, ue8m0 = ft.model_type, ft.scale_fmt == "ue8m0"  # config.json, read once
    ccs = (compressed_config(ft), compressed_config(base))
    for shard_name, header in sorted(ft.shards.items()):
        shift = len(output_prefix(header)) - header.data_start
        for t in sorted(header.tensors.values(), key=lambda e: e.begin):
            base_name, note = base_partner(t.name, base.locations, base_names)
            base_shard = base.locations.get(base_name) if base_name else None
            b = base.shards[base_shard].tensors[base_name] if base_shard and base_name else None
            resized = None
            if b is not None and b.shape != t.shape and not mask.excluded(t.name):
                if _is_vocab_growth(t, b):
                    resized = b.shape[0]
                else:
                    mismatches.append(f"tensor {t.name!r}: shape {list(b.shape)} in {base.root / base_shard} but "
                                      f"{list(t.shape)} in {ft.root / shard_name}; the checkpoints are not a base/"
                                      "fine-tune pair for this tensor (keep the fine-tune's value with --exclude "
                                      f"'^{re.escape(t.name)}$', or fix the inputs)")
            if base_name:
                used.add(base_name)
            c = _classify(t, b, cfg, mask.selects(t.name), rules)
            pc = None
            if t.dtype == "F8_E4M3" or t.name.endswith(FP8_SCALE):
                c = classify_fp8(t, b, base_name, ft, base, cfg, mask.selects(t.name))
            elif is_int4_family(t.name, ft):
                pc = classify_packed(t, base_name if b is not None else None, ft, base,
                                     cfg.formats.packed_int4 == "passthrough", cfg.scope.min_numel,
                                     mask.selects(t.name), ccs)
            elif t.name.endswith((MX_BLOCKS, MX_SCALES)):
                c = classify_mxfp4(t, b, base_name, ft, base, cfg, mask.selects(t.name))
            elif b is not None and b.dtype == "F8_E4M3" and t.dtype in FLOAT_DTYPES_REPAIRABLE:
                c = fp8_base(t, b, base_name, base, _classify(t, dataclasses.replace(b, dtype="F32"), cfg,
                                                              mask.selects(t.name), rules))
            if pc is None and b is None and not is_int4_family(t.name, ft):  # a dense fine-tune of a packed base
                sel = mask.selects(t.name)
                pc = packed_base(t, base, ccs[1], lambda stand_in, t=t, sel=sel: _classify(t, stand_in, cfg, sel,
                                                                                             rules))
            if pc is not None:
                c = Classification(pc.kind, pc.reason, pc.matrix_shape, pc.count, companion=pc.companion,
                                   base_companion=pc.base_companion)
                if pc.base_name is not None:
                    base_name, b = pc.base_name, base.entry(pc.base_name)[1]
                    base_shard = base.locations[base_name]
                    used.update({base_name, *(pc.base_packed.names if pc.base_packed else ())})
            if c.kind == Kind.EXPERTS_FUSED:
                layout, assumed = fused_layout_for(cfg.formats.fused_layout, model_type)
                mshape = fused_matrix_shape(t.shape, layout)
                if mshape is None:
                    c = dataclasses.replace(c, kind=Kind.REFUSE, layout=layout, reason=(
                        f"fused gate/up stack {list(t.shape)} has an odd fused axis for layout {layout}; set "
                        "--fused-layout or exclude it"))
                else:
                    c = dataclasses.replace(c, matrix_shape=mshape, layout=layout, reason=(
                        f"fused gate/up stack of {t.shape[0]} experts, {layout}"
                        f"{' (assumed: no model_type in config.json)' if assumed else ''}; repaired per "
                        "expert and half"))
            if resized is not None and c.kind == Kind.SVD:
                c = dataclasses.replace(c, matrix_shape=(resized, t.shape[1]), reason=(
                    f"resized vocabulary: rows 0-{resized - 1} repaired, {t.shape[0] - resized} new rows "
                    "copied from the fine-tune"))
            if note and c.kind != Kind.PASSTHROUGH:
                c = dataclasses.replace(c, reason=f"{c.reason}; {note}")
            entries.append(PlanEntry(t.name, c.kind, c.reason, shard_name, t, base_shard, b, c.matrix_shape,
                                     c.n_matrices, out_begin=t.begin + shift, layout=c.layout, base_name=base_name,
                                     resized_rows=resized if c.kind == Kind.SVD else None, companion=c.companion,
                                     base_companion=c.base_companion,
                                     base_scale=base.entry(c.base_companion)[1] if c.base_companion else None,
                                     power_of_two_scales=ue8m0, packed=pc.packed if pc else None,
                                     base_packed=pc.base_packed if pc else None))
    if cfg.formats.out_dtype == "bf16":
        entries = [to_bf16(e) for e in entries]
    rewritten = {e.name for e in entries if e.kind in (*QUANTIZED_KINDS, Kind.PACKED_INT)}
    entries = [dataclasses.replace(e, kind=Kind.PASSTHROUGH, reason=f"{_companion_word(e.kind)} of {e.companion}, "
                                   "kept with it")
               if e.kind in SCALE_KINDS and e.companion not in rewritten else e for e in entries]
    base_only = sorted(set(base.locations) - used - {e.base_companion for e in entries if e.base_companion})
    entries, out_shards, changed = output_layout(entries, ft)
    quantized_left = any(e.kind != Kind.REFUSE and (e.ft.dtype.startswith(("F8_", "F4")) or e.name.endswith(
        (MX_BLOCKS, INT4_PACKED))) and not e.dropped and e.out_dtype is None for e in entries)
    return Plan(entries=entries, base_only=base_only, shape_mismatches=mismatches,
                config=cfg.output_affecting(), fingerprints={"base": base.fingerprint(), "ft": ft.fingerprint()},
                out_shards=out_shards, layout_changed=changed,
                drop_quantization_config=cfg.formats.out_dtype == "bf16" and changed and not quantized_left)


def _companion_word(kind: str) -> str:
    return "companion" if kind == Kind.PACKED_AUX else "block scales"


def _is_vocab_growth(t: TensorEntry, b: TensorEntry) -> bool:
    """A fine-tune that added tokens: same width, more rows, in an embedding or head."""
    return (len(t.shape) == 2 and len(b.shape) == 2 and t.shape[1] == b.shape[1] and t.shape[0] > b.shape[0]
            and canonical(t.name) in (HEAD, EMBEDDING))


def _classify(t: TensorEntry, b: TensorEntry | None, cfg: RepairConfig, in_mask: bool,
              rules: tuple = ()) -> Classification:
    if t.dtype in QUANTIZED_DTYPES or t.name.endswith(QUANTIZED_SUFFIXES):
        return Classification(Kind.REFUSE, f"quantized storage ({t.dtype}) is not supported by this version; "
                              "dequantize the checkpoints to BF16 first")
    if b is None:
        return Classification(Kind.PASSTHROUGH, "fine-tune only")
    if t.dtype not in FLOAT_DTYPES_REPAIRABLE or b.dtype not in FLOAT_DTYPES_REPAIRABLE:
        if (t.dtype in ("F64", "C64") or b.dtype in ("F64", "C64")) and in_mask:
            return Classification(Kind.REFUSE, f"dtype {b.dtype} (base) -> {t.dtype} (fine-tune): only F32, F16 and "
                                  "BF16 weights are repaired; convert both checkpoints to F32 or BF16, or keep the "
                                  f"fine-tuned value with --exclude '^{re.escape(t.name)}$'")
        return Classification(Kind.PASSTHROUGH, "non-float")
    if len(t.shape) < 2:
        return Classification(Kind.PASSTHROUGH, "1-D")
    if t.numel < cfg.scope.min_numel:
        return Classification(Kind.PASSTHROUGH, f"numel < {cfg.scope.min_numel}")
    if not in_mask:
        return Classification(Kind.PASSTHROUGH, "outside mask")
    if t.numel == 0:
        return Classification(Kind.PASSTHROUGH, "empty")
    if t.name.endswith(("_bias", ".bias")):
        return Classification(Kind.PASSTHROUGH, "bias")
    if len(t.shape) == 2:
        return Classification(Kind.SVD, "2-D matrix", (t.shape[0], t.shape[1]), 1)
    override = next(((rx.pattern, kind) for rx, kind in rules if rx.search(t.name)), None)
    if override is not None:
        return _treat_as(t, *override)
    if len(t.shape) == 3 and FUSED_GATE_UP.search(t.name):
        return Classification(Kind.EXPERTS_FUSED, "", None, 2 * t.shape[0])  # layout and halves: see build_plan
    if len(t.shape) == 3 and EXPERT_STACK.search(t.name):
        return Classification(Kind.EXPERTS, f"expert stack of {t.shape[0]}, repaired per expert",
                              (t.shape[1], t.shape[2]), t.shape[0])
    if len(t.shape) >= 4 or any("conv" in part for part in t.name.split(".")[-2:]):
        return _conv(t, "convolution")
    return Classification(Kind.REFUSE, f"{len(t.shape)}-D tensor {list(t.shape)} is neither a recognised expert "
                          "stack nor a convolution; classify it with --treat-as 'REGEX=experts|conv|passthrough' or "
                          "exclude it with --exclude")


def _conv(t: TensorEntry, why: str) -> Classification:
    cols = math.prod(t.shape[1:])
    note = f"{why}, reshaped to [out, in*k]"
    if t.shape[1] == 1:
        note += f"; depthwise: rank at most {cols}"
    return Classification(Kind.CONV, note, (t.shape[0], cols), 1)


def _treat_as(t: TensorEntry, pattern: str, kind: str) -> Classification:
    """A `--treat-as REGEX=KIND` override for a tensor with more than two axes."""
    why = f"--treat-as {pattern}={kind}"
    if kind == "passthrough":
        return Classification(Kind.PASSTHROUGH, why)
    if kind == "conv":
        return _conv(t, why)
    if len(t.shape) != 3:
        return Classification(Kind.REFUSE, f"{why}: an expert stack must be 3-D [E, a, b], got {list(t.shape)}")
    return Classification(Kind.EXPERTS, f"{why}: expert stack of {t.shape[0]}, repaired per expert",
                          (t.shape[1], t.shape[2]), t.shape[0])
