"""The typed configuration behind the CLI flags, the YAML config file and the Ray job, in sections:
inputs, method, scope, formats, execution, cluster, output.

Each option is defined once: its section field (type, default, help, and its one check), or, for a
method's parameters, the method's own dataclass (kernels/methods), which validates them. Choices are
`Literal` types, so the CLI's choices, the YAML check and the type agree. The CLI flags and YAML keys
are the flat option names (`--scale`, `min_numel:`); a YAML file may also group them by section
(`scope: {mask: mlp_only}`). `output_affecting` is the dict the plan id hashes; `to_dict` is the flat
view written to summary.json.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..kernels.methods import METHODS, Method, build_method, method_fields
from ..kernels.methods.dg_hard import DGHard
from ..kernels.spectral import Backend as Kernel
from ..kernels.spectral import Fp64Rate
from .errors import InputError
from .io.objstore import is_object_uri

MethodName = Literal["dg_hard", "wise_ft", "ties", "dare", "fixed_rank", "mp_edge", "optimal_shrink"]
MaskPreset = Literal["all", "mlp_only", "attn_only", "gate_up"]
FusedLayout = Literal["auto", "out_in_concat", "in_out_concat", "in_out_interleaved", "out_in_interleaved"]
OutDtype = Literal["keep", "bf16"]
PackedInt4 = Literal["repair", "passthrough"]
TreatAsKind = Literal["experts", "conv", "passthrough"]
Median = Literal["lower", "mean"]
Executor = Literal["auto", "ray", "local"]

# The options that change the output bytes; they (and the inputs' fingerprints) make the plan id.
# The chosen method's own parameters are added by `output_affecting`.
OUTPUT_AFFECTING = ("method", "min_numel", "mask", "include", "exclude", "kernel", "fused_layout", "target_rho",
                    "emit_adapter", "out_dtype", "packed_int4", "treat_as", "fp64_rate")

# CLI help of the methods' parameters (their types, defaults and checks are the method dataclasses').
METHOD_HELP = {
    "scale": "dg_hard / mp_edge: multiplier on the cut (tau, or the MP edge); 1.0 = as defined",
    "alpha": "wise_ft: weight of the fine-tune, W* = W0 + alpha * delta",
    "keep_ratio": "ties: fraction of each matrix's entries kept, by magnitude",
    "ties_lambda": "ties: scale applied to the kept entries",
    "drop_prob": "dare: probability of dropping each entry",
    "dare_rescale": "dare: keep survivors unscaled (DARE-Linear); by default they are rescaled by 1/(1-p)",
    "seed": "dare: seed of the per-matrix random streams",
    "rank": "fixed_rank: singular components kept per matrix",
    "median": "median convention for s_med",
}


def _opt(default: Any, help: str, check: tuple[Any, str] | None = None, **extra: Any) -> Any:
    meta = {"help": help, "check": check, **extra}
    if isinstance(default, tuple):
        return field(default=default, metadata={**meta, "repeatable": True})
    return field(default=default, metadata=meta)


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The values of a Literal type (also inside `X | None`); () for other types."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return tuple(c for a in typing.get_args(hint) if typing.get_origin(a) is Literal for c in typing.get_args(a))


@dataclass(frozen=True)
class Section:
    """A group of options. The one validation of each field: its Literal choices, or its `check`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("repeatable"):
                value = (value,) if isinstance(value, str) else tuple(value)
                object.__setattr__(self, f.name, value)
            choices = literal_choices(hints[f.name])
            if choices and value not in choices:
                raise InputError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}.")
            check = f.metadata.get("check")
            if check is not None and value is not None and not check[0](value):
                raise InputError(f"{f.name} must be {check[1]}, got {value!r}.")


@dataclass(frozen=True)
class InputOptions(Section):
    base: str | None = _opt(None, "base checkpoint: a local folder of safetensors files, or a Hugging Face Hub "
                            "repo id org/name[@revision] (a local folder of that name wins), or an s3:// or gs:// "
                            "prefix (read with ranged GETs)", metavar="DIR|ORG/NAME|URI")
    ft: str | None = _opt(None, "fine-tuned checkpoint: a local folder, a Hub repo id org/name[@revision] or an "
                          "s3:// / gs:// prefix, as for --base", metavar="DIR|ORG/NAME|URI")


@dataclass(frozen=True)
class MethodOptions:
    """Which method with which parameters (`spec`, the method's dataclass), and --target-rho."""

    spec: Method = field(default_factory=DGHard)
    target_rho: float | None = None

    def __post_init__(self) -> None:
        if self.target_rho is not None:
            if not (0.0 < self.target_rho <= 1.0):
                raise InputError(f"target_rho must be in (0, 1], got {self.target_rho!r}.")
            try:
                self.spec.check_target()
            except ValueError as exc:
                raise InputError(str(exc) + ".") from exc

    @property
    def name(self) -> str:
        return self.spec.name


def _valid_device(d: str) -> bool:
    return d in ("auto", "cpu", "cuda") or d.startswith("cuda:")


@dataclass(frozen=True)
class ScopeOptions(Section):
    min_numel: int = _opt(1024, "tensors with fewer elements keep the fine-tuned value", (lambda v: v >= 0, ">= 0"))
    mask: MaskPreset = _opt("all", "layer-mask preset")
    include: tuple[str, ...] = _opt((), "regex; only matching tensors are repaired (repeatable)")
    exclude: tuple[str, ...] = _opt((), "regex; matching tensors keep the fine-tuned value (repeatable)")
    treat_as: tuple[str, ...] = _opt((), "REGEX=KIND (KIND: experts, conv, passthrough); overrides how a matching "
                                     "tensor with more than 2 axes is classified (repeatable; first match wins)",
                                     metavar="REGEX=KIND")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.treat_as_rules()  # validates REGEX=KIND
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"invalid regular expression {pattern!r} in include/exclude: {exc}.") from exc

    def treat_as_rules(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        """Compiled `--treat-as REGEX=KIND` overrides, in the order given."""
        kinds = typing.get_args(TreatAsKind)
        rules = []
        for item in self.treat_as:
            pattern, sep, kind = str(item).rpartition("=")
            if not sep or not pattern or kind not in kinds:
                raise InputError(f"treat_as {item!r}: expected REGEX=KIND with KIND one of {', '.join(kinds)}.")
            try:
                rules.append((re.compile(pattern), kind))
            except re.error as exc:
                raise InputError(f"treat_as {item!r}: invalid regular expression ({exc}).") from exc
        return tuple(rules)


@dataclass(frozen=True)
class FormatOptions(Section):
    fused_layout: FusedLayout = _opt("auto", "layout of fused experts.gate_up_proj stacks: auto (from config.json "
                                     "model_type), out_in_concat [E,2I,H] rows gate then up, in_out_concat [E,H,2I] "
                                     "columns gate then up, in_out_interleaved [E,H,2I] gate = even columns, "
                                     "out_in_interleaved [E,2I,H] gate = even rows")
    out_dtype: OutDtype = _opt("keep", "quantized weights (block-FP8, MXFP4, compressed-tensors packed INT4/INT8): "
                               "keep = re-quantize to the fine-tune's layout; bf16 = write BF16, drop the scale "
                               "tensors and config.json's quantization_config")
    packed_int4: PackedInt4 = _opt("repair", "compressed-tensors pack-quantized tensors (weight_packed/weight_scale): "
                                   "repair = dequantize with the scheme in config.json, repair, re-quantize; "
                                   "passthrough = copy the fine-tune's tensors verbatim (never repaired)")


@dataclass(frozen=True)
class ExecutionOptions(Section):
    kernel: Kernel = _opt("auto", "spectral backend: auto (the precision policy: gram32 for BF16/FP16/FP8/INT4 "
                          "outputs, gram64 for F32 outputs and on fast-FP64 GPUs; exact SVD when min(m, n) <= 32), "
                          "exact = float64 SVD, gram64 = float64 Gram + top-r eigenvectors, gram32 = float32 Gram "
                          "guarded by a float64 fallback")
    fp64_rate: Fp64Rate = _opt("auto", "float64 speed of the device, for --kernel auto: auto (from the GPU model: "
                               "A100/H100/H200/B200 fast; L4/A10/RTX/T4 and the CPU slow), fast = float64 for every "
                               "output, slow = guarded float32 for low-precision outputs")
    device: str = _opt("auto", "where the spectral work runs: auto (cuda when available), cpu, cuda, cuda:N",
                       (_valid_device, "auto, cpu, cuda or cuda:N"))
    threads: int = _opt(0, "compute threads per CPU worker (a Ray actor, or a lane of the local executor); the "
                           "output bytes do not depend on it (0 = the cores / workers; all cores for the local "
                           "executor with --overlap)",
                        (lambda v: v >= 0, ">= 0"))
    batch_mb: int = _opt(256, "memory budget (MiB) per worker for batching same-shape matrices into one kernel "
                         "call; with overlap each of the two units in flight gets half, and a unit above the whole "
                         "budget (one large tensor) runs alone", (lambda v: v >= 1, ">= 1"))
    overlap: bool = _opt(False, "read the next unit and write the previous one while a unit computes: each worker "
                         "(and the local executor) runs two units at once, one in the kernels (output bytes are "
                         "the same); for slow reads such as object-store inputs; off by default, since on warm local "
                         "files it measured no gain (docs/benchmarks.md)")
    executor: Executor = _opt("auto", "where the units run: auto (local on one machine: no --address or RAY_ADDRESS, "
                              "no GPU, no --overlap; otherwise ray), local = in this process, one lane (thread) per "
                              "worker, the fastest on one machine (no Ray start-up; no worker isolation: a crash ends "
                              "the run, which then resumes), ray = Ray actors (the embedded local Ray, or the cluster "
                              "of --address): per-unit deadlines and retries on a fresh worker; the output bytes are "
                              "the same")
    commit_interval_s: float = _opt(10.0, "commit the manifest at least this often (bounds work lost in a crash)")
    progress: bool = _opt(True, "no progress on stderr; by default a bar on a terminal, otherwise (job logs, "
                          "redirected output) a line every --progress-interval-s seconds")
    progress_interval_s: float = _opt(30.0, "seconds between progress lines when stderr is not a terminal "
                                      "(tensors, bytes, rate, ETA)", (lambda v: v > 0, "> 0"))


@dataclass(frozen=True)
class ClusterOptions(Section):
    address: str | None = _opt(None, "Ray cluster address to join (default: RAY_ADDRESS; with neither, this machine "
                               "alone: the local executor, or with --executor ray a Ray started on 127.0.0.1); a "
                               "cluster with token authentication also needs RAY_AUTH_MODE=token and "
                               "RAY_AUTH_TOKEN exported", metavar="HOST:PORT")
    workers: int = _opt(0, "Ray worker actors, or lanes of the local executor (0 = one per GPU, or one per CPU "
                        "core without GPUs)",
                        (lambda v: v >= 0, ">= 0"))
    max_attempts: int = _opt(3, "Ray: a unit that kills its worker this many times is marked failed",
                             (lambda v: v >= 1, ">= 1"))
    inflight_per_worker: int = _opt(2, "Ray: units in flight per worker (the second overlaps I/O with compute)",
                                    (lambda v: v >= 1, ">= 1"))
    unit_timeout_s: float = _opt(600.0, "Ray: base deadline per unit; a cost-proportional allowance is added",
                                 (lambda v: v > 0, "> 0"))
    head_start: bool = _opt(True, "Ray: do not let the driver repair units itself while the embedded "
                            "local Ray and its workers start; by default it does (on CPU with a local output, never "
                            "when joining a cluster; the output bytes are the same)")

    def cluster_to_join(self) -> str | None:
        """--address, else RAY_ADDRESS (set by `ray job submit`); None: no cluster, this machine alone."""
        return self.address or os.environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class OutputOptions(Section):
    out: str | None = _opt(None, "output directory for the repaired checkpoint, or an s3:// / gs:// prefix (resumes "
                           "an interrupted run of the same plan)", metavar="DIR|URI")
    emit_adapter: str | None = _opt(None, "also write delta* as a PEFT LoRA adapter into this directory (spectral "
                                    "methods; plain Linear / Embedding weights)", metavar="DIR")
    force: bool = _opt(False, "replace an output directory that holds a different dgrepair run (removes only what "
                       "that run wrote; never a folder another run has locked)")
    scratch: str | None = _opt(None, "with an s3:// or gs:// --out: the local folder (the same path on every node) "
                               "where output shards are assembled before upload, about two shards per worker "
                               "(default: the system temporary folder)", metavar="DIR")
    lock_ttl_s: float = _opt(120.0, "with an s3:// or gs:// --out: seconds after its last heartbeat when a run's lock "
                             "object counts as abandoned and is taken over")


SECTIONS: dict[str, type[Section]] = {"inputs": InputOptions, "scope": ScopeOptions, "formats": FormatOptions,
                                      "execution": ExecutionOptions, "cluster": ClusterOptions,
                                      "output": OutputOptions}
SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
METHOD_PARAMS = tuple(dict.fromkeys(f for m in METHODS for f in method_fields(m)))
METHOD_KEYS = ("method", "target_rho", *METHOD_PARAMS)
# The older spelling of `executor: local` (true) / `ray` (false), still read from YAML and `RepairConfig.of`
# (the CLI's `--in-process` sets `executor` itself).
LEGACY_IN_PROCESS = "in_process"
# The flat option names in the order the CLI lists them.
FLAT_ORDER = ("base", "ft", "out", "method", "scale", "alpha", "keep_ratio", "ties_lambda", "drop_prob",
              "dare_rescale", "seed", "rank", "target_rho", "emit_adapter", "min_numel", "mask", "include", "exclude",
              "median", "kernel", "fp64_rate", "fused_layout", "out_dtype", "packed_int4", "treat_as", "device",
              "threads", "batch_mb", "overlap", "address", "workers", "executor", "max_attempts",
              "inflight_per_worker", "unit_timeout_s", "head_start", "commit_interval_s", "force", "scratch",
              "lock_ttl_s", "progress", "progress_interval_s")


@dataclass(frozen=True)
class FlagSpec:
    """One CLI flag / YAML key: what argparse needs to generate it."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    type: Any = None
    metavar: str | None = None
    repeatable: bool = False


def flag_specs() -> list[FlagSpec]:
    """Every option, in CLI order, with its default, help and choices from its one definition."""
    specs: dict[str, FlagSpec] = {
        "method": FlagSpec("method", "dg_hard", "repair method: dg_hard (the paper's DG threshold), wise_ft "
                           "(alpha * delta), ties (top keep-ratio entries by magnitude, times lambda), dare (random "
                           "drop, seeded per matrix), fixed_rank (top-k singular components), mp_edge (cut at the "
                           "Marchenko-Pastur edge), optimal_shrink (Gavish-Donoho 2017 Frobenius shrinker)",
                           typing.get_args(MethodName)),
        "target_rho": FlagSpec("target_rho", None, "bisect the method's knob (dg_hard/mp_edge scale, wise_ft alpha, "
                               "ties keep-ratio, dare drop-prob, fixed_rank rank) so the global ||delta*||_F / "
                               "||delta||_F equals this, from cached spectra and curves", type=float),
    }
    for param in METHOD_PARAMS:
        owner = next(METHODS[m] for m in METHODS if param in method_fields(m))
        f = next(f for f in dataclasses.fields(owner) if f.name == param)
        hint = typing.get_type_hints(owner)[param]
        specs[param] = FlagSpec(param, f.default, METHOD_HELP[param], literal_choices(hint) or None)
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            specs[f.name] = FlagSpec(f.name, f.default, f.metadata["help"], literal_choices(hints[f.name]) or None,
                                     metavar=f.metadata.get("metavar"), repeatable=bool(f.metadata.get("repeatable")))
    return [specs[name] for name in FLAT_ORDER]


@dataclass(frozen=True)
class RepairConfig:
    """Everything a repair run needs, validated on construction (each section validates its own fields)."""

    inputs: InputOptions = field(default_factory=InputOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    scope: ScopeOptions = field(default_factory=ScopeOptions)
    formats: FormatOptions = field(default_factory=FormatOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def __post_init__(self) -> None:
        if is_object_uri(self.output.emit_adapter):
            raise InputError(f"--emit-adapter {self.output.emit_adapter}: the adapter is written to a local or "
                             "shared-filesystem directory; choose one (and copy it to the bucket afterwards).")
        if is_object_uri(self.output.out) and self.output.emit_adapter:
            raise InputError(f"--emit-adapter with an object-store --out ({self.output.out}) is not supported: the "
                             "adapter is assembled from parts on one filesystem. Run with a local --out to export "
                             "the adapter, or drop --emit-adapter.")
        if self.execution.executor == "local" and self.cluster.address:
            raise InputError(f"--executor local runs in this process, so --address {self.cluster.address} would be "
                             "ignored; drop one of them (--executor ray or auto joins the cluster).")
        if self.output.lock_ttl_s <= 0:
            raise InputError(f"--lock-ttl-s must be positive (got {self.output.lock_ttl_s}).")
        if self.output.emit_adapter and not METHODS[self.method.name].spectral:
            raise InputError(f"--emit-adapter needs a spectral method (dg_hard, fixed_rank, mp_edge, optimal_shrink); "
                             f"{self.method.name} changes delta entry by entry, so its result has no low-rank "
                             "factors.")

    def repair_method(self) -> Method:
        """The configured method with its parameters (before any --target-rho resolution)."""
        return self.method.spec

    def require_paths(self, *names: str) -> None:
        missing = [n for n in names if not self.get(n)]
        if missing:
            raise InputError("missing " + ", ".join(f"--{n}" for n in missing) + " (or set it in --config).")

    def get(self, name: str) -> Any:
        """A flat option's value (`scale`, `min_numel`, ...); None for another method's parameter."""
        if name == "method":
            return self.method.name
        if name == "target_rho":
            return self.method.target_rho
        if name in METHOD_PARAMS:
            return getattr(self.method.spec, name, None)
        return getattr(getattr(self, SECTION_OF[name]), name)

    def output_affecting(self) -> dict[str, Any]:
        values = {k: self.get(k) for k in OUTPUT_AFFECTING}
        for k in ("include", "exclude", "treat_as"):
            values[k] = list(values[k])
        values.update(self.method.spec.params())
        if self.output.emit_adapter:
            values["emit_adapter"] = str(Path(self.output.emit_adapter).expanduser().resolve())
        return values

    def to_dict(self) -> dict[str, Any]:
        """The flat view (summary.json's `config`): every option, the chosen method's parameters only."""
        values = {k: self.get(k) for k in FLAT_ORDER if k not in METHOD_PARAMS}
        values.update(self.method.spec.params())
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def of(cls, **options: Any) -> RepairConfig:
        """From flat option names (`RepairConfig.of(base=..., scale=1.5)`)."""
        return cls.from_mapping(options, "arguments")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str) -> RepairConfig:
        """From flat option names, or section names holding them (`scope: {mask: mlp_only}`)."""
        return cls._from_flat(_flatten(values, source), source)

    @classmethod
    def _from_flat(cls, flat: dict[str, Any], source: str) -> RepairConfig:
        name = flat.get("method", "dg_hard")
        if name not in METHODS:
            raise InputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
        try:
            spec = build_method(name, {k: flat[k] for k in method_fields(name) if k in flat})
        except ValueError as exc:
            raise InputError(f"{exc}.") from exc
        except TypeError as exc:
            raise InputError(f"{source}: {exc}") from exc
        sections: dict[str, Any] = {}
        try:
            for sec, sec_cls in SECTIONS.items():
                sections[sec] = sec_cls(**{k: v for k, v in flat.items() if SECTION_OF.get(k) == sec})
        except TypeError as exc:
            raise InputError(f"{source}: {exc}") from exc
        return cls(method=MethodOptions(spec, flat.get("target_rho")), **sections)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RepairConfig:
        """Load a YAML file (safe loader) and apply explicit overrides (flat names) on top."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise InputError(f"config file {p}: cannot read ({exc.strerror}).") from exc
        except yaml.YAMLError as exc:
            raise InputError(f"config file {p}: invalid YAML ({exc}).") from exc
        if not isinstance(data, dict):
            raise InputError(f"config file {p}: top level must be a mapping of option: value.")
        return cls._from_flat({**_flatten(data, str(p)), **_flatten(overrides or {}, str(p))}, str(p))


def _flatten(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Flat option names from flat keys (dashes or underscores) and/or section mappings."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in SECTIONS or (name == "method" and isinstance(value, dict)):
            if not isinstance(value, dict):
                raise InputError(f"{source}: section {key!r} must be a mapping of option: value.")
            for sub, v in value.items():
                sub_name = "method" if name == "method" and sub == "name" else str(sub).replace("-", "_")
                sub_name, v = _renamed(sub_name, v, source)
                owner = "method" if sub_name in METHOD_KEYS else SECTION_OF.get(sub_name)
                if owner != name:
                    raise InputError(f"{source}: {key}.{sub} is not an option of section {key!r}"
                                     + (f"; it belongs to {owner!r}" if owner else "") + ".")
                _put(flat, sub_name, v, source)
            continue
        name, value = _renamed(name, value, source)
        if name not in SECTION_OF and name not in METHOD_KEYS:
            known = sorted({*SECTION_OF, *METHOD_KEYS})
            raise InputError(f"{source}: unknown option {key!r}; known: {', '.join(known)}.")
        _put(flat, name, value, source)
    return flat


def _put(flat: dict[str, Any], name: str, value: Any, source: str) -> None:
    """One value per option: two spellings of one option (a section and a flat key, dashes and
    underscores, in_process and executor) must agree."""
    if name in flat and flat[name] != value:
        raise InputError(f"{source}: {name} is given twice ({flat[name]!r} and {value!r}); give it once.")
    flat[name] = value


def _renamed(name: str, value: Any, source: str) -> tuple[str, Any]:
    """`in_process: true` (the option before `executor`) is `executor: local`; false is `ray`."""
    if name != LEGACY_IN_PROCESS:
        return name, value
    if not isinstance(value, bool):
        raise InputError(f"{source}: in_process must be true or false (got {value!r}); it is the older "
                         "spelling of executor: local / ray.")
    return "executor", "local" if value else "ray"
