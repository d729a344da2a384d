"""fp16/bf16 parameters keep fp32 master weights: small updates are not rounded away.

Without a master copy, ``p.add_(update)`` in bf16 rounds ``1.0 - 1e-4`` back to ``1.0`` (half a bf16
ulp below 1.0 is 2^-9 ~ 2e-3), so a parameter at 1.0 never moves at lr 1e-4.
"""

import io

import pytest
import torch

from deepspeed_cdadam import EF21, CDAdam, InProcessWorld, OneBitAdam, OneBitLamb
from deepspeed_cdadam.types import EXP_AVG, MASTER_PARAMS

LOW = [torch.bfloat16, torch.float16]
OPTIMIZERS = {
    "cdadam": (CDAdam, {"lr": 1e-4}),
    "onebit": (OneBitAdam, {"lr": 1e-4, "freeze_step": 10}),
    "onebitlamb": (OneBitLamb, {"lr": 1e-4, "freeze_step": 10}),
    "ef21": (EF21, {"lr": 1e-4, "compressor": "scaled_sign"}),
}


def _grad(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A fixed gradient whose values are exact in ``dtype`` (so both runs see the same numbers)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype)


def _run(cls, kwargs, dtype, steps, world=1, n=40, grad_dtype=torch.bfloat16):
    def train(rank, transport):
        p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = cls([p], transport=transport, **kwargs)
        g = _grad(n, grad_dtype) * (rank + 1)
        for _ in range(steps):
            p.grad = g.to(dtype)
            opt.step()
        return p.detach().clone(), opt

    return InProcessWorld(world).run(train)


@pytest.mark.parametrize("dtype", LOW)
def test_bf16_param_moves_and_equals_fp32_run_rounded(dtype):
    """The issue's case: a bf16 parameter at 1.0, 50 CD-Adam steps at lr 1e-4, constant gradient."""
    ((low, opt),) = _run(CDAdam, {"lr": 1e-4}, dtype, 50, grad_dtype=dtype)
    ((full, _),) = _run(CDAdam, {"lr": 1e-4}, torch.float32, 50, grad_dtype=dtype)
    assert low.dtype == dtype
    assert bool((low != 1.0).all()), low  # every coordinate moved (by ~50 * 1e-4 = 5e-3)
    assert torch.equal(low, full.to(dtype))  # = the fp32 run, rounded once at the end
    master = opt.state[opt.param_groups[0]["params"][0]][MASTER_PARAMS]
    assert master.dtype == torch.float32 and torch.equal(master, full)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_keeps_fp32_masters_over_two_ranks(name):
    cls, kwargs = OPTIMIZERS[name]
    low = _run(cls, kwargs, torch.bfloat16, 20, world=2)
    full = _run(cls, kwargs, torch.float32, 20, world=2)
    for (p, _), (q, _) in zip(low, full):
        assert bool((p != 1.0).any())
        assert torch.equal(p, q.to(torch.bfloat16))
    assert torch.equal(low[0][0], low[1][0])  # ranks agree


def test_fp32_params_have_no_master_copy():
    ((_, opt),) = _run(CDAdam, {"lr": 1e-4}, torch.float32, 2)
    assert MASTER_PARAMS not in opt.state[opt.param_groups[0]["params"][0]]


def test_a_parameter_changed_outside_the_optimizer_wins_over_the_master():
    p = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    opt = CDAdam([p], lr=1e-2, transport=InProcessWorld(1).transports[0])
    p.grad = torch.ones(16, dtype=torch.bfloat16)
    opt.step()
    with torch.no_grad():
        p[:4] = 5.0  # e.g. the user loads other weights into the model
    opt.step()
    master = opt.state[p][MASTER_PARAMS]
    assert bool((master[:4] < 5.0).all() and (master[:4] > 4.9).all())  # moved on from 5.0, not from ~1.0
    assert bool((master[4:] < 1.0).all())
    assert torch.equal(p.detach(), master.to(torch.bfloat16))


def _train_with_resume(rank, transport, resume: bool, steps=10, k=5):
    gen = torch.Generator().manual_seed(rank)
    grads = [torch.randn(19, generator=gen).to(torch.bfloat16) for _ in range(steps)]
    p = torch.nn.Parameter(torch.linspace(-1, 1, 19).to(torch.bfloat16))
    opt = CDAdam([p], lr=1e-3, transport=transport)
    for t in range(steps):
        if resume and t == k:
            buf = io.BytesIO()
            torch.save({"param": p.detach().clone(), "optim": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            assert saved["optim"]["state"][0][MASTER_PARAMS].dtype == torch.float32
            p = torch.nn.Parameter(saved["param"])
            opt = CDAdam([p], lr=1e-3, transport=transport)
            opt.load_state_dict(saved["optim"])
            state = opt.state[p]
            # torch would cast floating-point state to the parameter's dtype (bf16): ours stays fp32
            assert state[MASTER_PARAMS].dtype == torch.float32 and state[EXP_AVG].dtype == torch.float32
        p.grad = grads[t]
        opt.step()
    return p.detach(), opt.state[p][MASTER_PARAMS].clone()


def test_bf16_resume_from_state_dict_is_bit_identical():
    straight = InProcessWorld(2).run(lambda r, tr: _train_with_resume(r, tr, resume=False))
    resumed = InProcessWorld(2).run(lambda r, tr: _train_with_resume(r, tr, resume=True))
    for (p1, m1), (p2, m2) in zip(straight, resumed):
        assert torch.equal(p1, p2) and torch.equal(m1, m2)
