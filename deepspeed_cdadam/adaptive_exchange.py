"""AdaCGD's exchange (scheme ``adaptive_3pc``): the adaptive three-point compressor both ways.

Each direction runs ``C^AC_{h,y}(x)`` (``compressors.adaptive_topk``): skip if
``||x - h||^2 <= zeta ||x - y||^2``, else the cheapest top-k level ``j < m`` whose
``z_j = h + C_j(x - h)`` has ``||x - z_j||^2 <= zeta ||x - y||^2``, else the finest ``h + C_m(x - h)``::

    (1) worker i:  x = g_i (this step's gradient), h = g_i^est (markov_state), y = y_i (previous_grad)
                   level_i and z_i = C^AC(x); sends level_i and C_{level_i}(x - h), or only a skip header
    (2)            g_i^est <- z_i;   y_i <- g_i
    (3) server:    ghat_prev <- ghat;   ghat <- ghat + mean_i C_{level_i}(g_i - g_i^est)   (= mean_i g_i^est)
    (4) server:    x = ghat, h = gtil (down_markov_state), y = ghat_prev: level_d and C_{level_d}(ghat - gtil)
    (5) worker i:  gtil <- gtil + C_{level_d}(ghat - gtil)        returns gtil (the same on every rank)

and an exact step (``exact``) that starts the sequences (the 3PC code's ``g_i^0 = grad f_i(x^0)``)::

    (0) g_i^est = y_i = g_i;   ghat = ghat_prev = mean_i g_i;   gtil = ghat   (full precision)

Who decides what, and how the receivers learn it:

* Up: each worker decides its own level on its whole vector (it holds all of ``x``, ``h``, ``y``;
  ``C_j`` is top-k on each server shard). A one-byte header per worker (0 = skip, ``j`` = level) is
  all-gathered first, so every rank knows every worker's level; then one ``all_to_all`` whose
  chunks are the width of the widest level chosen this step (a narrower message is zero-padded; no
  ``all_to_all`` at all when every worker skips). Server ``j`` decodes each worker's piece of shard
  ``j`` at that worker's level.
* Down: the server role is sharded, and the rule is on the whole aggregate, so the servers agree:
  each all-gathers its shard's ``m + 1`` partial squared norms (``||x - h||^2``, ``||x - y||^2`` and
  ``||x - z_j||^2`` for ``j < m``), every rank adds them in rank order and applies the rule to the
  sums: one level for every shard, identical on every rank. Then one ``all_gather`` at that level's
  width, or none on a skip.

Bytes are counted as the collectives move them (``CommStats``): headers and partial norms included,
the envelope's padding included. ``last`` (a ``LevelRecord``) also gives the levels chosen and the
information bytes (headers, norms and the chosen levels' values and indices, no padding).

The three sources, as ../shared/SEED_SPECS.md section 3 labels them: the 3PC building blocks
(anchors, the exact first step, the skip convention) PRIMARY; the adaptive rule SECONDARY; the
server side (a 3PC of the aggregate ``ghat`` anchored at the last broadcast ``gtil`` and at the
previous aggregate) RECONSTRUCTION, our choice: the paper's bidirectional variant was not retrieved.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .comm.accounting import CommStats
from .comm.layout import ShardLayout
from .comm.transport import Transport
from .compressors.adaptive_topk import NestedTopK, adaptive_level
from .compressors.base import Compressor
from .exchange import _DOWN, _UP, CompressedExchange, mean_in_rank_order
from .state import FULL, PER_RANK, RANK_IDENTICAL, SHARD, StateSpec
from .types import (
    DOWN_MARKOV_STATE,
    MARKOV_STATE,
    PREVIOUS_GRAD,
    SERVER_MARKOV_STATE,
    SERVER_PREVIOUS_MARKOV_STATE,
)

#: Bytes of the up header: one uint8 per worker, its level (0: skip).
HEADER_NBYTES = 1


def squared_norm(t: torch.Tensor) -> torch.Tensor:
    """``||t||^2`` as a 0-dim tensor of ``t``'s dtype (``(t * t).sum()``, the references' operations)."""
    return (t * t).sum()


@dataclass(frozen=True)
class LevelRecord:
    """What one step of the exchange chose, the same on every rank (but the byte counts, this rank's).

    ``kind``: "exact" (the full-precision start) or "compressed". ``up_levels``: each worker's level in
    rank order (0: skipped), empty for "exact". ``down_level``: the servers' agreed level (0: skipped),
    None for "exact". ``payload_bytes_up`` / ``_down``: information bytes this rank sent to the other
    ranks: headers, partial norms and the chosen level's values and indices, without the envelope's
    padding (the ``CommStats`` counters have it).
    """

    kind: str
    up_levels: tuple[int, ...]
    down_level: int | None
    payload_bytes_up: int
    payload_bytes_down: int


class AdaptiveThreePointExchange(CompressedExchange):
    """``adaptive_3pc``: AdaCGD's adaptive three-point compressor both ways (module docstring)."""

    scheme_name = "adaptive_3pc"
    #: It runs with this compressor only (CDAdam's ``exchange`` option does not offer it).
    COMPRESSOR_CLASS = NestedTopK
    OWNER = "AdaCGD"
    OWNER_NOTE = "adaptive top-k levels, an exact first step and an SGD update"

    STATE = (
        StateSpec(MARKOV_STATE, FULL, PER_RANK, "g_i^est, this worker's 3PC estimate (h of its up compressor)"),
        StateSpec(PREVIOUS_GRAD, FULL, PER_RANK, "y_i, this worker's gradient of the previous step"),
        StateSpec(SERVER_MARKOV_STATE, SHARD, PER_RANK, "ghat = mean_i g_i^est on this rank's server shard"),
        StateSpec(SERVER_PREVIOUS_MARKOV_STATE, SHARD, PER_RANK, "ghat of the previous step (y of the down rule)"),
        StateSpec(DOWN_MARKOV_STATE, FULL, RANK_IDENTICAL, "gtil, the estimate every worker holds"),
    )

    def __init__(
        self,
        transport: Transport,
        layout: ShardLayout,
        compressor: Compressor,
        stats: CommStats | None = None,
        seed: int = 0,
        *,
        zeta: float = 1.0,
    ) -> None:
        if not isinstance(compressor, NestedTopK):
            raise ValueError(
                "exchange='adaptive_3pc' is AdaCGD's: it needs the NestedTopK compressor (its top-k levels), "
                f"not {getattr(compressor, 'name', compressor)!r}. Use deepspeed_cdadam.AdaCGD."
            )
        if layout.permuted:
            raise ValueError("exchange='adaptive_3pc' takes a ShardLayout (top-k ignores scale blocks).")
        if isinstance(zeta, bool) or not isinstance(zeta, (int, float)) or not math.isfinite(zeta) or zeta < 0:
            raise ValueError(f"Invalid zeta={zeta!r}. Must be a finite number >= 0.0.")
        super().__init__(transport, layout, compressor, stats, seed)
        self.compressor: NestedTopK = compressor
        self.zeta = float(zeta)
        #: What the last step chose (``LevelRecord``); None before the first.
        self.last: LevelRecord | None = None

    # --- pieces ---------------------------------------------------------------------------------
    def _shards(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [v[self.layout.shard_slice(j)] for j in range(self.layout.world_size)]

    def _dense(self, parts: list[torch.Tensor], orders: list[torch.Tensor], level: int) -> torch.Tensor:
        """``C_level`` of the vector whose shards are ``parts`` (top-k per shard), full length."""
        comp = self.compressor
        return torch.cat(
            [comp.decompress(comp.compress_level(p, o, level), dtype=p.dtype) for p, o in zip(parts, orders)]
        )

    def _level_errors(
        self, x: torch.Tensor, h: torch.Tensor, parts: list[torch.Tensor], orders: list[torch.Tensor]
    ) -> Iterator[float]:
        """``||x - (h + C_j(x - h))||^2`` for ``j = 1 .. m-1``, lazily (the rule stops at the first accepted)."""
        for level in range(1, self.compressor.num_levels):
            yield float(squared_norm(x - (h + self._dense(parts, orders, level))))

    def _entry_nbytes(self, dtype: torch.dtype) -> int:
        return torch.empty((), dtype=dtype).element_size() + 4  # a value and its int32 index

    # --- the two kinds of step ------------------------------------------------------------------
    def exact(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """Step (0): the sequences start from the exact mean (one full-precision ``all_to_all`` and
        ``all_gather``, each mean taken in rank order on its server shard). Returns ``gtil``."""
        lay, n, me = self.layout, self.layout.world_size, self.rank
        cap, mine, item = lay.capacity, lay.shard_sizes[me], x.element_size()
        send = x.new_zeros(n, cap)
        for j, part in enumerate(self._shards(x)):
            send[j, : part.numel()] = part
        recv = self.transport.all_to_all(send.reshape(-1)).view(n, cap)
        self._count(_UP, send.numel() * item, cap * item)
        # (0) server: ghat = ghat_prev = mean_i g_i
        ghat, ghat_prev = state[SERVER_MARKOV_STATE], state[SERVER_PREVIOUS_MARKOV_STATE]
        ghat.copy_(mean_in_rank_order([recv[i, :mine] for i in range(n)]))
        ghat_prev.copy_(ghat)
        reply = x.new_zeros(cap)
        reply[:mine] = ghat
        full = self.transport.all_gather(reply).view(n, cap)
        self._count(_DOWN, cap * item, cap * item)
        # (0) worker i: g_i^est = y_i = g_i; gtil = ghat (every shard)
        gtil = state[DOWN_MARKOV_STATE]
        gtil.copy_(torch.cat([full[j, : lay.shard_sizes[j]] for j in range(n)]))
        state[MARKOV_STATE].copy_(x)
        state[PREVIOUS_GRAD].copy_(x)
        others = sum(lay.shard_sizes) - mine
        self.last = LevelRecord("exact", (), None, others * item, (n - 1) * mine * item)
        return gtil

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        """Steps (1)-(5) for this rank's gradient ``x``; returns ``gtil``, the same on every rank."""
        comp, lay, n, me = self.compressor, self.layout, self.layout.world_size, self.rank
        h, y = state[MARKOV_STATE], state[PREVIOUS_GRAD]
        # (1) worker i: its level by the rule on its whole vector; one sort per shard serves every level
        v = x - h
        parts = self._shards(v)
        orders = [comp.order(p) for p in parts]
        budget = self.zeta * squared_norm(x - y)
        level = adaptive_level(
            float(squared_norm(x - h)), self._level_errors(x, h, parts, orders), float(budget), comp.num_levels
        )
        up_levels = self._share_levels(level, x.device)
        mean_c, payload_up = self._send_up(parts, orders, level, up_levels, x.dtype)
        # (2) worker i: g_i^est <- g_i^est + C_level(g_i - g_i^est) (unchanged on a skip); y_i <- g_i
        if level > 0:
            h += self._dense(parts, orders, level)
        y.copy_(x)
        # (3) server: ghat_prev <- ghat; ghat <- ghat + mean_i C_{level_i}(g_i - g_i^est)
        ghat, ghat_prev = state[SERVER_MARKOV_STATE], state[SERVER_PREVIOUS_MARKOV_STATE]
        ghat_prev.copy_(ghat)
        if mean_c is not None:
            ghat += mean_c
        # (4)-(5) server: the agreed level on the aggregate; worker i: gtil <- gtil + C_level_d(ghat - gtil)
        gtil = state[DOWN_MARKOV_STATE]
        down_level, payload_down = self._send_down(ghat, gtil, ghat_prev)
        self.last = LevelRecord("compressed", up_levels, down_level, payload_up, payload_down)
        return gtil

    # --- up ---------------------------------------------------------------------------------------
    def _share_levels(self, level: int, device: torch.device) -> tuple[int, ...]:
        """All-gather each worker's one-byte header: every rank learns every worker's level."""
        header = torch.tensor([level], dtype=torch.uint8, device=device)
        levels = self.transport.all_gather(header)
        self._count(_UP, HEADER_NBYTES, HEADER_NBYTES)
        return tuple(int(v) for v in levels.cpu().tolist())

    def _send_up(
        self,
        parts: list[torch.Tensor],
        orders: list[torch.Tensor],
        level: int,
        levels: tuple[int, ...],
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor | None, int]:
        """The ``all_to_all`` of the chosen levels in an envelope of the widest one. Returns (``mean_i
        C_{level_i}(g_i - g_i^est)`` on this rank's shard, None when every worker skipped; the
        information bytes this rank sent up)."""
        comp, lay, n, me = self.compressor, self.layout, self.layout.world_size, self.rank
        cap = lay.capacity
        payload = (n - 1) * HEADER_NBYTES + self._entry_nbytes(dtype) * sum(
            comp.k(level, lay.shard_sizes[j]) for j in range(n) if j != me
        )
        widest = max(levels)
        if widest == 0:  # every worker skipped: the headers were the whole message
            return None, payload
        width = comp.level_wire_nbytes(widest, cap, dtype)
        send = torch.cat(
            [
                comp.level_to_wire(comp.compress_level(p, o, level), level, cap, dtype, width)
                for p, o in zip(parts, orders)
            ]
        )
        recv = self.transport.all_to_all(send).view(n, width)
        self._count(_UP, send.numel(), width)
        mine = lay.shard_sizes[me]
        pieces = [
            comp.decompress(comp.level_from_wire(recv[i], levels[i], mine, cap, dtype), dtype=dtype)
            for i in range(n)
        ]
        return mean_in_rank_order(pieces), payload

    # --- down -------------------------------------------------------------------------------------
    def _send_down(self, ghat: torch.Tensor, gtil: torch.Tensor, ghat_prev: torch.Tensor) -> tuple[int, int]:
        """Steps (4)-(5): the servers' agreed level, and ``gtil`` updated in place. Returns (the level,
        the information bytes this rank sent down)."""
        comp, lay, n, me = self.compressor, self.layout, self.layout.world_size, self.rank
        cap, dtype, m = lay.capacity, ghat.dtype, comp.num_levels
        h = gtil[self.server_slice()]
        v = ghat - h
        order = comp.order(v)
        # (4) this shard's partial ||x - h||^2, ||x - y||^2, ||x - z_j||^2 (j < m), summed over the servers
        partial = torch.stack(
            [squared_norm(v), squared_norm(ghat - ghat_prev)]
            + [squared_norm(ghat - (h + self._dense([v], [order], j))) for j in range(1, m)]
        )
        everyone = self.transport.all_gather(partial).view(n, m + 1)
        norms_nbytes = partial.numel() * partial.element_size()
        self._count(_DOWN, norms_nbytes, norms_nbytes)
        total = everyone[0].clone()
        for row in everyone[1:]:  # rank order, on every rank alike
            total += row
        budget = self.zeta * total[1]
        level = adaptive_level(float(total[0]), [float(e) for e in total[2:]], float(budget), m)
        payload = (n - 1) * (norms_nbytes + self._entry_nbytes(dtype) * comp.k(level, lay.shard_sizes[me]))
        if level == 0:  # skip, agreed by every rank: nothing but the norms was sent
            return level, payload
        width = comp.level_wire_nbytes(level, cap, dtype)
        wire = comp.level_to_wire(comp.compress_level(v, order, level), level, cap, dtype, width)
        recv = self.transport.all_gather(wire).view(n, width)
        self._count(_DOWN, width, width)
        # (5) worker i: gtil <- gtil + C_level(ghat - gtil), every shard decoded alike on every rank
        gtil += torch.cat(
            [
                comp.decompress(comp.level_from_wire(recv[j], level, lay.shard_sizes[j], cap, dtype), dtype=dtype)
                for j in range(n)
            ]
        )
        return level, payload
