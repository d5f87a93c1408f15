"""Execute one plan entry: read its byte ranges, repair, write the output bytes in place.

This is the unit of work shared by the in-process runner and the Ray actors: it takes paths and a
plan entry (small, picklable) and writes straight into the preallocated output shard, so tensor
data never travels between processes. It returns the manifest rows for the entry.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from ..kernels.spectral import SpectralStats, ThresholdParams, repair_batch
from .errors import RepairFailure
from .manifest import ManifestRow
from .plan import REPAIR_KINDS, PlanEntry
from .safetensors_format import TORCH_DTYPES, read_tensor

COPY_CHUNK = 64 << 20


def execute_entry(entry: PlanEntry, base_file: Path | None, ft_file: Path, out_file: Path,
                  params: ThresholdParams, kernel: str, plan_id: str) -> list[ManifestRow]:
    """Repair or copy one tensor into `out_file` at the fine-tune's offsets."""
    start = time.perf_counter()
    if entry.kind not in REPAIR_KINDS:
        digest = _copy_range(ft_file, entry.ft.begin, entry.ft.end, out_file, entry.out_begin)
        return [_row(entry, None, "passthrough", None, kernel=None, begin=entry.out_begin, end=entry.out_end,
                     digest=digest, seconds=time.perf_counter() - start, plan_id=plan_id)]
    assert base_file is not None and entry.base is not None and entry.matrix_shape is not None
    out_dtype = TORCH_DTYPES[entry.ft.dtype]
    batch = (entry.n_matrices, *entry.matrix_shape)
    # Upcast first, then subtract (SPEC §1.1). `.to` may alias an F32 input, so the fine-tuned
    # values are consumed here and re-read below only for degenerate matrices.
    delta = read_tensor(ft_file, entry.ft).to(torch.float32).reshape(batch)
    base32 = read_tensor(base_file, entry.base).to(torch.float32).reshape(batch)
    _check_finite(delta, entry.name, ft_file)
    _check_finite(base32, entry.name, base_file)
    delta.sub_(base32)
    d_star, stats = repair_batch(delta, params, kernel)
    del delta
    repaired = d_star.add_(base32).to(out_dtype)  # W* = W0 + Δ*, in float32, cast once
    del d_star, base32
    if any(st.degenerate for st in stats):  # Δ = 0 or Δ* = Δ: the fine-tuned matrix, bit for bit
        ft_mats = read_tensor(ft_file, entry.ft).reshape(batch)
        for i, st in enumerate(stats):
            if st.degenerate:
                repaired[i] = ft_mats[i]
    payload = repaired.reshape(-1).view(torch.uint8).numpy()
    _pwrite(out_file, entry.out_begin, payload)
    seconds = time.perf_counter() - start
    per = payload.size // entry.n_matrices
    rows = []
    for i, st in enumerate(stats):
        lo = entry.out_begin + i * per
        digest = hashlib.sha256(payload[i * per:(i + 1) * per]).hexdigest()
        expert = i if entry.kind == "experts" else None
        status = st.degenerate or "repaired"
        rows.append(_row(entry, expert, status, st, kernel=kernel, begin=lo, end=lo + per, digest=digest,
                         seconds=seconds / entry.n_matrices, plan_id=plan_id))
    return rows


def _check_finite(t: torch.Tensor, name: str, path: Path) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise RepairFailure(f"{path}: tensor {name!r} holds {bad} NaN/Inf value(s); DG-Hard cannot repair it. "
                            "Fix the checkpoint, or keep the fine-tuned value with --exclude "
                            f"'^{name.replace('.', chr(92) + '.')}$'.")


def _row(entry: PlanEntry, expert: int | None, status: str, st: SpectralStats | None, *, kernel: str | None,
         begin: int, end: int, digest: str, seconds: float, plan_id: str) -> ManifestRow:
    return ManifestRow(
        tensor=entry.name, expert=expert, shard=entry.shard, shape=list(entry.ft.shape), dtype=entry.ft.dtype,
        kind=entry.kind, reason=entry.reason, status=status,
        rank_total=st.rank_total if st else None, rank_kept=st.rank_kept if st else None,
        beta=st.beta if st else None, omega=st.omega if st else None, s_max=st.s_max if st else None,
        s_med=st.s_med if st else None, sigma_hat=st.sigma_hat if st else None, tau=st.tau if st else None,
        mp_edge=st.mp_edge if st else None,
        noise_energy_fraction=st.noise_energy_fraction if st else None,
        rho=st.rho if st else None, frob_delta=st.frob_delta if st else None,
        frob_kept=st.rho * st.frob_delta if st else None,
        kernel=kernel, byte_begin=begin, byte_end=end, sha256=digest, seconds=seconds, plan_id=plan_id,
    )


def _pwrite(path: Path, offset: int, data) -> None:
    view = memoryview(data).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)


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
            view = memoryview(chunk)
            done = 0
            while done < len(view):
                done += os.pwrite(fout, view[done:], dst_begin + pos - begin + done)
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
