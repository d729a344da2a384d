"""How a flat buffer of ``numel`` coordinates is split into server shards and scale blocks.

Shards: ``world_size`` contiguous pieces whose lengths differ by at most one (the first
``numel % world_size`` shards are one longer). Rank ``j`` is the server of shard ``j``.
Blocks: each shard is cut into blocks of ``block_size`` coordinates (the last one shorter), or
is one block when ``block_size`` is None. Blocks never straddle shards, so a shard's scales
travel with its signs. Padding exists only on the wire (to the longest shard and block count),
never in a block's ``d_B``.

The reference simulator and the distributed code take the same ``ShardLayout``, which is what
lets them be compared exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShardLayout:
    numel: int
    world_size: int
    block_size: int | None = None
    shard_sizes: tuple[int, ...] = field(init=False)
    shard_offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.numel, int) or self.numel < 0:
            raise ValueError(f"Invalid numel={self.numel!r}. Must be an int >= 0.")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Invalid world_size={self.world_size!r}. Must be an int >= 1.")
        if self.block_size is not None and (
            not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1
        ):
            raise ValueError(
                f"Invalid block_size={self.block_size!r}. Must be None (one block per shard) or an int >= 1."
            )
        base, extra = divmod(self.numel, self.world_size)
        sizes = tuple(base + (1 if j < extra else 0) for j in range(self.world_size))
        offsets = tuple(sum(sizes[:j]) for j in range(self.world_size))
        object.__setattr__(self, "shard_sizes", sizes)
        object.__setattr__(self, "shard_offsets", offsets)

    @property
    def capacity(self) -> int:
        """Length of the longest shard: every wire message is sized for it."""
        return max(self.shard_sizes)

    def shard_slice(self, j: int) -> slice:
        return slice(self.shard_offsets[j], self.shard_offsets[j] + self.shard_sizes[j])

    def shard_blocks(self, j: int) -> tuple[int, ...]:
        """Block lengths inside shard ``j`` (one block, possibly empty, when ``block_size`` is None)."""
        size = self.shard_sizes[j]
        if self.block_size is None or size == 0:
            return (size,)
        full, rest = divmod(size, self.block_size)
        return (self.block_size,) * full + ((rest,) if rest else ())

    @property
    def max_blocks(self) -> int:
        """Scales each wire message has room for."""
        if self.block_size is None:
            return 1
        return max(1, math.ceil(self.capacity / self.block_size))

    def block_sizes(self) -> tuple[int, ...]:
        """All block lengths of the whole buffer, shard after shard."""
        return tuple(b for j in range(self.world_size) for b in self.shard_blocks(j))
