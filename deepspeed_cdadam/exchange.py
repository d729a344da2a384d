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
* ``immediate_compensation`` (LIEC-SGD, ``liec_exchange.py``): ``C(mean_i C(x_i) + ebar)`` down with
  server error feedback, and each worker adds back its own ``x_i - C(x_i)`` (a per-rank result).
* ``none``: exact ``mean_i x_i`` with an all-reduce.

Every scheme counts the bytes this rank sends (``CommStats``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from . import kernels
from .kernels import registry
from .comm.accounting import CommStats, all_gather_bytes_sent, all_reduce_bytes_sent, all_to_all_bytes_sent
from .comm.layout import ShardLayout
from .comm.transport import Transport
from .compressors.base import Compressor
from .compressors.registry import raise_tensor_needs_scaled_sign
from .compressors.sign import ScaledSign
from .state import FULL, PER_RANK, RANK_IDENTICAL, SHARD, StateSpec
from .types import DOWN_MARKOV_STATE, MARKOV_STATE, SERVER_ERROR, SERVER_MARKOV_STATE, WORKER_ERROR

_UP, _DOWN = 0, 1


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


class StepSkip:
    """A step whose skip is decided on the device, with no host read and no collective of its own.

    ``mine`` (0-dim bool on the buffers' device): this rank's gradients hold a NaN or an inf. A scheme
    that supports it (``SUPPORTS_DEVICE_SKIP``) sends such a rank's correction as zero and marks every
    message it sends up (``mark_skipped``); each server reads the marks of the messages it receives
    (``skipped_anywhere``): as every rank is the server of a shard and receives a message from every
    rank, all ranks learn the same answer from the exchange they run anyway. ``anywhere`` (0-dim bool,
    identical on every rank) is that answer, recorded by the exchange (the OR over a step's buckets).
    """

    def __init__(self, mine: torch.Tensor) -> None:
        self.mine = mine
        self.anywhere: torch.Tensor | None = None

    def record(self, anywhere: torch.Tensor) -> None:
        self.anywhere = anywhere if self.anywhere is None else self.anywhere | anywhere


def _first_scale(messages: torch.Tensor, layout: ShardLayout, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of the first scale of each message (rows of ``messages``), little endian: the scaled-sign
    wire format is ``[ceil(capacity / 8) bytes of signs | max_blocks scales]`` (``max_blocks >= 1``)."""
    start, item = (layout.capacity + 7) // 8, torch.empty((), dtype=dtype).element_size()
    return messages[:, start : start + item]


def mark_skipped(messages: torch.Tensor, mine: torch.Tensor, layout: ShardLayout, dtype: torch.dtype) -> None:
    """Where ``mine`` is true, set the sign bit of the first scale of each of this rank's messages (rows).

    A skipping rank's scales are all ``+0.0`` (its vector is taken as zero), so the mark makes that scale
    exactly ``-0.0``, which decodes to a zero correction as ``+0.0`` does. A computed scale (a mean of
    magnitudes, or a root of one) is never ``-0.0``, so ``skipped_anywhere`` reads the mark and nothing else."""
    _first_scale(messages, layout, dtype)[:, -1].bitwise_or_(mine.to(torch.uint8) << 7)


def skipped_anywhere(messages: torch.Tensor, layout: ShardLayout, dtype: torch.dtype) -> torch.Tensor:
    """Whether any of the received messages (rows, one per sender) is marked by ``mark_skipped`` (0-dim bool):
    its first scale exactly ``-0.0`` (a NaN of either sign, which a state already broken could give, is not)."""
    first = _first_scale(messages, layout, dtype)
    marked = (first[:, -1] == 0x80) & (first[:, :-1] == 0).all(dim=1)
    return marked.any()


def check_skip_supported(exchange: CompressedExchange) -> None:
    """A ``StepSkip`` travels in the scaled-sign wire format only (``mark_skipped``)."""
    if not isinstance(exchange.compressor, ScaledSign):
        raise ValueError(
            f"A step skip decided on the device needs a scaled-sign compressor (its mark is a scale's sign bit), "
            f"got {type(exchange.compressor).__name__}: agree on the host (DEEPSPEED_CDADAM_STEP_AGREEMENT=host)."
        )


class PreparedExchange:
    """An exchange whose collectives have run and whose state changes wait: ``commit(state)`` applies
    them and returns what ``exchange`` would have; dropping it leaves the state as it was (a step
    skipped, or redone because its gradients changed after the messages left)."""

    def __init__(self, commit) -> None:
        self._commit = commit

    def commit(self, state: dict) -> torch.Tensor:
        return self._commit(state)


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
    #: Whether ``exchange`` returns the same vector on every rank (False: LIEC-SGD's locally
    #: compensated gradient); an optimizer that keeps rank-identical moments of it needs True.
    RESULT_RANK_IDENTICAL: bool = True
    #: The optimizer this scheme is part of ("": a general scheme, any compressor, any Adam-type
    #: optimizer's ``exchange`` option may name it), and what makes it that optimizer's (for messages).
    OWNER: str = ""
    OWNER_NOTE: str = ""

    def init_state(self, state: dict, like: torch.Tensor) -> None:
        """Create this scheme's declared state buffers in ``state`` (zeros)."""
        for spec in self.STATE:
            state[spec.key] = spec.zeros(like, self.layout.shard_sizes[self.rank])

    @abstractmethod
    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        """Return the estimate of ``mean_i x_i`` that every rank receives (identical on all ranks)."""

    #: Whether ``exchange`` takes ``skip=StepSkip`` (the skip of a non-finite step decided on the device).
    SUPPORTS_DEVICE_SKIP: bool = False

    def decides_skip_on_device(self, x: torch.Tensor, state: dict) -> bool:
        """Whether this step of ``x`` would decide a ``StepSkip`` on its fused device kernels (no: the default)."""
        return False


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
    ) -> None:
        super().__init__(transport, layout, stats)
        if compressor.worker_scale_scope != "block" and not isinstance(compressor, ScaledSign):
            raise_tensor_needs_scaled_sign(compressor)
        if compressor.max_numel is not None and layout.capacity > compressor.max_numel:
            raise ValueError(
                f"A server shard of {layout.capacity} coordinates is too long for compressor {compressor.name!r} "
                f"(at most {compressor.max_numel}, its indices travel as int32): use more ranks, or a sign "
                "compressor (scaled_sign, sign_l2), whose shards have no such limit."
            )
        self.compressor = compressor
        self.seed = seed

    @property
    def worker_scale_scope(self) -> str:
        """The compressor's setting (``compressors.sign``): "block", or "tensor" (one worker scale per
        tensor or whole buffer, ``worker_scales``)."""
        return self.compressor.worker_scale_scope

    def _wire_nbytes(self, dtype: torch.dtype) -> int:
        return self.compressor.wire_nbytes(self.layout.capacity, self.layout.max_blocks, dtype)

    def _encode(
        self, v: torch.Tensor, shard: int, seed: int, scale: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(wire bytes, C(v) as the receiver will decode it) for shard ``shard``'s vector ``v``. ``out``:
        where C(v) is written instead of a new tensor (it may be ``v`` itself: v is compressed first)."""
        lay = self.layout
        if scale is None and lay.permuted and isinstance(self.compressor, ScaledSign):
            scale = block_scales_by_norm(self.compressor, v, lay.shard_blocks(shard))
        if scale is None:
            c = self.compressor.compress(v, lay.shard_blocks(shard), seed=seed)
        else:
            c = self.compressor.compress(v, lay.shard_blocks(shard), seed=seed, scale=scale)  # type: ignore[call-arg]
        wire = self.compressor.to_wire(c, lay.capacity, lay.max_blocks, v.dtype)
        if out is None:
            return wire, self.compressor.decompress(c, dtype=v.dtype, seed=seed)
        self.compressor.decompress_into(c, out, seed=seed)
        return wire, out

    def _decode(self, wire: torch.Tensor, shard: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        lay = self.layout
        c = self.compressor.from_wire(wire, lay.shard_sizes[shard], lay.shard_blocks(shard), lay.capacity, dtype)
        return self.compressor.decompress(c, dtype=dtype, seed=seed)

    def _decode_into(self, wire: torch.Tensor, shard: int, out: torch.Tensor, seed: int, *, add: bool) -> None:
        """``out = C`` (``out += C`` with ``add``) for the message ``wire`` about shard ``shard``."""
        lay = self.layout
        c = self.compressor.from_wire(wire, lay.shard_sizes[shard], lay.shard_blocks(shard), lay.capacity, out.dtype)
        self.compressor.decompress_into(c, out, seed=seed, add=add)

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

    def encode_up_into(self, x: torch.Tensor, out: torch.Tensor, *, step: int, group: int) -> torch.Tensor:
        """``encode_up`` writing ``C(x)`` shard by shard into ``out`` (which may be ``x`` itself: each
        shard is read before it is written) instead of a new full-length tensor; returns the messages."""
        lay, n, me = self.layout, self.layout.world_size, self.rank
        scales = worker_scales(self.compressor, x, lay) if self.worker_scale_scope == "tensor" else [None] * n
        wires = []
        for j in range(n):
            seed = shared_seed(self.seed, step, group, _UP, j, me)
            wire, _ = self._encode(x[lay.shard_slice(j)], j, seed, scales[j], out=out[lay.shard_slice(j)])
            wires.append(wire)
        return torch.cat(wires)

    def receive_up(
        self, send: torch.Tensor, dtype: torch.dtype, *, step: int, group: int, skip: StepSkip | None = None
    ) -> torch.Tensor:
        """The ``all_to_all`` of this worker's wire messages (shard after shard); returns ``mean_i C(x_i)`` on
        this rank's shard, summed in rank order as each message is decoded (``mean_in_rank_order``'s bits).
        ``skip``: as ``all_to_all_up``'s."""
        return self.mean_up(self.all_to_all_up(send, dtype, skip), dtype, step=step, group=group)

    def all_to_all_up(self, send: torch.Tensor, dtype: torch.dtype, skip: StepSkip | None = None) -> torch.Tensor:
        """The ``all_to_all`` of this worker's wire messages (shard after shard), counted; returns the received
        ones, one row per sender. ``skip`` (``StepSkip``): this rank's messages are marked where ``skip.mine``
        is set, and ``skip.anywhere`` is recorded from the received ones. Every path of the scaled-sign
        exchanges sends up through here (eager, fused CPU, Triton)."""
        n = self.layout.world_size
        if skip is not None:
            mark_skipped(send.view(n, -1), skip.mine, self.layout, dtype)
        recv = self.transport.all_to_all(send).view(n, -1)
        self._count(_UP, send.numel(), self._wire_nbytes(dtype))
        if skip is not None:
            skip.record(skipped_anywhere(recv, self.layout, dtype))
        return recv

    def mean_up(self, recv: torch.Tensor, dtype: torch.dtype, *, step: int, group: int) -> torch.Tensor:
        """``mean_i C(x_i)`` on this rank's shard from the received messages ``recv`` (sender after sender)."""
        n, me = self.layout.world_size, self.rank
        recv = recv.view(n, -1)
        total = torch.empty(self.layout.shard_sizes[me], dtype=dtype, device=recv.device)
        for i in range(n):
            self._decode_into(recv[i], me, total, shared_seed(self.seed, step, group, _UP, me, i), add=i > 0)
        return total.div_(n)

    def add_sent_up(self, send: torch.Tensor, out: torch.Tensor, *, step: int, group: int) -> None:
        """``out += C(x)``, ``C(x)`` decoded from this worker's own messages up ``send`` (``encode_up``'s
        bits: the same decode the servers run)."""
        lay, n, me = self.layout, self.layout.world_size, self.rank
        send = send.view(n, -1)
        for j in range(n):
            self._decode_into(send[j], j, out[lay.shard_slice(j)], shared_seed(self.seed, step, group, _UP, j, me), add=True)

    def decode_down_into(self, recv: torch.Tensor, out: torch.Tensor, *, step: int, group: int, add: bool) -> None:
        """Every shard of the all-gathered messages down ``recv`` decoded into ``out`` (``out += ctil`` with
        ``add``, else ``out = ctil``)."""
        lay, n = self.layout, self.layout.world_size
        recv = recv.view(n, -1)
        for j in range(n):
            self._decode_into(recv[j], j, out[lay.shard_slice(j)], shared_seed(self.seed, step, group, _DOWN, j, j), add=add)

    def _count(self, direction: int, handed: int, width: int) -> None:
        """Bytes of one collective: up = all_to_all of ``width``-byte messages, down = all_gather of one."""
        n = self.layout.world_size
        if direction == _UP:
            self.stats.bytes_up += all_to_all_bytes_sent(width, n)
        else:
            self.stats.bytes_down += all_gather_bytes_sent(width, n)
        self.stats.bytes_handed += handed
        self.stats.collective_calls += 1

    def send_down(
        self, shard_vec: torch.Tensor, *, step: int, group: int, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Server -> workers. Returns (``C(shard_vec)`` on this shard, ``C`` of every shard concatenated).
        ``scale``: the scales of this shard's blocks, given (computed over more than the shard: LIEC-SGD)."""
        n, me = self.layout.world_size, self.rank
        wire, mine = self._encode(shard_vec, me, shared_seed(self.seed, step, group, _DOWN, me, me), scale)
        recv = self.transport.all_gather(wire).view(n, -1)
        full = torch.cat(
            [
                self._decode(recv[j], j, shard_vec.dtype, shared_seed(self.seed, step, group, _DOWN, j, j))
                for j in range(n)
            ]
        )
        self._count(_DOWN, wire.numel(), wire.numel())
        return mine, full

    def send_down_into(
        self,
        shard_vec: torch.Tensor,
        out: torch.Tensor,
        *,
        step: int,
        group: int,
        add: bool,
        mine_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``send_down`` decoding every shard straight into ``out`` (``out += C`` with ``add``, else
        ``out = C``) instead of a new full-length tensor; returns ``C(shard_vec)`` on this shard, written
        into ``mine_out`` where given (which may be ``shard_vec`` itself)."""
        me = self.rank
        wire, mine = self._encode(shard_vec, me, shared_seed(self.seed, step, group, _DOWN, me, me), out=mine_out)
        self.decode_down_into(self.transport.all_gather(wire), out, step=step, group=group, add=add)
        self._count(_DOWN, wire.numel(), wire.numel())
        return mine

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

    def _agree_on_kernel(self, impl: registry.KernelImpl) -> bool:
        """Whether ``impl``'s kernels are available on every rank (``impl.failure()``: the CPU kernels
        build, triton imports): one all-reduce of a flag per rank, the first time only. An exchange's
        buffers stay on one device, so one answer serves all its steps.

        In ``fused`` mode every rank raises ``KernelUnavailableError`` naming the ranks that failed; in
        ``auto`` mode all ranks use the eager path (each failing rank has logged its reason), so no
        rank runs kernels whose results (or collectives) differ from another rank's eager lines.
        """
        if self._kernel_everywhere is None:
            n, me = self.transport.world_size, self.rank
            failure = impl.failure()
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
                    f"DEEPSPEED_CDADAM_KERNELS=fused, but the {impl.name} {'are' if impl.name.endswith('s') else 'is'} "
                    f"unavailable on rank(s) {failed} "
                    f"of {n}{reason}. {impl.fix}, or set DEEPSPEED_CDADAM_KERNELS=auto or eager."
                ) from (failure if isinstance(failure, BaseException) else None)
            if failed and failure is None:
                kernels.logger.warning(
                    "%s unavailable on rank(s) %s: every rank uses the eager torch path.", impl.name[:1].upper() + impl.name[1:], failed
                )
            self._kernel_everywhere = not failed
        return self._kernel_everywhere

    #: This scheme's name in ``EXCHANGES``: with the compressor's name and the buffer's device, the key
    #: of its fused kernels in ``kernels.registry.KERNELS``.
    scheme_name: str = ""

    def _kernel(self, x: torch.Tensor, *state: torch.Tensor) -> registry.KernelImpl | None:
        """The registered kernel that runs this step, or ``None`` (the eager lines).

        The first call that gets past a kernel's rank-independent checks (``applies``: compressor, layout,
        dtype, device, ``DEEPSPEED_CDADAM_KERNELS``, which must be the same on every rank) makes every
        rank agree on kernel availability (``_agree_on_kernel``) where the kernel asks for it: all ranks
        or none take the fused path.
        """
        impl = registry.lookup(self.scheme_name, self.compressor.name, registry.device_type(x))
        if (
            impl is not None
            and impl.applies(self, x, *state)
            and (not impl.agree or self._agree_on_kernel(impl))
            and impl.ready(self, x, *state)
        ):
            return impl
        return None

    def uses_fused_kernel(self, x: torch.Tensor, *state: torch.Tensor) -> bool:
        """Whether a registered kernel (``kernels.registry``) runs this step for buffer ``x`` and ``state``."""
        return self._kernel(x, *state) is not None

    def run_kernel(
        self, x: torch.Tensor, state: tuple[torch.Tensor, ...], *, step: int, group: int, skip: StepSkip | None = None
    ) -> torch.Tensor | None:
        """This step on the registered kernel where one applies (its result), else ``None``: the caller
        runs its eager lines. ``state``: the scheme's buffers, in the order its kernels take them.
        ``skip``: passed on to a kernel that takes it (``KernelImpl.device_skip``), else the eager lines run."""
        impl = self._kernel(x, *state)
        if impl is None or (skip is not None and not impl.device_skip):
            return None
        if skip is None:
            return impl.run(self, x, state, step, group)
        return impl.run(self, x, state, step, group, skip=skip)

    def device_skip_kernel(self, x: torch.Tensor, *state: torch.Tensor) -> bool:
        """Whether this step runs on a fused kernel that decides a skip on the device (the Triton kernels).

        Runs no collective: False until the ranks have agreed on the kernels' availability (in an earlier
        step's exchange), so that asking, which ranks may do in different places, never pairs collectives."""
        if self._kernel_everywhere is not True:
            return False
        impl = self._kernel(x, *state)
        return impl is not None and impl.device_skip


class MarkovExchange(CompressedExchange):
    """``markov``: CD-Adam's two Markov compression sequences (module docstring, steps (1)-(5))."""

    scheme_name = "markov"

    STATE = (
        StateSpec(MARKOV_STATE, FULL, PER_RANK, "h_i, this worker's Markov state"),
        StateSpec(SERVER_MARKOV_STATE, SHARD, PER_RANK, "ghat on this rank's server shard"),
        StateSpec(DOWN_MARKOV_STATE, FULL, RANK_IDENTICAL, "gtil, the down Markov state"),
    )

    SUPPORTS_DEVICE_SKIP = True

    def decides_skip_on_device(self, x: torch.Tensor, state: dict) -> bool:
        """Whether a step of ``x`` with ``skip`` runs on the Triton kernels (where a skipped step costs
        nothing extra; the eager lines take ``skip`` too, at one more pass, and serve as the reference)."""
        return self.device_skip_kernel(x, state[MARKOV_STATE], state[SERVER_MARKOV_STATE], state[DOWN_MARKOV_STATE])

    def exchange(
        self, x: torch.Tensor, state: dict, *, step: int, group: int = 0, skip: StepSkip | None = None
    ) -> torch.Tensor:
        """Steps (1)-(5). ``skip`` (``StepSkip``): a rank whose ``skip.mine`` is true takes ``g_i - h_i``
        as zero (its correction is zero, its ``h_i`` stays) and marks its messages up; ``skip.anywhere``
        gets whether any rank did. The other ranks' corrections count as usual, so ``ghat`` stays
        ``mean_i h_i`` and ``gtil`` follows it: the compression sequences stay consistent, and the
        caller leaves the moments and parameters alone where ``skip.anywhere`` is true."""
        h, ghat, gtil = state[MARKOV_STATE], state[SERVER_MARKOV_STATE], state[DOWN_MARKOV_STATE]
        fused = self.run_kernel(x, (h, ghat, gtil), step=step, group=group, skip=skip)  # kernels.registry
        if fused is not None:
            return fused
        # (1) worker i: c_i = C(g_i - h_i), sent to the servers (c_i written over the one temporary g_i - h_i)
        d = x - h
        if skip is not None:
            check_skip_supported(self)
            d.masked_fill_(skip.mine, 0.0)  # a non-finite gradient: a zero correction
        send = self.encode_up_into(d, d, step=step, group=group)
        # (2) worker i: h_i <- h_i + c_i
        h += d
        del d
        # (3) server: ghat <- ghat + mean_i c_i
        ghat += self.receive_up(send, x.dtype, step=step, group=group, skip=skip)
        # (4) server: ctil = C(ghat - gtil), sent to every worker (C written over the shard-sized ghat - gtil);
        # (5) worker i: gtil <- gtil + ctil, shard by shard
        v = ghat - gtil[self.server_slice()]
        self.send_down_into(v, gtil, step=step, group=group, add=True, mine_out=v)
        return gtil

    def prepare(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> PreparedExchange:
        """Both collectives of ``exchange(x, state, step=step)`` with no state changed: what a step started
        during backward runs (``optim.overlap``). The same messages are sent (so the same bytes); the
        state changes (2), (3), (5) wait for ``PreparedExchange.commit``, which decodes them again from
        the kept messages (1/32 of the buffer each way), bit for bit what ``exchange`` adds."""
        h, ghat, gtil = state[MARKOV_STATE], state[SERVER_MARKOV_STATE], state[DOWN_MARKOV_STATE]
        impl = self._kernel(x, h, ghat, gtil)  # the fused CPU kernels' version (kernels.cpu_exchange.prepare_markov)
        if impl is not None and impl.prepare is not None:
            commit_fused = impl.prepare(self, x, (h, ghat, gtil), step, group)
            return PreparedExchange(
                lambda state: commit_fused((state[MARKOV_STATE], state[SERVER_MARKOV_STATE], state[DOWN_MARKOV_STATE])),
            )
        me, dtype = self.rank, x.dtype
        # (1) c_i = C(g_i - h_i), sent up
        d = x - h
        send = self.encode_up_into(d, d, step=step, group=group)
        del d
        recv_up = self.all_to_all_up(send, dtype)
        # (3)-(4) with ghat + mean_i c_i in a temporary: ctil = C(ghat' - gtil), sent down
        v = ghat + self.mean_up(recv_up, dtype, step=step, group=group)
        v -= gtil[self.server_slice()]
        wire, _ = self._encode(v, me, shared_seed(self.seed, step, group, _DOWN, me, me), out=v)
        del v
        recv_down = self.transport.all_gather(wire)
        self._count(_DOWN, wire.numel(), wire.numel())

        def commit(state: dict) -> torch.Tensor:
            h, ghat, gtil = state[MARKOV_STATE], state[SERVER_MARKOV_STATE], state[DOWN_MARKOV_STATE]
            self.add_sent_up(send, h, step=step, group=group)  # (2) h_i += c_i
            ghat += self.mean_up(recv_up, dtype, step=step, group=group)  # (3)
            self.decode_down_into(recv_down, gtil, step=step, group=group, add=True)  # (5) gtil += ctil
            return gtil

        return PreparedExchange(commit)


class ErrorFeedbackExchange(CompressedExchange):
    """``error_feedback``: 1-bit Adam's compressed all-reduce with worker and server error buffers.

    On the fused CPU path the result is this exchange's own buffer, overwritten by its next call (as
    ``MarkovExchange`` returns its state ``gtil``): callers use or copy it before the next step.
    """

    scheme_name = "error_feedback"

    #: The fused path's result buffer, reused from step to step (a fresh one would be page-faulted every step).
    _out: torch.Tensor | None = None

    STATE = (
        StateSpec(WORKER_ERROR, FULL, PER_RANK, "e_i, this worker's error"),
        StateSpec(SERVER_ERROR, SHARD, PER_RANK, "ebar on this rank's server shard"),
    )

    SUPPORTS_DEVICE_SKIP = True

    def decides_skip_on_device(self, x: torch.Tensor, state: dict) -> bool:
        """Whether a step of ``x`` with ``skip`` runs on the Triton kernels (as ``MarkovExchange``'s)."""
        return self.device_skip_kernel(x, state[WORKER_ERROR], state[SERVER_ERROR])

    def exchange(
        self, x: torch.Tensor, state: dict, *, step: int, group: int = 0, skip: StepSkip | None = None
    ) -> torch.Tensor:
        """Steps (1)-(3). ``skip`` (``StepSkip``): a rank whose ``skip.mine`` is true sends zero (``p_i``
        taken as 0) and keeps its ``e_i``; the others' messages count as usual (``ebar`` advances with
        them); ``skip.anywhere`` gets whether any rank skipped, and the caller keeps its moments where it
        did. With ``skip`` the Triton path writes the result over ``x``: pass a buffer the caller refills
        (1-bit Adam's local-momentum temporary; CD-Adam with this scheme, its gradient buffer)."""
        e, ebar = state[WORKER_ERROR], state[SERVER_ERROR]
        fused = self.run_kernel(x, (e, ebar), step=step, group=group, skip=skip)  # kernels.registry
        if fused is not None:
            return fused
        # (1) worker i: p_i = x_i + e_i; c_i = C(p_i) (written into e_i); e_i <- p_i - c_i
        p = x + e
        kept = None
        if skip is not None:
            check_skip_supported(self)
            p.masked_fill_(skip.mine, 0.0)  # a non-finite gradient: a zero message
            kept = e.clone()  # and the error kept
        send = self.encode_up_into(p, e, step=step, group=group)
        torch.sub(p, e, out=e)
        if kept is not None:
            torch.where(skip.mine, kept, e, out=e)
        del p, kept
        # (2) server: q = mean_i c_i + ebar (summed into the received mean); ctil = C(q) (written into ebar);
        # ebar <- q - ctil
        q = self.receive_up(send, x.dtype, step=step, group=group, skip=skip)
        q += ebar
        out = self._out if self._out is not None and self._out.shape == x.shape and self._out.dtype == x.dtype else None
        if out is None or out.device != x.device:
            out = self._out = torch.empty_like(x)
        self.send_down_into(q, out, step=step, group=group, add=False, mine_out=ebar)
        torch.sub(q, ebar, out=ebar)
        return out


class NaiveExchange(CompressedExchange):
    """``naive``: ``C(mean_i C(x_i))`` both ways with no memory."""

    scheme_name = "naive"

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        fused = self.run_kernel(x, (), step=step, group=group)  # kernels.registry (none registered)
        if fused is not None:
            return fused
        _, mean_c = self.send_up(x, step=step, group=group)
        _, ctil = self.send_down(mean_c, step=step, group=group)
        return ctil


from .liec_exchange import ImmediateCompensationExchange  # noqa: E402 - it builds on CompressedExchange above
from .binary_exchange import BinaryExchange  # noqa: E402 - it subclasses CompressedExchange above
from .adaptive_exchange import AdaptiveThreePointExchange  # noqa: E402 - it subclasses CompressedExchange above
from .sketch_exchange import CountSketchExchange  # noqa: E402 - it subclasses CompressedExchange above

#: Exchange schemes by name. A new scheme is one class (its ``STATE`` declared) and one line here.
EXCHANGES: dict[str, type[Exchange]] = {
    "markov": MarkovExchange,
    "error_feedback": ErrorFeedbackExchange,
    "naive": NaiveExchange,
    "none": AllReduceExchange,
    "immediate_compensation": ImmediateCompensationExchange,  # LIEC-SGD (liec_exchange.py)
    "binary": BinaryExchange,  # Birder (binary_exchange.py)
    "adaptive_3pc": AdaptiveThreePointExchange,  # AdaCGD (adaptive_exchange.py)
    "count_sketch": CountSketchExchange,  # SketchedAMSGrad (sketch_exchange.py)
}
EXCHANGE_NAMES = tuple(EXCHANGES)


def make_exchange(
    name: str,
    transport: Transport,
    layout: ShardLayout,
    compressor: Compressor | None,
    stats: CommStats | None = None,
    seed: int = 0,
) -> Exchange:
    """Build the scheme registered under ``name`` (the worker scale scope is the compressor's setting)."""
    cls = EXCHANGES.get(name)
    if cls is None:
        raise ValueError(f"Unknown exchange={name!r}. Allowed: {', '.join(EXCHANGE_NAMES)}.")
    if not issubclass(cls, CompressedExchange):
        made = cls(transport, layout, stats)
    elif compressor is None:
        raise ValueError(f"exchange={name!r} needs a compressor.")
    else:
        made = cls(transport, layout, compressor, stats, seed)
    if layout.permuted:  # a TensorLayout: run in layout space (permuted_exchange)
        from .permuted_exchange import PermutedExchange  # noqa: PLC0415 - it imports this module

        return PermutedExchange(made)
    return made
