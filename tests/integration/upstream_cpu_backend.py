"""A CPU-capable backend for DeepSpeed 0.19.6's own OnebitAdam, for the comparison test only.

Upstream's ``CompressedBackend.compressed_allreduce`` is pure torch except for its bit packing,
which needs an XPU-only op (and the NCCL backend needs cupy). This subclass keeps upstream's
algorithm code untouched and swaps only ``pack``/``unpack`` for torch packing (signs ``x >= 0``,
the convention of upstream's error computation), so upstream can run on gloo.
"""

from __future__ import annotations

import deepspeed.comm as dist
import deepspeed.runtime.comm.compressed as upstream_compressed

from deepspeed_cdadam.compressors.packing import pack_signs, unpack_signs


class CpuCompressedBackend(upstream_compressed.CompressedBackend):
    def __init__(self, mpu=None):  # upstream's __init__ minus the XPU packer
        if mpu is None:
            self.world_group = dist.new_group(ranks=range(dist.get_world_size()))
        else:
            self.mpu = mpu
            self.world_group = self.mpu.get_data_parallel_group()
        self.size = dist.get_world_size(group=self.world_group)
        self.rank = dist.get_rank(group=self.world_group)

    def pack(self, buffer, size):
        return pack_signs(buffer.float().reshape(-1)).reshape(size, -1)

    def unpack(self, buffer, size, dtype):
        return unpack_signs(buffer.reshape(-1), buffer.numel() * 8, dtype).reshape(size, -1)


class _GlooTolerantComm:
    """``deepspeed.comm`` as upstream's module sees it, except that ``all_gather`` of a 0-dim scale
    into 1-element buffers (accepted by NCCL, refused by gloo) sends it as a 1-element tensor."""

    def __getattr__(self, name):
        return getattr(dist, name)

    @staticmethod
    def all_gather(tensor_list, tensor, *args, **kwargs):
        if tensor.dim() == 0 and tensor_list and tensor_list[0].dim() == 1:
            tensor = tensor.reshape(1)
        return dist.all_gather(tensor_list, tensor, *args, **kwargs)


def install() -> None:
    """Make ``comm_backend_name: "compressed"`` build the CPU backend."""
    upstream_compressed.CompressedBackend = CpuCompressedBackend
    upstream_compressed.dist = _GlooTolerantComm()
