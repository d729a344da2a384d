"""Exchange schemes: how one flat buffer per step travels worker -> server -> worker.

The server role is sharded: rank ``j`` is the server of shard ``j`` of the buffer (see
``ShardLayout``). One step of a compressed scheme is two collectives:

* up:   each worker compresses its vector shard by shard and ``all_to_all``s the packed shards;
        server ``j`` decompresses the ``n`` pieces of shard ``j`` and averages them (rank order).
* down: server ``j`` compresses its shard and ``all_gather``s it; every worker decompresses all
        shards into the full vector.

Schemes (``make_exchange(name, ...)``):

* ``markov`` (CD-Adam, EF21), Markov compression sequences both ways::

      (1) worker i:  c_i    = C(g_i - h_i)           h_i: markov_state
      (2)            h_i   += c_i
      (3) server:    ghat  += mean_i c_i              ghat: server_markov_state (this shard)
      (4)            ctil   = C(ghat - gtil)          gtil: down_markov_state
      (5) worker i:  gtil  += ctil                    returns gtil

  Algorithm 1, line 9 of the paper prints ``C(ghat_t - ghat_{t-1})``; the text calls it "another
  Markov compression sequence" (``w^_{t+1} = w^_t + C(w_{t+1} - w^_t)``), so we compress
  ``ghat - gtil``, which is that definition applied to ``w = ghat``.

* ``error_feedback`` (1-bit Adam's compressed phase)::

      (1) worker i:  p_i = x_i + e_i;   c_i = C(p_i);   e_i = p_i - c_i
      (2) server:    q   = mean_i c_i + ebar;  ctil = C(q);  ebar = q - ctil
      (3)            returns ctil (full vector)

* ``naive``: ``C(mean_i C(x_i))``, no state.
* ``none``: exact ``mean_i x_i`` with an all-reduce.

Every scheme counts the bytes this rank sends (``CommStats``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from . import kernels
from .comm.accounting import CommStats, all_gather_bytes_sent, all_reduce_bytes_sent, all_to_all_bytes_sent
from .comm.layout import ShardLayout
from .comm.transport import Transport
from .compressors.base import Compressor
from .compressors.sign import ScaledSign, ScaledSignL1, ScaledSignL2
from .kernels import triton_exchange
from .state import FULL, PER_RANK, RANK_IDENTICAL, SHARD, StateSpec
from .types import DOWN_MARKOV_STATE, MARKOV_STATE, SERVER_ERROR, SERVER_MARKOV_STATE, WORKER_ERROR

_UP, _DOWN = 0, 1


WORKER_SCALE_SCOPES = ("block", "tensor")


def check_worker_scale_scope(scope: object, compressor: Compressor | None) -> None:
    if scope not in WORKER_SCALE_SCOPES:
        raise ValueError(f"Invalid worker_scale_scope={scope!r}. Allowed: {', '.join(WORKER_SCALE_SCOPES)}.")
    if scope == "tensor" and not isinstance(compressor, ScaledSign):
        raise ValueError("worker_scale_scope='tensor' needs a scaled-sign compressor ('scaled_sign' or 'sign_l2').")


def tensor_scale(compressor: Compressor, x: torch.Tensor) -> torch.Tensor:
    """The compressor's scale of ``x`` taken as one block."""
    return compressor.block_scales(x, (x.numel(),))  # type: ignore[attr-defined]


def worker_scales(compressor: Compressor, x: torch.Tensor, layout) -> list[torch.Tensor]:
    """``worker_scale_scope="tensor"``: for each shard, the scale(s) its blocks take. One scale of the
    whole vector (a ``ShardLayout``), or each block its parameter tensor's scale (a ``TensorLayout``:
    the scale of the padded tensor, computed contiguously as upstream's compressed all-reduce does)."""
    if not layout.permuted:
        scale = tensor_scale(compressor, x)
        return [scale] * layout.world_size
    xt, offset, per_tensor = x[layout.tensor_order(x.device)], 0, []
    for size in layout.padded_sizes:
        per_tensor.append(tensor_scale(compressor, xt[offset : offset + size]).reshape(1))
        offset += size
    scales = torch.cat(per_tensor) if per_tensor else x.new_zeros(1)
    # an empty shard's one empty block (tensor -1) takes any scale: it scales nothing
    return [
        scales[torch.tensor([max(k, 0) for k in layout.block_tensors(j)], device=x.device)]
        for j in range(layout.world_size)
    ]


def block_scales_by_norm(compressor: Compressor, v: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """Each block's scale with the one-block formula (``torch.linalg.norm(x_B) / sqrt(d_B)`` for
    sign_l2, upstream's operations), block by block: what a ``TensorLayout`` uses, so that a
    tensor chunk's scale has the bits of upstream's server scale."""
    parts, offset = [], 0
    for b in blocks:
        parts.append(tensor_scale(compressor, v[offset : offset + b]).reshape(1))
        offset += b
    return torch.cat(parts)


def shared_seed(base_seed: int, step: int, group: int, direction: int, shard: int, sender: int) -> int:
    """A seed every rank derives alike for one compressed message (rand-k indices)."""
    h = base_seed & 0xFFFFFFFF
    for v in (step, group, direction, shard, sender):
        h = (h * 1_000_003 + v + 0x9E3779B9) % (1 << 61)
    return h


def mean_in_rank_order(pieces: list[torch.Tensor]) -> torch.Tensor:
    """``(p_0 + p_1 + ... + p_{n-1}) / n``, summed left to right (so every implementation agrees bitwise)."""
    total = pieces[0].clone()
    for p in pieces[1:]:
        total += p
    return total / len(pieces)


class Exchange(ABC):
    """Averages one flat buffer over the ranks. ``state`` is the group's optimizer state dict."""

    def __init__(self, transport: Transport, layout: ShardLayout, stats: CommStats | None = None) -> None:
        if layout.world_size != transport.world_size:
            raise ValueError(
                f"layout.world_size={layout.world_size} does not match the transport's world_size={transport.world_size}."
            )
        self.transport = transport
        self.layout = layout
        self.stats = stats if stats is not None else CommStats()

    @property
    def rank(self) -> int:
        return self.transport.rank

    #: The buffers this scheme keeps in the group state (``state.StateSpec``): created by
    #: ``init_state``, and read by checkpointing, resets and the consistency check.
    STATE: tuple[StateSpec, ...] = ()

    def init_state(self, state: dict, like: torch.Tensor) -> None:
        """Create this scheme's declared state buffers in ``state`` (zeros)."""
        for spec in self.STATE:
            state[spec.key] = spec.zeros(like, self.layout.shard_sizes[self.rank])

    @abstractmethod
    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        """Return the estimate of ``mean_i x_i`` that every rank receives (identical on all ranks)."""


class AllReduceExchange(Exchange):
    """``none``: exact average with one all-reduce."""

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        out = self.transport.all_reduce_sum(x.clone()).div_(self.transport.world_size)
        sent = all_reduce_bytes_sent(x.numel() * x.element_size(), self.transport.world_size)
        self.stats.bytes_up += sent / 2
        self.stats.bytes_down += sent / 2
        self.stats.bytes_handed += x.numel() * x.element_size()
        self.stats.collective_calls += 1
        return out


class CompressedExchange(Exchange):
    """The two compressed collectives, shared by every compressed scheme."""

    def __init__(
        self,
        transport: Transport,
        layout: ShardLayout,
        compressor: Compressor,
        stats: CommStats | None = None,
        seed: int = 0,
        worker_scale_scope: str = "block",
    ) -> None:
        super().__init__(transport, layout, stats)
        check_worker_scale_scope(worker_scale_scope, compressor)
        if compressor.max_numel is not None and layout.capacity > compressor.max_numel:
            raise ValueError(
                f"A server shard of {layout.capacity} coordinates is too long for compressor {compressor.name!r} "
                f"(at most {compressor.max_numel}): split the parameters into more groups or use more ranks."
            )
        self.compressor = compressor
        self.seed = seed
        self.worker_scale_scope = worker_scale_scope

    def _wire_nbytes(self, dtype: torch.dtype) -> int:
        return self.compressor.wire_nbytes(self.layout.capacity, self.layout.max_blocks, dtype)

    def _encode(
        self, v: torch.Tensor, shard: int, seed: int, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(wire bytes, C(v) as the receiver will decode it) for shard ``shard``'s vector ``v``."""
        lay = self.layout
        if scale is None and lay.permuted and isinstance(self.compressor, ScaledSign):
            scale = block_scales_by_norm(self.compressor, v, lay.shard_blocks(shard))
        if scale is None:
            c = self.compressor.compress(v, lay.shard_blocks(shard), seed=seed)
        else:
            c = self.compressor.compress(v, lay.shard_blocks(shard), seed=seed, scale=scale)  # type: ignore[call-arg]
        wire = self.compressor.to_wire(c, lay.capacity, lay.max_blocks, v.dtype)
        return wire, self.compressor.decompress(c, dtype=v.dtype, seed=seed)

    def _decode(self, wire: torch.Tensor, shard: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        lay = self.layout
        c = self.compressor.from_wire(wire, lay.shard_sizes[shard], lay.shard_blocks(shard), lay.capacity, dtype)
        return self.compressor.decompress(c, dtype=dtype, seed=seed)

    def send_up(self, x: torch.Tensor, *, step: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker -> server. Returns (``C(x)`` full length, as the servers decode it;
        ``mean_i C(x_i)`` on this rank's shard)."""
        send, local = self.encode_up(x, step=step, group=group)
        return local, self.receive_up(send, x.dtype, step=step, group=group)

    def encode_up(self, x: torch.Tensor, *, step: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's messages up, shard after shard (uint8), and ``C(x)`` full length as they decode."""
        lay, n, me = self.layout, self.layout.world_size, self.rank
        # one scale per tensor (upstream OnebitAdam's worker side; see worker_scales), or each block its own
        scales = worker_scales(self.compressor, x, lay) if self.worker_scale_scope == "tensor" else [None] * n
        wires, local = [], []
        for j in range(n):
            seed = shared_seed(self.seed, step, group, _UP, j, me)
            wire, c = self._encode(x[lay.shard_slice(j)], j, seed, scales[j])
            wires.append(wire)
            local.append(c)
        return torch.cat(wires), torch.cat(local)

    def receive_up(self, send: torch.Tensor, dtype: torch.dtype, *, step: int, group: int) -> torch.Tensor:
        """The ``all_to_all`` of this worker's wire messages (shard after shard); returns ``mean_i C(x_i)`` on this rank's shard."""
        n, me = self.layout.world_size, self.rank
        recv = self.transport.all_to_all(send).view(n, -1)
        pieces = [self._decode(recv[i], me, dtype, shared_seed(self.seed, step, group, _UP, me, i)) for i in range(n)]
        self._count(_UP, send.numel(), self._wire_nbytes(dtype))
        return mean_in_rank_order(pieces)

    def _count(self, direction: int, handed: int, width: int) -> None:
        """Bytes of one collective: up = all_to_all of ``width``-byte messages, down = all_gather of one."""
        n = self.layout.world_size
        if direction == _UP:
            self.stats.bytes_up += all_to_all_bytes_sent(width, n)
        else:
            self.stats.bytes_down += all_gather_bytes_sent(width, n)
        self.stats.bytes_handed += handed
        self.stats.collective_calls += 1

    def send_down(self, shard_vec: torch.Tensor, *, step: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Server -> workers. Returns (``C(shard_vec)`` on this shard, ``C`` of every shard concatenated)."""
        n, me = self.layout.world_size, self.rank
        wire, mine = self._encode(shard_vec, me, shared_seed(self.seed, step, group, _DOWN, me, me))
        recv = self.transport.all_gather(wire).view(n, -1)
        full = torch.cat(
            [
                self._decode(recv[j], j, shard_vec.dtype, shared_seed(self.seed, step, group, _DOWN, j, j))
                for j in range(n)
            ]
        )
        self._count(_DOWN, wire.numel(), wire.numel())
        return mine, full

    def server_slice(self) -> slice:
        return self.layout.shard_slice(self.rank)

    #: Whether every rank can run the fused kernels: agreed once per exchange (``None``: not yet asked).
    _kernel_everywhere: bool | None = None

    def _kernel_buffer(self, key: str, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` kept for the fused kernels' messages: zeros once, then refilled by
        them every step (same bytes written, padding never), so no step allocates (and page-faults) one."""
        buffers = self.__dict__.setdefault("_kernel_buffers", {})
        buf = buffers.get(key)
        if buf is None or buf.numel() != nbytes:
            buf = buffers[key] = torch.zeros(nbytes, dtype=torch.uint8)
        return buf

    def _agree_on_kernel(self) -> bool:
        """Whether the kernels build on every rank: one all-reduce of a flag per rank, the first time only.

        In ``fused`` mode every rank raises ``KernelUnavailableError`` naming the ranks that failed; in
        ``auto`` mode all ranks use the eager path (each failing rank has logged its reason).
        """
        if self._kernel_everywhere is None:
            n, me = self.transport.world_size, self.rank
            failure = kernels.build_failure()
            device = getattr(self.transport, "device", None) or torch.device("cpu")
            flags = torch.zeros(n, dtype=torch.float32, device=device)
            if failure is not None:
                flags[me] = 1.0
            flags = self.transport.all_reduce_sum(flags)
            self.stats.bytes_setup += all_reduce_bytes_sent(4 * n, n)
            self.stats.bytes_handed += 4 * n
            self.stats.collective_calls += 1
            failed = [r for r, f in enumerate(flags.cpu().tolist()) if f > 0]
            if failed and kernels.mode() == "fused":
                reason = f"; here: {failure}" if failure is not None else " (see their logs for why)"
                raise kernels.KernelUnavailableError(
                    f"DEEPSPEED_CDADAM_KERNELS=fused, but the fused CPU kernel is unavailable on rank(s) {failed} "
                    f"of {n}{reason}. Fix the build there, or set DEEPSPEED_CDADAM_KERNELS=auto or eager."
                ) from failure
            if failed and failure is None:
                kernels.logger.warning(
                    "Fused CPU kernel unavailable on rank(s) %s: every rank uses the eager torch path.", failed
                )
            self._kernel_everywhere = not failed
        return self._kernel_everywhere


class MarkovExchange(CompressedExchange):
    """``markov``: CD-Adam's two Markov compression sequences (module docstring, steps (1)-(5))."""

    def uses_fused_kernel(self, x: torch.Tensor, h: torch.Tensor) -> bool:
        """Steps (1)-(5) run on the fused CPU kernels (``kernels``) where they compute exactly the eager result.

        The first call that gets past the rank-independent checks (compressor, layout, dtype, device,
        ``DEEPSPEED_CDADAM_KERNELS``, which must be the same on every rank) makes every rank agree on
        kernel availability (``_agree_on_kernel``): all ranks or none take the fused path.
        """
        return (
            self.layout.fixed_blocks  # the kernels cut blocks of block_size from each shard's start
            and type(self.compressor) is ScaledSignL1
            and self.worker_scale_scope == "block"
            and kernels.markov_applies(self.layout, x)
            and kernels.mode() != "eager"
            and self._agree_on_kernel()
            and x.is_contiguous()
            and h.is_contiguous()
        )

    STATE = (
        StateSpec(MARKOV_STATE, FULL, PER_RANK, "h_i, this worker's Markov state"),
        StateSpec(SERVER_MARKOV_STATE, SHARD, PER_RANK, "ghat on this rank's server shard"),
        StateSpec(DOWN_MARKOV_STATE, FULL, RANK_IDENTICAL, "gtil, the down Markov state"),
    )

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        h, ghat, gtil = state[MARKOV_STATE], state[SERVER_MARKOV_STATE], state[DOWN_MARKOV_STATE]
        if self.layout.fixed_blocks and triton_exchange.applies(self, x, h, ghat, gtil):  # GPU buffers: the Triton kernels
            return triton_exchange.run_markov(self, x, h, ghat, gtil)
        if self.uses_fused_kernel(x, h):
            return self._fused_exchange(x, h, ghat, gtil)
        # (1) worker i: c_i = C(g_i - h_i), sent to the servers
        c_local, mean_c = self.send_up(x - h, step=step, group=group)
        # (2) worker i: h_i <- h_i + c_i
        h += c_local
        # (3) server: ghat <- ghat + mean_i c_i
        ghat += mean_c
        # (4) server: ctil = C(ghat - gtil), sent to every worker
        _, ctil = self.send_down(ghat - gtil[self.server_slice()], step=step, group=group)
        # (5) worker i: gtil <- gtil + ctil
        gtil += ctil
        return gtil

    def _fused_exchange(self, x: torch.Tensor, h: torch.Tensor, ghat: torch.Tensor, gtil: torch.Tensor) -> torch.Tensor:
        """Steps (1)-(5) with the fused CPU kernels: the same collectives, the same bits as the eager lines."""
        lay, n, me, width = self.layout, self.layout.world_size, self.rank, self._wire_nbytes(x.dtype)
        # (1) + (2): c_i = C(g_i - h_i) straight into the wire messages; h_i += c_i
        send = kernels.markov_worker_step(x, h, lay, width, out=self._kernel_buffer("up", n * width))
        recv = self.transport.all_to_all(send).view(n, -1)
        self._count(_UP, send.numel(), width)
        # (3) ghat += mean_i c_i (decoded and averaged in rank order); (4) ctil = C(ghat - gtil) for this
        # rank's shard, gathered by every worker; and (5) for this shard: gtil += ctil, in one pass
        wire = kernels.markov_server_step(
            recv, ghat, gtil[lay.shard_slice(me)], lay, me, width, out=self._kernel_buffer("down", width)
        )
        down = self.transport.all_gather(wire).view(n, -1)
        self._count(_DOWN, wire.numel(), width)
        # (5) gtil += ctil on every other shard
        kernels.decode_shards(down, gtil, lay, accumulate=True, skip=me)
        return gtil


class ErrorFeedbackExchange(CompressedExchange):
    """``error_feedback``: 1-bit Adam's compressed all-reduce with worker and server error buffers.

    On the fused CPU path the result is this exchange's own buffer, overwritten by its next call (as
    ``MarkovExchange`` returns its state ``gtil``): callers use or copy it before the next step.
    """

    #: The fused path's result buffer, reused from step to step (a fresh one would be page-faulted every step).
    _out: torch.Tensor | None = None

    def uses_fused_kernel(self, x: torch.Tensor, e: torch.Tensor) -> bool:
        """Steps (1)-(3) run on the fused CPU kernels where they compute exactly the eager result:
        ``scaled_sign`` or ``sign_l2``, either worker scale scope, and a layout whose blocks the kernels
        scale in index order or whose shards are one block each (``kernels.scale_mode``: then the scale
        is torch's own norm, taken here and passed in). Ranks agree as in ``MarkovExchange.uses_fused_kernel``.
        """
        return (
            self.layout.fixed_blocks  # the kernels cut blocks of block_size from each shard's start
            and type(self.compressor) in (ScaledSignL1, ScaledSignL2)
            and kernels.error_feedback_applies(self.layout, x)
            and kernels.mode() != "eager"
            and self._agree_on_kernel()
            and x.is_contiguous()
            and e.is_contiguous()
        )

    STATE = (
        StateSpec(WORKER_ERROR, FULL, PER_RANK, "e_i, this worker's error"),
        StateSpec(SERVER_ERROR, SHARD, PER_RANK, "ebar on this rank's server shard"),
    )

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        e, ebar = state[WORKER_ERROR], state[SERVER_ERROR]
        if self.layout.fixed_blocks and triton_exchange.applies(self, x, e, ebar):  # GPU buffers: the Triton kernels
            return triton_exchange.run_error_feedback(self, x, e, ebar)
        if self.uses_fused_kernel(x, e):
            return self._fused_exchange(x, e, ebar)
        # (1) worker i: p_i = x_i + e_i; c_i = C(p_i); e_i <- p_i - c_i
        p = x + e
        c_local, mean_c = self.send_up(p, step=step, group=group)
        torch.sub(p, c_local, out=e)
        # (2) server: q = mean_i c_i + ebar; ctil = C(q); ebar <- q - ctil
        q = mean_c + ebar
        c_server, ctil = self.send_down(q, step=step, group=group)
        torch.sub(q, c_server, out=ebar)
        return ctil

    def fused_encode_up(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Worker step (1) on the fused kernels: ``p = x + e``; returns the messages of ``C(p)``, shard after
        shard (this exchange's buffer, rewritten next step); ``e = p - C(p)`` in place."""
        lay, n, width = self.layout, self.layout.world_size, self._wire_nbytes(x.dtype)
        norm = 1 if type(self.compressor) is ScaledSignL1 else 2
        up = self._kernel_buffer("up", n * width)
        if self.worker_scale_scope == "tensor" or kernels.scale_mode(lay) == "shard":
            e.add_(x)  # p, in e: the scale below is torch's norm of p, as on the eager path
            if self.worker_scale_scope == "tensor":
                scales = tensor_scale(self.compressor, e)
            else:  # each shard one block
                scales = torch.cat([tensor_scale(self.compressor, e[lay.shard_slice(j)]) for j in range(n)])
            return kernels.error_feedback_worker_step(None, e, lay, width, norm, scales, out=up)
        # block scales summed in the kernel; p = x + e is stored only for L2 (torch takes the sqrt)
        return kernels.error_feedback_worker_step(x, e, lay, width, norm, out=up)

    def _fused_exchange(self, x: torch.Tensor, e: torch.Tensor, ebar: torch.Tensor) -> torch.Tensor:
        """Steps (1)-(3) with the fused CPU kernels: the same collectives, the same bits as the eager lines."""
        lay, n, me, width = self.layout, self.layout.world_size, self.rank, self._wire_nbytes(x.dtype)
        norm = 1 if type(self.compressor) is ScaledSignL1 else 2
        one_block = kernels.scale_mode(lay) == "shard"  # each shard one block: its scale is torch's norm
        # (1) worker i: p_i = x_i + e_i; c_i = C(p_i); e_i <- p_i - c_i
        send = self.fused_encode_up(x, e)
        recv = self.transport.all_to_all(send).view(n, -1)
        self._count(_UP, send.numel(), width)
        # (2) server: q = mean_i c_i + ebar (decoded in rank order, into ebar); ctil = C(q); ebar <- q - ctil
        down = self._kernel_buffer("down", width)
        if one_block:
            kernels.decode_mean_add(recv, ebar, lay, me)
            scale = tensor_scale(self.compressor, ebar)
            wire = kernels.error_feedback_server_step(None, ebar, lay, me, width, norm, scale, out=down)
        else:
            wire = kernels.error_feedback_server_step(recv, ebar, lay, me, width, norm, out=down)
        gathered = self.transport.all_gather(wire).view(n, -1)
        self._count(_DOWN, wire.numel(), width)
        # (3) every worker: ctil, all shards
        if self._out is None or self._out.dtype != x.dtype or self._out.numel() != x.numel():
            self._out = torch.empty_like(x)
        kernels.decode_shards(gathered, self._out, lay, accumulate=False)
        return self._out


class NaiveExchange(CompressedExchange):
    """``naive``: ``C(mean_i C(x_i))`` both ways with no memory."""

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        _, mean_c = self.send_up(x, step=step, group=group)
        _, ctil = self.send_down(mean_c, step=step, group=group)
        return ctil


#: Exchange schemes by name. A new scheme is one class (its ``STATE`` declared) and one line here.
EXCHANGES: dict[str, type[Exchange]] = {
    "markov": MarkovExchange,
    "error_feedback": ErrorFeedbackExchange,
    "naive": NaiveExchange,
    "none": AllReduceExchange,
}
EXCHANGE_NAMES = tuple(EXCHANGES)


def make_exchange(
    name: str,
    transport: Transport,
    layout: ShardLayout,
    compressor: Compressor | None,
    stats: CommStats | None = None,
    seed: int = 0,
    worker_scale_scope: str = "block",
) -> Exchange:
    """Build the scheme registered under ``name``."""
    cls = EXCHANGES.get(name)
    if cls is None:
        raise ValueError(f"Unknown exchange={name!r}. Allowed: {', '.join(EXCHANGE_NAMES)}.")
    if not issubclass(cls, CompressedExchange):
        made = cls(transport, layout, stats)
    elif compressor is None:
        raise ValueError(f"exchange={name!r} needs a compressor.")
    else:
        made = cls(transport, layout, compressor, stats, seed, worker_scale_scope)
    if layout.permuted:  # a TensorLayout: run in layout space (permuted_exchange)
        from .permuted_exchange import PermutedExchange  # noqa: PLC0415 - it imports this module

        return PermutedExchange(made)
    return made
