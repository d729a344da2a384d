"""The communication schedule: planned by each optimizer, agreed by every rank in the control message."""

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from deepspeed_cdadam.schedule import ScheduleMismatchError, StepKind


def _params():
    return [torch.nn.Parameter(torch.linspace(-1, 1, 24, dtype=torch.float64))]


def test_onebit_plans_exact_steps_for_its_warmup_then_compressed():
    def run(rank, tr):
        (p,) = _params()
        opt = OneBitAdam([p], lr=1e-2, freeze_step=2, transport=tr)
        kinds = []
        for _ in range(4):
            kinds.append(opt.planned_step())
            p.grad = torch.ones_like(p) * (rank + 1)
            opt.step()
        return kinds

    assert InProcessWorld(2).run(run)[0] == [StepKind.EXACT, StepKind.EXACT, StepKind.COMPRESSED, StepKind.COMPRESSED]


def test_freeze_step_zero_is_compressed_from_the_first_step():
    opt = OneBitAdam(_params(), freeze_step=0, transport=InProcessWorld(1).transports[0])
    assert opt.planned_step() == StepKind.COMPRESSED and not opt.engine_allreduces()


def test_engine_allreduce_follows_the_plan_and_the_hook_is_called_after_each_step():
    def run(rank, tr):
        (p,) = _params()
        opt = OneBitAdam([p], lr=1e-2, freeze_step=2, transport=tr)
        opt.engine_averages_exact_steps = True  # what the DeepSpeed integration sets
        seen = []
        opt.on_next_step = lambda o: seen.append(o.engine_allreduces())
        before = opt.engine_allreduces()
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        cd = CDAdam(_params(), transport=tr)
        cd.engine_averages_exact_steps = True  # CD-Adam never lets the engine average
        return before, seen, cd.engine_allreduces()

    assert InProcessWorld(2).run(run)[0] == (True, [True, False, False], False)


def test_ranks_planning_different_steps_all_raise_and_the_message_costs_no_extra_bytes():
    def run(rank, tr):
        (p,) = _params()
        opt = OneBitAdam([p], lr=1e-2, freeze_step=1 + rank, transport=tr)  # a config that differs per rank
        p.grad = torch.ones_like(p)
        opt.step()  # step 1: EXACT on both
        control = opt.comm_stats.bytes_control
        p.grad = torch.ones_like(p)
        with pytest.raises(ScheduleMismatchError, match="rank 0: COMPRESSED, rank 1: EXACT"):
            opt.step()
        return control, p.detach().clone()

    out = InProcessWorld(2).run(run)
    assert out[0][0] == all_reduce_bytes_sent(4 * 2, 2)  # one float per rank, flag and plan together
    assert torch.equal(out[0][1], out[1][1])  # nothing changed on either rank at the refused step


def test_nonfinite_flag_and_plan_share_the_slot():
    def run(rank, tr):
        (p,) = _params()
        opt = CDAdam([p], lr=1e-2, transport=tr, nonfinite_grads="skip")
        p.grad = torch.ones_like(p)
        if rank == 1:
            p.grad[0] = float("nan")
        opt.step()
        return opt.skipped_steps, opt.completed_steps()

    assert InProcessWorld(3).run(run) == [(1, 0)] * 3
