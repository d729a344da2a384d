"""AdaCGD: the distributed optimizer == the plain reference written from the spec
(deepspeed_cdadam/references/adacgd.py) at 1-4 ranks in-process and on gloo, levels included; the
spec's invariants (one sort == per-level top-k, m = 1 is CLAG / EF21 / LAG, the 3PC inequality and
the cheapest accepted level on every choice, skips leave the state unchanged, the server's estimate
is the mean of the workers'); bytes per step counted exactly; the exact start and its restart after
a reset; exact resume (state_dict and per-rank files); config errors naming the key."""

from __future__ import annotations

import copy
import inspect
import io
import math
import re
from dataclasses import fields

import pytest
import torch

from deepspeed_cdadam import AdaCGD, CDAdam, InProcessWorld, TorchDistributedTransport, without_rank_state
from deepspeed_cdadam.adaptive_exchange import AdaptiveThreePointExchange
from deepspeed_cdadam.checkpoint import load_rank_state, save_rank_state
from deepspeed_cdadam.comm.accounting import all_gather_bytes_sent, all_reduce_bytes_sent, all_to_all_bytes_sent
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import TopK, get_compressor
from deepspeed_cdadam.compressors.adaptive_topk import NestedTopK, adaptive_level
from deepspeed_cdadam.config import AdaCGDConfig, CDAdamConfig, field_names
from deepspeed_cdadam.optim.adacgd import finest_contraction, safe_stepsize, three_pc_constants
from deepspeed_cdadam.optim.base import RANK_STATE_TAG
from deepspeed_cdadam.references.adacgd import AdaCGDReference, even_shard_sizes, kept, top_k_per_shard
from deepspeed_cdadam.schedule import StepKind
from deepspeed_cdadam.types import (
    DOWN_MARKOV_STATE,
    MARKOV_STATE,
    PREVIOUS_GRAD,
    SEQUENCES_RESTART,
    SERVER_MARKOV_STATE,
    SERVER_PREVIOUS_MARKOV_STATE,
)
from tests.distributed import spawn

# Two parameter groups (38 + 15 coordinates, their own lr and weight decay): one communication bucket.
# The last tensor (4 coordinates) never gets a gradient: it travels as zeros, as the reference assumes.
SHAPES = [(5, 7), (3,), (11,), (2, 2)]
SIZES = [35, 3, 11, 4]
NUMEL = 53
HPARAMS = [{"lr": 0.05, "weight_decay": 1e-2}, {"lr": 0.02, "weight_decay": 0.0}]
RATIOS = (0.1, 0.3, 0.6)
ZETA = 1.0
STEPS = 20
#: The gradient noise of step t is NOISE[t % 5]: steps of quiet and noisy gradients make the rule pick
#: every up level (skips included) and skips, cheap and fine levels down.
NOISE = (0.0, 0.02, 0.3, 1.0, 0.1)


def initial(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(1), dtype=dtype)


def gradient(rank: int, step: int, x: torch.Tensor) -> torch.Tensor:
    """Depends on the rank, the step and the parameters (so any divergence grows); 0 on the last tensor."""
    noise = torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * step + rank), dtype=torch.float64)
    g = (1 + 0.3 * rank) * x.detach().double() + 0.2 * rank + NOISE[step % len(NOISE)] * noise
    g[NUMEL - SIZES[-1] :] = 0.0
    return g.to(x.dtype)


def per_coordinate(key: str) -> torch.Tensor:
    return torch.cat([torch.full((n,), HPARAMS[g][key], dtype=torch.float64) for g, n in enumerate((38, 15))])


def build(transport, dtype=torch.float64, **kwargs):
    params = [torch.nn.Parameter(t.reshape(s).clone()) for t, s in zip(initial(dtype).split(SIZES), SHAPES)]
    groups = [{"params": params[:2], **HPARAMS[0]}, {"params": params[2:], **HPARAMS[1]}]
    kwargs = {"ratios": RATIOS, "zeta": ZETA, **kwargs}
    return params, AdaCGD(groups, transport=transport, **kwargs)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


STATE_KEYS = (MARKOV_STATE, PREVIOUS_GRAD, SERVER_MARKOV_STATE, SERVER_PREVIOUS_MARKOV_STATE, DOWN_MARKOV_STATE)


def train(params, opt, rank, first, last, records=None):
    """Steps ``first..last``; with ``records`` (a list) each step appends the gradient, the
    parameters, the exchange state after the step, the level record and this step's byte counts."""
    for t in range(first, last + 1):
        g = gradient(rank, t, flat(params))
        for i, (p, gp) in enumerate(zip(params, g.split(SIZES))):
            p.grad = None if i == len(SIZES) - 1 else gp.reshape(p.shape).clone()
        before = opt.comm_stats.snapshot()
        opt.step()
        if records is not None:
            state = opt.bucket_state(opt.buckets()[0])
            after = opt.comm_stats
            records.append(
                {
                    "grad": g.clone(),
                    "params": flat(params).double(),
                    "state": {k: state[k].clone() for k in STATE_KEYS},
                    "levels": opt.last_levels()[0],
                    "bytes": {name: getattr(after, name) - getattr(before, name)
                              for name in ("bytes_up", "bytes_down", "bytes_control", "collective_calls")},
                }  # fmt: skip
            )
    return records


def run_distributed(rank, transport, steps=STEPS, **kwargs):
    params, opt = build(transport, **kwargs)
    return train(params, opt, rank, 1, steps, []), opt


def run_reference(world_size, steps=STEPS, ratios=RATIOS, zeta=ZETA):
    ref = AdaCGDReference(
        initial(), world_size, ratios=ratios, zeta=zeta, lr=per_coordinate("lr"),
        weight_decay=per_coordinate("weight_decay"),
    )
    out = []
    for t in range(1, steps + 1):
        x = ref.step([gradient(r, t, ref.x) for r in range(world_size)])
        out.append((x.clone(), dict(ref.last)))
    return out, ref


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


def assert_matches_reference(runs, expected, world_size):
    for t, (x, last) in enumerate(expected):
        for rank in range(world_size):
            rec = runs[rank][t]
            assert max_rel_diff(rec["params"], x) <= 1e-12, (rank, t + 1)
            assert rec["levels"].kind == last["kind"], (rank, t + 1)
            if last["kind"] == "compressed":
                assert rec["levels"].up_levels == last["up_levels"], (rank, t + 1)
                assert rec["levels"].down_level == last["down_level"], (rank, t + 1)


# --- equal to the reference --------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_matches_reference_in_process(world_size):
    runs = InProcessWorld(world_size).run(lambda r, tr: run_distributed(r, tr)[0])
    expected, _ = run_reference(world_size)
    assert_matches_reference(runs, expected, world_size)
    for rank in range(1, world_size):  # parameters identical on every rank, bit for bit
        assert all(torch.equal(a["params"], b["params"]) for a, b in zip(runs[0], runs[rank]))
    # the run exercises the rule: skips, cheap and fine levels, in both directions
    up = {level for _, last in expected[1:] for level in last["up_levels"]}
    down = {last["down_level"] for _, last in expected[1:]}
    assert up == {0, 1, 2, 3} and {0, 1, 3} <= down
    assert expected[0][1]["kind"] == "exact"
    # no gradient on any rank (and no weight decay in its group): its estimates stay 0, it stays put
    assert torch.equal(runs[0][-1]["params"][-4:], initial()[-4:])


def _gloo_worker(rank, world_size, out_dir):
    records, opt = run_distributed(rank, TorchDistributedTransport(timeout_s=60))
    torch.save({"records": records, "stats": opt.comm_stats}, f"{out_dir}/{rank}.pt")


def test_matches_reference_on_gloo(tmp_path):
    """3 gloo ranks (2: tests/integration/test_adacgd_launcher.py): iterates, levels and bytes."""
    world_size = 3
    spawn(_gloo_worker, world_size, str(tmp_path))
    runs = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(world_size)]
    expected, _ = run_reference(world_size)
    assert_matches_reference([run["records"] for run in runs], expected, world_size)
    for rank, run in enumerate(runs):
        assert run["stats"].bytes_sent == sum(
            expected_step_bytes(world_size, rank, rec["levels"])["sent"] for rec in run["records"]
        )


# --- the compressor: nested top-k and the rule ---------------------------------------------------
@pytest.mark.parametrize("ratios", [(0.05, 0.2, 0.5, 1.0), (0.05, 0.2, 0.5)], ids=["full-sort", "partial-sort"])
@pytest.mark.parametrize("d", [0, 1, 7, 50])
def test_one_sort_serves_every_level_as_the_naive_per_level_top_k(d, ratios):
    """Spec: with nested top-k compute one sort per step, equal to the per-level computation; ties
    (integer values, zeros) go to the lower index in both. The (partial) sort is the prefix of a stable
    sort of |v|. The envelope's padding does not change a message."""
    comp, m = NestedTopK(ratios), len(ratios)
    gen = torch.Generator().manual_seed(d)
    for v in (torch.randn(d, generator=gen, dtype=torch.float64), torch.randint(-3, 4, (d,), generator=gen).double()):
        order = comp.order(v)
        full = torch.sort(v.abs(), descending=True, stable=True).indices
        assert order.numel() >= comp.k(m, d) and torch.equal(order, full[: order.numel()])
        widest = comp.level_wire_nbytes(m, 60, torch.float64)
        for level in range(1, m + 1):
            c = comp.compress_level(v, order, level)
            dense = comp.decompress(c, dtype=v.dtype)
            assert torch.equal(dense, top_k_per_shard(v, [d], comp.ratios[level - 1]))
            assert c.payload.numel() == kept(comp.ratios[level - 1], d) == comp.k(level, d)
            wire = comp.level_to_wire(c, level, 60, torch.float64, widest)
            assert wire.numel() == widest and comp.level_wire_nbytes(level, 60, torch.float64) == 12 * comp.k(level, 60)
            got = comp.decompress(comp.level_from_wire(wire, level, d, 60, torch.float64), dtype=v.dtype)
            assert torch.equal(got, dense)
            if d and v.unique().numel() == d:  # no ties: the plain top-k keeps the same coordinates
                assert torch.equal(dense, TopK(comp.ratios[level - 1])(v))
    # as a plain Compressor it is the finest level
    assert comp.wire_nbytes(60, 1, torch.float64) == comp.level_wire_nbytes(m, 60, torch.float64)


def test_adaptive_level_is_the_cheapest_accepted_level():
    assert adaptive_level(1.0, [5.0, 0.5], 1.0, 3) == 0  # ||x - h||^2 <= budget: skip (not strict)
    assert adaptive_level(1.5, [5.0, 1.0], 1.0, 3) == 2  # level 1 refused, level 2 accepted (equality)
    assert adaptive_level(1.5, [0.9, 0.2], 1.0, 3) == 1  # the cheapest accepted, not the most accurate
    assert adaptive_level(1.5, [5.0, 2.0], 1.0, 3) == 3  # none accepted: the finest, untested
    assert adaptive_level(1.5, [], 1.0, 1) == 1  # m = 1: CLAG
    seen = []

    def errors():
        for e in (0.5, 0.1):
            seen.append(e)
            yield e

    assert adaptive_level(2.0, errors(), 1.0, 3) == 1 and seen == [0.5]  # stops at the first accepted


def clag_step(g_i, grad, grad_prev, zeta, ratio, shard_sizes):
    """The 3PC code's CLAG_step for one worker (SEED_SPECS.md section 3, PRIMARY), its Top_k on each
    server shard: send iff ||g_i - grad||^2 > zeta ||grad - grad_prev||^2 (strict)."""
    trigger = ((g_i - grad) * (g_i - grad)).sum() > zeta * ((grad - grad_prev) * (grad - grad_prev)).sum()
    return g_i + top_k_per_shard(grad - g_i, shard_sizes, ratio) if trigger else g_i


@pytest.mark.parametrize(
    "ratio, zeta, exact",
    [(0.3, 1.0, True), (0.3, 0.0, True), (1.0, 0.5, False)],
    ids=["CLAG", "EF21", "LAG"],
)
def test_one_level_is_clag_ef21_and_lag(ratio, zeta, exact):
    """Spec: m = 1 is CLAG (bit for bit against the 3PC CLAG_step, from the exact start
    g_i^0 = grad f_i(x^0)); with zeta = 0 EF21 (g_i += Top_k(grad - g_i) every step); with the
    identity LAG (g_i = grad when triggered; h + (x - h) rounds, so within 1e-14)."""
    n = 2
    runs = InProcessWorld(n).run(lambda r, tr: run_distributed(r, tr, steps=12, ratios=(ratio,), zeta=zeta)[0])
    shards = even_shard_sizes(NUMEL, n)
    for rank in range(n):
        g_i = runs[rank][0]["grad"]
        sent = 0
        for t in range(1, 12):
            grad, grad_prev = runs[rank][t]["grad"], runs[rank][t - 1]["grad"]
            new = clag_step(g_i, grad, grad_prev, zeta, ratio, shards)
            got = runs[rank][t]["state"][MARKOV_STATE]
            if exact:
                assert torch.equal(got, new), (rank, t + 1)
            else:
                assert torch.allclose(got, new, rtol=0, atol=1e-14), (rank, t + 1)
                if new is not g_i:
                    assert torch.allclose(got, grad, rtol=0, atol=1e-14)  # LAG: the gradient itself
            sent += new is not g_i
            g_i = new
        assert 0 < sent < 11 if zeta > 0 and ratio < 1.0 else sent > 0
        if zeta == 0.0:
            assert sent == 11  # EF21: every step sends


# --- invariants on every choice ------------------------------------------------------------------
def _gathered(runs, t, key):
    """A shard-length state of step ``t`` over the whole bucket: the servers' shards in rank order."""
    return torch.cat([runs[r][t]["state"][key] for r in range(len(runs))])


def _accepted(x, z, budget):
    return float(((x - z) * (x - z)).sum()) <= float(budget)


def test_every_choice_is_the_cheapest_accepted_and_meets_the_3pc_inequality():
    """Spec: when a skip or a level j < m is chosen, ||x - z||^2 <= zeta ||x - y||^2; no cheaper choice
    was acceptable; and every choice (the fallback included) satisfies the 3PC inequality
    ||z - x||^2 <= (1 - A) ||h - y||^2 + B ||x - y||^2 with the DERIVED (A, B). Up: each worker's
    (x, h, y, z) = (gradient, estimate before, previous gradient, estimate after); down: the server's
    (ghat, gtil before, ghat_prev, gtil after), from the servers' shards."""
    n, m = 3, len(RATIOS)
    runs = InProcessWorld(n).run(lambda r, tr: run_distributed(r, tr)[0])
    shards = even_shard_sizes(NUMEL, n)
    A, B = three_pc_constants(finest_contraction(RATIOS[-1], shards), ZETA)
    choices = []
    for t in range(1, STEPS):
        rec = runs[0][t]["levels"]
        for rank in range(n):
            prev, now = runs[rank][t - 1]["state"], runs[rank][t]["state"]
            choices.append((rec.up_levels[rank], runs[rank][t]["grad"], prev[MARKOV_STATE], prev[PREVIOUS_GRAD],
                            now[MARKOV_STATE]))  # fmt: skip
        x = _gathered(runs, t, SERVER_MARKOV_STATE)
        y = _gathered(runs, t, SERVER_PREVIOUS_MARKOV_STATE)
        assert torch.equal(y, _gathered(runs, t - 1, SERVER_MARKOV_STATE))  # ghat_prev is the last ghat
        choices.append((rec.down_level, x, runs[0][t - 1]["state"][DOWN_MARKOV_STATE], y,
                        runs[0][t]["state"][DOWN_MARKOV_STATE]))  # fmt: skip
    for level, x, h, y, z in choices:
        budget = ZETA * ((x - y) * (x - y)).sum()
        if level < m:
            assert _accepted(x, z, budget)
        if level > 0:  # nothing cheaper was acceptable
            assert not _accepted(x, h, budget)
            for j in range(1, level):
                assert not _accepted(x, h + top_k_per_shard(x - h, shards, RATIOS[j - 1]), budget)
        if level == 0:
            assert torch.equal(z, h)
        else:
            assert torch.allclose(z, h + top_k_per_shard(x - h, shards, RATIOS[level - 1]), rtol=0, atol=1e-15)
        bound = (1 - A) * ((h - y) * (h - y)).sum() + B * ((x - y) * (x - y)).sum()
        assert float(((z - x) * (z - x)).sum()) <= float(bound) * (1 + 1e-12)
    assert {c[0] for c in choices} == {0, 1, 2, 3}


def test_skips_leave_the_state_unchanged_and_cost_their_headers_only():
    """zeta huge: after the exact start every worker skips (||x - h||^2 <= zeta ||x - y||^2) and so
    does the server (ghat unchanged, its budget 0, gtil == ghat): the estimates stay bit for bit, only
    y moves; each step sends the one-byte headers and the m + 1 partial norms, nothing else, and the
    parameters move by the first step's exact mean."""
    n, m = 3, len(RATIOS)
    runs = InProcessWorld(n).run(lambda r, tr: run_distributed(r, tr, steps=6, zeta=1e12)[0])
    for rank in range(n):
        first = runs[rank][0]["state"]
        for t in range(1, 6):
            rec = runs[rank][t]
            assert rec["levels"].up_levels == (0,) * n and rec["levels"].down_level == 0
            for key in (MARKOV_STATE, SERVER_MARKOV_STATE, SERVER_PREVIOUS_MARKOV_STATE, DOWN_MARKOV_STATE):
                assert torch.equal(rec["state"][key], first[key]), (key, t + 1)
            assert torch.equal(rec["state"][PREVIOUS_GRAD], rec["grad"])
            assert rec["bytes"]["bytes_up"] == (n - 1) * 1  # the headers
            assert rec["bytes"]["bytes_down"] == (n - 1) * (m + 1) * 8  # the partial norms (fp64)
            assert rec["bytes"]["collective_calls"] == 3  # control, headers, norms
            assert rec["levels"].payload_bytes_up == n - 1
    mean = sum(runs[r][0]["grad"] for r in range(n)) / n
    assert torch.equal(runs[0][0]["state"][DOWN_MARKOV_STATE], mean)


def test_server_estimate_is_the_mean_of_the_workers_estimates():
    """Spec: the master's estimator equals the mean of the workers' g_i at all times (skips included);
    gtil is identical on every rank, bit for bit."""
    n = 4
    runs = InProcessWorld(n).run(lambda r, tr: run_distributed(r, tr)[0])
    for t in range(STEPS):
        ghat = _gathered(runs, t, SERVER_MARKOV_STATE)
        mean = sum(runs[r][t]["state"][MARKOV_STATE] for r in range(n)) / n
        assert torch.allclose(ghat, mean, rtol=0, atol=1e-13), t + 1
        for r in range(1, n):
            assert torch.equal(runs[r][t]["state"][DOWN_MARKOV_STATE], runs[0][t]["state"][DOWN_MARKOV_STATE])
    assert any(0 in runs[0][t]["levels"].up_levels for t in range(1, STEPS))


# --- bytes per step, counted exactly -----------------------------------------------------------------
def expected_step_bytes(n: int, rank: int, rec, ratios=RATIOS, item: int = 8, numel: int = NUMEL) -> dict:
    """Every byte of one step on ``rank``, from the levels the step chose (``rec``: a ``LevelRecord``, or
    any object with its ``kind``, ``up_levels`` and ``down_level``) and the wire formats; "payload_up" /
    "payload_down": the information bytes (no envelope padding), for a compressed step."""
    layout = ShardLayout(numel, n)
    cap, entry = layout.capacity, item + 4  # a kept coordinate: its value and an int32 index
    comp, m = NestedTopK(ratios), len(ratios)
    control = all_reduce_bytes_sent(4 * n, n)
    out = {}
    if rec.kind == "exact":
        up = all_to_all_bytes_sent(cap * item, n)
        down = all_gather_bytes_sent(cap * item, n)
        calls = 3
    else:
        widest = max(rec.up_levels)
        up = all_gather_bytes_sent(1, n) + all_to_all_bytes_sent(comp.k(widest, cap) * entry, n)
        down = all_gather_bytes_sent((m + 1) * item, n)
        down += all_gather_bytes_sent(comp.k(rec.down_level, cap) * entry, n)
        calls = 3 + (widest > 0) + (rec.down_level > 0)
        mine = rec.up_levels[rank]
        others = [d for j, d in enumerate(layout.shard_sizes) if j != rank]
        out["payload_up"] = (n - 1) + entry * sum(comp.k(mine, d) for d in others)
        out["payload_down"] = (n - 1) * ((m + 1) * item + entry * comp.k(rec.down_level, layout.shard_sizes[rank]))
    return {**out, "up": up, "down": down, "control": control, "calls": calls, "sent": up + down + control}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_bytes_per_step_are_counted_exactly(world_size):
    """Per step: the headers (1 byte per worker), the all_to_all in the envelope of the widest level
    chosen (none when all skip), the partial norms, the all_gather at the agreed level (none on a
    skip), the control flags; the exact start in full precision. The information bytes (no padding)
    are the chosen levels' sizes (a skip: its header)."""
    runs = InProcessWorld(world_size).run(lambda r, tr: run_distributed(r, tr)[0])
    for rank in range(world_size):
        for t, rec in enumerate(runs[rank]):
            want = expected_step_bytes(world_size, rank, rec["levels"])
            got = rec["bytes"]
            assert (got["bytes_up"], got["bytes_down"], got["bytes_control"]) == (
                want["up"], want["down"], want["control"]), (rank, t + 1)  # fmt: skip
            assert got["collective_calls"] == want["calls"], (rank, t + 1)
            if t > 0:
                levels = rec["levels"]
                assert levels.payload_bytes_up == want["payload_up"], (rank, t + 1)
                assert levels.payload_bytes_down == want["payload_down"], (rank, t + 1)
    if world_size > 1:  # the envelope adapts: steps differ in their bytes
        assert len({rec["bytes"]["bytes_up"] for rec in runs[0][1:]}) >= 3


def test_the_reference_counts_the_spec_bits():
    """Spec "bits per step per worker": 0 on a skip, else ceil(log2 m) + the kept values and indices."""
    expected, ref = run_reference(2)
    shards = even_shard_sizes(NUMEL, 2)

    def bits(level):
        return 0 if level == 0 else 2 + sum(kept(RATIOS[level - 1], d) for d in shards) * (64 + 32)

    up = 2 * NUMEL * 64 + sum(bits(lv) for _, last in expected[1:] for lv in last["up_levels"])
    down = NUMEL * 64 + sum(bits(last["down_level"]) for _, last in expected[1:])
    assert (ref.bits_up, ref.bits_down) == (up, down)


# --- the exact start, the schedule, resume ------------------------------------------------------------
def _tr():
    return InProcessWorld(1).transports[0]


def _p():
    return torch.nn.Parameter(torch.zeros(4))


def test_first_step_is_exact_and_a_reset_restarts_the_sequences():
    """EXACT on the first step, then COMPRESSED; a state_dict loaded without its per-rank state (another
    world size, say) resets the sequences on every rank and the next step is EXACT again: the
    reference restarted at the same step agrees."""
    at = 7

    def worker(rank, tr):
        params, opt = build(tr)
        kinds = [opt.planned_step()]
        train(params, opt, rank, 1, at)
        kinds.append(opt.planned_step())
        shared = without_rank_state(opt.state_dict())
        params2, opt2 = build(tr)
        with torch.no_grad():
            for p, q in zip(params2, params):
                p.copy_(q)
        opt2.load_state_dict(copy.deepcopy(shared))
        assert opt2.bucket_state(opt2.buckets()[0])[SEQUENCES_RESTART] is True
        kinds.append(opt2.planned_step())
        records = train(params2, opt2, rank, at + 1, at + 3, [])
        kinds.append(opt2.planned_step())
        return kinds, records

    out = InProcessWorld(2).run(worker)
    assert out[0][0] == [StepKind.EXACT, StepKind.COMPRESSED, StepKind.EXACT, StepKind.COMPRESSED]
    assert out[0][1][0]["levels"].kind == "exact" and out[0][1][1]["levels"].kind == "compressed"
    ref = AdaCGDReference(initial(), 2, ratios=RATIOS, zeta=ZETA, lr=per_coordinate("lr"),
                          weight_decay=per_coordinate("weight_decay"))  # fmt: skip
    for t in range(1, at + 4):
        if t == at + 1:
            ref.restart()
        x = ref.step([gradient(r, t, ref.x) for r in range(2)])
        if t > at:
            for rank in range(2):
                assert max_rel_diff(out[rank][1][t - at - 1]["params"], x) <= 1e-12, t


SAVE_AT = 8


def _straight(rank, tr, dtype=torch.float64):
    params, opt = build(tr, dtype=dtype)
    train(params, opt, rank, 1, STEPS)
    return flat(params), opt.comm_stats.bytes_sent


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
        assert opt.planned_step() == StepKind.COMPRESSED
        train(params, opt, rank, SAVE_AT + 1, STEPS)
        return flat(params)

    straight = InProcessWorld(2).run(_straight)
    again = InProcessWorld(2).run(resumed)
    for (a, _), b in zip(straight, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rank_files_restore_every_rank_bit_identically(tmp_path, dtype):
    """As under DeepSpeed: rank 0's state_dict is loaded on every rank, then each rank's file
    (checkpoint.py) restores its own estimate, previous gradient and server shards; the run continues
    bit-identically, with the byte counters where they stopped."""

    def first_run(rank, tr):
        params, opt = build(tr, dtype=dtype)
        train(params, opt, rank, 1, SAVE_AT)
        save_rank_state(opt, str(tmp_path))
        return [p.detach().clone() for p in params], opt.state_dict()

    rank0_params, rank0_state = InProcessWorld(2).run(first_run)[0]
    assert rank0_state[RANK_STATE_TAG]["keys"] == [
        MARKOV_STATE, PREVIOUS_GRAD, SERVER_MARKOV_STATE, SERVER_PREVIOUS_MARKOV_STATE]  # fmt: skip

    def resumed(rank, tr):
        params, opt = build(tr, dtype=dtype)
        opt.accept_foreign_rank_state = True  # as the DeepSpeed integration sets it
        with torch.no_grad():
            for p, v in zip(params, rank0_params):
                p.copy_(v)
        opt.load_state_dict(copy.deepcopy(rank0_state))
        assert load_rank_state(opt, str(tmp_path))
        assert opt.planned_step() == StepKind.COMPRESSED
        train(params, opt, rank, SAVE_AT + 1, STEPS)
        return flat(params), opt.comm_stats.bytes_sent

    straight = InProcessWorld(2).run(lambda r, tr: _straight(r, tr, dtype))
    again = InProcessWorld(2).run(resumed)
    for a, b in zip(straight, again):
        assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_consistency_check_passes_and_names_a_corrupted_estimate():
    def clean(rank, tr):
        params, opt = build(tr, consistency_check_every=1)
        train(params, opt, rank, 1, 6)
        return opt.steps_taken

    assert InProcessWorld(2).run(clean) == [6, 6]

    def corrupt(rank, tr):
        params, opt = build(tr)
        train(params, opt, rank, 1, 3)
        if rank == 1:
            opt.bucket_state(opt.buckets()[0])[DOWN_MARKOV_STATE][0] += 1.0
        opt.check_ranks_agree()

    with pytest.raises(RuntimeError, match=re.escape("optimizer state 'down_markov_state' of bucket 0")):
        InProcessWorld(2).run(corrupt)


# --- the DERIVED step size ----------------------------------------------------------------------------
def test_three_pc_constants_and_the_safe_stepsize():
    alpha = 0.25
    A, B = three_pc_constants(alpha, 0.5)
    assert A == pytest.approx(1 - math.sqrt(0.75))
    assert B == pytest.approx(0.75 / (1 - math.sqrt(0.75)))  # beta > zeta here
    assert three_pc_constants(alpha, 100.0)[1] == 100.0  # zeta > beta: B = zeta
    assert three_pc_constants(1.0, 0.0) == (1.0, 0.0)  # identity: no error
    assert safe_stepsize(2.0, 3.0, alpha, 0.5) == pytest.approx(1 / (2.0 + 3.0 * math.sqrt(B / A)))
    assert finest_contraction(0.1, [27, 26]) == pytest.approx(3 / 27)  # ceil(2.6) = 3 of 26: 3/26 > 3/27
    # the EF21 bound the fallback relies on, on random (x, h, y)
    gen = torch.Generator().manual_seed(0)
    shards = [27, 26]
    for _ in range(20):
        x, h, y = (torch.randn(53, generator=gen, dtype=torch.float64) for _ in range(3))
        z = h + top_k_per_shard(x - h, shards, 0.1)
        a, b = three_pc_constants(finest_contraction(0.1, shards), 0.0)
        assert ((z - x) ** 2).sum() <= (1 - a) * ((h - y) ** 2).sum() + b * ((x - y) ** 2).sum()
    with pytest.raises(ValueError, match=re.escape("Invalid alpha=0.0. Must be in (0.0, 1.0].")):
        three_pc_constants(0.0, 1.0)


# --- config ---------------------------------------------------------------------------------------------
def test_constructor_parameters_are_the_config_fields_with_the_same_defaults():
    assert AdaCGD.CONFIG is AdaCGDConfig
    parameters = inspect.signature(AdaCGD.__init__).parameters
    objects = {"self", "params", "transport", "process_group"}  # not settings
    settings = {name: p.default for name, p in parameters.items() if name not in objects}
    assert sorted(settings) == sorted(field_names(AdaCGDConfig))
    for f in fields(AdaCGDConfig):
        assert settings[f.name] == f.default, f.name
    built = AdaCGD([_p()], transport=_tr())
    assert built.config == AdaCGDConfig() and set(built.defaults) == {"lr", "weight_decay"}
    assert built.compressor.ratios == (0.001, 0.004, 0.016) and built.zeta == 1.0
    assert AdaCGDConfig(ratios=[0.1, 0.5]).ratios == (0.1, 0.5)  # a JSON list becomes a tuple


RATIOS_MUST_BE = (
    "Must be a list of 1 to 255 top-k ratios in (0.0, 1.0], strictly increasing (cheapest level first, the last "
    "one the finest)."
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratios": (0.1, 0.1)}, f"Invalid ratios=(0.1, 0.1). {RATIOS_MUST_BE}"),
        ({"ratios": (0.5, 0.1)}, f"Invalid ratios=(0.5, 0.1). {RATIOS_MUST_BE}"),
        ({"ratios": ()}, f"Invalid ratios=(). {RATIOS_MUST_BE}"),
        ({"ratios": (0.1, 1.5)}, f"Invalid ratios=(0.1, 1.5). {RATIOS_MUST_BE}"),
        ({"ratios": (0.0, 0.5)}, f"Invalid ratios=(0.0, 0.5). {RATIOS_MUST_BE}"),
        ({"ratios": 0.1}, f"Invalid ratios=0.1. {RATIOS_MUST_BE}"),
        ({"ratios": (True, 0.5)}, f"Invalid ratios=(True, 0.5). {RATIOS_MUST_BE}"),
        ({"zeta": -0.1}, "Invalid zeta=-0.1. Must be a finite number >= 0.0."),
        ({"zeta": float("inf")}, "Invalid zeta=inf. Must be a finite number >= 0.0."),
        ({"lr": -1.0}, "Invalid lr=-1.0. Must be a finite number >= 0.0."),
        ({"weight_decay": -1.0}, "Invalid weight_decay=-1.0. Must be a number >= 0.0."),
        ({"nonfinite_grads": "ignore"}, "Invalid nonfinite_grads='ignore'. Allowed: error, skip."),
    ],
)
def test_bad_arguments_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AdaCGD([_p()], transport=_tr(), **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        AdaCGDConfig(**kwargs)


def test_other_optimizers_refuse_the_adaptive_exchange():
    with pytest.raises(ValueError, match=re.escape("Invalid exchange='adaptive_3pc': it is AdaCGD's own scheme")):
        CDAdamConfig(exchange="adaptive_3pc")
    with pytest.raises(ValueError, match=re.escape("Invalid exchange='adaptive_3pc': it is AdaCGD's own scheme")):
        CDAdam([_p()], exchange="adaptive_3pc", transport=_tr())
    with pytest.raises(ValueError, match=re.escape("exchange='adaptive_3pc' is AdaCGD's: it needs the NestedTopK")):
        AdaptiveThreePointExchange(_tr(), ShardLayout(10, 1), get_compressor("topk"))


# --- scripts/adacgd_levels.py ---------------------------------------------------------------------------
def test_levels_script_writes_its_csv_figure_and_summary(tmp_path):
    """A smoke run of the levels script (tiny sizes): one CSV row per step and run, levels in range,
    bytes per compressed step as the exchange counted them (a skip both ways: headers and norms only)."""
    import csv
    import subprocess
    import sys

    from tests.launch import ROOT

    cmd = [sys.executable, "scripts/adacgd_levels.py", "--steps", "6", "--dim", "40", "--samples", "40",
           "--batch", "8", "--out", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "safe step size" in out.stdout and (tmp_path / "levels.png").stat().st_size > 0
    with open(tmp_path / "levels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 6 and len({r["run"] for r in rows}) == 4
    for r in rows:
        if r["kind"] == "exact":
            assert r["step"] == "1" and float(r["bytes_up"]) == 20 * 4  # the other worker's shard, fp32
            continue
        levels = [int(r["level_worker0"]), int(r["level_worker1"]), int(r["level_down"])]
        assert all(0 <= level <= 3 for level in levels)
        assert float(r["up_skip_rate"]) == (levels[0] == 0) / 2 + (levels[1] == 0) / 2
        if levels == [0, 0, 0]:
            assert (float(r["bytes_up"]), float(r["bytes_down"])) == (1.0, 16.0)
    assert (tmp_path / "summary.txt").read_text().count("all compressed steps") == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_reference():
    def run(rank, transport):
        params = [torch.nn.Parameter(t.reshape(s).clone().cuda()) for t, s in zip(initial().split(SIZES), SHAPES)]
        groups = [{"params": params[:2], **HPARAMS[0]}, {"params": params[2:], **HPARAMS[1]}]
        opt = AdaCGD(groups, ratios=RATIOS, zeta=ZETA, transport=transport)
        history = []
        for t in range(1, STEPS + 1):
            g = gradient(rank, t, flat(params).cpu()).cuda()
            for i, (p, gp) in enumerate(zip(params, g.split(SIZES))):
                p.grad = None if i == len(SIZES) - 1 else gp.reshape(p.shape).clone()
            opt.step()
            history.append((flat(params).cpu(), opt.last_levels()[0]))
        return history

    out = InProcessWorld(3, device="cuda").run(run)
    expected, _ = run_reference(3)
    for rank in range(3):
        for t, (x, last) in enumerate(expected):
            assert max_rel_diff(out[rank][t][0], x) <= 1e-10, (rank, t + 1)
            if last["kind"] == "compressed":
                assert out[rank][t][1].up_levels == last["up_levels"], (rank, t + 1)
