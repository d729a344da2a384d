"""Stochastic binarisation (Birder): one unscaled bit per coordinate, unbiased on [-1, 1].

For ``z`` with every ``|z_j| <= 1`` and uniforms ``u_j ~ U[0, 1)``::

    stochastic_sign(z, u)_j = +1  if u_j < (1 + z_j) / 2
                              -1  otherwise

so ``P(+1) = (1 + z_j) / 2`` and ``E[stochastic_sign(z)_j] = z_j`` (unbiased); ``z_j = +1`` and
``z_j = -1`` are sent exactly, ``z_j = 0`` is a fair coin. The uniforms come from a generator
seeded with the message seed (``uniform_draws``), on ``z``'s device and in its dtype, so a reference
can replay every draw (the float grid of ``torch.rand`` makes ``P(+1)`` exact up to 2**-24 in fp32).
Values outside [-1, 1] would be clipped to a sign: the callers hand normalised momenta ``m / b``.

Wire format: the packed bits only (``packing.pack_signs``, a set bit is +1), no scale: ``d`` bits
for ``d`` coordinates. ``pack_counts`` / ``unpack_counts`` carry integers in ``[0, n]`` (how many of
``n`` senders sent +1) as ``n.bit_length()`` bit planes, each packed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..types import Compressed
from .base import Compressor, check_blocks
from .packing import pack_signs, packed_nbytes, unpack_signs


def uniform_draws(seed: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """``numel`` uniforms in [0, 1) from a generator seeded with ``seed``, on ``like``'s device and
    in its dtype (the global RNG is untouched)."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    return torch.rand(numel, generator=gen, dtype=like.dtype, device=like.device)


def stochastic_sign(z: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``uniforms < (1 + z) / 2``, else ``-1``, in ``z``'s dtype: ``E[.] = z`` on [-1, 1]."""
    plus = uniforms < (1 + z) / 2
    return plus.to(z.dtype) * 2 - 1


class StochasticSign(Compressor):
    """Birder's binarisation as a compressor: ``C(z) = stochastic_sign(z, uniform_draws(seed, ...))``.

    ``randomness = "per_rank"``: the sender draws from the message seed it is given (each rank and
    shard its own); receivers never need the draws, the bits carry the outcome. Block layout is
    ignored (there is no scale).
    """

    name = "stochastic_sign"
    randomness = "per_rank"

    def compress(self, x: torch.Tensor, block_sizes: Sequence[int], *, seed: int = 0) -> Compressed:
        blocks = check_blocks(x, block_sizes)
        signs = stochastic_sign(x, uniform_draws(seed, x.numel(), x))
        return Compressed(pack_signs(signs), x.new_zeros(0), x.numel(), blocks)

    def decompress(self, c: Compressed, *, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        return unpack_signs(c.payload, c.numel, dtype)

    def wire_nbytes(self, capacity: int, num_blocks: int, dtype: torch.dtype) -> int:
        return packed_nbytes(capacity)

    def to_wire(self, c: Compressed, capacity: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
        wire = torch.zeros(packed_nbytes(capacity), dtype=torch.uint8, device=c.payload.device)
        wire[: c.payload.numel()] = c.payload
        return wire

    def from_wire(
        self, wire: torch.Tensor, numel: int, block_sizes: Sequence[int], capacity: int, dtype: torch.dtype
    ) -> Compressed:
        return Compressed(wire[: packed_nbytes(numel)], wire.new_zeros(0), numel, tuple(block_sizes))

    def payload_bits(self, block_sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        return sum(block_sizes)


def count_bits(senders: int) -> int:
    """Bits per coordinate of a count in ``[0, senders]``."""
    return max(1, int(senders).bit_length())


def pack_counts(counts: torch.Tensor, senders: int, capacity: int) -> torch.Tensor:
    """Integers in ``[0, senders]`` (1-D, at most ``capacity`` of them) as ``count_bits(senders)``
    bit planes of ``packed_nbytes(capacity)`` bytes each (plane ``t`` holds bit ``t``)."""
    width = packed_nbytes(capacity)
    planes = []
    for t in range(count_bits(senders)):
        plane = torch.zeros(width, dtype=torch.uint8, device=counts.device)
        packed = pack_signs(torch.bitwise_and(torch.bitwise_right_shift(counts, t), 1).bool())
        plane[: packed.numel()] = packed
        planes.append(plane)
    return torch.cat(planes)


def unpack_counts(wire: torch.Tensor, numel: int, senders: int, capacity: int) -> torch.Tensor:
    """Inverse of ``pack_counts``: ``numel`` int64 counts."""
    width = packed_nbytes(capacity)
    counts = torch.zeros(numel, dtype=torch.int64, device=wire.device)
    for t in range(count_bits(senders)):
        bit = (unpack_signs(wire[t * width : (t + 1) * width], numel, torch.int64) + 1) // 2
        counts += torch.bitwise_left_shift(bit, t)
    return counts
