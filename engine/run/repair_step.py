"""Execute one work unit: read its byte ranges, repair, write the output bytes in place.

This is the step shared by the in-process executor and the Ray actors: it takes paths and plan entries
(small, picklable) and writes straight into the preallocated output shards, so tensor data never
travels between processes. `repair_unit` returns the unit's manifest rows; the calibration pass has its
own step (run/calibration.py).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from ...kernels.methods import SpectralMethod, apply_method
from ...kernels.spectral import Factors
from ..io.bytes import copy_range, pwrite
from ..io.safetensors_format import TORCH_DTYPES, read_tensor
from ..output import adapter
from ..output.manifest import ManifestRow
from ..plan.kinds import QUANTIZED_KINDS, REPAIR_KINDS, SCALE_KINDS, STACK_KINDS, Kind
from ..plan.layouts import from_matrices, row_identity, to_matrices
from .jobs import EntryJob, StepSettings, batch_out_dtype, check_finite, companions, dequantize, matrix_key
from .jobs import manifest_row as _row
from .packed_step import base_values, packed_matrices, repair_packed
from .pipeline import SEQUENTIAL, Phases
from .quantized_step import quantized_matrices, repair_quantized


def repair_unit(jobs: list[EntryJob], settings: StepSettings, phases: Phases = SEQUENTIAL) -> list[ManifestRow]:
    """Execute a work unit: copies for passthrough entries, one kernel batch for repair entries.
    `phases` admits the kernels and the writes (run/pipeline.py: overlap with the worker's other unit)."""
    rows: list[ManifestRow] = []
    scales = companions(jobs)
    packed = [j for j in jobs if j.entry.packed is not None and j.entry.kind in (Kind.PACKED_INT, Kind.DEQUANT)]
    if packed:
        rows.extend(repair_packed(packed, scales, settings, phases))
    for job in jobs:
        if job.entry.kind in QUANTIZED_KINDS and job.entry.packed is None:
            rows.extend(repair_quantized(job, scales[job.entry.name][0], settings, phases))
        elif job.entry.kind not in REPAIR_KINDS and job.entry.kind not in SCALE_KINDS + QUANTIZED_KINDS:
            rows.extend(_copy_entry(job, settings, phases))
    repairs = [j for j in jobs if j.entry.kind in REPAIR_KINDS and j.entry.kind not in QUANTIZED_KINDS
               and j.entry.kind != Kind.PACKED_INT]
    if repairs:
        rows.extend(_repair_entries(repairs, settings, phases))
    return rows


def _copy_entry(job: EntryJob, settings: StepSettings, phases: Phases) -> list[ManifestRow]:
    phases.store()  # a copy reads and writes in chunks: all of it is the store phase
    start = time.perf_counter()
    e = job.entry
    digest = copy_range(job.ft_file, e.ft.begin, e.ft.end, job.out_file, e.out_begin, tensor=e.name)
    return [_row(e, None, "passthrough", None, kernel=None, begin=e.out_begin, end=e.out_end, digest=digest,
                 seconds=time.perf_counter() - start, plan_id=settings.plan_id)]


def _repair_entries(jobs: list[EntryJob], settings: StepSettings, phases: Phases) -> list[ManifestRow]:
    """Repair entries that share one matrix shape in one kernel batch (B = all their matrices)."""
    start = time.perf_counter()
    if len({j.entry.matrix_shape for j in jobs}) != 1 or (len(jobs) > 1 and any(j.entry.n_matrices != 1
                                                                                for j in jobs)):
        raise ValueError("a kernel batch needs 2-D entries of one matrix shape (stacks go alone)")
    deltas, bases, extras = [], [], []
    for job in jobs:
        delta, base32, extra = _load_delta(job)
        deltas.append(delta)
        bases.append(base32)
        extras.append(extra)
    stacked = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
    del deltas
    keys = [matrix_key(j.entry.name, j.entry.kind, i) for j in jobs for i in range(j.entry.n_matrices)]
    factors: Factors | None = [] if settings.adapter_parts and isinstance(settings.method, SpectralMethod) else None
    d_star, stats = phases.compute(apply_method, settings.method, stacked, keys, settings.kernel,
                                   device=settings.device, threads=settings.threads, factors=factors,
                                   out_dtype=batch_out_dtype(jobs), fp64_rate=settings.fp64_rate)
    del stacked
    if factors is not None:
        _save_factors(jobs, factors, Path(settings.adapter_parts))
    seconds = (time.perf_counter() - start - phases.waited) / len(stats)
    rows: list[ManifestRow] = []
    first = 0
    for job, base32, extra in zip(jobs, bases, extras, strict=True):
        e = job.entry
        mine = stats[first:first + e.n_matrices]
        repaired = d_star[first:first + e.n_matrices].add_(base32).to(TORCH_DTYPES[e.ft.dtype])
        first += e.n_matrices
        if any(st.degenerate for st in mine):  # Δ = 0 or Δ* = Δ: the fine-tuned matrix, bit for bit
            ft_mats = to_matrices(read_tensor(job.ft_file, e.ft)[:e.repair_shape[0]], e.kind, e.matrix_shape,
                                  e.layout)
            for i, st in enumerate(mine):
                if st.degenerate:
                    repaired[i] = ft_mats[i]
        whole = from_matrices(repaired, e.kind, e.repair_shape, e.layout)
        if extra.numel():
            whole = torch.cat([whole, extra])
        payload = whole.reshape(-1).view(torch.uint8).numpy()
        pwrite(job.out_file, e.out_begin, payload)
        # One byte range per matrix; the two halves of a fused expert share that expert's slab.
        slabs = e.ft.shape[0] if e.kind in STACK_KINDS else 1
        per = payload.size // slabs
        for i, st in enumerate(mine):
            expert, part = row_identity(e.kind, i)
            slab = expert if expert is not None else 0
            lo = e.out_begin + slab * per
            rows.append(_row(e, expert, st.degenerate or "repaired", st, kernel=st.backend, begin=lo, end=lo + per,
                             digest=hashlib.sha256(payload[slab * per:(slab + 1) * per]).hexdigest(),
                             seconds=seconds, plan_id=settings.plan_id, part=part))
    return rows


def _load_delta(job: EntryJob) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Δ as float32 matrices (n, m, k), W0 as float32 matrices, the fine-tune's extra vocabulary rows)."""
    e = job.entry
    base_file, base = job.base_side()
    # Upcast first, then subtract (docs/maths.md). `.to` may alias an F32 input, so the fine-tuned
    # values are consumed here and re-read later only for degenerate matrices.
    ft_t = read_tensor(job.ft_file, e.ft)
    rows_kept = e.repair_shape[0]
    extra = ft_t[rows_kept:].clone()  # new vocabulary rows (empty unless resized)
    delta = to_matrices(ft_t[:rows_kept].to(torch.float32), e.kind, e.matrix_shape, e.layout)
    if e.base_packed is not None:  # a compressed-tensors packed base of a dense fine-tune
        b_t = base_values(job)
    elif e.base_scale is not None:  # a block-FP8 base of a dense fine-tune
        b_t = dequantize(e, base_file, base, job.base_scale_file, e.base_scale)
    else:
        b_t = read_tensor(base_file, base)
    base32 = to_matrices(b_t.to(torch.float32), e.kind, e.matrix_shape, e.layout)
    check_finite(delta, e.name, job.ft_file)
    check_finite(base32, e.name, base_file)
    return delta.sub_(base32), base32, extra


def delta_matrices(job: EntryJob, aux: list[EntryJob] | None = None) -> tuple[torch.Tensor, str]:
    """Δ of a repair entry as float32 matrices, read exactly as the repair reads it (reshape, layout,
    FP8/MXFP4/packed dequantisation with each side's own scales), and the batch kind naming its matrices.
    `aux` are the jobs of its scale-like companions."""
    e = job.entry
    if e.kind == Kind.PACKED_INT:
        return packed_matrices(job, aux or []), e.batch_kind
    if e.kind in QUANTIZED_KINDS:
        _, mats1, mats0 = quantized_matrices(job, aux[0]) if aux else (None, None, None)
        if mats1 is None or mats0 is None:
            raise ValueError(f"tensor {e.name!r}: a quantized repair entry needs its scales and both sides")
        return mats1.sub_(mats0), e.batch_kind
    return _load_delta(job)[0], e.kind


def _save_factors(jobs: list[EntryJob], factors: Factors, where: Path) -> None:
    """Write the low-rank factors of every exportable matrix of the batch (--emit-adapter); `exportable`
    already excludes stacks and resized vocabularies, so an exportable entry is exactly one matrix."""
    first = 0
    for job in jobs:
        e = job.entry
        if adapter.exportable(e) is None:
            adapter.save_part(where, e.name, factors[first])
        first += e.n_matrices
