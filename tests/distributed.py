"""Run a function on ``world_size`` gloo ranks (separate processes) with a hard deadline."""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60.0


def _entry(rank: int, world_size: int, init_file: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears gloo down while a peer still has collectives in flight
    finally:
        dist.destroy_process_group()
    # Done and torn down: leave without interpreter finalization. About 1 run in 10, gloo's C++ threads
    # still held async work whose tensors finalization then destroyed, and the rank died with SIGABRT
    # ("terminate called without an active exception") after passing (pytorch/pytorch#179291). A failure
    # above still raises and is reported by torch.multiprocessing as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world_size: int, *args, deadline_s: float = 240.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on gloo ranks; raise on failure or after ``deadline_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(
            _entry, args=(world_size, init_file, fn, args), nprocs=world_size, join=False, start_method="spawn"
        )
        end = time.monotonic() + deadline_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > end:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"distributed test did not finish within {deadline_s}s")
