"""The repair step for compressed-tensors packed weights (ADR 0010): dequantise each side with its own scales,
repair the unit's same-shape matrices in one float32 kernel batch (each its own τ), then re-quantise with
fresh scales into the fine-tune's layout, or write BF16 `X.weight` (`--out-dtype bf16`).

A packed weight's unit also holds its companions (`weight_scale`, `weight_zero_point`, `weight_shape`): they
are rewritten, copied or dropped here, never on their own.
"""

from __future__ import annotations

import hashlib
import time

import torch

from ...kernels import packed_int
from ...kernels.methods import apply_method
from ...kernels.threshold import SpectralStats
from ..io.bytes import ByteSource
from ..io.bytes import copy_range as _copy_range
from ..io.bytes import pwrite as _pwrite
from ..io.safetensors_format import TORCH_DTYPES, read_tensor
from ..output.manifest import ManifestRow
from ..plan.model import PackedModule
from .jobs import EntryJob, StepSettings, matrix_key, relative_error
from .jobs import check_finite as _check_finite
from .jobs import manifest_row as _row
from .pipeline import SEQUENTIAL, Phases


def module_values(mod: PackedModule, packed_file: ByteSource, scale_file: ByteSource,
                  zp_file: ByteSource | None) -> torch.Tensor:
    """float32 [rows, cols] of one stored packed module."""
    zp = read_tensor(zp_file, mod.zero_point) if mod.zero_point is not None and zp_file is not None else None
    return packed_int.dequantize(read_tensor(packed_file, mod.packed), read_tensor(scale_file, mod.scale), zp,
                                 mod.scheme, mod.shape)


def _by_name(aux: list[EntryJob]) -> dict[str, EntryJob]:
    return {a.entry.name: a for a in aux}


def ft_values(job: EntryJob, aux: list[EntryJob]) -> torch.Tensor:
    """The fine-tune's dequantised weight (its scale and zero point come from the unit's companion jobs)."""
    mod, by = job.entry.packed, _by_name(aux)
    assert mod is not None
    zp = by[mod.zero_point.name].ft_file if mod.zero_point is not None else None
    w = module_values(mod, job.ft_file, by[mod.scale.name].ft_file, zp)
    _check_finite(w, job.entry.name, job.ft_file)
    return w


def base_values(job: EntryJob) -> torch.Tensor:
    """The base's weight as float32: dequantised when the base stores it packed, else read and upcast."""
    e = job.entry
    assert job.base_file is not None and e.base is not None
    if e.base_packed is not None:
        assert job.base_scale_file is not None
        w = module_values(e.base_packed, job.base_file, job.base_scale_file, job.base_zero_point_file)
    else:
        w = read_tensor(job.base_file, e.base).to(torch.float32)
    _check_finite(w, e.name, job.base_file)
    return w


def packed_matrices(job: EntryJob, aux: list[EntryJob]) -> torch.Tensor:
    """Δ of a packed entry as a (1, m, n) float32 batch, read exactly as the repair reads it."""
    return (ft_values(job, aux) - base_values(job))[None]


def repair_packed(jobs: list[EntryJob], aux: dict[str, list[EntryJob]], settings: StepSettings,
                  phases: Phases = SEQUENTIAL) -> list[ManifestRow]:
    """Repair (or, for `dequant` entries, only convert) the unit's packed weights; returns manifest rows."""
    start = time.perf_counter()
    w1s = [ft_values(j, aux[j.entry.name]) for j in jobs]
    todo = [i for i, j in enumerate(jobs) if j.entry.kind != "dequant"]
    stats: list[SpectralStats | None] = [None] * len(jobs)
    w_star = list(w1s)
    if todo:
        w0s = {i: base_values(jobs[i]) for i in todo}
        deltas = torch.stack([w1s[i] - w0s[i] for i in todo])
        keys = [matrix_key(jobs[i].entry.name, "svd", 0) for i in todo]
        d_star, got = phases.compute(apply_method, settings.method, deltas, keys, settings.kernel,
                                     device=settings.device, threads=settings.threads)
        del deltas
        for k, i in enumerate(todo):
            stats[i] = got[k]
            if not got[k].degenerate:  # Δ = 0 or Δ* = Δ keeps the fine-tune's values
                w_star[i] = d_star[k].add_(w0s[i])
    phases.store()  # (`dequant` entries only: nothing was computed)
    seconds = (time.perf_counter() - start - phases.waited) / len(jobs)
    rows: list[ManifestRow] = []
    for job, w, st in zip(jobs, w_star, stats, strict=True):
        rows.extend(_write(job, aux[job.entry.name], w, st, settings, seconds))
    return rows


def _write(job: EntryJob, aux: list[EntryJob], w: torch.Tensor, st: SpectralStats | None, settings: StepSettings,
           seconds: float) -> list[ManifestRow]:
    e, mod = job.entry, job.entry.packed
    assert mod is not None
    by = _by_name(aux)
    fresh: dict[str, object] = {}  # companion name -> its new bytes (rewritten)
    if e.out_dtype is not None:  # BF16 `X.weight`; the companions are dropped
        out = w.to(TORCH_DTYPES[e.out_dtype])
        error = relative_error(out, w)
        payload = out.reshape(-1).view(torch.uint8).numpy()
        _pwrite(job.out_file, e.out_begin, payload)
        digest = hashlib.sha256(payload).hexdigest()
    elif st is not None and st.degenerate:  # the fine-tune's bytes, weight and companions
        digest = _copy_range(job.ft_file, e.ft.begin, e.ft.end, job.out_file, e.out_begin, tensor=e.name)
        error = 0.0
    else:
        scale_dtype = TORCH_DTYPES[mod.scale.dtype]
        packed, scale, zp = packed_int.quantize(w, mod.scheme, scale_dtype)
        error = relative_error(packed_int.dequantize(packed, scale, zp, mod.scheme, mod.shape), w)
        payload = packed.reshape(-1).view(torch.uint8).numpy()
        _pwrite(job.out_file, e.out_begin, payload)
        digest = hashlib.sha256(payload).hexdigest()
        fresh[mod.scale.name] = scale.reshape(-1).view(torch.uint8).numpy()
        if zp is not None and mod.zero_point is not None:
            fresh[mod.zero_point.name] = zp.reshape(-1).view(torch.uint8).numpy()
    status = "dequantized" if st is None else (st.degenerate or "repaired")
    rows = [_row(e, None, status, st, kernel=st.backend if st else None, begin=e.out_begin, end=e.out_end,
                 digest=digest, seconds=seconds, plan_id=settings.plan_id, requant_error=error)]
    for name in sorted(by):
        a = by[name]
        ae = a.entry
        if ae.dropped:
            rows.append(_row(ae, None, "dropped", None, kernel=None, begin=ae.out_begin, end=ae.out_begin,
                             digest=hashlib.sha256(b"").hexdigest(), seconds=0.0, plan_id=settings.plan_id))
            continue
        if name in fresh:
            _pwrite(a.out_file, ae.out_begin, fresh[name])
            d, status = hashlib.sha256(fresh[name]).hexdigest(), "rewritten"
        else:  # weight_shape (and every companion of an unchanged weight) keeps the fine-tune's bytes
            d, status = _copy_range(a.ft_file, ae.ft.begin, ae.ft.end, a.out_file, ae.out_begin,
                                    tensor=ae.name), "passthrough"
        rows.append(_row(ae, None, status, None, kernel=None, begin=ae.out_begin, end=ae.out_end, digest=d,
                         seconds=0.0, plan_id=settings.plan_id))
    return rows
