"""Whole exchange steps on the fused CPU kernels (``kernels/__init__.py``), registered in ``registry.KERNELS``.

``run_markov`` is ``exchange.MarkovExchange``'s steps (1)-(5), ``run_error_feedback``
``exchange.ErrorFeedbackExchange``'s steps (1)-(3): the same collectives, the same byte counting and
the same bits as the eager lines. ``*_applies`` are their rank-independent checks; ranks then agree
on the build (``CompressedExchange._agree_on_kernel``) and ``contiguous`` checks the buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..compressors.sign import ScaledSignL1, ScaledSignL2
from .. import kernels  # called through the module (tests patch its functions)

if TYPE_CHECKING:
    from ..exchange import CompressedExchange


def markov_applies(ex: CompressedExchange, x: torch.Tensor, *state: torch.Tensor) -> bool:
    """Steps (1)-(5) run on the fused CPU kernels where they compute exactly the eager result:
    ``scaled_sign`` (the exact type: a subclass may change the scale), block worker scales, and a
    layout the kernels scale block by block (``kernels.markov_applies``)."""
    return (
        ex.layout.fixed_blocks  # the kernels cut blocks of block_size from each shard's start
        and type(ex.compressor) is ScaledSignL1
        and ex.worker_scale_scope == "block"
        and kernels.markov_applies(ex.layout, x)
        and kernels.mode() != "eager"
    )


def error_feedback_applies(ex: CompressedExchange, x: torch.Tensor, *state: torch.Tensor) -> bool:
    """Steps (1)-(3) run on the fused CPU kernels where they compute exactly the eager result:
    ``scaled_sign`` or ``sign_l2``, either worker scale scope, and a layout whose blocks the kernels
    scale in index order or whose shards are one block each (``kernels.scale_mode``: then the scale
    is torch's own norm, taken here and passed in)."""
    return (
        ex.layout.fixed_blocks
        and type(ex.compressor) in (ScaledSignL1, ScaledSignL2)
        and kernels.error_feedback_applies(ex.layout, x)
        and kernels.mode() != "eager"
    )


def contiguous(ex: CompressedExchange, x: torch.Tensor, *state: torch.Tensor) -> bool:
    """The buffer and the first state buffer (``h`` / ``e``) are contiguous."""
    return x.is_contiguous() and all(t.is_contiguous() for t in state[:1])


def run_markov(
    ex: CompressedExchange, x: torch.Tensor, h: torch.Tensor, ghat: torch.Tensor, gtil: torch.Tensor
) -> torch.Tensor:
    """Steps (1)-(5) with the fused CPU kernels: the same collectives, the same bits as the eager lines."""
    from ..exchange import _DOWN

    lay, n, me, width = ex.layout, ex.layout.world_size, ex.rank, ex._wire_nbytes(x.dtype)
    # (1) + (2): c_i = C(g_i - h_i) straight into the wire messages; h_i += c_i
    send = kernels.markov_worker_step(x, h, lay, width, out=ex._kernel_buffer("up", n * width))
    recv = ex.all_to_all_up(send, x.dtype)
    # (3) ghat += mean_i c_i (decoded and averaged in rank order); (4) ctil = C(ghat - gtil) for this
    # rank's shard, gathered by every worker; and (5) for this shard: gtil += ctil, in one pass
    wire = kernels.markov_server_step(
        recv, ghat, gtil[lay.shard_slice(me)], lay, me, width, out=ex._kernel_buffer("down", width)
    )
    down = ex.transport.all_gather(wire).view(n, -1)
    ex._count(_DOWN, wire.numel(), width)
    # (5) gtil += ctil on every other shard
    kernels.decode_shards(down, gtil, lay, accumulate=True, skip=me)
    return gtil


def prepare_markov(ex: CompressedExchange, x: torch.Tensor, h: torch.Tensor, ghat: torch.Tensor, gtil: torch.Tensor):
    """``run_markov``'s collectives with no state changed (``MarkovExchange.prepare``, for overlap);
    returns the commit: ``commit(state)`` applies (2), (3) and (5) as ``run_markov`` does, bit for bit.

    The worker's messages are encoded without updating ``h`` (``markov_encode``'s kernel call) and kept;
    the server step runs on copies of its shard of ``ghat`` and ``gtil`` to make the message down, and
    again on the state itself at commit (the same inputs, so the same bits); ``h += c`` is the kept
    messages decoded into ``h``, the down messages are decoded into ``gtil`` as in ``run_markov``.
    """
    from ..exchange import _DOWN

    lay, n, me, width = ex.layout, ex.layout.world_size, ex.rank, ex._wire_nbytes(x.dtype)
    mine = lay.shard_slice(me)
    send = kernels._encode_shards(  # (1) c_i = C(g_i - h_i), h_i unchanged
        x, h, lay.shard_offsets, lay.shard_sizes, lay, width, update=False, out=ex._kernel_buffer("up", n * width)
    )
    recv = ex.all_to_all_up(send, x.dtype)
    wire = kernels.markov_server_step(recv, ghat.clone(), gtil[mine].clone(), lay, me, width)  # (3)-(4) on copies
    down = ex.transport.all_gather(wire).view(n, -1)
    ex._count(_DOWN, wire.numel(), width)

    def commit(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h, ghat, gtil = state
        kernels.decode_shards(send.view(n, -1), h, lay, accumulate=True)  # (2) h_i += c_i
        # (3) ghat += mean_i c_i and this shard's (5), on the state; its message is the one sent
        kernels.markov_server_step(recv, ghat, gtil[mine], lay, me, width, out=ex._kernel_buffer("down", width))
        kernels.decode_shards(down, gtil, lay, accumulate=True, skip=me)  # (5) on every other shard
        return gtil

    return commit


def error_feedback_encode_up(ex: CompressedExchange, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Worker step (1) on the fused kernels: ``p = x + e``; returns the messages of ``C(p)``, shard after
    shard (the exchange's buffer, rewritten next step); ``e = p - C(p)`` in place."""
    from ..exchange import tensor_scale

    lay, n, width = ex.layout, ex.layout.world_size, ex._wire_nbytes(x.dtype)
    norm = 1 if type(ex.compressor) is ScaledSignL1 else 2
    up = ex._kernel_buffer("up", n * width)
    if ex.worker_scale_scope == "tensor" or kernels.scale_mode(lay) == "shard":
        e.add_(x)  # p, in e: the scale below is torch's norm of p, as on the eager path
        if ex.worker_scale_scope == "tensor":
            scales = tensor_scale(ex.compressor, e)
        else:  # each shard one block
            scales = torch.cat([tensor_scale(ex.compressor, e[lay.shard_slice(j)]) for j in range(n)])
        return kernels.error_feedback_worker_step(None, e, lay, width, norm, scales, out=up)
    # block scales summed in the kernel; p = x + e is stored only for L2 (torch takes the sqrt)
    return kernels.error_feedback_worker_step(x, e, lay, width, norm, out=up)


def run_error_feedback(ex: CompressedExchange, x: torch.Tensor, e: torch.Tensor, ebar: torch.Tensor) -> torch.Tensor:
    """Steps (1)-(3) with the fused CPU kernels: the same collectives, the same bits as the eager lines.

    The result is the exchange's own buffer (``ex._out``), overwritten by its next call."""
    from ..exchange import _DOWN, tensor_scale

    lay, n, me, width = ex.layout, ex.layout.world_size, ex.rank, ex._wire_nbytes(x.dtype)
    norm = 1 if type(ex.compressor) is ScaledSignL1 else 2
    one_block = kernels.scale_mode(lay) == "shard"  # each shard one block: its scale is torch's norm
    # (1) worker i: p_i = x_i + e_i; c_i = C(p_i); e_i <- p_i - c_i
    send = error_feedback_encode_up(ex, x, e)
    recv = ex.all_to_all_up(send, x.dtype)
    # (2) server: q = mean_i c_i + ebar (decoded in rank order, into ebar); ctil = C(q); ebar <- q - ctil
    down = ex._kernel_buffer("down", width)
    if one_block:
        kernels.decode_mean_add(recv, ebar, lay, me)
        scale = tensor_scale(ex.compressor, ebar)
        wire = kernels.error_feedback_server_step(None, ebar, lay, me, width, norm, scale, out=down)
    else:
        wire = kernels.error_feedback_server_step(recv, ebar, lay, me, width, norm, out=down)
    gathered = ex.transport.all_gather(wire).view(n, -1)
    ex._count(_DOWN, wire.numel(), width)
    # (3) every worker: ctil, all shards
    out = getattr(ex, "_out", None)
    if out is None or out.dtype != x.dtype or out.numel() != x.numel():
        out = ex._out = torch.empty_like(x)
    kernels.decode_shards(gathered, out, lay, accumulate=False)
    return out
