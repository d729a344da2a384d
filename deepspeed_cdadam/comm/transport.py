"""Collective transports: the only code that moves bytes between ranks.

A ``Transport`` offers the three collectives the exchange schemes need, on flat tensors:

* ``all_to_all(send)``: ``send`` holds ``world_size`` equal chunks; chunk ``j`` goes to rank ``j``;
  returns the chunks received, in rank order.
* ``all_gather(send)``: returns every rank's ``send``, concatenated in rank order.
* ``all_reduce_sum(x)``: in place sum over ranks.

Implementations: ``TorchDistributedTransport`` (gloo on CPU, NCCL on GPU, any torch.distributed
backend; every call waits at most ``timeout``) and ``InProcessWorld`` (n ranks as threads of one
process, for tests and the simulator-free experiments). Nothing here knows about compression.
"""

from __future__ import annotations

import datetime
import threading
from abc import ABC, abstractmethod

import torch

from ..types import CommTimeoutError

DEFAULT_TIMEOUT_S = 300.0


class Transport(ABC):
    rank: int
    world_size: int

    @abstractmethod
    def all_to_all(self, send: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def all_gather(self, send: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor: ...


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

    def __getstate__(self) -> dict:
        raise TypeError("A TorchDistributedTransport holds a process group and cannot be pickled.")

    def _wait(self, work: object, what: str) -> None:
        try:
            work.wait(timeout=self.timeout)  # type: ignore[attr-defined]
        except RuntimeError as err:
            raise CommTimeoutError(
                f"{what} on rank {self.rank}/{self.world_size} failed or timed out after "
                f"{self.timeout.total_seconds():.0f}s (a peer may have died or stalled): {err}"
            ) from err

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send)
        work = self._dist.all_to_all_single(recv, send.contiguous(), group=self.process_group, async_op=True)
        self._wait(work, "all_to_all")
        return recv

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        recv = send.new_empty(send.numel() * self.world_size)
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        work = gather(recv, send.contiguous(), group=self.process_group, async_op=True)
        self._wait(work, "all_gather")
        return recv

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        work = self._dist.all_reduce(x, group=self.process_group, async_op=True)
        self._wait(work, "all_reduce")
        return x


class InProcessWorld:
    """``world_size`` ranks living as threads of one process, exchanging tensors through memory.

    ``world.transports[r]`` is rank ``r``'s transport; run each rank's code in its own thread
    (``world.run(fn)`` does that and re-raises the first error). A rank that does not arrive
    within ``timeout_s`` makes the others raise ``CommTimeoutError``.
    """

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Invalid world_size={world_size!r}. Must be an int >= 1.")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._slots: list[torch.Tensor | None] = [None] * world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.transports = [_InProcessTransport(self, r) for r in range(world_size)]

    def _exchange(self, rank: int, send: torch.Tensor) -> list[torch.Tensor]:
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
