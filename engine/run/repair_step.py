"""Execute one work unit: read its byte ranges, repair, write the output bytes in place.

This is the step shared by the in-process runner and the Ray actors: it takes paths and plan
entries (small, picklable) and writes straight into the preallocated output shards, so tensor data
never travels between processes. It returns the manifest rows for the unit.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...kernels import fp8, mxfp4
from ...kernels.methods import Method, SpectralMethod, apply_method
from ...kernels.spectral import Factors, singular_values
from ...kernels.threshold import SpectralStats
from ..errors import RepairFailure
from ..io.safetensors_format import TORCH_DTYPES, TensorEntry, read_tensor
from ..output import adapter
from ..output.manifest import ManifestRow
from ..plan.build import REPAIR_KINDS, SCALE_KINDS, PlanEntry
from ..plan.layouts import from_matrices, row_identity, to_matrices
from .calibration import CalibrationRow

COPY_CHUNK = 64 << 20
QUANTIZED_KINDS = ("fp8", "mxfp4", "dequant")  # dequantised, (repaired,) re-quantised or written as BF16


@dataclass(frozen=True)
class StepSettings:
    """Everything the step needs besides the entries; small and picklable."""

    method: Method
    kernel: str
    plan_id: str
    device: str = "cpu"
    threads: int | None = None
    # "repair" writes Δ*; "calibrate" only measures what --target-rho needs (no output bytes).
    mode: str = "repair"
    adapter_parts: str | None = None  # where Δ* factors of exportable matrices go (--emit-adapter)


@dataclass(frozen=True)
class EntryJob:
    """One entry with the files it reads and the (partial) output shard it writes."""

    entry: PlanEntry
    base_file: Path | None
    ft_file: Path
    out_file: Path
    base_scale_file: Path | None = None  # fp8: where the base's block scales live


def matrix_key(name: str, kind: str, index: int) -> str:
    """Names one matrix of an entry (seeds DARE's stream; keys calibration rows)."""
    expert, part = row_identity(kind, index)
    return name if expert is None else f"{name}#{expert}" + (f":{part}" if part else "")


def execute_unit(jobs: list[EntryJob], settings: StepSettings) -> list:
    """Execute a work unit: copies for passthrough entries, one kernel batch for repair entries.

    Returns manifest rows, or calibration rows when `settings.mode` is "calibrate"."""
    if settings.mode == "calibrate":
        return calibrate_unit(jobs, settings)
    rows: list[ManifestRow] = []
    scales = {j.entry.companion: j for j in jobs if j.entry.kind in SCALE_KINDS}
    for job in jobs:
        if job.entry.kind in QUANTIZED_KINDS:
            rows.extend(_repair_quantized(job, scales[job.entry.name], settings))
        elif job.entry.kind not in REPAIR_KINDS and job.entry.kind not in SCALE_KINDS:
            rows.extend(_copy_entry(job, settings))
    repairs = [j for j in jobs if j.entry.kind in REPAIR_KINDS and j.entry.kind not in QUANTIZED_KINDS]
    if repairs:
        rows.extend(_repair_entries(repairs, settings))
    return rows


def _dequantize(entry: PlanEntry, path: Path, tensor: TensorEntry, scale_path: Path,
                scale: TensorEntry) -> torch.Tensor:
    """float32 values of a block-FP8 or MXFP4 weight (MXFP4 in its on-disk (out, in) orientation)."""
    if entry.is_mxfp4:
        return mxfp4.dequantize(read_tensor(path, tensor), read_tensor(scale_path, scale))
    return fp8.dequantize(read_tensor(path, tensor), read_tensor(scale_path, scale))


def _repair_quantized(job: EntryJob, scale_job: EntryJob, settings: StepSettings) -> list[ManifestRow]:
    """Block-FP8 / MXFP4: dequantise both checkpoints with their own scales, repair in float32 per matrix,
    then re-quantise to the fine-tune's layout and scale convention, or write BF16 (`dequant` entries
    are only converted). A matrix with Δ = 0 or Δ* = Δ keeps the fine-tune's values; when every matrix
    does and the layout is kept, the fine-tune's bytes are copied."""
    start = time.perf_counter()
    e, se = job.entry, scale_job.entry
    w1, mats1, mats0 = _quantized_matrices(job, scale_job)
    stats: list[SpectralStats | None] = [None]
    w_star = w1
    if mats1 is not None and mats0 is not None:
        keys = [matrix_key(e.name, e.batch_kind, i) for i in range(mats1.shape[0])]
        d_star, stats = apply_method(settings.method, mats1 - mats0, keys, settings.kernel,
                                     device=settings.device, threads=settings.threads)
        mats = d_star.add_(mats0)
        for i, st in enumerate(stats):
            if st.degenerate:
                mats[i] = mats1[i]
        w_star = from_matrices(mats, e.batch_kind, tuple(w1.shape), e.layout)
    unchanged = e.kind != "dequant" and all(st is not None and st.degenerate for st in stats)
    if e.out_dtype is None and unchanged:  # the fine-tune's bytes, weight and scales
        _copy_range(job.ft_file, e.ft.begin, e.ft.end, job.out_file, e.out_begin)
        _copy_range(scale_job.ft_file, se.ft.begin, se.ft.end, scale_job.out_file, se.out_begin)
        w_bytes, s_bytes, error = None, None, 0.0
    elif e.out_dtype is None:
        if e.is_mxfp4:
            codes, scale = mxfp4.quantize(w_star)
            back = mxfp4.dequantize(codes, scale)
        else:
            codes, scale = fp8.quantize(w_star, TORCH_DTYPES[se.ft.dtype], e.power_of_two_scales)
            back = fp8.dequantize(codes, scale)
        error = _relative_error(back, w_star)
        w_bytes = codes.reshape(-1).view(torch.uint8).numpy()
        s_bytes = scale.reshape(-1).view(torch.uint8).numpy()
        _pwrite(job.out_file, e.out_begin, w_bytes)
        _pwrite(scale_job.out_file, se.out_begin, s_bytes)
    else:  # BF16 in the written orientation (an MXFP4 expert stack as transformers holds it: (in, out))
        want = (w_star.transpose(-1, -2) if e.is_mxfp4 and w_star.ndim == 3 else w_star).contiguous()
        out = want.to(TORCH_DTYPES[e.out_dtype])
        error = _relative_error(out, want)
        w_bytes, s_bytes = out.reshape(-1).view(torch.uint8).numpy(), None
        _pwrite(job.out_file, e.out_begin, w_bytes)
    seconds = time.perf_counter() - start
    rows = []
    slabs = e.ft.shape[0] if e.batch_kind in ("experts", "experts_fused") else 1
    per = e.out_nbytes // slabs
    for i, st in enumerate(stats):
        expert, part = row_identity(e.batch_kind, i) if st is not None else (None, None)
        lo = e.out_begin + (expert or 0) * per
        hi = lo + per if slabs > 1 else e.out_end
        digest = (hashlib.sha256(w_bytes[lo - e.out_begin:hi - e.out_begin]).hexdigest() if w_bytes is not None
                  else sha256_range(job.out_file, lo, hi))
        status = "dequantized" if st is None else (st.degenerate or "repaired")
        rows.append(_row(e, expert, status, st, kernel=st.backend if st else None, begin=lo, end=hi, digest=digest,
                         seconds=seconds / len(stats), plan_id=settings.plan_id, part=part, requant_error=error))
    if se.dropped:
        rows.append(_row(se, None, "dropped", None, kernel=None, begin=se.out_begin, end=se.out_begin,
                         digest=hashlib.sha256(b"").hexdigest(), seconds=0.0, plan_id=settings.plan_id))
    else:
        s_digest = (hashlib.sha256(s_bytes).hexdigest() if s_bytes is not None
                    else sha256_range(scale_job.out_file, se.out_begin, se.out_end))
        rows.append(_row(se, None, "passthrough" if s_bytes is None else "rewritten", None, kernel=None,
                         begin=se.out_begin, end=se.out_end, digest=s_digest, seconds=0.0, plan_id=settings.plan_id))
    return rows


def _quantized_matrices(job: EntryJob, scale_job: EntryJob
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(W1 dequantised, W1 and W0 as float32 matrices) of a block-FP8 / MXFP4 weight, each side with its
    own scales; no matrices for a `dequant` entry (converted only)."""
    e, se = job.entry, scale_job.entry
    w1 = _dequantize(e, job.ft_file, e.ft, scale_job.ft_file, se.ft)
    _check_finite(w1, e.name, job.ft_file)
    if e.kind == "dequant":
        return w1, None, None
    assert job.base_file is not None and e.base is not None and e.matrix_shape is not None
    if e.base_scale is not None:
        assert job.base_scale_file is not None
        w0 = _dequantize(e, job.base_file, e.base, job.base_scale_file, e.base_scale)
    else:
        w0 = read_tensor(job.base_file, e.base).to(torch.float32)
    _check_finite(w0, e.name, job.base_file)
    return (w1, to_matrices(w1, e.batch_kind, e.matrix_shape, e.layout),
            to_matrices(w0, e.batch_kind, e.matrix_shape, e.layout))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.to(torch.float32) - want).norm() / want.norm().clamp_min(1e-30))


def _copy_entry(job: EntryJob, settings: StepSettings) -> list[ManifestRow]:
    start = time.perf_counter()
    e = job.entry
    digest = _copy_range(job.ft_file, e.ft.begin, e.ft.end, job.out_file, e.out_begin)
    return [_row(e, None, "passthrough", None, kernel=None, begin=e.out_begin, end=e.out_end, digest=digest,
                 seconds=time.perf_counter() - start, plan_id=settings.plan_id)]


def _repair_entries(jobs: list[EntryJob], settings: StepSettings) -> list[ManifestRow]:
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
    d_star, stats = apply_method(settings.method, stacked, keys, settings.kernel, device=settings.device,
                                 threads=settings.threads, factors=factors)
    del stacked
    if factors is not None:
        _save_factors(jobs, factors, Path(settings.adapter_parts))
    seconds = (time.perf_counter() - start) / len(stats)
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
        _pwrite(job.out_file, e.out_begin, payload)
        # One byte range per matrix; the two halves of a fused expert share that expert's slab.
        slabs = e.ft.shape[0] if e.kind in ("experts", "experts_fused") else 1
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
    assert job.base_file is not None and e.base is not None and e.matrix_shape is not None
    # Upcast first, then subtract (SPEC §1.1). `.to` may alias an F32 input, so the fine-tuned
    # values are consumed here and re-read later only for degenerate matrices.
    ft_t = read_tensor(job.ft_file, e.ft)
    rows_kept = e.repair_shape[0]
    extra = ft_t[rows_kept:].clone()  # new vocabulary rows (empty unless resized)
    delta = to_matrices(ft_t[:rows_kept].to(torch.float32), e.kind, e.matrix_shape, e.layout)
    if e.base_scale is not None:  # a block-FP8 base of a dense fine-tune
        assert job.base_scale_file is not None
        b_t = _dequantize(e, job.base_file, e.base, job.base_scale_file, e.base_scale)
    else:
        b_t = read_tensor(job.base_file, e.base)
    base32 = to_matrices(b_t.to(torch.float32), e.kind, e.matrix_shape, e.layout)
    _check_finite(delta, e.name, job.ft_file)
    _check_finite(base32, e.name, job.base_file)
    return delta.sub_(base32), base32, extra


def delta_matrices(job: EntryJob, scale_job: EntryJob | None = None) -> tuple[torch.Tensor, str]:
    """Δ of a repair entry as float32 matrices, read exactly as the repair reads it (reshape, layout,
    FP8/MXFP4 dequantisation with each side's own scales), and the batch kind naming its matrices."""
    e = job.entry
    if e.kind in QUANTIZED_KINDS:
        assert scale_job is not None
        _, mats1, mats0 = _quantized_matrices(job, scale_job)
        assert mats1 is not None and mats0 is not None
        return mats1.sub_(mats0), e.batch_kind
    return _load_delta(job)[0], e.kind


def calibrate_unit(jobs: list[EntryJob], settings: StepSettings) -> list[CalibrationRow]:
    """Per matrix: Σ Δ² and the method's calibration curve (the spectrum for a spectral method)."""
    method = settings.method
    scales = {j.entry.companion: j for j in jobs if j.entry.kind in SCALE_KINDS}
    out: list[CalibrationRow] = []
    for job in jobs:
        e = job.entry
        if e.kind not in REPAIR_KINDS:  # passthrough, scales, and `dequant` (converted, never repaired)
            continue
        start = time.perf_counter()
        mats, kind = delta_matrices(job, scales.get(e.name))
        mine = []
        for i in range(mats.shape[0]):
            d = mats[i]
            key = matrix_key(e.name, kind, i)
            if isinstance(method, SpectralMethod):
                curve = singular_values(d.contiguous(), settings.kernel, device=settings.device)
            else:
                curve = method.curve(d, key)
            expert, part = row_identity(kind, i)
            mine.append(CalibrationRow(tensor=e.name, expert=expert, part=part, rows=int(d.shape[0]),
                                       cols=int(d.shape[1]), energy=float(torch.sum(d.double() ** 2)),
                                       curve=[float(x) for x in curve], plan_id=settings.plan_id, seconds=0.0))
        per = (time.perf_counter() - start) / len(mine)  # the entry's time, shared by its matrices
        out.extend(replace(r, seconds=per) for r in mine)
    return out


def _save_factors(jobs: list[EntryJob], factors: Factors, where: Path) -> None:
    """Write the low-rank factors of every exportable matrix of the batch (--emit-adapter); `exportable`
    already excludes stacks and resized vocabularies, so an exportable entry is exactly one matrix."""
    first = 0
    for job in jobs:
        e = job.entry
        if adapter.exportable(e) is None:
            adapter.save_part(where, e.name, factors[first])
        first += e.n_matrices


def _check_finite(t: torch.Tensor, name: str, path: Path) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise RepairFailure(f"{path}: tensor {name!r} holds {bad} NaN/Inf value(s); DG-Hard cannot repair it. "
                            "Fix the checkpoint, or keep the fine-tuned value with --exclude "
                            f"'^{name.replace('.', chr(92) + '.')}$'.")


def _row(entry: PlanEntry, expert: int | None, status: str, st: SpectralStats | None, *, kernel: str | None,
         begin: int, end: int, digest: str, seconds: float, plan_id: str, part: str | None = None,
         requant_error: float | None = None) -> ManifestRow:
    return ManifestRow(
        tensor=entry.name, expert=expert, part=part, shard=entry.shard, shape=list(entry.ft.shape),
        dtype=entry.ft.dtype,
        kind=entry.kind, reason=entry.reason, status=status,
        rank_total=st.rank_total if st else None, rank_kept=st.rank_kept if st else None,
        beta=st.beta if st else None, omega=st.omega if st else None, s_max=st.s_max if st else None,
        s_med=st.s_med if st else None, sigma_hat=st.sigma_hat if st else None, tau=st.tau if st else None,
        mp_edge=st.mp_edge if st else None, fallback=st.fallback if st else None,
        noise_energy_fraction=st.noise_energy_fraction if st else None,
        rho=st.rho if st else None, frob_delta=st.frob_delta if st else None,
        frob_kept=st.rho * st.frob_delta if st else None,
        kernel=kernel, byte_begin=begin, byte_end=end, sha256=digest, seconds=seconds, plan_id=plan_id,
        node=socket.gethostname(), requant_error=requant_error,
    )


def _pwrite(path: Path, offset: int, data) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        _pwrite_fd(fd, offset, data)
    finally:
        os.close(fd)


def _pwrite_fd(fd: int, offset: int, data) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _copy_range(src: Path, begin: int, end: int, dst: Path, dst_begin: int) -> str:
    """Copy bytes [begin, end) of src to dst at dst_begin, hashing them on the way."""
    digest = hashlib.sha256()
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(dst, os.O_WRONLY)
    try:
        pos = begin
        while pos < end:
            chunk = os.pread(fin, min(COPY_CHUNK, end - pos), pos)
            if not chunk:
                raise RepairFailure(f"{src}: unexpected end of file at byte {pos}; the file is truncated.")
            digest.update(chunk)
            _pwrite_fd(fout, dst_begin + pos - begin, chunk)
            pos += len(chunk)
    finally:
        os.close(fin)
        os.close(fout)
    return digest.hexdigest()


def sha256_range(path: Path, begin: int, end: int) -> str:
    """Hash bytes [begin, end) of a file (resume verification)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = begin
        while pos < end:
            chunk = os.pread(fd, min(COPY_CHUNK, end - pos), pos)
            if not chunk:
                break
            digest.update(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()
