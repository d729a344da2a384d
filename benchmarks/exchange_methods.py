"""The exchanges the benchmarks time, built alike for every benchmark (run inside an initialised process group)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from deepspeed_cdadam.comm import CommStats, ShardLayout, TorchDistributedTransport
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from deepspeed_cdadam.compressors import get_compressor
from deepspeed_cdadam.exchange import make_exchange

ADAM = "fp32 all-reduce (Adam)"
ONEBIT = "1-bit Adam compressed phase"
CDADAM = "CD-Adam (block 2048, fused)"
CDADAM_EAGER = "CD-Adam (one scale per shard, eager)"
METHODS = (ADAM, ONEBIT, CDADAM, CDADAM_EAGER)

# name -> (exchange scheme, compressor, block_size, worker_scale_scope)
_COMPRESSED = {
    ONEBIT: ("error_feedback", "sign_l2", None, "tensor"),  # upstream OnebitAdam's compressed all-reduce
    CDADAM: ("markov", "scaled_sign", 2048, "block"),  # uses the fused CPU kernels
    CDADAM_EAGER: ("markov", "scaled_sign", None, "block"),  # the paper's layout, eager torch path
}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up, each started together on every rank."""
    fn()  # warm-up: allocations, first touch, kernel build
    samples = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_methods(numel: int, repeats: int, methods: tuple[str, ...] = METHODS, timeout_s: float = 900) -> list[dict]:
    """Per method: median seconds per exchange step of a random ``numel`` fp32 buffer, and bytes one rank sent."""
    world, rank = dist.get_world_size(), dist.get_rank()
    transport = TorchDistributedTransport(timeout_s=timeout_s)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    rows = []
    for method in methods:
        if method == ADAM:
            seconds = median_seconds(lambda: dist.all_reduce(x.clone()), repeats)
            sent = all_reduce_bytes_sent(4 * numel, world)
        else:
            scheme, comp, block, scope = _COMPRESSED[method]
            stats = CommStats()
            ex = make_exchange(
                scheme, transport, ShardLayout(numel, world, block), get_compressor(comp), stats, 0, scope
            )
            state: dict = {}
            ex.init_state(state, torch.zeros(numel))
            steps = [0]

            def step(ex=ex, state=state, steps=steps) -> None:
                steps[0] += 1
                ex.exchange(x, state, step=steps[0])

            seconds = median_seconds(step, repeats)
            sent = stats.bytes_sent / steps[0]
        rows.append(
            {"world_size": world, "numel": numel, "method": method, "seconds": seconds, "bytes_sent_per_rank": sent}
        )
    return rows
