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
from typing import ClassVar

import torch

#: How scale blocks are cut (``scale_blocks`` option): fixed-size blocks over the whole bucket
#: (``ShardLayout``), or along parameter tensors (``TensorLayout``), without or with upstream's padding.
SCALE_BLOCKS = ("fixed", "tensor", "tensor_padded", "group_padded")
#: Choices whose "tensors" are zero-padded as upstream's compressed all-reduce pads them.
PADDED_SCALE_BLOCKS = ("tensor_padded", "group_padded")


@dataclass(frozen=True)
class ShardLayout:
    numel: int
    world_size: int
    block_size: int | None = None
    shard_sizes: tuple[int, ...] = field(init=False)
    shard_offsets: tuple[int, ...] = field(init=False)
    #: blocks of ``block_size`` from each shard's start (what the fused kernels assume)
    fixed_blocks: ClassVar[bool] = True
    #: the exchanges work on the bucket's flat buffer itself (no permutation, no padding)
    permuted: ClassVar[bool] = False

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


def upstream_pad_multiple(world_size: int) -> int:
    """DeepSpeed's compressed all-reduce pads each tensor to a multiple of ``world_size * lcm(world_size, 8)``."""
    return world_size * math.lcm(world_size, 8)


@dataclass(frozen=True)
class TensorLayout:
    """Scale blocks that follow parameter tensors, as upstream OnebitAdam compresses each tensor apart.

    Tensor ``k`` (``tensor_sizes[k]`` coordinates, in bucket order) is padded with zeros to
    ``padded_sizes[k]`` (a multiple of ``pad_multiple``; 1: no padding) and split into
    ``world_size`` chunks (lengths differing by at most one, the first ones longer); server shard
    ``j`` is chunk ``j`` of every tensor, tensor after tensor. Each chunk is one scale block, or is
    cut into blocks of ``block_size``. A block's ``d_B`` counts its padding (upstream's
    ``sqrt(numel)`` of the padded tensor), and padding coordinates carry compression state.

    Shards are contiguous slices of the *layout space* (length ``numel``, padding included), not of
    the bucket: ``to_layout`` / ``from_layout`` move a flat bucket buffer there and back (one
    scatter / gather with a cached index). The exchanges work in layout space; their state too.
    """

    tensor_sizes: tuple[int, ...]
    world_size: int
    block_size: int | None = None
    pad_multiple: int = 1
    fixed_blocks: ClassVar[bool] = False
    permuted: ClassVar[bool] = True

    def __post_init__(self) -> None:
        sizes = tuple(self.tensor_sizes)
        if any(not isinstance(n, int) or n < 0 for n in sizes):
            raise ValueError(f"Invalid tensor_sizes={sizes!r}. Must be ints >= 0.")
        object.__setattr__(self, "tensor_sizes", sizes)
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Invalid world_size={self.world_size!r}. Must be an int >= 1.")
        if self.block_size is not None and (
            not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1
        ):
            raise ValueError(f"Invalid block_size={self.block_size!r}. Must be None (one block per chunk) or an int >= 1.")
        if not isinstance(self.pad_multiple, int) or self.pad_multiple < 1:
            raise ValueError(f"Invalid pad_multiple={self.pad_multiple!r}. Must be an int >= 1.")
        n, m = self.world_size, self.pad_multiple
        padded = tuple(-(-size // m) * m for size in sizes)
        # chunks[k][j]: length of chunk j of tensor k
        chunks = tuple(tuple(p // n + (1 if j < p % n else 0) for j in range(n)) for p in padded)
        shard_sizes = tuple(sum(c[j] for c in chunks) for j in range(n))
        blocks, owners = [], []
        for j in range(n):
            b, o = [], []
            for k, c in enumerate(chunks):
                if c[j] == 0:
                    continue
                if self.block_size is None:
                    cut = (c[j],)
                else:
                    full, rest = divmod(c[j], self.block_size)
                    cut = (self.block_size,) * full + ((rest,) if rest else ())
                b += cut
                o += [k] * len(cut)
            blocks.append(tuple(b) if b else (0,))
            owners.append(tuple(o) if o else (-1,))
        set_ = object.__setattr__
        set_(self, "padded_sizes", padded)
        set_(self, "chunk_sizes", chunks)
        set_(self, "numel", sum(padded))
        set_(self, "bucket_numel", sum(sizes))
        set_(self, "shard_sizes", shard_sizes)
        set_(self, "shard_offsets", tuple(sum(shard_sizes[:j]) for j in range(n)))
        set_(self, "_blocks", tuple(blocks))
        set_(self, "_owners", tuple(owners))
        set_(self, "_cache", {})

    # --- the interface of ShardLayout (over layout space) ---------------------------------
    @property
    def capacity(self) -> int:
        return max(self.shard_sizes)

    def shard_slice(self, j: int) -> slice:
        return slice(self.shard_offsets[j], self.shard_offsets[j] + self.shard_sizes[j])

    def shard_blocks(self, j: int) -> tuple[int, ...]:
        """Block lengths inside shard ``j``: its chunk of each tensor (cut by ``block_size``), tensor after tensor."""
        return self._blocks[j]

    def block_tensors(self, j: int) -> tuple[int, ...]:
        """The tensor each block of shard ``j`` belongs to (``-1`` for the one empty block of an empty shard)."""
        return self._owners[j]

    @property
    def max_blocks(self) -> int:
        return max(len(b) for b in self._blocks)

    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b for j in range(self.world_size) for b in self.shard_blocks(j))

    # --- layout space <-> bucket ---------------------------------------------------------
    def _positions_cpu(self) -> torch.Tensor:
        """Where each bucket coordinate lies in layout space (int64, ``bucket_numel`` entries)."""
        pos = self._cache.get("positions")
        if pos is None:
            parts, n = [], self.world_size
            within = [0] * n  # offset of the next tensor's chunk inside each shard
            for k, size in enumerate(self.tensor_sizes):
                chunk = self.chunk_sizes[k]
                starts = [self.shard_offsets[j] + within[j] for j in range(n)]
                # coordinate i of the padded tensor: chunk j = the one holding i, at i - (chunk start)
                bounds = [sum(chunk[:j]) for j in range(n)]
                idx = torch.arange(size, dtype=torch.int64, device="cpu")  # not the default device: cached, moved
                owner = torch.bucketize(idx, torch.tensor(bounds[1:], dtype=torch.int64, device="cpu"), right=True)
                offsets = torch.tensor(starts, dtype=torch.int64, device="cpu")
                base = offsets[owner] - torch.tensor(bounds, dtype=torch.int64, device="cpu")[owner]
                parts.append(idx + base)
                for j in range(n):
                    within[j] += chunk[j]
            pos = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device="cpu")
            self._cache["positions"] = pos
        return pos

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        key = ("positions", str(device))
        pos = self._cache.get(key)
        if pos is None:
            pos = self._cache[key] = self._positions_cpu().to(device)
        return pos

    def tensor_order(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Layout-space indices of each padded tensor's coordinates in order, tensor after tensor
        (``y[tensor_order]`` is the padded tensors back to back, as upstream holds them)."""
        key = ("tensor_order", str(device))
        order = self._cache.get(key)
        if order is None:
            parts, n, within = [], self.world_size, [0] * self.world_size
            for k in range(len(self.tensor_sizes)):
                chunk = self.chunk_sizes[k]
                for j in range(n):
                    start = self.shard_offsets[j] + within[j]
                    parts.append(torch.arange(start, start + chunk[j], dtype=torch.int64, device="cpu"))
                    within[j] += chunk[j]
            order = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device="cpu")
            order = self._cache[key] = order.to(device)
        return order

    def to_layout(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bucket vector ``x`` in layout space (padding zeros), written into ``out`` where given."""
        out = x.new_zeros(self.numel) if out is None else out.zero_()
        out[self.positions(x.device)] = x
        return out

    def from_layout(self, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bucket vector of layout-space ``y`` (padding dropped), written into ``out`` where given
        (``out`` must not overlap ``y``)."""
        if out is None:
            return y[self.positions(y.device)]
        return torch.index_select(y, 0, self.positions(y.device), out=out)


def make_layout(
    tensor_sizes: tuple[int, ...], world_size: int, block_size: int | None, scale_blocks: str = "fixed"
) -> ShardLayout | TensorLayout:
    """The layout of a bucket whose parameters have ``tensor_sizes`` coordinates, for option ``scale_blocks``."""
    if scale_blocks == "fixed":
        return ShardLayout(sum(tensor_sizes), world_size, block_size)
    if scale_blocks == "tensor":
        return TensorLayout(tuple(tensor_sizes), world_size, block_size)
    if scale_blocks in PADDED_SCALE_BLOCKS:  # the caller chose the pieces: tensors, or whole param groups
        return TensorLayout(tuple(tensor_sizes), world_size, block_size, upstream_pad_multiple(world_size))
    raise ValueError(f"Unknown scale_blocks={scale_blocks!r}. Allowed: {', '.join(SCALE_BLOCKS)}.")
