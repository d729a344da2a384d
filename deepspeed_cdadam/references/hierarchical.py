"""CD-Adam and 1-bit Adam with hierarchy "node", plainly: exact average inside each node, the
compressed scheme across nodes with the nodes as its workers.

``nodes`` nodes of ``ranks_per_node`` (G) ranks; rank ``v * G + l`` is local rank ``l`` of node ``v``.
The bucket ``x`` is cut into G node shards (``ShardLayout(d, G)``); node shard ``l`` is exchanged
across the N nodes with the flat scheme's own lines (``simulate.compress_by_shard`` over
``ShardLayout(len_l, N, block_size)``, bucket index ``group * G + l`` in the shared seeds), written out
here per node shard. The node average is the sum in rank order, divided by G.

    CD-Adam:   gbar_v = (1/G) sum_{i in v} g_i;  per node shard l:
               c_v = C(gbar_v - h_v);  h_v += c_v;  ghat += (1/N) sum_v c_v;  gtil += C(ghat - gtil)
               then the AMSGrad update with gtil (simulate.AMSGradStep)
    1-bit Adam: warm-up: exact mean of all gradients (Adam);  then m_i = b1 m + (1 - b1) g_i,
               mbar_v = (1/G) sum_{i in v} m_i;  per node shard l:
               p_v = mbar_v + e_v;  c_v = C(p_v);  e_v = p_v - c_v;  q = (1/N) sum_v c_v + ebar;
               m = C(q);  ebar = q - m;   x -= lr (m / (sqrt(v) + eps) + wd x)
"""

from __future__ import annotations

import torch

from ..comm.layout import ShardLayout
from ..compressors.registry import get_compressor
from ..simulate import AMSGradStep, compress_by_shard

UP, DOWN = 0, 1


class _NodeHierarchy:
    def __init__(self, x0, nodes, ranks_per_node, block_size, compressor):
        self.x = x0.detach().clone().reshape(-1)
        self.N, self.G = nodes, ranks_per_node
        self.node_layout = ShardLayout(self.x.numel(), ranks_per_node)
        self.inner = [ShardLayout(n, nodes, block_size) for n in self.node_layout.shard_sizes]
        self.C = get_compressor(compressor)
        self.t, self.group = 0, 0

    def zeros(self):
        return torch.zeros_like(self.x)

    def node_means(self, vectors):
        """Per node, the sum of its ranks' vectors in rank order, divided by G."""
        means = []
        for v in range(self.N):
            total = vectors[v * self.G].clone()
            for i in range(v * self.G + 1, (v + 1) * self.G):
                total = total + vectors[i]
            means.append(total / self.G)
        return means

    def C_up(self, vec, local, sender):
        return compress_by_shard(
            self.C, vec, self.inner[local], step=self.t, group=self.group * self.G + local, direction=UP, sender=sender
        )

    def C_down(self, vec, local):
        return compress_by_shard(
            self.C, vec, self.inner[local], step=self.t, group=self.group * self.G + local, direction=DOWN, sender=None
        )


class NodeCDAdamReference(_NodeHierarchy):
    """CD-Adam's Markov exchange across nodes on the node averages of the gradients."""

    def __init__(
        self, x0, nodes, ranks_per_node, block_size=None, *, lr=1e-3, betas=(0.9, 0.99), eps=1e-8,
        weight_decay=0.0, amsgrad=True, compressor="scaled_sign",
    ):  # fmt: skip
        super().__init__(x0, nodes, ranks_per_node, block_size, compressor)
        self.update = AMSGradStep(self.x.numel(), self.x.dtype, lr, betas, eps, weight_decay, amsgrad)
        self.h = [self.zeros() for _ in range(nodes)]  # each node's Markov state
        self.ghat = self.zeros()  # the servers' Markov state (all node shards, all sub-shards)
        self.gtil = self.zeros()  # the down Markov state

    def step(self, worker_grads):
        self.t += 1
        gbar = self.node_means(worker_grads)
        for local in range(self.G):
            sl = self.node_layout.shard_slice(local)
            c = [self.C_up(gbar[v][sl] - self.h[v][sl], local, v) for v in range(self.N)]
            for v in range(self.N):
                self.h[v][sl] += c[v]
            total = c[0].clone()
            for cv in c[1:]:
                total = total + cv
            self.ghat[sl] += total / self.N
            self.gtil[sl] += self.C_down(self.ghat[sl] - self.gtil[sl], local)
        self.x = self.update(self.x, self.gtil)
        return self.x


class NodeOneBitAdamReference(_NodeHierarchy):
    """1-bit Adam: exact warm-up over all ranks, then error feedback across nodes on the node averages
    of the workers' momenta."""

    def __init__(
        self, x0, nodes, ranks_per_node, block_size=None, *, lr=1e-3, freeze_step=10, betas=(0.9, 0.999),
        eps=1e-8, weight_decay=0.0, compressor="sign_l2",
    ):  # fmt: skip
        super().__init__(x0, nodes, ranks_per_node, block_size, compressor)
        self.m, self.v = self.zeros(), self.zeros()
        self.e = [self.zeros() for _ in range(nodes)]  # each node's worker error
        self.ebar = self.zeros()  # the servers' errors
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.freeze_step = lr, betas, eps, weight_decay, freeze_step

    def step(self, worker_grads):
        self.t += 1
        if self.t <= self.freeze_step:
            total = worker_grads[0].clone()
            for g in worker_grads[1:]:
                total = total + g
            g = total / len(worker_grads)
            self.m = self.b1 * self.m + (1 - self.b1) * g
            self.v = self.b2 * self.v + (1 - self.b2) * g * g
        else:
            mbar = self.node_means([self.b1 * self.m + (1 - self.b1) * g for g in worker_grads])
            m = self.zeros()
            for local in range(self.G):
                sl = self.node_layout.shard_slice(local)
                p = [mbar[v][sl] + self.e[v][sl] for v in range(self.N)]
                c = [self.C_up(p[v], local, v) for v in range(self.N)]
                for v in range(self.N):
                    self.e[v][sl] = p[v] - c[v]
                total = c[0].clone()
                for cv in c[1:]:
                    total = total + cv
                q = total / self.N + self.ebar[sl]
                m[sl] = self.C_down(q, local)
                self.ebar[sl] = q - m[sl]
            self.m = m
        update = self.m / (self.v.sqrt() + self.eps) + self.wd * self.x
        self.x = self.x - self.lr * update
        return self.x
