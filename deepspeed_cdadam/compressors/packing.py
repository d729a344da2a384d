"""Bit packing of signs, 8 per uint8, in plain torch (any device).

This is the only module that knows the bit layout: element ``8*b + i`` of the input is bit
``i`` (least significant first) of byte ``b``; a set bit means the element is ``>= 0``
(``sign(0) := +1``). Lengths that are not a multiple of 8 are padded with zero bits, and
``unpack_signs`` drops the padding, so it never leaks into results.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def packed_nbytes(numel: int) -> int:
    """Bytes needed to hold ``numel`` sign bits."""
    return (numel + 7) // 8


def _weights(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor into ``ceil(len(x) / 8)`` uint8 bytes."""
    if x.dim() != 1:
        raise ValueError(f"pack_signs expects a 1-D tensor, got shape {tuple(x.shape)}.")
    nonneg = x >= 0 if x.dtype != torch.bool else x
    pad = (-nonneg.numel()) % 8
    if pad:
        nonneg = torch.cat([nonneg, nonneg.new_zeros(pad)])
    bits = nonneg.view(-1, 8).to(torch.uint8)
    return (bits * _weights(x.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``pack_signs``: a 1-D tensor of ``numel`` values in {-1, +1} of ``dtype``."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"unpack_signs expects a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}.")
    if packed.numel() * 8 < numel:
        raise ValueError(f"{packed.numel()} bytes hold at most {packed.numel() * 8} signs, asked for {numel}.")
    bits = torch.bitwise_and(packed.unsqueeze(1), _weights(packed.device)).ne(0).view(-1)[:numel]
    return bits.to(dtype).mul_(2).sub_(1)
