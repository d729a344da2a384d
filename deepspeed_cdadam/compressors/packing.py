"""Bit packing of signs, 8 per uint8, in plain torch (any device).

This is the only module that knows the bit layout: element ``8*b + i`` of the input is bit
``i`` (least significant first) of byte ``b``; a set bit means the element is ``>= 0``
(``sign(0) := +1``). Lengths that are not a multiple of 8 are padded with zero bits, and
``unpack_signs`` drops the padding, so it never leaks into results.
"""

from __future__ import annotations

import torch

# Multiplying 8 little-endian 0/1 bytes (one int64) by this constant gathers byte i's bit into bit
# 56 + i of the product (no carries: every partial product lands on a distinct bit), so
# ``(word * _GATHER) >> 56`` is the packed byte, LSB first. One multiply per 8 signs.
_GATHER = 0x0102040810204080


def packed_nbytes(numel: int) -> int:
    """Bytes needed to hold ``numel`` sign bits."""
    return (numel + 7) // 8


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor into ``ceil(len(x) / 8)`` uint8 bytes."""
    if x.dim() != 1:
        raise ValueError(f"pack_signs expects a 1-D tensor, got shape {tuple(x.shape)}.")
    nonneg = x >= 0 if x.dtype != torch.bool else x
    pad = (-nonneg.numel()) % 8
    if pad:
        nonneg = torch.cat([nonneg, nonneg.new_zeros(pad)])
    words = nonneg.contiguous().view(torch.uint8).view(torch.int64)  # 8 signs (0/1 bytes) per word
    return torch.bitwise_right_shift(words * _GATHER, 56).to(torch.uint8)


def sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8]``: row ``b`` holds the 8 signs (+1/-1) that byte ``b`` encodes, LSB first."""
    bits = torch.bitwise_right_shift(torch.arange(256, device=device).unsqueeze(1), torch.arange(8, device=device)) & 1
    return (bits * 2 - 1).to(dtype)


def unpack_signs(
    packed: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32, table: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of ``pack_signs``: ``numel`` values in {-1, +1} of ``dtype`` (one table lookup per byte).

    ``table`` replaces ``sign_table``: pass ``scale * sign_table(...)`` to get ``scale * sign`` directly.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"unpack_signs expects a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}.")
    if packed.numel() * 8 < numel:
        raise ValueError(f"{packed.numel()} bytes hold at most {packed.numel() * 8} signs, asked for {numel}.")
    lut = sign_table(dtype, packed.device) if table is None else table
    return lut.index_select(0, packed[: packed_nbytes(numel)].long()).view(-1)[:numel]
