"""An exchange over a ``TensorLayout``: the bucket's flat buffer moved into layout space and back.

A ``TensorLayout``'s server shard ``j`` is chunk ``j`` of every parameter tensor (upstream
OnebitAdam's per-tensor compressed all-reduce), which is not a contiguous slice of the bucket.
Rather than teach every exchange, kernel and state buffer non-contiguous shards, the buffer is
permuted (and padded) into layout order once per step, where the shards are contiguous slices and
the wrapped exchange runs unchanged; its state buffers live in layout space (padding included:
upstream's padding coordinates carry error too). Cost: one scatter in and one gather out per step,
with an index cached per device. Both go through one persistent layout-space buffer (the bucket
vector is scattered into it, and the result gathered back into its first ``bucket_numel``
coordinates), so a step makes no full-size temporary here: the result is a view of that buffer,
overwritten by the next step (as ``ErrorFeedbackExchange``'s result is).

Why not order the bucket so that shards are contiguous: the bucket's flat buffers are also the
parameters' moments and master copy, updated segment by segment (one parameter group after the
other) and copied back parameter by parameter; chunk-major order would cut every parameter in
``world_size`` pieces and every group segment with it.
"""

from __future__ import annotations

import torch

from .exchange import Exchange


class PermutedExchange(Exchange):
    """``inner`` (built on the ``TensorLayout``) applied in layout space."""

    def __init__(self, inner: Exchange) -> None:
        super().__init__(inner.transport, inner.layout, inner.stats)
        self.inner = inner
        self.STATE = inner.STATE

    def __getattr__(self, name: str):  # compressor, seed, worker_scale_scope, ... of the wrapped exchange
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def init_state(self, state: dict, like: torch.Tensor) -> None:
        self.inner.init_state(state, like.new_zeros(self.layout.numel))

    #: The layout-space buffer of ``exchange``, reused from step to step.
    _buffer: torch.Tensor | None = None

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        lay, buf = self.layout, self._buffer
        if (
            buf is None
            or buf.dtype != x.dtype
            or buf.device != x.device
            or x.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # x is the last result
        ):
            buf = self._buffer = x.new_empty(lay.numel)
        y = lay.to_layout(x, out=buf)
        result = self.inner.exchange(y, state, step=step, group=group)
        if result.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():  # the inner exchange gave y back
            return lay.from_layout(result)
        return lay.from_layout(result, out=buf[: lay.bucket_numel])
