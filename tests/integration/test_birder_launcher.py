"""`deepspeed --num_gpus 2 ...` on CPU: JSON "Birder" (and hierarchy "node") through an unmodified deepspeed.initialize.

As tests/integration/test_deepspeed_launcher.py: 8 steps on 2 gloo ranks (ds_train.py), the engine's
parameters equal a replay of the recorded gradients through our optimizer outside DeepSpeed bit for
bit, equal the plain reference, and a run saved at step 5, loaded into a new engine and continued
ends where the uninterrupted run does.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed_cdadam import Birder, CDAdam  # noqa: E402
from deepspeed_cdadam.references.birder import BirderReference, NodeBirderReference  # noqa: E402
from tests.integration.test_deepspeed_launcher import STEPS, launch, replay  # noqa: E402


def _check(records, cls, kwargs, reference):
    assert [r["allreduce_calls"] for r in records] == [0, 0]  # compressed from step 1: engine all-reduce off
    replayed = replay(cls, kwargs, records)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(records[rank]["params"], replayed[rank]))
        assert torch.equal(records[rank]["params"][-1], records[0]["params"][-1])  # identical on both ranks
        assert torch.equal(records[rank]["resumed_params"], records[rank]["params"][-1])
    if reference is not None:
        for t in range(STEPS):
            torch.testing.assert_close(
                reference.step([r["grads"][t] for r in records]), records[0]["params"][t], rtol=0, atol=1e-6
            )
    assert not torch.equal(records[0]["params"][-1], records[0]["x0"])


def test_birder_from_json(tmp_path):
    params = {"lr": 0.01, "beta": 0.9, "weight_decay": 0.01, "seed": 3}
    records = launch(tmp_path, {"type": "Birder", "params": params})
    assert records[0]["optimizer"] == "Birder"
    _check(records, Birder, params, BirderReference(records[0]["x0"], 2, **params))
    # 1 bit per coordinate up, the counts (0..2: 2 bits) down, and the 8-byte control message, per step
    shard = -(-records[0]["x0"].numel() // 2)
    per_step = -(-shard // 8) + 2 * -(-shard // 8) + 8
    assert records[0]["bytes_sent"] == STEPS * per_step


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["Birder", "CDAdam"])
def test_node_hierarchy_from_json_reads_the_launchers_local_size(tmp_path, optimizer):
    """hierarchy "node" without ranks_per_node: the deepspeed launcher's LOCAL_SIZE (2: one node of 2 ranks),
    node groups split from the engine's data-parallel group."""
    params = {"lr": 0.01, "hierarchy": "node"}
    records = launch(tmp_path, {"type": optimizer, "params": params})
    cls = {"Birder": Birder, "CDAdam": CDAdam}[optimizer]
    reference = NodeBirderReference(records[0]["x0"], 1, 2, lr=0.01) if cls is Birder else None
    _check(records, cls, {**params, "ranks_per_node": 2}, reference)
