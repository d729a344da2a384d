"""Collective transports: the only code that moves bytes between ranks.

A ``Transport`` offers the three collectives the exchange schemes need, on flat tensors:

* ``all_to_all(send)``: ``send`` holds ``world_size`` equal chunks; chunk ``j`` goes to rank ``j``;
  returns the chunks received, in rank order.
* ``all_gather(send)``: returns every rank's ``send``, concatenated in rank order.
* ``all_reduce_sum(x)``: in place sum over ranks.

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

import torch

from ..types import CommTimeoutError

DEFAULT_TIMEOUT_S = 300.0


#: ``torch.distributed`` backend -> the device type its collectives accept (anything else: CPU).
BACKEND_DEVICE_TYPES = {"nccl": "cuda", "xccl": "xpu"}


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
