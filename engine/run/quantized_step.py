"""The repair step's quantized variant: block-FP8 and MXFP4 weights (and `dequant` entries, written
as BF16 only). Each side is dequantised with its own scales, repaired in float32 per matrix, then
re-quantised to the fine-tune's layout and scale convention, or written as BF16 (docs/formats.md).
"""

from __future__ import annotations

import hashlib
import time

import torch

from ...kernels import fp8, mxfp4
from ...kernels.methods import apply_method
from ...kernels.threshold import SpectralStats
from ..io.bytes import copy_range, pwrite, sha256_range
from ..io.safetensors_format import TORCH_DTYPES, read_tensor
from ..output.manifest import ManifestRow
from ..plan.kinds import STACK_KINDS, Kind
from ..plan.layouts import from_matrices, row_identity, to_matrices
from .jobs import EntryJob, StepSettings, check_finite, dequantize, matrix_key, policy_out_dtype, relative_error
from .jobs import manifest_row as _row
from .pipeline import SEQUENTIAL, Phases


def repair_quantized(job: EntryJob, scale_job: EntryJob, settings: StepSettings,
                     phases: Phases = SEQUENTIAL) -> list[ManifestRow]:
    """Block-FP8 / MXFP4: dequantise both checkpoints with their own scales, repair in float32 per matrix,
    then re-quantise to the fine-tune's layout and scale convention, or write BF16 (`dequant` entries
    are only converted). A matrix with Δ = 0 or Δ* = Δ keeps the fine-tune's values; when every matrix
    does and the layout is kept, the fine-tune's bytes are copied."""
    start = time.perf_counter()
    e, se = job.entry, scale_job.entry
    w1, mats1, mats0 = quantized_matrices(job, scale_job)
    stats: list[SpectralStats | None] = [None]
    w_star = w1
    if mats1 is not None and mats0 is not None:
        keys = [matrix_key(e.name, e.batch_kind, i) for i in range(mats1.shape[0])]
        d_star, stats = phases.compute(apply_method, settings.method, mats1 - mats0, keys, settings.kernel,
                                       device=settings.device, threads=settings.threads,
                                       out_dtype=policy_out_dtype(e), fp64_rate=settings.fp64_rate)
        mats = d_star.add_(mats0)
        for i, st in enumerate(stats):
            if st.degenerate:
                mats[i] = mats1[i]
        w_star = from_matrices(mats, e.batch_kind, tuple(w1.shape), e.layout)
    phases.store()  # (a `dequant` entry: nothing was computed)
    unchanged = e.kind != Kind.DEQUANT and all(st is not None and st.degenerate for st in stats)
    if e.out_dtype is None and unchanged:  # the fine-tune's bytes, weight and scales
        copy_range(job.ft_file, e.ft.begin, e.ft.end, job.out_file, e.out_begin, tensor=e.name)
        copy_range(scale_job.ft_file, se.ft.begin, se.ft.end, scale_job.out_file, se.out_begin, tensor=se.name)
        w_bytes, s_bytes, error = None, None, 0.0
    elif e.out_dtype is None:
        if e.is_mxfp4:
            codes, scale = mxfp4.quantize(w_star)
            back = mxfp4.dequantize(codes, scale)
        else:
            codes, scale = fp8.quantize(w_star, TORCH_DTYPES[se.ft.dtype], e.power_of_two_scales)
            back = fp8.dequantize(codes, scale)
        error = relative_error(back, w_star)
        w_bytes = codes.reshape(-1).view(torch.uint8).numpy()
        s_bytes = scale.reshape(-1).view(torch.uint8).numpy()
        pwrite(job.out_file, e.out_begin, w_bytes)
        pwrite(scale_job.out_file, se.out_begin, s_bytes)
    else:  # BF16 in the written orientation (an MXFP4 expert stack as transformers holds it: (in, out))
        want = (w_star.transpose(-1, -2) if e.is_mxfp4 and w_star.ndim == 3 else w_star).contiguous()
        out = want.to(TORCH_DTYPES[e.out_dtype])
        error = relative_error(out, want)
        w_bytes, s_bytes = out.reshape(-1).view(torch.uint8).numpy(), None
        pwrite(job.out_file, e.out_begin, w_bytes)
    seconds = time.perf_counter() - start - phases.waited
    rows = []
    slabs = e.ft.shape[0] if e.batch_kind in STACK_KINDS else 1
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


def quantized_matrices(job: EntryJob, scale_job: EntryJob
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(W1 dequantised, W1 and W0 as float32 matrices) of a block-FP8 / MXFP4 weight, each side with its
    own scales; no matrices for a `dequant` entry (converted only)."""
    e, se = job.entry, scale_job.entry
    w1 = dequantize(e, job.ft_file, e.ft, scale_job.ft_file, se.ft)
    check_finite(w1, e.name, job.ft_file)
    if e.kind == Kind.DEQUANT:
        return w1, None, None
    base_file, base = job.base_side()
    if e.base_scale is not None:
        w0 = dequantize(e, base_file, base, job.base_scale_file, e.base_scale)
    else:
        w0 = read_tensor(base_file, base).to(torch.float32)
    check_finite(w0, e.name, base_file)
    return (w1, to_matrices(w1, e.batch_kind, e.matrix_shape, e.layout),
            to_matrices(w0, e.batch_kind, e.matrix_shape, e.layout))


