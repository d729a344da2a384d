"""Reference simulator: n workers and a server in one process, written plainly from the papers.

Each ``*Reference`` holds the model ``x`` (a flat tensor) and every worker's and the server's
state in full (no packing, no sharding tricks). The only thing it shares with the distributed
code is the ``ShardLayout``: ``C`` is applied shard by shard with the layout's blocks, exactly as
a sharded server does. Tests demand that the distributed optimizers equal these references, and
the references are themselves checked against a line-by-line transcription of Algorithm 1.

``x`` is one communication bucket: the hyperparameters (``lr``, ``betas``, ``eps``,
``weight_decay``, ``amsgrad``) are floats, or tensors with one entry per coordinate for a
bucket whose parameter groups differ (``per_coordinate``), and one ``ShardLayout`` spans the
whole vector, as the distributed optimizers shard a bucket.

``step(worker_grads)`` takes one gradient per worker and returns the new ``x``. ``bits_up`` is the
total of information bits all workers sent up, ``bits_down`` the bits of the servers' broadcast
(the compressed vector, counted once); ``compressor.payload_bits`` for compressed messages, 32 bits
per coordinate for exact ones. ``run(ref, grad_fn, steps)`` drives one for experiments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from .comm.layout import ShardLayout
from .compressors.base import Compressor
from .compressors.registry import get_compressor
from .compressors.sign import ScaledSign
from .exchange import block_scales_by_norm, shared_seed, worker_scales

_UP, _DOWN = 0, 1


def compress_by_shard(
    compressor: Compressor,
    x: torch.Tensor,
    layout: ShardLayout,
    *,
    step: int,
    group: int,
    direction: int,
    sender: int | None,
    scales: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``C(x)`` applied to each server shard of ``x`` with that shard's blocks (the sharded layout).

    ``x`` is in layout space (the bucket itself for a ``ShardLayout``; ``TensorLayout.to_layout``).
    ``sender`` is the worker for the up direction; None means the server of each shard (down).
    ``scales``: the scale(s) of each shard's blocks given (``worker_scale_scope="tensor"``).
    A ``TensorLayout`` takes each scaled-sign block's scale with the one-block formula.
    """
    parts = []
    for j in range(layout.world_size):
        seed = shared_seed(0, step, group, direction, j, j if sender is None else sender)
        v, blocks = x[layout.shard_slice(j)], layout.shard_blocks(j)
        scale = None if scales is None else scales[j]
        if scale is None and layout.permuted and isinstance(compressor, ScaledSign):
            scale = block_scales_by_norm(compressor, v, blocks)
        if scale is None:
            parts.append(compressor(v, blocks, seed=seed))
        else:
            c = compressor.compress(v, blocks, seed=seed, scale=scale)  # type: ignore[call-arg]
            parts.append(compressor.decompress(c, dtype=x.dtype, seed=seed))
    return torch.cat(parts)


def per_coordinate(segments: list[tuple[int, float]], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A hyperparameter over a bucket: ``segments`` = ``[(numel, value), ...]``, its groups in order."""
    return torch.cat([torch.full((n,), v, dtype=dtype if not isinstance(v, bool) else torch.bool) for n, v in segments])


class Reference(ABC):
    """Common bookkeeping: model, step counter, bit counters.

    ``group`` is the bucket index the distributed optimizer would use (it feeds the shared rand-k
    seeds).
    """

    def __init__(
        self, x0: torch.Tensor, n_workers: int, layout: ShardLayout | None, compressor: str | Compressor | None
    ):
        self.x = x0.detach().clone().reshape(-1)
        self.n = n_workers
        self.layout = layout or ShardLayout(self.x.numel(), 1)
        self.compressor = get_compressor(compressor) if compressor is not None else None
        self.t = 0
        self.group = 0
        self.bits_up = 0
        self.bits_down = 0

    def C_up(self, v: torch.Tensor, worker: int) -> torch.Tensor:
        assert self.compressor is not None
        self.bits_up += self._bits()
        # the compressor's worker_scale_scope "tensor": one worker scale for the whole vector (or per tensor)
        tensor_scope = self.compressor.worker_scale_scope == "tensor"
        scales = worker_scales(self.compressor, v, self.layout) if tensor_scope else None
        return compress_by_shard(
            self.compressor, v, self.layout, step=self.t, group=self.group, direction=_UP, sender=worker, scales=scales
        )

    def C_down(self, v: torch.Tensor) -> torch.Tensor:
        assert self.compressor is not None
        self.bits_down += self._bits()
        return compress_by_shard(
            self.compressor, v, self.layout, step=self.t, group=self.group, direction=_DOWN, sender=None
        )

    def L(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (a bucket vector) in layout space, where the compression states live (itself for a ``ShardLayout``)."""
        return self.layout.to_layout(v) if self.layout.permuted else v

    def U(self, v: torch.Tensor) -> torch.Tensor:
        """Layout-space ``v`` back as a bucket vector."""
        return self.layout.from_layout(v) if self.layout.permuted else v

    def layout_zeros(self) -> torch.Tensor:
        """A zero compression state (layout space: padding included)."""
        return torch.zeros(self.layout.numel, dtype=self.x.dtype)

    def _bits(self) -> int:
        assert self.compressor is not None
        return sum(
            self.compressor.payload_bits(self.layout.shard_blocks(j), self.x.dtype)
            for j in range(self.layout.world_size)
        )

    def exact_mean(self, vs: list[torch.Tensor]) -> torch.Tensor:
        self.bits_up += 32 * self.x.numel() * self.n
        self.bits_down += 32 * self.x.numel()
        return sum(vs) / self.n  # type: ignore[return-value]

    @abstractmethod
    def step(self, worker_grads: list[torch.Tensor]) -> torch.Tensor:
        """One step with one gradient per worker; returns the new ``x``."""


class AMSGradStep:
    """``m, v, vhat`` and the update ``x -= lr * m / sqrt(vhat + eps)`` (+ decoupled weight decay).

    Every hyperparameter may be a per-coordinate tensor (``amsgrad`` a bool tensor).

    With ``bias_correction`` (not in the paper): ``x -= lr * mhat / sqrt(vhat / (1 - b2^t) + eps)``
    with ``mhat = m / (1 - b1^t)``, t counting the calls (torch.optim.Adam's correction, eps inside).
    """

    def __init__(
        self,
        d: int,
        dtype: torch.dtype,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        bias_correction: bool = False,
    ):
        self.m = torch.zeros(d, dtype=dtype)
        self.v = torch.zeros(d, dtype=dtype)
        self.vhat = torch.zeros(d, dtype=dtype)
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.amsgrad = lr, betas, eps, weight_decay, amsgrad
        self.bias_correction = bias_correction
        self.t = 0

    def __call__(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        if torch.is_tensor(self.amsgrad):  # per coordinate: AMSGrad's max where True, Adam's v elsewhere
            self.vhat = torch.where(self.amsgrad, torch.maximum(self.vhat, self.v), self.v)
        else:
            self.vhat = torch.maximum(self.vhat, self.v) if self.amsgrad else self.v
        if self.bias_correction:
            mhat = self.m / (1 - self.b1**self.t)
            direction = mhat / (self.vhat / (1 - self.b2**self.t) + self.eps).sqrt()
        else:
            direction = self.m / (self.vhat + self.eps).sqrt()
        return x * (1 - self.lr * self.wd) - self.lr * direction


class AdaptiveReference(Reference):
    """A reference whose model update is ``AMSGradStep``; subclasses add their exchange state."""

    def __init__(
        self,
        x0,
        n_workers,
        layout=None,
        *,
        lr=1e-3,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=True,
        bias_correction=False,
        compressor: str | Compressor | None = "scaled_sign",
    ):
        super().__init__(x0, n_workers, layout, compressor)
        self.update = AMSGradStep(
            self.x.numel(), self.x.dtype, lr, betas, eps, weight_decay, amsgrad, bias_correction
        )

    def zeros(self) -> torch.Tensor:
        return self.layout_zeros()


class CDAdamReference(AdaptiveReference):
    """Algorithm 1 of the CD-Adam paper (line 9 as a Markov sequence of ghat: ``C(ghat - gtil)``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ghat_i = [self.zeros() for _ in range(self.n)]  # worker Markov states
        self.ghat = self.zeros()  # server Markov state
        self.gtil = self.zeros()  # down Markov state, identical on all workers

    def step(self, worker_grads):
        self.t += 1
        c = []
        for i, g in enumerate(worker_grads):
            c.append(self.C_up(self.L(g) - self.ghat_i[i], i))  # line 5
            self.ghat_i[i] = self.ghat_i[i] + c[i]  # line 6
        self.ghat = self.ghat + sum(c) / self.n  # line 8
        ctil = self.C_down(self.ghat - self.gtil)  # line 9 (Markov sequence of ghat)
        self.gtil = self.gtil + ctil  # lines 10, 12
        self.x = self.update(self.x, self.U(self.gtil))  # lines 13-16
        return self.x


class OneBitAdamReference(Reference):
    """DeepSpeed's 1-bit Adam: Adam for ``freeze_step`` steps, then frozen v and EF-compressed momentum."""

    def __init__(
        self,
        x0,
        n_workers,
        layout=None,
        *,
        lr=1e-3,
        freeze_step=10,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        compressor: str | Compressor = "sign_l2",
    ):
        super().__init__(x0, n_workers, layout, compressor)
        d, dt = self.x.numel(), self.x.dtype
        self.m = torch.zeros(d, dtype=dt)
        self.v = torch.zeros(d, dtype=dt)
        self.e = [self.layout_zeros() for _ in range(n_workers)]  # worker errors (layout space)
        self.ebar = self.layout_zeros()  # server error (all shards)
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.freeze_step = lr, betas, eps, weight_decay, freeze_step

    def step(self, worker_grads):
        self.t += 1
        if self.t <= self.freeze_step:
            g = self.exact_mean(worker_grads)
            self.m = self.b1 * self.m + (1 - self.b1) * g
            self.v = self.b2 * self.v + (1 - self.b2) * g * g
        else:
            c = []
            for i, g in enumerate(worker_grads):
                p = self.L(self.b1 * self.m + (1 - self.b1) * g) + self.e[i]
                c.append(self.C_up(p, i))
                self.e[i] = p - c[i]
            q = sum(c) / self.n + self.ebar
            m = self.C_down(q)
            self.ebar = q - m
            self.m = self.U(m)
        update = self.m / (self.v.sqrt() + self.eps) + self.wd * self.x
        self.x = self.x - self.lr * update
        return self.x


class EF21Reference(Reference):
    """EF21 both ways (Markov compression up and down, as CD-Adam) with an SGD step ``x -= lr * gtil``."""

    def __init__(self, x0, n_workers, layout=None, *, lr=0.1, compressor: str | Compressor | None = None, ratio=0.1):
        super().__init__(x0, n_workers, layout, compressor or get_compressor("topk", ratio=ratio))
        self.ghat_i = [self.layout_zeros() for _ in range(n_workers)]
        self.ghat = self.layout_zeros()
        self.gtil = self.layout_zeros()
        self.lr = lr

    def step(self, worker_grads):
        self.t += 1
        c = [self.C_up(self.L(g) - self.ghat_i[i], i) for i, g in enumerate(worker_grads)]
        self.ghat_i = [h + ci for h, ci in zip(self.ghat_i, c)]
        self.ghat = self.ghat + sum(c) / self.n
        self.gtil = self.gtil + self.C_down(self.ghat - self.gtil)
        self.x = self.x - self.lr * self.U(self.gtil)
        return self.x


class ErrorFeedbackAMSGradReference(AdaptiveReference):
    """AMSGrad on gradients averaged with error feedback both ways (worker and server errors)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.e = [self.zeros() for _ in range(self.n)]  # worker errors
        self.ebar = self.zeros()  # server error (all shards)

    def step(self, worker_grads):
        self.t += 1
        c = []
        for i, g in enumerate(worker_grads):
            p = self.L(g) + self.e[i]
            c.append(self.C_up(p, i))
            self.e[i] = p - c[i]
        q = sum(c) / self.n + self.ebar
        ctil = self.C_down(q)
        self.ebar = q - ctil
        self.x = self.update(self.x, self.U(ctil))
        return self.x


class NaiveAMSGradReference(AdaptiveReference):
    """AMSGrad on ``C(mean_i C(g_i))``: compression both ways with no memory."""

    def step(self, worker_grads):
        self.t += 1
        c = [self.C_up(self.L(g), i) for i, g in enumerate(worker_grads)]
        self.x = self.update(self.x, self.U(self.C_down(sum(c) / self.n)))
        return self.x


class AMSGradReference(AdaptiveReference):
    """Uncompressed distributed AMSGrad (exact fp32 averaging)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, compressor=None, **kwargs)

    def step(self, worker_grads):
        self.t += 1
        self.x = self.update(self.x, self.exact_mean(worker_grads))
        return self.x


def run(ref: Reference, grad_fn: Callable[[int, torch.Tensor, int], torch.Tensor], steps: int) -> list[torch.Tensor]:
    """Drive ``ref`` for ``steps`` steps; ``grad_fn(worker, x, t)`` gives worker's gradient. Returns the iterates."""
    xs = []
    for t in range(1, steps + 1):
        xs.append(ref.step([grad_fn(i, ref.x, t) for i in range(ref.n)]).clone())
    return xs
