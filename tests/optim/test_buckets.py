"""Communication buckets are independent of param groups: one bucket per (dtype, device), one pair of
collectives per bucket and step, whatever the groups (Hugging Face style decay / no-decay groups)."""

from collections import Counter

import pytest
import torch

from deepspeed_cdadam import EF21, CDAdam, InProcessWorld, OneBitAdam
from deepspeed_cdadam.comm.transport import Transport

COLLECTIVES = ("all_to_all", "all_gather", "all_reduce_sum", "reduce_scatter_sum")


class CountingTransport(Transport):
    """Delegates to ``inner`` and counts every collective it is handed (async twins included)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.rank, self.world_size, self.device = inner.rank, inner.world_size, inner.device
        self.calls: Counter = Counter()

    def _call(self, name, x):
        self.calls[name] += 1
        return getattr(self.inner, name)(x)

    def all_to_all(self, send):
        return self._call("all_to_all", send)

    def all_gather(self, send):
        return self._call("all_gather", send)

    def all_reduce_sum(self, x):
        return self._call("all_reduce_sum", x)

    def reduce_scatter_sum(self, send):
        return self._call("reduce_scatter_sum", send)

    def start_all_to_all(self, send):
        return self._call("start_all_to_all", send)

    def start_all_gather(self, send):
        return self._call("start_all_gather", send)

    def start_all_reduce_sum(self, x):
        return self._call("start_all_reduce_sum", x)

    def start_reduce_scatter_sum(self, send):
        return self._call("start_reduce_scatter_sum", send)


def decay_groups(model: torch.nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """The Hugging Face split: weights decay, biases do not."""
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = {
    "cdadam": (CDAdam, {"lr": 1e-3}),
    "cdadam_block_none": (CDAdam, {"lr": 1e-3, "block_size": None}),
    "onebit": (OneBitAdam, {"lr": 1e-3, "freeze_step": 1}),  # compressed from step 2
    "ef21": (EF21, {"lr": 1e-2}),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_decay_no_decay_groups_cost_two_collectives_and_one_control_message_per_step(name):
    cls, kwargs = OPTIMIZERS[name]

    def run(rank, inner):
        tr = CountingTransport(inner)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))
        opt = cls(decay_groups(model), transport=tr, **kwargs)
        (bucket,) = opt.buckets()  # both groups share one bucket
        assert [(s.group_index, s.start, s.stop) for s in bucket.segments] == [(0, 0, 456), (1, 456, 483)]
        per_step = []
        gen = torch.Generator().manual_seed(rank)
        for _ in range(5):
            model.zero_grad()
            model(torch.randn(8, 16, generator=gen)).square().mean().backward()
            before = Counter(tr.calls)
            opt.step()
            per_step.append(tr.calls - before)
        return per_step, opt.comm_stats.collective_calls

    for per_step, _ in InProcessWorld(2).run(run):
        # from step 3 on (an exchange's first step may also agree once on the fused kernels, and
        # 1-bit Adam's step 1 is its exact warm-up): one all_to_all up and one all_gather down for
        # the whole model, plus the control all-reduce (non-finite flags and the step plan)
        for calls in per_step[2:]:
            assert calls == Counter({"all_to_all": 1, "all_gather": 1, "all_reduce_sum": 1}), calls


def test_a_group_may_mix_dtypes_one_bucket_per_dtype():
    def run(rank, tr):
        a = torch.nn.Parameter(torch.ones(5, dtype=torch.float32))
        b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        c = torch.nn.Parameter(torch.ones(4, dtype=torch.float32))
        frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        opt = CDAdam([{"params": [frozen, a, b]}, {"params": [c], "lr": 0.0}], lr=1e-2, transport=tr)
        buckets = opt.buckets()
        assert [b_.key[0] for b_ in buckets] == [torch.float32, torch.float64]
        assert [len(b_.params) for b_ in buckets] == [2, 1] and buckets[0].params[0] is a
        assert [(s.group_index, s.start, s.stop) for s in buckets[0].segments] == [(0, 0, 5), (1, 5, 9)]
        calls = []
        for _ in range(4):
            for p in (a, b, c):
                p.grad = torch.full_like(p, rank + 1.0)
            opt.step()
            calls.append(opt.comm_stats.collective_calls)
        assert calls[3] - calls[1] == 2 * (1 + 2 * 2)  # per step: the control message + a pair per bucket
        assert torch.equal(c.detach(), torch.ones(4))  # its group's lr=0 held it still
        assert bool((a.detach() != 1).all()) and bool((b.detach() != 1).all())
        assert opt.state[a]["exp_avg"].numel() == 9 and opt.state[b]["exp_avg"].numel() == 3
        opt.check_ranks_agree()
        return True

    assert InProcessWorld(2).run(run) == [True, True]


def test_onebit_exp_avg_mask_follows_its_group_segment():
    """A mask of group 1 masks group 1's coordinates of the shared bucket, and nothing of group 0."""

    def run(rank, tr):
        gen = torch.Generator().manual_seed(rank)
        p0 = torch.nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64))
        p1 = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64))
        mask = torch.ones(6, dtype=torch.float64)
        mask[:2] = 0.0
        opt = OneBitAdam([{"params": [p0]}, {"params": [p1], "exp_avg_mask": mask}], freeze_step=2, transport=tr)
        for _ in range(6):
            p0.grad = torch.randn(10, generator=gen, dtype=torch.float64)
            p1.grad = torch.randn(6, generator=gen, dtype=torch.float64)
            opt.step()
        m = opt.state[p0]["exp_avg"]
        assert m.numel() == 16
        return m.clone()

    for m in InProcessWorld(2).run(run):
        assert torch.all(m[10:12] == 0) and torch.all(m[12:] != 0) and torch.all(m[:10] != 0)


def test_onebit_non_freeze_groups_get_their_own_bucket():
    p0, p1 = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    opt = OneBitAdam(
        [{"params": [p0]}, {"params": [p1], "non_freeze": True}], transport=InProcessWorld(1).transports[0]
    )
    assert [len(b.params) for b in opt.buckets()] == [1, 1]


def test_buckets_are_built_again_whenever_what_decides_them_changes():
    """``buckets()`` is memoised (a step asks for it more than once; building walks every parameter): the
    same objects while nothing changed, new ones when a parameter's requires_grad or dtype, a group's
    parameters, the groups themselves (``load_state_dict`` makes new group dicts: the segments must hold
    the new ones, which the lr scheduler changes) or a group's key (1-bit Adam's ``non_freeze``) changes."""
    a, b, c = (torch.nn.Parameter(torch.randn(n)) for n in (30, 50, 20))
    opt = OneBitAdam([{"params": [a, b]}], lr=1e-3, freeze_step=1, transport=InProcessWorld(1).transports[0])

    def step():
        for p in (a, b):
            p.grad = torch.ones_like(p)
        opt.step()

    def ids():
        return [[id(p) for p in bk.params] for bk in opt.buckets()]

    step()
    first = opt.buckets()
    assert opt.buckets()[0] is first[0] and ids() == [[id(a), id(b)]]
    changes = [
        (lambda: opt.load_state_dict(opt.state_dict()), [[id(a), id(b)]]),
        (lambda: b.requires_grad_(False), [[id(a)]]),
        (lambda: b.requires_grad_(True), [[id(a), id(b)]]),
        (lambda: opt.add_param_group({"params": [c]}), [[id(a), id(b), id(c)]]),
        (lambda: opt.param_groups[1].__setitem__("non_freeze", True), [[id(a), id(b)], [id(c)]]),
        (lambda: setattr(c, "data", c.data.double()), [[id(a), id(b)], [id(c)]]),
    ]
    for i, (change, want) in enumerate(changes):
        before = opt.buckets()
        change()
        after = opt.buckets()
        assert after[-1] is not before[-1] and ids() == want
        assert all(s.group is opt.param_groups[s.group_index] for bk in after for s in bk.segments)
        if i == 0:
            opt.param_groups[0]["lr"] = 0.0  # read through the new group dict: the step moves nothing
            before_step = a.detach().clone()
            step()
            assert torch.equal(a.detach(), before_step)
    assert opt.buckets()[-1].key[0] == torch.float64
