"""The exchanges the benchmarks time, built alike for every benchmark (run inside an initialised process group)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from deepspeed_cdadam.comm import CommStats, ShardLayout, TorchDistributedTransport
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from deepspeed_cdadam.compressors import get_compressor
from deepspeed_cdadam.exchange import make_exchange

def describe_machine() -> str:
    """The CPU's model name, architecture, cores and vector unit, torch's version and the load average:
    what a reader needs to compare timings taken here with their own (this machine is shared)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    return (
        f"{model} ({platform.machine()}, {os.cpu_count()} cores, {capability}), torch {torch.__version__}, "
        f"load average {load} (1/5/15 min)"
    )


ADAM = "fp32 all-reduce (Adam)"
ONEBIT = "1-bit Adam compressed phase"
CDADAM = "CD-Adam (block 2048, fused)"
CDADAM_EAGER = "CD-Adam (one scale per shard, eager)"
METHODS = (ADAM, ONEBIT, CDADAM, CDADAM_EAGER)

# name -> (exchange scheme, compressor, block_size, worker_scale_scope)
_COMPRESSED = {
    ONEBIT: ("error_feedback", "sign_l2", None, "tensor"),  # upstream OnebitAdam's; fused CPU kernels
    CDADAM: ("markov", "scaled_sign", 2048, "block"),  # uses the fused CPU kernels
    CDADAM_EAGER: ("markov", "scaled_sign", None, "block"),  # the paper's layout, eager torch path
}


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (all its threads: compute and the transport's)
    of ``fn`` over ``repeats`` runs, after one warm-up, each started together on every rank."""
    fn()  # warm-up: allocations, first touch, kernel build
    walls, cpus = [], []
    for _ in range(repeats):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def time_methods(numel: int, repeats: int, methods: tuple[str, ...] = METHODS, timeout_s: float = 900) -> list[dict]:
    """Per method: median seconds per exchange step of a random ``numel`` fp32 buffer (wall, and this rank's
    CPU), and bytes one rank sent."""
    world, rank = dist.get_world_size(), dist.get_rank()
    transport = TorchDistributedTransport(timeout_s=timeout_s)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    rows = []
    for method in methods:
        if method == ADAM:
            seconds, cpu = median_seconds(lambda: dist.all_reduce(x.clone()), repeats)
            sent = all_reduce_bytes_sent(4 * numel, world)
        else:
            scheme, comp, block, scope = _COMPRESSED[method]
            stats = CommStats()
            compressor = get_compressor(comp, worker_scale_scope=scope)
            ex = make_exchange(scheme, transport, ShardLayout(numel, world, block), compressor, stats, 0)
            state: dict = {}
            ex.init_state(state, torch.zeros(numel))
            steps = [0]

            def step(ex=ex, state=state, steps=steps) -> None:
                steps[0] += 1
                ex.exchange(x, state, step=steps[0])

            seconds, cpu = median_seconds(step, repeats)
            sent = stats.bytes_sent / steps[0]
        rows.append(
            {
                "world_size": world,
                "numel": numel,
                "method": method,
                "seconds": seconds,
                "bytes_sent_per_rank": sent,
                "cpu_seconds": cpu,
            }
        )
    return rows
