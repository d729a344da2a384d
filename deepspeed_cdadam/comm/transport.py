"""Collective transports: the only code that moves bytes between ranks.

A ``Transport`` offers the collectives the exchange schemes need, on flat tensors:

* ``all_to_all(send)``: ``send`` holds ``world_size`` equal chunks; chunk ``j`` goes to rank ``j``;
  returns the chunks received, in rank order.
* ``all_gather(send)``: returns every rank's ``send``, concatenated in rank order.
* ``all_reduce_sum(x)``: in place sum over ranks.
* ``reduce_scatter_sum(send)``: ``send`` holds ``world_size`` equal chunks; returns the sum over
  ranks of chunk ``rank`` (for linear payloads, e.g. count sketches, summed in compressed space).

Each has a ``start_*`` twin that returns a ``Pending`` at once; its ``wait()`` gives the result.
``TorchDistributedTransport`` overlaps the collective with whatever the caller does before
``wait()`` (an exchange started during backward); the others complete it at the start. Every rank
must start collectives in the same order, and wait on them in the same order.

``split(groups)`` makes sub-transports: every rank passes the same partition of the ranks (e.g.
``node_groups(world_size, ranks_per_node)`` for intra-node and inter-node groups) and gets the
transport of the group it belongs to, with ranks numbered inside that group.

Every transport names the ``device`` its tensors must live on (NCCL: the current CUDA device;
gloo: the CPU; ``None``: any device, as MPI copies what it needs). The optimizers put their small
control tensors (non-finite flags, fingerprints, checkpoint agreement) on ``control_device(t)`` and
check that their flat buffers live on ``t.device``: a CPU tensor never reaches NCCL.

Implementations: ``TorchDistributedTransport`` (gloo on CPU, NCCL on GPU, any torch.distributed
backend; every call waits at most ``timeout``) and ``InProcessWorld`` (n ranks as threads of one
process, for tests and the simulator-free experiments). Nothing here knows about compression.
"""

from __future__ import annotations

import datetime
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from ..types import CommTimeoutError

DEFAULT_TIMEOUT_S = 300.0


#: ``torch.distributed`` backend -> the device type its collectives accept (anything else: CPU).
BACKEND_DEVICE_TYPES = {"nccl": "cuda", "xccl": "xpu"}


class Pending:
    """A collective in flight. ``wait()`` returns its result (the same tensor on every later call)."""

    def __init__(self, finish: Callable[[], torch.Tensor]) -> None:
        self._finish: Callable[[], torch.Tensor] | None = finish
        self._result: torch.Tensor | None = None

    @classmethod
    def done(cls, result: torch.Tensor) -> Pending:
        return cls(lambda: result)

    def wait(self) -> torch.Tensor:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        assert self._result is not None
        return self._result


def check_partition(groups: Sequence[Sequence[int]], world_size: int) -> list[tuple[int, ...]]:
    """``groups`` as tuples, or ``ValueError`` unless they partition ``range(world_size)``."""
    parts = [tuple(int(r) for r in g) for g in groups]
    flat = sorted(r for g in parts for r in g)
    if flat != list(range(world_size)) or any(not g for g in parts):
        raise ValueError(
            f"Invalid groups={groups!r}: every rank 0..{world_size - 1} must be in exactly one non-empty group."
        )
    return parts


def node_groups(world_size: int, ranks_per_node: int) -> tuple[list[list[int]], list[list[int]]]:
    """(intra-node groups, inter-node groups) for ranks placed node by node, ``ranks_per_node`` per node.

    Intra: ``[0..k-1], [k..2k-1], ...``; inter: the ranks with the same local index, one per node.
    """
    if not isinstance(ranks_per_node, int) or ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(
            f"Invalid ranks_per_node={ranks_per_node!r}: must be an int >= 1 that divides world_size={world_size}."
        )
    k = ranks_per_node
    intra = [list(range(node * k, (node + 1) * k)) for node in range(world_size // k)]
    inter = [list(range(local, world_size, k)) for local in range(k)]
    return intra, inter


class Transport(ABC):
    rank: int
    world_size: int
    #: The device every tensor handed to this transport must live on; ``None``: any device.
    device: torch.device | None = torch.device("cpu")

    @abstractmethod
    def all_to_all(self, send: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def all_gather(self, send: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor: ...

    def reduce_scatter_sum(self, send: torch.Tensor) -> torch.Tensor:
        """Chunk ``rank`` of the sum over ranks of ``send`` (``world_size`` equal chunks).

        This default sums the whole vector with ``all_reduce_sum`` (twice the bytes of a real
        reduce-scatter); transports with a native reduce-scatter override it.
        """
        width = _chunk_width(send, self.world_size)
        total = self.all_reduce_sum(send.clone())
        return total[self.rank * width : (self.rank + 1) * width].clone()

    # Asynchronous twins: this default completes the collective at the start.
    def start_all_to_all(self, send: torch.Tensor) -> Pending:
        return Pending.done(self.all_to_all(send))

    def start_all_gather(self, send: torch.Tensor) -> Pending:
        return Pending.done(self.all_gather(send))

    def start_all_reduce_sum(self, x: torch.Tensor) -> Pending:
        return Pending.done(self.all_reduce_sum(x))

    def start_reduce_scatter_sum(self, send: torch.Tensor) -> Pending:
        return Pending.done(self.reduce_scatter_sum(send))

    def split(self, groups: Sequence[Sequence[int]]) -> Transport:
        """The transport of this rank's group among ``groups`` (a partition of the ranks; same on every rank)."""
        raise NotImplementedError(f"{type(self).__name__} has no subgroups.")


def _chunk_width(send: torch.Tensor, world_size: int) -> int:
    if send.numel() % world_size:
        raise ValueError(f"A tensor of {send.numel()} elements does not split into {world_size} equal chunks.")
    return send.numel() // world_size


class TorchDistributedTransport(Transport):
    """Collectives over ``torch.distributed`` on ``process_group`` (default: the world)."""

    def __init__(self, process_group: object | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group() "
                "(or launch with torchrun/deepspeed) before building a distributed optimizer, "
                "or pass transport=InProcessWorld(...).transports[rank]."
            )
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"Invalid timeout_s={timeout_s!r}. Must be a number > 0.")
        self._dist = dist
        self.process_group = process_group
        self.rank = dist.get_rank(group=process_group)
        self.world_size = dist.get_world_size(group=process_group)
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self.backend = str(dist.get_backend(process_group)).lower()
        self.device = _backend_device(self.backend)

    def __getstate__(self) -> dict:
        raise TypeError("A TorchDistributedTransport holds a process group and cannot be pickled.")

    def _wait(self, work: object, what: str) -> None:
        if self.device is not None and self.device.type != "cpu":
            # On an accelerator wait() only orders the streams; the host never blocks here, and a
            # stalled peer is caught by the process group's own timeout (NCCL's watchdog).
            work.wait()  # type: ignore[attr-defined]
            return
        try:
            work.wait(timeout=self.timeout)  # type: ignore[attr-defined]
        except RuntimeError as err:
            raise CommTimeoutError(
                f"{what} on rank {self.rank}/{self.world_size} failed or timed out after "
                f"{self.timeout.total_seconds():.0f}s (a peer may have died or stalled): {err}"
            ) from err

    def _pending(self, work: object, result: torch.Tensor, what: str) -> Pending:
        def finish() -> torch.Tensor:
            self._wait(work, what)
            return result

        return Pending(finish)

    def start_all_to_all(self, send: torch.Tensor) -> Pending:
        recv = torch.empty_like(send)
        work = self._dist.all_to_all_single(recv, send.contiguous(), group=self.process_group, async_op=True)
        return self._pending(work, recv, "all_to_all")

    def start_all_gather(self, send: torch.Tensor) -> Pending:
        recv = send.new_empty(send.numel() * self.world_size)
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        work = gather(recv, send.contiguous(), group=self.process_group, async_op=True)
        return self._pending(work, recv, "all_gather")

    def start_all_reduce_sum(self, x: torch.Tensor) -> Pending:
        work = self._dist.all_reduce(x, group=self.process_group, async_op=True)
        return self._pending(work, x, "all_reduce")

    def start_reduce_scatter_sum(self, send: torch.Tensor) -> Pending:
        recv = send.new_empty(_chunk_width(send, self.world_size))
        scatter = getattr(self._dist, "reduce_scatter_single", None) or self._dist.reduce_scatter_tensor
        work = scatter(recv, send.contiguous(), group=self.process_group, async_op=True)
        return self._pending(work, recv, "reduce_scatter")

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return self.start_all_to_all(send).wait()

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        return self.start_all_gather(send).wait()

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.start_all_reduce_sum(x).wait()

    def reduce_scatter_sum(self, send: torch.Tensor) -> torch.Tensor:
        return self.start_reduce_scatter_sum(send).wait()

    def split(self, groups: Sequence[Sequence[int]]) -> TorchDistributedTransport:
        """On the world group every rank calls ``dist.new_group`` for every group, in order. On a
        subgroup (e.g. the data-parallel group under model parallelism, or a second split), where the
        other ranks of the world do not take part, each rank makes only its own group, with local
        synchronisation among that group's ranks."""
        parts = check_partition(groups, self.world_size)
        base = self._dist.get_process_group_ranks(self.process_group) if self.process_group is not None else None
        mine = None
        for part in parts:
            ranks = [base[r] for r in part] if base is not None else list(part)
            if base is not None:
                if self.rank in part:
                    mine = self._dist.new_group(ranks, timeout=self.timeout, use_local_synchronization=True)
                continue
            group = self._dist.new_group(ranks, timeout=self.timeout)
            if self.rank in part:
                mine = group
        sub = TorchDistributedTransport(mine, self.timeout.total_seconds())
        return sub


def _backend_device(backend: str) -> torch.device:
    """The device a ``torch.distributed`` backend's collectives take (its current one for accelerators)."""
    names = [part.split(":")[-1] for part in backend.split(",")]  # "nccl" or "cpu:gloo,cuda:nccl"
    kind = next((BACKEND_DEVICE_TYPES[n] for n in names if n in BACKEND_DEVICE_TYPES), None)
    if kind is None:
        return torch.device("cpu")
    module = getattr(torch, kind, None)
    if module is None or not module.is_available():
        return torch.device(kind)
    return torch.device(kind, module.current_device())


def control_device(transport: Transport) -> torch.device:
    """Where the small control tensors handed to ``transport`` are made."""
    return transport.device if transport.device is not None else torch.device("cpu")


def check_on_transport_device(transport: Transport, t: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` if ``t`` is not on a device ``transport`` can move."""
    dev = transport.device
    if dev is not None and t.device.type != dev.type:
        raise ValueError(
            f"{what} is on {t.device}, but the transport {type(transport).__name__} moves tensors on {dev} "
            f"(backend {getattr(transport, 'backend', 'in-process')!r}). Move the model to {dev.type} before "
            "building the optimizer (model.to(device)), or initialise torch.distributed with a backend for "
            f"{t.device.type} (gloo for cpu, nccl for cuda)."
        )


class InProcessWorld:
    """``world_size`` ranks living as threads of one process, exchanging tensors through memory.

    ``world.transports[r]`` is rank ``r``'s transport; run each rank's code in its own thread
    (``world.run(fn)`` does that and re-raises the first error). A rank that does not arrive
    within ``timeout_s`` makes the others raise ``CommTimeoutError``.

    Like NCCL, the world moves tensors of one ``device`` only (default CPU) and refuses any other
    with ``TypeError``: tests that run without a GPU catch a tensor sent from the wrong device.
    """

    def __init__(self, world_size: int, timeout_s: float = 60.0, device: str | torch.device = "cpu") -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Invalid world_size={world_size!r}. Must be an int >= 1.")
        self.device = torch.device(device)
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._slots: list[torch.Tensor | None] = [None] * world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.transports = [_InProcessTransport(self, r) for r in range(world_size)]
        self._children: dict[tuple[tuple[int, ...], ...], list[InProcessWorld]] = {}
        self._children_lock = threading.Lock()

    def split(self, groups: Sequence[Sequence[int]]) -> list[InProcessWorld]:
        """One sub-world per group (made once per partition, shared by the ranks' threads)."""
        parts = tuple(check_partition(groups, self.world_size))
        with self._children_lock:
            if parts not in self._children:
                self._children[parts] = [InProcessWorld(len(p), self.timeout_s, self.device) for p in parts]
            return self._children[parts]

    def _exchange(self, rank: int, send: torch.Tensor) -> list[torch.Tensor]:
        if send.device.type != self.device.type:
            raise TypeError(
                f"in-process collective on rank {rank}: a tensor on {send.device} was handed to a transport "
                f"that moves tensors on {self.device} (as NCCL refuses CPU tensors)."
            )
        try:
            self._slots[rank] = send.clone()
            self._barrier.wait()
            received = [t.clone() for t in self._slots]  # type: ignore[union-attr]
            self._barrier.wait()
        except threading.BrokenBarrierError as err:
            raise CommTimeoutError(
                f"in-process collective on rank {rank}/{self.world_size}: a peer did not arrive within "
                f"{self.timeout_s}s or failed"
            ) from err
        return received

    def abort(self) -> None:
        self._barrier.abort()
        for worlds in self._children.values():
            for world in worlds:
                world.abort()

    def run(self, fn: object) -> list[object]:
        """Run ``fn(rank, transport)`` for every rank in its own thread; return the results in rank order."""
        results: list[object] = [None] * self.world_size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.transports[rank])  # type: ignore[operator]
            except BaseException as err:  # noqa: BLE001 - re-raised below in the caller's thread
                errors.append(err)
                self.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            first = next((e for e in errors if not isinstance(e, CommTimeoutError)), errors[0])
            raise first
        return results


class _InProcessTransport(Transport):
    def __init__(self, world: InProcessWorld, rank: int) -> None:
        self._world = world
        self.rank = rank
        self.world_size = world.world_size
        self.device = world.device

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        chunks = self._world._exchange(self.rank, send)
        width = send.numel() // self.world_size
        return torch.cat([c[self.rank * width : (self.rank + 1) * width] for c in chunks])

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._world._exchange(self.rank, send))

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._world._exchange(self.rank, x)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        x.copy_(total)
        return x

    def reduce_scatter_sum(self, send: torch.Tensor) -> torch.Tensor:
        width = _chunk_width(send, self.world_size)
        parts = self._world._exchange(self.rank, send)
        mine = slice(self.rank * width, (self.rank + 1) * width)
        total = parts[0][mine].clone()
        for p in parts[1:]:
            total += p[mine]
        return total

    def split(self, groups: Sequence[Sequence[int]]) -> Transport:
        parts = check_partition(groups, self.world_size)
        index = next(i for i, p in enumerate(parts) if self.rank in p)
        return self._world.split(parts)[index].transports[parts[index].index(self.rank)]
