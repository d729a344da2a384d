"""Upstream OnebitAdam's param-group keys: exp_avg_mask and non_freeze."""

import pytest
import torch

from deepspeed_cdadam import InProcessWorld, OneBitAdam

FREEZE, STEPS = 3, 10


def _run(group_extra: dict, freeze_step: int = FREEZE):
    def worker(rank, transport):
        gen = torch.Generator().manual_seed(rank)
        p = torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64))
        opt = OneBitAdam([{"params": [p], **group_extra}], lr=1e-2, freeze_step=freeze_step, transport=transport)
        history = []
        for _ in range(STEPS):
            g = torch.randn(12, generator=gen, dtype=torch.float64)
            g[:4] = 0.0  # coordinates that never get a gradient
            p.grad = g
            opt.step()
            history.append(p.detach().clone())
        return history, opt.state[p]["exp_avg"].clone()

    return InProcessWorld(2).run(worker)


def test_exp_avg_mask_keeps_masked_momentum_at_zero():
    mask = torch.ones(12, dtype=torch.float64)
    mask[:4] = 0.0
    (hist, m), _ = _run({"exp_avg_mask": mask})
    assert torch.all(m[:4] == 0) and torch.all(m[4:] != 0)
    assert torch.equal(hist[-1][:4], hist[FREEZE - 1][:4])  # masked coordinates stop moving after the warm-up
    (unmasked_hist, unmasked_m), _ = _run({})
    assert torch.all(unmasked_m[:4] != 0)  # without the mask 1-bit momentum cannot be exactly zero
    assert not torch.equal(unmasked_hist[-1][:4], unmasked_hist[FREEZE - 1][:4])


def test_non_freeze_group_stays_exact_adam():
    (hist, _), (hist1, _) = _run({"non_freeze": True})
    (exact, _), _ = _run({}, freeze_step=STEPS + 1)  # warm-up for the whole run = exact Adam
    for a, b, c in zip(hist, hist1, exact):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-15)


def test_bad_mask_is_a_clear_error_at_construction():
    p = torch.nn.Parameter(torch.zeros(12))
    msg = r"Invalid exp_avg_mask: must be a tensor with one entry per coordinate of the group \(12\)"
    with pytest.raises(ValueError, match=msg):
        OneBitAdam([{"params": [p], "exp_avg_mask": torch.ones(5)}], transport=InProcessWorld(1).transports[0])


def test_a_mask_edited_or_replaced_between_steps_is_used_from_the_next_step():
    """The mask's device copy is kept from step to step (``masks.segment_mask``), and made again after an
    in-place edit of the mask or a new mask in the group: the momentum follows the mask of each step."""

    def worker(rank, transport):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64))
        mask = torch.ones(12, dtype=torch.float64)
        opt = OneBitAdam([{"params": [p], "exp_avg_mask": mask}], lr=1e-2, freeze_step=1, transport=transport)
        zeros = []
        for step in range(5):
            if step == 2:
                mask[:3] = 0.0  # in place
            if step == 3:
                opt.param_groups[0]["exp_avg_mask"] = torch.ones(12, dtype=torch.float64).index_fill_(0, torch.tensor([7]), 0.0)
            p.grad = torch.randn(12, generator=torch.Generator().manual_seed(10 * step + rank), dtype=torch.float64)
            opt.step()
            zeros.append(torch.nonzero(opt.state[p]["exp_avg"] == 0).flatten().tolist())
        return zeros

    for zeros in InProcessWorld(2).run(worker):
        assert zeros == [[], [], [0, 1, 2], [7], [7]]
