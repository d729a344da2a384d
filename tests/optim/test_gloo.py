"""Multi-process tests on CPU with gloo: the real torch.distributed transport."""

import pytest
import torch

from deepspeed_cdadam import CDAdam, TorchDistributedTransport
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from tests.distributed import spawn
from tests.harness import max_abs_diff, run_optimizer, run_reference

STEPS = 25
GLOO_CASES = ("cdadam", "onebit", "cdadam_randk")


def _train(rank, world_size, out_dir):
    for case in GLOO_CASES:
        history, stats = run_optimizer(case, rank, TorchDistributedTransport(timeout_s=60), STEPS)
        torch.save(
            {"history": history, "bytes_sent": stats.bytes_sent, "calls": stats.collective_calls,
             "setup": stats.bytes_setup, "up": stats.bytes_up, "down": stats.bytes_down},
            f"{out_dir}/{case}-{rank}.pt",
        )


@pytest.mark.parametrize("world_size", [2, 4])
def test_gloo_matches_simulator(tmp_path, world_size):
    spawn(_train, world_size, str(tmp_path))
    for case in GLOO_CASES:
        expected = run_reference(case, world_size, STEPS)
        for rank in range(world_size):
            got = torch.load(tmp_path / f"{case}-{rank}.pt")
            assert max_abs_diff(got["history"], expected) <= 1e-12, (case, rank)
            assert got["bytes_sent"] > 0
    # The harness's two groups (38 + 15 float64 coordinates) are one bucket: per step one all_to_all
    # + one all_gather of ONE message per peer, not one per group. CD-Adam, block_size=None: a shard
    # is ceil(53/n) coordinates, its message ceil(shard/8) packed sign bytes + one fp64 scale (8 B),
    # sent to / gathered from n-1 peers; the control all-reduce of n fp32 flags sends 2(n-1)4n/n B.
    # n=2: shard 27, message 4+8=12 B: up = down = 12 B/step (per group it was (3+8)+(1+8) = 20 B);
    # n=4: shard 14, message 2+8=10 B: up = down = 3*10 = 30 B/step (per group 3*((2+8)+(1+8)) = 57 B).
    message = -(-(-(-53 // world_size)) // 8) + 8
    for rank in range(world_size):
        got = torch.load(tmp_path / f"cdadam-{rank}.pt")
        assert got["up"] == got["down"] == STEPS * (world_size - 1) * message
        assert got["up"] == STEPS * {2: 12, 4: 30}[world_size]
        control = STEPS * all_reduce_bytes_sent(4 * world_size, world_size)
        assert got["bytes_sent"] == got["up"] + got["down"] + control
        assert got["calls"] == 3 * STEPS + (1 if got["setup"] else 0)  # a2a + all_gather + control per step


NUMEL = 1_048_583  # > 1M, not a multiple of 8 * world_size


def _bytes_per_step(rank, world_size, out_dir):
    for block_size in (None, 256):
        _bytes_per_step_with(rank, block_size, f"{out_dir}/bytes-{block_size}-{rank}.pt")


def _bytes_per_step_with(rank, block_size, path):
    p = torch.nn.Parameter(torch.zeros(NUMEL))
    opt = CDAdam([p], lr=1e-3, block_size=block_size)
    gen = torch.Generator().manual_seed(rank)
    sent = []
    for _ in range(2):
        p.grad = torch.randn(NUMEL, generator=gen)
        before = opt.comm_stats.snapshot()
        opt.step()
        after = opt.comm_stats
        sent.append(
            (
                after.bytes_up - before.bytes_up,
                after.bytes_down - before.bytes_down,
                after.bytes_handed - before.bytes_handed,
                after.collective_calls - before.collective_calls,
                after.bytes_sent - before.bytes_sent,
            )
        )
    torch.save(sent, path)


@pytest.mark.parametrize("world_size", [2, 4])
def test_cd_adam_sends_at_most_one_28th_of_fp32_all_reduce(tmp_path, world_size):
    spawn(_bytes_per_step, world_size, str(tmp_path))
    fp32_all_reduce = all_reduce_bytes_sent(4 * NUMEL, world_size)
    shard = -(-NUMEL // world_size)
    wire = -(-shard // 8) + 4  # packed signs of the longest shard + one fp32 scale
    for rank in range(world_size):
        flag = 4 * world_size  # the non-finite flags: one fp32 per rank, all-reduced
        # the default block_size=256: one fp32 scale per 256 signs, 1/28.4 of fp32 (control bytes included)
        for _, _, _, _, total in torch.load(tmp_path / f"bytes-256-{rank}.pt"):
            assert total / fp32_all_reduce <= 1 / 28
        # block_size=None (the paper's one scale per server shard): the exact wire format
        for up, down, handed, calls, total in torch.load(tmp_path / f"bytes-None-{rank}.pt"):
            assert calls == 3  # the flag all-reduce, one all_to_all up, one all_gather down
            assert up == (world_size - 1) * wire and down == (world_size - 1) * wire
            assert total == up + down + all_reduce_bytes_sent(flag, world_size)
            assert handed == world_size * wire + wire + flag  # all_to_all input + all_gather input + flags
            assert total / fp32_all_reduce <= 1 / 28  # everything counted, scales and flags included
            assert handed / (4 * NUMEL) <= 1 / 16  # input bytes vs the fp32 buffer an all-reduce is handed


def _fused_vs_eager(rank, world_size, out_dir):
    import os

    results = {}
    for mode in ("fused", "eager"):  # "fused" raises on every rank if the kernel cannot run
        os.environ["DEEPSPEED_CDADAM_KERNELS"] = mode
        init = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=init)) for n in (1000, 37)]
        opt = CDAdam(params, lr=1e-2, block_size=8, transport=TorchDistributedTransport(timeout_s=60))
        gen = torch.Generator().manual_seed(rank)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        exchange = next(iter(opt._exchanges.values()))
        results[mode] = ([p.detach().clone() for p in params], exchange._kernel_everywhere)
    torch.save(results, f"{out_dir}/{rank}.pt")


def test_fused_cpu_kernels_over_gloo_equal_the_eager_path(tmp_path):
    spawn(_fused_vs_eager, 2, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        fused, used_kernel = got["fused"]
        eager, _ = got["eager"]
        assert used_kernel is True  # every rank agreed the kernel runs
        assert all(torch.equal(a, b) for a, b in zip(fused, eager))
