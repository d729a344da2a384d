"""0/1 Adam for n workers in one process, written plainly from SEED_SPECS.md §5.2 (and §5.0).

DeepSpeed 0.19.6's ``ZeroOneAdam`` as the spec gives it: upstream's own counters (``var_interval``,
``var_counter``, ``local_step_interval``, ``local_step_counter``), updated after every call, and
its call count, in which the first (initialising) call is call 1, so that our step ``t`` is call
``t + 1``. The compressed all-reduce of §5.0 is written out per tensor (zero-padded to a multiple
of ``n * lcm(n, 8)``, worker scale over the padded length, one server scale per chunk), with no
layout, shard, packing or exchange code of the package: this is the oracle of
``tests/optim/test_zero_one_adam.py``.

Deliberate differences from upstream, as ``ZeroOneAdam`` documents them: step 1 updates (there is
no initialising call), and with one worker a first-phase step off the variance schedule updates
``m`` with the gradient (upstream leaves ``m`` unchanged there); a coordinate whose lr summed to 0
since the last sync keeps its ``m`` at the sync (upstream divides by zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) = +1`` (upstream's ``x.sign().add_(1).bool()`` convention)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def padded_size(numel: int, n: int) -> int:
    """§5.0: ``numel`` rounded up to a multiple of ``n * divider``, ``divider = n * 8 / gcd(n, 8)``."""
    multiple = n * (n * 8 // math.gcd(n, 8))
    return -(-numel // multiple) * multiple


class ZeroOneAdamReference:
    """``x0``: the initial model (flat). ``tensor_sizes``: the tensors upstream compresses one by one
    (its parameters; under the fused fp16 wrapper, its param groups), in order. ``lr``, ``betas``,
    ``eps``, ``weight_decay``: floats, or tensors with one value per coordinate (parameter groups;
    ``betas`` a pair of either). ``mask``: ``exp_avg_mask`` over all coordinates, or None.

    ``step(grads)`` takes each worker's gradient at its own model ``x[i]`` and returns the models.
    ``kinds`` lists what each step was: "variance", "onebit", "local" or "sync".
    """

    def __init__(
        self,
        x0: torch.Tensor,
        n_workers: int,
        *,
        tensor_sizes: Sequence[int] | None = None,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float | torch.Tensor = 1e-8,
        weight_decay: float | torch.Tensor = 0.0,
        var_freeze_step: int = 100000,
        var_update_scaler: int = 16,
        local_step_scaler: int = 32678,
        local_step_clipper: int = 16,
        mask: torch.Tensor | None = None,
    ) -> None:
        n = self.n = n_workers
        x0 = x0.detach().clone().reshape(-1)
        d = x0.numel()
        self.x = [x0.clone() for _ in range(n)]  # each worker's model (different between syncs)
        self.m = [torch.zeros(d, dtype=x0.dtype) for _ in range(n)]  # exp_avg, each worker's
        self.v = torch.zeros(d, dtype=x0.dtype)  # exp_avg_sq, the same on every worker
        self.u = [torch.zeros(d, dtype=x0.dtype) for _ in range(n)]  # momentum_accumulator
        self.lrs = torch.zeros(d, dtype=x0.dtype)  # lr summed since the last sync (per coordinate)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.mask = mask
        sizes = list(tensor_sizes) if tensor_sizes is not None else [d]
        assert sum(sizes) == d
        self.tensors = [(sum(sizes[:k]), size) for k, size in enumerate(sizes)]  # (start, numel)
        # compressed all-reduce errors, per tensor at its padded length: worker_error per worker, and
        # server_error (all n chunks: chunk j is server j's)
        self.worker_error = [
            [torch.zeros(padded_size(s, n), dtype=x0.dtype) for _, s in self.tensors] for _ in range(n)
        ]
        self.server_error = [torch.zeros(padded_size(s, n), dtype=x0.dtype) for _, s in self.tensors]
        # upstream's counters and flag (§5.2), and its call count: call 1 was the initialising one
        self.var_freeze_step, self.var_update_scaler = var_freeze_step, var_update_scaler
        self.local_step_scaler, self.local_step_clipper = local_step_scaler, local_step_clipper
        self.var_interval, self.var_counter = 1, 0
        self.local_step_interval, self.local_step_counter = 1, 0
        self.frozen = False
        self.call = 1
        self.kinds: list[str] = []
        self.compressed_allreduces = 0
        self.exact_averages = 0

    # --- §5.0, per tensor -----------------------------------------------------------------------
    def compressed_allreduce(self, buffers: list[torch.Tensor]) -> torch.Tensor:
        """Every worker's flat buffer in, the 1-bit average every worker receives out."""
        n = self.n
        self.compressed_allreduces += 1
        out = []
        for k, (start, numel) in enumerate(self.tensors):
            P = padded_size(numel, n)
            if P == 0:
                continue
            y = torch.zeros(P, dtype=buffers[0].dtype)
            for i in range(n):
                x = torch.zeros(P, dtype=y.dtype)
                x[:numel] = buffers[i][start : start + numel]
                x = x + self.worker_error[i][k]
                s_w = torch.linalg.norm(x) / math.sqrt(P)  # RMS over the padded length
                self.worker_error[i][k] = x - s_w * sign(x)
                y = y + (s_w / n) * sign(x)  # server j receives chunk j of every worker
            y = y + self.server_error[k]
            result = torch.zeros(P, dtype=y.dtype)
            chunk = P // n
            for j in range(n):
                yj = y[j * chunk : (j + 1) * chunk]
                s_s = torch.linalg.norm(yj) / math.sqrt(chunk)
                result[j * chunk : (j + 1) * chunk] = s_s * sign(yj)
            self.server_error[k] = y - result
            out.append(result[:numel])
        return torch.cat(out)

    def average_in_one_bit(self, buffers: list[torch.Tensor]) -> torch.Tensor:
        """The compressed all-reduce times the mask; with one worker its own buffer (nothing is sent)."""
        if self.n == 1:
            return buffers[0].clone()
        out = self.compressed_allreduce(buffers)
        return out * self.mask if self.mask is not None else out

    # --- §5.2 -------------------------------------------------------------------------------------
    def step(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        n, b1, b2 = self.n, self.b1, self.b2
        self.call += 1
        c = self.call
        if not self.frozen:
            if c % self.var_interval == 0:  # the engine all-reduced the gradients in fp32
                g = sum(grads) / n
                self.exact_averages += 1
                self.v = b2 * self.v + (1 - b2) * g * g
                self.m = [b1 * m + (1 - b1) * g for m in self.m]
                self.kinds.append("variance")
            else:  # local gradients, 1-bit averaged; v unchanged
                g = self.average_in_one_bit(list(grads))
                self.m = [b1 * m + (1 - b1) * g for m in self.m]
                self.kinds.append("onebit")
        else:  # local step: each worker its own gradient, no communication
            self.m = [b1 * m + (1 - b1) * g for m, g in zip(self.m, grads)]
            self.lrs = self.lrs + self.lr
        denominator = self.v.sqrt() + self.eps
        for i in range(n):
            update = self.m[i] / denominator + self.wd * self.x[i]
            self.x[i] = self.x[i] - self.lr * update
            if self.frozen:
                self.u[i] = self.u[i] - self.lr * update
        if self.frozen and c % self.local_step_interval == 0:  # 1-bit sync round
            self.x = [x - u for x, u in zip(self.x, self.u)]
            ubar = self.average_in_one_bit([u * denominator for u in self.u])
            kept = self.lrs == 0
            self.m = [torch.where(kept, m, -ubar / torch.where(kept, 1.0, self.lrs)) for m in self.m]
            self.x = [x + ubar / denominator for x in self.x]
            self.u = [torch.zeros_like(u) for u in self.u]
            self.lrs = torch.zeros_like(self.lrs)
            self.kinds.append("sync")
        elif self.frozen:
            self.kinds.append("local")
        # the schedules, after the update
        if not self.frozen:
            if c % self.var_interval == 0:
                self.var_counter += 1
                if self.var_counter == self.var_update_scaler:
                    self.var_counter = 0
                    self.var_interval *= 2
        else:
            self.local_step_counter += 1
            if self.local_step_counter == self.local_step_scaler:
                self.local_step_counter = 0
                self.local_step_interval = min(self.local_step_clipper, self.local_step_interval * 2)
        if c > self.var_freeze_step and not self.frozen:
            self.frozen = True
            # from now on the errors are those of the accumulated update, not of the gradient
            for errors in self.worker_error:
                for e in errors:
                    e.zero_()
            for e in self.server_error:
                e.zero_()
        return [x.clone() for x in self.x]
