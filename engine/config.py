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

from ..kernels.spectral import BACKENDS
from .errors import InputError
from .layouts import FUSED_LAYOUTS
from .scope import MASK_PRESETS, LayerMask

# Fields that change the output bytes; they (and the inputs' fingerprints) make the plan id.
OUTPUT_AFFECTING = ("scale", "min_numel", "mask", "include", "exclude", "median", "kernel", "fused_layout",
                    "out_dtype", "packed_int4", "treat_as")
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
    scale: float = _opt(1.0, "multiplier on the DG threshold tau (1.0 = Gavish-Donoho optimal)")
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
        return {k: getattr(self, k) for k in OUTPUT_AFFECTING}

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
