"""1-bit LAMB for n workers in one process, written plainly from SEED_SPECS.md sections 5.0 and 5.3.

DeepSpeed 0.19.6's ``OnebitLamb`` and its compressed all-reduce, one tensor per parameter and the
fused buffer written out: no flat buffers shared with the optimizer, no layouts, no exchanges,
no packing. It is the oracle of ``tests/optim/test_onebit_lamb.py``.

Where ``deepspeed_cdadam.OneBitLamb`` departs from upstream on purpose, this reference follows it
(see the optimizer's docstring): step 1 already updates (no initialisation call), and a tensor
whose momentum is exactly zero at the switch gets scaling coefficient 1 and stays out of the mean.
As upstream, one worker's momentum is not compressed (its ``size > 1`` condition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..simulate import Reference


def _sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0``, -1 elsewhere (the sign bit upstream packs)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum().sqrt()


def padded_length(numel: int, n: int) -> int:
    """Upstream's padding: up to a multiple of ``n * divider``, ``divider = n * 8 / gcd(n, 8)``."""
    multiple = n * (n * 8 // math.gcd(n, 8))
    return -(-numel // multiple) * multiple


class OneBitLambReference(Reference):
    """``x0`` is the parameters' flat concatenation; ``tensor_sizes`` cut it into the parameter tensors.

    Every hyperparameter that upstream keeps per parameter group (``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``max_coeff``, ``min_coeff``) is one value or a list with one per tensor;
    ``masks`` is a list with a mask (or None) per tensor. ``lamb_coeffs`` holds the last step's
    coefficient per tensor. Scales are counted as 32 bits in ``bits_up`` / ``bits_down``.
    """

    def __init__(
        self,
        x0: torch.Tensor,
        n_workers: int,
        tensor_sizes: Sequence[int],
        *,
        lr: float | Sequence[float] = 1e-3,
        freeze_step: int = 10,
        betas: tuple[float, float] | Sequence[tuple[float, float]] = (0.9, 0.999),
        eps: float | Sequence[float] = 1e-8,
        weight_decay: float | Sequence[float] = 0.0,
        max_coeff: float | Sequence[float] = 10.0,
        min_coeff: float | Sequence[float] = 0.01,
        coeff_beta: float = 0.9,
        factor_max: float = 4.0,
        factor_min: float = 0.5,
        factor_threshold: float = 0.1,
        masks: Sequence[torch.Tensor | None] | None = None,
    ):
        super().__init__(x0, n_workers, None, None)
        self.sizes = list(tensor_sizes)
        assert sum(self.sizes) == self.x.numel()
        k = len(self.sizes)

        def per_tensor(value, is_pair=False):
            single = isinstance(value, tuple) if is_pair else not isinstance(value, (list, tuple))
            return [value] * k if single else list(value)

        self.lr, self.betas, self.eps = per_tensor(lr), per_tensor(betas, True), per_tensor(eps)
        self.wd, self.max_coeff, self.min_coeff = per_tensor(weight_decay), per_tensor(max_coeff), per_tensor(min_coeff)
        self.masks = list(masks) if masks is not None else [None] * k
        self.freeze_step, self.coeff_beta = freeze_step, coeff_beta
        self.factor_max, self.factor_min, self.factor_threshold = factor_max, factor_min, factor_threshold
        dt = self.x.dtype
        self.m = [torch.zeros(s, dtype=dt) for s in self.sizes]
        self.v = [torch.zeros(s, dtype=dt) for s in self.sizes]
        self.v_fresh = [torch.zeros(s, dtype=dt) for s in self.sizes]
        self.lamb_coeff_freeze = [0.0] * k
        self.last_factor = [1.0] * k
        self.scaling_coeff: list[float] | None = None  # set at the first compressed step
        self.lamb_coeffs: list[float] = []
        # the fused buffer: all momenta, then zero padding slots (they keep the last all-reduce's output)
        self.padded = padded_length(self.x.numel(), n_workers)
        self.padding = torch.zeros(self.padded - self.x.numel(), dtype=dt)
        self.worker_error = [torch.zeros(self.padded, dtype=dt) for _ in range(n_workers)]
        self.server_error = torch.zeros(self.padded, dtype=dt)  # server j holds chunk j

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [part.clone() for part in flat.split(self.sizes)]

    def compressed_allreduce(self, buffers: list[torch.Tensor]) -> torch.Tensor:
        """Section 5.0 on one padded buffer per worker; returns the result every worker receives."""
        n, length = self.n, self.padded
        chunk = length // n
        signs, worker_scales = [], []
        for i, buffer in enumerate(buffers):
            x = buffer + self.worker_error[i]
            scale = _norm(x) / math.sqrt(length)  # RMS over the padded length
            self.worker_error[i] = x - scale * _sign(x)
            signs.append(_sign(x))
            worker_scales.append(scale)
        out = []
        for j in range(n):  # server j: chunk j
            c = slice(j * chunk, (j + 1) * chunk)
            y = sum((worker_scales[i] / n) * signs[i][c] for i in range(n)) + self.server_error[c]
            server_scale = _norm(y) / math.sqrt(chunk)
            self.server_error[c] = y - server_scale * _sign(y)
            out.append(server_scale * _sign(y))
        self.bits_up += n * (length + 32 * n)
        self.bits_down += length + 32 * n
        return torch.cat(out)

    def step(self, worker_grads: list[torch.Tensor]) -> torch.Tensor:
        self.t += 1
        xs = self.split(self.x)
        self.lamb_coeffs = []
        if self.t <= self.freeze_step:
            grads = self.split(self.exact_mean(worker_grads))
            for k, (x, g) in enumerate(zip(xs, grads)):
                b1, b2 = self.betas[k]
                self.m[k] = b1 * self.m[k] + (1 - b1) * g
                self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
                if self.t == self.freeze_step:
                    self.v_fresh[k] = self.v[k].clone()
                update = self.m[k] / (self.v[k].sqrt() + self.eps[k]) + self.wd[k] * x
                coeff = 1.0
                if _norm(x) != 0 and _norm(update) != 0:
                    coeff = min(max(float(_norm(x) / _norm(update)), self.min_coeff[k]), self.max_coeff[k])
                if coeff != 1.0:  # the running average skips c == 1.0
                    previous = self.lamb_coeff_freeze[k]
                    self.lamb_coeff_freeze[k] = self.coeff_beta * previous + (1 - self.coeff_beta) * coeff
                self.lamb_coeffs.append(coeff)
                xs[k] = x - self.lr[k] * coeff * update
        else:
            if self.scaling_coeff is None:
                rms = [float(_norm(m) / math.sqrt(m.numel())) for m in self.m]
                nonzero = [r for r in rms if r != 0]
                united = sum(nonzero) / len(nonzero) if nonzero else 1.0
                self.scaling_coeff = [united / r if r != 0 else 1.0 for r in rms]
            m_prev = [m.clone() for m in self.m]
            fused = []
            for g_flat in worker_grads:  # each worker's scaled local momenta, then the padding slots
                g = self.split(g_flat)
                parts = [
                    (self.betas[k][0] * self.m[k] + (1 - self.betas[k][0]) * g[k]) * self.scaling_coeff[k]
                    for k in range(len(self.sizes))
                ]
                fused.append(torch.cat([*parts, self.padding]))
            out = self.compressed_allreduce(fused) if self.n > 1 else fused[0]  # one worker: nothing to average
            self.padding = out[self.x.numel() :].clone()
            for k, (x, m) in enumerate(zip(xs, self.split(out[: self.x.numel()]))):
                b1, b2 = self.betas[k]
                m = m / self.scaling_coeff[k]
                if self.masks[k] is not None:
                    m = m * self.masks[k]
                self.m[k] = m
                g_rec = (m - b1 * m_prev[k]) / (1 - b1)
                self.v_fresh[k] = b2 * self.v_fresh[k] + (1 - b2) * g_rec * g_rec
                denom = self.v[k].sqrt() + self.eps[k]
                update_prelim = m / denom
                update = update_prelim + self.wd[k] * x
                factor = float((denom / (self.v_fresh[k].sqrt() + self.eps[k])).max())
                if self.wd[k] > 0:
                    ratio = min(1.0, float(_norm(update_prelim) / _norm(update)))
                    factor = factor * ratio + (1 - ratio)
                factor = min(max(factor, self.factor_min), self.factor_max)
                last = self.last_factor[k]
                factor = min(max(factor, last * (1 - self.factor_threshold)), last * (1 + self.factor_threshold))
                self.last_factor[k] = factor
                coeff = self.lamb_coeff_freeze[k] * factor
                self.lamb_coeffs.append(coeff)
                xs[k] = x - self.lr[k] * coeff * update
        self.x = torch.cat(xs)
        return self.x
