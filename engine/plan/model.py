"""The planning model: what the plan says about each tensor (`PlanEntry`), the plan as a whole (`Plan`)
and what a classifier decides (`Classification`). Records only; the builders live beside them."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ... import __version__
from ...kernels.packed_int import IntScheme
from ..errors import InputError
from ..io.safetensors_format import DTYPE_BITS, TensorEntry
from .kinds import MX_BLOCKS, REPAIR_KINDS, Kind


@dataclass(frozen=True)
class Classification:
    """What a classifier decided for one tensor, before build_plan places it in the output."""

    kind: Kind
    reason: str
    matrix_shape: tuple[int, int] | None = None  # shape of each repaired matrix
    n_matrices: int = 0
    companion: str | None = None  # fp8 / mxfp4: the fine-tune's scale tensor; a scale: its weight
    base_companion: str | None = None  # the base's scale tensor (None when the base is not quantized)
    layout: str | None = None  # fused gate/up layout


@dataclass(frozen=True)
class PackedModule:
    """One side's stored packed module: its scheme, logical [rows, cols] and tensors."""

    stem: str  # module name + "." (the family's common prefix)
    group: str
    scheme: IntScheme
    shape: tuple[int, int]
    packed: TensorEntry
    scale: TensorEntry
    zero_point: TensorEntry | None
    names: tuple[str, ...]  # every tensor of the family on this side

    @property
    def dense_name(self) -> str:
        return self.stem + "weight"


@dataclass(frozen=True)
class PlanEntry:
    """One fine-tune tensor and what the run will do with it."""

    name: str
    kind: Kind
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
    packed: PackedModule | None = None  # the fine-tune stores it compressed-tensors pack-quantized
    base_packed: PackedModule | None = None  # the base does (dequantised with its own scales)

    @property
    def written(self) -> tuple[str, str, tuple[int, ...]]:
        """(name, dtype, shape) of the tensor in the output."""
        return (self.out_name or self.name, self.out_dtype or self.ft.dtype, self.out_shape or self.ft.shape)

    @property
    def is_mxfp4(self) -> bool:
        return self.name.endswith(MX_BLOCKS) and self.companion is not None

    @property
    def batch_kind(self) -> Kind:
        """How the (dequantised) tensor splits into matrices, as plan/layouts.py names it."""
        if self.kind == Kind.MXFP4:
            return Kind.EXPERTS_FUSED if self.layout else (Kind.EXPERTS if len(self.ft.shape) == 4 else Kind.SVD)
        if self.kind in (Kind.FP8, Kind.PACKED_INT):
            return Kind.SVD
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
        return [e for e in self.entries if e.kind == Kind.REFUSE]

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
                                                       if e.kind == Kind.PASSTHROUGH).items())),
            "ft_only": [e.name for e in self.entries if e.reason == "fine-tune only"],
            "base_only": self.base_only,
            "shape_mismatches": self.shape_mismatches,
            "refused": [{"tensor": e.name, "shard": e.shard, "reason": e.reason} for e in self.refused],
            "packed_schemes": self.packed_schemes(),
        }

    def packed_schemes(self) -> list[dict[str, Any]]:
        """compressed-tensors config groups in use, per side: scheme and how many packed weights use it."""
        seen: Counter[tuple[str, str, str]] = Counter()
        for e in self.entries:
            for side, mod in (("fine-tune", e.packed), ("base", e.base_packed)):
                if mod is not None:
                    seen[(side, mod.group, mod.scheme.describe())] += 1
        return [{"side": side, "group": group, "scheme": scheme, "tensors": n}
                for (side, group, scheme), n in sorted(seen.items())]
