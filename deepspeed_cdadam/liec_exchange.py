"""LIEC-SGD's exchange (scheme ``immediate_compensation``): 1-bit up with the worker's compression
error compensated locally at once, 1-bit down with error feedback on the server, and every H-th
step a full-precision average of the models and the gradients that flushes the server error.

From the authors' code (``main.py``, branch ``args.method == 'liec'``; ../shared/SEED_SPECS.md §4),
per scale bucket ``b`` (the authors' ``_take_tensors`` buckets, ``ScaleBucketLayout``)::

    compressed step
      (1) worker i:  c_i = C(g_i[b]);   r_i = g_i[b] - c_i            r_i is not kept (recomputed every step)
      (2) server:    y = mean_i c_i + e_s[b];  chat = C(y);  e_s[b] = y - chat     e_s: server_error
      (3) worker i:  returns chat + r_i                               (local immediate compensation)
    averaging step (every H-th)
      (4) xbar = mean_i x_i;   ghat = mean_i g_i[b] + e_s[b];   e_s[b] = 0          (full precision)

``C(x_b) = (||x_b||_1 / d_b) * sign(x_b)`` with one scale per scale bucket, both ways (the code's
``compressor``: mean |x| of the flat bucket and its packed sign bits), ``sign(0) := +1``.

The server role is sharded as in every scheme here (``exchange.py``): rank ``j`` is the server of
shard ``j`` of the bucket and keeps ``e_s`` on it. The authors' code gathers to rank 0 and
broadcasts from it; the arithmetic is the same coordinate by coordinate, but a scale bucket spans
several shards, so its server scale ``||y_b||_1 / d_b`` is agreed first: each server's partial
sums (one float per scale bucket) are all-gathered and added in rank order, which every rank does
alike. That one small collective per compressed step is counted with the down bytes. Each
worker computes its own scale over its whole bucket (it holds all of ``g_i``). The other compressors
(top-k, rand-k, a custom ``Compressor``) compress each shard alone, with no shared scale.

The result of (3) differs between ranks (``RESULT_RANK_IDENTICAL = False``); ``chat`` (and at an
averaging step ``ghat``) is what every rank decoded alike, kept as ``server_estimate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .comm.accounting import CommStats, all_gather_bytes_sent, all_to_all_bytes_sent
from .comm.layout import ShardLayout
from .comm.transport import Transport
from .compressors.base import Compressor
from .compressors.sign import ScaledSignL1, ScaledSignL2, l1_block_scales, l2_block_scales
from .exchange import _UP, CompressedExchange, mean_in_rank_order, shared_seed
from .state import FULL, PER_RANK, RANK_IDENTICAL, SHARD, StateSpec
from .types import SERVER_ERROR, SERVER_ESTIMATE


def take_tensors(numels: Sequence[int], element_size: int, size_limit: int | None) -> list[list[int]]:
    """The tensors (indices) of each bucket ``torch._utils._take_tensors(tensors, size_limit)`` makes of
    tensors of one type with ``numels`` elements of ``element_size`` bytes: a tensor that would take
    the running bucket past ``size_limit`` bytes starts a new one, unless the running one holds no
    bytes yet (a tensor larger than the limit is a bucket alone). ``None``: one bucket of all."""
    if size_limit is None:
        return [list(range(len(numels)))] if len(numels) else []
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i, numel in enumerate(numels):
        size = numel * element_size
        if current_bytes + size > size_limit and current_bytes > 0:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(i)
        current_bytes += size
    if current:
        buckets.append(current)
    return buckets


def scale_bucket_sizes(numels: Sequence[int], element_size: int, size_limit: int | None) -> tuple[int, ...]:
    """Coordinates of each scale bucket (``take_tensors``), those without coordinates left out."""
    sizes = (sum(numels[i] for i in bucket) for bucket in take_tensors(numels, element_size, size_limit))
    return tuple(size for size in sizes if size > 0)


@dataclass(frozen=True)
class ScaleBucketLayout(ShardLayout):
    """Server shards as ``ShardLayout`` (contiguous, lengths differing by at most one); scale blocks are
    the pieces of the scale buckets (``bucket_sizes``, consecutive, adding up to ``numel``) each shard
    holds, so one scale bucket may be cut in pieces on several servers (its scale is one)."""

    bucket_sizes: tuple[int, ...] = ()
    fixed_blocks = False  # blocks follow the scale buckets (no fused kernel assumes them)

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = tuple(self.bucket_sizes)
        if self.block_size is not None:
            raise ValueError(f"Invalid block_size={self.block_size!r} for a ScaleBucketLayout: must be None.")
        if any(not isinstance(s, int) or s < 1 for s in sizes) or sum(sizes) != self.numel:
            raise ValueError(f"Invalid bucket_sizes={sizes!r}: must be ints >= 1 adding up to numel={self.numel}.")
        object.__setattr__(self, "bucket_sizes", sizes)
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        blocks, owners = [], []
        for j in range(self.world_size):
            lo, hi = self.shard_offsets[j], self.shard_offsets[j] + self.shard_sizes[j]
            b, o = [], []
            for k, (start, size) in enumerate(zip(starts, sizes)):
                piece = min(hi, start + size) - max(lo, start)
                if piece > 0:
                    b.append(piece)
                    o.append(k)
            blocks.append(tuple(b) if b else (0,))
            owners.append(tuple(o) if o else (-1,))
        object.__setattr__(self, "_blocks", tuple(blocks))
        object.__setattr__(self, "_owners", tuple(owners))

    def shard_blocks(self, j: int) -> tuple[int, ...]:
        """The lengths of the scale buckets' pieces in shard ``j`` (one empty block for an empty shard)."""
        return self._blocks[j]  # type: ignore[attr-defined]

    def block_buckets(self, j: int) -> tuple[int, ...]:
        """The scale bucket each block of shard ``j`` belongs to (``-1``: the empty block of an empty shard)."""
        return self._owners[j]  # type: ignore[attr-defined]

    @property
    def max_blocks(self) -> int:
        return max(len(b) for b in self._blocks)  # type: ignore[attr-defined]


def bucket_scale_kind(compressor: Compressor) -> str | None:
    """How a scale bucket's one scale is made: "l1" / "l2" (the scaled signs), None (other compressors:
    each server shard compressed alone, no shared scale)."""
    if isinstance(compressor, ScaledSignL1):
        return "l1"
    if isinstance(compressor, ScaledSignL2):
        return "l2"
    return None


class ImmediateCompensationExchange(CompressedExchange):
    """``immediate_compensation``: LIEC-SGD's exchange (module docstring, steps (1)-(4))."""

    scheme_name = "immediate_compensation"

    STATE = (
        StateSpec(SERVER_ERROR, SHARD, PER_RANK, "e_s on this rank's server shard"),
        StateSpec(SERVER_ESTIMATE, FULL, RANK_IDENTICAL, "chat (or ghat): the down message every rank decoded"),
    )
    RESULT_RANK_IDENTICAL = False
    OWNER = "LIECSGD"
    OWNER_NOTE = "each rank gets its own locally compensated gradient"

    def __init__(
        self,
        transport: Transport,
        layout: ShardLayout,
        compressor: Compressor,
        stats: CommStats | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(layout, ScaleBucketLayout):  # a plain layout: the whole buffer is one scale bucket
            if layout.permuted or layout.block_size is not None:
                raise ValueError(
                    "The immediate_compensation exchange takes a ScaleBucketLayout, or a ShardLayout with "
                    "block_size=None (one scale bucket)."
                )
            sizes = (layout.numel,) if layout.numel else ()
            layout = ScaleBucketLayout(layout.numel, layout.world_size, bucket_sizes=sizes)
        if compressor.worker_scale_scope != "block":
            raise ValueError(
                f"The immediate_compensation exchange takes its scales per scale bucket: compressor={compressor!r} "
                "must have worker_scale_scope='block'."
            )
        super().__init__(transport, layout, compressor, stats, seed)
        self.layout: ScaleBucketLayout = layout
        self.scale_kind = bucket_scale_kind(compressor)
        self._block_index: dict[tuple[int, str], torch.Tensor] = {}  # shard, device -> scale bucket of each block

    # --- scales: one per scale bucket ---------------------------------------------------------
    def _per_block(self, bucket_scales: torch.Tensor, j: int) -> torch.Tensor:
        """The scale of each block of shard ``j`` (its scale bucket's)."""
        key = (j, str(bucket_scales.device))
        index = self._block_index.get(key)
        if index is None:
            owners = [max(k, 0) for k in self.layout.block_buckets(j)]  # an empty shard's empty block: any
            index = self._block_index[key] = torch.tensor(owners, device=bucket_scales.device)
        return bucket_scales[index]

    def worker_bucket_scales(self, g: torch.Tensor) -> torch.Tensor | None:
        """This worker's scale of each scale bucket of its whole vector ``g`` (None: no shared scale)."""
        sizes = self.layout.bucket_sizes
        if self.scale_kind is None or not sizes:
            return None
        return (l1_block_scales if self.scale_kind == "l1" else l2_block_scales)(g, sizes)

    def server_block_scales(self, y: torch.Tensor) -> torch.Tensor | None:
        """The server scale of each block of this rank's shard ``y``: its scale bucket's
        ``||y_b||_1 / d_b`` (``||y_b||_2 / sqrt(d_b)``) over every server's piece of it. One
        all-gather of one partial sum per scale bucket, added in rank order on every rank."""
        lay, n, me = self.layout, self.layout.world_size, self.rank
        if self.scale_kind is None or not lay.bucket_sizes:
            return None
        partial = y.new_zeros(len(lay.bucket_sizes))
        offset = 0
        for k, size in zip(lay.block_buckets(me), lay.shard_blocks(me)):
            piece = y[offset : offset + size]
            offset += size
            if k >= 0:
                partial[k] = piece.abs().sum() if self.scale_kind == "l1" else (piece * piece).sum()
        everyone = self.transport.all_gather(partial).view(n, -1)
        nbytes = partial.numel() * partial.element_size()
        self.stats.bytes_down += all_gather_bytes_sent(nbytes, n)
        self.stats.bytes_handed += nbytes
        self.stats.collective_calls += 1
        total = _sum_in_rank_order(list(everyone))
        d = torch.tensor(lay.bucket_sizes, dtype=y.dtype, device=y.device)
        scales = total / d if self.scale_kind == "l1" else total.sqrt() / d.sqrt()
        return self._per_block(scales, me)

    def encode_up(self, x: torch.Tensor, *, step: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's messages up, shard after shard, each block scaled by its scale bucket's
        worker scale; and ``C(x)`` full length as the servers decode it."""
        lay, n, me = self.layout, self.layout.world_size, self.rank
        scales = self.worker_bucket_scales(x)
        wires, local = [], []
        for j in range(n):
            seed = shared_seed(self.seed, step, group, _UP, j, me)
            scale = None if scales is None else self._per_block(scales, j)
            wire, c = self._encode(x[lay.shard_slice(j)], j, seed, scale)
            wires.append(wire)
            local.append(c)
        return torch.cat(wires), torch.cat(local)

    # --- the two kinds of step ----------------------------------------------------------------
    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        """A compressed step on this rank's gradient ``x``: returns ``chat + r_i`` (this rank's own)."""
        e_s = state[SERVER_ERROR]
        # (1) worker i: c_i = C(g_i), sent to the servers; r_i = g_i - c_i stays here
        c_local, mean_c = self.send_up(x, step=step, group=group)
        # (2) server: y = mean_i c_i + e_s; chat = C(y) with the scale bucket's scale; e_s <- y - chat
        y = mean_c + e_s
        c_server, chat = self.send_down(y, step=step, group=group, scale=self.server_block_scales(y))
        torch.sub(y, c_server, out=e_s)
        state[SERVER_ESTIMATE].copy_(chat)
        # (3) worker i: chat + r_i, the local error compensated at once
        return chat + (x - c_local)

    def average(self, x: torch.Tensor, g: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """An averaging step: ``(xbar, ghat)``, both identical on every rank (step (4)).

        Full precision, one ``all_to_all`` and one ``all_gather`` of both vectors together: the bytes
        of an fp32 ring all-reduce of each (``(n-1)/n`` of each vector up and down per rank). The
        means are taken in rank order on each server shard."""
        lay, n, me = self.layout, self.layout.world_size, self.rank
        cap, mine = lay.capacity, lay.shard_sizes[me]
        send = x.new_zeros(n, 2, cap)
        for j in range(n):
            size, sl = lay.shard_sizes[j], lay.shard_slice(j)
            send[j, 0, :size] = x[sl]
            send[j, 1, :size] = g[sl]
        recv = self.transport.all_to_all(send.reshape(-1)).view(n, 2, cap)
        # (4) server: xbar = mean_i x_i; ghat = mean_i g_i + e_s; e_s <- 0
        e_s = state[SERVER_ERROR]
        reply = x.new_zeros(2, cap)
        reply[0, :mine] = mean_in_rank_order([recv[i, 0, :mine] for i in range(n)])
        reply[1, :mine] = mean_in_rank_order([recv[i, 1, :mine] for i in range(n)]) + e_s
        e_s.zero_()
        full = self.transport.all_gather(reply.reshape(-1)).view(n, 2, cap)
        width = 2 * cap * x.element_size()
        self.stats.bytes_up += all_to_all_bytes_sent(width, n)
        self.stats.bytes_down += all_gather_bytes_sent(width, n)
        self.stats.bytes_handed += send.numel() * x.element_size() + width
        self.stats.collective_calls += 2
        xbar = torch.cat([full[j, 0, : lay.shard_sizes[j]] for j in range(n)])
        ghat = torch.cat([full[j, 1, : lay.shard_sizes[j]] for j in range(n)])
        state[SERVER_ESTIMATE].copy_(ghat)
        return xbar, ghat


def _sum_in_rank_order(pieces: list[torch.Tensor]) -> torch.Tensor:
    """``p_0 + p_1 + ... + p_{n-1}``, left to right."""
    total = pieces[0].clone()
    for p in pieces[1:]:
        total += p
    return total
