"""MXFP4 (OCP Microscaling, gpt-oss on-disk layout): `*_blocks` U8 [..., rows, cols/32, 16] holding two
FP4 E2M1 codes per byte (low nibble first) and `*_scales` U8 [..., rows, cols/32] holding one E8M0
exponent per 32-element block along the last axis. No I/O.

Dequantisation (transformers integrations/mxfp4.py): value = LUT[code] * 2^(scale - 127).
Re-quantisation (OCP MX spec v1.0 §6.3): per block, shared exponent = floor(log2(amax)) - 2 (2 = the
largest E2M1 exponent, 6 = 1.5 * 2^2), biased and clamped to [0, 254]; elements are W / 2^exp rounded
to the nearest E2M1 value (ties to the even code) and saturated at ±6. An all-zero block gets exponent
127 (scale 1) and zero codes. A block that was already MXFP4 comes back with the same values.
"""

from __future__ import annotations

import torch

BLOCK = 32
BYTES_PER_BLOCK = BLOCK // 2
E2M1_MAX_EXP = 2
LUT = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_POSITIVE = torch.tensor(LUT[:8], dtype=torch.float32)
_MIDPOINTS = (_POSITIVE[1:] + _POSITIVE[:-1]) / 2  # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
_TIES_UP = torch.tensor([0.75, 1.75, 3.5])  # midpoints whose upper neighbour has the even code


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., rows, cols] from U8 blocks [..., rows, cols/32, 16] and U8 scales [..., rows, cols/32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[-1] != BYTES_PER_BLOCK or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}: expected "
                         f"blocks = scales + [{BYTES_PER_BLOCK}]")
    lut = torch.tensor(LUT, dtype=torch.float32)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).reshape(*blocks.shape[:-1], BLOCK)  # low nibble first
    values = values * torch.exp2(scales.to(torch.float32) - 127.0)[..., None]
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U8 blocks [..., rows, cols/32, 16], U8 scales [..., rows, cols/32]) for a float32 [..., rows, cols]."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last axis to be a multiple of {BLOCK}, got {tuple(w.shape)}")
    x = w.to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = x.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-45))) - E2M1_MAX_EXP,
                      torch.zeros_like(amax))
    biased = (exp + 127).clamp(0, 254)
    scaled = x / torch.exp2(biased - 127.0)[..., None]
    mag = scaled.abs().clamp(max=6.0)
    idx = torch.bucketize(mag, _MIDPOINTS, right=False) + torch.isin(mag, _TIES_UP).long()
    codes = idx | ((scaled < 0) & (idx > 0)).long() << 3
    codes = codes.to(torch.uint8).reshape(*x.shape[:-1], BYTES_PER_BLOCK, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks.contiguous(), biased.to(torch.uint8).contiguous()
