"""Collectives over MPI (mpi4py): ``comm_backend_name: "mpi"``.

``pip install mpi4py mpich`` gives a working ``mpiexec``. Host tensors are handed to MPI as
numpy views (no copy); device tensors are copied to the host unless ``cuda_aware=True``, in which
case they are passed as they are (the MPI library must then be CUDA-aware, as upstream requires).
MPI has no per-operation timeout: a rank that dies makes ``mpiexec`` end the whole job.
"""

from __future__ import annotations

import torch

from collections.abc import Sequence

from .transport import Transport, _chunk_width, check_partition


class MpiTransport(Transport):
    device = None  # host tensors go as they are, device tensors are copied (or passed, if CUDA-aware)

    def __init__(self, comm: object | None = None, cuda_aware: bool = False) -> None:
        try:
            from mpi4py import MPI
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise RuntimeError("comm_backend_name='mpi' needs mpi4py: pip install mpi4py mpich") from err
        if not isinstance(cuda_aware, bool):
            raise TypeError(f"Invalid cuda_aware={cuda_aware!r}. Must be a bool.")
        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.cuda_aware = cuda_aware

    def __getstate__(self) -> dict:
        raise TypeError("An MpiTransport holds an MPI communicator and cannot be pickled.")

    def _buffer(self, t: torch.Tensor) -> object:
        if t.device.type == "cpu":
            return t.numpy()
        return t  # CUDA-aware MPI reads device memory through __cuda_array_interface__

    def _run(self, op, send: torch.Tensor, recv: torch.Tensor) -> torch.Tensor:
        on_host = send.device.type == "cpu" or self.cuda_aware
        s = send.contiguous() if on_host else send.cpu()
        r = recv if on_host else torch.empty(recv.shape, dtype=recv.dtype)
        op(self._buffer(s), self._buffer(r))
        return r if on_host else r.to(recv.device)

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return self._run(self.comm.Alltoall, send, torch.empty_like(send))

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        return self._run(self.comm.Allgather, send, send.new_empty(send.numel() * self.world_size))

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        total = self._run(lambda s, r: self.comm.Allreduce(s, r, op=self._MPI.SUM), x, torch.empty_like(x))
        return x.copy_(total)

    def reduce_scatter_sum(self, send: torch.Tensor) -> torch.Tensor:
        width = _chunk_width(send, self.world_size)
        op = lambda s, r: self.comm.Reduce_scatter_block(s, r, op=self._MPI.SUM)  # noqa: E731
        return self._run(op, send, send.new_empty(width))

    def split(self, groups: Sequence[Sequence[int]]) -> MpiTransport:
        """``MPI.Comm.Split`` by group (collective over this communicator)."""
        parts = check_partition(groups, self.world_size)
        color = next(i for i, p in enumerate(parts) if self.rank in p)
        return MpiTransport(self.comm.Split(color, parts[color].index(self.rank)), cuda_aware=self.cuda_aware)
