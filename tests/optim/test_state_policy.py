"""State is declared where it is made; checkpoints, resets, checks and state_dict follow the declarations."""

import copy

import pytest
import torch

from deepspeed_cdadam import EF21, CDAdam, InProcessWorld, OneBitAdam, without_rank_state
from deepspeed_cdadam.checkpoint import load_rank_state, save_rank_state
from deepspeed_cdadam.exchange import EXCHANGES, MarkovExchange
from deepspeed_cdadam.state import FULL, PER_RANK, RANK_IDENTICAL, StateSpec, keys_with_scope
from deepspeed_cdadam.types import MARKOV_STATE

OPTIMIZERS = {
    "cdadam": (CDAdam, {}),
    "cdadam_ef": (CDAdam, {"exchange": "error_feedback"}),
    "cdadam_none": (CDAdam, {"exchange": "none", "amsgrad": False}),
    "onebit": (OneBitAdam, {"freeze_step": 2}),
    "ef21": (EF21, {}),
    "bf16": (CDAdam, {"dtype": torch.bfloat16}),
}


def _train(cls, kwargs, rank, transport, steps=4, params=None):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", torch.float64)
    init = torch.Generator().manual_seed(0)
    if params is None:
        params = [torch.nn.Parameter(torch.randn(n, generator=init).to(dtype)) for n in (30, 7)]
    opt = cls(params, lr=1e-2, transport=transport, **kwargs)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return opt, params


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_buffer_in_the_state_is_declared(name):
    cls, kwargs = OPTIMIZERS[name]

    def run(rank, tr):
        opt, params = _train(cls, kwargs, rank, tr)
        held = {k for k, v in opt.bucket_state(opt.buckets()[0]).items() if torch.is_tensor(v)}
        declared = {s.key for s in opt.state_specs()}
        assert held <= declared, f"undeclared state: {held - declared}"
        shard = opt._exchange_for(0, sum(p.numel() for p in params)).layout.shard_sizes[rank]
        for spec in opt.state_specs():
            if spec.key in held:
                want = sum(p.numel() for p in params) if spec.length == FULL else shard
                assert opt.bucket_state(opt.buckets()[0])[spec.key].numel() == want, spec.key
        return held

    InProcessWorld(2).run(run)


def test_state_dict_from_another_rank_is_refused_and_stripped_state_restarts_compression():
    def run(rank, tr):
        opt, params = _train(CDAdam, {}, rank, tr)
        mine = opt.state_dict()
        return mine, [p.detach().clone() for p in params]

    saved = InProcessWorld(2).run(run)
    rank0_dict = saved[0][0]

    def load(rank, tr):
        params = [torch.nn.Parameter(p.clone()) for p in saved[0][1]]
        opt = CDAdam(params, lr=1e-2, transport=tr)
        if rank == 1:
            with pytest.raises(ValueError, match=r"per-rank compression state of rank 0 of 2 .* this is rank 1 of 2"):
                opt.load_state_dict(rank0_dict)
        opt.load_state_dict(copy.deepcopy(without_rank_state(rank0_dict)))  # each process loads its own copy
        state = opt.bucket_state(opt.buckets()[0])
        assert torch.count_nonzero(state[MARKOV_STATE]) == 0  # restarted from zero on every rank
        assert torch.equal(state["exp_avg"], rank0_dict["state"][0]["exp_avg"])  # moments kept
        for p in params:
            p.grad = torch.full_like(p, float(rank + 1))
        opt.step()
        opt.check_ranks_agree()  # the ranks still agree after a step from the stripped state
        return True

    assert InProcessWorld(2).run(load) == [True, True]


def test_own_state_dict_round_trip_keeps_per_rank_state():
    def run(rank, tr):
        opt, params = _train(OneBitAdam, {"freeze_step": 1}, rank, tr)
        sd = opt.state_dict()
        opt2 = OneBitAdam(params, lr=1e-2, freeze_step=1, transport=tr)
        opt2.load_state_dict(sd)
        a, b = opt.bucket_state(opt.buckets()[0]), opt2.bucket_state(opt2.buckets()[0])
        return all(torch.equal(a[k], b[k]) for k in keys_with_scope(opt.state_specs(), PER_RANK))

    assert InProcessWorld(2).run(run) == [True, True]


def test_turning_requires_grad_on_later_is_refused_with_a_way_out():
    def run(rank, tr):
        init = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(12, generator=init)) for _ in range(2)]
        params[1].requires_grad_(False)
        opt = CDAdam(params, lr=1e-2, transport=tr)
        params[0].grad = torch.ones(12)
        opt.step()
        params[1].requires_grad_(True)
        params[1].grad = torch.ones(12)
        with pytest.raises(ValueError, match=r"gained requires_grad: \[\"param_groups\[0\]\['params'\]\[1\].*lr=0"):
            opt.step()
        return True

    InProcessWorld(1).run(run)


def test_a_new_exchange_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    """A scheme with an extra per-rank buffer: checkpoints and resets handle it with no other edit."""

    class CountingMarkov(MarkovExchange):
        STATE = (*MarkovExchange.STATE, StateSpec("calls", FULL, PER_RANK, "a per-rank extra"))

        def exchange(self, x, state, *, step, group=0):
            state["calls"] += 1 + self.rank
            return super().exchange(x, state, step=step, group=group)

    monkeypatch.setitem(EXCHANGES, "counting", CountingMarkov)

    def run(rank, tr):
        opt, _ = _train(CDAdam, {"exchange": "counting"}, rank, tr, steps=3)
        state = opt.bucket_state(opt.buckets()[0])
        assert state["calls"][0].item() == 3 * (1 + rank)
        save_rank_state(opt, str(tmp_path))
        state["calls"].zero_()
        assert load_rank_state(opt, str(tmp_path))
        assert state["calls"][0].item() == 3 * (1 + rank)  # restored from this rank's file
        opt.reset_compression_state()
        assert torch.count_nonzero(state["calls"]) == 0
        assert "calls" not in keys_with_scope(opt.state_specs(), RANK_IDENTICAL)
        return True

    assert InProcessWorld(2).run(run) == [True, True]


def test_state_dict_from_another_scale_layout_is_refused():
    def run(rank, tr):
        opt, params = _train(CDAdam, {"scale_blocks": "fixed"}, rank, tr)
        sd = copy.deepcopy(opt.state_dict())
        other = CDAdam(params, lr=1e-2, transport=tr, scale_blocks="tensor")
        with pytest.raises(ValueError, match=r"saved with \{'scale_blocks': 'fixed'.*runs \{'scale_blocks': 'tensor'"):
            other.load_state_dict(sd)
        return True

    assert InProcessWorld(2).run(run) == [True, True]


def test_rank_files_from_another_scale_layout_are_refused(tmp_path):
    from deepspeed_cdadam.checkpoint import CheckpointMismatchError

    def run(rank, tr):
        opt, params = _train(CDAdam, {}, rank, tr)
        save_rank_state(opt, str(tmp_path))
        other, _ = _train(CDAdam, {"scale_blocks": "tensor"}, rank, tr, params=params)
        with pytest.raises(CheckpointMismatchError, match="laid out differently"):
            load_rank_state(other, str(tmp_path))
        return True

    assert InProcessWorld(2).run(run) == [True, True]


def test_framework_loads_drop_per_rank_state_on_every_rank_and_refuse_to_step_until_restored(tmp_path):
    def run(rank, tr):
        opt, params = _train(CDAdam, {}, rank, tr)
        save_rank_state(opt, str(tmp_path))
        sd = opt.state_dict()
        fresh = CDAdam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, transport=tr)
        fresh.accept_foreign_rank_state = True  # what the DeepSpeed integration sets
        fresh.load_state_dict(copy.deepcopy(sd))  # rank 0's dict everywhere, as DeepSpeed does; here each its own
        assert MARKOV_STATE not in fresh.bucket_state(fresh.buckets()[0])  # dropped on every rank alike
        with pytest.raises(RuntimeError, match="loaded without its per-rank compression state"):
            fresh.step()
        assert load_rank_state(fresh, str(tmp_path))  # restored from this rank's file
        a, b = opt.bucket_state(opt.buckets()[0]), fresh.bucket_state(fresh.buckets()[0])
        return torch.equal(a[MARKOV_STATE], b[MARKOV_STATE])

    assert InProcessWorld(2).run(run) == [True, True]


def test_amsgrad_turned_on_later_gets_its_max_buffer():
    def run(rank, tr):
        opt, params = _train(CDAdam, {"amsgrad": False}, rank, tr, steps=2)
        opt.param_groups[0]["amsgrad"] = True
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return "max_exp_avg_sq" in opt.bucket_state(opt.buckets()[0])

    assert InProcessWorld(1).run(run) == [True]
