"""The DG-Hard spectral step on a batch of same-shape deltas `(B, m, n)` (B = 1 for a lone matrix).

Backends (`--kernel`):
- `exact`: float64 SVD, the ground truth the tests compare against.
- `gram64` (behind `auto` for F32 outputs): float64 Gram of the small side, eigenvalues, then only the
  top-r eigenvectors; Δ* = (ΔV_r)V_rᵀ. Never pays for the wide orientation.
- `gram32`: the same in float32 (TF32 off), guarded: if κ = s_max/s_med > KAPPA_MAX_F32 or a
  singular value lies within NEAR_TAU_F32 of τ, the matrix is recomputed with `gram64` and the
  stats record why (docs/adr/0004-cpu-spectral-kernels.md: float32 breaks ranks from κ ≈ 1e4).
τ and r always come from a full set of eigenvalues, never from a randomized estimate.

`auto` follows the precision policy (docs/adr/0011-precision-policy.md): the working precision
follows the output dtype and the device. Outputs stored in BF16/FP16/FP8/INT4/MXFP4 round at ~1e-3
relative or coarser, so they get the guarded `gram32`; F32 outputs get `gram64`; a device whose
float64 runs at about half its float32 rate (A100/H100/H200/B200) gets `gram64` for every output.
"""

from __future__ import annotations

import math
import typing
from contextlib import nullcontext
from typing import Literal

import numpy as np
import torch

from . import linalg
from .threads import cpu_thread_policy
from .threshold import SpectralRule, SpectralStats, threshold_spectrum

Backend = Literal["auto", "exact", "gram64", "gram32"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)

# Float working-set bound of the Gram backends (elements per streamed block: 128 MiB in float64).
DEFAULT_CHUNK_ELEMS = 1 << 24
KAPPA_MAX_F32 = 1e3
NEAR_TAU_F32 = 1e-3
AUTO_EXACT_MAX_P = 32  # below this the SVD is as cheap as anything and needs no care


# Output dtypes whose rounding (>= 2^-8 relative for BF16, coarser for FP8/INT4) dwarfs float32's 1e-3
# contract; F32/F64 outputs keep float64 working precision.
LOW_PRECISION_OUTPUTS = frozenset({"BF16", "F16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "I4", "U4", "MXFP4",
                                   "FP8", "INT4"})
Fp64Rate = Literal["auto", "fast", "slow"]
FP64_RATES: tuple[str, ...] = typing.get_args(Fp64Rate)
# (major, minor) compute capabilities whose FP64 rate is about 1/2 of FP32: P100, V100, A100,
# H100/H200, B200. The rest (T4, A10, L4, L40, RTX, GB300) run FP64 at 1/32-1/64 of FP32.
FAST_FP64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def device_fp64_fast(device: torch.device | str, fp64_rate: str = "auto") -> bool:
    """Whether float64 is cheap on `device` (`fp64_rate` fast/slow overrides the lookup). The CPU
    counts as slow: its float64 BLAS and LAPACK run at half the float32 rate."""
    if fp64_rate not in FP64_RATES:
        raise ValueError(f"fp64_rate must be one of {', '.join(FP64_RATES)}, got {fp64_rate!r}")
    if fp64_rate != "auto":
        return fp64_rate == "fast"
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    return tuple(torch.cuda.get_device_capability(dev)) in FAST_FP64_CAPABILITIES


def precision_policy(backend: str, out_dtype: str | None, device: torch.device | str = "cpu",
                     fp64_rate: str = "auto") -> tuple[str, str]:
    """(backend for matrices above the tiny-matrix cut, why): the recorded precision decision.

    `--kernel` other than auto forces its backend; auto picks from the output dtype and the device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, "forced by --kernel"
    if out_dtype is None or out_dtype.upper() not in LOW_PRECISION_OUTPUTS:
        return "gram64", f"{out_dtype or 'F32'} output"
    if device_fp64_fast(device, fp64_rate):
        return "gram64", f"{out_dtype} output, fast-FP64 device"
    return "gram32", f"{out_dtype} output"


def resolve_backend(backend: str, rows: int, cols: int, out_dtype: str | None = None,
                    device: torch.device | str = "cpu", fp64_rate: str = "auto") -> str:
    """`auto`: exact SVD for tiny matrices, else the precision policy's backend."""
    chosen, _ = precision_policy(backend, out_dtype, device, fp64_rate)
    if backend == "auto" and min(rows, cols) <= AUTO_EXACT_MAX_P:
        return "exact"
    return chosen


def resolve_device(name: str) -> str:
    """`auto` means the first CUDA device when torch sees one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here; use --device cpu or auto")
    index = name.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); choose one of those, or cuda / auto")
    return name


def _value_range(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) in one vectorised pass, no element mask: NaN propagates into both, an Inf shows in one.
    Measured at 5632 x 2048 float32: 9.9 ms, against 58-85 ms for `t != 0` or `isfinite(t)` reduced."""
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def is_zero(t: torch.Tensor) -> bool:
    """Every element is ±0 (NaN is not zero)."""
    lo, hi = _value_range(t)
    return lo == 0 and hi == 0


def is_finite(t: torch.Tensor) -> bool:
    """No element is NaN or ±Inf (an empty tensor is finite)."""
    if not t.numel():
        return True
    lo, hi = _value_range(t)
    return math.isfinite(lo) and math.isfinite(hi)


Factors = list[tuple[torch.Tensor, torch.Tensor] | None]


def repair_batch(
    delta: torch.Tensor, params: SpectralRule, backend: str = "auto",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS, device: torch.device | str | None = None,
    threads: int | None = None, factors: Factors | None = None, out_dtype: str | None = None,
    fp64_rate: str = "auto",
) -> tuple[torch.Tensor, list[SpectralStats]]:
    """A spectral rule (DG-Hard by default) on float32 deltas `(B, m, n)`; returns float32 Δ* and stats.

    `factors`, when given, receives per matrix (L (m, r), R (r, n)) in float32 on the CPU with
    Δ* = L R and balanced column/row norms (None for a degenerate or rank-0 matrix): the adapter export.

    `out_dtype` (the safetensors dtype the result is stored in) and `fp64_rate` drive `auto`'s
    precision policy; each matrix's stats record the decision (`precision`).

    Degenerate matrices come back with Δ* = Δ (callers pass the fine-tuned tensor through). Δ may
    live on the CPU while `device` is CUDA: each matrix is copied whole when it fits the free device
    memory (the next one is copied on a side stream while this one computes), else streamed in
    blocks; an out-of-memory error retries the matrix with smaller blocks, then on the CPU.
    `chunk_elems` bounds the host working set. On the CPU the work runs under
    `cpu_thread_policy(threads)`: up to `threads` pieces of a matrix at once (default every usable
    core), with output bytes that do not depend on `threads`.
    """
    if delta.ndim != 3:
        raise ValueError(f"repair_batch takes (B, m, n); got shape {tuple(delta.shape)}")
    if delta.dtype != torch.float32:
        raise ValueError(f"deltas must be float32 (upcast before subtracting); got {delta.dtype}")
    _, rows, cols = delta.shape
    dev = torch.device(device) if device is not None else delta.device
    chosen = resolve_backend(backend, rows, cols, out_dtype, dev, fp64_rate)
    _, why = precision_policy(backend, out_dtype, dev, fp64_rate)
    if chosen == "exact" and backend == "auto":
        why = f"min(m, n) <= {AUTO_EXACT_MAX_P}"
    policy = cpu_thread_policy(threads) if dev.type == "cpu" else nullcontext(1)
    with policy as pieces:
        return _repair_all(delta, params, chosen, chunk_elems, dev, factors, f"{chosen}: {why}", pieces)


# Smallest row block an out-of-memory retry goes down to before the matrix moves to the CPU.
MIN_CHUNK_ELEMS = 1 << 18


def matrix_device_bytes(rows: int, cols: int, backend: str, resident: bool,
                        chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> int:
    """Estimated peak device memory of one matrix on the torch path: the Gram and `eigh`'s vectors
    and workspace (about 3 p² words), plus Δ and Δ* on the device (resident, with the next matrix's
    prefetch) or two streamed blocks and their projection (streamed)."""
    p = min(rows, cols)
    word = 4 if backend == "gram32" else 8
    eig = 3 * p * p * word
    if resident:  # Δ and the next matrix in float32, Δ in the working dtype, Δ* in float32
        return eig + rows * cols * (3 * 4 + word)
    return eig + 3 * min(chunk_elems, rows * cols) * word


def _free_device_bytes(dev: torch.device) -> int | None:
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


class _DeviceFeed:
    """Hands out matrix i of a host batch on the compute device, with matrix i+1 already on its way.

    On CUDA the next matrix is copied from pinned memory on a side stream while the current one
    computes (an event orders the use); elsewhere (the CPU, where CI runs this code) the copy is a
    plain `.to`. `resident` False hands out the host matrix (the kernels then stream blocks)."""

    def __init__(self, delta: torch.Tensor, dev: torch.device, resident: bool) -> None:
        self.delta, self.dev, self.resident = delta, dev, resident and delta.device != dev
        self.cuda = dev.type == "cuda" and self.resident
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        self.pending: dict[int, tuple[torch.Tensor, object]] = {}

    def _start(self, i: int) -> None:
        if i >= self.delta.shape[0] or i in self.pending or not self.resident:
            return
        host = self.delta[i]
        if self.cuda:
            host = host.pin_memory()
            with torch.cuda.stream(self.stream):
                moved = host.to(self.dev, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.pending[i] = (moved, (event, host))  # keep the pinned buffer alive until used
        else:
            self.pending[i] = (host.to(self.dev), None)

    def get(self, i: int) -> torch.Tensor:
        if not self.resident:
            return self.delta[i]
        self._start(i)
        moved, sync = self.pending.pop(i)
        if sync is not None:
            current = torch.cuda.current_stream(self.dev)
            current.wait_event(sync[0])
            moved.record_stream(current)  # allocated on the copy stream, used and freed on this one
        self._start(i + 1)
        return moved

    def drop(self) -> None:
        """Release the prefetched copies (before a retry after an out-of-memory error)."""
        self.pending.clear()
        self.resident = self.cuda = False


def _oom_error() -> tuple[type[BaseException], ...]:
    return (torch.OutOfMemoryError,)


def _repair_all(delta: torch.Tensor, params: SpectralRule, chosen: str, chunk_elems: int,
                dev: torch.device, factors: Factors | None, precision: str, threads: int
                ) -> tuple[torch.Tensor, list[SpectralStats]]:
    _, rows, cols = delta.shape
    out = torch.empty_like(delta)
    stats: list[SpectralStats] = []
    free = _free_device_bytes(dev)
    resident = free is not None and matrix_device_bytes(rows, cols, chosen, True) < 0.8 * free
    feed = _DeviceFeed(delta, dev, resident and chosen != "exact")
    for i in range(delta.shape[0]):
        host = delta[i]
        pair: list = []
        note = ""
        if is_zero(host):
            st = threshold_spectrum(np.zeros(min(rows, cols)), rows, cols, params).with_backend(chosen)
            out[i] = host
        else:
            chunk, where = chunk_elems, dev
            while True:
                try:
                    d = feed.get(i) if where == dev else host
                    st = _one(d, params, chosen, out[i], chunk, where, pair, threads)
                    break
                except _oom_error():
                    # Out of device memory: free what this batch holds, stream smaller blocks, and
                    # at the floor finish the matrix on the CPU. Never fails the run.
                    feed.drop()
                    pair.clear()
                    if where.type == "cuda":
                        torch.cuda.empty_cache()
                    if chunk > MIN_CHUNK_ELEMS:
                        chunk = max(MIN_CHUNK_ELEMS, chunk // 4)
                        note = f"; out of memory: streamed, blocks of {chunk} elements"
                    elif where.type != "cpu":
                        where = torch.device("cpu")
                        note = "; out of memory: finished on the CPU"
                    else:
                        raise
        if st.degenerate:
            out[i] = host
        stats.append(st.with_precision(precision + note))
        if factors is not None:
            factors.append(_balanced(*pair[-1]) if pair else None)
    return out, stats


def _one(d: torch.Tensor, params: SpectralRule, chosen: str, dst: torch.Tensor, chunk_elems: int,
         dev: torch.device, pair: list, threads: int) -> SpectralStats:
    if chosen == "exact":
        return _exact(d, params, dst, dev, pair)
    dtype = torch.float32 if chosen == "gram32" else torch.float64
    return _gram(d, params, dst, chunk_elems, dev, dtype, pair=pair, threads=threads)


def _balanced(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale so component i has equal norms on both sides (Δ* = L R is unchanged)."""
    gain = (left.norm(dim=0) / right.norm(dim=1).clamp_min(1e-300)).clamp_min(1e-300).sqrt()
    return ((left / gain).to(device="cpu", dtype=torch.float32).contiguous(),
            (right * gain[:, None]).to(device="cpu", dtype=torch.float32).contiguous())


def _weights(st: SpectralStats, like: torch.Tensor) -> torch.Tensor | None:
    return None if st.weights is None else torch.as_tensor(st.weights, dtype=like.dtype, device=like.device)


def _exact(d: torch.Tensor, params: SpectralRule, dst: torch.Tensor, dev: torch.device,
           pair: list | None = None) -> SpectralStats:
    u, s, vh = torch.linalg.svd(d.to(device=dev, dtype=torch.float64), full_matrices=False)
    st = threshold_spectrum(s.cpu().numpy(), d.shape[0], d.shape[1], params).with_backend("exact")
    if st.degenerate == "zero_delta":
        return st
    r = st.rank_kept
    kept = s[:r] if st.weights is None else s[:r] * _weights(st, s)
    if not st.degenerate:
        dst.copy_(((u[:, :r] * kept) @ vh[:r]).to(dst.device))
    if pair is not None and r:  # median_zero (Δ* = Δ) still exports its non-zero components
        pair.append((u[:, :r] * kept, vh[:r]))
    return st


def _gram(d: torch.Tensor, params: SpectralRule, dst: torch.Tensor, chunk_elems: int, dev: torch.device,
          dtype: torch.dtype, lapack: bool | None = None, pair: list | None = None, threads: int = 1
          ) -> SpectralStats:
    """Tall (m ≥ n): G = ΔᵀΔ over row blocks, Δ* = (ΔV_r)V_rᵀ. Wide: the same on Δᵀ.

    `lapack` None picks by device (linalg.uses_lapack); False forces the torch path (what CUDA runs).
    `threads`: how many pieces of the Gram and the projection run at once (the bytes do not depend on it).
    """
    rows, cols = d.shape
    tall = rows >= cols
    work = d if tall else d.T  # (N, p)
    name = "gram64" if dtype == torch.float64 else "gram32"
    eig = linalg.GramEigen(linalg.gram(work, dtype, dev, chunk_elems, lapack, threads), lapack)
    s = eig.singular_values()
    st = threshold_spectrum(s, rows, cols, params).with_backend(name)
    if dtype == torch.float32:
        reason = _float32_unsafe(s, st)
        if reason:
            st = _gram(d, params, dst, chunk_elems, dev, torch.float64, lapack, pair, threads)
            return st.with_backend("gram64", fallback=reason)
    if st.degenerate == "zero_delta" or (st.degenerate and pair is None):
        return st
    if st.rank_kept == 0:
        dst.zero_()
        return st
    v_r = eig.top_vectors(st.rank_kept).to(device=dev, dtype=dtype)
    w = _weights(st, v_r)
    right = v_r if w is None else v_r * w
    # A median_zero matrix only gets here for its factors; the caller then writes Δ* = Δ over dst.
    work_v = None if pair is None else torch.empty(work.shape[0], st.rank_kept, dtype=dtype, device=dev)
    linalg.project(work, v_r, dst if tall else dst.T, chunk_elems, lapack, right=right, coeff_out=work_v,
                   threads=threads)
    if pair is not None:
        pair.append((work_v, right.T) if tall else (right, work_v.T))
    return st


def _float32_unsafe(s: np.ndarray, st: SpectralStats) -> str | None:
    """Why a float32 spectrum cannot be trusted for this matrix, or None."""
    if st.degenerate == "zero_delta":
        return None
    if st.degenerate or st.s_max > KAPPA_MAX_F32 * st.s_med:
        return f"kappa>{KAPPA_MAX_F32:g}"
    if np.any(np.abs(s - st.tau) <= NEAR_TAU_F32 * st.tau):
        return "near_tau"
    return None


def singular_values(d: torch.Tensor, backend: str = "auto", chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                    device: torch.device | str | None = None, threads: int | None = None) -> np.ndarray:
    """All singular values of one float32 delta (m, n), descending, float64: the calibration pass of
    --target-rho caches these so bisecting a spectral method's knob never repeats the decomposition, and
    `dgrepair report` plots them (the repair itself goes through `repair_batch`)."""
    if d.ndim != 2 or d.dtype != torch.float32:
        raise ValueError(f"singular_values takes one float32 (m, n) matrix; got {d.dtype} {tuple(d.shape)}")
    rows, cols = d.shape
    dev = torch.device(device) if device is not None else d.device
    chosen = resolve_backend(backend, rows, cols, None, dev)
    if is_zero(d):
        return np.zeros(min(rows, cols))
    if chosen == "exact":
        return torch.linalg.svdvals(d.to(device=dev, dtype=torch.float64)).cpu().numpy()
    work = d if rows >= cols else d.T
    # Calibration only needs ranks and energies; float64 Gram eigenvalues serve both Gram backends.
    with cpu_thread_policy(threads) if dev.type == "cpu" else nullcontext(1) as pieces:
        return linalg.GramEigen(linalg.gram(work, torch.float64, dev, chunk_elems, None, pieces),
                                None).singular_values()
