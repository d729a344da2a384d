"""Hierarchy "node" for CD-Adam and 1-bit Adam: exact inside node groups, compressed across them.

Checked against the plain references of ``references/hierarchical.py`` (in-process and on gloo, 2 nodes
x 2 ranks and other shapes), bytes per level exact, state declared per rank, resume bit-identical,
node groups from the launcher's environment, and every wrong setting refused with its key named.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam, TorchDistributedTransport
from deepspeed_cdadam.checkpoint import CheckpointMismatchError, load_rank_state, save_rank_state
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.references.hierarchical import NodeCDAdamReference, NodeOneBitAdamReference
from deepspeed_cdadam.simulate import per_coordinate
from deepspeed_cdadam.state import PER_RANK, SHARD
from deepspeed_cdadam.types import DOWN_MARKOV_STATE, MARKOV_STATE, SERVER_MARKOV_STATE
from tests.distributed import spawn
from tests.harness import GROUP_LR, GROUP_SHAPES, NO_GRAD, gradient, initial_groups, max_abs_diff

STEPS = 10
SIZES = [sum(torch.Size(s).numel() for s in shapes) for shapes in GROUP_SHAPES]  # 38 + 15, one bucket
CASES = {
    # name: (optimizer, its kwargs, reference, its kwargs)
    "cdadam": (
        CDAdam,
        {"block_size": 4, "weight_decay": 0.01},
        NodeCDAdamReference,
        {"block_size": 4, "weight_decay": 0.01},
    ),
    "cdadam_one_block": (CDAdam, {"block_size": None}, NodeCDAdamReference, {"block_size": None}),
    "onebit": (
        OneBitAdam,
        {"freeze_step": 3, "weight_decay": 0.01},
        NodeOneBitAdamReference,
        {"freeze_step": 3, "weight_decay": 0.01},
    ),
}


def run_optimizer(case, rank, transport, steps=STEPS, **extra):
    """The case on the harness's two groups (different lr, one parameter without gradients)."""
    cls, kwargs, _, _ = CASES[case]
    params, groups = [], []
    for gi, (shapes, x0) in enumerate(zip(GROUP_SHAPES, initial_groups(torch.float64))):
        ps = [
            torch.nn.Parameter(t.reshape(s).clone())
            for t, s in zip(x0.split([torch.Size(s).numel() for s in shapes]), shapes)
        ]
        params.append(ps)
        groups.append({"params": ps, "lr": GROUP_LR[gi]})
    opt = cls(groups, transport=transport, **{**kwargs, **extra})
    history = []
    for t in range(1, steps + 1):
        for gi, ps in enumerate(params):
            g = gradient(gi, rank, t, torch.cat([p.detach().reshape(-1) for p in ps]))
            for pi, (p, gp) in enumerate(zip(ps, g.split([p.numel() for p in ps]))):
                p.grad = None if (gi, pi) == NO_GRAD else gp.reshape(p.shape).clone()
        opt.step()
        history.append([torch.cat([p.detach().reshape(-1) for p in ps]) for ps in params])
    return history, opt


def reference_history(case, nodes, ranks_per_node, steps=STEPS):
    _, _, ref_cls, kwargs = CASES[case]
    kwargs = dict(kwargs)
    block_size = kwargs.pop("block_size", None)
    lr = per_coordinate([(n, GROUP_LR[gi]) for gi, n in enumerate(SIZES)])
    ref = ref_cls(torch.cat(initial_groups(torch.float64)), nodes, ranks_per_node, block_size, lr=lr, **kwargs)
    history = []
    for t in range(1, steps + 1):
        grads = [
            torch.cat([gradient(gi, r, t, x) for gi, x in enumerate(ref.x.split(SIZES))])
            for r in range(nodes * ranks_per_node)
        ]
        history.append([x.clone() for x in ref.step(grads).split(SIZES)])
    return history


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("nodes,ranks_per_node", [(2, 2), (2, 3), (3, 1), (1, 2)])
def test_node_hierarchy_matches_the_reference(case, nodes, ranks_per_node):
    n = nodes * ranks_per_node
    node = {"hierarchy": "node", "ranks_per_node": ranks_per_node, "consistency_check_every": 1}
    out = InProcessWorld(n).run(lambda r, tr: run_optimizer(case, r, tr, **node)[0])
    expected = reference_history(case, nodes, ranks_per_node)
    for rank in range(n):
        assert max_abs_diff(out[rank], expected) <= 1e-12, rank
        assert all(torch.equal(a, b) for a, b in zip(out[rank][-1], out[0][-1]))  # identical on every rank
    if nodes > 1 and ranks_per_node > 1:  # the hierarchy changes the result: not the flat scheme
        flat = InProcessWorld(n).run(lambda r, tr: run_optimizer(case, r, tr)[0])
        assert max_abs_diff(out[0], flat[0]) > 1e-9


def test_one_rank_per_node_is_the_flat_exchange_bit_for_bit():
    """With ranks_per_node=1 the node average is the rank's own gradient and the inner exchange runs on
    the whole bucket over all ranks: the flat CD-Adam, to the last bit."""
    node = InProcessWorld(3).run(lambda r, tr: run_optimizer("cdadam", r, tr, hierarchy="node", ranks_per_node=1)[0])
    flat = InProcessWorld(3).run(lambda r, tr: run_optimizer("cdadam", r, tr)[0])
    for a, b in zip(node, flat):
        assert all(torch.equal(x, y) for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))


def test_bytes_per_level_are_counted_exactly():
    """2 nodes x 2 ranks, 53 float64 coordinates: inside the node an fp64 reduce-scatter and all-gather of
    the 27-coordinate node shard; across nodes CD-Adam's Markov exchange of it (block_size 4)."""

    def run(rank, tr):
        _, opt = run_optimizer("cdadam", rank, tr, hierarchy="node", ranks_per_node=2)
        return opt.node_hierarchy.intra_stats, opt.node_hierarchy.inter_stats, opt.comm_stats

    for rank, (intra, inter, total) in enumerate(InProcessWorld(4).run(run)):
        width = 27 * 8  # the longest node shard, fp64
        assert intra.bytes_up == STEPS * (2 - 1) * width  # ring reduce-scatter of G chunks: (G-1)/G of them
        assert intra.bytes_down == STEPS * (2 - 1) * width  # all_gather of one chunk to G-1 peers
        node_shard = ShardLayout(53, 2).shard_sizes[rank % 2]  # 27 or 26, split over the 2 nodes: 14 + 13
        inner = ShardLayout(node_shard, 2, 4)
        message = -(-inner.capacity // 8) + inner.max_blocks * 8  # packed signs + fp64 scales
        assert inter.bytes_up == inter.bytes_down == STEPS * (2 - 1) * message
        assert total.bytes_up == intra.bytes_up + inter.bytes_up
        assert total.bytes_down == intra.bytes_down + inter.bytes_down
        assert total.bytes_control == STEPS * all_reduce_bytes_sent(4 * 4, 4)


NUMEL = 1 << 20


def test_cdadam_across_nodes_sends_a_28th_of_fp32():
    """2 nodes x 2 ranks, a 1M-coordinate fp32 bucket, block_size 256: bytes across nodes per step against
    the fp32 ring all-reduce of the node shard across the nodes (a hierarchical fp32 all-reduce's)."""

    def run(rank, tr):
        p = torch.nn.Parameter(torch.zeros(NUMEL))
        opt = CDAdam([p], hierarchy="node", ranks_per_node=2, transport=tr)
        p.grad = torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank))
        opt.step()
        return opt.node_hierarchy.inter_stats.bytes_sent

    for sent in InProcessWorld(4).run(run):
        assert sent == 2 * (NUMEL // 4 // 8 + NUMEL // 4 // 256 * 4)  # signs + one fp32 scale per 256, each way
        assert sent / all_reduce_bytes_sent(4 * NUMEL // 2, 2) <= 1 / 28


def test_fused_cpu_kernel_across_nodes_equals_the_eager_path(monkeypatch):
    """fp32, block_size 256: the inner Markov exchange takes the fused CPU kernel on the node shards."""

    def run(rank, tr):
        p = torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(0)))
        opt = CDAdam([p], lr=1e-2, hierarchy="node", ranks_per_node=2, transport=tr)
        for t in range(3):
            p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(10 * t + rank))
            opt.step()
        inner = next(iter(opt._exchanges.values())).inner
        return p.detach().clone(), inner._kernel_everywhere

    results = {}
    for mode in ("fused", "eager"):  # "fused" raises on every rank if the kernel cannot run
        monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", mode)
        results[mode] = InProcessWorld(4).run(run)
    for (fused, used), (eager, _) in zip(results["fused"], results["eager"]):
        assert used is True and torch.equal(fused, eager)


def test_compression_state_is_per_rank_on_the_node_shards():
    def run(rank, tr):
        _, opt = run_optimizer("cdadam", rank, tr, steps=2, hierarchy="node", ranks_per_node=2)
        state = opt.bucket_state(opt.buckets()[0])
        specs = {s.key: s for s in opt.state_specs()}
        for key in (MARKOV_STATE, SERVER_MARKOV_STATE, DOWN_MARKOV_STATE):
            assert specs[key].scope == PER_RANK and specs[key].length == SHARD, key
        node_shard = ShardLayout(53, 2).shard_sizes[rank % 2]
        assert state[MARKOV_STATE].numel() == state[DOWN_MARKOV_STATE].numel() == node_shard
        assert state[SERVER_MARKOV_STATE].numel() == ShardLayout(node_shard, 2).shard_sizes[rank // 2]
        held = {k for k, v in state.items() if torch.is_tensor(v)}
        assert held <= set(specs)
        assert opt.compression_layout()["hierarchy"] == "node" and opt.compression_layout()["ranks_per_node"] == 2
        opt.check_ranks_agree()  # parameters and moments still agree everywhere
        return state[DOWN_MARKOV_STATE]

    gtil = InProcessWorld(4).run(run)
    assert torch.equal(gtil[0], gtil[2]) and torch.equal(gtil[1], gtil[3])  # same local rank, other node
    assert gtil[0].numel() != gtil[1].numel() or not torch.equal(gtil[0], gtil[1])


def _continue(opt, rank, first, last):
    params = [p for g in opt.param_groups for p in g["params"]]
    for t in range(first, last + 1):
        for i, p in enumerate(params):
            gen = torch.Generator().manual_seed(100 * t + 10 * rank + i)
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return [p.detach().clone() for p in params]


def _fresh(tr, cls=OneBitAdam, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (30, 7)]
    extra = {"freeze_step": 2} if cls is OneBitAdam else {}
    return cls(params, lr=1e-2, transport=tr, **{"hierarchy": "node", "ranks_per_node": 2, **extra, **kwargs})


def test_resume_from_rank_files_is_bit_identical_and_another_hierarchy_is_refused(tmp_path):
    def save(rank, tr):
        straight = _continue(_fresh(tr), rank, 1, 6)
        first = _fresh(tr)
        _continue(first, rank, 1, 3)
        save_rank_state(first, str(tmp_path))
        return straight, first.state_dict(), [p.detach().clone() for p in first.param_groups[0]["params"]]

    saved = InProcessWorld(4).run(save)

    def resume(rank, tr):
        straight, _, weights = saved[rank]
        opt = _fresh(tr, seed=5)
        for p, w in zip(opt.param_groups[0]["params"], weights):
            p.data.copy_(w)
        opt.accept_foreign_rank_state = True  # as under DeepSpeed: rank 0's state_dict, then each rank's file
        opt.load_state_dict(copy.deepcopy(saved[0][1]))
        assert load_rank_state(opt, str(tmp_path))
        resumed = _continue(opt, rank, 4, 6)
        flat = _fresh(tr, hierarchy="flat", ranks_per_node=None)
        _continue(flat, rank, 1, 1)
        with pytest.raises(CheckpointMismatchError, match=re.escape("'hierarchy': 'node', 'ranks_per_node': 2}")):
            load_rank_state(flat, str(tmp_path))
        return all(torch.equal(a, b) for a, b in zip(straight, resumed))

    assert InProcessWorld(4).run(resume) == [True] * 4


def test_ranks_per_node_defaults_to_the_launchers_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")

    def run(rank, tr):
        opt = _fresh(tr, cls=CDAdam, ranks_per_node=None)
        _continue(opt, rank, 1, 1)
        return opt.node_hierarchy.groups.ranks_per_node, opt.node_hierarchy.groups.intra.world_size

    assert InProcessWorld(4).run(run) == [(2, 2)] * 4


@pytest.mark.parametrize(
    "env,message",
    [
        ({}, "needs the launcher's LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (deepspeed), and neither is set"),
        ({"LOCAL_SIZE": "2", "WORLD_SIZE": "8"}, "which counts the ranks of the whole job (WORLD_SIZE=8)"),
    ],
)
def test_node_groups_that_cannot_be_known_are_a_clear_error_on_every_rank(monkeypatch, env, message):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def run(rank, tr):
        opt = _fresh(tr, cls=CDAdam, ranks_per_node=None)
        with pytest.raises(ValueError, match=re.escape(message)):
            _continue(opt, rank, 1, 1)
        return True

    assert InProcessWorld(2).run(run) == [True, True]


def test_ranks_disagreeing_on_the_node_size_raise_on_every_rank():
    def run(rank, tr):
        opt = _fresh(tr, cls=CDAdam, ranks_per_node=1 if rank == 0 else 2)
        message = "The ranks disagree on ranks_per_node (per rank: [1, 2, 2, 2])"
        with pytest.raises(ValueError, match=re.escape(message)):
            _continue(opt, rank, 1, 1)
        return True

    assert InProcessWorld(4).run(run) == [True] * 4


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (CDAdam, {"hierarchy": "rack"}, "Invalid hierarchy='rack'. Allowed: flat, node."),
        (CDAdam, {"ranks_per_node": 8}, "Invalid ranks_per_node=8 with hierarchy='flat'"),
        (CDAdam, {"hierarchy": "node", "exchange": "none"}, "Invalid exchange='none' with hierarchy='node'"),
        (
            CDAdam,
            {"hierarchy": "node", "scale_blocks": "tensor"},
            "Invalid scale_blocks='tensor' with hierarchy='node'. Allowed: fixed.",
        ),
        (
            OneBitAdam,
            {"hierarchy": "node", "worker_scale_scope": "tensor"},
            "Invalid worker_scale_scope='tensor' with hierarchy='node'. Allowed: block.",
        ),
    ],
)
def test_bad_hierarchy_settings_are_refused_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls([torch.nn.Parameter(torch.zeros(3))], transport=InProcessWorld(1).transports[0], **kwargs)


# --- gloo: 2 nodes x 2 ranks ------------------------------------------------------------------------
GLOO_STEPS = 6


def _gloo(rank, world_size, out_dir):
    from tests.optim import test_birder

    for case in ("cdadam", "onebit"):
        history, opt = run_optimizer(
            case, rank, TorchDistributedTransport(timeout_s=60), GLOO_STEPS, hierarchy="node", ranks_per_node=2
        )
        inter = opt.node_hierarchy.inter_stats.bytes_sent
        torch.save({"history": history, "inter": inter}, f"{out_dir}/{case}-{rank}.pt")
    test_birder._gloo(rank, world_size, out_dir, steps=GLOO_STEPS)  # Birder, flat and 2 x 2, in the same processes


def test_gloo_two_nodes_of_two_ranks_match_the_reference(tmp_path):
    """CD-Adam and 1-bit Adam with hierarchy "node", and Birder flat and "node", on 4 gloo processes."""
    from tests.optim import test_birder

    spawn(_gloo, 4, str(tmp_path))
    for case in ("cdadam", "onebit"):
        expected = reference_history(case, 2, 2, GLOO_STEPS)
        for rank in range(4):
            got = torch.load(tmp_path / f"{case}-{rank}.pt")
            assert max_abs_diff(got["history"], expected) <= 1e-12, (case, rank)
            assert got["inter"] > 0
    test_birder.check_gloo(tmp_path, 4, GLOO_STEPS)
