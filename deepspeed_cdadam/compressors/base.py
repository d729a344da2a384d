"""The compressor interface.

A compressor maps one 1-D vector ``x`` (one shard of a flattened parameter group) with a
block layout ``block_sizes`` (lengths summing to ``len(x)``) to a ``Compressed`` payload, and
back. For the wire, a payload is serialised to a fixed number of bytes that depends only on a
*capacity* (the largest shard length) and a block count, so that every rank's messages have the
same size and one ``all_to_all`` / ``all_gather`` of uint8 moves payload and scales together.

``compressors/`` knows nothing about distribution: shards and blocks are just lengths here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from ..types import Compressed


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """View a tensor's memory as a flat uint8 tensor."""
    return t.contiguous().view(-1).view(torch.uint8)


def from_bytes(b: torch.Tensor, dtype: torch.dtype, count: int) -> torch.Tensor:
    """Reinterpret the first ``count`` elements of ``dtype`` stored in uint8 tensor ``b``."""
    n = count * itemsize(dtype)
    return b[:n].clone().view(dtype)


#: Values of ``Compressor.randomness``.
RANDOMNESS = ("none", "shared", "per_rank")
#: Values of ``Compressor.payload_size``.
PAYLOAD_SIZES = ("fixed", "variable")


class Compressor(ABC):
    """``C``: a (possibly biased, contractive) compression operator.

    Capabilities, declared by each compressor so that exchanges choose their collectives from
    them instead of from concrete classes:

    * ``linear``: payloads of the same seed add up in compressed space (``C(x) + C(y)`` is the
      decompression of the summed payloads: a count sketch), so a reduce-scatter / all-reduce of
      payloads replaces the all-to-all of per-sender messages.
    * ``randomness``: ``"none"`` (deterministic), ``"shared"`` (drawn from the message seed every
      rank derives alike: every receiver can replay it) or ``"per_rank"`` (private to the sender).
    * ``payload_size``: ``"fixed"`` (the wire size depends only on the capacity and block count)
      or ``"variable"`` (a header says how much of a fixed envelope is real; bytes are counted as sent).
    """

    name: str = "compressor"
    #: Longest vector (one shard) the wire format can describe, or None for no limit.
    max_numel: int | None = None
    linear: bool = False
    randomness: str = "none"
    payload_size: str = "fixed"

    @property
    def worker_scale_scope(self) -> str:
        """Which scale a worker's message up takes: "block" (each block its own, or no scale at all);
        only the scaled-sign compressors take "tensor" (``compressors.sign``)."""
        return "block"

    @abstractmethod
    def compress(self, x: torch.Tensor, block_sizes: Sequence[int], *, seed: int = 0) -> Compressed:
        """Compress a 1-D tensor. ``seed`` feeds shared randomness (rand-k)."""

    @abstractmethod
    def decompress(self, c: Compressed, *, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        """Dense 1-D tensor ``C(x)`` of length ``c.numel``."""

    def decompress_into(self, c: Compressed, out: torch.Tensor, *, seed: int = 0, add: bool = False) -> None:
        """``out = C(x)`` (``out += C(x)`` with ``add``), ``out`` of length ``c.numel``. This default makes
        the dense ``decompress`` first; a compressor that can write in place overrides it (scaled sign)."""
        dense = self.decompress(c, dtype=out.dtype, seed=seed)
        if add:
            out += dense
        else:
            out.copy_(dense)

    @abstractmethod
    def wire_nbytes(self, capacity: int, num_blocks: int, dtype: torch.dtype) -> int:
        """Bytes of one serialised payload for vectors of length <= ``capacity``."""

    @abstractmethod
    def to_wire(self, c: Compressed, capacity: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
        """Serialise to exactly ``wire_nbytes(capacity, num_blocks, dtype)`` uint8 bytes."""

    @abstractmethod
    def from_wire(
        self, wire: torch.Tensor, numel: int, block_sizes: Sequence[int], capacity: int, dtype: torch.dtype
    ) -> Compressed:
        """Inverse of ``to_wire`` for a vector of ``numel`` real coordinates."""

    @abstractmethod
    def payload_bits(self, block_sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        """Information bits of one payload (no padding): e.g. ``d + 32 * blocks`` for scaled sign."""

    def __call__(self, x: torch.Tensor, block_sizes: Sequence[int] | None = None, *, seed: int = 0) -> torch.Tensor:
        """``C(x)``: compress then decompress (what the receiver sees)."""
        blocks = (x.numel(),) if block_sizes is None else tuple(block_sizes)
        return self.decompress(self.compress(x, blocks, seed=seed), dtype=x.dtype, seed=seed)


def check_blocks(x: torch.Tensor, block_sizes: Sequence[int]) -> tuple[int, ...]:
    blocks = tuple(int(b) for b in block_sizes)
    if x.dim() != 1:
        raise ValueError(f"Compressors take 1-D tensors, got shape {tuple(x.shape)}.")
    if any(b < 0 for b in blocks) or sum(blocks) != x.numel():
        raise ValueError(f"Invalid block_sizes={blocks}: must be >= 0 and sum to len(x)={x.numel()}.")
    return blocks
