"""The Triton kernels of the scaled-sign exchanges against the eager torch path.

Without a GPU they run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here while the
kernels are decorated and run; slow, so sizes stay small). With one, the compiled kernels run on CUDA
tensors (marked ``gpu``). ``DEEPSPEED_CDADAM_TRITON_TEST_DEVICE=cpu|cuda`` overrides the choice.

The reference is always the eager path on CPU copies of the inputs. What must hold:

* bit for bit: the sign bytes and all padding of every wire message; decoded means
  (``decode_mean_add``: summed in rank order, then divided) and decoded shards; every state update
  given the kernel's own wire bytes (``h + C``, ``p - C``), i.e. every state is what a receiver
  decoding those bytes computes, so ranks agree by construction;
* within ``RTOL``: the scales. A kernel's block sum is a tree (``tl.sum``), torch's is sequential
  (``segment_reduce``) or its own vectorised order, so the last bits differ: for n <= 50k
  nonnegative terms the two orders differ by at most ~log2(n) * eps relative (about 2e-6 in fp32);
  measured up to 5e-7.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from deepspeed_cdadam import InProcessWorld
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import ScaledSignL1
from deepspeed_cdadam.compressors.sign import ScaledSignL2
from deepspeed_cdadam.exchange import make_exchange, mean_in_rank_order
from deepspeed_cdadam.kernels import triton_exchange as tx
from deepspeed_cdadam.types import DOWN_MARKOV_STATE, MARKOV_STATE, SERVER_ERROR, SERVER_MARKOV_STATE, WORKER_ERROR

# Where the kernels run: the compiled kernels on CUDA where there is a GPU, else the interpreter on CPU
# (DEEPSPEED_CDADAM_TRITON_TEST_DEVICE=cpu|cuda chooses).
DEVICE = os.environ.get("DEEPSPEED_CDADAM_TRITON_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("DEEPSPEED_CDADAM_TRITON_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0: CPU tests interpret it)")
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []


@contextlib.contextmanager
def _interpreter():
    """``TRITON_INTERPRET=1`` (for CPU tensors) while our kernels are decorated and run, and only then:
    triton reads it when ``@triton.jit`` decorates and on a launch's first imports; other tests and the
    subprocesses they start do not see it. The kernels use builtins only, so it does not matter how
    triton's own library was decorated (deepspeed imports triton first in a whole-suite run)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


with _interpreter():
    if "deepspeed_cdadam.kernels.triton_sign" in sys.modules and tx._kernels().INTERPRETED != (DEVICE == "cpu"):
        del sys.modules["deepspeed_cdadam.kernels.triton_sign"]  # decorated for the other device: again
        tx._kernels.cache_clear()
        tx.import_failure.cache_clear()
    assert tx._kernels().INTERPRETED == (DEVICE == "cpu")


@pytest.fixture(autouse=True, scope="module")
def _interpreting():
    with _interpreter():
        yield


RTOL = {torch.float32: 2e-6, torch.float64: 1e-14}
COMPRESSORS = {"l1": ScaledSignL1, "l2": ScaledSignL2}


def itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def exchange_for(layout, norm, scope="block", scheme="markov"):
    return make_exchange(
        scheme, InProcessWorld(layout.world_size).transports[0], layout, COMPRESSORS[norm](worker_scale_scope=scope)
    )


def width_of(layout, dtype):
    return ScaledSignL1().wire_nbytes(layout.capacity, layout.max_blocks, dtype)


def eager_decode(layout, norm, message, shard, dtype):
    """C as a receiver of ``message`` (one wire row of shard ``shard``) decodes it on the eager path."""
    return exchange_for(layout, norm)._decode(message.cpu(), shard, dtype, 0)


def scales_of(messages, layout, dtype):
    """[rows, max_blocks] scales of wire rows (uint8)."""
    start = (layout.capacity + 7) // 8
    nbytes = layout.max_blocks * itemsize(dtype)
    return messages[:, start : start + nbytes].flatten().clone().view(dtype).view(messages.shape[0], -1)


def assert_wire_matches(got, want, layout, dtype):
    """Sign bytes and padding bit for bit; scales within RTOL (exact zeros where eager has padding)."""
    width = width_of(layout, dtype)
    got, want = got.cpu().view(-1, width), want.cpu().view(-1, width)
    signs = (layout.capacity + 7) // 8
    tail = signs + layout.max_blocks * itemsize(dtype)
    assert torch.equal(got[:, :signs], want[:, :signs]), "sign bytes differ"
    assert torch.equal(got[:, tail:], want[:, tail:]), "padding after the scales differs"
    torch.testing.assert_close(scales_of(got, layout, dtype), scales_of(want, layout, dtype), rtol=RTOL[dtype], atol=0)


def assert_bits_equal(got, want):
    """Equal bit patterns (distinguishes -0.0 from 0.0)."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    view = torch.int32 if got.dtype == torch.float32 else torch.int64
    assert torch.equal(got.view(view), want.view(view))


def assert_state_close(got, want, c):
    """A state updated by ``c`` with scales within RTOL: off by at most RTOL of ``c`` plus a rounding."""
    rtol = RTOL[want.dtype]
    atol = 2 * rtol * c.abs().max().item() if c.numel() else 0.0
    torch.testing.assert_close(got.cpu(), want, rtol=2 * rtol, atol=atol)


def data(numel, dtype, seed, zeros=True):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(numel, generator=gen, dtype=dtype) * torch.rand(numel, generator=gen, dtype=dtype) * 100
    h = torch.randn(numel, generator=gen, dtype=dtype)
    if zeros and numel > 5:
        g[::97] = h[::97]  # zero deltas: sign(0) = +1
        g[5], h[5] = -0.0, 0.0  # -0.0 - 0.0 = -0.0: also +1 (eager tests x >= 0)
    return g, h


def dev(*ts):
    return [t.to(DEVICE, copy=True) for t in ts]


def decoded_shards(wire, layout, norm, dtype):
    width = width_of(layout, dtype)
    rows = wire.cpu().view(-1, width)
    return torch.cat([eager_decode(layout, norm, rows[j], j, dtype) for j in range(layout.world_size)])


# (numel, world, block, tile): blocks of 8, 16, 24 (not a power of two), 2048; one-block shards;
# shard lengths that are not multiples of 8 (numel not a multiple of 8 * world); an empty shard;
# tile=64/256 forces the chunked path (block sums over several programs) on small sizes. The last
# three have every shard a multiple of 8 long (the kernels' ``EVEN`` variant: 16-byte loads on a GPU).
LAYOUTS = [
    (1000, 1, 8, None),
    (1003, 3, 16, None),
    (2001, 2, 24, None),
    (10_007, 2, 2048, None),
    (5003, 3, None, None),
    (4099, 2, 1024, 64),
    (5003, 3, None, 256),
    (2, 3, 8, None),
    (3072, 3, 24, None),
    (4096, 2, 1024, 64),
    (6000, 3, None, 256),
]


@pytest.mark.parametrize("numel,world,block,tile", LAYOUTS)
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_markov_worker_step(numel, world, block, tile, norm):
    layout, dtype = ShardLayout(numel, world, block), torch.float32
    g, h = data(numel, dtype, numel)
    want_wire, c = exchange_for(layout, norm).encode_up(g - h, step=1, group=0)
    g_d, h_d = dev(g, h)
    wire = tx.markov_worker_step(g_d, h_d, layout, width_of(layout, dtype), norm=norm, tile=tile)
    assert wire.dtype == torch.uint8 and wire.numel() == world * width_of(layout, dtype)
    assert_wire_matches(wire, want_wire, layout, dtype)
    # h moved by exactly what every receiver decodes from the kernel's bytes; close to eager's h + c
    assert_bits_equal(h_d, h + decoded_shards(wire, layout, norm, dtype))
    assert_state_close(h_d, h + c, c)


@pytest.mark.parametrize(
    "numel,world,block,tile,norm,scope,dtype",
    [
        (1003, 3, 16, None, "l2", "tensor", torch.float32),  # upstream OnebitAdam: one worker scale
        (5003, 2, None, None, "l2", "tensor", torch.float32),
        (4099, 2, 1024, 64, "l2", "tensor", torch.float32),
        (1003, 3, 16, None, "l2", "block", torch.float32),
        (5003, 3, None, 256, "l1", "block", torch.float32),
        (2001, 2, 24, None, "l2", "block", torch.float64),
        (2, 3, None, None, "l2", "tensor", torch.float32),  # an empty shard still carries the tensor scale
    ],
)
def test_ef_worker_step(numel, world, block, tile, norm, scope, dtype):
    layout = ShardLayout(numel, world, block)
    x, e = data(numel, dtype, numel + 1)
    p = x + e
    want_wire, c = exchange_for(layout, norm, scope, "error_feedback").encode_up(p, step=1, group=0)
    x_d, e_d = dev(x, e)
    wire = tx.ef_worker_step(x_d, e_d, layout, width_of(layout, dtype), norm=norm, scope=scope, tile=tile)
    assert_wire_matches(wire, want_wire, layout, dtype)
    assert_bits_equal(e_d, p - decoded_shards(wire, layout, norm, dtype))
    assert_state_close(e_d, p - c, c)


@pytest.mark.parametrize("scope", ["block", "tensor"])
def test_markov_worker_step_scopes_and_fp64(scope):
    layout, dtype = ShardLayout(3001, 2, 16), torch.float64
    g, h = data(3001, dtype, 7)
    want_wire, _ = exchange_for(layout, "l1", scope).encode_up(g - h, step=1, group=0)
    g_d, h_d = dev(g, h)
    wire = tx.markov_worker_step(g_d, h_d, layout, width_of(layout, dtype), norm="l1", scope=scope)
    assert_wire_matches(wire, want_wire, layout, dtype)
    assert_bits_equal(h_d, h + decoded_shards(wire, layout, "l1", dtype))


@pytest.mark.parametrize("numel,world,block,tile", LAYOUTS)
def test_markov_encode_server_message(numel, world, block, tile):
    layout, dtype = ShardLayout(numel, world, block), torch.float32
    ghat_full, gtil = data(numel, dtype, 3 * numel)
    for j in range(world):
        sl = layout.shard_slice(j)
        ghat, gt = ghat_full[sl].clone(), gtil[sl].clone()
        want, _ = exchange_for(layout, "l1")._encode(ghat - gt, j, 0)
        ghat_d, gt_d = dev(ghat, gt)
        got = tx.markov_encode(ghat_d, gt_d, layout, j, width_of(layout, dtype), tile=tile)
        assert got.numel() == width_of(layout, dtype)
        assert_wire_matches(got, want, layout, dtype)
        assert_bits_equal(ghat_d, ghat)  # nothing updated
        assert_bits_equal(gt_d, gt)


def random_messages(layout, norm, shard, count, dtype, seed):
    """``count`` eager wire messages of shard ``shard`` (as ranks 0..count-1 would send them)."""
    ex = exchange_for(layout, norm)
    size = layout.shard_sizes[shard]
    gen = torch.Generator().manual_seed(seed)
    rows = [ex._encode(torch.randn(size, generator=gen, dtype=dtype) * (k + 1), shard, 0)[0] for k in range(count)]
    return torch.stack(rows)


@pytest.mark.parametrize("numel,world,block,tile", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_mean_add_bit_exact(numel, world, block, tile, dtype):
    """The server's ghat += mean_i C_i: bit for bit the eager mean_in_rank_order (1, 2 and 3 messages)."""
    layout = ShardLayout(numel, world, block)
    for j in range(world):
        for count in sorted({1, world, 3}):
            msgs = random_messages(layout, "l1", j, count, dtype, seed=10 * j + count)
            out = torch.randn(layout.shard_sizes[j], generator=torch.Generator().manual_seed(j), dtype=dtype)
            pieces = [eager_decode(layout, "l1", m, j, dtype) for m in msgs]
            want = out + mean_in_rank_order(pieces) if pieces[0].numel() else out
            out_d, msgs_d = dev(out, msgs)
            tx.decode_mean_add(msgs_d, out_d, layout, j, tile=tile)
            assert_bits_equal(out_d, want)


@pytest.mark.parametrize("numel,world,block,tile", LAYOUTS)
@pytest.mark.parametrize("accumulate", [True, False])
def test_decode_shards_bit_exact(numel, world, block, tile, accumulate):
    """The workers' gtil += ctil (and error feedback's ctil), every shard from the gathered bytes."""
    layout, dtype = ShardLayout(numel, world, block), torch.float32
    msgs = torch.cat([random_messages(layout, "l2", j, 1, dtype, seed=j) for j in range(world)])
    msgs[:, 0] = 0  # negative signs too
    out = torch.randn(numel, generator=torch.Generator().manual_seed(1), dtype=dtype)
    full = torch.cat([eager_decode(layout, "l2", msgs[j], j, dtype) for j in range(world)])
    want = out + full if accumulate else full
    out_d, msgs_d = dev(out, msgs)
    tx.decode_shards(msgs_d, out_d, layout, accumulate=accumulate, tile=tile)
    assert_bits_equal(out_d, want)


@pytest.mark.parametrize("numel,world,block,tile", [(1003, 3, 16, None), (5003, 2, None, 256), (2001, 3, 2048, None)])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_ef_server_step(numel, world, block, tile, norm):
    """q = ebar + mean_i C_i bit for bit; wire = C(q) (signs exact, scales RTOL); ebar = q - C(q) from the bytes."""
    layout, dtype = ShardLayout(numel, world, block), torch.float32
    width = width_of(layout, dtype)
    for j in range(world):
        msgs = random_messages(layout, norm, j, world, dtype, seed=j)
        ebar = torch.randn(layout.shard_sizes[j], generator=torch.Generator().manual_seed(5 + j), dtype=dtype)
        q = mean_in_rank_order([eager_decode(layout, norm, m, j, dtype) for m in msgs]) + ebar
        want, _ = exchange_for(layout, norm)._encode(q, j, 0)
        ebar_d, msgs_d = dev(ebar, msgs)
        wire = tx.ef_server_step(msgs_d, ebar_d, layout, j, width, norm=norm, tile=tile)
        assert_wire_matches(wire, want, layout, dtype)
        assert_bits_equal(ebar_d, q - eager_decode(layout, norm, wire.cpu(), j, dtype))


def test_sign_encode_is_the_plain_compressor():
    layout, dtype = ShardLayout(3001, 3, 16), torch.float32
    x, _ = data(3001, dtype, 11)
    want, _ = exchange_for(layout, "l2").encode_up(x, step=1, group=0)
    got = tx.sign_encode(*dev(x), layout, width_of(layout, dtype), norm="l2")
    assert_wire_matches(got, want, layout, dtype)


def test_nan_delta():
    """A NaN: its sign bit is 0 (as torch's x >= 0), its block's scale NaN, other blocks untouched."""
    layout, dtype = ShardLayout(64, 1, 8), torch.float32
    g, h = torch.randn(64), torch.zeros(64)
    g[3] = float("nan")
    want_wire, c = exchange_for(layout, "l1").encode_up(g - h, step=1, group=0)
    g_d, h_d = dev(g, h)
    wire = tx.markov_worker_step(g_d, h_d, layout, width_of(layout, dtype))
    signs = (layout.capacity + 7) // 8
    assert torch.equal(wire.cpu()[:signs], want_wire[:signs])
    got, want = scales_of(wire.cpu().view(1, -1), layout, dtype), scales_of(want_wire.view(1, -1), layout, dtype)
    torch.testing.assert_close(got, want, rtol=RTOL[dtype], atol=0, equal_nan=True)
    assert h_d.cpu()[:8].isnan().all() and not h_d.cpu()[8:].isnan().any()


def test_reduction_loops_over_many_chunks(monkeypatch):
    """A block's scale from more partial sums than one step of the group program adds."""
    monkeypatch.setattr(tx, "REDUCE_CHUNK", 4)
    layout, dtype = ShardLayout(1500, 2, None), torch.float32
    g, h = data(1500, dtype, 3)
    want_wire, _ = exchange_for(layout, "l2", "tensor").encode_up(g - h, step=1, group=0)
    g_d, h_d = dev(g, h)
    wire = tx.markov_worker_step(g_d, h_d, layout, width_of(layout, dtype), norm="l2", scope="tensor", tile=16)
    assert tx.plan(layout, DEVICE, 16).num_units > 4 * 4
    assert_wire_matches(wire, want_wire, layout, dtype)


@pytest.mark.parametrize("numel,world,block,tile", LAYOUTS + [(100, 2, 4096, None), (0, 2, 8, None)])
def test_plan_tables_cover_every_coordinate_once(numel, world, block, tile):
    layout = ShardLayout(numel, world, block)
    p = tx.plan(layout, DEVICE, tile)
    assert p is tx.plan(layout, DEVICE, tile)  # cached
    assert p.unit_start.device.type == torch.device(DEVICE).type and p.unit_start.dtype == torch.int64
    covered = torch.zeros(numel, dtype=torch.int64)
    starts, shards, blks = p.unit_start.cpu().tolist(), p.unit_shard.cpu().tolist(), p.unit_blk.cpu().tolist()
    for start, j, blk in zip(starts, shards, blks):
        size, beff = layout.shard_sizes[j], block or max(layout.shard_sizes[j], 1)
        assert p.shard_even[j] == (size % 8 == 0 and layout.shard_offsets[j] % 8 == 0)
        for r in range(p.rows):
            row = start + r * p.row_stride
            assert row % 8 == 0 and blk + r == row // beff  # what the kernels assume and read
            end = min((row // beff + 1) * beff, size, row + p.row_width)
            if row < end:
                covered[layout.shard_offsets[j] + row : layout.shard_offsets[j] + end] += 1
                if p.shard_even[j]:  # EVEN launches promise the compiler row lengths in whole groups of 8
                    assert (end - row) % 8 == 0
    assert torch.equal(covered, torch.ones(numel, dtype=torch.int64))
    assert p.shard_units[-1] == len(starts) and p.shard_groups[-1] == len(layout.block_sizes())


def test_tuned_tile_warps_and_vector_loads_change_no_bit_and_are_restored():
    """``tuned`` (what benchmarks/gpu_tune.py sweeps): the same sign bytes as the tile passed explicitly (the
    chunked path at tile 64), and scales and state up to the scales' summation order (on a GPU, warps and the
    ``EVEN`` variant's 16-byte loads change how a block's sum is split over threads; the interpreter sums
    alike: bit for bit there), with or without ``EVEN`` (every shard here is a multiple of 8 long); all
    knobs restored, also after an error."""
    layout, dtype = ShardLayout(4096, 2, 1024), torch.float32
    g, h = data(4096, dtype, 7)
    g_d, h_ref = dev(g, h)
    want = tx.markov_worker_step(g_d, h_ref, layout, width_of(layout, dtype), tile=64)
    for warps, vector in ((2, True), (None, False)):
        h_d = dev(h)[0]
        with tx.tuned(tile=64, num_warps=warps, vector_loads=vector):
            p = tx.plan(layout, DEVICE)
            assert p.tile == 64 and tx._num_warps(p) == (warps or 4) and tx._even(p, None) == vector
            wire = tx.markov_worker_step(g_d, h_d, layout, width_of(layout, dtype))
        assert_wire_matches(wire, want, layout, dtype)
        assert_state_close(h_d, h_ref.cpu(), h_ref.cpu() - h)
        if DEVICE == "cpu":
            assert torch.equal(wire.cpu(), want.cpu()) and torch.equal(h_d.cpu(), h_ref.cpu())
    assert (tx.TILE, tx.NUM_WARPS, tx.VECTOR_LOADS) == (4096, None, True)
    with pytest.raises(RuntimeError, match="inside"), tx.tuned(tile=128, num_warps=16, vector_loads=False):
        raise RuntimeError("inside")
    assert (tx.TILE, tx.NUM_WARPS, tx.VECTOR_LOADS) == (4096, None, True)
    with pytest.raises(ValueError, match="Invalid tile=100"), tx.tuned(tile=100):
        pass
    with pytest.raises(ValueError, match="Invalid num_warps=3"), tx.tuned(num_warps=3):
        pass


def test_bad_arguments_are_named():
    layout = ShardLayout(64, 2, 8)
    g = torch.zeros(64, device=DEVICE)
    with pytest.raises(ValueError, match="wire_width=3 is too small"):
        tx.markov_worker_step(g, g.clone(), layout, 3)
    with pytest.raises(ValueError, match="Invalid norm='l3'"):
        tx.markov_worker_step(g, g.clone(), layout, width_of(layout, torch.float32), norm="l3")
    with pytest.raises(ValueError, match="buffers of 64 coordinates"):
        tx.markov_worker_step(g[:10], g[:10].clone(), layout, width_of(layout, torch.float32))
    with pytest.raises(ValueError, match="fp32 or fp64"):
        tx.markov_worker_step(g.half(), g.half(), layout, width_of(layout, torch.float32))
    with pytest.raises(ValueError, match="block_size None or a multiple of 8"):
        tx.plan(ShardLayout(64, 2, 12), DEVICE)


# ------------------------------------------------------------------------------------------------
# whole exchanges on 1-3 ranks through exchange.py's dispatch


def _run(scheme, norm, scope, layout, steps, use_triton, monkeypatch):
    world, dtype = layout.world_size, torch.float32
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "auto" if use_triton else "eager")
    if DEVICE == "cpu":
        monkeypatch.setattr(tx, "_on_gpu", lambda t: True)  # the interpreter stands in for the GPU
    calls = []
    name = {"markov": "run_markov", "error_feedback": "run_error_feedback"}[scheme]
    real = getattr(tx, name)
    monkeypatch.setattr(tx, name, lambda *a, **k: calls.append(1) or real(*a, **k))

    def rank(r, transport):
        ex = make_exchange(scheme, transport, layout, COMPRESSORS[norm](worker_scale_scope=scope))
        state: dict = {}
        like = torch.zeros(layout.numel, dtype=dtype, device=DEVICE)
        ex.init_state(state, like)
        outs = []
        for t in range(steps):
            x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(100 * t + r), dtype=dtype) * (t + 1)
            outs.append(ex.exchange(x.to(DEVICE), state, step=t, group=0).clone().cpu())
        states = {k: v.clone().cpu() for k, v in state.items() if torch.is_tensor(v)}
        return outs, states, ex.stats.bytes_up, ex.stats.bytes_down

    results = InProcessWorld(world, device=DEVICE).run(rank)
    assert len(calls) == (world * steps if use_triton else 0)
    return results


def _mostly_close(got, want):
    """Equal up to scale rounding, except where a rounding flipped a near-zero sign (a handful of coordinates)."""
    tol = 1e-5 * max(want.abs().max().item(), 1.0)
    bad = ((got - want).abs() > tol).sum().item()
    assert bad <= max(2, want.numel() // 200), f"{bad} of {want.numel()} coordinates differ by more than {tol}"


@pytest.mark.parametrize(
    "scheme,norm,scope,numel,world,block",
    [
        ("markov", "l1", "block", 2003, 1, 8),
        ("markov", "l1", "block", 3001, 2, 2048),
        ("markov", "l1", "block", 3001, 3, None),
        ("markov", "l2", "tensor", 1003, 3, 16),
        ("error_feedback", "l2", "tensor", 3001, 2, None),
        ("error_feedback", "l2", "block", 2003, 3, 16),
        ("error_feedback", "l1", "block", 1003, 1, 24),
    ],
)
def test_exchange_matches_eager_and_ranks_agree(monkeypatch, scheme, norm, scope, numel, world, block):
    layout, steps = ShardLayout(numel, world, block), 3
    fused = _run(scheme, norm, scope, layout, steps, True, monkeypatch)
    eager = _run(scheme, norm, scope, layout, steps, False, monkeypatch)
    for r in range(world):
        # what every rank receives is decoded from the same gathered bytes: identical on all ranks
        for t in range(steps):
            assert_bits_equal(fused[r][0][t], fused[0][0][t])
            _mostly_close(fused[r][0][t], eager[r][0][t])
        assert fused[r][1].keys() == eager[r][1].keys()
        for key in fused[r][1]:
            _mostly_close(fused[r][1][key], eager[r][1][key])
        assert fused[r][2:] == eager[r][2:]  # the same bytes on the wire
    if scheme == "markov":
        for r in range(world):
            assert_bits_equal(fused[r][1][DOWN_MARKOV_STATE], fused[0][1][DOWN_MARKOV_STATE])
        assert {MARKOV_STATE, SERVER_MARKOV_STATE} <= fused[0][1].keys()
    else:
        assert {WORKER_ERROR, SERVER_ERROR} <= fused[0][1].keys()


@pytest.mark.parametrize("name", ["cdadam", "onebit"])
def test_optimizers_take_the_triton_path(monkeypatch, name):
    """CD-Adam and 1-bit Adam (compressed phase) steps through the kernels: parameters equal on every
    rank, and close to the eager run's."""
    from deepspeed_cdadam import CDAdam, OneBitAdam

    numel, world, steps = 3001, 2, 4

    def run(use_triton):
        monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "auto" if use_triton else "eager")
        calls = []
        for runner in ("run_markov", "run_error_feedback"):
            real = getattr(tx, runner)
            monkeypatch.setattr(tx, runner, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))

        def rank(r, transport):
            p = torch.nn.Parameter(torch.linspace(-1, 1, numel, device=DEVICE))
            if name == "cdadam":
                opt = CDAdam([p], lr=1e-2, block_size=64, transport=transport)
            else:
                opt = OneBitAdam([p], lr=1e-2, freeze_step=1, worker_scale_scope="tensor", transport=transport)
            for t in range(steps):
                grad = torch.randn(numel, generator=torch.Generator().manual_seed(100 * t + r))
                p.grad = grad.to(DEVICE)
                opt.step()
            return p.detach().cpu().clone()

        out = InProcessWorld(world, device=DEVICE).run(rank)
        assert (len(calls) > 0) == use_triton
        return out

    if DEVICE == "cpu":
        monkeypatch.setattr(tx, "_on_gpu", lambda t: True)
    fused, eager = run(True), run(False)
    assert_bits_equal(fused[1], fused[0])
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=1e-5)
