import pytest
import torch

from deepspeed_cdadam import CommTimeoutError, InProcessWorld
from deepspeed_cdadam.comm import node_groups
from tests.distributed import spawn


def test_in_process_collectives():
    world = InProcessWorld(3)

    def fn(rank, tr):
        send = torch.arange(6, dtype=torch.uint8) + 10 * rank
        a2a = tr.all_to_all(send)
        ag = tr.all_gather(torch.tensor([rank], dtype=torch.uint8))
        ar = tr.all_reduce_sum(torch.tensor([float(rank + 1)]))
        return a2a.tolist(), ag.tolist(), ar.item()

    out = world.run(fn)
    assert out[1] == ([2, 3, 12, 13, 22, 23], [0, 1, 2], 6.0)


def test_missing_peer_times_out_instead_of_hanging():
    world = InProcessWorld(2, timeout_s=0.5)

    def fn(rank, tr):
        if rank == 0:
            tr.all_gather(torch.zeros(1))

    with pytest.raises(CommTimeoutError, match="a peer did not arrive within 0.5s"):
        world.run(fn)


def _collectives_and_subgroups(rank, tr):
    """reduce_scatter, async starts and node subgroups on any transport of 4 ranks (2 nodes x 2)."""
    n = tr.world_size
    rs = tr.reduce_scatter_sum(torch.arange(2.0 * n) * (rank + 1))
    # async: start two collectives, then wait in the same order
    a2a = tr.start_all_to_all(torch.arange(n, dtype=torch.uint8) + 10 * rank)
    ag = tr.start_all_gather(torch.tensor([float(rank)]))
    ar = tr.start_all_reduce_sum(torch.ones(1))
    rsp = tr.start_reduce_scatter_sum(torch.ones(n))
    started = (a2a.wait().tolist(), ag.wait().tolist(), ar.wait().item(), rsp.wait().tolist())
    assert a2a.wait() is a2a.wait()  # waiting again returns the same result
    intra_groups, inter_groups = node_groups(n, 2)
    intra, inter = tr.split(intra_groups), tr.split(inter_groups)
    node_sum = intra.all_reduce_sum(torch.tensor([float(rank)])).item()
    leaders = inter.all_gather(torch.tensor([float(rank)])).tolist()
    return rs.tolist(), started, (intra.rank, intra.world_size, node_sum), (inter.rank, leaders)


def _check_collectives(out, n=4):
    total = sum(range(1, n + 1))
    for rank, (rs, started, intra, inter) in enumerate(out):
        assert rs == [2.0 * rank * total, (2.0 * rank + 1) * total]
        assert started == ([10 * j + rank for j in range(n)], [float(j) for j in range(n)], float(n), [float(n)])
        node = rank // 2
        assert intra == (rank % 2, 2, float(2 * node + 2 * node + 1))
        assert inter == (rank // 2, [float(j) for j in range(rank % 2, n, 2)])


def test_in_process_reduce_scatter_async_and_subgroups():
    _check_collectives(InProcessWorld(4).run(_collectives_and_subgroups))


def _gloo_collectives(rank, world_size, out_dir):
    from deepspeed_cdadam import TorchDistributedTransport

    world = TorchDistributedTransport(timeout_s=60)
    result = _collectives_and_subgroups(rank, world)
    # a split of a subgroup: only that subgroup's ranks take part (local synchronisation)
    node = world.split(node_groups(4, 2)[0])
    single = node.split([[0], [1]])
    alone = single.all_reduce_sum(torch.tensor([float(rank)])).item()
    torch.save((*result, (single.world_size, alone)), f"{out_dir}/{rank}.pt")


def test_gloo_reduce_scatter_async_and_subgroups(tmp_path):
    spawn(_gloo_collectives, 4, str(tmp_path))
    out = [torch.load(tmp_path / f"{r}.pt") for r in range(4)]
    _check_collectives([o[:4] for o in out])
    assert [o[4] for o in out] == [(1, float(r)) for r in range(4)]


@pytest.mark.parametrize(
    "groups, message",
    [([[0, 1], [1, 2]], "exactly one"), ([[0, 1]], "exactly one"), ([[0, 1, 2], []], "non-empty")],
)
def test_split_refuses_what_is_not_a_partition(groups, message):
    with pytest.raises(ValueError, match=message):
        InProcessWorld(3).transports[0].split(groups)


def test_node_groups_refuses_a_node_size_that_does_not_divide_the_world():
    assert node_groups(6, 3) == ([[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4], [2, 5]])
    with pytest.raises(ValueError, match="ranks_per_node=4: must be an int >= 1 that divides world_size=6"):
        node_groups(6, 4)
