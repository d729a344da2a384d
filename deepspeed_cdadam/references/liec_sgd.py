"""LIEC-SGD for n workers and the root server in one process, written plainly from SEED_SPECS.md §4.

The authors' ``main.py`` (branch ``args.method == 'liec'``) line by line: every worker's own model
and momentum, the root's error per bucket, buckets made by ``torch._utils._take_tensors`` itself,
the compressor ``mean|x| * sign(x)`` written out. No flat buffers shared with the optimizer, no
shards, no packing, no exchanges: it is the oracle of ``tests/optim/test_liec_sgd.py``.

Bits are counted as the spec's "Bits per step": a compressed step sends up ``d + 32`` bits per
bucket per worker and down ``d + 32`` per bucket (the root's broadcast, counted once); an
averaging step ``32 d`` each way for the parameters and ``32 d`` each way for the gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def scaled_sign(x: torch.Tensor) -> torch.Tensor:
    """The code's compressor on one flat bucket: ``(||x||_1 / numel) * sign(x)``, sign(0) taken as +1."""
    return (x.abs().sum() / x.numel()) * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def take_tensors_buckets(tensor_sizes: Sequence[int], bucket_size: int | None, dtype: torch.dtype) -> list[slice]:
    """The coordinates (of the flat concatenation) of each bucket ``torch._utils._take_tensors`` makes of
    tensors of ``tensor_sizes`` elements of ``dtype`` with ``bucket_size`` bytes (None: one bucket)."""
    if bucket_size is None:
        return [slice(0, sum(tensor_sizes))]
    tensors = [torch.empty(n, dtype=dtype) for n in tensor_sizes]
    where = {id(t): sum(tensor_sizes[:i]) for i, t in enumerate(tensors)}
    buckets = []
    for bucket in torch._utils._take_tensors(tensors, bucket_size):
        start = where[id(bucket[0])]
        stop = start + sum(t.numel() for t in bucket)
        if stop > start:
            buckets.append(slice(start, stop))
    return sorted(buckets, key=lambda s: s.start)


class LIECSGDReference:
    """``x0``: the initial model (flat); ``tensor_sizes``: its tensors, which ``bucket_size`` (bytes of
    ``x0.dtype``) groups into buckets. ``lr``, ``momentum``, ``weight_decay``: floats, or tensors with
    one value per coordinate (parameter groups). ``compressor``: a function of one flat bucket
    (default ``scaled_sign``; ``lambda v: v`` gives synchronous SGD).

    ``step(grads)`` takes each worker's gradient at its own model ``x[i]`` and returns the models.
    """

    def __init__(
        self,
        x0: torch.Tensor,
        n_workers: int,
        *,
        tensor_sizes: Sequence[int] | None = None,
        bucket_size: int | None = None,
        lr: float | torch.Tensor,
        momentum: float | torch.Tensor = 0.0,
        weight_decay: float | torch.Tensor = 0.0,
        average_period: int,
        compressor: Callable[[torch.Tensor], torch.Tensor] = scaled_sign,
    ) -> None:
        self.n = n_workers
        self.x = [x0.detach().clone().reshape(-1) for _ in range(n_workers)]  # x_i: worker i's own model
        sizes = list(tensor_sizes) if tensor_sizes is not None else [self.x[0].numel()]
        self.buckets = take_tensors_buckets(sizes, bucket_size, x0.dtype)
        self.server_error = [torch.zeros(b.stop - b.start, dtype=x0.dtype) for b in self.buckets]  # s_residuals
        self.momentum_buffer: list[torch.Tensor | None] = [None] * n_workers  # torch.optim.SGD's, per worker
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.average_period = average_period
        self.compressor = compressor
        self.cur_iter = 0  # 0-based, as the code's
        self.bits_up = 0  # all workers together
        self.bits_down = 0
        # what the last step computed, for the invariant tests
        self.last: dict[str, object] = {}

    def step(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        n, H = self.n, self.average_period
        d = self.x[0].numel()
        grads = [g.detach().clone().reshape(-1) for g in grads]
        if (self.cur_iter + 1) % H == 0:
            # average the models: reduce(SUM) to root, / n, broadcast
            xbar = sum(self.x) / n
            self.x = [xbar.clone() for _ in range(n)]
            # per bucket: root ghat = mean_j g_j[b] + s_residuals[b]; s_residuals[b] = 0; broadcast
            ghat = torch.empty(d, dtype=xbar.dtype)
            for b, bucket in enumerate(self.buckets):
                ghat[bucket] = sum(g[bucket] for g in grads) / n + self.server_error[b]
                self.server_error[b] = torch.zeros_like(self.server_error[b])
            new_grads = [ghat.clone() for _ in range(n)]
            self.bits_up += n * 32 * d * 2  # parameters and gradients, to root
            self.bits_down += 32 * d * 2  # and back
            self.last = {"kind": "average", "xbar": xbar, "ghat": ghat}
        else:
            new_grads = [torch.empty(d, dtype=g.dtype) for g in grads]
            ys, chats, cs, rs = [], [], [], []
            for b, bucket in enumerate(self.buckets):
                c = [self.compressor(g[bucket]) for g in grads]  # worker i: c_i = s_i sign(g_i[b])
                r = [g[bucket] - ci for g, ci in zip(grads, c)]  # r_i = g_i[b] - c_i, not kept
                y = sum(c) / n + self.server_error[b]  # root: y = mean_j c_j + s_residuals[b]
                chat = self.compressor(y)  # s sign(y), s = mean|y|
                self.server_error[b] = y - chat  # s_residuals[b] = y - chat
                for i in range(n):
                    new_grads[i][bucket] = chat + r[i]  # grad[b] = chat + r_i
                ys.append(y)
                chats.append(chat)
                cs.append(c)
                rs.append(r)
            self.bits_up += n * (d + 32 * len(self.buckets))
            self.bits_down += d + 32 * len(self.buckets)
            self.last = {"kind": "compressed", "y": ys, "chat": chats, "c": cs, "r": rs}
        for i in range(n):
            # torch.optim.SGD(lr, momentum, weight_decay).step() on worker i's own model
            step_dir = new_grads[i] + self.weight_decay * self.x[i]
            if _any_nonzero(self.momentum):
                buf = self.momentum_buffer[i]
                buf = step_dir.clone() if buf is None else self.momentum * buf + step_dir
                self.momentum_buffer[i] = buf
                step_dir = buf
            self.x[i] = self.x[i] - self.lr * step_dir
        self.last["grads"] = new_grads
        self.cur_iter += 1
        return [x.clone() for x in self.x]


def _any_nonzero(value: float | torch.Tensor) -> bool:
    return bool((torch.as_tensor(value) != 0).any())
