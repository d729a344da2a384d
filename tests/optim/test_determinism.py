"""Same seed, same bits: rand-k randomness is shared by the ranks and never touches the global RNG."""

import torch

from deepspeed_cdadam import CDAdam, InProcessWorld
from deepspeed_cdadam.compressors import RandK
from tests.harness import run_optimizer


def test_two_runs_are_bit_identical():
    first = InProcessWorld(3).run(lambda r, tr: run_optimizer("cdadam_randk", r, tr, 12))
    second = InProcessWorld(3).run(lambda r, tr: run_optimizer("cdadam_randk", r, tr, 12))
    for (h1, _), (h2, _) in zip(first, second):
        assert all(torch.equal(a, b) for s1, s2 in zip(h1, h2) for a, b in zip(s1, s2))


def test_optimizer_step_leaves_the_global_rng_alone():
    def worker(rank, transport):
        p = torch.nn.Parameter(torch.zeros(50))
        opt = CDAdam([p], compressor=RandK(0.1), seed=7, transport=transport)
        p.grad = torch.ones(50) * (rank + 1)
        before = torch.get_rng_state()
        opt.step()
        return torch.equal(before, torch.get_rng_state())

    assert InProcessWorld(2).run(worker) == [True, True]


def test_seed_changes_the_randk_draws():
    def final(seed):
        def worker(rank, transport):
            p = torch.nn.Parameter(torch.zeros(50))
            opt = CDAdam([p], compressor=RandK(0.1), seed=seed, transport=transport)
            for t in range(3):
                p.grad = torch.arange(50.0) - 25 + t
                opt.step()
            return p.detach().clone()

        return InProcessWorld(2).run(worker)

    a, b = final(1), final(2)
    assert torch.equal(a[0], a[1]) and torch.equal(b[0], b[1])  # every rank draws the same indices
    assert not torch.equal(a[0], b[0])
