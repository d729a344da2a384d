"""OneBitLamb: equal to the plain reference written from SEED_SPECS.md 5.0 / 5.3, and its mechanics.

The model has two parameter groups (different lr, weight decay, betas, eps and coefficient clips)
of 5 tensors (35, 3, 11, 4 and 6 coordinates: 59, never a multiple of the padding), one bucket,
a momentum mask on the second group. Gradients depend on the rank, the step and the parameters,
so any divergence grows. float64 unless said.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from deepspeed_cdadam import InProcessWorld, OneBitLamb
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from deepspeed_cdadam.config import AdamConfig, OneBitLambConfig, field_names, json_keys
from deepspeed_cdadam.references.onebit_lamb import OneBitLambReference, padded_length

SHAPES = [[(5, 7), (3,)], [(11,), (2, 2), (6,)]]
SIZES = [math.prod(s) for shapes in SHAPES for s in shapes]
GROUPS = [
    {"lr": 1e-2, "weight_decay": 0.01},
    {"lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6, "max_coeff": 5.0, "min_coeff": 0.05},
]
DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "max_coeff": 10.0, "min_coeff": 0.01}
MASK = torch.ones(21)
MASK[[0, 3, 12, 20]] = 0.0  # group 1's momentum mask: coordinates that must stay zero
FREEZE, STEPS = 4, 10
LAMB = {"coeff_beta": 0.8, "factor_max": 2.0, "factor_min": 0.5, "factor_threshold": 0.2}


def initial(dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for shapes in SHAPES for s in shapes]


def gradient(k: int, rank: int, step: int, x: torch.Tensor, zero: tuple[int, ...] = ()) -> torch.Tensor:
    if k in zero:
        return torch.zeros_like(x)
    gen = torch.Generator().manual_seed(10_000 * k + 100 * step + rank)
    return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) * (1 + x.abs())


def build(transport, dtype=torch.float64, mask=True, **kwargs) -> tuple[OneBitLamb, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(x.clone()) for x in initial(dtype)]
    groups = [
        {"params": params[:2], **GROUPS[0]},
        {"params": params[2:], **GROUPS[1], **({"exp_avg_mask": MASK.to(dtype)} if mask else {})},
    ]
    options = {"freeze_step": FREEZE, **LAMB, **kwargs}
    return OneBitLamb(groups, transport=transport, **options), params


def train(opt, params, rank, first, last, zero=()) -> tuple[list[torch.Tensor], list[list[float]]]:
    xs, coeffs = [], []
    for step in range(first, last + 1):
        for k, p in enumerate(params):
            p.grad = gradient(k, rank, step, p.detach(), zero)
        opt.step()
        xs.append(torch.cat([p.detach().reshape(-1) for p in params]).clone())
        coeffs.append(opt.get_lamb_coeffs())
    return xs, coeffs


def reference(world_size, mask=True, **kwargs) -> OneBitLambReference:
    per = [GROUPS[0]] * 2 + [GROUPS[1]] * 3
    hp = {key: [{**DEFAULTS, **g}[key] for g in per] for key in ("lr", "weight_decay", "eps", "max_coeff", "min_coeff")}
    masks = [None, None, *MASK.to(torch.float64).split([11, 4, 6])] if mask else None
    options = {"freeze_step": FREEZE, **LAMB, **kwargs}
    x0 = torch.cat([x.reshape(-1) for x in initial()])
    betas = [{**DEFAULTS, **g}["betas"] for g in per]
    return OneBitLambReference(x0, world_size, SIZES, betas=betas, masks=masks, **hp, **options)


def run_reference(ref, steps, zero=()) -> tuple[list[torch.Tensor], list[list[float]]]:
    xs, coeffs = [], []
    for step in range(1, steps + 1):
        grads = []
        for rank in range(ref.n):
            parts = ref.x.split(SIZES)
            grads.append(torch.cat([gradient(k, rank, step, parts[k].view(s), zero).reshape(-1)
                                    for k, s in enumerate(s for shapes in SHAPES for s in shapes)]))  # fmt: skip
        xs.append(ref.step(grads).clone())
        coeffs.append(list(ref.lamb_coeffs))
    return xs, coeffs


# --- equal to the reference ----------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_matches_reference(world_size):
    """Across the freeze (steps 1-4 LAMB, 5-10 compressed): parameters, coefficients and the
    per-tensor state equal the plain reference, on every rank."""

    def run(rank, transport):
        opt, params = build(transport)
        xs, coeffs = train(opt, params, rank, 1, STEPS)
        return xs, coeffs, opt, params

    out = InProcessWorld(world_size).run(run)
    ref = reference(world_size)
    expected, expected_coeffs = run_reference(ref, STEPS)
    for rank in range(world_size):
        xs, coeffs, opt, params = out[rank]
        for t in range(STEPS):
            assert (xs[t] - expected[t]).abs().max() <= 1e-12, (rank, t + 1)
            assert coeffs[t] == pytest.approx(expected_coeffs[t], rel=1e-12, abs=0), (rank, t + 1)
        state = opt.state[params[0]]
        torch.testing.assert_close(state["exp_avg"], torch.cat(ref.m), rtol=0, atol=1e-12)
        torch.testing.assert_close(state["exp_avg_sq_fresh"], torch.cat(ref.v_fresh), rtol=1e-12, atol=1e-15)
        assert [opt.state[p]["lamb_coeff_freeze"] for p in params] == pytest.approx(ref.lamb_coeff_freeze, rel=1e-12)
        assert [opt.state[p]["last_factor"] for p in params] == pytest.approx(ref.last_factor, rel=1e-12)
        assert [opt.state[p]["scaling_coeff"] for p in params] == pytest.approx(ref.scaling_coeff, rel=1e-12)
        if world_size > 1:  # the padding slots keep the last exchange's output (upstream's dummy tensor)
            pad = padded_length(sum(SIZES), world_size) - sum(SIZES)
            assert state["exp_avg_padding"].numel() == pad and state["exp_avg_padding"].abs().min() > 0
            torch.testing.assert_close(state["exp_avg_padding"], ref.padding, rtol=0, atol=1e-12)
    assert ref.scaling_coeff is not None and len(set(ref.scaling_coeff)) == len(SIZES)
    assert not torch.equal(expected[-1], expected[FREEZE - 1])  # the compressed phase moved the weights


def test_float32_matches_reference_closely():
    out = InProcessWorld(2).run(lambda rank, tr: train(*build(tr, dtype=torch.float32), rank, 1, STEPS)[0])
    expected, _ = run_reference(reference(2), STEPS)
    for t in range(STEPS):
        assert (out[0][t].double() - expected[t]).abs().max() <= 1e-5, t + 1


def test_fixed_blocks_variant_runs_and_differs():
    """scale_blocks="fixed" (blocks of block_size over the shards, no padding): ranks agree step by
    step, no padding slots, and the result is not the fused one's."""

    def run(rank, transport):
        opt, params = build(transport, scale_blocks="fixed", block_size=8, consistency_check_every=1)
        xs, _ = train(opt, params, rank, 1, STEPS)
        return xs, opt.state[params[0]]["exp_avg_padding"].numel()

    out = InProcessWorld(2).run(run)
    expected, _ = run_reference(reference(2), STEPS)
    assert out[0][1] == 0
    assert torch.equal(out[0][0][-1], out[1][0][-1])
    assert (out[0][0][FREEZE - 1] - expected[FREEZE - 1]).abs().max() <= 1e-12  # the warm-up does not compress
    assert (out[0][0][-1] - expected[-1]).abs().max() > 1e-9


# --- the mechanics -------------------------------------------------------------------------------
def test_fresh_variance_is_v_at_the_freeze_then_v_stays_frozen():
    def run(rank, transport):
        opt, params = build(transport)
        state, seen = opt.state[params[0]], []
        for step in range(1, STEPS + 1):
            train(opt, params, rank, step, step)
            seen.append({k: state[k].clone() for k in ("exp_avg_sq", "exp_avg_sq_fresh")})
        return seen

    seen = InProcessWorld(2).run(run)[0]
    for t in range(FREEZE - 1):
        assert seen[t]["exp_avg_sq_fresh"].abs().max() == 0  # not yet
        assert not torch.equal(seen[t]["exp_avg_sq"], seen[t + 1]["exp_avg_sq"])  # v adapts
    assert torch.equal(seen[FREEZE - 1]["exp_avg_sq_fresh"], seen[FREEZE - 1]["exp_avg_sq"])
    for t in range(FREEZE, STEPS):
        assert torch.equal(seen[t]["exp_avg_sq"], seen[FREEZE - 1]["exp_avg_sq"])  # frozen
        assert not torch.equal(seen[t]["exp_avg_sq_fresh"], seen[t - 1]["exp_avg_sq_fresh"])  # keeps adapting


def test_factor_is_clipped_and_rate_limited():
    """Every compressed step's factor lies in [factor_min, factor_max] and within factor_threshold of
    the last one; with factor_max 1.0 (upstream's unit test) the clip binds, with a threshold of 0.02
    the rate limit binds."""
    options = {"factor_max": 1.0, "factor_min": 0.5, "factor_threshold": 0.02}

    def run(rank, transport):
        opt, params = build(transport, **options)
        factors = []
        for step in range(1, 16):
            train(opt, params, rank, step, step)
            factors.append([opt.state[p]["last_factor"] for p in params])
        return factors, [opt.state[p]["lamb_coeff_freeze"] for p in params], opt.get_lamb_coeffs()

    factors, frozen, coeffs = InProcessWorld(2).run(run)[0]
    assert all(f == [1.0] * len(SIZES) for f in factors[:FREEZE])  # warm-up: untouched
    hit_limit = hit_clip = False
    for before, now in zip(factors[FREEZE - 1 :], factors[FREEZE:]):
        for last, f in zip(before, now):
            assert 0.5 <= f <= 1.0
            assert last * (1 - 0.02) - 1e-15 <= f <= last * (1 + 0.02) + 1e-15
            hit_limit |= math.isclose(f, last * (1 - 0.02), rel_tol=1e-15)
            hit_clip |= f == 1.0
    assert hit_limit and hit_clip
    assert coeffs == pytest.approx([c * f for c, f in zip(frozen, factors[-1])], rel=1e-15)


def test_coefficient_average_skips_one():
    """lamb_coeff_freeze is the EMA of the warm-up trust ratios without bias correction, skipping
    c == 1.0: a zero gradient (m = 0) gives update 0 and c = 1.0 without weight decay (group 1), and
    with it update wd * x, c = 1 / wd clipped to max_coeff (group 0); with min_coeff = max_coeff =
    1.0 every c is 1.0, the average stays 0, and the compressed steps do not move."""

    def run(rank, transport):
        opt, params = build(transport, mask=False)
        history = []
        for step in range(1, FREEZE + 1):
            if step == 1:
                for p in params:
                    p.grad = torch.zeros_like(p)
                opt.step()
                history.append(opt.get_lamb_coeffs())
            else:
                history.append(train(opt, params, rank, step, step)[1][0])
        return history, [opt.state[p]["lamb_coeff_freeze"] for p in params]

    history, frozen = InProcessWorld(2).run(run)[0]
    assert history[0] == [10.0, 10.0, 1.0, 1.0, 1.0]
    beta = LAMB["coeff_beta"]
    for k in range(len(SIZES)):
        expected = 0.0
        for coeffs in history:
            if coeffs[k] != 1.0:
                expected = beta * expected + (1 - beta) * coeffs[k]
        assert frozen[k] == expected and expected != 0.0

    def pinned(rank, transport):
        opt, params = build(transport, mask=False)
        for g in opt.param_groups:
            g["max_coeff"] = g["min_coeff"] = 1.0
        xs, _ = train(opt, params, rank, 1, FREEZE + 3)
        return xs, [opt.state[p]["lamb_coeff_freeze"] for p in params]

    xs, frozen = InProcessWorld(2).run(pinned)[0]
    assert frozen == [0.0] * len(SIZES)
    assert not torch.equal(xs[0], xs[FREEZE - 1])  # the warm-up moves (c = 1) ...
    assert all(torch.equal(x, xs[FREEZE - 1]) for x in xs[FREEZE:])  # ... the compressed phase cannot


COUNTERS = ("collective_calls", "bytes_up", "bytes_down", "bytes_control")


def test_one_fused_exchange_per_step_and_its_bytes():
    """Warm-up: one fp64 all-reduce of the bucket + the control message; compressed: one all_to_all
    and one all_gather for all 5 tensors and both groups: 1 bit per padded coordinate and one scale
    per message, plus the control message."""
    for world_size in (2, 4):
        padded = padded_length(sum(SIZES), world_size)  # 64 for 2 and 4 ranks

        def run(rank, transport):
            opt, params = build(transport)
            per_step = []
            for step in range(1, STEPS + 1):
                before = opt.comm_stats.snapshot()
                train(opt, params, rank, step, step)
                now = opt.comm_stats
                per_step.append(tuple(getattr(now, k) - getattr(before, k) for k in COUNTERS))
            return per_step

        out = InProcessWorld(world_size).run(run)
        control = all_reduce_bytes_sent(4 * world_size, world_size)
        exact = all_reduce_bytes_sent(8 * sum(SIZES), world_size) / 2
        message = padded // world_size // 8 + 8  # packed signs of one chunk + one fp64 scale
        for rank in range(world_size):
            for t, got in enumerate(out[rank]):
                if t < FREEZE:
                    assert got == (2, exact, exact, control), (world_size, t + 1)
                else:
                    sent = (world_size - 1) * message
                    assert got == (3, sent, sent, control), (world_size, t + 1)


def test_momentum_mask_holds_after_every_compressed_step():
    def run(rank, transport):
        opt, params = build(transport)
        state, masked = opt.state[params[0]], []
        for step in range(1, STEPS + 1):
            train(opt, params, rank, step, step)
            masked.append(state["exp_avg"][38:].clone())
        return masked

    masked = InProcessWorld(2).run(run)[0]
    zeros = MASK == 0
    assert all(m[zeros].abs().max() > 0 for m in masked[:FREEZE])  # the warm-up's momentum is not masked
    for m in masked[FREEZE:]:
        assert torch.equal(m, m * MASK.double()) and m[zeros].abs().max() == 0 and m[~zeros].abs().min() > 0


def test_a_wrong_mask_is_refused_at_construction():
    p = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match=re.escape("Invalid exp_avg_mask: must be a tensor with one entry per")):
        OneBitLamb([{"params": [p], "exp_avg_mask": torch.ones(4)}], transport=InProcessWorld(1).transports[0])


def test_a_tensor_with_zero_momentum_at_the_switch_is_guarded():
    """A tensor that never gets a gradient has zero momentum at the switch: upstream divides by its
    zero RMS (ZeroDivisionError); ours gives it scaling_coeff 1.0, leaves it out of the mean, and
    everything stays finite and equal to the reference. (Without weight decay its trust ratio is
    always 1.0, so its frozen coefficient is 0 and it stays put; with weight decay and v = 0 its
    compressed momentum noise divided by eps would move it far: that is what exp_avg_mask is for.)"""
    zero = (3,)

    def run(rank, transport):
        opt, params = build(transport)
        xs, _ = train(opt, params, rank, 1, STEPS, zero=zero)
        return xs, [opt.state[p]["scaling_coeff"] for p in params]

    xs, scaling = InProcessWorld(2).run(run)[0]
    ref = reference(2)
    expected, _ = run_reference(ref, STEPS, zero=zero)
    assert scaling[3] == 1.0 and all(math.isfinite(s) for s in scaling)
    rms = [float(m.norm() / math.sqrt(m.numel())) for m in reference_momenta_at_switch(zero)]
    assert rms[3] == 0.0 and scaling[0] == pytest.approx((sum(rms) / 4) / rms[0], rel=1e-12)
    for t in range(STEPS):
        assert torch.isfinite(xs[t]).all() and (xs[t] - expected[t]).abs().max() <= 1e-12
    assert torch.equal(xs[-1][38 + 11 : 38 + 15], xs[0][38 + 11 : 38 + 15])  # never moved


def reference_momenta_at_switch(zero) -> list[torch.Tensor]:
    ref = reference(2)
    run_reference(ref, FREEZE, zero=zero)
    return [m.clone() for m in ref.m]


def test_get_lamb_coeffs_is_a_copy_in_param_group_order():
    def run(rank, transport):
        opt, params = build(transport)
        train(opt, params, rank, 1, 1)
        first = opt.get_lamb_coeffs()
        first_copy = list(first)
        train(opt, params, rank, 2, 2)
        return first, first_copy, opt.get_lamb_coeffs()

    first, first_copy, second = InProcessWorld(1).run(run)[0]
    assert first == first_copy and len(first) == len(SIZES) and first != second


# --- resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [2, 6], ids=["in_warmup", "in_compressed_phase"])
def test_state_dict_round_trip_continues_bit_identically(stop):
    """Upstream's reload resets the errors and padding slots (and in the warm-up the coefficient
    average): ours continues exactly as the uninterrupted run."""

    def run(rank, transport):
        opt, params = build(transport)
        straight, _ = train(opt, params, rank, 1, STEPS)
        first, params1 = build(transport)
        train(first, params1, rank, 1, stop)
        saved = copy.deepcopy(first.state_dict())
        second, params2 = build(transport)  # other weights: everything must come from the checkpoint
        with torch.no_grad():
            for p, q in zip(params2, params1):
                p.copy_(q)
        second.load_state_dict(saved)
        resumed, _ = train(second, params2, rank, stop + 1, STEPS)
        return straight, resumed, second, params2

    for straight, resumed, second, params in InProcessWorld(2).run(run):
        assert all(torch.equal(a, b) for a, b in zip(straight[stop:], resumed))
    # on another world size the compression state restarts: errors and padding slots zero, resized
    second.reset_compression_state()
    state = second.state[params[0]]
    assert state["exp_avg_padding"].abs().max() == 0 and state["worker_error"].abs().max() == 0
    assert state["exp_avg_padding"].numel() == padded_length(59, 2) - 59


def test_load_state_dict_keeps_the_current_mask():
    """As upstream: the mask of the group now, not the checkpoint's (it may change between stages)."""
    tr = InProcessWorld(1).transports[0]
    opt, params = build(tr)
    train(opt, params, 0, 1, 2)
    saved = copy.deepcopy(opt.state_dict())
    new_mask = torch.ones(21, dtype=torch.float64)
    fresh, _ = build(tr, mask=False)
    fresh.param_groups[1]["exp_avg_mask"] = new_mask
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.param_groups[1]["exp_avg_mask"], new_mask)  # not the saved MASK
    unmasked, _ = build(tr, mask=False)
    unmasked.load_state_dict(saved)
    assert "exp_avg_mask" not in unmasked.param_groups[1]


# --- configuration -------------------------------------------------------------------------------
def test_defaults_are_upstreams():
    config = OneBitLambConfig()
    assert (config.lr, config.freeze_step, config.betas, config.eps, config.weight_decay) == (
        1e-3, 100000, (0.9, 0.999), 1e-8, 0.0
    )  # fmt: skip
    assert (config.max_coeff, config.min_coeff, config.coeff_beta) == (10.0, 0.01, 0.9)
    assert (config.factor_max, config.factor_min, config.factor_threshold) == (4.0, 0.5, 0.1)
    assert (config.compressor, config.scale_blocks, config.worker_scale_scope, config.block_size) == (
        "sign_l2", "tensor_padded", "tensor", None
    )  # fmt: skip
    opt = OneBitLamb([torch.nn.Parameter(torch.zeros(3))], transport=InProcessWorld(1).transports[0])
    assert set(opt.defaults) == {"lr", "betas", "eps", "weight_decay", "max_coeff", "min_coeff"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"freeze_step": 0}, "Invalid freeze_step=0. Must be an int >= 1"),
        ({"max_coeff": 0.0}, "Invalid max_coeff=0.0. Must be a finite number > 0.0."),
        ({"min_coeff": -0.1}, "Invalid min_coeff=-0.1. Must be a finite number >= 0.0."),
        ({"min_coeff": 2.0, "max_coeff": 1.0}, "Invalid min_coeff=2.0 > max_coeff=1.0. Must be min_coeff <= max_coeff"),
        ({"coeff_beta": 1.0}, "Invalid coeff_beta=1.0. Must be a number in [0.0, 1.0)."),
        ({"factor_max": 0.9}, "Invalid factor_max=0.9. Must be a finite number >= 1.0."),
        ({"factor_min": 1.5}, "Invalid factor_min=1.5. Must be a number in (0.0, 1.0] (the factor starts at 1.0)."),
        ({"factor_min": 0.0}, "Invalid factor_min=0.0. Must be a number in (0.0, 1.0]"),
        ({"factor_threshold": -0.1}, "Invalid factor_threshold=-0.1. Must be a finite number >= 0.0."),
        ({"scale_blocks": "tensor"}, "Invalid scale_blocks='tensor'. Allowed: tensor_padded, fixed."),
        ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0. Must be in [0.0, 1.0)."),
    ],
)
def test_bad_hyperparameters_are_refused_with_the_key(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        OneBitLamb([torch.nn.Parameter(torch.zeros(3))], transport=InProcessWorld(1).transports[0], **kwargs)


def test_bad_group_coefficients_are_refused():
    p, tr = torch.nn.Parameter(torch.zeros(3)), InProcessWorld(1).transports[0]
    with pytest.raises(ValueError, match=re.escape("Invalid max_coeff=-1.0. Must be a finite number > 0.0.")):
        OneBitLamb([{"params": [p], "max_coeff": -1.0}], transport=tr)
    with pytest.raises(ValueError, match=re.escape("Invalid min_coeff=0.5 > max_coeff=0.3 in a parameter group.")):
        OneBitLamb([{"params": [p], "max_coeff": 0.3, "min_coeff": 0.5}], transport=tr)
    with pytest.raises(ValueError, match=re.escape("Parameter-group key 'non_freeze'")):
        OneBitLamb([{"params": [p], "non_freeze": True}], transport=tr)


def test_json_keys_are_adams_and_the_lamb_settings_and_upstreams():
    lamb = ("freeze_step", "max_coeff", "min_coeff", "coeff_beta", "factor_max", "factor_min", "factor_threshold")
    assert json_keys(OneBitLambConfig) == field_names(AdamConfig) + lamb + (
        "comm_backend_name", "cuda_aware", "bias_correction", "eps_inside_sqrt"
    )  # fmt: skip


class _Engine:
    """What ``build_optimizer`` reads of a DeepSpeed engine before it builds the optimizer."""

    mpu = None

    def __init__(self, params):
        self._params = params

    def optimizer_params(self):
        return self._params

    def optimizer_name(self):
        return "OneBitLamb"

    def zero_optimization(self):
        return False


@pytest.mark.parametrize(
    "params,message",
    [
        ({"max_coef": 1.0}, "Unknown key optimizer.params.max_coef for optimizer type 'onebitlamb'. Allowed: lr,"),
        ({"max_coef": 1.0}, "Did you mean 'max_coeff'?"),
        ({"eps_inside_sqrt": True}, "optimizer.params.eps_inside_sqrt=True is not supported by OneBitLamb"),
        ({"factor_min": 2.0}, "Invalid factor_min=2.0. Must be a number in (0.0, 1.0]"),
        ({"scale_blocks": "group_padded"}, "Invalid scale_blocks='group_padded'. Allowed: tensor_padded, fixed."),
    ],
)
def test_bad_json_is_refused_with_the_key(params, message):
    pytest.importorskip("deepspeed")
    from deepspeed_cdadam.integration.deepspeed import build_optimizer

    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        build_optimizer(_Engine(params), "onebitlamb", [torch.nn.Parameter(torch.zeros(3))])


def test_upstream_json_keys_without_effect_are_accepted():
    pytest.importorskip("deepspeed")
    from deepspeed_cdadam.integration import deepspeed as integration

    params = {"lr": 0.011, "bias_correction": False, "eps_inside_sqrt": False, "comm_backend_name": "nccl"}
    assert integration.CONFIG_TYPES["onebitlamb"] is OneBitLambConfig
    integration._reject_unknown_keys("onebitlamb", params)  # no error
    assert OneBitLambConfig.DEEPSPEED_OPTIONS(**{k: params[k] for k in ("bias_correction", "eps_inside_sqrt")})


def test_exact_zero_gradients_need_the_mask():
    """The docstring's warning, measured: rows of a 20 x 4 "embedding" that never get a gradient have
    v = 0 at the freeze; their 1-bit momentum is not zero, so without a mask they move by the
    noise / eps (here by more than 100 per step), with exp_avg_mask zero there only by weight decay."""

    def run(rank, transport, masked):
        torch.manual_seed(0)
        emb, dense = torch.nn.Parameter(torch.randn(20, 4)), torch.nn.Parameter(torch.randn(6))
        mask = torch.ones(86)
        mask[40:80] = 0.0  # rows 10-19 of emb
        group = {"params": [emb, dense], "weight_decay": 0.01, **({"exp_avg_mask": mask} if masked else {})}
        opt = OneBitLamb([group], lr=0.01, freeze_step=3, transport=transport)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(6):
            emb.grad = torch.randn(20, 4, generator=gen)
            emb.grad[10:] = 0.0
            dense.grad = torch.randn(6, generator=gen)
            before = emb.detach()[10:].clone()
            opt.step()
        return (emb.detach()[10:] - before).abs().max().item()

    unmasked = InProcessWorld(2).run(lambda rank, tr: run(rank, tr, False))[0]
    masked = InProcessWorld(2).run(lambda rank, tr: run(rank, tr, True))[0]
    assert unmasked > 100 and masked < 1e-3
