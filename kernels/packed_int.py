"""Integer weights in the compressed-tensors `pack-quantized` layout (Kimi-K2-Thinking's routed experts,
llm-compressor's W4A16 / W8A16 output). No I/O.

Layout (compressed-tensors 0.20 `pack_to_int32` / `unpack_from_int32`, which vLLM loads):
- `weight_packed` I32 [rows, ceil(cols * bits / 32)]: along a row (`packed_dim` 1), element i sits at bit
  (i % (32 / bits)) * bits of word i // (32 / bits), least significant first; each code is stored unsigned,
  as code + 2^(bits-1) (so -8..7 becomes 0..15 for 4 bits). A ragged last word is zero-padded.
- `weight_zero_point` (asymmetric only) is packed the same way along the output axis (`packed_dim` 0):
  I32 [ceil(rows * bits / 32), groups].
- `weight_scale` [rows, groups] in the model's float dtype; groups = cols / group_size (`group`) or 1
  (`channel`).

Dequantisation: W = (code - zero_point) * scale, in float32 (exact: a 4/8-bit integer times a BF16/F16/F32
scale fits in float32's mantissa).

Re-quantisation follows the library's `calculate_qparams` + `quantize`: q_min = -2^(b-1), q_max = 2^(b-1) - 1;
symmetric: scale = max|W| / ((q_max - q_min) / 2) per group (7.5 for 4 bits), zero point 0; asymmetric:
lo = min(min W, 0), hi = max(max W, 0), scale = (hi - lo) / (q_max - q_min), zero point =
round(clamp(q_min - lo / scale, q_min, q_max)) (0 for an all-zero group, as the library's 0/0 comes out).
The scale is rounded once to the stored dtype (a zero scale becomes that dtype's eps, as in the library)
*before* the codes are computed, so codes match the scale that is written:
code = round(clamp(W / scale + zero_point, q_min, q_max)), ties to even.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

WORD_BITS = 32
LITTLE_ENDIAN = sys.byteorder == "little"  # the byte-view fast path; big-endian hosts shift and mask
SUPPORTED_BITS = (4, 8)
STRATEGIES = ("group", "channel")


@dataclass(frozen=True)
class IntScheme:
    """The weight quantisation of one compressed-tensors config group."""

    num_bits: int
    symmetric: bool
    strategy: str  # "group" or "channel"
    group_size: int | None = None  # `group` only

    @property
    def q_min(self) -> int:
        return -(1 << (self.num_bits - 1))

    @property
    def q_max(self) -> int:
        return (1 << (self.num_bits - 1)) - 1

    def group_cols(self, cols: int) -> int:
        """Columns that share one scale."""
        return cols if self.strategy == "channel" else int(self.group_size or 0)

    def groups(self, cols: int) -> int:
        return cols // self.group_cols(cols)

    def describe(self) -> str:
        kind = f"group-{self.group_size}" if self.strategy == "group" else "per-channel"
        return f"int{self.num_bits} {'symmetric' if self.symmetric else 'asymmetric'} {kind}"


def packed_words(n: int, bits: int) -> int:
    """Words holding n codes of `bits` bits."""
    return math.ceil(n * bits / WORD_BITS)


def pack(codes: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """I32 words from signed codes [rows, cols] (any integer dtype), packed along `packed_dim`."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"packing supports {SUPPORTED_BITS} bits, got {bits}")
    v = codes.to(torch.int32) + (1 << (bits - 1))  # int32 throughout: the top field shifts into the sign bit
    if packed_dim == 0:
        v = v.transpose(0, 1)
    rows, cols = v.shape
    per = WORD_BITS // bits
    words = packed_words(cols, bits)
    if words * per > cols:
        v = torch.nn.functional.pad(v, (0, words * per - cols))
    if LITTLE_ENDIAN:  # a word's bytes in memory order are its fields 0-1, 2-3, ... (4 bits) or 0, 1, ... (8)
        u = v.to(torch.uint8)
        if bits == 4:
            u = u[:, 0::2] | (u[:, 1::2] << 4)
        out = u.contiguous().reshape(-1).view(torch.int32).reshape(rows, words)  # 1-D: any size-1 axis is fine
    else:
        v = v.reshape(rows, words, per)  # disjoint fields, so adding them never carries: the sum is the OR
        out = v[..., 0].clone()
        for k in range(1, per):
            out += v[..., k] << (k * bits)
    return (out.transpose(0, 1) if packed_dim == 0 else out).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int, packed_dim: int = 1) -> torch.Tensor:
    """Signed codes (int8, as the library returns them) from I32 words; `n` is the unpacked length along
    `packed_dim`."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unpacking supports {SUPPORTED_BITS} bits, got {bits}")
    w = packed.transpose(0, 1) if packed_dim == 0 else packed
    rows, words = w.shape
    if words != packed_words(n, bits):
        raise ValueError(f"{words} packed words per line cannot hold exactly {n} {bits}-bit codes "
                         f"(expected {packed_words(n, bits)})")
    per = WORD_BITS // bits
    if LITTLE_ENDIAN:
        u = w.contiguous().reshape(-1).view(torch.uint8).reshape(rows, 4 * words)  # memory order = field order
        if bits == 4:
            nib = torch.empty(rows, words * per, dtype=torch.uint8)
            torch.bitwise_and(u, 0xF, out=nib[:, 0::2])
            torch.bitwise_right_shift(u, 4, out=nib[:, 1::2])
            codes = nib[:, :n].view(torch.int8) - 8
        else:
            codes = (u[:, :n] ^ 0x80).view(torch.int8)  # stored code + 128, read back as signed
    else:
        codes = torch.empty(rows, words, per, dtype=torch.int32)
        for k in range(per):  # arithmetic shifts drag the sign along; the mask removes it
            torch.bitwise_and(w >> (k * bits), (1 << bits) - 1, out=codes[..., k])
        codes = (codes.reshape(rows, words * per)[:, :n] - (1 << (bits - 1))).to(torch.int8)
    return (codes.transpose(0, 1) if packed_dim == 0 else codes).contiguous()


def _expand(per_group: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows, groups] -> [rows, cols] (each group's value repeated over its columns)."""
    return per_group.repeat_interleave(cols // per_group.shape[1], dim=1)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               scheme: IntScheme, shape: tuple[int, int]) -> torch.Tensor:
    """float32 [rows, cols] from packed words, per-group scales and (asymmetric) packed zero points."""
    rows, cols = shape
    groups = scheme.groups(cols)
    if tuple(scale.shape) != (rows, groups):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match {rows} rows x {groups} groups")
    codes = unpack(packed, scheme.num_bits, cols).to(torch.float32)
    if zero_point is not None:
        zp = unpack(zero_point, scheme.num_bits, rows, packed_dim=0).to(torch.float32)
        codes = codes - _expand(zp, cols)
    return codes * _expand(scale.to(torch.float32), cols)


def quantize(w: torch.Tensor, scheme: IntScheme, scale_dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed I32 words, scales in `scale_dtype`, packed zero points or None) for a float32 [rows, cols]."""
    rows, cols = w.shape
    gc = scheme.group_cols(cols)
    if gc <= 0 or cols % gc:
        raise ValueError(f"group size {gc} does not divide the {cols} input columns")
    x = w.to(torch.float32).reshape(rows, cols // gc, gc)
    q_min, q_max = float(scheme.q_min), float(scheme.q_max)
    lo = torch.clamp(x.amin(-1), max=0.0)
    hi = torch.clamp(x.amax(-1), min=0.0)
    if scheme.symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((q_max - q_min) / 2)
    else:
        scale = (hi - lo) / (q_max - q_min)
    stored = scale.to(scale_dtype)
    stored = torch.where(stored == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=scale_dtype), stored)
    s32 = stored.to(torch.float32)
    zp = None
    if not scheme.symmetric:
        zp = torch.where(scale > 0, torch.round(torch.clamp(q_min - lo / s32, q_min, q_max)), 0.0)
    scaled = x / s32[..., None] + (zp[..., None] if zp is not None else 0.0)
    codes = torch.round(torch.clamp(scaled, q_min, q_max)).reshape(rows, cols)
    packed = pack(codes, scheme.num_bits)
    return packed, stored.contiguous(), (pack(zp, scheme.num_bits, packed_dim=0) if zp is not None else None)
