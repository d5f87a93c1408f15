"""Test-side references for quantized formats and per-matrix repair, independent of dgrepair's kernels:
block-FP8 by explicit block expansion, MXFP4 by decoding E2M1 bit fields (sign, 2-bit exponent,
1-bit mantissa) rather than a table, and DG-Hard from tests/reference.py (float64 numpy SVD)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import reference
import torch
from safetensors import safe_open


def load_dir(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def fp8_dense(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """W = f32(q) * scale_inv expanded over 128x128 blocks (ragged edges cut)."""
    m, n = q.shape
    big = np.repeat(np.repeat(s.float().numpy(), 128, 0), 128, 1)[:m, :n]
    return q.float().numpy() * big.astype(np.float32)


def e2m1(code: int) -> float:
    """FP4 E2M1 from its bits: s eem; subnormal when e == 0 (0 or 0.5)."""
    sign = -1.0 if code & 0b1000 else 1.0
    e, m = (code >> 1) & 0b11, code & 1
    return sign * (0.5 * m if e == 0 else 2.0 ** (e - 1) * (1 + 0.5 * m))


E2M1 = np.array([e2m1(c) for c in range(16)], dtype=np.float32)


def mxfp4_dense(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """[..., rows, cols/32, 16] U8 + [..., rows, cols/32] U8 -> [..., rows, cols]; low nibble first."""
    b = blocks.numpy()
    vals = np.empty((*b.shape[:-1], 32), dtype=np.float32)
    vals[..., 0::2] = E2M1[b & 0xF]
    vals[..., 1::2] = E2M1[b >> 4]
    vals *= np.ldexp(1.0, scales.numpy().astype(np.int32) - 127)[..., None].astype(np.float32)
    return vals.reshape(*b.shape[:-2], b.shape[-2] * 32)


def dense(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """float32 values of a stored tensor (dequantised if it is FP8 or MXFP4 blocks)."""
    if name.endswith("_blocks"):
        return mxfp4_dense(tensors[name], tensors[name[:-7] + "_scales"])
    t = tensors[name]
    if t.dtype == torch.float8_e4m3fn:
        return fp8_dense(t, tensors[name + "_scale_inv"])
    return t.float().numpy()


def pieces(shape: tuple[int, ...], how: str) -> list:
    """Index expressions of the matrices a tensor is repaired as (written from research/formats.md §2-3)."""
    if how == "svd":
        return [(slice(None), slice(None))]
    if how == "conv":
        return ["conv"]
    e = shape[0]
    if how == "experts":
        return [(i, slice(None), slice(None)) for i in range(e)]
    half = shape[1] // 2
    if how == "rows_concat":  # [E, 2I, H]: gate rows then up rows
        return [(i, slice(k * half, (k + 1) * half), slice(None)) for i in range(e) for k in range(2)]
    if how == "rows_interleaved":  # gpt-oss on disk: gate even rows, up odd rows
        return [(i, slice(k, None, 2), slice(None)) for i in range(e) for k in range(2)]
    raise ValueError(how)


def take(a: np.ndarray, sel) -> np.ndarray:
    return a.reshape(a.shape[0], -1) if sel == "conv" else a[sel]


def reference_repair(w0: np.ndarray, w1: np.ndarray, how: str) -> tuple[np.ndarray, list[int]]:
    """base + DG-Hard(Δ) per matrix (float64), in the stored layout; and the kept ranks in manifest order."""
    out = w0.astype(np.float64).copy()
    ranks = []
    for sel in pieces(w1.shape, how):
        d_star, r, _ = reference.dg_hard(take(w1, sel).astype(np.float64) - take(w0, sel).astype(np.float64))
        if sel == "conv":
            out = (out.reshape(out.shape[0], -1) + d_star).reshape(w1.shape)
        else:
            out[sel] += d_star
        ranks.append(r)
    return out, ranks


def assert_bf16_close(got: np.ndarray, want: np.ndarray) -> None:
    """BF16 output equals the float64 reference cast to BF16, up to one ulp at rounding boundaries."""
    want_bf = torch.from_numpy(want.astype(np.float32)).to(torch.bfloat16).float().numpy()
    assert np.all(np.abs(got - want_bf) <= 2.0 ** -7 * np.abs(want) + 1e-9)
    assert np.mean(got == want_bf) > 0.97


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
