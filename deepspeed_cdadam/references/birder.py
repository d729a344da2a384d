"""Birder, plainly: n workers in one process, written from ../shared/SEED_SPECS.md section 1.

The update rule is the spec's RECONSTRUCTION (Algorithm 1 of the paper was not available)::

    worker i:  m_i <- beta m_i + (1 - beta) g_i
               b_i <- beta b_i + (1 - beta) |g_i|
               bhat_i <- max(bhat_i, b_i)                    (amsgrad only; else bhat_i = b_i)
               z_i = m_i / bhat_i                            (0 where bhat_i = 0)
               q_i = +1 with probability (1 + z_i) / 2, else -1
    all:       qbar = (1/n) sum_i q_i                        (BirderReference)
               x <- x - lr (qbar + weight_decay x)

``NodeBirderReference`` replaces the mean by the Hierarchical-1-bit-All-Reduce (``binary_exchange``):
node counts and inter-node sums re-binarised, every message one bit per coordinate.

What is shared with the optimizer is only the convention of the draws: the uniforms of a message
come from ``torch.Generator().manual_seed(shared_seed(seed, step, bucket, level, shard, sender))``
(``exchange.shared_seed``, as the simulator's rand-k seeds), one message per (server) shard, so
that the reference replays every coin the ranks flipped. Hyperparameters may be floats or
per-coordinate tensors (``simulate.per_coordinate``) for a bucket of several parameter groups.
"""

from __future__ import annotations

import torch

from ..comm.layout import ShardLayout
from ..exchange import shared_seed

WORKER, NODE, SERVER = 0, 2, 3  # the draws' levels in the seeds


def coin_flips(z: torch.Tensor, seed: int) -> torch.Tensor:
    """+1 with probability ``(1 + z) / 2``, else -1, from ``len(z)`` uniforms drawn with ``seed``."""
    u = torch.rand(z.numel(), generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
    return torch.where(u < (1 + z) / 2, 1.0, -1.0).to(z.dtype)


class BirderReference:
    """``n`` workers of flat Birder on one bucket ``x`` (one ``ShardLayout`` of ``n`` server shards)."""

    def __init__(self, x0, n_workers, *, lr=1e-3, beta=0.9, weight_decay=0.0, amsgrad=False, seed=0, group=0):
        self.x = x0.detach().clone().reshape(-1)
        self.n = n_workers
        self.lr, self.beta, self.wd, self.amsgrad = lr, beta, weight_decay, amsgrad
        self.seed, self.group, self.t = seed, group, 0
        d = self.x.numel()
        self.m = [torch.zeros(d, dtype=self.x.dtype) for _ in range(n_workers)]
        self.b = [torch.zeros(d, dtype=self.x.dtype) for _ in range(n_workers)]
        self.bhat = [torch.zeros(d, dtype=self.x.dtype) for _ in range(n_workers)]
        self.layout = ShardLayout(d, n_workers)
        self.last_q: list[torch.Tensor] = []  # each worker's signs of the last step

    def normalised_momenta(self, worker_grads):
        """Every worker's ``z_i`` after its moments take ``g_i``."""
        zs = []
        for i, g in enumerate(worker_grads):
            self.m[i] = self.beta * self.m[i] + (1 - self.beta) * g
            self.b[i] = self.beta * self.b[i] + (1 - self.beta) * g.abs()
            self.bhat[i] = torch.maximum(self.bhat[i], self.b[i])
            denominator = torch.where(torch.as_tensor(self.amsgrad), self.bhat[i], self.b[i])
            zs.append(torch.where(denominator > 0, self.m[i] / denominator, 0.0))
        return zs

    def worker_signs(self, z, sender, layout):
        """``q`` of worker ``sender``: one message (its own draws) per shard of ``layout``."""
        return torch.cat(
            [
                coin_flips(z[layout.shard_slice(j)], shared_seed(self.seed, self.t, self.group, WORKER, j, sender))
                for j in range(layout.world_size)
            ]
        )

    def average(self, zs):
        self.last_q = [self.worker_signs(z, i, self.layout) for i, z in enumerate(zs)]
        total = self.last_q[0].clone()
        for q in self.last_q[1:]:
            total = total + q
        return total / self.n

    def step(self, worker_grads):
        self.t += 1
        qbar = self.average(self.normalised_momenta(worker_grads))
        self.x = self.x - self.lr * (qbar + self.wd * self.x)
        return self.x


class NodeBirderReference(BirderReference):
    """Birder with the Hierarchical-1-bit-All-Reduce: ``nodes`` nodes of ``ranks_per_node`` ranks,
    rank ``v * ranks_per_node + l`` being local rank ``l`` of node ``v``."""

    def __init__(self, x0, nodes, ranks_per_node, **kwargs):
        super().__init__(x0, nodes * ranks_per_node, **kwargs)
        self.nodes, self.G = nodes, ranks_per_node
        self.node_layout = ShardLayout(self.x.numel(), ranks_per_node)

    def average(self, zs):
        N, G = self.nodes, self.G
        self.last_q = [self.worker_signs(z, i, self.node_layout) for i, z in enumerate(zs)]
        out = []
        for local in range(G):
            piece = self.node_layout.shard_slice(local)
            sub = ShardLayout(piece.stop - piece.start, N)
            # each node: the mean of its G signs on this node shard, re-binarised per sub-shard j
            node_signs = []
            for v in range(N):
                total = self.last_q[v * G][piece].clone()
                for i in range(v * G + 1, (v + 1) * G):
                    total = total + self.last_q[i][piece]
                mean = total / G
                node_signs.append(
                    torch.cat(
                        [
                            coin_flips(
                                mean[sub.shard_slice(j)],
                                shared_seed(self.seed, self.t, self.group, NODE, local * N + j, v),
                            )
                            for j in range(N)
                        ]
                    )
                )
            # each server (node j's rank l): the mean of the N nodes' signs on sub-shard j, re-binarised
            for j in range(N):
                total = node_signs[0][sub.shard_slice(j)].clone()
                for v in range(1, N):
                    total = total + node_signs[v][sub.shard_slice(j)]
                seed = shared_seed(self.seed, self.t, self.group, SERVER, local * N + j, j)
                out.append(coin_flips(total / N, seed))
        return torch.cat(out)
