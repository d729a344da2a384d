"""AdaCGD, plainly: n workers and one server in one process, written from ../shared/SEED_SPECS.md section 3.

The adaptive compressor (SECONDARY, the per-worker 3PC form), with ``C_1 .. C_m`` top-k levels::

    C^AC_{h,y}(x):  if ||x - h||^2 <= zeta ||x - y||^2:              return h      (skip)
                    for j = 1 .. m-1:
                        z_j = h + C_j(x - h)
                        if ||x - z_j||^2 <= zeta ||x - y||^2:          return z_j
                    return h + C_m(x - h)

    worker i:  g_i <- C^AC_{g_i, y_i}(grad_i);  y_i <- grad_i       (PRIMARY 3PC anchors; g_i^0 = grad_i, exact)
    server:    ghat <- ghat + (1/n) sum_i c_i                         (c_i = g_i_new - g_i as sent: 0 on a skip)
               gtil <- C^AC_{gtil, ghat_prev}(ghat)                   (the server's compression: our reconstruction)
    all:       x <- (1 - lr wd) x - lr gtil

The master's estimator ``ghat`` is the mean of the ``g_i`` (the spec's ``(1/n) sum_i g_i^t``), kept as
the master can keep it: from the messages ``c_i = C_j(grad_i - g_i)`` it receives (recomputing the
mean would differ in rounding, and the rule's ``<=`` against a budget of exactly 0, when no worker
sent, is decided by exact zeros). The tests check ``ghat`` against the mean.

``C_j`` is top-k on each server shard: a shard of ``d`` coordinates keeps the
``min(d, max(1, ceil(ratio_j d)))`` largest ``|v|``, ties to the lower index, chosen here by Python's
stable sort, one sort per level (the optimizer sorts once for all levels). The only thing shared with
the optimizer is that convention and the shard lengths (``shard_sizes``, contiguous, in order).

Bits as the spec's "Bits per step per worker": 0 on a skip, else ``ceil(log2 m)`` for the level plus
the kept values (the vector's dtype) and their 32-bit indices; the server's message counted once.
The exact first step: ``d`` values per worker up and ``d`` down. Hyperparameters may be floats or
per-coordinate tensors (``simulate.per_coordinate``) for a bucket of several parameter groups.

The update ``x - lr gtil`` is rounded once (``addcmul``, as torch's ``add(..., alpha=-lr)`` rounds it
on CPU): with the same bits for ``x``, the gradients (which depend on ``x``) have the same bits, and
so do the decisions that hinge on exact zeros (a budget of 0: when no worker sent, the server's
``||x - y||^2`` is 0 and a level is accepted only if it leaves no error at all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def squared_norm(t: torch.Tensor) -> torch.Tensor:
    return (t * t).sum()


def even_shard_sizes(numel: int, n: int) -> list[int]:
    """``n`` contiguous shards whose lengths differ by at most one, the longer ones first."""
    base, extra = divmod(numel, n)
    return [base + 1 if j < extra else base for j in range(n)]


def kept(ratio: float, d: int) -> int:
    """Coordinates top-k with ``ratio`` keeps of ``d`` (none of an empty shard)."""
    return 0 if d == 0 else min(d, max(1, math.ceil(ratio * d)))


def top_k_per_shard(v: torch.Tensor, shard_sizes: Sequence[int], ratio: float) -> torch.Tensor:
    """``C(v)``: on each shard the ``kept(ratio, d)`` largest ``|v|`` (ties: the lower index), zeros elsewhere."""
    out = torch.zeros_like(v)
    start = 0
    for d in shard_sizes:
        piece = v[start : start + d]
        magnitudes = piece.abs().tolist()
        keep = sorted(range(d), key=lambda i: -magnitudes[i])[: kept(ratio, d)]  # stable: ties keep index order
        for i in keep:
            out[start + i] = piece[i]
        start += d
    return out


def adaptive_compress(
    x: torch.Tensor,
    h: torch.Tensor,
    y: torch.Tensor,
    *,
    shard_sizes: Sequence[int],
    ratios: Sequence[float],
    zeta: float,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``C^AC_{h,y}(x)``: (the level, 0 for a skip; the new estimate ``z``; the message ``C_level(x - h)``,
    zeros for a skip)."""
    budget = zeta * squared_norm(x - y)
    if squared_norm(x - h) <= budget:
        return 0, h, torch.zeros_like(h)
    m = len(ratios)
    for j in range(1, m):
        c = top_k_per_shard(x - h, shard_sizes, ratios[j - 1])
        z = h + c
        if squared_norm(x - z) <= budget:
            return j, z, c
    c = top_k_per_shard(x - h, shard_sizes, ratios[m - 1])
    return m, h + c, c


class AdaCGDReference:
    """``n`` workers of AdaCGD on one bucket ``x``; ``step(grads)`` returns the new ``x``.

    ``last`` holds what the last step chose: ``kind`` ("exact" / "compressed"), ``up_levels``,
    ``down_level``, and the vectors the invariant tests need (each worker's ``x``, ``h``, ``y`` and new
    estimate; the server's).
    """

    def __init__(
        self,
        x0: torch.Tensor,
        n_workers: int,
        *,
        ratios: Sequence[float],
        zeta: float,
        lr: float | torch.Tensor,
        weight_decay: float | torch.Tensor = 0.0,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        self.x = x0.detach().clone().reshape(-1)
        self.n = n_workers
        self.ratios, self.zeta = tuple(ratios), zeta
        self.lr, self.weight_decay = lr, weight_decay
        self.shard_sizes = list(shard_sizes) if shard_sizes is not None else even_shard_sizes(self.x.numel(), n_workers)
        self.estimates: list[torch.Tensor] | None = None  # g_i; None: the next step starts them exactly
        self.previous: list[torch.Tensor] = []  # y_i
        self.ghat = self.ghat_prev = self.gtil = torch.zeros_like(self.x)
        self.bits_up = 0
        self.bits_down = 0
        self.last: dict[str, object] = {}

    def restart(self) -> None:
        """Forget the workers' estimates: the next step starts the sequences exactly (after a reset)."""
        self.estimates = None

    def message_bits(self, level: int) -> int:
        if level == 0:
            return 0
        value_bits = 8 * self.x.element_size()
        k = sum(kept(self.ratios[level - 1], d) for d in self.shard_sizes)
        return math.ceil(math.log2(len(self.ratios))) + k * (value_bits + 32)

    def step(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        n, d = self.n, self.x.numel()
        grads = [g.detach().clone().reshape(-1) for g in grads]
        if self.estimates is None:
            # the 3PC code's start: g_i^0 = grad f_i(x^0), sent in full
            self.estimates = [g.clone() for g in grads]
            self.previous = [g.clone() for g in grads]
            self.ghat = sum(grads) / n
            self.ghat_prev = self.ghat.clone()
            self.gtil = self.ghat.clone()
            self.bits_up += n * d * 8 * self.x.element_size()
            self.bits_down += d * 8 * self.x.element_size()
            self.last = {"kind": "exact"}
        else:
            up_levels, workers, messages = [], [], []
            for i in range(n):
                h, y, g = self.estimates[i], self.previous[i], grads[i]
                level, z, c = adaptive_compress(
                    g, h, y, shard_sizes=self.shard_sizes, ratios=self.ratios, zeta=self.zeta
                )
                workers.append({"x": g, "h": h, "y": y, "z": z})
                up_levels.append(level)
                messages.append(c)
                self.bits_up += self.message_bits(level)
                self.estimates[i] = z
                self.previous[i] = g
            # the master's estimator, the mean of the workers' estimates, from the messages it receives
            self.ghat_prev = self.ghat
            if any(level > 0 for level in up_levels):
                self.ghat = self.ghat + sum(messages) / n
            server = {"x": self.ghat, "h": self.gtil, "y": self.ghat_prev}
            down_level, self.gtil, _ = adaptive_compress(
                self.ghat, self.gtil, self.ghat_prev, shard_sizes=self.shard_sizes, ratios=self.ratios, zeta=self.zeta
            )
            server["z"] = self.gtil
            self.bits_down += self.message_bits(down_level)
            self.last = {
                "kind": "compressed",
                "up_levels": tuple(up_levels),
                "down_level": down_level,
                "workers": workers,
                "server": server,
            }
        # x <- (1 - lr wd) x - lr gtil, the subtraction rounded once (a fused multiply-add)
        decayed = self.x * (1 - self.lr * self.weight_decay)
        self.x = torch.addcmul(decayed, torch.as_tensor(self.lr, dtype=self.x.dtype), self.gtil, value=-1)
        return self.x
