"""LIEC-SGD: the distributed optimizer == the plain reference written from the authors' code
(deepspeed_cdadam/references/liec_sgd.py) at 1-4 ranks in-process and on gloo; the spec's
invariants; the schedule agreed in the control message; per-rank state, consistency check and
exact resume between averages; bytes per step counted exactly; config errors naming the key."""

from __future__ import annotations

import copy
import inspect
import io
import re
from dataclasses import fields

import pytest
import torch

from deepspeed_cdadam import InProcessWorld, LIECSGD, TorchDistributedTransport, get_compressor
from deepspeed_cdadam.checkpoint import load_rank_state, save_rank_state
from deepspeed_cdadam.comm.accounting import all_gather_bytes_sent, all_reduce_bytes_sent, all_to_all_bytes_sent
from deepspeed_cdadam.config import CDAdamConfig, LIECSGDConfig, field_names
from deepspeed_cdadam.liec_exchange import ImmediateCompensationExchange, ScaleBucketLayout, take_tensors
from deepspeed_cdadam.optim.base import RANK_STATE_TAG
from deepspeed_cdadam.references.liec_sgd import LIECSGDReference, scaled_sign, take_tensors_buckets
from deepspeed_cdadam.schedule import ScheduleMismatchError, StepKind
from deepspeed_cdadam.types import MASTER_PARAMS, MOMENTUM_BUFFER, SERVER_ERROR, SERVER_ESTIMATE
from tests.distributed import spawn

# Two parameter groups (38 + 15 coordinates) with their own lr, momentum and weight decay: one
# communication bucket. bucket_size 96 bytes (12 fp64 coordinates) makes four scale buckets of the
# tensors [35], [3], [11], [4]: the first spans the server shards at every world size > 1.
SHAPES = [[(5, 7), (3,)], [(11,), (2, 2)]]
SIZES = [35, 3, 11, 4]
HPARAMS = [{"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}, {"lr": 0.02, "momentum": 0.0, "weight_decay": 0.0}]
BUCKET_SIZE = 96
H = 4
STEPS = 13  # averaging steps 4, 8, 12; compressed between


def initial(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(1), dtype=dtype)


def gradient(rank: int, step: int, x: torch.Tensor) -> torch.Tensor:
    """Depends on the rank, the step and the rank's own model (so any divergence grows)."""
    g = torch.randn(x.numel(), generator=torch.Generator().manual_seed(100 * step + rank), dtype=torch.float64)
    return (g * (1 + x.detach().double().abs())).to(x.dtype)


def per_coordinate(key: str) -> torch.Tensor:
    return torch.cat([torch.full((n,), HPARAMS[g][key], dtype=torch.float64) for g, n in enumerate((38, 15))])


def build(transport, dtype=torch.float64, hparams=HPARAMS, device="cpu", **kwargs):
    flat = initial(dtype).to(device)
    shapes = [s for group in SHAPES for s in group]
    params = [torch.nn.Parameter(t.reshape(s).clone()) for t, s in zip(flat.split(SIZES), shapes)]
    groups = [{"params": params[:2], **hparams[0]}, {"params": params[2:], **hparams[1]}]
    kwargs = {"average_period": H, "bucket_size": BUCKET_SIZE, **kwargs}
    return params, LIECSGD(groups, transport=transport, **kwargs)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def train(params, opt, rank, first, last, history=None):
    for t in range(first, last + 1):
        g = gradient(rank, t, flat(params))
        for p, gp in zip(params, g.split(SIZES)):
            p.grad = gp.reshape(p.shape).clone()
        opt.step()
        if history is not None:
            history.append(flat(params).double())
    return history


def run_distributed(rank, transport, steps=STEPS, **kwargs):
    params, opt = build(transport, **kwargs)
    return train(params, opt, rank, 1, steps, []), opt


def run_reference(world_size, steps=STEPS, **kwargs):
    ref = LIECSGDReference(
        initial(),
        world_size,
        tensor_sizes=SIZES,
        bucket_size=BUCKET_SIZE,
        lr=per_coordinate("lr"),
        momentum=per_coordinate("momentum"),
        weight_decay=per_coordinate("weight_decay"),
        average_period=H,
        **kwargs,
    )
    return [ref.step([gradient(r, t, ref.x[r]) for r in range(world_size)]) for t in range(1, steps + 1)], ref


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


# --- equal to the reference --------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_matches_reference_in_process(world_size):
    out = InProcessWorld(world_size).run(lambda r, tr: run_distributed(r, tr)[0])
    expected, _ = run_reference(world_size)
    for rank in range(world_size):
        for t in range(STEPS):
            assert max_rel_diff(out[rank][t], expected[t][rank]) <= 1e-12, (rank, t + 1)
    if world_size > 1:  # the models differ between averages, and the reference agrees on how
        assert not torch.equal(out[0][H - 2], out[1][H - 2])
        assert max_rel_diff(out[0][H - 2], out[1][H - 2]) > 1e-3


def test_sign_l2_matches_the_reference_with_l2_scales():
    """compressor="sign_l2": one scale ||x_b||_2 / sqrt(d_b) per scale bucket both ways."""

    def l2_sign(v):
        return (v.pow(2).sum().sqrt() / v.numel() ** 0.5) * torch.where(v >= 0, 1.0, -1.0).to(v.dtype)

    out = InProcessWorld(3).run(lambda r, tr: run_distributed(r, tr, steps=6, compressor="sign_l2")[0])
    expected, _ = run_reference(3, steps=6, compressor=l2_sign)
    for t in range(6):
        for rank in range(3):
            assert max_rel_diff(out[rank][t], expected[t][rank]) <= 1e-12, (rank, t + 1)
    l1 = InProcessWorld(3).run(lambda r, tr: run_distributed(r, tr, steps=6)[0])
    assert max_rel_diff(out[0][5], l1[0][5]) > 1e-6


def test_the_scale_buckets_change_the_result():
    """bucket_size really sets the scale buckets: one bucket of everything gives other iterates."""
    one = InProcessWorld(2).run(lambda r, tr: run_distributed(r, tr, steps=3, bucket_size=None)[0])
    four = InProcessWorld(2).run(lambda r, tr: run_distributed(r, tr, steps=3)[0])
    assert max_rel_diff(one[0][2], four[0][2]) > 1e-6


def test_identity_compressor_is_synchronous_sgd():
    """Spec: with an identity compressor (top-k keeping every coordinate) r_i = 0 and e_s = 0, and
    LIEC-SGD is torch.optim.SGD on the mean gradient on every rank, bit for bit."""
    identity = get_compressor("topk", ratio=1.0)

    def worker(rank, tr):
        params, opt = build(tr, compressor=identity)
        train(params, opt, rank, 1, STEPS)
        errors = [opt.bucket_state(b)[SERVER_ERROR] for b in opt.buckets()]
        return flat(params), errors

    out = InProcessWorld(2).run(worker)
    shapes = [s for group in SHAPES for s in group]
    params = [torch.nn.Parameter(t.reshape(s).clone()) for t, s in zip(initial().split(SIZES), shapes)]
    sgd = torch.optim.SGD([{"params": params[:2], **HPARAMS[0]}, {"params": params[2:], **HPARAMS[1]}])
    for t in range(1, STEPS + 1):
        x = flat(params)
        mean = (gradient(0, t, x) + gradient(1, t, x)) / 2
        for p, gp in zip(params, mean.split(SIZES)):
            p.grad = gp.reshape(p.shape).clone()
        sgd.step()
    for rank in range(2):
        assert torch.equal(out[rank][0], flat(params)), rank
        assert all(not e.any() for e in out[rank][1])


def _gloo_worker(rank, world_size, out_dir):
    history, opt = run_distributed(rank, TorchDistributedTransport(timeout_s=60))
    torch.save({"history": history, "stats": opt.comm_stats}, f"{out_dir}/{rank}.pt")


@pytest.mark.parametrize("world_size", [3])  # 2 gloo ranks: tests/integration/test_liec_sgd_launcher.py
def test_matches_reference_on_gloo(tmp_path, world_size):
    spawn(_gloo_worker, world_size, str(tmp_path))
    expected, _ = run_reference(world_size)
    for rank in range(world_size):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        for t in range(STEPS):
            assert max_rel_diff(got["history"][t], expected[t][rank]) <= 1e-12, (rank, t + 1)
        assert got["stats"].bytes_sent == _expected_bytes(world_size, STEPS)


# --- the spec's invariants -----------------------------------------------------------------------
def test_take_tensors_partition_is_torchs():
    """Scale buckets = torch._utils._take_tensors' byte semantics (zero-size tensors, tensors above
    the limit, a limit hit exactly)."""
    numels = [0, 5, 30, 1, 0, 12, 12, 100, 3, 0, 24]
    for limit in (1, 4, 48, 96, 100, 400, 10_000):
        tensors = [torch.empty(n) for n in numels]
        index = {id(t): i for i, t in enumerate(tensors)}
        torchs = [[index[id(t)] for t in bucket] for bucket in torch._utils._take_tensors(tensors, limit)]
        assert take_tensors(numels, 4, limit) == torchs, limit
    assert take_tensors(numels, 4, None) == [list(range(len(numels)))]


def test_scale_bucket_layout_cuts_buckets_at_shard_boundaries():
    layout = ScaleBucketLayout(53, 3, bucket_sizes=(35, 3, 11, 4))  # shards 18, 18, 17
    assert [layout.shard_blocks(j) for j in range(3)] == [(18,), (17, 1), (2, 11, 4)]
    assert [layout.block_buckets(j) for j in range(3)] == [(0,), (0, 1), (1, 2, 3)]
    assert layout.max_blocks == 3
    assert ScaleBucketLayout(2, 4, bucket_sizes=(2,)).shard_blocks(3) == (0,)  # an empty shard
    with pytest.raises(ValueError, match=re.escape("Invalid bucket_sizes=(35, 3): must be ints >= 1 adding up")):
        ScaleBucketLayout(53, 3, bucket_sizes=(35, 3))


def _full_server_error(states) -> torch.Tensor:
    """e_s over the whole bucket: the servers' shards, rank after rank."""
    return torch.cat([s[SERVER_ERROR] for s in states])


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_virtual_sequence(world_size):
    """Spec (momentum 0, weight decay 0, constant lr): xtil = mean_i x_i - lr e_s satisfies
    xtil_{t+1} = xtil_t - lr mean_i g_i^t on compressed and averaging steps alike; on the
    distributed optimizer (e_s gathered from the server shards) and on the reference."""
    lr = 0.05
    plain = [{"lr": lr, "momentum": 0.0, "weight_decay": 0.0}] * 2

    def worker(rank, tr):
        params, opt = build(tr, hparams=plain)
        (bucket,) = opt.buckets()
        out = []
        for t in range(1, 2 * H + 2):
            x = flat(params)
            g = gradient(rank, t, x)
            out.append((x, g))
            for p, gp in zip(params, g.split(SIZES)):
                p.grad = gp.reshape(p.shape).clone()
            opt.step()
            out[-1] += ({SERVER_ERROR: opt.bucket_state(bucket)[SERVER_ERROR].clone()},)
        return out

    runs = InProcessWorld(world_size).run(worker)
    xtil = initial().clone()  # e_s = 0 at the start
    for t in range(2 * H + 1):
        mean_g = sum(runs[r][t][1] for r in range(world_size)) / world_size
        xtil = xtil - lr * mean_g
        x_next = runs[0][t + 1][0] if t + 1 < 2 * H + 1 else None
        e_s = _full_server_error([runs[r][t][2] for r in range(world_size)])
        if x_next is not None:
            mean_x = sum(runs[r][t + 1][0] for r in range(world_size)) / world_size
            assert torch.allclose(mean_x - lr * e_s, xtil, rtol=0, atol=1e-12), t + 1
    # the reference, on its own gradients
    ref = LIECSGDReference(initial(), world_size, tensor_sizes=SIZES, bucket_size=BUCKET_SIZE, lr=lr, average_period=H)
    xtil = initial().clone()
    for t in range(1, 3 * H + 1):
        grads = [gradient(r, t, ref.x[r]) for r in range(world_size)]
        ref.step(grads)
        xtil = xtil - lr * sum(grads) / world_size
        e_s = torch.cat(ref.server_error)
        assert torch.allclose(sum(ref.x) / world_size - lr * e_s, xtil, rtol=0, atol=1e-12), t


def _exchange_world(world_size, numel=53, buckets=(35, 3, 11, 4)):
    """Each rank's ImmediateCompensationExchange and state, for direct calls."""
    layout = ScaleBucketLayout(numel, world_size, bucket_sizes=buckets)

    def make(tr):
        ex = ImmediateCompensationExchange(tr, layout, get_compressor("scaled_sign"))
        state: dict = {}
        ex.init_state(state, torch.zeros(numel, dtype=torch.float64))
        return ex, state

    return make


def test_compensation_and_server_identities():
    """Per step: every rank decodes the same chat (server_estimate); the result is chat + r_i with
    r_i = g_i - C(g_i) computed from g_i alone (no residual carried); the server keeps
    mean_i C(g_i) + e_s_old = chat + e_s_new; C has one scale per scale bucket both ways."""
    n, buckets = 3, (35, 3, 11, 4)
    make = _exchange_world(n)
    grads = {(r, t): torch.randn(53, generator=torch.Generator().manual_seed(7 * t + r), dtype=torch.float64)
             for r in range(n) for t in range(4)}  # fmt: skip

    def per_bucket(fn, v):
        parts, start = [], 0
        for size in buckets:
            parts.append(fn(v[start : start + size]))
            start += size
        return torch.cat(parts)

    def worker(rank, tr):
        ex, state = make(tr)
        out = []
        for t in range(4):
            before = state[SERVER_ERROR].clone()
            result = ex.exchange(grads[rank, t], state, step=t + 1)
            out.append((result, state[SERVER_ESTIMATE].clone(), before, state[SERVER_ERROR].clone()))
        return out

    runs = InProcessWorld(n).run(worker)
    for t in range(4):
        chat = runs[0][t][1]
        for r in range(n):
            assert torch.equal(runs[r][t][1], chat)  # identical on every rank
            r_i = grads[r, t] - per_bucket(scaled_sign, grads[r, t])
            assert torch.allclose(runs[r][t][0], chat + r_i, rtol=0, atol=1e-13)
        mean_c = sum(per_bucket(scaled_sign, grads[r, t]) for r in range(n)) / n
        e_old = torch.cat([runs[r][t][2] for r in range(n)])
        e_new = torch.cat([runs[r][t][3] for r in range(n)])
        assert torch.allclose(mean_c + e_old, chat + e_new, rtol=0, atol=1e-13)
        assert torch.allclose(chat, per_bucket(scaled_sign, mean_c + e_old), rtol=0, atol=1e-13)
        assert e_new.abs().sum() > 0
    # the worker part does not depend on the history: a fresh exchange gives the same r_i
    fresh = InProcessWorld(n).run(lambda r, tr: make(tr)[0].exchange(grads[r, 3], make(tr)[1], step=4))
    for r in range(n):
        assert torch.allclose(fresh[r] - runs[r][3][0], fresh[0] - runs[0][3][0], rtol=0, atol=1e-13)


def test_averaging_makes_ranks_identical_and_flushes_the_server_error():
    """Spec: after an averaging step with momentum 0 all x_i are equal and e_s = 0; between
    averages they differ; the rank-identical server_estimate is then the averaged gradient."""
    plain = [{"lr": 0.05, "momentum": 0.0, "weight_decay": 1e-2}] * 2

    def worker(rank, tr):
        params, opt = build(tr, hparams=plain)
        seen = []
        for t in range(1, H + 2):
            train(params, opt, rank, t, t)
            state = opt.bucket_state(opt.buckets()[0])
            seen.append((flat(params), state[SERVER_ERROR].clone(), opt.parameters_identical_now()))
        return seen

    out = InProcessWorld(3).run(worker)
    for t in range(H + 1):
        same = all(torch.equal(out[0][t][0], out[r][t][0]) for r in range(3))
        assert same == (t + 1 == H), t + 1
        assert all(out[r][t][2] == (t + 1 == H) for r in range(3))
        flushed = all(not out[r][t][1].any() for r in range(3))
        assert flushed == (t + 1 == H), t + 1


def test_schedule_is_agreed_in_the_control_message():
    """AVERAGE on steps H, 2H, ...; ranks configured with different periods raise on every rank."""
    opt = LIECSGD([torch.nn.Parameter(torch.zeros(3))], average_period=3, transport=InProcessWorld(1).transports[0])
    kinds = []
    for _ in range(7):
        kinds.append(opt.planned_step())
        opt.param_groups[0]["params"][0].grad = torch.ones(3)
        opt.step()
    assert kinds == [StepKind.COMPRESSED, StepKind.COMPRESSED, StepKind.AVERAGE] * 2 + [StepKind.COMPRESSED]

    def worker(rank, tr):
        p = torch.nn.Parameter(torch.zeros(5))
        opt = LIECSGD([p], average_period=2 + rank, transport=tr)
        for _ in range(3):
            p.grad = torch.ones(5)
            opt.step()

    with pytest.raises(ScheduleMismatchError, match=re.escape("rank 0: AVERAGE, rank 1: COMPRESSED")):
        InProcessWorld(2).run(worker)


def test_consistency_check_compares_only_what_is_rank_identical():
    """consistency_check_every=1 passes while the models differ; it names a corrupted
    server_estimate; right after an averaging step (momentum 0) it compares the parameters."""
    plain = [{"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0}] * 2

    def clean(rank, tr):
        params, opt = build(tr, consistency_check_every=1)
        train(params, opt, rank, 1, STEPS)
        return opt.steps_taken

    assert InProcessWorld(2).run(clean) == [STEPS, STEPS]

    def corrupt_estimate(rank, tr):
        params, opt = build(tr, consistency_check_every=2)
        train(params, opt, rank, 1, 1)
        if rank == 1:
            opt.bucket_state(opt.buckets()[0])[SERVER_ESTIMATE][0] += 1.0
        opt.check_ranks_agree()

    with pytest.raises(RuntimeError, match=re.escape("optimizer state 'server_estimate' of bucket 0")):
        InProcessWorld(2).run(corrupt_estimate)

    def corrupt_parameter(rank, tr, at):
        params, opt = build(tr, hparams=plain)
        train(params, opt, rank, 1, at)
        if rank == 1:
            with torch.no_grad():
                params[2][0] += 1.0
        opt.check_ranks_agree()

    InProcessWorld(2).run(lambda r, tr: corrupt_parameter(r, tr, H - 1))  # between averages: not compared
    with pytest.raises(RuntimeError, match=re.escape("param_groups[1]['params'][0] (shape (11,)) differs")):
        InProcessWorld(2).run(lambda r, tr: corrupt_parameter(r, tr, H))


# --- exact resume, also between averages ----------------------------------------------------------
SAVE_AT = 6  # between the averages at 4 and 8: the ranks' models, momenta and server errors differ


def _straight(rank, tr, dtype=torch.float64):
    params, opt = build(tr, dtype=dtype)
    train(params, opt, rank, 1, STEPS)
    return flat(params)


def test_state_dict_round_trip_is_bit_identical():
    def resumed(rank, tr):
        params, opt = build(tr)
        train(params, opt, rank, 1, SAVE_AT)
        buf = io.BytesIO()
        torch.save({"params": [p.detach().clone() for p in params], "optim": opt.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf)
        params, opt = build(tr)
        with torch.no_grad():
            for p, v in zip(params, saved["params"]):
                p.copy_(v)
        opt.load_state_dict(saved["optim"])
        train(params, opt, rank, SAVE_AT + 1, STEPS)
        return flat(params)

    straight = InProcessWorld(2).run(_straight)
    again = InProcessWorld(2).run(resumed)
    for a, b in zip(straight, again):
        assert torch.equal(a, b)
    assert not torch.equal(straight[0], straight[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rank_files_restore_each_ranks_parameters_bit_identically(tmp_path, dtype):
    """As under DeepSpeed: rank 0's model and state_dict are loaded on every rank, then each rank's
    file (checkpoint.py) restores its own parameters, fp32 master copy (bf16), momentum and server
    error; the run continues bit-identically on every rank from a step between averages."""

    def first_run(rank, tr):
        params, opt = build(tr, dtype=dtype)
        train(params, opt, rank, 1, SAVE_AT)
        save_rank_state(opt, str(tmp_path))
        return [p.detach().clone() for p in params], opt.state_dict()

    rank0_params, rank0_state = InProcessWorld(2).run(first_run)[0]  # what DeepSpeed writes: rank 0's
    assert rank0_state[RANK_STATE_TAG]["keys"] == [MOMENTUM_BUFFER, SERVER_ERROR]

    def resumed(rank, tr):
        params, opt = build(tr, dtype=dtype)
        opt.accept_foreign_rank_state = True  # as the DeepSpeed integration sets it
        with torch.no_grad():
            for p, v in zip(params, rank0_params):
                p.copy_(v)
        opt.load_state_dict(copy.deepcopy(rank0_state))
        with pytest.raises(RuntimeError, match="without its per-rank compression state"):
            opt.step()
        assert load_rank_state(opt, str(tmp_path))
        train(params, opt, rank, SAVE_AT + 1, STEPS)
        return flat(params)

    straight = InProcessWorld(2).run(lambda r, tr: _straight(r, tr, dtype))
    again = InProcessWorld(2).run(resumed)
    for a, b in zip(straight, again):
        assert torch.equal(a, b)
    assert not torch.equal(straight[0], straight[1])
    saved = torch.load(tmp_path / "cdadam_rank1_of_2.pt", weights_only=True)
    assert set(saved["buckets"][0]) == {MOMENTUM_BUFFER, SERVER_ERROR}
    assert (MASTER_PARAMS in saved["parameters"][0]) == (dtype == torch.bfloat16)


# --- bytes per step, counted exactly -----------------------------------------------------------
def _expected_bytes(world_size, steps, numel=53, item=8, buckets=(35, 3, 11, 4)):
    """Every byte of ``steps`` steps of the harness (fp64), from the wire formats."""
    n = world_size
    if n == 1:
        return 0.0
    layout = ScaleBucketLayout(numel, n, bucket_sizes=buckets)
    signs = -(-layout.capacity // 8)
    message = signs + item * layout.max_blocks  # packed signs of the longest shard + its blocks' scales
    compressed = (
        all_to_all_bytes_sent(message, n)  # up
        + all_gather_bytes_sent(message, n)  # down
        + all_gather_bytes_sent(item * len(buckets), n)  # the server scales' partial sums
    )
    average = 2 * all_to_all_bytes_sent(2 * layout.capacity * item, n)  # x and g, up and down
    control = all_reduce_bytes_sent(4 * n, n)  # the step agreement
    averages = steps // H
    return (steps - averages) * compressed + averages * average + steps * control


def test_bytes_per_step_are_counted_exactly():
    for n in (2, 3, 4):
        stats = InProcessWorld(n).run(lambda r, tr: run_distributed(r, tr)[1].comm_stats)
        for s in stats:
            assert s.bytes_sent == _expected_bytes(n, STEPS), n
            assert s.bytes_up + s.bytes_down + s.bytes_control == s.bytes_sent


NUMEL = 1_048_583  # > 1M, not a multiple of 8 * world_size


def ratios_to_fp32(world_size: int) -> dict[str, float]:
    """Bytes one rank sends per step in each direction, over an fp32 ring all-reduce's half
    ((n-1)/n * 4d each way): compressed steps and averaging steps (which average both the model
    and the gradient)."""

    def worker(rank, tr):
        p = torch.nn.Parameter(torch.zeros(NUMEL))
        opt = LIECSGD([p], average_period=2, transport=tr)
        out = []
        for _ in range(2):
            p.grad = torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank))
            before = opt.comm_stats.snapshot()
            opt.step()
            out.append((opt.comm_stats.bytes_up - before.bytes_up, opt.comm_stats.bytes_down - before.bytes_down))
        return out

    (compressed, average) = InProcessWorld(world_size).run(worker)[0]
    half = all_reduce_bytes_sent(4 * NUMEL, world_size) / 2
    return {"compressed_up": compressed[0] / half, "compressed_down": compressed[1] / half,
            "average_up": average[0] / half, "average_down": average[1] / half}  # fmt: skip


@pytest.mark.parametrize("world_size", [2, 4])
def test_compressed_steps_send_a_32nd_of_fp32_and_averages_send_it_in_full(world_size):
    r = ratios_to_fp32(world_size)
    shard = -(-NUMEL // world_size)
    # one fp32 scale per message (one scale bucket: the model is 4 MB < 52428800 bytes)
    wire = -(-shard // 8) + 4
    half = all_reduce_bytes_sent(4 * NUMEL, world_size) / 2
    assert r["compressed_up"] == (world_size - 1) * wire / half
    assert r["compressed_down"] == ((world_size - 1) * wire + (world_size - 1) * 4) / half
    assert 1 / 32 <= r["compressed_up"] <= 1 / 31.99 and 1 / 32 <= r["compressed_down"] <= 1 / 31.99
    # the model and the gradient, each in full: twice an fp32 all-reduce's half each way
    assert r["average_up"] == r["average_down"] == (world_size - 1) * 2 * shard * 4 / half
    assert 2.0 <= r["average_up"] <= 2.0 * (1 + 1e-5)


# --- config --------------------------------------------------------------------------------------
def _p():
    return torch.nn.Parameter(torch.zeros(4))


def _tr():
    return InProcessWorld(1).transports[0]


def test_constructor_parameters_are_the_config_fields_with_the_same_defaults():
    assert LIECSGD.CONFIG is LIECSGDConfig
    parameters = inspect.signature(LIECSGD.__init__).parameters
    objects = {"self", "params", "transport", "process_group"}  # not settings
    settings = {name: p.default for name, p in parameters.items() if name not in objects}
    assert sorted(settings) == sorted(field_names(LIECSGDConfig))
    for f in fields(LIECSGDConfig):
        assert settings[f.name] == f.default, f.name
    built = LIECSGD([_p()], transport=_tr())
    assert built.config == LIECSGDConfig()
    assert set(built.defaults) == {"lr", "momentum", "weight_decay"}
    # the authors' GetArgs defaults
    assert (built.config.lr, built.config.momentum, built.config.weight_decay) == (0.1, 0.0, 5e-4)
    assert (built.config.average_period, built.config.bucket_size, built.config.compressor) == (
        100,
        52428800,
        "scaled_sign",
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"momentum": 1.0}, ValueError, "Invalid momentum=1.0. Must be a number in [0.0, 1.0)."),
        ({"momentum": -0.1}, ValueError, "Invalid momentum=-0.1. Must be a number in [0.0, 1.0)."),
        ({"average_period": 0}, ValueError, "Invalid average_period=0. Must be an int >= 1."),
        ({"average_period": 2.5}, ValueError, "Invalid average_period=2.5. Must be an int >= 1."),
        (
            {"bucket_size": 0},
            ValueError,
            "Invalid bucket_size=0. Must be None (one scale bucket per communication bucket) or an int >= 1.",
        ),
        ({"lr": -1.0}, ValueError, "Invalid lr=-1.0. Must be a finite number >= 0.0."),
        ({"weight_decay": -1.0}, ValueError, "Invalid weight_decay=-1.0. Must be a number >= 0.0."),
        (
            {"block_size": 256},
            ValueError,
            "Invalid block_size=256 for LIECSGD. Must be None: its scales follow bucket_size",
        ),
        ({"scale_blocks": "tensor"}, ValueError, "Invalid scale_blocks='tensor' for LIECSGD. Allowed: fixed"),
        ({"compressor": "sign"}, ValueError, "Unknown compressor='sign'. Allowed: scaled_sign, sign_l2, topk, randk."),
    ],
)
def test_bad_arguments_name_the_key(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        LIECSGD([_p()], transport=_tr(), **kwargs)
    with pytest.raises(error, match=re.escape(message)):
        LIECSGDConfig(**kwargs)


def test_cdadam_refuses_liecs_per_rank_exchange():
    with pytest.raises(ValueError, match=re.escape("Invalid exchange='immediate_compensation': it is LIECSGD's own scheme")):
        CDAdamConfig(exchange="immediate_compensation")  # what CDAdam(exchange=...) builds and checks


def test_reference_buckets_come_from_torch():
    expected = [slice(0, 35), slice(35, 38), slice(38, 49), slice(49, 53)]
    assert take_tensors_buckets(SIZES, BUCKET_SIZE, torch.float64) == expected
    assert take_tensors_buckets(SIZES, None, torch.float64) == [slice(0, 53)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_reference():
    def run(rank, transport):
        params, opt = build(transport, device="cuda")
        history = []
        for t in range(1, STEPS + 1):
            g = gradient(rank, t, flat(params).cpu()).cuda()
            for p, gp in zip(params, g.split(SIZES)):
                p.grad = gp.reshape(p.shape).clone()
            opt.step()
            history.append(flat(params).cpu())
        return history

    out = InProcessWorld(3, device="cuda").run(run)
    expected, _ = run_reference(3)
    for rank in range(3):
        for t in range(STEPS):
            assert max_rel_diff(out[rank][t], expected[t][rank]) <= 1e-10, (rank, t + 1)


def test_without_rank_state_restarts_each_ranks_momentum_and_server_error():
    """One state_dict loaded on every rank (another world size, say): the per-rank momentum and server
    error restart from zero on every rank, the step count and the schedule go on."""
    from deepspeed_cdadam import without_rank_state

    def worker(rank, tr):
        params, opt = build(tr)
        train(params, opt, rank, 1, SAVE_AT)
        shared = without_rank_state(opt.state_dict())
        params, opt = build(tr)
        opt.load_state_dict(copy.deepcopy(shared))
        state = opt.bucket_state(opt.buckets()[0])
        assert MOMENTUM_BUFFER not in state and not state[SERVER_ERROR].any()
        assert opt.completed_steps() == SAVE_AT and opt.planned_step() == StepKind.COMPRESSED
        train(params, opt, rank, SAVE_AT + 1, SAVE_AT + 2)  # step 8 is an average
        assert opt.parameters_identical_now() is False  # momentum 0.9 in group 0
        return state[MOMENTUM_BUFFER].abs().sum() > 0

    assert InProcessWorld(2).run(worker) == [True, True]
