"""0/1 Adam (``ZeroOneAdam``): n ranks in process against the plain reference of SEED_SPECS.md §5.2,
its schedule against the spec's sequences, the sync round, the mask, exact resume, bytes, bad keys.

The model: two parameter groups (their own lr, betas, eps, weight decay) of 38 and 15 coordinates,
one parameter that never gets a gradient, group 1 with an ``exp_avg_mask``. The settings (``SCHEDULE``)
pass three variance-interval doublings (1 -> 2 -> 4 -> 8) in the first 12 steps and two local-step
doublings (1 -> 2 -> 4, then clipped at 4) after: steps 1-12 are EXACT at 1, 2, 3, 5, 7, 11 and
COMPRESSED between, then syncs at 13, 14, 15, 19, 23, 27 and LOCAL steps between.
"""

from __future__ import annotations

import inspect
import io
import re

import pytest
import torch

from deepspeed_cdadam import InProcessWorld, ZeroOneAdam
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from deepspeed_cdadam.compressors import get_compressor
from deepspeed_cdadam.config import ZeroOneAdamConfig, field_names
from deepspeed_cdadam.optim.zero_one_schedule import ZeroOneSchedule
from deepspeed_cdadam.references.zero_one_adam import ZeroOneAdamReference
from deepspeed_cdadam.schedule import StepKind
from deepspeed_cdadam.types import EXP_AVG, EXP_AVG_SQ, LRS, MOMENTUM_ACCUMULATOR, SERVER_ERROR, WORKER_ERROR

SHAPES = [[(5, 7), (3,)], [(11,), (2, 2)]]  # 38 and 15 coordinates
SIZES = [38, 15]
NO_GRAD = 3  # the (2, 2) parameter of group 1 never gets a gradient
GROUPS = [
    {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0},
]
MASK = torch.ones(15, dtype=torch.float64)
MASK[3:9] = 0.0  # group 1: coordinates 3-8 of its first parameter
SCHEDULE = {"var_freeze_step": 12, "var_update_scaler": 2, "local_step_scaler": 2, "local_step_clipper": 4}
STEPS = 28
KINDS = "EEECECECCCECAAALLLALLLALLLAL"  # the steps above, one letter each (E, C, A, L)
LETTER = {StepKind.EXACT: "E", StepKind.COMPRESSED: "C", StepKind.AVERAGE: "A", StepKind.LOCAL: "L"}
REFERENCE_LETTER = {"variance": "E", "onebit": "C", "sync": "A", "local": "L"}


def initial() -> torch.Tensor:
    return torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(1234), dtype=torch.float64)


def gradient(rank: int, step: int, x: torch.Tensor) -> torch.Tensor:
    """Rank- and step-dependent, and a function of the rank's own parameters (so divergence grows)."""
    g = torch.randn(x.numel(), generator=torch.Generator().manual_seed(100 * step + rank), dtype=x.dtype)
    g = g * (1 + x.abs()) + 0.5 * x
    g[38 + 11 :] = 0.0  # NO_GRAD's coordinates: a missing .grad travels as zeros
    g[38 + 3 : 38 + 9] = 0.0  # the masked coordinates (an embedding's rows that this batch does not touch)
    return g


def make_params(x0: torch.Tensor, dtype=torch.float64) -> list[torch.nn.Parameter]:
    params, offset = [], 0
    for shape in [s for shapes in SHAPES for s in shapes]:
        n = torch.Size(shape).numel()
        params.append(torch.nn.Parameter(x0[offset : offset + n].reshape(shape).clone().to(dtype)))
        offset += n
    return params


def make_optimizer(params, transport, *, mask: bool = True, **kwargs) -> ZeroOneAdam:
    groups = [{"params": params[:2], **GROUPS[0]}, {"params": params[2:], **GROUPS[1]}]
    if mask:
        groups[1]["exp_avg_mask"] = MASK.clone()
    return ZeroOneAdam(groups, transport=transport, **{**SCHEDULE, **kwargs})


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_grads(params, rank: int, step: int) -> None:
    g, offset = gradient(rank, step, flat(params).double()), 0
    for i, p in enumerate(params):
        p.grad = None if i == NO_GRAD else g[offset : offset + p.numel()].reshape(p.shape).clone().to(p.dtype)
        offset += p.numel()


def train(opt: ZeroOneAdam, params, rank: int, first: int, last: int, record: list | None = None) -> list:
    """Steps ``first..last``; returns the parameters after each; ``record`` gets (kind, state after)."""
    out = []
    for t in range(first, last + 1):
        set_grads(params, rank, t)
        kind = opt.planned_step()
        opt.step()
        out.append(flat(params).clone())
        if record is not None:
            record.append((kind, snapshot(opt)))
    return out


def bucket_state(opt: ZeroOneAdam) -> dict:
    return opt.bucket_state(opt.buckets()[0])


def snapshot(opt: ZeroOneAdam) -> dict:
    """A copy of the bucket state (tensors cloned, the per-segment ``lrs`` list copied)."""
    copy = {k: v.clone() if torch.is_tensor(v) else v for k, v in bucket_state(opt).items()}
    copy[LRS] = list(copy[LRS])
    return copy


def per_coordinate(key: str):
    def column(values):
        return torch.cat([torch.full((n,), float(v), dtype=torch.float64) for n, v in zip(SIZES, values)])

    if key == "betas":
        return tuple(column([g["betas"][k] for g in GROUPS]) for k in (0, 1))
    return column([g[key] for g in GROUPS])


def reference(world_size: int, tensor_sizes, steps: int = STEPS, mask: bool = True) -> ZeroOneAdamReference:
    ref = ZeroOneAdamReference(
        initial(),
        world_size,
        tensor_sizes=tensor_sizes,
        lr=per_coordinate("lr"),
        betas=per_coordinate("betas"),
        eps=per_coordinate("eps"),
        weight_decay=per_coordinate("weight_decay"),
        mask=torch.cat([torch.ones(38, dtype=torch.float64), MASK]) if mask else None,
        **SCHEDULE,
    )
    history = []
    for t in range(1, steps + 1):
        history.append(ref.step([gradient(r, t, ref.x[r]) for r in range(world_size)]))
    ref.history = history  # type: ignore[attr-defined]
    return ref


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


# --- the reference -------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_blocks", ["tensor_padded", "group_padded"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_matches_the_reference_through_every_phase(world_size, scale_blocks):
    """Every rank's parameters at every step equal the reference's for that worker (float64, 1e-12).
    The reference compresses each parameter (tensor_padded) or each group (group_padded) as one tensor."""

    def run(rank, transport):
        params = make_params(initial())
        opt = make_optimizer(params, transport, scale_blocks=scale_blocks)
        kinds: list = []
        return train(opt, params, rank, 1, STEPS, kinds), "".join(LETTER[k] for k, _ in kinds)

    out = InProcessWorld(world_size).run(run)
    tensor_sizes = [35, 3, 11, 4] if scale_blocks == "tensor_padded" else SIZES
    ref = reference(world_size, tensor_sizes)
    assert "".join(REFERENCE_LETTER[k] for k in ref.kinds) == KINDS
    for rank in range(world_size):
        assert out[rank][1] == KINDS
        for t in range(STEPS):
            assert relative_diff(out[rank][0][t], ref.history[t][rank]) <= 1e-12, f"rank {rank}, step {t + 1}"
    if world_size > 1:
        assert torch.equal(out[0][0][11], out[1][0][11])  # first phase: the same parameters on every rank
        assert not torch.equal(out[0][0][16], out[1][0][16])  # local steps: each rank its own
        assert ref.compressed_allreduces == KINDS.count("C") + KINDS.count("A")
    else:
        assert ref.compressed_allreduces == 0  # one rank: nothing to send
    other = reference(world_size, [35, 3, 11, 4] if scale_blocks == "group_padded" else SIZES)
    if world_size > 1:  # the layout changes the result: the test tells the two apart
        assert relative_diff(out[0][0][-1], other.history[-1][0]) > 1e-9


def test_reference_schedule_is_the_closed_form_one():
    """Upstream's counters (the reference) and ``ZeroOneSchedule``'s closed forms give the same kinds."""
    for v, kappa, scaler, clipper in [(1, 1, 1, 1), (3, 2, 1, 2), (5, 3, 2, 5), (9, 1, 3, 3), (40, 4, 5, 16)]:
        ref = ZeroOneAdamReference(
            torch.zeros(2, dtype=torch.float64), 1, var_freeze_step=v, var_update_scaler=kappa,
            local_step_scaler=scaler, local_step_clipper=clipper,
        )  # fmt: skip
        for _ in range(150):
            ref.step([torch.ones(2, dtype=torch.float64)])
        schedule = ZeroOneSchedule(v, kappa, scaler, clipper)
        got = "".join(LETTER[schedule.kind(t)] for t in range(1, 151))
        assert got == "".join(REFERENCE_LETTER[k] for k in ref.kinds), (v, kappa, scaler, clipper)


# --- the schedule as the spec lists it ---------------------------------------------------------------
def test_schedule_of_upstreams_unit_test_settings():
    """SEED_SPECS §5.2 (var_freeze_step 4, kappa 1, local_step_scaler 1, clipper 2): call 2 variance,
    3 1-bit, 4 variance, 5 1-bit (then freeze), 6 local + sync, 7 local, 8 local + sync, ..."""

    def run(rank, transport):
        params = make_params(initial())
        opt = make_optimizer(params, transport, var_freeze_step=4, var_update_scaler=1, local_step_scaler=1,
                             local_step_clipper=2)  # fmt: skip
        opt.engine_averages_exact_steps = True  # the engine's all-reduce: on exactly before EXACT steps
        kinds, engine = [], [opt.engine_allreduces()]
        opt.on_next_step = lambda o: engine.append(o.engine_allreduces())
        for t in range(1, 11):
            kinds.append(LETTER[opt.planned_step()])
            set_grads(params, rank, t)
            opt.step()
        return "".join(kinds), engine

    kinds, engine = InProcessWorld(2).run(run)[0]
    assert kinds == "ECECALALAL"
    assert engine == [k == "E" for k in kinds + "L"]


def test_variance_steps_with_kappa_16_as_the_spec_lists_them():
    """Calls 2-17 every step, then 18, 20, ..., 48 (16 of them), then 52, 56, ... (every 4th)."""
    schedule = ZeroOneSchedule(100000, 16, 32678, 16)
    calls = [t + 1 for t in range(1, 200) if schedule.kind(t) == StepKind.EXACT]
    assert calls[:16] == list(range(2, 18))
    assert calls[16:32] == list(range(18, 49, 2))
    assert calls[32:48] == list(range(52, 113, 4))
    assert calls[48:50] == [120, 128]
    assert schedule.kind(18) == StepKind.COMPRESSED  # call 19: between refreshes
    late = ZeroOneSchedule(10, 16, 3, 5)
    intervals = [late.local_step_interval(t) for t in range(11, 11 + 15)]
    assert intervals == [1] * 3 + [2] * 3 + [4] * 3 + [5] * 6  # doubling every 3 frozen steps, clipped at 5


# --- what each kind of step may change -------------------------------------------------------------
def test_variance_changes_on_variance_steps_only_and_errors_restart_at_the_freeze():
    def run(rank, transport):
        params = make_params(initial())
        opt = make_optimizer(params, transport)
        record: list = []
        train(opt, params, rank, 1, STEPS, record)
        return record

    record = InProcessWorld(2).run(run)[0]
    for t in range(1, STEPS):  # step t + 1
        (_, before), (kind, after) = record[t - 1], record[t]
        assert torch.equal(before[EXP_AVG_SQ], after[EXP_AVG_SQ]) == (kind != StepKind.EXACT), f"step {t + 1}"
        if kind == StepKind.LOCAL:
            assert not torch.equal(before[MOMENTUM_ACCUMULATOR], after[MOMENTUM_ACCUMULATOR])
            assert torch.equal(before[WORKER_ERROR], after[WORKER_ERROR])  # nothing sent
        if kind == StepKind.AVERAGE:
            assert after[MOMENTUM_ACCUMULATOR].abs().sum() == 0 and after[LRS] == [0.0, 0.0]
        if kind == StepKind.COMPRESSED:
            assert not torch.equal(before[WORKER_ERROR], after[WORKER_ERROR])
    assert record[10][1][WORKER_ERROR].abs().sum() > 0  # step 11: the 1-bit gradient steps left error
    at_freeze = record[11][1]  # after step 12 = var_freeze_step: the errors restart for the update's
    assert at_freeze[WORKER_ERROR].abs().sum() == 0 and at_freeze[SERVER_ERROR].abs().sum() == 0


def test_sync_round_identities():
    """At a sync: m = -ubar / l on every rank alike, and x = x(last sync) + ubar / (sqrt(v) + eps),
    up to rounding (x - u undoes the local steps); with one rank x does not move at the sync."""

    def run(rank, transport):
        params = make_params(initial())
        opt = make_optimizer(params, transport, mask=False)
        train(opt, params, rank, 1, 15)  # syncs at 13, 14, 15; then local 16-18, sync 19
        at_sync = flat(params).clone()
        train(opt, params, rank, 16, 18)
        before = snapshot(opt)
        x_before = flat(params).clone()
        set_grads(params, rank, 19)
        assert opt.planned_step() == StepKind.AVERAGE
        opt.step()
        return at_sync, before, x_before, flat(params).clone(), bucket_state(opt)[EXP_AVG].clone()

    lr, eps, beta1 = per_coordinate("lr"), per_coordinate("eps"), per_coordinate("betas")[0]
    for world_size in (1, 2):
        out = InProcessWorld(world_size).run(run)
        for at_sync, before, x_before, x_after, m_after in out:
            v = before[EXP_AVG_SQ]
            lrs = 4 * lr  # steps 16-19 since the sync at 15
            assert before[LRS] == pytest.approx([3 * 1e-2, 3 * 3e-3], rel=1e-15)  # steps 16-18
            ubar = -m_after * lrs
            torch.testing.assert_close(x_after, at_sync + ubar / (v.sqrt() + eps), rtol=1e-14, atol=1e-13)
            if world_size == 1:
                # the local update of step 19, then the sync, which does not move x
                g = gradient(0, 19, x_before)
                m_local = beta1 * before[EXP_AVG] + (1 - beta1) * g
                wd = per_coordinate("weight_decay")
                local = x_before - lr * (m_local / (v.sqrt() + eps) + wd * x_before)
                torch.testing.assert_close(x_after, local, rtol=1e-14, atol=1e-13)
        assert torch.equal(out[0][4], out[-1][4])  # m after the sync: the same on every rank


def test_mask_keeps_masked_momentum_at_zero():
    """Coordinates whose gradient is always 0 and mask 0 keep m = 0 through 1-bit steps and syncs;
    without the mask the 1-bit averages (which cannot represent 0) move them."""

    def run(rank, transport, mask):
        params = make_params(initial())
        opt = make_optimizer(params, transport, mask=mask)
        ms = []
        for t in range(1, STEPS + 1):
            set_grads(params, rank, t)
            opt.step()
            ms.append(bucket_state(opt)[EXP_AVG][38 + 3 : 38 + 9].clone())
        return ms

    masked = InProcessWorld(2).run(lambda r, tr: run(r, tr, True))
    unmasked = InProcessWorld(2).run(lambda r, tr: run(r, tr, False))
    for t in range(STEPS):
        assert masked[0][t].abs().sum() == 0, f"step {t + 1}"
    assert unmasked[0][3].abs().sum() > 0 and unmasked[0][13].abs().sum() > 0  # a 1-bit step; a sync


def test_mask_is_checked_and_a_loaded_state_keeps_the_current_mask():
    params = make_params(initial())
    transport = InProcessWorld(1).transports[0]
    groups = [{"params": params[:2], "exp_avg_mask": torch.ones(37)}, {"params": params[2:]}]
    with pytest.raises(ValueError, match=re.escape("Invalid exp_avg_mask: must be a tensor with one entry per "
                                                   "coordinate of the group (38), got torch.Size([37]).")):  # fmt: skip
        ZeroOneAdam(groups, transport=transport)
    with pytest.raises(ValueError, match="Parameter-group key 'non_freeze'"):
        ZeroOneAdam([{"params": params, "non_freeze": True}], transport=transport)
    saved = make_optimizer(params, transport)
    set_grads(params, 0, 1)
    saved.step()
    state = saved.state_dict()
    fresh = make_optimizer(params, transport, mask=False)  # no mask now: the saved one is dropped
    fresh.load_state_dict(state)
    assert "exp_avg_mask" not in fresh.param_groups[1]
    other = torch.zeros(15, dtype=torch.float64)
    fresh = make_optimizer(params, transport)
    fresh.param_groups[1]["exp_avg_mask"] = other
    fresh.load_state_dict(state)
    assert torch.equal(fresh.param_groups[1]["exp_avg_mask"], other)  # the one given now (zeros), as upstream


# --- resume --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "save_at, dtype",
    [(6, torch.float64), (17, torch.float64), (17, torch.bfloat16)],
    ids=["first_phase", "between_syncs", "between_syncs_bf16_master"],
)
def test_exact_resume_from_each_ranks_state_dict(save_at, dtype):
    """Each rank saves its state_dict (and its parameters, its own after the freeze; for bf16
    parameters the state holds its fp32 master copy); a new optimizer loads them and continues bit
    for bit as the uninterrupted run (which also checks, every step, that what must agree across
    ranks does)."""

    def run(rank, transport):
        params = make_params(initial(), dtype)
        opt = make_optimizer(params, transport, consistency_check_every=1)
        straight = train(opt, params, rank, 1, STEPS)
        params = make_params(initial(), dtype)
        opt = make_optimizer(params, transport)
        train(opt, params, rank, 1, save_at)
        buffer = io.BytesIO()
        torch.save({"optimizer": opt.state_dict(), "params": flat(params)}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        params = make_params(saved["params"], dtype)
        opt = make_optimizer(params, transport)
        opt.load_state_dict(saved["optimizer"])
        resumed = train(opt, params, rank, save_at + 1, STEPS)
        return straight[save_at:], resumed

    for straight, resumed in InProcessWorld(2).run(run):
        for t, (a, b) in enumerate(zip(straight, resumed)):
            assert torch.equal(a, b), f"step {save_at + 1 + t}"


def test_rank_state_dropped_on_load_keeps_the_saved_m_and_restarts_u():
    """DeepSpeed loads rank 0's state_dict on every rank and then each rank's own per-rank file; without
    one (another world size) the per-rank state restarts: m is rank 0's, u, l and the errors zero."""

    def run(rank, transport):
        params = make_params(initial())
        opt = make_optimizer(params, transport)
        train(opt, params, rank, 1, 17)
        return opt.state_dict(), bucket_state(opt)[EXP_AVG].clone()

    (state0, m0), _ = InProcessWorld(2).run(run)
    params = make_params(initial())
    opt = make_optimizer(params, InProcessWorld(1).transports[0])
    opt.accept_foreign_rank_state = True  # as the DeepSpeed integration sets it
    opt.load_state_dict(state0)
    with pytest.raises(RuntimeError, match="loaded without its per-rank compression state"):
        opt.step()
    opt.reset_compression_state()  # what checkpoint.load_rank_state does without per-rank files
    state = bucket_state(opt)
    assert torch.equal(state[EXP_AVG], m0)
    assert state[MOMENTUM_ACCUMULATOR].abs().sum() == 0 and state[WORKER_ERROR].abs().sum() == 0
    assert state[LRS] == [0.0, 0.0] and state["step"] == 17
    set_grads(params, 0, 18)
    opt.step()
    assert torch.isfinite(flat(params)).all()


def test_a_skipped_step_does_not_advance_the_schedule():
    """nonfinite_grads="skip": a NaN on one rank skips the step on both, and the schedule (a function of
    the steps taken) continues where it was: the step after the skipped one has the skipped one's kind."""

    def run(rank, transport):
        params = make_params(initial())
        opt = make_optimizer(params, transport, nonfinite_grads="skip")
        kinds = []
        for t in range(1, 21):
            set_grads(params, rank, t)
            if rank == 1 and t == 16:
                params[0].grad[0, 0] = float("nan")
            kinds.append(LETTER[opt.planned_step()])
            opt.step()
        return "".join(kinds), opt.skipped_steps

    for kinds, skipped in InProcessWorld(2).run(run):
        assert skipped == 1
        assert kinds == KINDS[:16] + KINDS[15:19]  # step 16 (LOCAL) planned twice


def test_every_collective_gets_transport_device_tensors(tmp_path, monkeypatch):
    """As tests/optim/test_device_contract.py for the other optimizers: with ``meta`` as the default
    device, a tensor made without an explicit device would reach the transport and be refused (as NCCL
    refuses CPU tensors). Every kind of step (E, C, a skipped one, A, L), a per-rank save and load."""
    from deepspeed_cdadam.checkpoint import load_rank_state, save_rank_state

    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")

    def run(rank, transport):
        params = make_params(initial())
        opt = make_optimizer(params, transport, var_freeze_step=2, var_update_scaler=1, local_step_scaler=1,
                             local_step_clipper=2, nonfinite_grads="skip", consistency_check_every=1)  # fmt: skip
        kinds = []
        for t in range(1, 8):
            set_grads(params, rank, t)  # on the CPU (the transport's device)
            if t == 3 and rank == 1:
                params[0].grad[0, 0] = float("inf")
            kinds.append(LETTER[opt.planned_step()])
            with torch.device("meta"):  # wrong-device tensors are what the default device makes
                opt.step()
        with torch.device("meta"):
            save_rank_state(opt, str(tmp_path))
            assert load_rank_state(opt, str(tmp_path))
            opt.check_ranks_agree()
        return "".join(kinds), opt.skipped_steps

    assert InProcessWorld(2).run(run) == [("ECAALAL", 1)] * 2  # the third planned twice (skipped once)


# --- bytes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine_averages", [False, True])
def test_bytes_per_step(engine_averages):
    """Per step, this rank's bytes: EXACT one fp64 all-reduce (none when the engine averages), COMPRESSED
    and AVERAGE one 1-bit exchange, LOCAL no data; every step one control message."""

    def run(rank, transport):
        params = make_params(initial())
        opt = make_optimizer(params, transport)
        opt.engine_averages_exact_steps = engine_averages
        out = []
        for t in range(1, STEPS + 1):
            set_grads(params, rank, t)
            kind, before = opt.planned_step(), opt.comm_stats.snapshot()
            opt.step()
            after = opt.comm_stats
            out.append((kind, after.bytes_up + after.bytes_down - before.bytes_up - before.bytes_down,
                        after.bytes_control - before.bytes_control))  # fmt: skip
        layout = opt._exchanges[(0, "error_feedback")].layout
        return out, layout

    n = 3
    results = InProcessWorld(n).run(run)
    layout = results[0][1]
    assert layout.numel == 4 * 72  # each of the 4 tensors padded to a multiple of 3 * lcm(3, 8) = 72
    wire = get_compressor("sign_l2").wire_nbytes(layout.capacity, layout.max_blocks, torch.float64)
    expected = {
        StepKind.EXACT: 0 if engine_averages else all_reduce_bytes_sent(8 * 53, n),
        StepKind.COMPRESSED: 2 * (n - 1) * wire,
        StepKind.AVERAGE: 2 * (n - 1) * wire,
        StepKind.LOCAL: 0,
    }
    for out, _ in results:
        assert "".join(LETTER[k] for k, _, _ in out) == KINDS
        for t, (kind, data, control) in enumerate(out):
            assert data == pytest.approx(expected[kind], rel=1e-12), f"step {t + 1} ({kind.name})"
            assert control == pytest.approx(all_reduce_bytes_sent(4 * n, n), rel=1e-12)


# --- arguments -------------------------------------------------------------------------------------------
def test_arguments_are_the_config_fields_with_upstream_defaults():
    signature = inspect.signature(ZeroOneAdam.__init__).parameters
    names = [name for name in signature if name not in ("self", "params", "transport", "process_group")]
    assert sorted(names) == sorted(field_names(ZeroOneAdamConfig))
    config = ZeroOneAdamConfig()
    for name in names:
        assert signature[name].default == getattr(config, name), name
    assert (config.lr, config.betas, config.eps, config.weight_decay) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert (config.var_freeze_step, config.var_update_scaler) == (100000, 16)
    assert (config.local_step_scaler, config.local_step_clipper) == (32678, 16)
    assert (config.compressor, config.scale_blocks, config.worker_scale_scope) == ("sign_l2", "tensor_padded", "tensor")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"var_freeze_step": 0}, ValueError, "Invalid var_freeze_step=0. Must be an int >= 1."),
        ({"var_freeze_step": 2.5}, ValueError, "Invalid var_freeze_step=2.5. Must be an int >= 1."),
        ({"var_update_scaler": 0}, ValueError, "Invalid var_update_scaler=0. Must be an int >= 1."),
        ({"local_step_scaler": True}, ValueError, "Invalid local_step_scaler=True. Must be an int >= 1."),
        ({"local_step_clipper": -4}, ValueError, "Invalid local_step_clipper=-4. Must be an int >= 1."),
        ({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0. Must be in [0.0, 1.0)."),
        ({"scale_blocks": "tensor_pad"}, ValueError, "Invalid scale_blocks='tensor_pad'. Allowed: fixed, tensor, "),
    ],
)
def test_bad_arguments_are_refused_naming_the_key(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ZeroOneAdam(make_params(initial()), transport=InProcessWorld(1).transports[0], **kwargs)


def test_json_keys_unknown_and_upstream_ones():
    deepspeed = pytest.importorskip("deepspeed")  # noqa: F841 - the integration module imports it lazily
    from deepspeed_cdadam.config import ZeroOneAdamDeepSpeedOptions
    from deepspeed_cdadam.integration.deepspeed import ALLOWED_KEYS, OPTIMIZER_TYPES, _reject_unknown_keys

    assert OPTIMIZER_TYPES["zerooneadam"] is ZeroOneAdam
    with pytest.raises(ValueError, match=re.escape(
        "Unknown key optimizer.params.var_freeze for optimizer type 'zerooneadam'. Allowed: "
        + ", ".join(ALLOWED_KEYS["zerooneadam"]) + ". Did you mean 'var_freeze_step'?"
    )):  # fmt: skip
        _reject_unknown_keys("zerooneadam", {"var_freeze": 10})
    assert ZeroOneAdamDeepSpeedOptions(bias_correction=False, comm_backend_name="nccl")  # upstream's keys load
    with pytest.raises(ValueError, match=re.escape(
        "optimizer.params.eps_inside_sqrt=True is not supported by ZeroOneAdam"
    )):  # fmt: skip
        ZeroOneAdamDeepSpeedOptions(eps_inside_sqrt=True)
