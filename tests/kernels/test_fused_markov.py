"""The fused CPU kernel for CD-Adam's worker step equals the eager torch path bit for bit."""

from __future__ import annotations

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, kernels
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import ScaledSignL1
from deepspeed_cdadam.exchange import make_exchange

if not kernels.available():
    pytest.skip("the fused kernel does not build here (no g++)", allow_module_level=True)


def eager_worker_step(g, h, layout):
    """Steps (1)-(2) on MarkovExchange's eager path: the wire messages and the new h."""
    exchange = make_exchange("markov", InProcessWorld(layout.world_size).transports[0], layout, ScaledSignL1())
    wire, c = exchange.encode_up(g - h, step=1, group=0)
    return wire, h + c


@pytest.mark.parametrize(
    "numel,world,block,dtype",
    [
        (100_003, 1, 2048, torch.float32),  # a short last block
        (100_003, 3, 16, torch.float64),  # uneven shards, shard lengths not multiples of 8
        (50_001, 4, 8, torch.float32),
        (16, 1, 8, torch.float32),
        (8 * 2048 * 3 + 5, 2, 2048, torch.float32),  # whole 8-block tiles plus a tail
    ],
)
def test_fused_equals_eager(numel, world, block, dtype):
    layout = ShardLayout(numel, world, block)
    assert kernels.markov_applies(layout, torch.empty(0, dtype=dtype))
    gen = torch.Generator().manual_seed(numel)
    g = torch.randn(numel, generator=gen, dtype=dtype) * torch.rand(numel, generator=gen, dtype=dtype) * 100
    h = torch.randn(numel, generator=gen, dtype=dtype)
    g[::97] = h[::97]  # zero deltas: sign(0) = +1
    g[5], h[5] = -0.0, 0.0  # a -0.0 delta: also +1 (eager tests x >= 0)
    width = ScaledSignL1().wire_nbytes(layout.capacity, layout.max_blocks, dtype)
    want_wire, want_h = eager_worker_step(g, h, layout)
    got_h = h.clone()
    got_wire = kernels.markov_worker_step(g, got_h, layout, width)
    assert torch.equal(got_wire, want_wire)
    assert torch.equal(got_h, want_h)


def test_nan_delta_matches_eager():
    layout = ShardLayout(64, 1, 8)
    g, h = torch.randn(64), torch.zeros(64)
    g[3] = float("nan")
    want_wire, want_h = eager_worker_step(g, h, layout)
    got_h = h.clone()
    got_wire = kernels.markov_worker_step(g, got_h, layout, ScaledSignL1().wire_nbytes(64, 8, torch.float32))
    assert torch.equal(got_wire, want_wire)
    assert torch.equal(got_h.isnan(), want_h.isnan()) and torch.equal(got_h.nan_to_num(), want_h.nan_to_num())


@pytest.mark.parametrize(
    "layout,applies",
    [
        (ShardLayout(4096, 2, 8), True),
        (ShardLayout(4096, 2, None), False),  # one block per shard: torch's vectorised sum order
        (ShardLayout(4096, 2, 12), False),  # blocks not byte-aligned
        (ShardLayout(4096, 2, 2048), False),  # each shard a single block
    ],
)
def test_applies_only_where_exact(layout, applies):
    assert kernels.markov_applies(layout, torch.empty(0)) is applies


def _trajectory(rank, transport, dtype=torch.float32, numel=5003, steps=12):
    p = torch.nn.Parameter(torch.linspace(-1, 1, numel, dtype=dtype))
    opt = CDAdam([p], lr=1e-2, block_size=64, transport=transport)
    for t in range(steps):
        p.grad = torch.randn(numel, generator=torch.Generator().manual_seed(100 * t + rank), dtype=dtype)
        opt.step()
    ex = next(iter(opt._exchanges.values()))
    state = opt.state[p]
    return (
        p.detach().clone(),
        [state[k].clone() for k in sorted(state) if torch.is_tensor(state[k])],
        ex.uses_fused_kernel(p.grad, p.grad),
    )


@pytest.mark.parametrize(
    "world,dtype", [(1, torch.float32), (2, torch.float64), (3, torch.float32), (4, torch.float32)]
)
def test_optimizer_fused_equals_eager(monkeypatch, world, dtype):
    """Whole CD-Adam steps (worker step, server decode-average-encode, decode down): every state tensor equal."""
    fused = InProcessWorld(world).run(lambda r, tr: _trajectory(r, tr, dtype))
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    eager = InProcessWorld(world).run(lambda r, tr: _trajectory(r, tr, dtype))
    assert all(f[2] for f in fused) and not any(e[2] for e in eager)
    for f, e in zip(fused, eager):
        assert torch.equal(f[0], e[0])
        assert len(f[1]) == 6 and all(torch.equal(a, b) for a, b in zip(f[1], e[1]))


def test_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"Invalid DEEPSPEED_CDADAM_KERNELS='fast'\. Allowed: auto, eager, fused\."):
        kernels.available()


def test_exchange_without_kernel_uses_eager(monkeypatch):
    layout = ShardLayout(4096, 1, 8)
    ex = make_exchange("markov", InProcessWorld(1).transports[0], layout, ScaledSignL1())
    x = torch.zeros(4096)
    assert ex.uses_fused_kernel(x, x)
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    assert not ex.uses_fused_kernel(x, x)


def test_unbuildable_kernel_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    """auto: an unwritable cache (or no compiler) means the eager path and a warning; fused: an error."""
    monkeypatch.setenv("DEEPSPEED_CDADAM_CACHE", str(tmp_path / "file" / "sub"))
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(kernels, "_failure", None)
    kernels._library.cache_clear()
    try:
        assert not kernels.available()
        assert not kernels.available()  # remembered: no second build attempt, no second warning
        assert caplog.text.count("Fused CPU kernel unavailable, using the eager torch path") == 1
        monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "fused")
        with pytest.raises(kernels.KernelUnavailableError, match="DEEPSPEED_CDADAM_CACHE"):
            kernels.available()
    finally:
        kernels._library.cache_clear()


@pytest.mark.parametrize(
    "numel,world,block,dtype", [(100_003, 3, 16, torch.float64), (8 * 2048 * 3 + 5, 2, 2048, torch.float32)]
)
def test_server_step_equals_decode_encode_decode(numel, world, block, dtype):
    """The fused server step equals its three eager-equivalent pieces: ghat += mean_i c_i (decode_mean_add),
    the message of C(ghat - gtil) (markov_encode), and gtil += that message decoded (this shard's step 5)."""
    layout = ShardLayout(numel, world, block)
    comp = ScaledSignL1()
    width = comp.wire_nbytes(layout.capacity, layout.max_blocks, dtype)
    gen = torch.Generator().manual_seed(7)
    g, h = torch.randn(numel, generator=gen, dtype=dtype), torch.randn(numel, generator=gen, dtype=dtype)
    messages = kernels.markov_worker_step(g, h.clone(), layout, width).view(world, -1)
    for me in range(world):
        size = layout.shard_sizes[me]
        ghat = torch.randn(size, generator=gen, dtype=dtype)
        gtil = torch.randn(size, generator=gen, dtype=dtype)
        want_ghat, want_gtil = ghat.clone(), gtil.clone()
        kernels.decode_mean_add(messages, want_ghat, layout, me)
        want_wire = kernels.markov_encode(want_ghat, want_gtil, layout, me, width)
        kernels.decode_mean_add(want_wire.view(1, -1), want_gtil, layout, me)
        got_wire = kernels.markov_server_step(messages, ghat, gtil, layout, me, width)
        assert torch.equal(got_wire, want_wire)
        assert torch.equal(ghat, want_ghat) and torch.equal(gtil, want_gtil)


@pytest.mark.parametrize("skip", [None, 0, 2])
def test_decode_shards_equals_decoding_shard_by_shard(skip):
    layout = ShardLayout(50_001, 3, 24)
    width = ScaledSignL1().wire_nbytes(layout.capacity, layout.max_blocks, torch.float32)
    gen = torch.Generator().manual_seed(11)
    g, h = torch.randn(50_001, generator=gen), torch.randn(50_001, generator=gen)
    messages = kernels.markov_worker_step(g, h.clone(), layout, width).view(3, -1)
    want = h.clone()
    for j in range(3):
        if j != skip:
            kernels.decode_mean_add(messages[j : j + 1], want[layout.shard_slice(j)], layout, j)
    got = h.clone()
    kernels.decode_shards(messages, got, layout, accumulate=True, skip=skip)
    assert torch.equal(got, want)
    decoded = torch.full((50_001,), 5.0)
    kernels.decode_shards(messages, decoded, layout, accumulate=False)
    zeros = torch.zeros(50_001)
    kernels.decode_shards(messages, zeros, layout, accumulate=True)
    assert torch.equal(decoded, zeros)  # 0 + c = c: the decoded messages themselves
