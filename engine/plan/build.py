"""Plan a repair from headers only: pair tensors by name, classify, validate, estimate, hash.

Kinds (SPEC.md §2–3):
- `svd`: a 2-D matrix repaired as is.
- `conv`: a convolution kernel `[out, in, k...]`, repaired as `[out, in·Πk]`.
- `experts`: a stacked expert tensor `[E, a, b]`, repaired per expert (E matrices, own τ each).
- `experts_fused`: a fused gate/up stack, repaired per expert and per half (engine/layouts.py).
- `fp8`: a block-FP8 weight (F8_E4M3 + `<name>_scale_inv`), dequantised, repaired, re-quantised;
  its scale tensor (`fp8_scale`) is rewritten by the same unit.
- `mxfp4`: an MXFP4 weight (`*_blocks` U8 + `*_scales` U8, gpt-oss), dequantised, repaired per expert
  (gate/up halves split as its fused layout says), re-quantised; its scales (`mxfp4_scales`) go with it.
- `dequant`: a quantized weight that is not repaired but written as BF16 (`--out-dtype bf16`).
- `passthrough`: keeps the fine-tuned bytes (1-D, small, masked, non-float, fine-tune-only, packed INT4
  with `--packed-int4 passthrough`).
- `refuse`: cannot be repaired correctly by this version; `repair` stops before writing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ... import __version__
from ..config import RepairConfig
from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import DTYPE_BITS, FLOAT_DTYPES_REPAIRABLE, TensorEntry, output_prefix
from .layouts import FUSED_GATE_UP, fused_layout_for, fused_matrix_shape
from .names import EMBEDDING, HEAD, base_partner, canonical
from .out_layout import output_layout
from .quantized import (
    FP8_SCALE,
    INT4_PACKED,
    MX_BLOCKS,
    MX_SCALES,
    SCALE_KINDS,
    classify_fp8,
    classify_mxfp4,
    fp8_base,
    is_int4_family,
    to_bf16,
)

REPAIR_KINDS = ("svd", "conv", "experts", "experts_fused", "fp8", "mxfp4")
QUANTIZED_SUFFIXES = ("weight_scale", "weight_packed", "weight_shape", "_blocks", "_scales", "weight_zero_point")
EXPERT_STACK = re.compile(r"(^|\.)experts\.(gate_proj|up_proj|down_proj|w1|w2|w3|gate_up_proj)(\.weight)?$")


@dataclass(frozen=True)
class PlanEntry:
    """One fine-tune tensor and what the run will do with it."""

    name: str
    kind: str
    reason: str
    shard: str  # the fine-tune shard (and output shard) holding it
    ft: TensorEntry
    base_shard: str | None
    base: TensorEntry | None
    matrix_shape: tuple[int, int] | None  # shape of each repaired matrix
    n_matrices: int
    out_begin: int  # absolute offset of the tensor in the output shard
    layout: str | None = None  # fused gate/up layout (experts_fused only)
    base_name: str | None = None  # the paired base tensor (differs from `name` across prefixes / tying)
    companion: str | None = None  # fp8: the fine-tune scale tensor; fp8_scale: its weight
    base_companion: str | None = None  # fp8: the base's scale tensor (None when the base is not FP8)
    base_scale: TensorEntry | None = None  # fp8: that tensor's header entry
    power_of_two_scales: bool = False  # fp8: `ue8m0` scales
    resized_rows: int | None = None  # resized vocabulary: rows [0, resized_rows) are repaired, the rest copied
    out_name: str | None = None  # written under another name (MXFP4 -> BF16 drops `_blocks`)
    out_dtype: str | None = None  # written in another dtype (--out-dtype bf16)
    out_shape: tuple[int, ...] | None = None  # written in another shape (MXFP4 -> BF16)
    dropped: bool = False  # not written at all (the scales of a weight written as BF16)

    @property
    def written(self) -> tuple[str, str, tuple[int, ...]]:
        """(name, dtype, shape) of the tensor in the output."""
        return (self.out_name or self.name, self.out_dtype or self.ft.dtype, self.out_shape or self.ft.shape)

    @property
    def is_mxfp4(self) -> bool:
        return self.name.endswith(MX_BLOCKS) and self.companion is not None

    @property
    def batch_kind(self) -> str:
        """How the (dequantised) tensor splits into matrices, as engine/layouts.py names it."""
        if self.kind == "mxfp4":
            return "experts_fused" if self.layout else ("experts" if len(self.ft.shape) == 4 else "svd")
        if self.kind == "fp8":
            return "svd"
        return self.kind

    @property
    def out_nbytes(self) -> int:
        if self.dropped:
            return 0
        if self.out_dtype is None and self.out_shape is None:
            return self.ft.nbytes
        _, dtype, shape = self.written
        return math.prod(shape) * DTYPE_BITS[dtype] // 8

    @property
    def repair_shape(self) -> tuple[int, ...]:
        """The part of the stored tensor that is repaired (all of it, or the base's rows)."""
        if self.resized_rows is None:
            return self.ft.shape
        return (self.resized_rows, *self.ft.shape[1:])

    @property
    def out_end(self) -> int:
        return self.out_begin + self.out_nbytes

    @property
    def cost(self) -> float:
        """Relative work: m·n·min(m, n) per matrix for repairs; bytes for copies."""
        if self.matrix_shape is None:
            return float(self.ft.nbytes)
        m, n = self.matrix_shape
        return float(self.n_matrices) * m * n * min(m, n)


@dataclass
class Plan:
    """The validated, deterministic plan; `plan_id` hashes the config and the inputs' identity."""

    entries: list[PlanEntry]
    base_only: list[str]
    shape_mismatches: list[str]
    config: dict[str, Any]
    fingerprints: dict[str, Any]
    out_shards: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # shard -> (header prefix, file size)
    layout_changed: bool = False  # some tensor changes dtype/shape/name or is dropped: new headers and index
    drop_quantization_config: bool = False  # --out-dtype bf16 removed every quantized weight
    plan_id: str = field(init=False)

    def __post_init__(self) -> None:
        payload = {"version": __version__, "config": self.config, "inputs": self.fingerprints,
                   "entries": [(e.name, e.kind) for e in self.entries]}
        blob = json.dumps(payload, sort_keys=True).encode()
        self.plan_id = hashlib.sha256(blob).hexdigest()[:16]

    @property
    def refused(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind == "refuse"]

    def check_runnable(self) -> None:
        """Raise one error listing every reason the plan cannot run."""
        problems = list(self.shape_mismatches)
        problems += [f"tensor {e.name!r} in {e.shard}: {e.reason}" for e in self.refused]
        if problems:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise InputError("cannot repair:\n  " + "\n  ".join(problems[:10]) + more)

    def summary(self) -> dict[str, Any]:
        kinds = Counter(e.kind for e in self.entries)
        bytes_by_kind: Counter[str] = Counter()
        for e in self.entries:
            bytes_by_kind[e.kind] += e.ft.nbytes
        repaired = [e for e in self.entries if e.kind in REPAIR_KINDS]
        return {
            "plan_id": self.plan_id,
            "tensors": len(self.entries),
            "tensors_by_kind": dict(sorted(kinds.items())),
            "bytes_by_kind": dict(sorted(bytes_by_kind.items())),
            "bytes_total": sum(e.ft.nbytes for e in self.entries),
            "matrices_to_repair": sum(e.n_matrices for e in repaired),
            "estimated_gflop": round(sum(e.cost for e in repaired) * 4 / 1e9, 3),
            "passthrough_reasons": dict(sorted(Counter(e.reason for e in self.entries
                                                       if e.kind == "passthrough").items())),
            "ft_only": [e.name for e in self.entries if e.reason == "fine-tune only"],
            "base_only": self.base_only,
            "shape_mismatches": self.shape_mismatches,
            "refused": [{"tensor": e.name, "shard": e.shard, "reason": e.reason} for e in self.refused],
        }


def build_plan(base: Checkpoint, ft: Checkpoint, cfg: RepairConfig) -> Plan:
    """Pair and classify every fine-tune tensor; headers only."""
    mask = cfg.layer_mask()
    rules = cfg.treat_as_rules()
    entries: list[PlanEntry] = []
    mismatches: list[str] = []
    base_names = {canonical(n): n for n in sorted(base.locations)}
    base_names.update({n: n for n in base.locations if canonical(n) == n})  # exact names win a collision
    used: set[str] = set()
    model_type, ue8m0 = ft.model_type, ft.scale_fmt == "ue8m0"  # config.json, read once
    for shard_name, header in sorted(ft.shards.items()):
        shift = len(output_prefix(header)) - header.data_start
        for t in sorted(header.tensors.values(), key=lambda e: e.begin):
            base_name, note = base_partner(t.name, base.locations, base_names)
            base_shard = base.locations.get(base_name) if base_name else None
            b = base.shards[base_shard].tensors[base_name] if base_shard and base_name else None
            resized = None
            if b is not None and b.shape != t.shape:
                if _is_vocab_growth(t, b):
                    resized = b.shape[0]
                else:
                    mismatches.append(f"tensor {t.name!r}: shape {list(b.shape)} in {base.root / base_shard} but "
                                      f"{list(t.shape)} in {ft.root / shard_name}; the checkpoints are not a base/"
                                      "fine-tune pair for this tensor (exclude it with --exclude or fix the inputs)")
            if base_name:
                used.add(base_name)
            kind, reason, mshape, count = _classify(t, b, cfg, mask.selects(t.name), rules)
            companion = base_companion = None
            layout = None
            if t.dtype == "F8_E4M3" or t.name.endswith(FP8_SCALE):
                kind, reason, mshape, count, companion, base_companion = classify_fp8(
                    t, b, base_name, ft, base, cfg, mask.selects(t.name))
            elif is_int4_family(t.name, ft):
                kind, reason = (("passthrough", "packed INT4 (compressed-tensors), copied verbatim (--packed-int4 "
                                 "passthrough); never repaired") if cfg.packed_int4 == "passthrough" else
                                ("refuse", "packed INT4 (compressed-tensors weight_packed) cannot be repaired by this "
                                 "version; pass --packed-int4 passthrough to copy the fine-tune's tensors verbatim, "
                                 "or dequantize both checkpoints to BF16 first"))
            elif t.name.endswith((MX_BLOCKS, MX_SCALES)):
                kind, reason, mshape, count, companion, base_companion, layout = classify_mxfp4(
                    t, b, base_name, ft, base, cfg, mask.selects(t.name))
            elif b is not None and b.dtype == "F8_E4M3" and t.dtype in FLOAT_DTYPES_REPAIRABLE:
                kind, reason, mshape, count, base_companion = fp8_base(
                    t, b, base_name, base, _classify(t, dataclasses.replace(b, dtype="F32"), cfg,
                                                     mask.selects(t.name), rules))
            if kind == "experts_fused":
                layout, assumed = fused_layout_for(cfg.fused_layout, model_type)
                mshape = fused_matrix_shape(t.shape, layout)
                if mshape is None:
                    kind, reason = "refuse", (f"fused gate/up stack {list(t.shape)} has an odd fused axis for layout "
                                              f"{layout}; set --fused-layout or exclude it")
                else:
                    reason = (f"fused gate/up stack of {t.shape[0]} experts, {layout}"
                              f"{' (assumed: no model_type in config.json)' if assumed else ''}; repaired per "
                              "expert and half")
            if resized is not None and kind == "svd":
                mshape = (resized, t.shape[1])
                reason = (f"resized vocabulary: rows 0-{resized - 1} repaired, {t.shape[0] - resized} new rows "
                          "copied from the fine-tune")
            if note and kind != "passthrough":
                reason = f"{reason}; {note}"
            entries.append(PlanEntry(t.name, kind, reason, shard_name, t, base_shard, b, mshape, count,
                                     out_begin=t.begin + shift, layout=layout, base_name=base_name,
                                     resized_rows=resized if kind == "svd" else None, companion=companion,
                                     base_companion=base_companion,
                                     base_scale=base.entry(base_companion)[1] if base_companion else None,
                                     power_of_two_scales=ue8m0))
    if cfg.out_dtype == "bf16":
        entries = [to_bf16(e) for e in entries]
    rewritten = {e.name for e in entries if e.kind in ("fp8", "mxfp4", "dequant")}
    entries = [dataclasses.replace(e, kind="passthrough", reason=f"block scales of {e.companion}, kept with it")
               if e.kind in SCALE_KINDS and e.companion not in rewritten else e for e in entries]
    base_only = sorted(set(base.locations) - used - {e.base_companion for e in entries if e.base_companion})
    entries, out_shards, changed = output_layout(entries, ft)
    quantized_left = any(e.kind != "refuse" and (e.ft.dtype.startswith(("F8_", "F4")) or e.name.endswith(
        (MX_BLOCKS, INT4_PACKED))) and not e.dropped and e.out_dtype is None for e in entries)
    return Plan(entries=entries, base_only=base_only, shape_mismatches=mismatches,
                config=cfg.output_affecting(), fingerprints={"base": base.fingerprint(), "ft": ft.fingerprint()},
                out_shards=out_shards, layout_changed=changed,
                drop_quantization_config=cfg.out_dtype == "bf16" and changed and not quantized_left)


def _is_vocab_growth(t: TensorEntry, b: TensorEntry) -> bool:
    """A fine-tune that added tokens: same width, more rows, in an embedding or head."""
    return (len(t.shape) == 2 and len(b.shape) == 2 and t.shape[1] == b.shape[1] and t.shape[0] > b.shape[0]
            and canonical(t.name) in (HEAD, EMBEDDING))


def _classify(t: TensorEntry, b: TensorEntry | None, cfg: RepairConfig, in_mask: bool,
              rules: tuple = ()) -> tuple[str, str, tuple[int, int] | None, int]:
    passthrough = ("passthrough", None, 0)
    if t.dtype.startswith(("F8_", "F4", "F6")) or t.name.endswith(QUANTIZED_SUFFIXES):
        return ("refuse", f"quantized storage ({t.dtype}) is not supported by this version; dequantize the "
                "checkpoints to BF16 first", None, 0)
    if b is None:
        return (passthrough[0], "fine-tune only", None, 0)
    if t.dtype not in FLOAT_DTYPES_REPAIRABLE or b.dtype not in FLOAT_DTYPES_REPAIRABLE:
        if t.dtype in ("F64", "C64") or b.dtype in ("F64", "C64"):
            return ("refuse", f"dtype {b.dtype}->{t.dtype} is outside SPEC §4 (F32/F16/BF16)", None, 0)
        return (passthrough[0], "non-float", None, 0)
    if len(t.shape) < 2:
        return (passthrough[0], "1-D", None, 0)
    if t.numel < cfg.min_numel:
        return (passthrough[0], f"numel < {cfg.min_numel}", None, 0)
    if not in_mask:
        return (passthrough[0], "outside mask", None, 0)
    if t.numel == 0:
        return (passthrough[0], "empty", None, 0)
    if t.name.endswith(("_bias", ".bias")):
        return (passthrough[0], "bias", None, 0)
    if len(t.shape) == 2:
        return ("svd", "2-D matrix", (t.shape[0], t.shape[1]), 1)
    override = next(((rx.pattern, kind) for rx, kind in rules if rx.search(t.name)), None)
    if override is not None:
        return _treat_as(t, *override)
    if len(t.shape) == 3 and FUSED_GATE_UP.search(t.name):
        return ("experts_fused", "", None, 2 * t.shape[0])  # layout and halves are resolved by build_plan
    if len(t.shape) == 3 and EXPERT_STACK.search(t.name):
        return ("experts", f"expert stack of {t.shape[0]}, repaired per expert", (t.shape[1], t.shape[2]),
                t.shape[0])
    if len(t.shape) >= 4 or any("conv" in part for part in t.name.split(".")[-2:]):
        return _conv(t, "convolution")
    return ("refuse", f"{len(t.shape)}-D tensor {list(t.shape)} is neither a recognised expert stack nor a "
            "convolution; classify it with --treat-as 'REGEX=experts|conv|passthrough' or exclude it with "
            "--exclude", None, 0)


def _conv(t: TensorEntry, why: str) -> tuple[str, str, tuple[int, int] | None, int]:
    cols = math.prod(t.shape[1:])
    note = f"{why}, reshaped to [out, in*k]"
    if t.shape[1] == 1:
        note += f"; depthwise: rank at most {cols}"
    return ("conv", note, (t.shape[0], cols), 1)


def _treat_as(t: TensorEntry, pattern: str, kind: str) -> tuple[str, str, tuple[int, int] | None, int]:
    """A `--treat-as REGEX=KIND` override for a tensor with more than two axes."""
    why = f"--treat-as {pattern}={kind}"
    if kind == "passthrough":
        return ("passthrough", why, None, 0)
    if kind == "conv":
        return _conv(t, why)
    if len(t.shape) != 3:
        return ("refuse", f"{why}: an expert stack must be 3-D [E, a, b], got {list(t.shape)}", None, 0)
    return ("experts", f"{why}: expert stack of {t.shape[0]}, repaired per expert", (t.shape[1], t.shape[2]),
            t.shape[0])
