"""Non-finite gradients and rank divergence are caught on every rank alike, before damage is done."""

import re

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam, TorchDistributedTransport
from tests.distributed import spawn

STEPS = 6


def _grad(rank: int, step: int) -> torch.Tensor:
    return torch.randn(10, generator=torch.Generator().manual_seed(100 * step + rank), dtype=torch.float64)


def _train(opt_cls, rank, transport, bad_step=None, drop_step=None, **kwargs):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64))
    opt = opt_cls([p], lr=1e-2, transport=transport, **kwargs)
    opt.param_names = {id(p): "encoder.weight"}
    snapshots = []
    for t in range(1, STEPS + 1):
        if t == drop_step:
            continue
        p.grad = _grad(rank, t)
        if t == bad_step and rank == 1:
            p.grad[3] = float("nan")
        opt.step()
        snapshots.append(
            (p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()})
        )
    return snapshots, opt.skipped_steps


@pytest.mark.parametrize("opt_cls", [CDAdam, OneBitAdam])
def test_nonfinite_gradient_is_an_error_on_every_rank_and_changes_nothing(opt_cls):
    errors = []

    def worker(rank, transport):
        p = torch.nn.Parameter(torch.ones(10, dtype=torch.float64))
        opt = opt_cls([p], lr=1e-2, transport=transport, **({"freeze_step": 1} if opt_cls is OneBitAdam else {}))
        opt.param_names = {id(p): "encoder.weight"}
        for t in range(1, 4):
            p.grad = _grad(rank, t)
            if t == 3 and rank == 1:
                p.grad[3] = float("inf")
            before = (p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()})
            try:
                opt.step()
            except FloatingPointError as err:
                errors.append((rank, str(err)))
                assert torch.equal(p.detach(), before[0])
                for k, v in opt.state[p].items():
                    assert torch.equal(v, before[1][k]) if torch.is_tensor(v) else v == before[1][k], k

    InProcessWorld(2).run(worker)
    assert sorted(r for r, _ in errors) == [0, 1]
    messages = dict(errors)
    assert messages[0].startswith("Non-finite gradient (NaN or inf) on rank(s) [1]. No parameter or optimizer state")
    assert "on rank(s) [1] (on this rank first in 'encoder.weight')" in messages[1]


def test_skip_policy_skips_on_every_rank_as_if_the_step_never_happened():
    skipped = InProcessWorld(2).run(lambda r, tr: _train(CDAdam, r, tr, bad_step=3, nonfinite_grads="skip"))
    dropped = InProcessWorld(2).run(lambda r, tr: _train(CDAdam, r, tr, drop_step=3))
    for rank in range(2):
        snaps, count = skipped[rank]
        assert count == 1
        assert torch.equal(snaps[1][0], snaps[2][0])  # step 3 changed nothing
        final_skip, final_drop = snaps[-1], dropped[rank][0][-1]
        assert torch.equal(final_skip[0], final_drop[0])
        assert all(torch.equal(final_skip[1][k], final_drop[1][k]) for k in ("markov_state", "server_markov_state"))


def test_divergence_is_detected_and_named():
    def worker(rank, transport):
        p = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
        opt = CDAdam([p], lr=1e-2, transport=transport, consistency_check_every=5)
        opt.param_names = {id(p): "decoder.bias"}
        for t in range(1, 11):
            p.grad = _grad(rank, t)
            if t == 4 and rank == 1:
                with torch.no_grad():
                    p[0] += 1e-12  # a silent corruption on one rank
            opt.step()

    msg = "Ranks diverged by step 5: 'decoder.bias' differs from rank 0's on rank(s) [1]."
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        InProcessWorld(2).run(worker)


def _long_run(rank, world_size, out_dir, steps=1000, check_every=100, nan_every=0):
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    opt = CDAdam(
        model.parameters(), lr=1e-3, transport=TorchDistributedTransport(timeout_s=60), consistency_check_every=100
    )
    gen = torch.Generator().manual_seed(rank)
    for _ in range(1000):
        x = torch.randn(16, 6, generator=gen)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], f"{out_dir}/final-{rank}.pt")


def test_thousand_steps_on_four_gloo_ranks_end_identical(tmp_path):
    spawn(_long_run, 4, str(tmp_path))  # consistency checked every 100 steps inside
    finals = [torch.load(tmp_path / f"final-{r}.pt") for r in range(4)]
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other))


@pytest.mark.soak
def test_soak_20000_steps_with_poisoned_batches(tmp_path):
    """`make soak`: 20,000 steps on 4 gloo ranks, a NaN batch on some rank every 97 steps (skipped
    everywhere), consistency checked every 500 steps; all ranks end bit-identical."""
    spawn(_long_run, 4, str(tmp_path), 20_000, 500, 97, deadline_s=3000)
    finals = [torch.load(tmp_path / f"final-{r}.pt") for r in range(4)]
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other))
