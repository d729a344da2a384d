"""`deepspeed --num_gpus 2 ...` on CPU: JSON "LIECSGD" through an unmodified deepspeed.initialize,
with a checkpoint saved and loaded between two averages, where the ranks' models differ.

One launch (ds_train.py): 8 steps uninterrupted, and 5 steps + save + load into an engine started
from other weights + 3 more steps. Average period 3: averages at steps 3 and 6, the save at step 5.
"""

from __future__ import annotations

import pytest
import torch

from deepspeed_cdadam import LIECSGD
from deepspeed_cdadam.comm.accounting import all_gather_bytes_sent, all_reduce_bytes_sent, all_to_all_bytes_sent
from deepspeed_cdadam.references.liec_sgd import LIECSGDReference
from tests.integration.test_deepspeed_launcher import SAVE_AT, STEPS, launch, replay

PARAMS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "average_period": 3}


def expected_bytes_sent(numel: int, steps: int, period: int) -> int:
    """2 ranks, fp32, one scale bucket: a compressed step sends one message up (packed signs of a
    shard + one scale), one down, and one partial sum for the server scale; an averaging step the
    shard of the model and of the gradient, up and down; every step the 2 control flags."""
    shard = -(-numel // 2)
    compressed = all_to_all_bytes_sent(-(-shard // 8) + 4, 2) + all_gather_bytes_sent(-(-shard // 8) + 4, 2)
    compressed += all_gather_bytes_sent(4, 2)
    average = all_to_all_bytes_sent(2 * shard * 4, 2) + all_gather_bytes_sent(2 * shard * 4, 2)
    averages = steps // period
    return (steps - averages) * compressed + averages * average + steps * all_reduce_bytes_sent(8, 2)


def test_liecsgd_from_json_resumes_every_ranks_own_model_between_averages(tmp_path):
    records = launch(tmp_path, {"type": "LIECSGD", "params": PARAMS})
    assert [r["optimizer"] for r in records] == ["LIECSGD", "LIECSGD"]
    assert [r["allreduce_calls"] for r in records] == [0, 0]  # the engine's all-reduce stays off
    # the ranks' models differ at the save (momentum 0.9: they never coincide)
    assert not torch.equal(records[0]["params"][SAVE_AT - 1], records[1]["params"][SAVE_AT - 1])
    # the engine adds nothing and loses nothing: our optimizer on the recorded gradients, bit for bit,
    # and the resumed run ends where the uninterrupted one does, on every rank
    replayed = replay(LIECSGD, PARAMS, records)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(records[rank]["params"], replayed[rank])), rank
        assert torch.equal(records[rank]["resumed_params"], records[rank]["params"][-1]), rank
    assert not torch.equal(records[0]["resumed_params"], records[1]["resumed_params"])
    # the reference written from the authors' code, on the same gradients
    x0 = records[0]["x0"].double()
    ref = LIECSGDReference(x0, 2, lr=0.05, momentum=0.9, weight_decay=1e-3, average_period=3)
    for t in range(STEPS):
        models = ref.step([r["grads"][t].double() for r in records])
        for rank in range(2):
            torch.testing.assert_close(models[rank].float(), records[rank]["params"][t], rtol=0, atol=1e-5)
    numel = x0.numel()
    assert [r["bytes_sent"] for r in records] == [expected_bytes_sent(numel, STEPS, 3)] * 2


@pytest.mark.slow
def test_liecsgd_fp16_resumes_every_ranks_own_model_between_averages(tmp_path):
    """Under DeepSpeed's fp16 wrapper the optimizer's parameters are the wrapper's fp32 copies: the
    per-rank file restores them, and the model takes them rounded (``copy_rank_parameters_to_model``)."""
    records = launch(tmp_path, {"type": "LIECSGD", "params": PARAMS}, fp16={"enabled": True, "loss_scale": 128})
    assert records[0]["params"][0].dtype == torch.float16
    assert [r["allreduce_calls"] for r in records] == [0, 0]
    assert not torch.equal(records[0]["params"][SAVE_AT - 1], records[1]["params"][SAVE_AT - 1])
    for rank in range(2):
        assert torch.equal(records[rank]["resumed_params"], records[rank]["params"][-1]), rank
