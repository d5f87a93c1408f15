"""compressed-tensors `pack-quantized` checkpoints (Kimi-K2-Thinking / K2.5 / K2.6 routed experts): the scheme
read from config.json's `quantization_config`, and the classification of every packed module's tensors
from it (ADR 0010). Headers only, plus each packed module's 2-element `weight_shape`.

Matching follows the library (`compressed_tensors.utils.match`): a `re:` target or ignore entry is
`re.match`ed against the module name, any other entry must equal it, and a class-name entry matches by
module type. From the files alone the only type we know is that a stored `weight_packed` module is a
quantised `Linear`, so `Linear` matches every packed module and other class names match none. Targets
are tried exact names first, then patterns, then `Linear`; a target listed by two groups belongs to the
later one, as in the library's target-to-scheme map.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from ...kernels.packed_int import STRATEGIES, SUPPORTED_BITS, IntScheme, packed_words
from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import FLOAT_DTYPES_REPAIRABLE, TensorEntry, read_tensor
from .kinds import INT4_FAMILY
from .model import Classification, PackedModule

FAMILY = INT4_FAMILY
PACKED, SCALE, SHAPE, ZERO_POINT, G_IDX = FAMILY
LINEAR = "Linear"
ESCAPE = "; fix the checkpoint, or pass --packed-int4 passthrough to copy the fine-tune's packed tensors verbatim"


@dataclass(frozen=True)
class SchemeGroup:
    """One entry of `config_groups`: its weight scheme, or why it is unsupported."""

    name: str
    targets: tuple[str, ...]
    scheme: IntScheme | None
    unsupported: str | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.scheme.describe() if self.scheme else self.unsupported})"


@dataclass(frozen=True)
class CompressedConfig:
    """config.json's compressed-tensors `quantization_config`, parsed once per checkpoint."""

    source: str
    format: str
    groups: tuple[SchemeGroup, ...]
    ignore: tuple[str, ...]
    error: str | None = None  # a defect of the block itself (bad regex, not pack-quantized, ...)

    def _matches(self, module: str, entry: str) -> bool:
        if entry.startswith("re:"):
            return re.match(entry[3:], module) is not None
        return entry == module or entry == LINEAR

    def ignored_by(self, module: str) -> str | None:
        return next((i for i in self.ignore if self._matches(module, i)), None)

    def group_for(self, module: str) -> SchemeGroup | None:
        owner: dict[str, SchemeGroup] = {}
        for g in self.groups:
            owner.update(dict.fromkeys(g.targets, g))
        names = sorted((t for t in owner if t != LINEAR), key=lambda t: (t.startswith("re:"), t))
        hit = next((t for t in names if self._matches(module, t)), None)
        if hit is None and LINEAR in owner:
            hit = LINEAR
        return owner[hit] if hit is not None else None


def _scheme(name: str, group: object) -> SchemeGroup:
    if not isinstance(group, dict):
        return SchemeGroup(name, (), None, "not a mapping")
    targets = tuple(str(t) for t in group.get("targets") or ())
    w = group.get("weights")
    if not isinstance(w, dict):
        return SchemeGroup(name, targets, None, "no weight quantisation")
    text = (f"type {w.get('type')}, num_bits {w.get('num_bits')}, strategy {w.get('strategy')}, "
            f"group_size {w.get('group_size')}, symmetric {w.get('symmetric')}")
    bad = []
    if w.get("type", "int") != "int":
        bad.append("only integer weights are supported")
    if w.get("num_bits") not in SUPPORTED_BITS:
        bad.append(f"num_bits must be one of {', '.join(map(str, SUPPORTED_BITS))}")
    if w.get("strategy") not in STRATEGIES:
        bad.append(f"strategy must be {' or '.join(STRATEGIES)}")
    gs = w.get("group_size")
    if w.get("strategy") == "group" and not (isinstance(gs, int) and gs > 0):
        bad.append("strategy group needs a positive group_size")
    if w.get("actorder") not in (None, False):
        bad.append("activation ordering (actorder / weight_g_idx) is not supported")
    if w.get("dynamic") not in (None, False):
        bad.append("dynamic weight quantisation is not supported")
    if bad:
        return SchemeGroup(name, targets, None, f"{text}: " + "; ".join(bad))
    return SchemeGroup(name, targets, IntScheme(int(w["num_bits"]), bool(w.get("symmetric", True)),
                                                str(w["strategy"]), gs if w["strategy"] == "group" else None))


def compressed_config(ckpt: Checkpoint) -> CompressedConfig | None:
    """The parsed block, or None when config.json declares no compressed-tensors quantisation."""
    path = ckpt.root / "config.json"
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    source = f"{path} quantization_config"
    fmt = str(qc.get("format"))
    groups = qc.get("config_groups") or {}
    parsed = tuple(_scheme(str(k), v) for k, v in groups.items()) if isinstance(groups, dict) else ()
    ignore = tuple(str(i) for i in (qc.get("ignore") or ()))
    error = None
    if fmt != "pack-quantized":
        error = f"{source}: format {fmt!r} is not supported (only pack-quantized)"
    elif not parsed:
        error = f"{source}: no config_groups, so the packed tensors' scheme is unknown"
    for entry in (*ignore, *(t for g in parsed for t in g.targets)):
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as exc:
                error = f"{source}: pattern {entry!r} is not a valid regular expression ({exc})"
    return CompressedConfig(source, fmt, parsed, ignore, error)


def family_stem(name: str) -> tuple[str, str] | None:
    """(stem, suffix) of a packed-family tensor name (`X.weight_scale` -> (`X.`, `weight_scale`))."""
    for suffix in FAMILY:
        if name.endswith("." + suffix):
            return name[: -len(suffix)], suffix
    return None


def read_module(ckpt: Checkpoint, stem: str, cc: CompressedConfig | None) -> tuple[PackedModule | None, str]:
    """Validate one side's packed module against its config; (module, "") or (None, why it is refused)."""
    where = ckpt.root
    if cc is None:
        return None, (f"{where}/config.json declares no compressed-tensors quantization_config, so the scheme of "
                      f"{stem}{PACKED} is unknown")
    if cc.error:
        return None, cc.error
    module = stem[:-1]
    missing = [s for s in (SCALE, SHAPE) if stem + s not in ckpt.locations]
    if missing:
        return None, f"packed tensor {stem}{PACKED} in {where} has no {' / '.join(stem + s for s in missing)}"
    hit = cc.ignored_by(module)
    if hit is not None:
        return None, (f"{cc.source} ignores {module} ({hit!r}) but {where} stores it packed; the config and the "
                      "tensors disagree")
    group = cc.group_for(module)
    if group is None:
        return None, f"no config_groups entry of {cc.source} targets {module}, yet {where} stores it packed"
    if group.scheme is None:
        return None, f"{cc.source} config_groups.{group.describe()}"
    sch = group.scheme
    if stem + G_IDX in ckpt.locations:
        return None, f"{stem}{G_IDX}: activation-ordered packing is not supported"
    _, packed = ckpt.entry(stem + PACKED)
    _, scale = ckpt.entry(stem + SCALE)
    shape_path, shape_t = ckpt.entry(stem + SHAPE)
    if packed.dtype != "I32" or len(packed.shape) != 2:
        return None, f"{stem}{PACKED} must be a 2-D I32 tensor, got {packed.dtype}{list(packed.shape)}"
    if shape_t.dtype not in ("I32", "I64") or shape_t.shape != (2,):
        return None, f"{stem}{SHAPE} must be I32/I64 [2], got {shape_t.dtype}{list(shape_t.shape)}"
    rows, cols = (int(v) for v in read_tensor(shape_path, shape_t).tolist())
    want = (rows, packed_words(cols, sch.num_bits))
    if packed.shape != want:
        return None, (f"{stem}{SHAPE} says [{rows}, {cols}] but {stem}{PACKED} is {list(packed.shape)} (expected "
                      f"{list(want)} for {sch.num_bits}-bit codes); the tensors disagree")
    if sch.strategy == "group" and cols % int(sch.group_size or 1):
        return None, f"group_size {sch.group_size} of {group.name} does not divide {module}'s {cols} input columns"
    groups = sch.groups(cols)
    if scale.shape != (rows, groups) or scale.dtype not in FLOAT_DTYPES_REPAIRABLE:
        return None, (f"{stem}{SCALE} is {scale.dtype}{list(scale.shape)}, but {group.describe()} needs a float "
                      f"[{rows}, {groups}]; the config and the tensors disagree")
    zp = None
    has_zp = stem + ZERO_POINT in ckpt.locations
    if sch.symmetric and has_zp:
        return None, f"{group.describe()} is symmetric but {stem}{ZERO_POINT} exists; the config and tensors disagree"
    if not sch.symmetric:
        if not has_zp:
            return None, f"{group.describe()} is asymmetric but {stem}{ZERO_POINT} is missing"
        zp = ckpt.entry(stem + ZERO_POINT)[1]
        zwant = (packed_words(rows, sch.num_bits), groups)
        if zp.dtype != "I32" or zp.shape != zwant:
            return None, f"{stem}{ZERO_POINT} must be I32 {list(zwant)}, got {zp.dtype}{list(zp.shape)}"
    names = tuple(stem + s for s in FAMILY if stem + s in ckpt.locations)
    return PackedModule(stem, group.name, sch, (rows, cols), packed, scale, zp, names), ""


def dense_partner(stem: str, ckpt: Checkpoint, shape: tuple[int, int]) -> TensorEntry | None:
    """The other side's dense `X.weight` of the same logical shape, if it has one."""
    name = stem + "weight"
    if name not in ckpt.locations:
        return None
    t = ckpt.entry(name)[1]
    return t if t.shape == shape and t.dtype in FLOAT_DTYPES_REPAIRABLE else None


@dataclass(frozen=True)
class PackedClass:
    """How build_plan records one tensor of a packed family (or a dense tensor with a packed base)."""

    kind: str
    reason: str
    matrix_shape: tuple[int, int] | None = None
    count: int = 0
    companion: str | None = None  # packed_aux: its weight_packed; packed_int: its weight_scale
    base_name: str | None = None
    base_companion: str | None = None  # the base's weight_scale (base packed)
    packed: PackedModule | None = None
    base_packed: PackedModule | None = None


def classify_packed(t: TensorEntry, base_name: str | None, ft: Checkpoint, base: Checkpoint, passthrough: bool,
                    min_numel: int, in_mask: bool,
                    ccs: tuple[CompressedConfig | None, CompressedConfig | None]) -> PackedClass:
    """A fine-tune tensor of a packed family; `ccs` are the (fine-tune, base) parsed configs."""
    stem, suffix = family_stem(t.name) or (t.name, PACKED)
    if passthrough:
        return PackedClass("passthrough", "packed INT4 (compressed-tensors), copied verbatim (--packed-int4 "
                           "passthrough); never repaired")
    if suffix != PACKED:
        return PackedClass("packed_aux", f"{suffix} of {stem}{PACKED}, written with it", companion=stem + PACKED)
    mod, why = read_module(ft, stem, ccs[0])
    if mod is None:
        return PackedClass("refuse", why + ESCAPE)
    base_packed, base_companion, note = None, None, "base dense"
    if base_name is not None and base_name.endswith(PACKED):
        base_packed, why = read_module(base, base_name[: -len(PACKED)], ccs[1])
        if base_packed is None:
            return PackedClass("refuse", f"base: {why}{ESCAPE}")
        if base_packed.shape != mod.shape:
            return PackedClass("refuse", f"base stores {base_name} as {list(base_packed.shape)}, the fine-tune "
                               f"{list(mod.shape)}; not a base/fine-tune pair for this tensor")
        base_companion, note = base_packed.scale.name, f"base {base_packed.scheme.describe()}"
    elif dense_partner(stem, base, mod.shape) is not None:
        base_name = stem + "weight"
    else:
        return PackedClass("passthrough", "fine-tune only", companion=mod.scale.name, packed=mod)
    common = dict(companion=mod.scale.name, base_name=base_name, base_companion=base_companion, packed=mod,
                  base_packed=base_packed)
    if mod.shape[0] * mod.shape[1] < min_numel or not in_mask:
        return PackedClass("passthrough", "packed weight kept (numel < min_numel or outside mask)", **common)
    return PackedClass("packed_int", f"compressed-tensors {mod.scheme.describe()} ({mod.group}; {note}): "
                       "dequantised, repaired, re-quantised with fresh scales", mod.shape, 1, **common)


def packed_base(t: TensorEntry, base: Checkpoint, base_cc: CompressedConfig | None,
                classify: Callable[[TensorEntry], Classification]) -> PackedClass | None:
    """A dense fine-tune `X.weight` whose base stores `X` packed (a BF16 fine-tune of Kimi-K2-Thinking), or None.
    `classify` gives the dense classification against a stand-in base entry of the logical shape."""
    if not t.name.endswith(".weight") or t.name[:-6] + PACKED not in base.locations:
        return None
    stem = t.name[:-6]
    mod, why = read_module(base, stem, base_cc)
    if mod is None:
        return PackedClass("refuse", f"base: {why}")
    if mod.shape != t.shape:
        return PackedClass("refuse", f"base {stem}{SHAPE} is {list(mod.shape)} but the fine-tune stores "
                           f"{list(t.shape)}; not a base/fine-tune pair for this tensor")
    dense = classify(dataclasses.replace(mod.packed, dtype="F32", shape=mod.shape))
    kind, reason, mshape, count = dense.kind, dense.reason, dense.matrix_shape, dense.n_matrices
    common = dict(base_name=stem + PACKED, base_companion=mod.scale.name, base_packed=mod)
    if kind != "svd":
        return PackedClass(kind, reason, mshape, count, **common)
    return PackedClass(kind, f"{reason}; base compressed-tensors {mod.scheme.describe()} ({mod.group}), dequantised "
                       "with its own scales", mshape, count, **common)
