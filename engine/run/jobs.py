"""What one call of the repair step works on, shared by its variants: the frozen settings, the jobs
(an entry with the files it reads and writes), matrix naming, and the manifest row built from a
matrix's statistics. Small and picklable: this is all that crosses to a Ray actor besides the step.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ...kernels import fp8, mxfp4
from ...kernels.methods import Method
from ...kernels.spectral import is_finite
from ...kernels.threads import threads_per_worker
from ...kernels.threshold import SpectralStats
from ..errors import RepairFailure
from ..io.bytes import ByteSource
from ..io.safetensors_format import DTYPE_BITS, TensorEntry, read_tensor
from ..output.manifest import ManifestRow
from ..plan.kinds import QUANTIZED_KINDS, SCALE_KINDS
from ..plan.layouts import row_identity
from ..plan.model import PlanEntry


@dataclass(frozen=True)
class StepSettings:
    """Everything the step needs besides the entries; frozen, small and picklable."""

    method: Method
    kernel: str
    plan_id: str
    device: str = "cpu"
    threads: int | None = None
    adapter_parts: str | None = None  # where Δ* factors of exportable matrices go (--emit-adapter)
    fp64_rate: str = "auto"  # the device's float64 speed for the precision policy (auto: from its model)


def for_workers(settings: StepSettings, *, device: str, threads: int | None) -> StepSettings:
    """The settings a pool of workers runs with (the Ray driver chooses device and threads per actor)."""
    return dataclasses.replace(settings, device=device, threads=threads)


def cpu_pool(settings: StepSettings, *, workers: int, threads: int, cpus: int) -> tuple[int, StepSettings]:
    """How many CPU workers (Ray actors, or the local executor's lanes) and the settings each runs with:
    `workers` of them (0 = one per CPU), each with `threads` compute threads (0 = the CPUs split
    between them, at least one), so N workers on N cores never oversubscribe."""
    n = workers or max(1, cpus)
    return n, for_workers(settings, device="cpu", threads=threads or threads_per_worker(n, cpus))


@dataclass(frozen=True)
class EntryJob:
    """One entry with the files it reads and the (partial) output shard it writes. An input is a
    local path or a shard object in a bucket (a RemotePath, pickled without its clients); every read
    goes through engine/io/bytes.py, which reads either."""

    entry: PlanEntry
    base_file: ByteSource | None
    ft_file: ByteSource
    out_file: Path
    base_scale_file: ByteSource | None = None  # fp8 / packed: where the base's scales live
    base_zero_point_file: ByteSource | None = None  # packed asymmetric base: where its weight_zero_point lives

    def base_side(self) -> tuple[ByteSource, TensorEntry]:
        """The base file and tensor of a repair entry (which always has one)."""
        if self.base_file is None or self.entry.base is None or self.entry.matrix_shape is None:
            raise RepairFailure(f"tensor {self.entry.name!r} is planned for repair but has no base tensor; "
                                "this is a bug in the plan, please report it.")
        return self.base_file, self.entry.base


def companions(jobs: list[EntryJob]) -> dict[str, list[EntryJob]]:
    """Weight name -> the unit's jobs of its scale-like companions (written by the weight's step)."""
    out: dict[str, list[EntryJob]] = {}
    for j in jobs:
        if j.entry.kind in SCALE_KINDS and j.entry.companion is not None:
            out.setdefault(j.entry.companion, []).append(j)
    return out


def policy_out_dtype(e: PlanEntry) -> str:
    """The output dtype the precision policy sees for an entry (a kept FP8/MXFP4 layout by its format)."""
    if e.kind in QUANTIZED_KINDS and e.out_dtype is None:
        return "MXFP4" if e.is_mxfp4 else "FP8"
    return e.written[1]


def batch_out_dtype(jobs: list[EntryJob]) -> str:
    """The output dtype the precision policy sees for a batch: the most precise one stored in it."""
    dtypes = {policy_out_dtype(j.entry) for j in jobs}
    return next(iter(dtypes)) if len(dtypes) == 1 else max(dtypes, key=lambda d: DTYPE_BITS.get(d, 32))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖_F / ‖want‖_F (a re-quantisation's error)."""
    return float((got.to(torch.float32) - want).norm() / want.norm().clamp_min(1e-30))


def matrix_key(name: str, kind: str, index: int) -> str:
    """Names one matrix of an entry (seeds DARE's stream; keys calibration rows)."""
    expert, part = row_identity(kind, index)
    return name if expert is None else f"{name}#{expert}" + (f":{part}" if part else "")


def dequantize(entry: PlanEntry, path: ByteSource, tensor: TensorEntry, scale_path: ByteSource | None,
               scale: TensorEntry | None) -> torch.Tensor:
    """float32 values of a block-FP8 or MXFP4 weight (MXFP4 in its on-disk (out, in) orientation)."""
    if scale_path is None or scale is None:
        raise RepairFailure(f"{path}: tensor {entry.name!r} is quantized but its scales were not planned; this is "
                            "a bug in the plan, please report it.")
    if entry.is_mxfp4:
        return mxfp4.dequantize(read_tensor(path, tensor), read_tensor(scale_path, scale))
    return fp8.dequantize(read_tensor(path, tensor), read_tensor(scale_path, scale))


def check_finite(t: torch.Tensor, name: str, path: ByteSource) -> None:
    """Refuse a tensor holding NaN or Inf (the one-pass test; the mask is built only to count them)."""
    if not is_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise RepairFailure(f"{path}: tensor {name!r} holds {bad} NaN/Inf value(s); DG-Hard cannot repair it. "
                            "Fix the checkpoint, or keep the fine-tuned value with --exclude "
                            f"'^{name.replace('.', chr(92) + '.')}$'.")



# The manifest columns a matrix's SpectralStats fills under the same name.
STAT_COLUMNS = tuple(f.name for f in dataclasses.fields(ManifestRow)
                     if f.name in {s.name for s in dataclasses.fields(SpectralStats)} and f.name != "precision")


def manifest_row(entry: PlanEntry, expert: int | None, status: str, st: SpectralStats | None, *,
                 kernel: str | None, begin: int, end: int, digest: str, seconds: float, plan_id: str,
                 part: str | None = None, requant_error: float | None = None) -> ManifestRow:
    stats = {k: getattr(st, k) if st else None for k in STAT_COLUMNS}
    return ManifestRow(
        tensor=entry.name, expert=expert, part=part, shard=entry.shard, shape=list(entry.ft.shape),
        dtype=entry.ft.dtype, kind=entry.kind, reason=entry.reason, status=status, **stats,
        frob_kept=st.rho * st.frob_delta if st else None,
        kernel=kernel, byte_begin=begin, byte_end=end, sha256=digest, seconds=seconds, plan_id=plan_id,
        node=socket.gethostname(), requant_error=requant_error, precision=st.precision or None if st else None,
    )
