import pytest
import torch

from deepspeed_cdadam import CommTimeoutError, InProcessWorld


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
