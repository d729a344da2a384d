"""Hierarchy "node": exact average inside each node group, a compressed exchange across node groups.

What a cluster of multi-GPU nodes wants: NVLink / PCIe inside a node is cheap, the network between
nodes is not. With ``G`` ranks per node and ``N`` nodes (``comm.hierarchy``; rank ``v*G + l`` is
local rank ``l`` of node ``v``), ``HierarchicalExchange`` wraps any exchange scheme (``inner``)::

    (1) intra reduce-scatter (exact):  rank l of node v gets node shard l of xbar_v = (1/G) sum_{i in v} x_i
    (2) inter, the inner scheme with the N nodes as its workers, on node shard l, over the ranks with
        local index l (one per node): est_l = inner(xbar_1[l], ..., xbar_N[l])
    (3) intra all_gather (exact): every rank gets est = (est_0, ..., est_{G-1})

so only step (2) crosses nodes, compressed, and each node sends ``inner``'s bytes for ``d`` coordinates
in all (``d / G`` per rank). The result is the inner scheme run on N workers whose inputs are the node
averages, shard by shard: for CD-Adam the Markov states ``h`` of the "worker" ``v`` live on node v,
node shard l on rank l; the server shards and ``gtil`` too. Which rank holds what:

* the inner scheme's full-length buffers (``markov_state``, ``worker_error``, ``down_markov_state``)
  have this rank's node-shard length; its shard buffers (``server_markov_state``, ``server_error``)
  the length of this rank's sub-shard of it;
* every one of them is ``PER_RANK``: even ``down_markov_state``, identical across nodes for one local
  index, differs between the local ranks of a node (other coordinates). Checkpoints save them per rank;
  the consistency check covers the parameters and moments, which stay identical on every rank.

``make_node_exchange`` builds the node-level exchange of a scheme: the scheme's own ``NODE_LEVEL``
class where it has one (Birder's ``binary``: the Hierarchical-1-bit-All-Reduce of
``binary_exchange``), else ``HierarchicalExchange`` around it. Bytes are counted per level in
``groups.intra_stats`` / ``groups.inter_stats`` and in the optimizer's total.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .comm.accounting import CommStats, all_gather_bytes_sent, reduce_scatter_bytes_sent
from .comm.hierarchy import DOWN, UP, NodeGroups, count_collective, local_ranks_from_environment
from .comm.layout import ShardLayout
from .comm.transport import Transport
from .compressors.base import Compressor
from .exchange import EXCHANGES, Exchange, make_exchange
from .state import PER_RANK, SHARD, TRANSIENT, StateSpec

HIERARCHIES = ("flat", "node")


@dataclass(frozen=True)
class NodeExchangeSettings:
    """What an optimizer hands to every node-level exchange it builds."""

    compressor: Compressor
    stats: CommStats  # the optimizer's total
    seed: int = 0
    block_size: int | None = None


def node_level_specs(specs: tuple[StateSpec, ...]) -> tuple[StateSpec, ...]:
    """An inner scheme's buffers as ``HierarchicalExchange`` keeps them: pieces of the bucket, per rank."""
    return tuple(
        StateSpec(
            s.key,
            SHARD,
            TRANSIENT if s.scope == TRANSIENT else PER_RANK,
            f"{s.doc} (hierarchy 'node': on this rank's node shard)",
        )
        for s in specs
    )


def node_exchange_specs(name: str) -> tuple[StateSpec, ...]:
    """The state buffers scheme ``name`` keeps under hierarchy "node"."""
    scheme = EXCHANGES[name]
    node_level = getattr(scheme, "NODE_LEVEL", None)
    return node_level.STATE if node_level is not None else node_level_specs(scheme.STATE)


def make_node_exchange(groups: NodeGroups, name: str, numel: int, settings: NodeExchangeSettings) -> Exchange:
    """The node-level exchange of scheme ``name`` for a bucket of ``numel`` coordinates."""
    if name not in EXCHANGES:
        raise ValueError(f"Unknown exchange={name!r}. Allowed: {', '.join(EXCHANGES)}.")
    node_level = getattr(EXCHANGES[name], "NODE_LEVEL", None) or HierarchicalExchange
    return node_level.for_nodes(groups, name, numel, settings)


class NodeHierarchy:
    """An optimizer's hierarchy "node": its node groups (made on first use, by every rank alike), the
    bytes of each level, and the node-level exchanges and state declarations of its schemes.

    ``intra_stats`` / ``inter_stats``: the bytes this rank sent inside its node group / across node
    groups, summed over steps (the optimizer's ``comm_stats`` holds their sum, and the control messages).
    """

    def __init__(self, ranks_per_node: int | None) -> None:
        self.ranks_per_node = ranks_per_node  # None: the launcher's LOCAL_WORLD_SIZE / LOCAL_SIZE
        self.intra_stats = CommStats()
        self.inter_stats = CommStats()
        self.groups: NodeGroups | None = None

    @classmethod
    def from_config(cls, config: object) -> NodeHierarchy | None:
        """The hierarchy a config asks for (its ``hierarchy`` / ``ranks_per_node``), or None for "flat"."""
        if getattr(config, "hierarchy", "flat") == "flat":
            return None
        return cls(getattr(config, "ranks_per_node", None))

    def node_groups(self, transport: Transport, stats: CommStats) -> NodeGroups:
        if self.groups is None:
            self.groups = NodeGroups.split(transport, self.ranks_per_node, stats, self.intra_stats, self.inter_stats)
        return self.groups

    def make_exchange(
        self,
        name: str,
        numel: int,
        transport: Transport,
        compressor: Compressor,
        stats: CommStats,
        seed: int,
        block_size: int | None,
    ) -> Exchange:
        """Scheme ``name``'s node-level exchange for a bucket of ``numel`` coordinates (``make_node_exchange``)."""
        settings = NodeExchangeSettings(compressor, stats, seed, block_size)
        return make_node_exchange(self.node_groups(transport, stats), name, numel, settings)

    @staticmethod
    def specs(name: str) -> tuple[StateSpec, ...]:
        return node_exchange_specs(name)

    def layout(self, world_size: int) -> dict[str, object]:
        """What a checkpoint of this hierarchy must be resumed with (the per-rank buffers' lengths follow it)."""
        if self.groups is not None:
            k: object = self.groups.ranks_per_node
        elif self.ranks_per_node is not None:
            k = self.ranks_per_node
        else:
            try:
                k = local_ranks_from_environment(world_size)
            except ValueError:
                k = None  # not known before the first step: refused there
        return {"hierarchy": "node", "ranks_per_node": k}


def _add_difference(total: CommStats, before: CommStats, after: CommStats) -> None:
    for f in dataclasses.fields(CommStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(after, f.name) - getattr(before, f.name))


class HierarchicalExchange(Exchange):
    """``inner`` across node groups on this rank's node shard, exact inside them (module docstring).

    Its ``transport`` and ``layout`` are the node's (``groups.intra``, one node shard per local rank);
    ``inner`` runs on ``groups.inter`` with a layout of the node shard.
    """

    def __init__(self, groups: NodeGroups, inner: Exchange, numel: int, stats: CommStats) -> None:
        super().__init__(groups.intra, ShardLayout(numel, groups.ranks_per_node), stats)
        if inner.transport is not groups.inter or inner.layout.numel != self.layout.shard_sizes[groups.local_index]:
            raise ValueError("The inner exchange must run on groups.inter over this rank's node shard.")
        self.groups = groups
        self.inner = inner
        self.STATE = node_level_specs(inner.STATE)

    @classmethod
    def for_nodes(cls, groups: NodeGroups, name: str, numel: int, settings: NodeExchangeSettings) -> Exchange:
        node_shard = ShardLayout(numel, groups.ranks_per_node).shard_sizes[groups.local_index]
        inner_layout = ShardLayout(node_shard, groups.nodes, settings.block_size)
        inner = make_exchange(
            name,
            groups.inter,
            inner_layout,
            settings.compressor,
            groups.inter_stats,
            settings.seed,
        )
        return cls(groups, inner, numel, settings.stats)

    def init_state(self, state: dict, like: torch.Tensor) -> None:
        """The inner scheme's buffers, sized for this rank's node shard."""
        self.inner.init_state(state, like.new_zeros(self.layout.shard_sizes[self.rank]))

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        g, node = self.groups, self.layout
        G, local = g.ranks_per_node, g.local_index
        width, item = node.capacity, x.element_size()
        # (1) intra reduce-scatter: the node's sum on node shard l (exact, rank order in-process), then / G
        send = x.new_zeros(G * width)
        for j in range(G):
            send[j * width : j * width + node.shard_sizes[j]] = x[node.shard_slice(j)]
        node_mean = g.intra.reduce_scatter_sum(send)[: node.shard_sizes[local]] / G
        sent = reduce_scatter_bytes_sent(G * width * item, G)
        count_collective((self.stats, g.intra_stats), UP, sent=sent, handed=G * width * item)
        # (2) inter: the inner scheme over the N nodes on node shard l (its bytes: inter_stats, then the total);
        # group * G + l keeps the shared seeds of different node shards apart
        before = dataclasses.replace(g.inter_stats)
        estimate = self.inner.exchange(node_mean, state, step=step, group=group * G + local)
        _add_difference(self.stats, before, g.inter_stats)
        # (3) intra all_gather (exact): the full estimate on every rank
        mine = x.new_zeros(width)
        mine[: estimate.numel()] = estimate
        gathered = g.intra.all_gather(mine).view(G, width)
        sent = all_gather_bytes_sent(width * item, G)
        count_collective((self.stats, g.intra_stats), DOWN, sent=sent, handed=width * item)
        return torch.cat([gathered[j, : node.shard_sizes[j]] for j in range(G)])
