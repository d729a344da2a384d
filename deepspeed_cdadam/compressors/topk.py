"""Sparsifying compressors: top-k and rand-k.

``k = max(1, ceil(ratio * d))`` coordinates of a vector of length ``d`` are kept; block layout is
ignored (sparsifiers act on the whole vector handed to them, one shard in the distributed code).

* ``TopK``: keeps the ``k`` largest ``|x_j|`` (ties broken by ``torch.topk``); sends values and
  int32 indices. Contractive: ``||C(x) - x||^2 <= (1 - k/d) ||x||^2``.
* ``RandK``: keeps ``k`` coordinates drawn uniformly without replacement from a generator seeded
  with the shared ``seed``, so every rank draws the same indices and only values travel. Not
  rescaled: ``E[C(x)] = (k/d) x`` (contractive, as EF21/Markov compression needs). The user's
  global RNG is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..types import Compressed
from .base import Compressor, as_bytes, check_blocks, from_bytes, itemsize

_INDEX_DTYPE = torch.int32


class _Sparsifier(Compressor):
    max_numel = 2**31 - 1  # indices travel as int32

    def __init__(self, ratio: float) -> None:
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"Invalid {type(self).__name__} ratio={ratio!r}. Must be a number in (0.0, 1.0].")
        self.ratio = float(ratio)

    def k(self, numel: int) -> int:
        """Coordinates kept from a vector of ``numel`` (0 for an empty vector)."""
        return 0 if numel == 0 else min(numel, max(1, math.ceil(self.ratio * numel)))

    def decompress(self, c: Compressed, *, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        out = torch.zeros(c.numel, dtype=dtype, device=c.payload.device)
        out[self._indices(c, seed)] = c.payload.to(dtype)
        return out

    def _indices(self, c: Compressed, seed: int) -> torch.Tensor:
        return c.scale.long()

    def payload_bits(self, block_sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        return self.k(sum(block_sizes)) * 8 * self._entry_nbytes(dtype)

    def _entry_nbytes(self, dtype: torch.dtype) -> int:
        return itemsize(dtype) + itemsize(_INDEX_DTYPE)

    def wire_nbytes(self, capacity: int, num_blocks: int, dtype: torch.dtype) -> int:
        return self.k(capacity) * self._entry_nbytes(dtype)

    def to_wire(self, c: Compressed, capacity: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
        kmax = self.k(capacity)
        wire = torch.zeros(self.wire_nbytes(capacity, num_blocks, dtype), dtype=torch.uint8, device=c.payload.device)
        values = as_bytes(c.payload.to(dtype))
        wire[: values.numel()] = values
        if self._entry_nbytes(dtype) > itemsize(dtype):
            idx = as_bytes(c.scale.to(_INDEX_DTYPE))
            start = kmax * itemsize(dtype)
            wire[start : start + idx.numel()] = idx
        return wire

    def from_wire(
        self, wire: torch.Tensor, numel: int, block_sizes: Sequence[int], capacity: int, dtype: torch.dtype
    ) -> Compressed:
        k = self.k(numel)
        values = from_bytes(wire, dtype, k)
        if self._entry_nbytes(dtype) > itemsize(dtype):
            idx = from_bytes(wire[self.k(capacity) * itemsize(dtype) :], _INDEX_DTYPE, k).long()
        else:
            idx = torch.empty(0, dtype=torch.long, device=wire.device)
        return Compressed(values, idx, numel, tuple(block_sizes))


class TopK(_Sparsifier):
    """Keep the ``k`` largest-magnitude coordinates."""

    name = "topk"

    def compress(self, x: torch.Tensor, block_sizes: Sequence[int], *, seed: int = 0) -> Compressed:
        blocks = check_blocks(x, block_sizes)
        idx = torch.topk(x.abs(), self.k(x.numel()), sorted=False).indices
        return Compressed(x[idx], idx, x.numel(), blocks)


class RandK(_Sparsifier):
    """Keep ``k`` coordinates chosen by a generator seeded with the shared ``seed``."""

    name = "randk"
    randomness = "shared"  # indices drawn from the message seed: only values travel
    linear = True  # with one seed the indices agree, so summed values are the sum of the C(x_i)

    def rand_indices(self, numel: int, seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randperm(numel, generator=gen)[: self.k(numel)]

    def compress(self, x: torch.Tensor, block_sizes: Sequence[int], *, seed: int = 0) -> Compressed:
        blocks = check_blocks(x, block_sizes)
        idx = self.rand_indices(x.numel(), seed).to(x.device)
        return Compressed(x[idx], torch.empty(0, dtype=torch.long, device=x.device), x.numel(), blocks)

    def _indices(self, c: Compressed, seed: int) -> torch.Tensor:
        return self.rand_indices(c.numel, seed).to(c.payload.device)

    def _entry_nbytes(self, dtype: torch.dtype) -> int:
        return itemsize(dtype)
