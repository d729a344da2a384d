"""Each rank's state_dict holds its compression state: save at k, load, continue to 2k == uninterrupted."""

import io

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam

K = 6


def _train(opt_cls, kwargs, rank, transport, resume: bool):
    gen = torch.Generator().manual_seed(rank)
    grads = [torch.randn(19, generator=gen, dtype=torch.float64) for _ in range(2 * K)]
    p = torch.nn.Parameter(torch.linspace(-1, 1, 19, dtype=torch.float64))
    opt = opt_cls([p], transport=transport, **kwargs)
    for t in range(2 * K):
        if resume and t == K:
            buf = io.BytesIO()
            torch.save({"param": p.detach().clone(), "optim": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            p = torch.nn.Parameter(saved["param"])
            opt = opt_cls([p], transport=transport, **kwargs)
            opt.load_state_dict(saved["optim"])
        p.grad = grads[t] * (1 + p.detach().abs())
        opt.step()
    return p.detach()


@pytest.mark.parametrize(
    "opt_cls,kwargs",
    [(CDAdam, {"lr": 1e-2}), (OneBitAdam, {"lr": 1e-2, "freeze_step": 3})],
)
def test_resume_is_bit_identical(opt_cls, kwargs):
    straight = InProcessWorld(2).run(lambda r, tr: _train(opt_cls, kwargs, r, tr, resume=False))
    resumed = InProcessWorld(2).run(lambda r, tr: _train(opt_cls, kwargs, r, tr, resume=True))
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert torch.equal(straight[0], straight[1])
