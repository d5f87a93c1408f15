"""Block-scaled FP8 (DeepSeek-V3 / Kimi-K2 layout): `weight` in float8_e4m3fn plus `weight_scale_inv`
holding one multiplier per 128x128 block (ragged edge blocks included). No I/O.

Dequantisation: W = f32(q) * scale_inv[i // 128, j // 128]. Re-quantisation (the inverse of
transformers' Fp8Dequantize, with ceil-div blocks so 576-row matrices work): per block
amax = max|W|, scale_inv = amax / 448 (1 for an all-zero block), rounded to the stored scale dtype
(and to a power of two for `ue8m0` scales) *before* the codes are computed, so the codes match the
scale that is written.
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
FP8_MAX = 448.0


def block_grid(shape: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)


def _expand(scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    m, n = shape
    return scale.float().repeat_interleave(BLOCK, 0)[:m].repeat_interleave(BLOCK, 1)[:, :n]


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """float32 weights from e4m3 codes and per-block multipliers."""
    if scale_inv.shape != block_grid(tuple(q.shape)):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match the {BLOCK}x{BLOCK} block grid "
                         f"{block_grid(tuple(q.shape))} of a {tuple(q.shape)} weight")
    return q.to(torch.float32) * _expand(scale_inv, tuple(q.shape))


def quantize(w: torch.Tensor, scale_dtype: torch.dtype, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, scale_inv in `scale_dtype`) for a float32 matrix."""
    m, n = w.shape
    bm, bn = block_grid((m, n))
    padded = torch.zeros(bm * BLOCK, bn * BLOCK, dtype=torch.float32)
    padded[:m, :n] = w
    amax = padded.abs().reshape(bm, BLOCK, bn, BLOCK).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    stored = scale.to(scale_dtype)
    codes = (w / _expand(stored, (m, n))).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, stored
