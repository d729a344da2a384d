"""Birder: the spec's invariants, the exchange against a plain mean of signs, the optimizer against the
plain reference (flat at 1-4 ranks, hierarchy "node", in-process and on gloo), bytes, resume, bad settings."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from deepspeed_cdadam import Birder, CDAdam, InProcessWorld, TorchDistributedTransport, without_rank_state
from deepspeed_cdadam.binary_exchange import BinaryExchange
from deepspeed_cdadam.checkpoint import load_rank_state, save_rank_state
from deepspeed_cdadam.comm.accounting import CommStats, all_reduce_bytes_sent
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors.binary import StochasticSign, pack_counts, stochastic_sign, unpack_counts
from deepspeed_cdadam.config import BirderConfig
from deepspeed_cdadam.optim.birder import normalised_momentum
from deepspeed_cdadam.references.birder import BirderReference, NodeBirderReference, coin_flips
from deepspeed_cdadam.simulate import per_coordinate
from deepspeed_cdadam.state import PER_RANK, keys_with_scope
from deepspeed_cdadam.types import EXP_AVG, EXP_AVG_ABS, MAX_EXP_AVG_ABS
from tests.distributed import spawn
from tests.harness import GROUP_SHAPES, gradient, initial_groups, max_abs_diff, train_on_groups

STEPS = 12
#: Per group: lr, beta, weight decay (two groups in one bucket, one parameter without gradients).
GROUPS = [{"lr": 1e-2, "beta": 0.9, "weight_decay": 0.0}, {"lr": 3e-3, "beta": 0.8, "weight_decay": 0.1}]
SIZES = [sum(torch.Size(s).numel() for s in shapes) for shapes in GROUP_SHAPES]


def run_birder(rank, transport, steps=STEPS, dtype=torch.float64, **kwargs):
    """Birder on the harness's two groups (38 + 15 coordinates); the flat parameters after each step."""
    return train_on_groups(lambda groups: Birder(groups, transport=transport, **kwargs), rank, steps, GROUPS, dtype)


def reference_history(ref, world_size, steps=STEPS):
    history = []
    for t in range(1, steps + 1):
        grads = [
            torch.cat([gradient(gi, r, t, x) for gi, x in enumerate(ref.x.split(SIZES))]) for r in range(world_size)
        ]
        history.append([x.clone() for x in ref.step(grads).split(SIZES)])
    return history


def reference_hparams(dtype=torch.float64, **extra):
    out = {k: per_coordinate([(n, g[k]) for n, g in zip(SIZES, GROUPS)], dtype) for k in ("lr", "beta")}
    out["weight_decay"] = per_coordinate([(n, g["weight_decay"]) for n, g in zip(SIZES, GROUPS)], dtype)
    return {**out, **extra}


def x0(dtype=torch.float64):
    return torch.cat(initial_groups(dtype))


# --- the spec's invariants ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_momentum_never_exceeds_b_so_z_lies_in_the_unit_interval(dtype, amsgrad):
    """|m| <= b (and b <= bhat) exactly, every step, whatever the gradients' scales and signs."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.zeros(4000, dtype=dtype))
    opt = Birder([p], lr=1e-3, beta=0.7, amsgrad=amsgrad, transport=InProcessWorld(1).transports[0])
    scales = torch.logspace(-30, 30, 4000, dtype=torch.float64).to(dtype)
    for t in range(30):
        g = torch.randn(4000, generator=gen).to(dtype) * scales * (10.0 ** (t % 7 - 3))
        g[::17] = 0.0  # some coordinates without gradient this step
        g[1:5] = g[1:5].abs()  # and a few whose gradients keep one sign
        p.grad = g
        opt.step()
        state = opt.bucket_state(opt.buckets()[0])
        m, b = state[EXP_AVG], state[EXP_AVG_ABS]
        assert bool((m.abs() <= b).all()), t
        denominator = b
        if amsgrad:
            assert bool((state[MAX_EXP_AVG_ABS] >= b).all())
            denominator = state[MAX_EXP_AVG_ABS]
        z = normalised_momentum(m, denominator)
        assert bool((z.abs() <= 1).all()) and bool(torch.isfinite(z).all())
    if not amsgrad:  # (with the running max, bhat > b once b shrank)
        assert z[1:5].tolist() == [1.0] * 4  # reached exactly where the gradients kept one sign


def test_stochastic_sign_is_unbiased_and_sends_the_ends_exactly():
    z = torch.linspace(-1, 1, 21, dtype=torch.float64)
    draws = 20_000
    q = StochasticSign()(z.repeat(draws), seed=7).view(draws, -1)
    assert set(q.unique().tolist()) == {-1.0, 1.0}
    error = (q.mean(0) - z).abs()
    standard_error = ((1 - z * z) / draws).sqrt()
    assert bool((error <= 5 * standard_error + 1e-12).all()), error
    assert bool((q[:, 0] == -1).all()) and bool((q[:, -1] == 1).all())  # z = -1 and +1: no coin
    assert abs(float(q[:, 10].mean())) < 5 / draws**0.5  # z = 0: a fair coin
    # the draws are a function of the seed alone (a reference replays them), and differ between seeds
    assert torch.equal(StochasticSign()(z, seed=3), StochasticSign()(z, seed=3))
    assert torch.equal(StochasticSign()(z, seed=3), coin_flips(z, 3))
    zeros = torch.zeros(64, dtype=torch.float64)
    assert not torch.equal(StochasticSign()(zeros, seed=3), coin_flips(zeros, 4))
    u = torch.tensor([0.0, 0.49, 0.5, 0.99])
    assert stochastic_sign(torch.zeros(4), u).tolist() == [1.0, 1.0, -1.0, -1.0]


@pytest.mark.parametrize("senders", [1, 2, 3, 4, 7, 8, 64])
def test_counts_travel_in_bit_planes(senders):
    counts = torch.randint(0, senders + 1, (37,), generator=torch.Generator().manual_seed(senders))
    wire = pack_counts(counts, senders, capacity=40)
    assert wire.numel() == senders.bit_length() * 5
    assert torch.equal(unpack_counts(wire, 37, senders, capacity=40), counts)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_the_flat_exchange_is_the_plain_mean_of_the_workers_signs(world_size):
    """qbar = (1/n) sum_i q_i exactly, with q_i replayed from the seeds; bytes exact."""
    d = 45
    gens = [torch.Generator().manual_seed(r) for r in range(world_size)]
    zs = [2 * torch.rand(d, generator=gen, dtype=torch.float64) - 1 for gen in gens]

    def run(rank, tr):
        layout = ShardLayout(d, world_size)
        exchange = BinaryExchange(tr, layout, StochasticSign(), CommStats(), seed=11)
        return exchange.exchange(zs[rank].clone(), {}, step=4, group=2), exchange.stats

    out = InProcessWorld(world_size).run(run)
    ref = BirderReference(torch.zeros(d, dtype=torch.float64), world_size, seed=11, group=2)
    ref.t = 4
    expected = ref.average(zs)
    plain = torch.stack(ref.last_q).sum(0) / world_size  # a plain all-reduce of the +-1 vectors
    assert torch.equal(expected, plain)
    for qbar, stats in out:
        assert torch.equal(qbar, expected)
        assert set((qbar * world_size).round().tolist()) <= set(range(-world_size, world_size + 1, 2))
        shard = -(-d // world_size)
        assert stats.bytes_up == (world_size - 1) * -(-shard // 8)  # 1 bit per coordinate up
        assert stats.bytes_down == (world_size - 1) * world_size.bit_length() * -(-shard // 8)  # counts down
    if world_size > 1:
        assert not torch.equal(ref.last_q[0], ref.last_q[1])  # every rank draws its own coins


def test_binary_is_birders_exchange_only():
    with pytest.raises(ValueError, match=re.escape("Invalid exchange='binary': it is Birder's own scheme")):
        CDAdam([torch.nn.Parameter(torch.zeros(3))], exchange="binary", transport=InProcessWorld(1).transports[0])
    with pytest.raises(ValueError, match="exchange='binary' is Birder's"):
        BinaryExchange(InProcessWorld(1).transports[0], ShardLayout(4, 1), CDAdam.CONFIG().build_compressor())


# --- the optimizer against the reference -----------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_birder_matches_the_reference(world_size):
    out = InProcessWorld(world_size).run(lambda r, tr: run_birder(r, tr, consistency_check_every=1)[0])
    expected = reference_history(BirderReference(x0(), world_size, **reference_hparams()), world_size)
    for rank in range(world_size):
        assert max_abs_diff(out[rank], expected) <= 1e-12, rank
        assert all(torch.equal(a, b) for a, b in zip(out[rank][-1], out[0][-1]))  # rank-identical
    # the parameter without gradients (z = 0 on every rank) moves by qbar in {-1, -1 + 2/n, ..., 1} too:
    # the fair coins of a 1-bit message, unbiased
    dead = slice(torch.Size(GROUP_SHAPES[1][0]).numel(), None)
    xs = [initial_groups(torch.float64)[1][dead]] + [h[1][dead] for h in out[0]]
    lr, wd = GROUPS[1]["lr"], GROUPS[1]["weight_decay"]
    qbar = torch.stack([-(after - before) / lr - wd * before for before, after in zip(xs, xs[1:])])
    k = (qbar * world_size).round()
    assert torch.allclose(qbar * world_size, k, atol=1e-6)
    assert bool(((k - world_size) % 2 == 0).all()) and bool((k.abs() <= world_size).all())
    assert bool((qbar != 0).any())


def test_amsgrad_matches_the_reference():
    out = InProcessWorld(2).run(lambda r, tr: run_birder(r, tr, amsgrad=True)[0])
    expected = reference_history(BirderReference(x0(), 2, **reference_hparams(amsgrad=True)), 2)
    assert max_abs_diff(out[0], expected) <= 1e-12
    plain = reference_history(BirderReference(x0(), 2, **reference_hparams()), 2)
    assert max_abs_diff(out[0], plain) > 1e-6  # the running max changes the result


@pytest.mark.parametrize("nodes,ranks_per_node", [(2, 2), (3, 1), (1, 3), (2, 3)])
def test_hierarchical_birder_matches_the_reference(nodes, ranks_per_node):
    n = nodes * ranks_per_node

    def run(rank, tr):
        history, opt = run_birder(rank, tr, hierarchy="node", ranks_per_node=ranks_per_node)
        return history, opt.node_hierarchy.intra_stats, opt.node_hierarchy.inter_stats, opt.comm_stats

    out = InProcessWorld(n).run(run)
    expected = reference_history(NodeBirderReference(x0(), nodes, ranks_per_node, **reference_hparams()), n)
    node_shard = -(-53 // ranks_per_node)
    for rank, (history, intra, inter, total) in enumerate(out):
        assert max_abs_diff(history, expected) <= 1e-12, rank
        # every message is 1 bit per coordinate: intra all_to_all + all_gather, inter all_to_all + all_gather
        local = rank % ranks_per_node
        sub = -(-ShardLayout(53, ranks_per_node).shard_sizes[local] // nodes)
        assert intra.bytes_up == intra.bytes_down == STEPS * (ranks_per_node - 1) * -(-node_shard // 8)
        assert inter.bytes_up == inter.bytes_down == STEPS * (nodes - 1) * -(-sub // 8)
        assert total.bytes_up + total.bytes_down == intra.bytes_sent + inter.bytes_sent
        assert total.bytes_control == STEPS * all_reduce_bytes_sent(4 * n, n)  # the step agreement


NUMEL = 32_768  # node shard 16384 and sub-shard 8192 coordinates on 2 x 2 ranks: whole bytes


def test_hierarchy_sends_one_32nd_of_fp32_bytes_across_nodes():
    """Birder's Hierarchical-1-bit-All-Reduce on 2 nodes x 2 ranks: the bytes each rank sends across node
    groups per step, against the fp32 ring all-reduce of its node shard across the nodes (what a
    hierarchical fp32 all-reduce sends across them); and the flat 1-bit exchange for comparison."""

    def run(rank, tr):
        sent = {}
        for hierarchy, extra in (("node", {"ranks_per_node": 2}), ("flat", {})):
            p = torch.nn.Parameter(torch.zeros(NUMEL))
            opt = Birder([p], hierarchy=hierarchy, transport=tr, **extra)
            p.grad = torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank))
            opt.step()
            level = opt.node_hierarchy.inter_stats.bytes_sent if opt.node_hierarchy else None
            sent[hierarchy] = (level, opt.comm_stats.bytes_up + opt.comm_stats.bytes_down)
        return sent

    out = InProcessWorld(4).run(run)
    fp32_across_nodes = all_reduce_bytes_sent(4 * NUMEL // 2, 2)  # node shard of 16384 fp32 over 2 nodes
    for sent in out:
        inter, _ = sent["node"]
        assert inter == 2 * (8192 // 8)  # 1 bit per coordinate of the sub-shard, up and down
        assert inter / fp32_across_nodes == 1 / 32
        _, flat = sent["flat"]
        assert flat == 3 * 1024 + 3 * 3 * 1024  # 1 bit up, the 0..4 counts in 3 bits down
        assert flat / all_reduce_bytes_sent(4 * NUMEL, 4) == 1 / 16  # (1 + 3 bits) / 64


# --- resume and per-rank state ------------------------------------------------------------------
def _continue(opt, rank, first, last):
    params = [p for g in opt.param_groups for p in g["params"]]
    for t in range(first, last + 1):
        for i, p in enumerate(params):
            gen = torch.Generator().manual_seed(1000 * t + 10 * rank + i)
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return [p.detach().clone() for p in params]


def _fresh(hierarchy_kwargs, tr, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (30, 7)]
    return Birder(params, lr=1e-2, amsgrad=True, transport=tr, **hierarchy_kwargs)


@pytest.mark.parametrize("hierarchy", [{}, {"hierarchy": "node", "ranks_per_node": 2}])
def test_resume_from_state_dict_or_rank_files_is_bit_identical(tmp_path, hierarchy):
    """Steps 1-6 straight == steps 1-3, saved, loaded into a new optimizer (other initial weights, then
    the saved ones), steps 4-6: (a) from this rank's own state_dict; (b) as under DeepSpeed, rank 0's
    state_dict on every rank plus each rank's own per-rank file."""

    def save(rank, tr):
        straight = _continue(_fresh(hierarchy, tr), rank, 1, 6)
        first = _fresh(hierarchy, tr)
        _continue(first, rank, 1, 3)
        save_rank_state(first, str(tmp_path))
        return straight, first.state_dict(), [p.detach().clone() for p in _params(first)]

    saved = InProcessWorld(4).run(save)

    def resume(rank, tr):
        straight, own, weights = saved[rank]
        resumed = []
        for state_dict, per_rank_files in ((own, False), (saved[0][1], True)):
            opt = _fresh(hierarchy, tr, seed=9)
            for p, w in zip(_params(opt), weights):
                p.data.copy_(w)
            opt.accept_foreign_rank_state = per_rank_files
            opt.load_state_dict(copy.deepcopy(state_dict))
            if per_rank_files:
                assert load_rank_state(opt, str(tmp_path))
            resumed.append(_continue(opt, rank, 4, 6))
        return straight, resumed

    for straight, resumed in InProcessWorld(4).run(resume):
        for params in resumed:
            assert all(torch.equal(a, b) for a, b in zip(straight, params))


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def test_state_without_the_per_rank_moments_restarts_them_on_every_rank():
    def run(rank, tr):
        opt = _fresh({}, tr)
        _continue(opt, rank, 1, 3)
        assert set(keys_with_scope(opt.state_specs(), PER_RANK)) >= {EXP_AVG, EXP_AVG_ABS, MAX_EXP_AVG_ABS}
        held = {k for k, v in opt.bucket_state(opt.buckets()[0]).items() if torch.is_tensor(v)}
        assert held == {EXP_AVG, EXP_AVG_ABS, MAX_EXP_AVG_ABS}  # 3 flat buffers with amsgrad, no error buffers
        stripped = without_rank_state(opt.state_dict())
        assert EXP_AVG not in next(iter(stripped["state"].values()))
        fresh = _fresh({}, tr, seed=3)
        fresh.load_state_dict(copy.deepcopy(stripped))
        state = fresh.bucket_state(fresh.buckets()[0])
        assert all(int(torch.count_nonzero(state[k])) == 0 for k in (EXP_AVG, EXP_AVG_ABS, MAX_EXP_AVG_ABS))
        assert state["step"] == 3
        _continue(fresh, rank, 4, 5)
        fresh.check_ranks_agree()
        return True

    assert InProcessWorld(2).run(run) == [True, True]


# --- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"lr": -1.0}, ValueError, "Invalid lr=-1.0. Must be a finite number >= 0.0."),
        ({"beta": 1.0}, ValueError, "Invalid beta=1.0. Must be a number in [0.0, 1.0)."),
        ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay=-0.1. Must be a number >= 0.0."),
        ({"amsgrad": 1}, TypeError, "Invalid amsgrad=1. Must be a bool."),
        ({"hierarchy": "nodes"}, ValueError, "Invalid hierarchy='nodes'. Allowed: flat, node. Did you mean 'node'?"),
        (
            {"ranks_per_node": 2},
            ValueError,
            "Invalid ranks_per_node=2 with hierarchy='flat': node groups are used with hierarchy='node' only.",
        ),
        ({"hierarchy": "node", "ranks_per_node": 0}, ValueError, "Invalid ranks_per_node=0. Must be None"),
        ({"seed": 1.5}, TypeError, "Invalid seed=1.5. Must be an int."),
    ],
)
def test_bad_settings_name_the_key_and_what_is_allowed(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Birder([torch.nn.Parameter(torch.zeros(3))], transport=InProcessWorld(1).transports[0], **kwargs)
    with pytest.raises(error, match=re.escape(message)):
        BirderConfig(**kwargs)  # the DeepSpeed JSON path builds the same dataclass


def test_ranks_per_node_must_divide_the_ranks():
    def run(rank, tr):
        p = torch.nn.Parameter(torch.zeros(8))
        opt = Birder([p], hierarchy="node", ranks_per_node=3, transport=tr)
        p.grad = torch.ones(8)
        with pytest.raises(ValueError, match=re.escape("Invalid ranks_per_node=3: it must divide the 4 ranks")):
            opt.step()
        return True

    assert InProcessWorld(4).run(run) == [True] * 4


def test_json_keys_are_the_config_fields():
    from deepspeed_cdadam.config import json_keys

    assert json_keys(BirderConfig) == (
        "hierarchy",
        "ranks_per_node",
        "lr",
        "beta",
        "weight_decay",
        "amsgrad",
        "timeout_s",
        "seed",
        "nonfinite_grads",
        "consistency_check_every",
        "comm_backend_name",
        "cuda_aware",
    )


# --- gloo ------------------------------------------------------------------------------------------
GLOO_STEPS = 8


def _gloo(rank, world_size, out_dir, steps=GLOO_STEPS):
    runs = {"flat": {}, "node": {"hierarchy": "node", "ranks_per_node": 2 if world_size == 4 else 1}}
    for name, kwargs in runs.items():
        history, opt = run_birder(rank, TorchDistributedTransport(timeout_s=60), steps, **kwargs)
        level = opt.node_hierarchy
        torch.save(
            {
                "history": history,
                "inter": level.inter_stats.bytes_sent if level else None,
                "intra": level.intra_stats.bytes_sent if level else None,
            },
            f"{out_dir}/birder-{name}-{rank}.pt",
        )


def check_gloo(out_dir, world_size, steps=GLOO_STEPS):
    """What ``_gloo`` saved equals the references; the bytes of each level are exact."""
    G = 2 if world_size == 4 else 1
    references = {
        "flat": BirderReference(x0(), world_size, **reference_hparams()),
        "node": NodeBirderReference(x0(), world_size // G, G, **reference_hparams()),
    }
    for name, ref in references.items():
        expected = reference_history(ref, world_size, steps)
        for rank in range(world_size):
            got = torch.load(out_dir / f"birder-{name}-{rank}.pt")
            assert max_abs_diff(got["history"], expected) <= 1e-12, (name, rank)
            if name == "node":
                sub = -(-ShardLayout(53, G).shard_sizes[rank % G] // (world_size // G))
                assert got["inter"] == steps * 2 * (world_size // G - 1) * -(-sub // 8)
                assert got["intra"] == steps * 2 * (G - 1) * -(-(-(-53 // G)) // 8)


@pytest.mark.slow  # the default run checks 4 gloo ranks in tests/optim/test_hierarchical.py (one spawn for all)
@pytest.mark.parametrize("world_size", [2, 4])
def test_gloo_matches_the_reference(tmp_path, world_size):
    """2 ranks: flat, and 2 nodes x 1 rank; 4 ranks: flat, and 2 nodes x 2 ranks."""
    spawn(_gloo, world_size, str(tmp_path))
    check_gloo(tmp_path, world_size)
