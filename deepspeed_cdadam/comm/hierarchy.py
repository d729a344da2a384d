"""Node groups for hierarchical exchanges: the intra-node and inter-node transports, and their bytes.

Ranks are placed node by node, ``k`` per node (``ranks_per_node``): node ``v`` holds ranks
``v*k .. v*k+k-1``, and rank ``r`` has local index ``l = r % k`` on node ``v = r // k``
(``transport.node_groups``). ``NodeGroups`` gives each rank two transports:

* ``intra``: the ``k`` ranks of its node (its rank there is ``l``), where bandwidth is cheap;
* ``inter``: the ``N = world_size / k`` ranks that share its local index, one per node (its rank
  there is ``v``): every message on it crosses nodes.

Bytes are counted per level (``intra_stats``, ``inter_stats``, each a ``CommStats``) and also in the
optimizer's total ``stats``, so that the total still reads as for a flat exchange.

``ranks_per_node`` given (an int) is used as is (e.g. to emulate nodes on one machine); ``None``
reads the launcher's ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE`` (the ``deepspeed``
launcher). Every rank's value is all-gathered once and must agree: a mismatch raises on every rank
(a rank left out of a node group would wait forever).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .accounting import CommStats, all_gather_bytes_sent
from .accounting import reduce_scatter_bytes_sent  # noqa: F401 - sketch_exchange imports it from here
from .transport import Transport, control_device, node_groups

#: Environment variables that say how many ranks run on this node, in the order they are read.
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
UP, DOWN = "up", "down"


def local_ranks_from_environment(world_size: int) -> int:
    """``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE`` of this process, or ``ValueError`` naming ``ranks_per_node``."""
    for name in LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value is None:
            continue
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"Invalid {name}={value!r} in the environment: set ranks_per_node explicitly.")
        launched = os.environ.get("WORLD_SIZE")
        if launched is not None and launched.isdigit() and int(launched) != world_size:
            raise ValueError(
                f"hierarchy='node' with ranks_per_node=None reads {name}={value}, which counts the ranks of the "
                f"whole job (WORLD_SIZE={launched}), but the optimizer communicates over {world_size} ranks (a "
                "data-parallel group under model parallelism): set ranks_per_node to its ranks per node."
            )
        return int(value)
    raise ValueError(
        "hierarchy='node' with ranks_per_node=None needs the launcher's LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE "
        "(deepspeed), and neither is set: set ranks_per_node (ranks per node group) explicitly."
    )


@dataclass
class NodeGroups:
    """This rank's two transports of a node hierarchy and the bytes counted on each."""

    ranks_per_node: int
    world_rank: int
    intra: Transport
    inter: Transport
    intra_stats: CommStats = field(default_factory=CommStats)
    inter_stats: CommStats = field(default_factory=CommStats)

    @property
    def nodes(self) -> int:
        return self.inter.world_size

    @property
    def local_index(self) -> int:
        return self.intra.rank

    @property
    def node_index(self) -> int:
        return self.inter.rank

    @classmethod
    def split(
        cls,
        transport: Transport,
        ranks_per_node: int | None,
        stats: CommStats,
        intra_stats: CommStats | None = None,
        inter_stats: CommStats | None = None,
    ) -> NodeGroups:
        """Agree on ``ranks_per_node`` (given, or from the environment) and split ``transport``; every
        rank calls it at the same point. The agreement is counted as set-up bytes in ``stats``."""
        n = transport.world_size
        k = ranks_per_node if ranks_per_node is not None else local_ranks_from_environment(n)
        mine = torch.tensor([float(k)], device=control_device(transport))
        everyone = [int(v) for v in transport.all_gather(mine).tolist()]
        stats.bytes_setup += all_gather_bytes_sent(4, n)
        stats.bytes_handed += 4
        stats.collective_calls += 1
        if len(set(everyone)) > 1:
            raise ValueError(
                f"The ranks disagree on ranks_per_node (per rank: {everyone}); every rank must use the same node "
                "size. Set ranks_per_node explicitly, or launch the same number of ranks on every node."
            )
        if n % k:
            raise ValueError(
                f"Invalid ranks_per_node={k}: it must divide the {n} ranks of the optimizer's group (ranks placed "
                "node by node, the same number on every node)."
            )
        intra_parts, inter_parts = node_groups(n, k)
        return cls(
            ranks_per_node=k,
            world_rank=transport.rank,
            intra=transport.split(intra_parts),
            inter=transport.split(inter_parts),
            intra_stats=intra_stats if intra_stats is not None else CommStats(),
            inter_stats=inter_stats if inter_stats is not None else CommStats(),
        )


def count_collective(stats: tuple[CommStats, ...], direction: str, *, sent: float, handed: int) -> None:
    """Count one collective in each of ``stats``: ``sent`` bytes sent by this rank, ``handed`` bytes handed to it."""
    for s in stats:
        if direction == UP:
            s.bytes_up += sent
        else:
            s.bytes_down += sent
        s.bytes_handed += handed
        s.collective_calls += 1

