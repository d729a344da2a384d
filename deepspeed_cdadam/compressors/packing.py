"""Bit packing of signs, 8 per uint8, in plain torch (any device).

This is the only module that knows the bit layout: element ``8*b + i`` of the input is bit
``i`` (least significant first) of byte ``b``; a set bit means the element is ``>= 0``
(``sign(0) := +1``). Lengths that are not a multiple of 8 are padded with zero bits, and
``unpack_signs`` drops the padding, so it never leaks into results.
"""

from __future__ import annotations

import functools

import torch

# Multiplying 8 little-endian 0/1 bytes (one int64) by this constant gathers byte i's bit into bit
# 56 + i of the product (no carries: every partial product lands on a distinct bit), so
# ``(word * _GATHER) >> 56`` is the packed byte, LSB first. One multiply per 8 signs.
_GATHER = 0x0102040810204080


def packed_nbytes(numel: int) -> int:
    """Bytes needed to hold ``numel`` sign bits."""
    return (numel + 7) // 8


#: Fewest coordinates a chunk of ``chunks`` holds (a multiple of 8, so chunks start on byte boundaries).
MIN_CHUNK = 1 << 13
#: Most chunks a vector is cut into: the temporaries of packing and unpacking are about 1/16 of the
#: vector's length at a time, for at most 16 passes of each operation.
MAX_CHUNKS = 16


def chunks(numel: int) -> list[tuple[int, int]]:
    """``[start, stop)`` pieces covering ``range(numel)``, every start a multiple of 8 (a byte of signs)."""
    size = max(MIN_CHUNK, -(-numel // MAX_CHUNKS))
    size += (-size) % 8
    return [(a, min(a + size, numel)) for a in range(0, numel, size)]


def _pack_piece(x: torch.Tensor, out: torch.Tensor) -> None:
    nonneg = x >= 0 if x.dtype != torch.bool else x
    pad = (-nonneg.numel()) % 8
    if pad:
        nonneg = torch.cat([nonneg, nonneg.new_zeros(pad)])
    words = nonneg.contiguous().view(torch.uint8).view(torch.int64)  # 8 signs (0/1 bytes) per word
    out.copy_(torch.bitwise_right_shift(words * _GATHER, 56))


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor into ``ceil(len(x) / 8)`` uint8 bytes, a chunk at a time
    (``chunks``: the temporaries are a fraction of ``x``, not its size)."""
    if x.dim() != 1:
        raise ValueError(f"pack_signs expects a 1-D tensor, got shape {tuple(x.shape)}.")
    out = torch.empty(packed_nbytes(x.numel()), dtype=torch.uint8, device=x.device)
    for a, b in chunks(x.numel()):
        _pack_piece(x[a:b], out[a // 8 : packed_nbytes(b)])
    return out


@functools.lru_cache(maxsize=32)
def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    bits = torch.bitwise_right_shift(torch.arange(256, device=device).unsqueeze(1), torch.arange(8, device=device)) & 1
    return (bits * 2 - 1).to(dtype)


def sign_table(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``[256, 8]``: row ``b`` holds the 8 signs (+1/-1) that byte ``b`` encodes, LSB first (made once
    per dtype and device; do not write into it)."""
    return _sign_table(dtype, torch.device(device))


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


def unpack_signs_into(
    packed: torch.Tensor, out: torch.Tensor, table: torch.Tensor, *, add: bool = False, scale_piece=None
) -> None:
    """``out = table[signs]`` (``out += ...`` with ``add``) for the ``len(out)`` signs of ``packed``, a
    chunk at a time (``chunks``), so no temporary of ``out``'s size is made. ``table``: ``[256, 8]``
    values per byte (``sign_table`` times a scale). ``scale_piece(a, b)``: optional per-coordinate
    factors of ``out[a:b]`` (one scale per block, expanded), multiplied in before the add."""
    numel = out.numel()
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() < packed_nbytes(numel):
        raise ValueError(f"unpack_signs_into needs {packed_nbytes(numel)} uint8 bytes, got {packed.dtype} {tuple(packed.shape)}.")
    for a, b in chunks(numel):
        piece = table.index_select(0, packed[a // 8 : packed_nbytes(b)].long()).view(-1)[: b - a]
        if scale_piece is not None:
            piece.mul_(scale_piece(a, b))
        if add:
            out[a:b] += piece
        else:
            out[a:b] = piece
        del piece  # before the next chunk's is made
