"""kernels.registry: an exchange finds its fused step by (scheme, compressor, device), with no edit of exchange.py."""

from __future__ import annotations

import torch

from deepspeed_cdadam import InProcessWorld
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import ScaledSignL1, TopK
from deepspeed_cdadam.exchange import make_exchange
from deepspeed_cdadam.kernels import registry


def _naive(compressor, world=2):
    layout = ShardLayout(1000, world, 8)

    def rank(r, transport):
        ex = make_exchange("naive", transport, layout, compressor)
        x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(r))
        return [ex.exchange(x, {}, step=t, group=0).clone() for t in range(2)], ex.stats.bytes_up, ex.stats.bytes_down

    return InProcessWorld(world).run(rank)


def test_a_registered_kernel_is_picked_without_editing_exchange(monkeypatch):
    want = _naive(ScaledSignL1())
    ran = []

    def run(ex, x, state, step, group):
        ran.append((ex.rank, step, group, state))
        # the eager lines, as a fused kernel would compute them
        _, mean_c = ex.send_up(x, step=step, group=group)
        return ex.send_down(mean_c, step=step, group=group)[1]

    fake = registry.KernelImpl(applies=lambda ex, x, *state: x.dtype == torch.float32, run=run)
    monkeypatch.setitem(registry.KERNELS, ("naive", "scaled_sign", "cpu"), fake)
    got = _naive(ScaledSignL1())
    assert sorted(ran) == [(r, t, 0, ()) for r in range(2) for t in range(2)]
    for (g_out, *g_bytes), (w_out, *w_bytes) in zip(got, want):
        assert g_bytes == w_bytes
        assert all(torch.equal(a, b) for a, b in zip(g_out, w_out))
    # another compressor has no entry: the eager lines
    ran.clear()
    _naive(TopK(0.1))
    assert ran == []


def test_a_kernel_that_asks_for_agreement_agrees_once(monkeypatch):
    calls = []
    fake = registry.KernelImpl(
        applies=lambda ex, x, *state: True,
        run=lambda ex, x, state, step, group: calls.append(step) or x.clone(),
        agree=True,
    )
    monkeypatch.setitem(registry.KERNELS, ("naive", "scaled_sign", "cpu"), fake)
    monkeypatch.delenv("DEEPSPEED_CDADAM_KERNELS", raising=False)

    def rank(r, transport):
        ex = make_exchange("naive", transport, ShardLayout(64, 2, 8), ScaledSignL1())
        for t in range(3):
            ex.exchange(torch.ones(64), {}, step=t)
        return ex.stats.bytes_setup > 0, ex.stats.collective_calls, ex._kernel_everywhere

    assert InProcessWorld(2).run(rank) == [(True, 1, True)] * 2
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]


def test_the_existing_kernels_are_registered():
    for key in [
        ("markov", "scaled_sign", "cpu"),
        ("error_feedback", "scaled_sign", "cpu"),
        ("error_feedback", "sign_l2", "cpu"),
        ("markov", "scaled_sign", "cuda"),
        ("markov", "sign_l2", "cuda"),
        ("error_feedback", "scaled_sign", "cuda"),
        ("error_feedback", "sign_l2", "cuda"),
    ]:
        assert isinstance(registry.KERNELS[key], registry.KernelImpl)
