"""SketchedAMSGrad: the spec's invariants, the optimizer against the plain reference (1-4 ranks in-process,
and on gloo), bytes per step exactly and their O(k log d) growth, resume, bad settings."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, SketchedAMSGrad, TorchDistributedTransport, without_rank_state
from deepspeed_cdadam.checkpoint import load_rank_state, save_rank_state
from deepspeed_cdadam.comm.accounting import CommStats, all_reduce_bytes_sent
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors.count_sketch import CountSketch
from deepspeed_cdadam.config import SketchedAMSGradConfig, json_keys
from deepspeed_cdadam.problems import NonconvexLogistic
from deepspeed_cdadam.references.sketched_amsgrad import SketchedAMSGradReference
from deepspeed_cdadam.simulate import per_coordinate
from deepspeed_cdadam.sketch_exchange import CountSketchExchange
from deepspeed_cdadam.state import PER_RANK, RANK_IDENTICAL, keys_with_scope
from deepspeed_cdadam.types import EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, WORKER_ERROR
from tests.distributed import spawn
from tests.harness import GROUP_SHAPES, gradient, initial_groups, max_abs_diff, train_on_groups

STEPS = 10
#: Per group (two groups in one bucket of 38 + 15 coordinates, one parameter without gradients).
GROUPS = [
    {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0},
    {"lr": 3e-3, "betas": (0.8, 0.999), "eps": 1e-6, "weight_decay": 0.1},
]
SIZES = [sum(torch.Size(s).numel() for s in shapes) for shapes in GROUP_SHAPES]
D = sum(SIZES)  # 53
#: Sketch settings: the default sizes (r = ceil(log2 53) = 6, c = 16 k); a small sketch with an even
#: number of rows (lower median, collisions); the second round.
SETTINGS = {
    "default_sizes": {"k": 6, "seed": 5},
    "small_even_rows": {"k": 5, "sketch_rows": 4, "sketch_columns": 12, "seed": 1},
    "second_round": {"k": 5, "sketch_rows": 3, "sketch_columns": 12, "candidate_factor": 2},
}


def run_sketched(rank, transport, steps=STEPS, dtype=torch.float64, **kwargs):
    """SketchedAMSGrad on the harness's two groups; the flat parameters of each group after each step."""
    return train_on_groups(lambda groups: SketchedAMSGrad(groups, transport=transport, **kwargs), rank, steps, GROUPS, dtype)


def reference(world_size, dtype=torch.float64, **settings):
    hparams = {key: per_coordinate([(n, g[key]) for n, g in zip(SIZES, GROUPS)], dtype) for key in ("lr", "eps")}
    hparams["weight_decay"] = per_coordinate([(n, g["weight_decay"]) for n, g in zip(SIZES, GROUPS)], dtype)
    hparams["betas"] = tuple(per_coordinate([(n, g["betas"][i]) for n, g in zip(SIZES, GROUPS)], dtype) for i in (0, 1))
    return SketchedAMSGradReference(torch.cat(initial_groups(dtype)), world_size, **hparams, **settings)


def reference_history(ref, world_size, steps=STEPS):
    history = []
    for t in range(1, steps + 1):
        grads = [
            torch.cat([gradient(gi, r, t, x) for gi, x in enumerate(ref.x.split(SIZES))]) for r in range(world_size)
        ]
        history.append([x.clone() for x in ref.step(grads).split(SIZES)])
    return history


def expected_bytes(world_size, d, rows, columns, k, candidate_factor=0, itemsize=8):
    """(up, down, handed, calls) of one step's exchange: a reduce-scatter + all-gather of the table padded
    to a multiple of n, and with the second round the same for min(P k, d) values."""
    n, up, handed, calls = world_size, 0.0, 0, 0
    sizes = [rows * columns] + ([min(d, candidate_factor * k)] if candidate_factor else [])
    for size in sizes:
        width = -(-size // n)
        up += (n - 1) * width * itemsize
        handed += (width * n + width) * itemsize
        calls += 2
    return up, up, handed, calls


# --- the optimizer against the reference -------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_matches_the_reference_with_exact_bytes(setting, world_size):
    settings = SETTINGS[setting]

    def run(rank, tr):
        history, opt = run_sketched(rank, tr, **settings)
        stats = opt.comm_stats.snapshot()
        opt.check_ranks_agree()  # v and vhat are the same bits on every rank
        return history, stats

    out = InProcessWorld(world_size).run(run)
    expected = reference_history(reference(world_size, **settings), world_size)
    shape = CountSketch(settings["k"], settings.get("sketch_rows"), settings.get("sketch_columns")).shape(D)
    up, down, handed, calls = expected_bytes(
        world_size, D, shape.rows, shape.columns, shape.k, settings.get("candidate_factor", 0)
    )
    for rank, (history, stats) in enumerate(out):
        assert max_abs_diff(history, expected) <= 1e-12, rank
        assert all(torch.equal(a, b) for a, b in zip(history[-1], out[0][0][-1]))  # rank-identical
        # per step: the reduce-scatter + all-gather of the table (and of the candidates), and the step agreement
        assert (stats.bytes_up, stats.bytes_down) == (STEPS * up, STEPS * down)
        assert stats.bytes_control == STEPS * all_reduce_bytes_sent(4 * world_size, world_size)
        assert stats.bytes_handed == STEPS * (handed + 4 * world_size)
        assert stats.collective_calls == STEPS * (calls + 1)
    # the parameters moved
    assert not torch.equal(out[0][0][-1][0], initial_groups(torch.float64)[0])


def test_the_second_round_and_the_sizes_change_the_result():
    """The reference really depends on what the settings change (so the equality above checks them)."""
    base = reference_history(reference(2, k=5, sketch_rows=3, sketch_columns=12), 2, 4)
    second = reference_history(reference(2, k=5, sketch_rows=3, sketch_columns=12, candidate_factor=2), 2, 4)
    wider = reference_history(reference(2, k=5, sketch_rows=3, sketch_columns=40), 2, 4)
    assert max_abs_diff(second, base) > 1e-6 and max_abs_diff(wider, base) > 1e-6


# --- the spec's invariants -------------------------------------------------------------------------
def test_error_feedback_conserves_mass_and_only_the_top_k_moves(monkeypatch):
    """Per rank and step: a_i = u + e_i (e_i = a_i bit for bit off the top k); u has at most k nonzeros
    and is the same on every rank; with no weight decay the coordinates outside the top k do not move;
    vhat never decreases and stays >= eps; no coordinate moves by more than lr / sqrt(1 - beta2)."""
    seen = {}
    original = CountSketchExchange.exchange

    def recording(self, x, state, *, step, group=0):
        a = x + state[WORKER_ERROR]
        u = original(self, x, state, step=step, group=group)
        seen.setdefault(self.rank, []).append((a, u.clone(), state[WORKER_ERROR].clone()))
        return u

    monkeypatch.setattr(CountSketchExchange, "exchange", recording)
    k, lr, beta2, eps = 7, 0.05, 0.9, 1e-6

    def run(rank, tr):
        p = torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        opt = SketchedAMSGrad(
            [p], lr=lr, betas=(0.8, beta2), eps=eps, k=k, sketch_rows=5, sketch_columns=60, transport=tr
        )
        xs, vhats = [p.detach().clone()], []
        for t in range(8):
            p.grad = torch.randn(300, generator=torch.Generator().manual_seed(100 * t + rank), dtype=torch.float64)
            p.grad[::7] *= 30  # a few large coordinates
            opt.step()
            xs.append(p.detach().clone())
            vhats.append(opt.bucket_state(opt.buckets()[0])[MAX_EXP_AVG_SQ].clone())
        return xs, vhats

    out = InProcessWorld(3).run(run)
    for rank, (xs, vhats) in enumerate(out):
        for t, (a, u, e) in enumerate(seen[rank]):
            sent = u != 0
            assert int(sent.sum()) <= k
            assert torch.equal(u, seen[0][t][1])
            assert torch.equal(e[~sent], a[~sent])
            torch.testing.assert_close(u + e, a, rtol=0, atol=1e-12)
            moved = xs[t + 1] != xs[t]
            assert torch.equal(moved, sent)  # every sent coordinate moves, no other one does
            assert float((xs[t + 1] - xs[t]).abs().max()) <= lr / math.sqrt(1 - beta2) * (1 + 1e-12)
        for before, after in zip([torch.full((300,), eps, dtype=torch.float64)] + vhats, vhats):
            assert bool((after >= before).all()) and bool((after >= eps).all())


def test_the_exchange_sums_sketches_not_decoded_messages():
    """The exchange's u from n ranks equals the top k of the unsketched *mean sketch*, computed here from
    the ranks' vectors in one process; decoding each rank's sketch and averaging gives another vector."""
    n, d = 3, 400
    xs = [torch.randn(d, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(n)]
    compressor = CountSketch(k=10, rows=5, columns=30)

    def run(rank, tr):
        exchange = CountSketchExchange(tr, ShardLayout(d, n), compressor, CommStats(), seed=4)
        state = {WORKER_ERROR: torch.zeros(d, dtype=torch.float64)}
        return exchange.exchange(xs[rank], state, step=2, group=1), exchange.hash_seed(2, 1)

    out = InProcessWorld(n).run(run)
    u, seed = out[0]
    mean = sum(xs[1:], xs[0]) / n
    torch.testing.assert_close(u, compressor(mean, seed=seed), rtol=0, atol=1e-12)
    decoded_apart = sum(compressor(x, seed=seed) for x in xs) / n
    assert not torch.allclose(u, decoded_apart)
    assert all(torch.equal(u, other) for other, _ in out)


def test_converges_on_the_nonconvex_logistic_problem():
    """4 workers with their own data, d = 200, k = 20 (10% of d per step): the gradient norm falls below 1% of
    its start in 500 steps (measured 0.5%)."""
    problem = NonconvexLogistic.synthetic(n_workers=4, dim=200, seed=0)
    x0 = torch.zeros(200, dtype=torch.float64)

    def final_grad_norm(k):
        def run(rank, tr):
            p = torch.nn.Parameter(x0.clone())
            opt = SketchedAMSGrad([p], lr=1e-3, betas=(0.9, 0.99), k=k, transport=tr)
            for _ in range(500):
                p.grad = problem.grad(rank, p.detach())
                opt.step()
            return p.detach()

        return problem.grad_norm(InProcessWorld(4).run(run)[0])

    assert final_grad_norm(20) <= 0.01 * problem.grad_norm(x0)


# --- bytes: O(k log d) --------------------------------------------------------------------------
def bytes_per_step(d, k, world_size=2, candidate_factor=0):
    """(rows, columns, bytes this rank sent in one step, of which the sketch exchange) for one bucket of d fp32."""

    def run(rank, tr):
        p = torch.nn.Parameter(torch.zeros(d))
        opt = SketchedAMSGrad([p], k=k, candidate_factor=candidate_factor, transport=tr)
        p.grad = torch.randn(d, generator=torch.Generator().manual_seed(rank))
        opt.step()
        return opt.comm_stats

    stats = InProcessWorld(world_size).run(run)[0]
    shape = CountSketch(k).shape(d)
    return shape.rows, shape.columns, stats.bytes_sent, stats.bytes_up + stats.bytes_down


def test_bytes_per_step_grow_as_k_log_d():
    """The default sketch (r = ceil(log2 d), c = 16 k) of one fp32 bucket on 2 ranks, k = 64, for d = 2^10,
    2^13, 2^16: the sketch exchange sends 2 (n-1)/n r c 4 B = r c 4 B, growing with log2 d (10, 13, 16
    rows) while d grows 64 times; its share of an fp32 all-reduce of the bucket falls."""
    k, rows_seen, per_row = 64, [], set()
    for log_d in (10, 13, 16):
        d = 2**log_d
        rows, columns, total, exchange = bytes_per_step(d, k)
        assert (rows, columns) == (log_d, 16 * k)
        assert exchange == rows * columns * 4  # reduce-scatter + all-gather of r c fp32 values on 2 ranks
        assert total == exchange + all_reduce_bytes_sent(8, 2)  # and the step agreement
        rows_seen.append(rows)
        per_row.add(exchange / rows)
        assert exchange / all_reduce_bytes_sent(4 * d, 2) == rows * 16 * k / d
    assert per_row == {16 * k * 4}  # O(k) per row, O(log d) rows


# --- resume and per-rank state ----------------------------------------------------------------------
def _fresh(tr, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (30, 7)]
    return SketchedAMSGrad(params, lr=1e-2, k=4, sketch_rows=3, sketch_columns=16, transport=tr, **kwargs)


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _continue(opt, rank, first, last):
    for t in range(first, last + 1):
        for i, p in enumerate(_params(opt)):
            gen = torch.Generator().manual_seed(1000 * t + 10 * rank + i)
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return [p.detach().clone() for p in _params(opt)]


@pytest.mark.parametrize("candidate_factor", [0, 2])
def test_resume_from_state_dict_or_rank_files_is_bit_identical(tmp_path, candidate_factor):
    """Steps 1-6 straight == steps 1-3, saved, loaded into a new optimizer (other initial weights, then the
    saved ones), steps 4-6: (a) from this rank's own state_dict; (b) as under DeepSpeed, rank 0's
    state_dict on every rank plus each rank's own per-rank file (m_i and e_i)."""

    def save(rank, tr):
        straight = _continue(_fresh(tr, candidate_factor=candidate_factor), rank, 1, 6)
        first = _fresh(tr, candidate_factor=candidate_factor)
        _continue(first, rank, 1, 3)
        save_rank_state(first, str(tmp_path))
        return straight, first.state_dict(), [p.detach().clone() for p in _params(first)]

    saved = InProcessWorld(3).run(save)

    def resume(rank, tr):
        straight, own, weights = saved[rank]
        resumed = []
        for state_dict, per_rank_files in ((own, False), (saved[0][1], True)):
            opt = _fresh(tr, seed=9, candidate_factor=candidate_factor)
            for p, w in zip(_params(opt), weights):
                p.data.copy_(w)
            opt.accept_foreign_rank_state = per_rank_files
            opt.load_state_dict(copy.deepcopy(state_dict))
            if per_rank_files:
                assert load_rank_state(opt, str(tmp_path))
            resumed.append(_continue(opt, rank, 4, 6))
        return straight, resumed

    for straight, resumed in InProcessWorld(3).run(resume):
        for params in resumed:
            assert all(torch.equal(a, b) for a, b in zip(straight, params))


def test_state_without_the_per_rank_buffers_restarts_them_on_every_rank():
    def run(rank, tr):
        opt = _fresh(tr)
        _continue(opt, rank, 1, 3)
        assert set(keys_with_scope(opt.state_specs(), PER_RANK)) == {EXP_AVG, WORKER_ERROR}
        held = {key for key, value in opt.bucket_state(opt.buckets()[0]).items() if torch.is_tensor(value)}
        assert held == {EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, WORKER_ERROR}  # every buffer declared, all full length
        assert all(opt.bucket_state(opt.buckets()[0])[key].numel() == 37 for key in held)
        assert set(keys_with_scope(opt.state_specs(), RANK_IDENTICAL)) >= {EXP_AVG_SQ, MAX_EXP_AVG_SQ}
        stripped = without_rank_state(opt.state_dict())
        assert EXP_AVG not in next(iter(stripped["state"].values()))
        fresh = _fresh(tr, seed=3)
        fresh.load_state_dict(copy.deepcopy(stripped))
        state = fresh.bucket_state(fresh.buckets()[0])
        assert all(int(torch.count_nonzero(state[key])) == 0 for key in (EXP_AVG, WORKER_ERROR))
        assert torch.equal(state[MAX_EXP_AVG_SQ], opt.bucket_state(opt.buckets()[0])[MAX_EXP_AVG_SQ])
        assert state["step"] == 3
        _continue(fresh, rank, 4, 5)
        fresh.check_ranks_agree()
        return True

    assert InProcessWorld(2).run(run) == [True, True]


def test_low_precision_parameters_keep_fp32_state_and_master_weights():
    def run(rank, tr):
        p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
        opt = SketchedAMSGrad([p], lr=1e-4, k=8, transport=tr)
        for t in range(3):
            p.grad = torch.randn(64, generator=torch.Generator().manual_seed(t + rank)).to(torch.bfloat16)
            opt.step()
        state = opt.bucket_state(opt.buckets()[0])
        return {key: state[key].dtype for key in (EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, WORKER_ERROR, "master_params")}

    dtypes = InProcessWorld(2).run(run)
    assert dtypes[0] == dtypes[1] and set(dtypes[0].values()) == {torch.float32}


# --- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"lr": -1.0}, ValueError, "Invalid lr=-1.0. Must be a finite number >= 0.0."),
        ({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0. Must be in [0.0, 1.0)."),
        ({"eps": 0.0}, ValueError, "Invalid eps=0.0. Must be a number > 0.0."),
        ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay=-0.1. Must be a number >= 0.0."),
        ({"k": 0}, ValueError, "Invalid k=0. Must be an int >= 1."),
        ({"k": 2.5}, ValueError, "Invalid k=2.5. Must be an int >= 1."),
        (
            {"sketch_rows": 0},
            ValueError,
            "Invalid sketch_rows=0. Must be None (ceil(log2 d) for a bucket of d coordinates) or an int >= 1.",
        ),
        ({"sketch_columns": -3}, ValueError, "Invalid sketch_columns=-3. Must be None (16 k) or an int >= 1."),
        ({"candidate_factor": -1}, ValueError, "Invalid candidate_factor=-1. Must be an int >= 0."),
        ({"seed": 1.5}, TypeError, "Invalid seed=1.5. Must be an int."),
        ({"nonfinite_grads": "ignore"}, ValueError, "Invalid nonfinite_grads='ignore'. Allowed: error, skip."),
    ],
)
def test_bad_settings_name_the_key_and_what_is_allowed(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SketchedAMSGrad([torch.nn.Parameter(torch.zeros(3))], transport=InProcessWorld(1).transports[0], **kwargs)
    with pytest.raises(error, match=re.escape(message)):
        SketchedAMSGradConfig(**kwargs)  # the DeepSpeed JSON path builds the same dataclass


def test_count_sketch_is_sketched_amsgrads_exchange_only():
    message = "Invalid exchange='count_sketch': it is SketchedAMSGrad's own scheme"
    with pytest.raises(ValueError, match=re.escape(message)):
        CDAdam([torch.nn.Parameter(torch.zeros(3))], exchange="count_sketch", transport=InProcessWorld(1).transports[0])
    with pytest.raises(ValueError, match="exchange='count_sketch' is SketchedAMSGrad's"):
        CountSketchExchange(InProcessWorld(1).transports[0], ShardLayout(4, 1), CDAdam.CONFIG().build_compressor())


def test_json_keys_are_the_config_fields():
    assert json_keys(SketchedAMSGradConfig) == (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "k",
        "sketch_rows",
        "sketch_columns",
        "candidate_factor",
        "timeout_s",
        "seed",
        "nonfinite_grads",
        "consistency_check_every",
        "comm_backend_name",
        "cuda_aware",
    )
    assert SketchedAMSGradConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)  # JSON lists become tuples


# --- gloo ------------------------------------------------------------------------------------------
GLOO_STEPS = 6
GLOO_SETTINGS = ("small_even_rows", "second_round")


def _gloo(rank, world_size, out_dir):
    for setting in GLOO_SETTINGS:
        history, opt = run_sketched(rank, TorchDistributedTransport(timeout_s=60), GLOO_STEPS, **SETTINGS[setting])
        torch.save({"history": history, "stats": opt.comm_stats}, f"{out_dir}/{setting}-{rank}.pt")


@pytest.mark.parametrize(
    "world_size", [3, pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]
)
def test_gloo_matches_the_reference(tmp_path, world_size):
    """Real processes and torch.distributed's gloo reduce-scatter / all-gather (3 ranks by default: the
    sketch is padded to a multiple of 3); the same parameters as the reference, the same bytes."""
    spawn(_gloo, world_size, str(tmp_path))
    for setting in GLOO_SETTINGS:
        settings = SETTINGS[setting]
        expected = reference_history(reference(world_size, **settings), world_size, GLOO_STEPS)
        shape = CountSketch(settings["k"], settings.get("sketch_rows"), settings.get("sketch_columns")).shape(D)
        up, down, _, calls = expected_bytes(
            world_size, D, shape.rows, shape.columns, shape.k, settings.get("candidate_factor", 0)
        )
        for rank in range(world_size):
            got = torch.load(tmp_path / f"{setting}-{rank}.pt", weights_only=False)
            assert max_abs_diff(got["history"], expected) <= 1e-12, (setting, rank)
            assert (got["stats"].bytes_up, got["stats"].bytes_down) == (GLOO_STEPS * up, GLOO_STEPS * down)
            assert got["stats"].collective_calls == GLOO_STEPS * (calls + 1)
