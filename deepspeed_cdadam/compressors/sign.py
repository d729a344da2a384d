"""Scaled sign compressors: one bit per coordinate plus one scale per block.

For a block ``x_B`` of ``d_B`` real coordinates (padding excluded), with ``sign(0) := +1``:

* ``scaled_sign_l1``: ``C(x_B) = (||x_B||_1 / d_B) * sign(x_B)``  (CD-Adam, Algorithm 1).
  Keeps ``||C(x_B)||_1 = ||x_B||_1``.
* ``scaled_sign_l2``: ``C(x_B) = (||x_B||_2 / sqrt(d_B)) * sign(x_B)``  (1-bit Adam).
  Keeps ``||C(x_B)||_2 = ||x_B||_2``.

An empty block has scale 0. Cost: ``d`` bits plus one scale (32 bits in fp32) per block.

Setting ``worker_scale_scope`` (``ScaledSignL2(worker_scale_scope="tensor")``): the scale of a worker's
message up. ``"block"``: each block its own, the formulas above. ``"tensor"``: one scale over a larger
vector than the block, applied to every block of it: the worker's whole buffer, or with a tensor layout
(``scale_blocks`` "tensor" / "tensor_padded") each block its parameter tensor's (upstream OnebitAdam's
worker side). The exchange computes that scale (``exchange.worker_scales``) and hands it to
``compress(..., scale=)``; servers' messages down always take each block's own scale.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

import torch

from ..types import Compressed
from .base import Compressor, as_bytes, check_blocks, from_bytes, itemsize
from .packing import chunks, pack_signs, packed_nbytes, sign_table, unpack_signs, unpack_signs_into


def sign_plus(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) := +1``, in ``x``'s dtype."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _block_groups(blocks: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Consecutive blocks grouped into pieces of about ``packing.chunks``' length: ``(first block, end
    block, first coordinate, end coordinate)`` of each piece (a block longer than that is a piece alone)."""
    target = chunks(sum(blocks))[0][1] if blocks else 0
    groups, k0, a, n = [], 0, 0, 0
    for k, b in enumerate(blocks):
        n += b
        if n >= target or k == len(blocks) - 1:
            groups.append((k0, k + 1, a, a + n))
            k0, a, n = k + 1, a + n, 0
    return groups


def _block_sums(values, x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """Sum of ``values(x)`` (e.g. ``abs``) over each block (0 for an empty block), a group of blocks at a
    time (``_block_groups``): each block's sum is the same reduction as over the whole vector at once,
    but the temporary ``values(x)`` is a piece of ``x``, not its size."""
    if len(blocks) == 1:
        return values(x).sum().reshape(1)
    sums = torch.empty(len(blocks), dtype=x.dtype, device=x.device)
    for k0, k1, a, b in _block_groups(blocks):
        lengths = torch.tensor(blocks[k0:k1], device=x.device)
        sums[k0:k1] = torch.segment_reduce(values(x[a:b]), "sum", lengths=lengths, unsafe=True, initial=0)
    return sums


def _expand(scale: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    if len(blocks) == 1:
        return scale.expand(blocks[0])
    return scale.repeat_interleave(torch.tensor(blocks, device=scale.device))


def _expanded_piece(scale: torch.Tensor, blocks: tuple[int, ...]):
    """``(a, b) -> _expand(scale, blocks)[a:b]``, made for that range only."""
    ends = list(itertools.accumulate(blocks))

    def piece(a: int, b: int) -> torch.Tensor:
        k0, k1 = bisect.bisect_right(ends, a), bisect.bisect_left(ends, b)  # blocks covering a and b - 1
        lengths = [min(ends[k], b) - max(ends[k] - blocks[k], a) for k in range(k0, k1 + 1)]
        return scale[k0 : k1 + 1].repeat_interleave(torch.tensor(lengths, device=scale.device))

    return piece


def l1_block_scales(x: torch.Tensor, block_sizes: Sequence[int]) -> torch.Tensor:
    """``||x_B||_1 / d_B`` per block."""
    blocks = check_blocks(x, block_sizes)
    if len(blocks) == 1:
        return torch.linalg.vector_norm(x, 1).reshape(1) / max(blocks[0], 1)
    d = torch.tensor(blocks, dtype=x.dtype, device=x.device).clamp_min(1)
    return _block_sums(torch.abs, x, blocks) / d


def l2_block_scales(x: torch.Tensor, block_sizes: Sequence[int]) -> torch.Tensor:
    """``||x_B||_2 / sqrt(d_B)`` per block.

    One block is computed as ``torch.linalg.norm(x) / math.sqrt(d)``, the very operations of
    DeepSpeed's compressed all-reduce, so that 1-bit Adam can match upstream bit for bit.
    """
    blocks = check_blocks(x, block_sizes)
    if len(blocks) == 1:
        return torch.linalg.vector_norm(x).reshape(1) / math.sqrt(max(blocks[0], 1))
    d = torch.tensor(blocks, dtype=x.dtype, device=x.device).clamp_min(1)
    return _block_sums(torch.square, x, blocks).sqrt() / d.sqrt()


def scaled_sign_l1(x: torch.Tensor, block_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """``(||x_B||_1 / d_B) * sign(x_B)`` on each block, the plain dense formula."""
    blocks = (x.numel(),) if block_sizes is None else tuple(block_sizes)
    return _expand(l1_block_scales(x, blocks), blocks) * sign_plus(x)


def scaled_sign_l2(x: torch.Tensor, block_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """``(||x_B||_2 / sqrt(d_B)) * sign(x_B)`` on each block, the plain dense formula."""
    blocks = (x.numel(),) if block_sizes is None else tuple(block_sizes)
    return _expand(l2_block_scales(x, blocks), blocks) * sign_plus(x)


#: Values of the scaled-sign setting ``worker_scale_scope`` (module docstring).
WORKER_SCALE_SCOPES = ("block", "tensor")


def check_worker_scale_scope(scope: object) -> str:
    """``scope`` if it is one of ``WORKER_SCALE_SCOPES``, else a ValueError naming the key and the allowed values."""
    if not isinstance(scope, str) or scope not in WORKER_SCALE_SCOPES:
        raise ValueError(f"Invalid worker_scale_scope={scope!r}. Allowed: {', '.join(WORKER_SCALE_SCOPES)}.")
    return scope


class ScaledSign(Compressor):
    """Shared packing and wire format: ``[packed signs | one scale per block]``.

    Subclasses set ``block_scales``, the per-block scale function. ``worker_scale_scope``: "block"
    (each block of a worker's message its own scale) or "tensor" (one scale per tensor or whole buffer,
    upstream OnebitAdam's; module docstring).
    """

    block_scales = staticmethod(l1_block_scales)

    def __init__(self, worker_scale_scope: str = "block") -> None:
        self._worker_scale_scope = check_worker_scale_scope(worker_scale_scope)

    @property
    def worker_scale_scope(self) -> str:
        return self._worker_scale_scope

    def __repr__(self) -> str:
        return f"{type(self).__name__}(worker_scale_scope={self.worker_scale_scope!r})"

    def compress(
        self, x: torch.Tensor, block_sizes: Sequence[int], *, seed: int = 0, scale: torch.Tensor | None = None
    ) -> Compressed:
        """``scale`` (one value, or one per block) replaces the blocks' own scales: a scale computed
        over a larger vector than ``x`` (``worker_scale_scope="tensor"``), or block by block."""
        blocks = check_blocks(x, block_sizes)
        if scale is None:
            scales = self.block_scales(x, blocks)
        elif scale.numel() == 1:
            scales = scale.reshape(1).expand(len(blocks)).clone()
        elif scale.numel() == len(blocks):
            scales = scale.reshape(-1).clone()
        else:
            raise ValueError(f"scale has {scale.numel()} values for {len(blocks)} blocks: give one, or one per block.")
        return Compressed(pack_signs(x), scales, x.numel(), blocks)

    def decompress(self, c: Compressed, *, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        if len(c.block_sizes) == 1:  # one lookup of (scale * sign) per byte: no separate multiply pass
            table = sign_table(dtype, c.payload.device) * c.scale.to(dtype)
            return unpack_signs(c.payload, c.numel, dtype, table=table)
        return _expand(c.scale.to(dtype), c.block_sizes) * unpack_signs(c.payload, c.numel, dtype)

    def decompress_into(self, c: Compressed, out: torch.Tensor, *, seed: int = 0, add: bool = False) -> None:
        """``decompress`` written (or with ``add`` added) into ``out`` a chunk at a time: the same bits
        (``scale * sign`` is exact), with temporaries of a fraction of ``out``'s size."""
        scale = c.scale.to(out.dtype)
        if len(c.block_sizes) == 1:
            unpack_signs_into(c.payload, out, sign_table(out.dtype, out.device) * scale, add=add)
        else:
            table = sign_table(out.dtype, out.device)
            unpack_signs_into(c.payload, out, table, add=add, scale_piece=_expanded_piece(scale, c.block_sizes))

    def wire_nbytes(self, capacity: int, num_blocks: int, dtype: torch.dtype) -> int:
        return packed_nbytes(capacity) + num_blocks * itemsize(dtype)

    def to_wire(self, c: Compressed, capacity: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
        wire = torch.zeros(self.wire_nbytes(capacity, num_blocks, dtype), dtype=torch.uint8, device=c.payload.device)
        wire[: c.payload.numel()] = c.payload
        scale_bytes = as_bytes(c.scale.to(dtype))
        start = packed_nbytes(capacity)
        wire[start : start + scale_bytes.numel()] = scale_bytes
        return wire

    def from_wire(
        self, wire: torch.Tensor, numel: int, block_sizes: Sequence[int], capacity: int, dtype: torch.dtype
    ) -> Compressed:
        blocks = tuple(block_sizes)
        start = packed_nbytes(capacity)
        scale = from_bytes(wire[start:], dtype, len(blocks))
        return Compressed(wire[: packed_nbytes(numel)], scale, numel, blocks)

    def payload_bits(self, block_sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        return sum(block_sizes) + 8 * itemsize(dtype) * len(tuple(block_sizes))


class ScaledSignL1(ScaledSign):
    """CD-Adam's compressor ``(||x_B||_1 / d_B) * sign(x_B)``."""

    name = "scaled_sign"
    block_scales = staticmethod(l1_block_scales)


class ScaledSignL2(ScaledSign):
    """1-bit Adam's compressor ``(||x_B||_2 / sqrt(d_B)) * sign(x_B)``."""

    name = "sign_l2"
    block_scales = staticmethod(l2_block_scales)
