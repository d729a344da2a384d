"""The fused CPU kernels of the error-feedback exchange (1-bit Adam's compressed phase) equal the eager
torch path bit for bit: every message on the wire, both error buffers and the result, step after step."""

from __future__ import annotations

import pytest
import torch

from deepspeed_cdadam import InProcessWorld, OneBitAdam, kernels
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import ScaledSignL1, ScaledSignL2, get_compressor
from deepspeed_cdadam.compressors.sign import l2_block_scales
from deepspeed_cdadam.exchange import make_exchange
from deepspeed_cdadam.types import SERVER_ERROR, WORKER_ERROR

if not kernels.available():
    pytest.skip("the fused kernel does not build here (no g++)", allow_module_level=True)


def _inputs(numel, rank, step, dtype):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1000 * step + rank), dtype=dtype) * (step + 1)
    x[::7] = 0.0  # sign(0) = +1
    x[3::11] = -0.0  # -0.0 too (eager tests x >= 0)
    if step == 2:
        x.zero_()  # a whole step of zeros: p = e only
    return x


def _run(layout, compressor, scope, dtype, steps=5):
    """Per rank: (messages it sent, results, worker error, server error, whether the fused path ran)."""

    def rank_fn(rank, transport):
        ex = make_exchange("error_feedback", transport, layout, get_compressor(compressor, worker_scale_scope=scope))
        state: dict = {}
        ex.init_state(state, torch.zeros(layout.numel, dtype=dtype))
        sent = []
        for name in ("all_to_all", "all_gather"):
            real = getattr(transport, name)
            setattr(transport, name, lambda t, real=real: sent.append(t.clone()) or real(t))
        outs, used = [], []
        for t in range(steps):
            x = _inputs(layout.numel, rank, t, dtype)
            used.append(ex.uses_fused_kernel(x, state[WORKER_ERROR]))
            outs.append(ex.exchange(x, state, step=t + 1).clone())
        return sent, outs, state[WORKER_ERROR].clone(), state[SERVER_ERROR].clone(), used

    return InProcessWorld(layout.world_size).run(rank_fn)


def _assert_same(fused, eager):
    for f, e in zip(fused, eager):
        assert len(f[0]) == len(e[0]) and all(torch.equal(a, b) for a, b in zip(f[0], e[0])), "wire bytes differ"
        assert all(torch.equal(a, b) for a, b in zip(f[1], e[1])), "results differ"
        assert torch.equal(f[2], e[2]), "worker error differs"
        assert torch.equal(f[3], e[3]), "server error differs"


CASES = [
    # (numel, world, block_size): one block per shard (torch's norm passed in), blocks of a multiple of 8
    # (scales summed in the kernel), a block longer than every shard, uneven shards, short last blocks
    (5003, 1, None),
    (5003, 2, None),
    (5003, 3, 64),
    (20_000, 4, 16),
    (4096 * 2 + 5, 2, 2048),
    (777, 2, 4096),
    (3, 4, None),  # an empty shard
]


@pytest.mark.parametrize("numel,world,block", CASES)
@pytest.mark.parametrize("compressor,scope", [("sign_l2", "tensor"), ("sign_l2", "block"), ("scaled_sign", "block")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_eager(monkeypatch, numel, world, block, compressor, scope, dtype):
    layout = ShardLayout(numel, world, block)
    fused = _run(layout, compressor, scope, dtype)
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    eager = _run(layout, compressor, scope, dtype)
    assert all(all(r[4]) for r in fused) and not any(any(r[4]) for r in eager)
    _assert_same(fused, eager)


def test_scaled_sign_l1_tensor_scope_too(monkeypatch):
    layout = ShardLayout(3001, 3, 24)
    fused = _run(layout, "scaled_sign", "tensor", torch.float32)
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    _assert_same(fused, _run(layout, "scaled_sign", "tensor", torch.float32))


@pytest.mark.parametrize(
    "layout,mode",
    [
        (ShardLayout(4096, 2, None), "shard"),
        (ShardLayout(4096, 2, 2048), "shard"),  # every shard exactly one block
        (ShardLayout(4097, 2, 8192), "shard"),
        (ShardLayout(4096, 2, 8), "block"),
        (ShardLayout(4096, 2, 12), None),  # blocks not byte-aligned
        (ShardLayout(4097, 2, 2048), None),  # one shard of one block, the other of two
    ],
)
def test_scale_mode(layout, mode):
    assert kernels.scale_mode(layout) == mode
    assert kernels.error_feedback_applies(layout, torch.empty(0)) is (mode is not None)
    assert kernels.markov_applies(layout, torch.empty(0)) is (mode == "block")


def test_layouts_the_kernels_cannot_reproduce_stay_eager():
    layout = ShardLayout(4096, 1, 12)
    ex = make_exchange("error_feedback", InProcessWorld(1).transports[0], layout, ScaledSignL2())
    x = torch.zeros(4096)
    assert not ex.uses_fused_kernel(x, x)
    assert not ex.uses_fused_kernel(x.half(), x.half())


def test_l2_block_scales_are_torchs():
    """The kernel sums each block in index order; the sqrt and division are torch's own (its float sqrt
    is not always the correctly rounded one), so the scales equal ``l2_block_scales`` exactly."""
    layout = ShardLayout(64 * 300 + 24, 2, 64)
    comp = ScaledSignL2()
    width = comp.wire_nbytes(layout.capacity, layout.max_blocks, torch.float32)
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(3)) * 7
    wire = kernels.error_feedback_worker_step(None, x.clone(), layout, width, 2)
    for j in range(2):
        msg = wire[j * width : (j + 1) * width]
        blocks = layout.shard_blocks(j)
        got = comp.from_wire(msg, layout.shard_sizes[j], blocks, layout.capacity, torch.float32).scale
        assert torch.equal(got, l2_block_scales(x[layout.shard_slice(j)], blocks))


def test_result_buffer_is_reused_and_valid_until_the_next_step():
    layout = ShardLayout(4096, 1, None)
    compressor = ScaledSignL2(worker_scale_scope="tensor")
    ex = make_exchange("error_feedback", InProcessWorld(1).transports[0], layout, compressor)
    state: dict = {}
    ex.init_state(state, torch.zeros(4096))
    first = ex.exchange(torch.randn(4096), state, step=1)
    kept = first.clone()
    second = ex.exchange(torch.randn(4096), state, step=2)
    assert second is first and not torch.equal(second, kept)  # as MarkovExchange's gtil: copy it to keep it


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("block", [None, 16])
def test_thread_count_never_changes_the_bits(monkeypatch, threads, block):
    layout = ShardLayout(100_003, 3, block)
    comp = ScaledSignL2()
    width = comp.wire_nbytes(layout.capacity, layout.max_blocks, torch.float32)
    gen = torch.Generator().manual_seed(threads)
    x, e = torch.randn(layout.numel, generator=gen), torch.randn(layout.numel, generator=gen)
    scales = torch.rand(3, generator=gen) if block is None else None

    def step(n):
        monkeypatch.setattr(kernels, "num_threads", lambda: n)
        e2 = e.clone()
        if scales is None:
            wire = kernels.error_feedback_worker_step(x, e2, layout, width, 2)
        else:
            e2 += x
            wire = kernels.error_feedback_worker_step(None, e2, layout, width, 2, scales)
        out = torch.empty(layout.numel)
        kernels.decode_shards(wire.view(3, -1), out, layout, accumulate=False)
        return wire, e2, out

    for a, b in zip(step(1), step(threads)):
        assert torch.equal(a, b)


def _onebit_trajectory(rank, transport, scope, steps=8, numel=3001):
    p = torch.nn.Parameter(torch.linspace(-1, 1, numel))
    opt = OneBitAdam([p], lr=1e-2, freeze_step=2, transport=transport, worker_scale_scope=scope)
    for t in range(steps):
        p.grad = torch.randn(numel, generator=torch.Generator().manual_seed(100 * t + rank))
        opt.step()
    state = opt.state[p]
    return p.detach().clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("world,scope", [(2, "tensor"), (3, "block")])
def test_onebit_adam_fused_equals_eager(monkeypatch, world, scope):
    """Whole 1-bit Adam runs (fp32 warm-up, then the compressed phase): weights and every state tensor equal."""
    calls = []
    real = kernels.decode_shards
    monkeypatch.setattr(kernels, "decode_shards", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = InProcessWorld(world).run(lambda r, tr: _onebit_trajectory(r, tr, scope))
    assert len(calls) == world * 6  # the 6 compressed steps ran fused on every rank
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    eager = InProcessWorld(world).run(lambda r, tr: _onebit_trajectory(r, tr, scope))
    assert len(calls) == world * 6
    for (fp, fs), (ep, es) in zip(fused, eager):
        assert torch.equal(fp, ep)
        assert fs.keys() == es.keys() and all(torch.equal(fs[k], es[k]) for k in fs)


def test_kernel_arguments_are_checked():
    layout = ShardLayout(64, 2, 12)
    e = torch.zeros(64)
    with pytest.raises(ValueError, match="blocks of a multiple of 8"):
        kernels.error_feedback_worker_step(None, e, layout, 100, 2)
    with pytest.raises(ValueError, match="norm must be 1"):
        kernels.error_feedback_worker_step(None, e, ShardLayout(64, 2, None), 100, 3, torch.ones(1))
    with pytest.raises(ValueError, match="scales must be 1 or 2"):
        kernels.error_feedback_worker_step(None, e, ShardLayout(64, 2, None), 100, 2, torch.ones(3))
    with pytest.raises(ValueError, match="out must be a contiguous 1-D uint8 buffer of 200 bytes"):
        kernels.error_feedback_worker_step(None, e, ShardLayout(64, 2, None), 100, 2, torch.ones(1), out=torch.zeros(8))


def test_portable_build_gives_the_same_bits(monkeypatch, tmp_path):
    """The kernels without AVX-512 (the plain C++ loops other CPUs run) write the same bytes."""
    layout = ShardLayout(30_011, 2, 32)
    gen = torch.Generator().manual_seed(5)
    x, e = torch.randn(layout.numel, generator=gen), torch.randn(layout.numel, generator=gen)
    g, h = torch.randn(layout.numel, generator=gen), torch.randn(layout.numel, generator=gen)

    def run_all():
        comp = ScaledSignL1()
        width = comp.wire_nbytes(layout.capacity, layout.max_blocks, torch.float32)
        e1, e2, h1 = e.clone(), e.clone(), h.clone()
        w1 = kernels.error_feedback_worker_step(x, e1, layout, width, 1)
        w2 = kernels.error_feedback_worker_step(x, e2, layout, width, 2)
        w3 = kernels.markov_worker_step(g, h1, layout, width)
        ghat, gtil = g[: layout.shard_sizes[0]].clone(), h[: layout.shard_sizes[0]].clone()
        w4 = kernels.markov_server_step(w3.view(2, -1), ghat, gtil, layout, 0, width)
        out = h.clone()
        kernels.decode_shards(w3.view(2, -1), out, layout, accumulate=True)
        return [w1, w2, w3, w4, e1, e2, h1, ghat, gtil, out]

    native = run_all()
    monkeypatch.setattr(kernels, "CXXFLAGS", (*kernels.CXXFLAGS, "-mno-avx512f"))
    monkeypatch.setenv("DEEPSPEED_CDADAM_CACHE", str(tmp_path))
    kernels._library.cache_clear()
    try:
        portable = run_all()
    finally:
        kernels._library.cache_clear()
    assert list(tmp_path.glob("markov_sign_*.so"))  # really a second build
    for a, b in zip(native, portable):
        assert torch.equal(a, b)
