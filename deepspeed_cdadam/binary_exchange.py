"""Birder's exchange of stochastic signs: flat (``binary``) and its Hierarchical-1-bit-All-Reduce.

The input on worker ``i`` is its normalised momentum ``z_i = m_i / b_i`` (every ``|z_ij| <= 1``);
``q_i = stochastic_sign(z_i)`` (``compressors.binary``: ``+1`` with probability ``(1 + z_ij) / 2``,
so ``E[q_i] = z_i``) is what leaves the worker, one bit per coordinate and no scale.

**Flat** (``BinaryExchange``, scheme ``binary``): the exact mean ``qbar = (1/n) sum_i q_i``::

    (1) worker i:  q_i = C(z_i), drawn per server shard j with seed (seed, t, bucket, up, j, i);
                   all_to_all of the packed bits                      (1 bit per coordinate)
    (2) server j:  k = #{i : q_i = +1} on shard j   (exact)
                   all_gather of k                  (n.bit_length() bits per coordinate)
    (3) all:       qbar = (2k - n) / n              in {-1, -1 + 2/n, ..., 1}

**Hierarchical-1-bit-All-Reduce** (``HierarchicalBinaryExchange``, hierarchy "node"; G ranks per
node, N nodes; ``comm.hierarchy``). Every message carries one bit per coordinate::

    (1) worker i (node v, local index l):  q_i = C(z_i), per node shard j with seed (.., up, j, i);
        intra all_to_all: rank l receives node shard l of its node's G vectors
    (2) rank l:  c = sum of the G signs (exact);  r_v = C(c / G)   [seed (.., node, l*N + j, v) per
        sub-shard j]: E[r_v] = (1/G) sum_{i in v} q_i
    (3) inter all_to_all: sub-shard j of node shard l goes to node j's rank l
    (4) server (node v, rank l):  s = sum of the N signs (exact);  o = C(s / N)   [seed (.., server, l*N + v, v)]
    (5) inter all_gather of o: every node's rank l holds node shard l
    (6) intra all_gather: every rank holds the full vector qhat in {-1, +1}^d

so ``E[qhat | q] = (1/n) sum_i q_i`` (unbiased), and bytes across nodes per rank are
``2 (N-1) ceil(d / (8 G N))``: 1/32 of the fp32 ring all-reduce across nodes (``(N-1)/N * 8 d / G``)
when the sub-shards are whole bytes. The price is variance: ``qhat`` is a sign (its conditional
variance per coordinate is ``1 - (mean q)^2``), where the flat ``qbar`` keeps the exact mean.
Re-binarising the node count in (2) loses nothing against averaging ``z`` in full precision inside
the node and binarising that: either way ``r_v`` is, coordinate by coordinate, a sign with mean
``(1/G) sum_{i in v} z_i`` (only the correlations between coordinates differ), so the intra-node
messages stay 1 bit (exact for signs) and never carry fp32.

Seeds: ``exchange.shared_seed(seed, t, bucket, level, shard, sender)``; the draws are per rank
(each worker, node and server draws its own), reproducible from the seed, the step and the bucket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .comm.accounting import CommStats, all_gather_bytes_sent, all_to_all_bytes_sent
from .comm.layout import ShardLayout
from .comm.hierarchy import DOWN, UP, count_collective
from .comm.transport import Transport
from .compressors.base import Compressor
from .compressors.binary import StochasticSign, pack_counts, unpack_counts
from .compressors.packing import pack_signs, packed_nbytes, unpack_signs
from .exchange import CompressedExchange, Exchange, shared_seed

if TYPE_CHECKING:
    from .comm.hierarchy import NodeGroups
    from .hierarchical_exchange import NodeExchangeSettings

#: ``shared_seed`` levels of the draws (``exchange`` uses 0 for up, 1 for down).
WORKER_DRAW, NODE_DRAW, SERVER_DRAW = 0, 2, 3


def sum_of_signs(pieces: torch.Tensor, numel: int) -> torch.Tensor:
    """Sum over the rows of ``pieces`` (packed signs, one sender per row) of their first ``numel`` signs.

    int64, so exact for any number of senders."""
    total = torch.zeros(numel, dtype=torch.int64, device=pieces.device)
    for row in pieces:
        total += unpack_signs(row, numel, torch.int64)
    return total


def packed_signs_wire(signs: torch.Tensor, capacity: int) -> torch.Tensor:
    """A vector of +-1 as packed bits, padded to ``capacity`` coordinates (no draw: it is sent as is)."""
    wire = torch.zeros(packed_nbytes(capacity), dtype=torch.uint8, device=signs.device)
    packed = pack_signs(signs)
    wire[: packed.numel()] = packed
    return wire


def _check_compressor(compressor: Compressor) -> None:
    if not isinstance(compressor, StochasticSign):
        raise ValueError(
            f"exchange='binary' is Birder's: it binarises normalised momenta in [-1, 1] with the StochasticSign "
            f"compressor, not {getattr(compressor, 'name', compressor)!r}. Use deepspeed_cdadam.Birder."
        )


class HierarchicalBinaryExchange(Exchange):
    """Birder's Hierarchical-1-bit-All-Reduce (module docstring, steps (1)-(6)); keeps no state.

    Its ``transport`` and ``layout`` are the node's (``groups.intra``, one node shard per local rank).
    """

    STATE = ()

    def __init__(self, groups: NodeGroups, numel: int, compressor: Compressor, stats: CommStats, seed: int) -> None:
        _check_compressor(compressor)
        super().__init__(groups.intra, ShardLayout(numel, groups.ranks_per_node), stats)
        self.groups = groups
        self.compressor = compressor
        self.seed = seed
        # this rank's node shard, cut into one sub-shard per node (the inter-node servers)
        self.sub_layout = ShardLayout(self.layout.shard_sizes[groups.local_index], groups.nodes)

    @classmethod
    def for_nodes(cls, groups: NodeGroups, name: str, numel: int, settings: NodeExchangeSettings) -> Exchange:
        """The node-level exchange of scheme ``binary`` (``hierarchical_exchange.make_node_exchange``)."""
        return cls(groups, numel, settings.compressor, settings.stats, settings.seed)

    def _draw_wire(self, z: torch.Tensor, capacity: int, seed: int) -> torch.Tensor:
        """``C(z)`` drawn with ``seed``, packed and padded to ``capacity`` coordinates."""
        c = self.compressor.compress(z, (z.numel(),), seed=seed)
        return self.compressor.to_wire(c, capacity, 1, z.dtype)

    def _count(self, level: CommStats, direction: str, sent: int, handed: int) -> None:
        count_collective((self.stats, level), direction, sent=sent, handed=handed)

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        g, node, sub = self.groups, self.layout, self.sub_layout
        G, N, local, v = g.ranks_per_node, g.nodes, g.local_index, g.node_index
        node_width, sub_width = packed_nbytes(node.capacity), packed_nbytes(sub.capacity)
        # (1) worker: q_i = C(z_i) per node shard j; intra all_to_all (1 bit per coordinate)
        seeds = [shared_seed(self.seed, step, group, WORKER_DRAW, j, g.world_rank) for j in range(G)]
        send = torch.cat([self._draw_wire(x[node.shard_slice(j)], node.capacity, seeds[j]) for j in range(G)])
        recv = g.intra.all_to_all(send).view(G, -1)
        self._count(g.intra_stats, UP, all_to_all_bytes_sent(node_width, G), send.numel())
        # (2) rank l: c = sum of the node's G signs on node shard l (exact); r = C(c / G) per sub-shard j
        node_mean = sum_of_signs(recv, node.shard_sizes[local]).to(x.dtype) / G
        seeds = [shared_seed(self.seed, step, group, NODE_DRAW, local * N + j, v) for j in range(N)]
        send = torch.cat([self._draw_wire(node_mean[sub.shard_slice(j)], sub.capacity, seeds[j]) for j in range(N)])
        # (3) inter all_to_all: sub-shard j of node shard l to node j's rank l (1 bit per coordinate)
        recv = g.inter.all_to_all(send).view(N, -1)
        self._count(g.inter_stats, UP, all_to_all_bytes_sent(sub_width, N), send.numel())
        # (4) server (node v, rank l): s = sum of the N nodes' signs on sub-shard v (exact); o = C(s / N)
        server_mean = sum_of_signs(recv, sub.shard_sizes[v]).to(x.dtype) / N
        seed = shared_seed(self.seed, step, group, SERVER_DRAW, local * N + v, v)
        wire = self._draw_wire(server_mean, sub.capacity, seed)
        # (5) inter all_gather: node shard l on every node's rank l
        recv = g.inter.all_gather(wire).view(N, -1)
        self._count(g.inter_stats, DOWN, all_gather_bytes_sent(sub_width, N), wire.numel())
        node_shard = torch.cat([unpack_signs(recv[j], sub.shard_sizes[j], x.dtype) for j in range(N)])
        # (6) intra all_gather: the full vector on every rank
        wire = packed_signs_wire(node_shard, node.capacity)
        recv = g.intra.all_gather(wire).view(G, -1)
        self._count(g.intra_stats, DOWN, all_gather_bytes_sent(node_width, G), wire.numel())
        return torch.cat([unpack_signs(recv[j], node.shard_sizes[j], x.dtype) for j in range(G)])


class BinaryExchange(CompressedExchange):
    """``binary``: Birder's flat exchange, the exact mean of the stochastic signs (module docstring)."""

    scheme_name = "binary"
    STATE = ()
    #: It runs with this compressor only (CDAdam's ``exchange`` option does not offer it).
    COMPRESSOR_CLASS = StochasticSign
    OWNER = "Birder"
    OWNER_NOTE = "it binarises m / b in [-1, 1] with its own compressor"
    #: What runs instead under hierarchy "node" (``hierarchical_exchange.make_node_exchange``).
    NODE_LEVEL = HierarchicalBinaryExchange

    def __init__(
        self,
        transport: Transport,
        layout: ShardLayout,
        compressor: Compressor,
        stats: CommStats | None = None,
        seed: int = 0,
    ) -> None:
        _check_compressor(compressor)
        super().__init__(transport, layout, compressor, stats, seed)

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        lay, n, me = self.layout, self.layout.world_size, self.rank
        # (1) worker i: q_i = C(z_i) per server shard j, all_to_all of the bits
        wires = []
        for j in range(n):
            seed = shared_seed(self.seed, step, group, WORKER_DRAW, j, me)
            c = self.compressor.compress(x[lay.shard_slice(j)], lay.shard_blocks(j), seed=seed)
            wires.append(self.compressor.to_wire(c, lay.capacity, lay.max_blocks, x.dtype))
        send = torch.cat(wires)
        recv = self.transport.all_to_all(send).view(n, -1)
        sent = all_to_all_bytes_sent(self._wire_nbytes(x.dtype), n)
        count_collective((self.stats,), UP, sent=sent, handed=send.numel())
        # (2) server: k = how many workers sent +1 on this shard (exact); all_gather of k
        plus_here = (sum_of_signs(recv, lay.shard_sizes[me]) + n) // 2
        wire = pack_counts(plus_here, n, lay.capacity)
        gathered = self.transport.all_gather(wire).view(n, -1)
        count_collective((self.stats,), DOWN, sent=all_gather_bytes_sent(wire.numel(), n), handed=wire.numel())
        # (3) every rank: qbar = (2k - n) / n
        plus = torch.cat([unpack_counts(gathered[j], lay.shard_sizes[j], n, lay.capacity) for j in range(n)])
        return (2 * plus - n).to(x.dtype) / n
