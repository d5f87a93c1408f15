"""The one typed configuration object behind the CLI flags, the YAML config file and the Ray job.

Each field's metadata carries its CLI help, so the CLI is generated from this class and cannot
drift from it; a YAML file uses the same names (dashes or underscores).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..kernels.methods import METHODS, Method, build_method, method_fields
from ..kernels.spectral import BACKENDS
from .errors import InputError
from .plan.layouts import FUSED_LAYOUTS
from .plan.scope import MASK_PRESETS, LayerMask

# Fields that change the output bytes; they (and the inputs' fingerprints) make the plan id.
# The method's own parameters are added by `output_affecting` (only those of the chosen method).
OUTPUT_AFFECTING = ("method", "min_numel", "mask", "include", "exclude", "kernel", "fused_layout", "target_rho",
                    "emit_adapter", "out_dtype", "packed_int4", "treat_as")
TREAT_AS_KINDS = ("experts", "conv", "passthrough")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=list, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RepairConfig:
    """Everything a repair run needs; validated on construction."""

    base: str | None = _opt(None, "base checkpoint directory (safetensors)")
    ft: str | None = _opt(None, "fine-tuned checkpoint directory (safetensors)")
    out: str | None = _opt(None, "output directory for the repaired checkpoint")
    method: str = _opt("dg_hard", "repair method: dg_hard (the paper's DG threshold), wise_ft (alpha * delta), ties "
                       "(top keep-ratio entries by magnitude, times lambda), dare (random drop, seeded per matrix), "
                       "fixed_rank (top-k singular components), mp_edge (cut at the Marchenko-Pastur edge), "
                       "optimal_shrink (Gavish-Donoho 2017 Frobenius shrinker)", choices=tuple(METHODS))
    scale: float = _opt(1.0, "dg_hard / mp_edge: multiplier on the cut (tau, or the MP edge); 1.0 = as defined")
    alpha: float = _opt(0.5, "wise_ft: weight of the fine-tune, W* = W0 + alpha * delta")
    keep_ratio: float = _opt(0.2, "ties: fraction of each matrix's entries kept, by magnitude")
    ties_lambda: float = _opt(1.0, "ties: scale applied to the kept entries")
    drop_prob: float = _opt(0.25, "dare: probability of dropping each entry")
    dare_rescale: bool = _opt(True, "dare: rescale survivors by 1/(1-p) (--no-dare-rescale = DARE-Linear)")
    seed: int = _opt(0, "dare: seed of the per-matrix random streams")
    rank: int = _opt(16, "fixed_rank: singular components kept per matrix")
    target_rho: float | None = _opt(None, "bisect the method's knob (dg_hard/mp_edge scale, wise_ft alpha, ties "
                                    "keep-ratio, dare drop-prob, fixed_rank rank) so the global "
                                    "||delta*||_F / ||delta||_F equals this, from cached spectra and curves",
                                    type=float)
    emit_adapter: str | None = _opt(None, "also write delta* as a PEFT LoRA adapter into this directory "
                                    "(spectral methods; plain Linear / Embedding weights)")
    min_numel: int = _opt(1024, "tensors with fewer elements keep the fine-tuned value")
    mask: str = _opt("all", "layer-mask preset", choices=tuple(MASK_PRESETS))
    include: list[str] = _opt([], "regex; only matching tensors are repaired (repeatable)")
    exclude: list[str] = _opt([], "regex; matching tensors keep the fine-tuned value (repeatable)")
    median: str = _opt("lower", "median convention for s_med", choices=("lower", "mean"))
    kernel: str = _opt("auto", "spectral backend: auto (gram64; exact SVD when min(m, n) <= 32), exact = "
                       "float64 SVD, gram64 = float64 Gram + top-r eigenvectors, gram32 = float32 Gram guarded "
                       "by a float64 fallback", choices=BACKENDS)
    fused_layout: str = _opt("auto", "layout of fused experts.gate_up_proj stacks: auto (from config.json "
                             "model_type), out_in_concat [E,2I,H], in_out_concat [E,H,2I], in_out_interleaved",
                             choices=("auto", *FUSED_LAYOUTS))
    out_dtype: str = _opt("keep", "quantized weights (block-FP8, MXFP4): keep = re-quantize to the fine-tune's "
                          "layout; bf16 = write BF16, drop the scale tensors and config.json's quantization_config",
                          choices=("keep", "bf16"))
    packed_int4: str = _opt("refuse", "packed INT4 tensors (compressed-tensors weight_packed/weight_scale): refuse, "
                            "or passthrough = copy the fine-tune's tensors verbatim (never repaired)",
                            choices=("refuse", "passthrough"))
    treat_as: list[str] = _opt([], "REGEX=KIND (KIND: experts, conv, passthrough); overrides how a matching tensor "
                               "with more than 2 axes is classified (repeatable; first match wins)",
                               metavar="REGEX=KIND")
    device: str = _opt("auto", "where the spectral work runs: auto (cuda when available), cpu, cuda, cuda:N")
    threads: int = _opt(0, "BLAS threads per CPU worker (0 = all cores in-process; cores / workers on Ray)")
    batch_mb: int = _opt(256, "memory budget (MiB) for batching same-shape matrices into one kernel call")
    address: str | None = _opt(None, "Ray cluster address to join (default: RAY_ADDRESS, else start a local Ray)")
    workers: int = _opt(0, "worker actors (0 = one per GPU, or one per CPU core without GPUs)")
    in_process: bool = _opt(False, "run in this process without Ray (small models, debugging)")
    max_attempts: int = _opt(3, "a unit that kills its worker this many times is marked failed")
    inflight_per_worker: int = _opt(2, "units in flight per worker (the second overlaps I/O with compute)")
    unit_timeout_s: float = _opt(600.0, "base deadline per unit; a cost-proportional allowance is added")
    commit_interval_s: float = _opt(10.0, "commit the manifest at least this often (bounds work lost in a crash)")
    force: bool = _opt(False, "overwrite an output directory that holds a different dgrepair run")
    progress: bool = _opt(True, "show a progress bar on stderr")

    def __post_init__(self) -> None:
        if not (self.scale > 0):
            raise InputError(f"scale must be > 0, got {self.scale!r}.")
        self.check_method()
        if self.min_numel < 0:
            raise InputError(f"min_numel must be >= 0, got {self.min_numel!r}.")
        if self.median not in ("lower", "mean"):
            raise InputError(f"median must be 'lower' or 'mean', got {self.median!r}.")
        if self.workers < 0 or self.max_attempts < 1 or self.inflight_per_worker < 1 or self.unit_timeout_s <= 0:
            raise InputError("workers must be >= 0, max_attempts and inflight_per_worker >= 1, unit_timeout_s > 0.")
        if self.threads < 0 or self.batch_mb < 1:
            raise InputError(f"threads must be >= 0 and batch_mb >= 1 (got {self.threads}, {self.batch_mb}).")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise InputError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}.")
        if self.fused_layout not in ("auto", *FUSED_LAYOUTS):
            raise InputError(f"fused_layout must be auto or one of {', '.join(FUSED_LAYOUTS)}.")
        if self.kernel not in BACKENDS:
            raise InputError(f"kernel must be one of {', '.join(BACKENDS)}, got {self.kernel!r}.")
        if self.out_dtype not in ("keep", "bf16") or self.packed_int4 not in ("refuse", "passthrough"):
            raise InputError(f"out_dtype must be keep or bf16 (got {self.out_dtype!r}); packed_int4 refuse or "
                             f"passthrough (got {self.packed_int4!r}).")
        self.include = list(self.include)
        self.exclude = list(self.exclude)
        self.treat_as = list(self.treat_as)
        self.treat_as_rules()  # validates REGEX=KIND
        self.layer_mask()  # validates the preset and the regexes

    def check_method(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        p_max_ok = self.drop_prob < 1.0 or not self.dare_rescale
        if not (0.0 <= self.keep_ratio <= 1.0) or not (0.0 <= self.drop_prob <= 1.0 and p_max_ok) or self.rank < 0:
            raise InputError("keep_ratio must be in [0, 1], drop_prob in [0, 1) ([0, 1] with --no-dare-rescale) and "
                             f"rank >= 0 (got {self.keep_ratio}, {self.drop_prob}, {self.rank}).")
        if self.target_rho is not None:
            if not (0.0 < self.target_rho <= 1.0):
                raise InputError(f"target_rho must be in (0, 1], got {self.target_rho!r}.")
            try:
                self.repair_method().check_target()
            except ValueError as exc:
                raise InputError(str(exc) + ".") from exc
        if self.emit_adapter and not METHODS[self.method].spectral:
            raise InputError(f"--emit-adapter needs a spectral method (dg_hard, fixed_rank, mp_edge, optimal_shrink); "
                             f"{self.method} changes delta entry by entry, so its result has no low-rank factors.")

    def repair_method(self) -> Method:
        """The configured method with its parameters (before any --target-rho resolution)."""
        return build_method(self.method, {**self.to_dict()})

    def treat_as_rules(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        """Compiled `--treat-as REGEX=KIND` overrides, in the order given."""
        rules = []
        for item in self.treat_as:
            pattern, sep, kind = str(item).rpartition("=")
            if not sep or not pattern or kind not in TREAT_AS_KINDS:
                raise InputError(f"treat_as {item!r}: expected REGEX=KIND with KIND one of "
                                 f"{', '.join(TREAT_AS_KINDS)}.")
            try:
                rules.append((re.compile(pattern), kind))
            except re.error as exc:
                raise InputError(f"treat_as {item!r}: invalid regular expression ({exc}).") from exc
        return tuple(rules)

    def layer_mask(self) -> LayerMask:
        return LayerMask(self.mask, tuple(self.include), tuple(self.exclude))

    def require_paths(self, *names: str) -> None:
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            raise InputError("missing " + ", ".join(f"--{n}" for n in missing) + " (or set it in --config).")

    def output_affecting(self) -> dict[str, Any]:
        values = {k: getattr(self, k) for k in OUTPUT_AFFECTING}
        values.update({k: getattr(self, k) for k in method_fields(self.method)})
        if self.emit_adapter:
            values["emit_adapter"] = str(Path(self.emit_adapter).expanduser().resolve())
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str) -> RepairConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise InputError(f"{source}: unknown option {key!r}; known: {', '.join(sorted(known))}.")
            clean[name] = value
        try:
            return cls(**clean)
        except TypeError as exc:
            raise InputError(f"{source}: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RepairConfig:
        """Load a YAML file (safe loader) and apply explicit overrides on top."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise InputError(f"config file {p}: cannot read ({exc.strerror}).") from exc
        except yaml.YAMLError as exc:
            raise InputError(f"config file {p}: invalid YAML ({exc}).") from exc
        if not isinstance(data, dict):
            raise InputError(f"config file {p}: top level must be a mapping of option: value.")
        return cls.from_mapping({**data, **(overrides or {})}, str(p))
